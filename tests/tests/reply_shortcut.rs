//! The reply shortcut (`redirect.reply_shortcut`): the agent's replies to a
//! pod's application go from socket to socket through a sockmap instead of
//! through the pod's loopback TCP. Checked here with real agents: the bytes
//! arrive whole and in order (bulk, half-close), what the application sees
//! of its socket is unchanged (`FIONREAD`, `MSG_PEEK`), and the replies
//! really left loopback (the pod's `lo` counters) yet count in the pod's
//! kernel bytes in, against the same world with the shortcut off.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::support::shortcut::{echo_through_agent, lo_rx, pod_kernel_bytes, run_json};
use waymark_tests::{
    DEFAULT_PATIENCE, World, eventually, metric_value, python, require_agent_or_skip, testpeer,
    with_world, world_name,
};

const SIZE: u64 = 8 * 1024 * 1024;

/// The shortcut is on by default; said anyway, against `OFF`. The echo
/// tests send the client more than the default unanswered budget at once
/// (the client may have sent all it had before the replies start): a
/// larger budget keeps them on the shortcut whatever the timing.
const ON: &str = "[redirect]\nreply_shortcut = true\nreply_shortcut_max_unanswered = 67108864\n";
const OFF: &str = "[redirect]\nreply_shortcut = false\n";

fn reply_paths(world: &World) -> Result<(f64, f64)> {
    let body = world.node(0).metrics()?;
    let get = |path| {
        metric_value(
            &body,
            "waymark_outbound_reply_path_total",
            &[("path", path)],
        )
        .unwrap_or(0.0)
    };
    Ok((get("sockmap"), get("loopback")))
}

/// With the shortcut on, an 8 MiB echo arrives byte-exact and its replies
/// never cross the pod's loopback: only the requests (and acknowledgements)
/// do; the pod's kernel bytes in count them all the same, as sockmap bytes.
/// With it off, both directions cross loopback. Same traffic.
#[test]
fn replies_skip_the_pods_loopback_and_arrive_whole() {
    require_agent_or_skip!();
    let on = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(ON);
    with_world(on, |world| {
        let (bytes_before, sockmap_before) = pod_kernel_bytes(world, "in")?;
        let lo = echo_through_agent(world, SIZE)?;
        let (sockmap, loopback) = reply_paths(world)?;
        ensure!(
            sockmap == 1.0 && loopback == 0.0,
            "the connection should have taken the shortcut: sockmap={sockmap} loopback={loopback}"
        );
        ensure!(
            lo < SIZE + SIZE / 2,
            "{lo} bytes crossed the client pod's lo for {SIZE} bytes each way: the replies did too"
        );
        // The kprobe counts the replies as they are delivered; the metric
        // reads the counters when scraped.
        eventually(DEFAULT_PATIENCE, || {
            let (bytes, sockmap) = pod_kernel_bytes(world, "in")?;
            let (bytes, sockmap) = (bytes - bytes_before, sockmap - sockmap_before);
            // Replies written after the client's half-close take TCP
            // (the agent's socket has left ESTABLISHED): most, not all.
            ensure!(
                sockmap >= 0.75 * SIZE as f64 && sockmap <= SIZE as f64,
                "the pod's sockmap bytes in should be most of the {SIZE} reply bytes: {sockmap}"
            );
            ensure!(
                bytes >= SIZE as f64 && bytes < 1.10 * SIZE as f64,
                "the pod's bytes in should be the {SIZE} reply bytes (sockmap and packets) \
                 and the agent's acknowledgements of the requests: {bytes}"
            );
            Ok(())
        })?;
        Ok(())
    });
    let off = World::builder(&format!("{}-off", world_name!()))
        .pods_per_node(1)
        .agent_config_extra(OFF);
    with_world(off, |world| {
        let lo = echo_through_agent(world, SIZE)?;
        let (sockmap, loopback) = reply_paths(world)?;
        ensure!(
            sockmap == 0.0 && loopback == 0.0,
            "shortcut off: no connection should be counted on it: sockmap={sockmap} loopback={loopback}"
        );
        let (_, sockmap_bytes) = pod_kernel_bytes(world, "in")?;
        ensure!(
            sockmap_bytes == 0.0,
            "shortcut off, yet {sockmap_bytes} sockmap bytes in"
        );
        ensure!(
            lo >= 2 * SIZE,
            "{lo} bytes crossed the client pod's lo with the shortcut off: expected both directions (>= {})",
            2 * SIZE
        );
        Ok(())
    });
}

/// What an application asks of its socket about bytes waiting: `FIONREAD`
/// and `MSG_PEEK` see the redirected reply, and the reply and the server's
/// close after the client's half-close arrive in order.
#[test]
fn the_application_sees_its_socket_as_before() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(ON);
    with_world(b, |world| {
        let (cl, srv) = (world.pod(0, 0), world.pod(1, 0));
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let script = format!(
            r#"
import fcntl, socket, struct, termios, time, json
s = socket.create_connection(("{ip}", 7000), timeout=10)
s.sendall(b"x" * 1000)
deadline = time.time() + 5
n = 0
while time.time() < deadline:
    n = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    if n >= 1000:
        break
    time.sleep(0.01)
peek = s.recv(1000, socket.MSG_PEEK)
s.shutdown(socket.SHUT_WR)
got = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print(json.dumps({{"fionread": n, "peeked": len(peek), "read": len(got), "same": got == b"x" * 1000}}))
"#,
            ip = srv.ip()
        );
        let out = cl.run_ok(Command::new("/usr/bin/python3").args(["-c", &script]))?;
        let r: Value =
            serde_json::from_str(out.trim()).with_context(|| format!("python said {out:?}"))?;
        let (sockmap, _) = reply_paths(world)?;
        ensure!(sockmap == 1.0, "the connection did not take the shortcut");
        ensure!(
            r["fionread"] == 1000,
            "FIONREAD did not count the redirected reply: {r}"
        );
        ensure!(
            r["peeked"] == 1000 && r["read"] == 1000 && r["same"] == true,
            "peek or read of the reply went wrong: {r}"
        );
        Ok(())
    });
}

/// Runs `start` in the client pod (Python: it connects `s` to a server
/// whose stream is `bytes(range(251))` repeated, and leaves the answers
/// unread), then checks what the flow-control bounds promise: under
/// `max_queued` bytes sit unread in the client's socket (`ss -tm`), all
/// `expected` bytes then arrive in order, and the connection is the one
/// that left the shortcut.
fn held_back(world: &World, start: &str, expected: usize, max_queued: u64) -> Result<()> {
    let script = format!(
        r#"
import json, re, socket, subprocess, time
pattern = bytes(range(251)) * 4200
{start}
ss = subprocess.run(["ss", "-tmnH", "dst", "127.0.0.1:15001"], capture_output=True, text=True).stdout
queued = [int(r) for r in re.findall(r"skmem:\(r(\d+),", ss)]
s.shutdown(socket.SHUT_WR)
got, ok = 0, True
while got < {expected}:
    b = s.recv(1 << 19)
    if not b:
        break
    start = got % 251
    ok = ok and b == pattern[start:start + len(b)]
    got += len(b)
print(json.dumps({{"queued": queued, "received": got, "in_order": ok}}))
"#
    );
    let r = run_json(world.pod(0, 0), &script, Duration::from_secs(60))?;
    ensure!(
        r["received"] == expected && r["in_order"] == true,
        "the answers did not arrive whole and in order: {r}"
    );
    let queued = r["queued"][0]
        .as_u64()
        .with_context(|| format!("no client socket in ss: {r}"))?;
    ensure!(
        queued < max_queued,
        "{queued} bytes were queued unread in the client's socket: the shortcut kept pushing"
    );
    let left = metric_value(
        &world.node(0).metrics()?,
        "waymark_outbound_reply_shortcut_left_total",
        &[],
    );
    ensure!(
        left == Some(1.0),
        "connections that left the shortcut: {left:?}"
    );
    Ok(())
}

/// Socket to socket there is no flow control: a client that stops reading
/// would have a whole download queued in its socket. After
/// `redirect.reply_shortcut_max_unanswered` bytes without a word from the
/// client the connection leaves the shortcut, and TCP's window holds the
/// rest back: a 64 MiB download the client does not read for two seconds
/// leaves a few MiB queued in its socket, not 64, and then arrives whole and
/// in order across the switch.
#[test]
fn a_client_that_does_not_read_holds_back_a_download() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra("[redirect]\nreply_shortcut = true\n");
    with_world(b, |world| {
        let srv = world.pod(1, 0);
        const SIZE: usize = 64 << 20;
        let _big = srv.serve(python().args([
            "-c",
            &format!(
                r#"
import socket
pattern = bytes(range(251)) * 4096
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 7100)); l.listen(8)
print("listening ", flush=True)
while True:
    c, _ = l.accept()
    c.recv(100)
    left = {SIZE}
    off = 0
    try:
        while left:
            chunk = pattern[off % 251:][:min(left, 1 << 20)]
            c.sendall(chunk)
            off += len(chunk); left -= len(chunk)
    except OSError:
        pass
    c.close()
"#
            ),
        ]))?;
        let start = format!(
            "s = socket.create_connection((\"{}\", 7100))\ns.sendall(b\"go\")\ntime.sleep(2)",
            srv.ip()
        );
        held_back(world, &start, SIZE, 16 << 20)
    });
}

/// A client that keeps sending without reading the answers resets the
/// unanswered count every time; what sits unread in its socket (asked of
/// the kernel through `sock_diag`) takes it off the shortcut instead. 100
/// requests of 1 MiB answers each, one every 20 ms, none read for 2.5 s,
/// with a 32 MiB budget: about the budget queued, not 100 MiB; then all of
/// it arrives in order.
#[test]
fn a_client_that_sends_without_reading_is_held_back_by_its_unread_bytes() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(
            "[redirect]\nreply_shortcut = true\nreply_shortcut_max_unanswered = 33554432\n",
        );
    with_world(b, |world| {
        let srv = world.pod(1, 0);
        const ANSWERS: usize = 100;
        let _answers = srv.serve(python().args([
            "-c",
            r#"
import socket
pattern = bytes(range(251)) * 4200
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 7200)); l.listen(8)
print("listening ", flush=True)
while True:
    c, _ = l.accept()
    off = 0
    f = c.makefile("rb")
    try:
        for line in f:
            start = off % 251
            c.sendall(pattern[start:start + (1 << 20)])
            off += 1 << 20
    except OSError:
        pass
    c.close()
"#,
        ]))?;
        let start = format!(
            "s = socket.create_connection((\"{}\", 7200))\nfor _ in range({ANSWERS}):\n    s.sendall(b\"more\\n\")\n    time.sleep(0.02)\ntime.sleep(0.5)",
            srv.ip()
        );
        held_back(world, &start, ANSWERS << 20, 64 << 20)
    });
}

/// What [`small_exchanges`] measured on one connection.
struct Exchanges {
    /// All of them, the pause not counted.
    total_ms: f64,
    worst_ms: f64,
    /// Exchanges that took 1 ms or more: a wait for the delayed-ACK timer
    /// takes at least that (two ticks at `HZ=1000`, the first maybe nearly
    /// over); the exchange itself takes a few hundred µs here.
    slow: u64,
    /// Packets the pod's `lo` carried for the whole connection (its
    /// handshake included).
    packets: u64,
}

/// 100-byte exchanges through the agent's echo path on one new
/// connection from the client pod, with Nagle's algorithm on or off, and
/// a pause of `pause_ms` after the first quarter.
fn small_exchanges(world: &World, rounds: u32, nodelay: bool, pause_ms: u32) -> Result<Exchanges> {
    let (cl, srv) = (world.pod(0, 0), world.pod(1, 0));
    let script = format!(
        r#"
import json, socket, time
s = socket.create_connection(("{ip}", 7000), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, {nodelay})
t0 = time.monotonic(); worst = 0.0; paused = 0.0; slow = 0
for i in range({rounds}):
    if i == {rounds} // 4 and {pause_ms}:
        p = time.monotonic(); time.sleep({pause_ms} / 1000); paused = time.monotonic() - p
    t = time.monotonic()
    s.sendall(b"y" * 100)
    got = b""
    while len(got) < 100:
        r = s.recv(100 - len(got))
        assert r, "closed"
        got += r
    took = time.monotonic() - t
    worst = max(worst, took); slow += took >= 0.001
print(json.dumps({{"total_ms": (time.monotonic() - t0 - paused) * 1000, "worst_ms": worst * 1000, "slow": slow}}))
"#,
        ip = srv.ip(),
        nodelay = u8::from(nodelay),
    );
    let before = lo_rx(cl, "packets")?;
    let r = run_json(cl, &script, Duration::from_secs(60))?;
    let packets = lo_rx(cl, "packets")? - before;
    let x = Exchanges {
        total_ms: r["total_ms"].as_f64().context("total_ms")?,
        worst_ms: r["worst_ms"].as_f64().context("worst_ms")?,
        slow: r["slow"].as_u64().context("slow")?,
        packets,
    };
    eprintln!(
        "{rounds} exchanges, nodelay={nodelay}, a {pause_ms} ms pause: {:.1} ms, \
         worst {:.1} ms, {} of 1 ms or more, {packets} packets on the pod's lo",
        x.total_ms, x.worst_ms, x.slow
    );
    Ok(x)
}

/// A client that leaves Nagle's algorithm on (no `TCP_NODELAY`: Java's
/// sockets by default) holds each small request until its previous one is
/// acknowledged. On the shortcut the agent's socket sends no data for that
/// acknowledgement to ride on, and it delays its ACKs (the kernel's
/// interactive mode, for fewer bare ACKs): with the kernel's default
/// delayed-ACK timer the client waited 40 ms once per connection (measured:
/// worst exchange 41.8 ms). The agent bounds that timer to a few ms. A
/// client with `TCP_NODELAY` still gets the fewer ACKs: its requests
/// arrive before the last one is acknowledged, and one ACK covers two.
/// The kernel leaves the mode when the timer fires in a pause, and the
/// agent puts the socket back (`transport::delayed_acks`), except for a
/// client that waits for the timer, as one with Nagle on does.
#[test]
fn a_client_with_nagle_on_is_not_held_by_delayed_acks() {
    require_agent_or_skip!();
    let on = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(ON);
    with_world(on, |world| {
        let _echo = world
            .pod(1, 0)
            .serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        // A pause too: in the mode the agent puts sockets back in after
        // one, each of this client's requests would wait for the timer.
        // Had it been put back, every second exchange after the pause
        // would wait (the one read when the mode is set is acknowledged at
        // once): about 60 of 160, against the 10-20 a busy machine slows.
        let rounds = 160;
        let x = small_exchanges(world, rounds, false, 50)?;
        ensure!(
            x.worst_ms < 30.0,
            "an exchange with Nagle on took {:.1} ms: it waited for the default \
             delayed-ACK timer",
            x.worst_ms
        );
        ensure!(
            x.slow < u64::from(rounds / 4),
            "{} of {rounds} exchanges with Nagle on took 1 ms or more ({:.0} ms in all): \
             requests waited for the delayed-ACK timer",
            x.slow,
            x.total_ms
        );
        // Each request is one packet, each bare ACK one more: one per
        // request without the interactive mode (2×), one per two with it.
        // A 50 ms pause after the first quarter (the timer fires in it):
        // had the socket stayed out of the mode, the rest would be 2×
        // (1.875× in all). A busy machine can pause the client at the
        // wrong moment too: one connection of three must show it.
        let rounds = 400;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let packets = small_exchanges(world, rounds, true, 50)?.packets;
            seen.push(packets);
            if (packets as f64) < 1.75 * f64::from(rounds) {
                break;
            }
        }
        ensure!(
            seen.iter().any(|&p| (p as f64) < 1.75 * f64::from(rounds)),
            "{seen:?} packets crossed the pod's lo for {rounds} requests on each connection: \
             the agent acknowledged about every request with a bare ACK"
        );
        let (sockmap, _) = reply_paths(world)?;
        ensure!(
            sockmap >= 2.0,
            "the connections should have taken the shortcut: {sockmap}"
        );
        Ok(())
    })
}
