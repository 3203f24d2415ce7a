//! End-to-end tests of HTTP on the receiving agent: with mTLS, a request
//! from a pod on node 0 to a pod on node 1 crosses node 0's agent
//! (outbound: routing, balancing, retries) and node 1's agent (inbound:
//! the tunnel). A Linkerd-style diagnostic trace (`TRACE` +
//! `l5d-add-context: true`) gets a block from each, innermost first; other
//! methods get one `l5d-context` header per hop; what is not traced
//! arrives unchanged, byte for byte.
//!
//! Real agents (`WorldBuilder::mtls`), the test application (`testpeer http`) in the pods,
//! curl as the client.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::Command;

use anyhow::{Context, Result, ensure};
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
use waymark_tests::world::agent::pod_identity;
use waymark_tests::{
    Pod, Server, curl_i, eventually, http_app, metric, python, require_agent_or_skip, with_world,
    world_name,
};

/// Two endpoints on node 1 behind one VIP; the route retries 5xx.
const VIP: &str = "10.96.0.40:80";
/// The healthy endpoint alone (for byte-exact and header tests).
const GOOD_VIP: &str = "10.96.0.41:80";
const PORT: u16 = 8080;

fn services() -> [Service; 2] {
    let good = Endpoint::meshed(1, 0, PORT);
    [
        Service::new("web", VIP)
            .endpoint(good.clone())
            // The failing endpoint looks 100 times bigger, so the balancer
            // tries it first until it is ejected.
            .endpoint(Endpoint::meshed(1, 1, PORT).weight(100))
            .retry_budget(1.0, 10)
            .retry_all(2, "5xx", "2ms", "10ms"),
        Service::new("good", GOOD_VIP).endpoint(good),
    ]
}

/// The test application, named after the pod: `fail` answers 503 to
/// everything; TRACE echoes the request head, `/bytes/N` and `/chunked`
/// bodies for the trace's body handling.
fn app(pod: &Pod, mode: &str) -> Result<Server> {
    let fail = if mode == "fail" { "all" } else { "none" };
    http_app(pod, PORT, pod.name(), &["--fail", fail])
}

fn world(name: &str) -> waymark_tests::WorldBuilder {
    meshed_pair(name, 2, &services())
}

/// The TRACE crosses node 0 (outbound: the route retries the endpoint that
/// answers 503) and node 1 (inbound): node 1's block, naming the pod that
/// answered, comes first; node 0's, with the retry and the healthy endpoint
/// selected, last.
#[test]
fn trace_shows_inbound_block_then_outbound_block() {
    require_agent_or_skip!();
    with_world(world(world_name!()), |world| {
        let client = world.pod(0, 0);
        let (good, bad) = (world.pod(1, 0), world.pod(1, 1));
        let _good = app(good, "ok")?;
        let bad_app = app(bad, "fail")?;
        let good_addr = format!("{}:{PORT}", good.ip());
        let bad_addr = format!("{}:{PORT}", bad.ip());
        let client_id = pod_identity(client.name());

        // The balancer picks the first endpoint itself (the weight makes it
        // the failing one); keep asking until a first attempt lands there.
        let mut retried = None;
        for i in 0..30 {
            let (code, text) = curl_i(
                client,
                &format!("http://{VIP}/trace?i={i}"),
                &["-X", "TRACE", "-H", "l5d-add-context: true"],
            )?;
            ensure!(
                code == 200,
                "TRACE through a retrying route: {code}\n{text}"
            );
            let inbound = text
                .find("--- waymark node1 inbound ---")
                .with_context(|| format!("no inbound block from node1:\n{text}"))?;
            let outbound = text
                .find("--- waymark node0 outbound ---")
                .with_context(|| format!("no outbound block from node0:\n{text}"))?;
            ensure!(
                text.find(&format!("TRACE /trace?i={i} HTTP/1.1")) < Some(inbound),
                "the endpoint's echo comes first:\n{text}"
            );
            ensure!(
                inbound < outbound,
                "node1's block must come before node0's:\n{text}"
            );
            let (inb, outb) = (&text[inbound..outbound], &text[outbound..]);
            ensure!(
                inb.contains(&format!("destination pod: {} ({good_addr})", good.name())),
                "the inbound block names the pod that answered:\n{inb}"
            );
            ensure!(
                inb.contains(&format!(
                    "peer identity: {client_id} (verified client certificate)"
                )),
                "{inb}"
            );
            ensure!(inb.contains("authorization: allow (rule default)"), "{inb}");
            ensure!(inb.contains("endpoint of: web, good"), "{inb}");
            ensure!(inb.contains("result: 200 source=app"), "{inb}");
            // The kernel diagnostics run in the world: their view of the
            // agent's connection to the pod that answered.
            ensure!(
                inb.lines()
                    .any(|l| l.starts_with("kernel: ")
                        && l.ends_with(&format!("\u{2192}{good_addr}"))),
                "{inb}"
            );
            ensure!(inb.contains("request duration: "), "{inb}");
            ensure!(
                inb.contains(&format!("client address: {}:", client.ip())),
                "{inb}"
            );
            ensure!(
                outb.contains(&format!("selected address: {good_addr} (node1")),
                "node0 selected the healthy endpoint last:\n{outb}"
            );
            ensure!(
                outb.contains("peer identity: spiffe://cluster.local/ns/waymark-system/sa/node1"),
                "{outb}"
            );
            if outb.contains(&format!("retries: 1 (try 1: 503 from {bad_addr})")) {
                retried = Some(text);
                break;
            }
            ensure!(outb.contains("retries: 0"), "{outb}");
        }
        let text = retried.context("in 30 TRACEs no first attempt went to the failing endpoint")?;
        eprintln!("the traced response, as curl -i shows it:\n{text}");
        // The 503 went through node 1's agent too, answered by the bad pod.
        ensure!(
            bad_app.lines().iter().any(|l| l.starts_with("req ")
                && l.contains(" TRACE /trace")
                && l.ends_with(" 503")),
            "the failing endpoint never saw the TRACE: {:?}\n{text}",
            bad_app.lines()
        );

        // Inbound requests are counted on node 1, with the client identity.
        let n1 = world.node(1);
        eventually(waymark_tests::DEFAULT_PATIENCE, || {
            let ok = metric(
                n1,
                "response_total",
                &[
                    ("direction", "inbound"),
                    ("pod", good.name()),
                    ("client_id", &client_id),
                    ("status_code", "200"),
                    ("classification", "success"),
                    ("tls", "true"),
                ],
            )?;
            let failed = metric(
                n1,
                "response_total",
                &[
                    ("direction", "inbound"),
                    ("pod", bad.name()),
                    ("status_code", "503"),
                    ("classification", "failure"),
                    ("tls", "true"),
                ],
            )?;
            let requests = metric(n1, "request_total", &[("direction", "inbound")])?;
            ensure!(
                ok >= 1.0 && failed >= 1.0 && requests == ok + failed,
                "inbound ok {ok}, failed {failed}, requests {requests}"
            );
            Ok(())
        })?;
        Ok(())
    });
}

/// Without TRACE, the header asks for each hop's context as a response
/// header; a chunked answer gets its TRACE block too; a 1 MiB download
/// through the tunnel arrives byte for byte; plain requests carry no
/// context.
#[test]
fn context_headers_chunked_trace_and_plain_requests() {
    require_agent_or_skip!();
    with_world(world(world_name!()), |world| {
        let client = world.pod(0, 0);
        let good = world.pod(1, 0);
        let _good = app(good, "ok")?;
        let good_addr = format!("{}:{PORT}", good.ip());

        let (code, text) = curl_i(
            client,
            &format!("http://{GOOD_VIP}/hello"),
            &["-H", "l5d-add-context: true"],
        )?;
        ensure!(code == 200, "{code}\n{text}");
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_lowercase();
        let contexts: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("l5d-context: "))
            .collect();
        ensure!(contexts.len() == 2, "one l5d-context per hop: {head}");
        ensure!(
            contexts[0].starts_with("node=node1; direction=inbound;")
                && contexts[0].contains(&format!("endpoint={good_addr}"))
                && contexts[0].contains("authorization=allow"),
            "{head}"
        );
        ensure!(
            contexts[1].starts_with("node=node0; direction=outbound;")
                && contexts[1].contains("service=good"),
            "{head}"
        );
        ensure!(
            text.ends_with(&format!("{} /hello\n", good.name())),
            "the body is untouched: {text}"
        );

        // A chunked response: the block is appended and the length fixed.
        let (code, text) = curl_i(
            client,
            &format!("http://{GOOD_VIP}/chunked"),
            &["-X", "TRACE", "-H", "l5d-add-context: true"],
        )?;
        ensure!(code == 200, "{code}\n{text}");
        let (head, body) = text.split_once("\r\n\r\n").context("no head")?;
        ensure!(body.starts_with("TRACE /chunked HTTP/1.1"), "{body}");
        let (i, o) = (
            body.find("--- waymark node1 inbound ---"),
            body.find("--- waymark node0 outbound ---"),
        );
        ensure!(i.is_some() && i < o, "both blocks, inbound first: {body}");
        let length = head
            .lines()
            .find_map(|l| {
                l.to_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            .context("no content-length")?;
        ensure!(length.trim() == body.len().to_string(), "{head}\n{body}");

        // A plain request: no context, a body that crossed byte for byte.
        const MIB: usize = 1 << 20;
        let sums = client.run_ok(Command::new("sh").arg("-c").arg(format!(
            "curl -sS --noproxy '*' --max-time 20 http://{GOOD_VIP}/bytes/{MIB} | md5sum"
        )))?;
        let want = python()
            .args([
                "-c",
                &format!(
                    "import hashlib; print(hashlib.md5((bytes(range(256)) * {})[:{MIB}]).hexdigest())",
                    MIB / 256 + 1
                ),
            ])
            .output()?;
        let want = String::from_utf8(want.stdout)?;
        ensure!(
            sums.split_whitespace().next() == want.split_whitespace().next(),
            "1 MiB through both agents: md5 {sums} != {want}"
        );
        let (code, text) = curl_i(client, &format!("http://{GOOD_VIP}/plain"), &[])?;
        ensure!(code == 200, "{code}\n{text}");
        ensure!(
            !text.to_lowercase().contains("l5d-context"),
            "context without asking: {text}"
        );
        Ok(())
    });
}

/// A WebSocket-shaped upgrade: argv `server PORT` answers an `Upgrade`
/// request with `101` and then echoes bytes until EOF; argv `client HOST
/// PORT` upgrades, sends 256 KiB, half-closes and prints `101 <identical>
/// <eof>`.
const UPGRADE: &str = r#"
import os, socket, sys, threading
def head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            return None, b""
        buf += d
    h, rest = buf.split(b"\r\n\r\n", 1)
    return h.decode("latin-1"), rest
def serve(port):
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(port)))
    l.listen(64)
    print("listening", port, flush=True)
    def one(c):
        h, rest = head(c)
        if h is None:
            return
        print("upgrade", h.splitlines()[0], "upgrade: websocket" in h.lower(), flush=True)
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + rest)
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.shutdown(socket.SHUT_WR)
    while True:
        c, _ = l.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()
def client(host, port):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    h, rest = head(s)
    blob = os.urandom(256 * 1024)
    def send():
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    got = rest
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
    t.join()
    print((h or "none").split(" ")[1] if h else "none", got == blob, True, flush=True)
{"server": serve, "client": client}[sys.argv[1]](*sys.argv[2:])
"#;

/// An HTTP/1.1 upgrade crosses both agents and the tunnel: `101`, then
/// bytes both ways, then EOF.
#[test]
fn upgrade_through_the_tunnel_carries_bytes_both_ways() {
    require_agent_or_skip!();
    const WS_VIP: &str = "10.96.0.42:80";
    let ws = Service::new("ws", WS_VIP)
        .protocol("http1")
        .endpoint(Endpoint::meshed(1, 0, 8081));
    let b = meshed_pair(world_name!(), 1, &[ws]);
    with_world(b, |world| {
        let (client, server) = (world.pod(0, 0), world.pod(1, 0));
        let ws = server.serve(python().args(["-u", "-c", UPGRADE, "server", "8081"]))?;
        let (host, port) = WS_VIP.split_once(':').context("ip:port")?;
        let out = client.run_ok(python().args(["-u", "-c", UPGRADE, "client", host, port]))?;
        ensure!(
            out.trim() == "101 True True",
            "upgrade through the tunnel: {out}"
        );
        ensure!(
            ws.lines()
                .iter()
                .any(|l| l == "upgrade GET /chat HTTP/1.1 True"),
            "the endpoint did not get the Upgrade headers: {:?}",
            ws.lines()
        );
        let n1 = world.node(1);
        eventually(waymark_tests::DEFAULT_PATIENCE, || {
            let inbound = metric(
                n1,
                "response_total",
                &[("direction", "inbound"), ("status_code", "101")],
            )?;
            ensure!(inbound == 1.0, "the upgrade counted inbound: {inbound}");
            Ok(())
        })
    });
}

/// h2c server (prior knowledge): answers every request with `200`, no
/// content-length, a body `<name> <method> <path>` in two DATA frames and a
/// trailer `x-done: yes`.
const H2_APP: &str = r#"
import socket, sys, threading
import h2.config, h2.connection, h2.events
name, port = sys.argv[1], int(sys.argv[2])
def handle(c):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    c.sendall(conn.data_to_send())
    while True:
        data = c.recv(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                h = dict(ev.headers)
                body = ("%s %s %s\n" % (name, h[":method"], h[":path"])).encode()
                print("req", h[":method"], h[":path"], flush=True)
                conn.send_headers(ev.stream_id, [(":status", "200"), ("x-pod", name)])
                conn.send_data(ev.stream_id, body[:4])
                conn.send_data(ev.stream_id, body[4:])
                conn.send_headers(ev.stream_id, [("x-done", "yes")], end_stream=True)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                c.sendall(conn.data_to_send())
                return
        c.sendall(conn.data_to_send())
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", port))
l.listen(64)
print("listening", port, flush=True)
while True:
    c, _ = l.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// HTTP/2 end to end (the service says `http2`, the client speaks h2c): the
/// inbound agent detects the preface and serves h2; a TRACE answer of
/// unknown length gets both blocks, a GET both context headers, and the
/// endpoint's body arrives as sent.
#[test]
fn http2_through_the_tunnel_gets_both_hops() {
    require_agent_or_skip!();
    const H2_VIP: &str = "10.96.0.43:80";
    let h2web = Service::new("h2web", H2_VIP)
        .protocol("http2")
        .endpoint(Endpoint::meshed(1, 0, 8082));
    let b = meshed_pair(world_name!(), 1, &[h2web]);
    with_world(b, |world| {
        let (client, server) = (world.pod(0, 0), world.pod(1, 0));
        let _h2 = server.serve(python().args(["-u", "-c", H2_APP, server.name(), "8082"]))?;
        let h2 = ["--http2-prior-knowledge"];
        let (code, text) = curl_i(
            client,
            &format!("http://{H2_VIP}/t"),
            &[&h2[..], &["-X", "TRACE", "-H", "l5d-add-context: true"]].concat(),
        )?;
        ensure!(code == 200, "{code}\n{text}");
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        ensure!(
            body.starts_with(&format!("{} TRACE /t\n", server.name())),
            "the endpoint's body first: {text}"
        );
        let (i, o) = (
            body.find("--- waymark node1 inbound ---"),
            body.find("--- waymark node0 outbound ---"),
        );
        ensure!(i.is_some() && i < o, "both blocks, inbound first: {text}");

        let (code, text) = curl_i(
            client,
            &format!("http://{H2_VIP}/get"),
            &[&h2[..], &["-H", "l5d-add-context: true", "--raw", "-v"]].concat(),
        )?;
        ensure!(code == 200, "{code}\n{text}");
        let lower = text.to_lowercase();
        let contexts: Vec<&str> = lower
            .lines()
            .filter_map(|l| l.strip_prefix("l5d-context: "))
            .collect();
        ensure!(
            contexts.len() == 2
                && contexts[0].starts_with("node=node1; direction=inbound;")
                && contexts[1].starts_with("node=node0; direction=outbound;"),
            "one context header per hop, inbound first: {text}"
        );
        ensure!(
            text.contains(&format!("{} GET /get\n", server.name())),
            "{text}"
        );
        Ok(())
    });
}

/// A server-speaks-first protocol on a port that is not in `opaque_ports`:
/// the outbound agent gives up detection after `detect_timeout`, the
/// inbound agent at once when the pod's greeting arrives; the client gets
/// the banner, then its own bytes back, exactly.
#[test]
fn server_speaks_first_through_the_tunnel() {
    require_agent_or_skip!();
    const BANNER_VIP: &str = "10.96.0.44:2626";
    const BANNER: &str = r#"
import socket, sys, threading
def one(c):
    c.sendall(b"220 banner ready\r\n")
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(16)
print("listening", sys.argv[1], flush=True)
while True:
    c, _ = l.accept()
    threading.Thread(target=one, args=(c,), daemon=True).start()
"#;
    const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
got = b""
while b"\r\n" not in got:
    d = s.recv(100)
    if not d:
        break
    got += d
s.sendall(b"hello after the banner\n")
s.shutdown(socket.SHUT_WR)
while True:
    d = s.recv(65536)
    if not d:
        break
    got += d
print(repr(got))
"#;
    let banner = Service::new("banner", BANNER_VIP).endpoint(Endpoint::meshed(1, 0, 2626));
    let b = meshed_pair(world_name!(), 1, &[banner])
        .agent_config_extra("[proxy]\ndetect_timeout = \"500ms\"\n");
    with_world(b, |world| {
        let (client, server) = (world.pod(0, 0), world.pod(1, 0));
        let _banner = server.serve(python().args(["-u", "-c", BANNER, "2626"]))?;
        let (host, port) = BANNER_VIP.split_once(':').context("ip:port")?;
        let out = client.run_ok(python().args(["-u", "-c", CLIENT, host, port]))?;
        ensure!(
            out.trim() == r"b'220 banner ready\r\nhello after the banner\n'",
            "banner then echo through both agents: {out}"
        );
        Ok(())
    });
}
