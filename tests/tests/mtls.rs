//! End-to-end tests of node-to-node mTLS: pods speak plaintext, agents
//! carry what crosses nodes in the HTTP/2 CONNECT tunnel over TLS 1.3 with
//! the source workload's certificate, the destination's agent verifies and
//! authorizes it. Real agents (`WorldBuilder::mtls`), real peers (testpeer,
//! Python clients, curl), real captures (tcpdump in the fabric, tshark to read).
//!
//! Services are declared in the agents' config; their endpoints name the
//! node they run on, which is what decides the tunnel.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{
    Endpoint, Service, merge_toml, meshed_pair, services_toml, without_identity,
};
use waymark_tests::support::capture::{Capture, contains};
use waymark_tests::world::agent::pod_identity;
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, Server, World, await_metric, curl, curl_i, eventually, http_app,
    metric, pod_ip, python, require_agent_or_skip, testpeer, with_world, world_name,
};

/// A TCP client that sends argv[3], half-closes and prints what came back.
const SEND: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode())
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    got += d
print(got.decode(errors="replace"))
"#;

const ECHO_VIP: &str = "10.96.0.1:7000";
const WEB_VIP: &str = "10.96.0.2:80";
const APP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;

/// `echo` (opaque) and `web` (HTTP/1.1), both served by pod 0 of node 1.
fn services() -> [Service; 2] {
    [
        Service::new("echo", ECHO_VIP)
            .protocol("opaque")
            .endpoint(Endpoint::meshed(1, 0, ECHO_PORT)),
        Service::new("web", WEB_VIP)
            .protocol("http1")
            .endpoint(Endpoint::meshed(1, 0, APP_PORT)),
    ]
}

/// The test application, named after the pod (`x-pod`).
fn app(pod: &Pod) -> Result<Server> {
    http_app(pod, APP_PORT, pod.name(), &[])
}

fn echo(pod: &Pod) -> Result<Server> {
    pod.serve(&mut testpeer([
        "echo",
        "--listen",
        &format!("0.0.0.0:{ECHO_PORT}"),
    ]))
}

/// Sends `text` to `addr` (opaque) from `pod`; returns what came back.
fn send(pod: &Pod, addr: &str, text: &str) -> Result<String> {
    let (host, port) = addr.rsplit_once(':').context("ip:port")?;
    Ok(pod
        .run_ok(python().args(["-c", SEND, host, port, text]))?
        .trim()
        .to_string())
}

fn marker(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("wm-{what}-{:x}", nanos ^ (std::process::id() as u128) << 64)
}

/// tshark's reading of a capture file, with port 15008 decoded as TLS.
fn tshark(file: &Path, filter: &str, fields: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"]).arg(file).args([
        "-d",
        "tcp.port==15008,tls",
        "-Y",
        filter,
        "-T",
        "fields",
    ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().context("running tshark")?;
    ensure!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

fn log_tail(node: &Node) -> String {
    let log = node.agent_log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The fabric carries only TLS between the agents for pods with an
/// identity: neither the request nor the response marker is in the capture,
/// while the server pod sees plain HTTP and a pod without an identity (the
/// positive control) is carried in plaintext, marker visible.
#[test]
fn only_tls_crosses_the_fabric() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 2, &services())
        // Pod 1 of node 0 has no identity: its traffic stays plaintext.
        .agent_config(|i, cfg| {
            if i == 0 {
                without_identity(cfg, 1);
            }
        });
    with_world(builder, |world| {
        let (client, plain_client, server) = (world.pod(0, 0), world.pod(0, 1), world.pod(1, 0));
        let _app = app(server)?;
        let _echo = echo(server)?;
        // Node 0's link into the fabric (frames forwarded between bridge
        // ports never show on br0 itself).
        let fabric = Capture::start(world.dir().join("fabric.pcap"), "n0", |c| {
            world.spawn_in_fabric(c)
        })?;
        let in_pod = Capture::start(world.dir().join("server-pod.pcap"), "eth0", |c| {
            server.spawn(c)
        })?;

        let (tls_http, tls_opaque) = (marker("tls-http"), marker("tls-opaque"));
        let (plain_http, plain_opaque) = (marker("plain-http"), marker("plain-opaque"));
        let (code, body) = curl(client, &format!("http://{WEB_VIP}/{tls_http}"), &[])?;
        ensure!(code == 200 && body.contains(&tls_http), "{code} {body}");
        ensure!(send(client, ECHO_VIP, &tls_opaque)? == tls_opaque, "echo");
        let (code, body) = curl(plain_client, &format!("http://{WEB_VIP}/{plain_http}"), &[])?;
        ensure!(code == 200 && body.contains(&plain_http), "{code} {body}");
        ensure!(
            send(plain_client, ECHO_VIP, &plain_opaque)? == plain_opaque,
            "echo"
        );

        let fabric_file = world.dir().join("fabric.pcap");
        let bytes = fabric.finish()?;
        let pod_bytes = in_pod.finish()?;
        for m in [&tls_http, &tls_opaque] {
            ensure!(!contains(&bytes, m), "{m} crossed the fabric in plaintext");
            ensure!(
                contains(&pod_bytes, m),
                "the server pod did not see {m} in plaintext"
            );
        }
        for m in [&plain_http, &plain_opaque] {
            ensure!(
                contains(&bytes, m),
                "the positive control {m} is not in the fabric capture: the capture sees nothing?"
            );
        }
        // What crossed between the agents was TLS 1.3 application data, on
        // the tunnel port only.
        let tls = tshark(
            &fabric_file,
            "tcp.port==15008 && tls.record.opaque_type==23",
            &["ip.src", "ip.dst"],
        )?;
        ensure!(!tls.is_empty(), "no TLS application data on port 15008");
        let hello = tshark(
            &fabric_file,
            "tls.handshake.type==1",
            &["tls.handshake.extensions.supported_version"],
        )?;
        ensure!(
            hello.iter().all(|v| v.contains("0x0304")),
            "client hellos without TLS 1.3: {hello:?}"
        );
        let client_ip = pod_ip(0, 0);
        // The agent dials the tunnel of the client pod's traffic in the
        // pod's own namespace: the TLS leaves from the pod's address.
        ensure!(
            tls.iter()
                .any(|l| l.split_whitespace().next() == Some(client_ip.as_str())),
            "no tunnel connection from the client pod's address {client_ip}: {tls:?}"
        );
        let leaked = tshark(
            &fabric_file,
            // The tunnel itself leaves from the client pod's address (the
            // agent dials it in the pod's namespace); nothing else may.
            &format!("ip.addr=={client_ip} && tcp.len>0 && !(tcp.port==15008)"),
            &["frame.number"],
        )?;
        ensure!(
            leaked.is_empty(),
            "{} packets with payload from {client_ip} crossed the fabric outside the tunnel",
            leaked.len()
        );

        let n0 = world.node(0);
        let m = n0.metrics()?;
        let opaque_tls = metric(
            n0,
            "tcp_open_total",
            &[("target_addr", ECHO_VIP), ("tls", "true")],
        )?;
        ensure!(
            opaque_tls == 1.0,
            "tcp_open_total{{tls=true}} = {opaque_tls}\n{m}"
        );
        let opaque_plain = metric(
            n0,
            "tcp_open_total",
            &[
                ("target_addr", ECHO_VIP),
                ("tls", "no_identity"),
                ("no_tls_reason", "no_source_identity"),
            ],
        )?;
        ensure!(
            opaque_plain == 1.0,
            "plaintext opaque = {opaque_plain}\n{m}"
        );
        let http_tls = metric(n0, "response_total", &[("service", "web"), ("tls", "true")])?;
        ensure!(
            http_tls == 1.0,
            "response_total{{tls=true}} = {http_tls}\n{m}"
        );
        let n1 = world.node(1);
        let allowed = metric(
            n1,
            "waymark_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "opened")],
        )?;
        ensure!(
            allowed >= 2.0,
            "inbound streams {allowed}\n{}",
            log_tail(n1)
        );

        // The receiving agent's side in Linkerd's TCP series: the echo's
        // one stream with exactly its bytes each way, closed cleanly; the
        // HTTP request's stream too.
        let echo_target = format!("{}:{ECHO_PORT}", pod_ip(1, 0));
        let inbound = |name: &str, target: &str| {
            metric(
                n1,
                name,
                &[("direction", "inbound"), ("target_addr", target)],
            )
        };
        await_metric(
            n1,
            "tcp_close_total",
            &[
                ("direction", "inbound"),
                ("target_addr", &echo_target),
                ("classification", "success"),
            ],
            1.0,
        )?;
        let sent = tls_opaque.len() as f64;
        let m = n1.metrics()?;
        for (name, want) in [
            ("tcp_open_total", 1.0),
            ("tcp_open_connections", 0.0),
            ("tcp_read_bytes_total", sent),
            ("tcp_write_bytes_total", sent),
        ] {
            let got = inbound(name, &echo_target)?;
            ensure!(
                got == want,
                "{name} inbound to {echo_target}: {got}, expected {want}\n{m}"
            );
        }
        let web_target = format!("{}:{APP_PORT}", pod_ip(1, 0));
        let (opened, read) = (
            inbound("tcp_open_total", &web_target)?,
            inbound("tcp_read_bytes_total", &web_target)?,
        );
        ensure!(
            opened >= 1.0 && read > tls_http.len() as f64,
            "inbound TCP series of the HTTP request: opened {opened}, read {read}\n{m}"
        );
        Ok(())
    });
}

/// Mints a leaf signed by the world's issuer with any validity and SPIFFE
/// ID (the agent never would), then handshakes with it against a tunnel
/// listener and prints `ok <bytes>` or `error <ssl error>`.
const FORGE: &str = r#"
import datetime, socket, ssl, sys, tempfile, os
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
issuer_crt, issuer_key, spiffe, mode, host, port = sys.argv[1:7]
icert = x509.load_pem_x509_certificate(open(issuer_crt, "rb").read())
ikey = serialization.load_pem_private_key(open(issuer_key, "rb").read(), None)
now = datetime.datetime.utcnow()
if mode == "expired":
    nb, na = now - datetime.timedelta(hours=2), now - datetime.timedelta(hours=1)
else:
    nb, na = now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1)
key = ec.generate_private_key(ec.SECP256R1())
cert = (x509.CertificateBuilder()
    .subject_name(x509.Name([]))
    .issuer_name(icert.subject)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(nb).not_valid_after(na)
    .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()), critical=False)
    .sign(ikey, hashes.SHA256()))
d = tempfile.mkdtemp()
chain, keyf = os.path.join(d, "chain.pem"), os.path.join(d, "key.pem")
with open(chain, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM) + icert.public_bytes(serialization.Encoding.PEM))
with open(keyf, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["h2"])
ctx.load_cert_chain(chain, keyf)
try:
    s = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5))
    # TLS 1.3: the client is done first; the server's verdict on our
    # certificate comes as an alert on the first read.
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    print("ok", len(s.recv(100)))
except (ssl.SSLError, OSError) as e:
    print("error", e)
"#;

/// Runs [`FORGE`] on `node` against `target` with a leaf for `spiffe`.
fn forge(world: &World, node: &Node, spiffe: &str, mode: &str, target: &str) -> Result<String> {
    let ca = world.dir().join("identity");
    let (host, port) = target.rsplit_once(':').context("ip:port")?;
    Ok(node
        .run_ok(
            python()
                .args(["-c", FORGE])
                .arg(ca.join("issuer.crt"))
                .arg(ca.join("issuer.key"))
                .args([spiffe, mode, host, port]),
        )?
        .trim()
        .to_string())
}

/// Certificates the receiving agent must refuse, each with its reason in
/// the error, the log and `waymark_tunnel_handshake_failures_total`:
/// another trust anchor (unknown_ca, seen from both ends), an expired leaf
/// (expired), a leaf outside the trust domain (wrong_identity), and a peer
/// agent that is not the node identity the client expects
/// (wrong_identity, client side).
#[test]
fn bad_certificates_are_rejected_with_their_reason() {
    require_agent_or_skip!();
    let builder = World::builder(world_name!())
        .nodes(3)
        .pods_per_node(1)
        .mtls(true)
        // Node 2 issues from a trust anchor of its own but trusts the
        // world's too: its certificates are the ones refused.
        .mtls_foreign_anchor(2)
        .agent_config_extra(services_toml(&[
            Service::new("web0", "10.96.0.10:80")
                .protocol("http1")
                .endpoint(Endpoint::meshed(0, 0, APP_PORT)),
            Service::new("web1", "10.96.0.11:80")
                .protocol("http1")
                .endpoint(Endpoint::meshed(1, 0, APP_PORT)),
            Service::new("echo0", "10.96.0.12:7000")
                .protocol("opaque")
                .endpoint(Endpoint::meshed(0, 0, ECHO_PORT)),
        ]))
        .agent_config(|i, cfg| {
            let id = cfg["identity"].as_table_mut().unwrap();
            if i == 2 {
                let own = PathBuf::from(id["trust_bundle"].as_str().unwrap());
                let world_ca = own
                    .parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join("identity/ca.crt");
                let both = own.with_file_name("both.crt");
                let text = std::fs::read_to_string(&own).unwrap()
                    + &std::fs::read_to_string(world_ca).unwrap();
                std::fs::write(&both, text).unwrap();
                id.insert("trust_bundle".into(), both.display().to_string().into());
            }
            // Node 0 expects node 1's agent to be someone else.
            if i == 0 {
                for n in cfg["nodes"].as_array_mut().unwrap() {
                    let n = n.as_table_mut().unwrap();
                    if n["name"].as_str() == Some("node1") {
                        n.insert(
                            "identity".into(),
                            "spiffe://cluster.local/ns/waymark-system/sa/impostor".into(),
                        );
                    }
                }
            }
        });
    with_world(builder, |world| {
        let (n0, n1, n2) = (world.node(0), world.node(1), world.node(2));
        let _app0 = app(world.pod(0, 0))?;
        let _echo0 = echo(world.pod(0, 0))?;
        let _app1 = app(world.pod(1, 0))?;
        let failures = |node: &Node, dir: &str, reason: &str| {
            metric(
                node,
                "waymark_tunnel_handshake_failures_total",
                &[("direction", dir), ("reason", reason)],
            )
        };

        // Another trust anchor: node 2's pod reaches node 0.
        let (code, body) = curl(world.pod(2, 0), "http://10.96.0.10/", &[])?;
        ensure!(code == 503, "{code} {body}");
        ensure!(
            body.contains("waymark node2") && body.contains("unknown_ca"),
            "the error does not say why: {body}"
        );
        // Opaque: the connection is closed on the client, nothing echoed.
        let out =
            world
                .pod(2, 0)
                .run(python().args(["-c", SEND, "10.96.0.12", "7000", "hello"]))?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !said.contains("hello"),
            "echoed through a refused tunnel: {said}"
        );
        eventually(Duration::from_secs(10), || {
            let (inb, out) = (
                failures(n0, "inbound", "unknown_ca")?,
                failures(n2, "outbound", "unknown_ca")?,
            );
            ensure!(
                inb >= 2.0 && out >= 2.0,
                "node0 inbound {inb}, node2 outbound {out}"
            );
            Ok(())
        })?;
        ensure!(
            n0.agent_log()
                .contains("tunnel TLS handshake failed reason=\"unknown_ca\""),
            "node0 does not log the reason:\n{}",
            log_tail(n0)
        );

        // The wrong peer identity: node 0 refuses node 1's agent.
        let (code, body) = curl(world.pod(0, 0), "http://10.96.0.11/", &[])?;
        ensure!(
            code == 503 && body.contains("wrong_identity"),
            "{code} {body}"
        );
        eventually(Duration::from_secs(10), || {
            let (out, inb) = (
                failures(n0, "outbound", "wrong_identity")?,
                failures(n1, "inbound", "wrong_identity")?,
            );
            ensure!(
                out >= 1.0 && inb >= 1.0,
                "node0 outbound {out}, node1 inbound {inb}"
            );
            Ok(())
        })?;
        ensure!(
            n0.agent_log().contains("peer SPIFFE ID rejected")
                && n0.agent_log().contains("sa/impostor"),
            "node0 does not log the identities:\n{}",
            log_tail(n0)
        );

        // An expired leaf, and one outside the trust domain, signed by the
        // world's own issuer, straight at node 1's listener.
        let tunnel1 = format!("{}:15008", n1.fabric_ip());
        let said = forge(
            world,
            n0,
            &pod_identity("default/n0p0"),
            "expired",
            &tunnel1,
        )?;
        ensure!(
            said.contains("error") && said.contains("expired"),
            "expired leaf: {said}"
        );
        let said = forge(
            world,
            n0,
            "spiffe://evil.org/ns/default/sa/x",
            "valid",
            &tunnel1,
        )?;
        ensure!(said.starts_with("error"), "foreign trust domain: {said}");
        // The same forge with a good leaf gets through: the rejections
        // above are about the certificates, not the forge.
        let said = forge(world, n0, &pod_identity("default/n0p0"), "valid", &tunnel1)?;
        ensure!(said.starts_with("ok"), "a valid forged leaf: {said}");
        eventually(Duration::from_secs(10), || {
            let (exp, wrong) = (
                failures(n1, "inbound", "expired")?,
                failures(n1, "inbound", "wrong_identity")?,
            );
            ensure!(
                exp >= 1.0 && wrong >= 2.0,
                "node1 inbound expired {exp}, wrong_identity {wrong}"
            );
            Ok(())
        })?;
        // Everyone still serves what is valid.
        let (code, body) = curl(world.pod(2, 0), "http://10.96.0.11/", &[])?;
        ensure!(code == 503, "node 2 reached node 1: {code} {body}");
        let (code, _) = curl(world.pod(1, 0), "http://10.96.0.10/ok", &[])?;
        ensure!(code == 200, "node 1 → node 0 after the failures: {code}");
        Ok(())
    });
}

/// Node 1's policy denies pod n0p1 and allows n0p0, for the same
/// destination: the denied client gets a 403 naming waymark and the
/// reason (opaque: the connection closes), the source node's tap names
/// both `source=proxy reason=authz`, the destination's agent logs both
/// identities and counts the decision; the allowed one gets through, and a
/// diagnostic trace shows the peer agent's identity.
#[test]
fn authorization_denies_one_source_and_allows_another() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 2, &services()).agent_config(|i, cfg| {
        if i == 1 {
            let extra = format!(
                r#"
[authorization]
default = "deny"
[[authorization.rules]]
name = "no-n0p1"
action = "deny"
sources = ["{}"]
[[authorization.rules]]
name = "default-ns"
action = "allow"
sources = ["spiffe://cluster.local/ns/default/sa/*"]
services = ["web", "echo"]
"#,
                pod_identity("default/n0p1")
            );
            merge_toml(cfg, &extra);
        }
    });
    with_world(builder, |world| {
        let (allowed, denied, server) = (world.pod(0, 0), world.pod(0, 1), world.pod(1, 0));
        let (n0, n1) = (world.node(0), world.node(1));
        let _app = app(server)?;
        let _echo = echo(server)?;

        let (code, body) = curl(allowed, &format!("http://{WEB_VIP}/hello"), &[])?;
        ensure!(
            code == 200 && body.contains("default/n1p0 /hello"),
            "{code} {body}"
        );
        ensure!(send(allowed, ECHO_VIP, "ping")? == "ping", "allowed echo");

        // Node 0's tap says both denials are the proxy's, for authz: the
        // HTTP request's 403 and the opaque connection the tunnel refused.
        let mut answer = None;
        let mut opaque = None;
        let tapped = waymark_tests::tap(
            n0,
            &["--from", denied.name(), "--max", "2", "-o", "json"],
            || {
                answer = Some(curl_i(denied, &format!("http://{WEB_VIP}/hello"), &[])?);
                opaque =
                    Some(denied.run(python().args(["-c", SEND, "10.96.0.1", "7000", "ping"]))?);
                Ok(())
            },
        )?;
        let events = waymark_tests::tap_events(&tapped)?;
        ensure!(
            events.iter().any(|e| e["type"] == "rsp"
                && e["status"] == 403
                && e["source"] == "proxy"
                && e["reason"] == "authz"),
            "{tapped}"
        );
        ensure!(
            events.iter().any(|e| e["type"] == "tcp"
                && e["close"] == "tunnel_denied"
                && e["source"] == "proxy"
                && e["reason"] == "authz"),
            "{tapped}"
        );
        let (code, text) = answer.context("no answer")?;
        ensure!(code == 403, "denied source got {code}: {text}");
        for needle in [
            "l5d-proxy-error: forbidden by the destination's authorization policy",
            "waymark node0: service web: forbidden",
            "waymark node1:",
            "sa/n0p1 may not reach spiffe://cluster.local/ns/default/sa/n1p0",
            "denied by rule no-n0p1",
        ] {
            ensure!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let out = opaque.context("no opaque attempt")?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !said.contains("ping"),
            "a denied opaque connection echoed: {said}"
        );

        let deny =
            |labels: &[(&str, &str)]| metric(n1, "waymark_inbound_authz_decisions_total", labels);
        let denied_id = pod_identity("default/n0p1");
        let d = deny(&[
            ("decision", "deny"),
            ("source_identity", &denied_id),
            ("rule", "no-n0p1"),
        ])?;
        ensure!(d == 2.0, "denials counted: {d}\n{}", n1.metrics()?);
        let a = deny(&[
            ("decision", "allow"),
            ("source_identity", &pod_identity("default/n0p0")),
        ])?;
        ensure!(a == 2.0, "allows counted: {a}");
        let log = n1.agent_log();
        ensure!(
            log.lines().any(|l| l.contains("authorization denied")
                && l.contains(&denied_id)
                && l.contains("sa/n1p0")),
            "node1 does not log the denial with both identities:\n{}",
            log_tail(n1)
        );
        let closed = metric(
            n0,
            "tcp_close_total",
            &[("reason", "tunnel_denied"), ("target_addr", ECHO_VIP)],
        )?;
        ensure!(
            closed == 1.0,
            "tcp_close_total{{reason=tunnel_denied}} = {closed}"
        );
        let forbidden = metric(
            n0,
            "response_total",
            &[("service", "web"), ("status_code", "403"), ("tls", "true")],
        )?;
        ensure!(forbidden == 1.0, "response_total 403 = {forbidden}");

        // The allowed request's trace names the peer agent.
        let (code, body) = curl(
            allowed,
            &format!("http://{WEB_VIP}/trace"),
            &["-X", "TRACE", "-H", "l5d-add-context: true"],
        )?;
        ensure!(code == 200, "{code} {body}");
        ensure!(
            body.contains("peer identity: spiffe://cluster.local/ns/waymark-system/sa/node1"),
            "{body}"
        );
        Ok(())
    });
}

/// Strict inbound: a meshed pod takes new connections from other nodes only
/// through the tunnel. From node 0, the pod with an identity reaches node
/// 1's pod through the tunnel; the pod without one (its traffic goes in
/// plaintext) is refused by node 1's kernel, which counts it for the pod
/// (`waymark_inbound_strict_refused_total`, and the drop with its reason in
/// `waymark drops`); node 1's other pod, on the same node, still reaches it.
#[test]
fn strict_inbound_admits_other_nodes_only_through_the_tunnel() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 2, &services()).agent_config(|i, cfg| {
        if i == 0 {
            without_identity(cfg, 1);
        }
        if i == 1 {
            merge_toml(cfg, "[inbound]\nmode = \"strict\"\n");
        }
    });
    with_world(builder, |world| {
        let (meshed, plain) = (world.pod(0, 0), world.pod(0, 1));
        let (server, neighbour, n1) = (world.pod(1, 0), world.pod(1, 1), world.node(1));
        let _echo = echo(server)?;
        ensure!(
            send(meshed, ECHO_VIP, "through-the-tunnel")? == "through-the-tunnel",
            "the meshed pod through the tunnel"
        );
        let out = plain.run(python().args(["-c", SEND, "10.96.0.1", "7000", "plaintext"]))?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !said.contains("plaintext"),
            "plaintext from another node reached a strict pod: {said}"
        );
        let direct = format!("{}:{ECHO_PORT}", server.ip());
        ensure!(
            send(neighbour, &direct, "same-node")? == "same-node",
            "a pod on the same node"
        );
        // Dialled by its own address (an endpoint with a node, not a
        // service address), the server is reached through the tunnel too:
        // strict inbound would refuse the connection in plaintext.
        let streams = |n: &Node| {
            metric(
                n,
                "waymark_tunnel_streams_total",
                &[("direction", "inbound"), ("result", "opened")],
            )
        };
        let before = streams(n1)?;
        ensure!(
            send(meshed, &direct, "by-address")? == "by-address",
            "the meshed pod dialling the endpoint's address"
        );
        ensure!(
            streams(n1)? == before + 1.0,
            "the connection to the pod's address did not cross the tunnel"
        );
        let pod = server.name();
        // At least the SYN; its retransmits before node 0's agent gives up
        // count too.
        eventually(DEFAULT_PATIENCE, || {
            let v = metric(n1, "waymark_inbound_strict_refused_total", &[("pod", pod)])?;
            ensure!(v >= 1.0, "refusals counted for {pod}: {v}");
            Ok(())
        })?;
        let log = n1.agent_log();
        ensure!(log.contains("strict inbound"), "{}", log_tail(n1));
        // The kernel's own account of the refusal: a drop in that pod.
        let drops = n1.run_ok(
            Command::new(waymark_tests::world::agent::waymark_bin()?)
                .args(["drops", "-o", "json", "--window", "10m"]),
        )?;
        let report: Value = serde_json::from_str(&drops)?;
        let entry = report["pods"]
            .as_array()
            .and_then(|p| p.iter().find(|e| e["pod"] == pod))
            .with_context(|| format!("no drops for {pod}: {report}"))?;
        ensure!(
            entry.to_string().contains("SOCKET_FILTER"),
            "the refusal is not in waymark drops as a socket filter drop: {entry}"
        );
        Ok(())
    });
}

/// A client that keeps one HTTP/1.1 connection and one opaque connection
/// open across a reload of the destination's rules: it prints what each
/// gets before and after the flag file appears.
const HELD: &str = r#"
import http.client, os, socket, sys, time
web, echo, flag = sys.argv[1], sys.argv[2], sys.argv[3]
c = http.client.HTTPConnection(web.split(":")[0], int(web.split(":")[1]), timeout=10)
c.request("GET", "/one"); r = c.getresponse(); r.read()
print("first", r.status, flush=True)
e = socket.create_connection((echo.split(":")[0], int(echo.split(":")[1])), timeout=10)
e.sendall(b"ping"); print("echo1", e.recv(100).decode(), flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
c.request("GET", "/two"); r = c.getresponse(); body = r.read()
print("second", r.status, r.getheader("l5d-proxy-error"), flush=True)
print("body", body.decode(errors="replace").splitlines()[0] if body else "", flush=True)
try:
    e.sendall(b"pong"); d = e.recv(100)
    print("echo2", d.decode() if d else "closed", flush=True)
except Exception as ex:
    print("echo2 closed", type(ex).__name__, flush=True)
"#;

/// A reload that adds a deny rule reaches what is already open: the next
/// request on a kept-alive connection (whose tunnel stream the agents keep
/// pooled) is denied with the proxy's 403, and the opaque stream the new
/// rule denies is closed.
#[test]
fn a_reloaded_deny_rule_applies_to_open_streams() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 1, &services());
    with_world(builder, |world| {
        let (client, server, n1) = (world.pod(0, 0), world.pod(1, 0), world.node(1));
        let _app = app(server)?;
        let _echo = echo(server)?;
        let flag = world.dir().join("reloaded");
        let mut held = client.spawn(
            python()
                .args(["-u", "-c", HELD, WEB_VIP, ECHO_VIP])
                .arg(&flag)
                .stdout(std::process::Stdio::piped()),
        )?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
            held.stdout.take().context("no stdout")?,
        ));
        let mut next =
            || -> Result<String> { Ok(lines.next().context("the client ended early")??) };
        ensure!(next()? == "first 200", "before the reload");
        ensure!(next()? == "echo1 ping", "before the reload");

        n1.update_config(|c| {
            let extra = format!(
                "[authorization]\ndefault = \"allow\"\n[[authorization.rules]]\nname = \"no-n0p0\"\naction = \"deny\"\nsources = [\"{}\"]\n",
                pod_identity("default/n0p0")
            );
            merge_toml(c, &extra);
        })?;
        eventually(Duration::from_secs(10), || {
            let log = n1.agent_log();
            ensure!(log.contains("config reloaded"), "{}", log_tail(n1));
            Ok(())
        })?;
        std::fs::write(&flag, "")?;
        let second = next()?;
        ensure!(
            second == "second 403 forbidden by the destination's authorization policy",
            "the kept-alive connection after the deny rule: {second}"
        );
        // Denied by node 1 on the pooled stream itself (a new stream would
        // have been refused at CONNECT, answered by node 0's agent).
        let body = next()?;
        ensure!(
            body.starts_with("body waymark node1: service web: forbidden"),
            "not the receiving agent's per-request denial: {body}"
        );
        let echo2 = next()?;
        ensure!(
            echo2.starts_with("echo2 closed"),
            "the opaque stream outlived the rule that denies it: {echo2}"
        );
        let _ = held.wait();
        let log = n1.agent_log();
        ensure!(
            log.contains("authorization denied an open stream after a reload"),
            "{}",
            log_tail(n1)
        );
        Ok(())
    });
}

/// Leaves that live 8 s are renewed about every 4 s while a steady load
/// runs: keep-alive HTTP (whose pooled tunnel streams outlive the leaf
/// they were opened with) and a stream of short opaque connections (each a
/// new tunnel stream, on a new tunnel connection after each renewal). Not
/// one request or connection fails, and none is re-established.
#[test]
fn rotation_under_load_loses_nothing() {
    require_agent_or_skip!();
    let builder =
        meshed_pair(world_name!(), 2, &services()).mtls_leaf_lifetime(Duration::from_secs(8));
    with_world(builder, |world| {
        let (http_client, tcp_client, server) = (world.pod(0, 0), world.pod(0, 1), world.pod(1, 0));
        let (n0, n1) = (world.node(0), world.node(1));
        let _app = app(server)?;
        let _echo = echo(server)?;
        let rotations = |n: &Node| {
            metric(
                n,
                "waymark_identity_cert_rotations_total",
                &[("result", "success")],
            )
        };
        let before = (
            rotations(n0)?,
            metric(
                n0,
                "waymark_tunnel_connections_total",
                &[("direction", "outbound")],
            )?,
        );

        let load = http_client.spawn(
            testpeer([
                "http-rate",
                "--connect",
                WEB_VIP,
                "--rate",
                "200",
                "--conns",
                "4",
                "--duration",
                "20s",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        )?;
        let started = Instant::now();
        let mut rounds = 0;
        while started.elapsed() < Duration::from_secs(19) {
            let out = tcp_client.run_ok(&mut testpeer([
                "many",
                "--connect",
                ECHO_VIP,
                "--count",
                "100",
                "--concurrency",
                "8",
                "--bytes",
                "512",
            ]))?;
            let r: Value = serde_json::from_str(out.trim())?;
            ensure!(r["failed"] == 0 && r["ok"] == 100, "round {rounds}: {r}");
            rounds += 1;
        }
        let out = load.wait_with_output()?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("http-rate said: {}", String::from_utf8_lossy(&out.stderr)))?;
        ensure!(
            report["errors"] == 0 && report["non_2xx"] == 0 && report["reconnects"] == 0,
            "HTTP load during rotation: {report}"
        );
        let requests = report["requests"].as_u64().unwrap_or(0);
        ensure!(
            requests >= 3000,
            "too little load to prove anything: {report}"
        );

        let after = (
            rotations(n0)?,
            metric(
                n0,
                "waymark_tunnel_connections_total",
                &[("direction", "outbound")],
            )?,
        );
        // Three identities on node 0 (the node's, n0p0's, n0p1's), renewed
        // about every 4 s for 20 s.
        ensure!(
            after.0 - before.0 >= 9.0,
            "only {} renewals on node0",
            after.0 - before.0
        );
        ensure!(
            after.1 - before.1 >= 3.0,
            "only {} new tunnel connections after renewals",
            after.1 - before.1
        );
        let failures = metric(n1, "waymark_tunnel_handshake_failures_total", &[])?;
        ensure!(
            failures == 0.0,
            "{failures} handshake failures on node1:\n{}",
            log_tail(n1)
        );
        let expiry = metric(
            n0,
            "waymark_identity_cert_expiry_seconds",
            &[("identity", &pod_identity("default/n0p0"))],
        )?;
        ensure!(expiry > 0.0 && expiry <= 8.0, "expiry gauge {expiry}");
        let (status, body) = n0.admin_get("/ready")?;
        ensure!(status == 200, "/ready {status} {body}");
        eprintln!(
            "rotation under load: {requests} HTTP requests and {} opaque connections, {} renewals, {} tunnel connections on node0",
            rounds * 100,
            after.0 - before.0,
            after.1 - before.1
        );
        Ok(())
    });
}

/// 500 connections open at once from one pod to a service on another node
/// ride one or two tunnel connections, and echo correctly.
#[test]
fn many_streams_share_few_tunnel_connections() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 1, &services());
    with_world(builder, |world| {
        let (client, server) = (world.pod(0, 0), world.pod(1, 0));
        let (n0, n1) = (world.node(0), world.node(1));
        let _echo = echo(server)?;
        // Killed with the world.
        let _hold = client.spawn(
            testpeer([
                "hold",
                "--connect",
                ECHO_VIP,
                "--count",
                "500",
                "--hold",
                "60s",
            ])
            .stdout(Stdio::null()),
        )?;
        eventually(Duration::from_secs(30), || {
            let open = metric(
                n0,
                "tcp_open_connections",
                &[("target_addr", ECHO_VIP), ("tls", "true")],
            )?;
            ensure!(open == 500.0, "{open} tunnelled connections open");
            Ok(())
        })?;
        let out = client.run_ok(&mut testpeer([
            "many",
            "--connect",
            ECHO_VIP,
            "--count",
            "2000",
            "--concurrency",
            "500",
            "--bytes",
            "4096",
        ]))?;
        let r: Value = serde_json::from_str(out.trim())?;
        ensure!(r["ok"] == 2000, "{r}");
        let out_conns = metric(
            n0,
            "waymark_tunnel_connections_total",
            &[("direction", "outbound")],
        )?;
        let in_conns = metric(
            n1,
            "waymark_tunnel_connections_total",
            &[("direction", "inbound")],
        )?;
        let streams = metric(
            n1,
            "waymark_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "opened")],
        )?;
        ensure!(streams >= 2500.0, "{streams} streams");
        ensure!(
            (1.0..=2.0).contains(&out_conns) && (1.0..=2.0).contains(&in_conns),
            "{streams} streams took {out_conns} outbound / {in_conns} inbound tunnel connections"
        );
        eprintln!("{streams} streams (500 at once) over {out_conns} tunnel connection(s)");
        Ok(())
    });
}

/// Garbage, plaintext HTTP and a client that stalls mid-handshake on the
/// tunnel port: each connection ends cleanly with its reason counted, and
/// the agent keeps serving.
#[test]
fn hostile_input_on_the_tunnel_port_is_contained() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 1, &services()).agent_config(|i, cfg| {
        if i == 1 {
            cfg["inbound"]
                .as_table_mut()
                .unwrap()
                .insert("handshake_timeout".into(), "1s".into());
        }
    });
    with_world(builder, |world| {
        use std::io::{Read, Write};
        let (n0, n1) = (world.node(0), world.node(1));
        let _app = app(world.pod(1, 0))?;
        let tunnel: std::net::SocketAddr = format!("{}:15008", n1.fabric_ip()).parse()?;
        let read_to_close = |mut s: std::net::TcpStream| -> Result<Duration> {
            let start = Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(start.elapsed()),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return Ok(start.elapsed());
                    }
                    Err(e) => bail!("the agent did not close the connection: {e}"),
                }
            }
        };
        for junk in [
            &b"\x00\x01garbage\xff\xfe not TLS at all\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01][..],
        ] {
            let mut s = n0.tcp_connect(tunnel, Duration::from_secs(2))?;
            s.write_all(junk)?;
            if junk.len() == 6 {
                // A record header announcing 16 KiB, then silence.
                let waited = read_to_close(s)?;
                ensure!(
                    waited >= Duration::from_millis(900),
                    "closed after {waited:?}, before the timeout"
                );
            } else {
                read_to_close(s)?;
            }
        }
        // Many stalled clients at once do not stop the others.
        let stalled: Vec<_> = (0..50)
            .map(|_| n0.tcp_connect(tunnel, Duration::from_secs(2)))
            .collect::<Result<_>>()?;
        let (code, body) = curl(world.pod(0, 0), &format!("http://{WEB_VIP}/still"), &[])?;
        ensure!(code == 200 && body.contains("/still"), "{code} {body}");
        drop(stalled);
        eventually(Duration::from_secs(10), || {
            let protocol = metric(
                n1,
                "waymark_tunnel_handshake_failures_total",
                &[("reason", "protocol")],
            )?;
            let timeout = metric(
                n1,
                "waymark_tunnel_handshake_failures_total",
                &[("reason", "timeout")],
            )?;
            ensure!(
                protocol >= 2.0 && timeout >= 1.0,
                "protocol {protocol}, timeout {timeout}"
            );
            Ok(())
        })?;
        ensure!(
            n1.agent_pid().is_some(),
            "node1's agent died:\n{}",
            log_tail(n1)
        );
        let log = n1.agent_log();
        ensure!(
            !log.contains("panicked"),
            "node1 panicked:\n{}",
            log_tail(n1)
        );
        ensure!(
            log.contains("tunnel TLS handshake timed out"),
            "{}",
            log_tail(n1)
        );
        Ok(())
    });
}

/// Not an assertion: 256 MiB echoed across nodes through the tunnel
/// (source with an identity) and through the agent in plaintext (source
/// without one), printed for the record. Run with a release agent
/// (`WAYMARK_BIN=target/release/waymark`) for figures worth quoting.
#[test]
fn bulk_throughput_tunnel_vs_plaintext() {
    require_agent_or_skip!();
    let builder = meshed_pair(world_name!(), 2, &services()).agent_config(|i, cfg| {
        if i == 0 {
            without_identity(cfg, 1);
        }
    });
    with_world(builder, |world| {
        let _echo = echo(world.pod(1, 0))?;
        const BYTES: u64 = 256 << 20;
        let mut figures = Vec::new();
        for (what, pod) in [
            ("tunnel (mTLS)", world.pod(0, 0)),
            ("plaintext via agent", world.pod(0, 1)),
        ] {
            for _ in 0..2 {
                let out = pod.run_timeout(
                    &mut testpeer([
                        "client",
                        "--connect",
                        ECHO_VIP,
                        "--bytes",
                        &BYTES.to_string(),
                        "--timeout",
                        "120s",
                    ]),
                    Duration::from_secs(130),
                )?;
                let r: Value = serde_json::from_slice(&out.stdout)?;
                ensure!(r["identical"] == true, "{what}: {r}");
                let ms = r["elapsed_ms"].as_f64().unwrap_or(f64::NAN);
                // Echo: 256 MiB each way at the same time.
                figures.push(format!(
                    "{what}: {ms:.0} ms, {:.0} MiB/s each way",
                    256.0 / (ms / 1000.0)
                ));
            }
        }
        let tls = metric(
            world.node(0),
            "tcp_open_total",
            &[("target_addr", ECHO_VIP), ("tls", "true")],
        )?;
        ensure!(tls == 2.0, "the tunnel runs were not tunnelled: {tls}");
        eprintln!("256 MiB echo across nodes:\n  {}", figures.join("\n  "));
        Ok(())
    });
}
