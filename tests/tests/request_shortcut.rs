//! The request shortcut (`redirect.request_shortcut`): a pod application's
//! requests go from its socket straight into the agent's accepted socket,
//! so with the reply shortcut the pod's loopback leg carries no data at
//! all. Checked with real agents: the bytes arrive whole and in order,
//! also when the application sends at once after `connect()` (the
//! decision races the agent's side of the handshake) and across the switch
//! to TCP when the agent stops reading; a pod that sends faster than its
//! upstream takes is held back (socket to socket there is no TCP window);
//! and the requests really left loopback yet count in the pod's kernel
//! bytes out.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use waymark_tests::support::shortcut::{
    echo_through_agent, lo_rx_bytes, pod_kernel_bytes, run_json,
};
use waymark_tests::{
    DEFAULT_PATIENCE, Pod, Server, World, eventually, python, require_agent_or_skip, with_world,
    world_name,
};

const SIZE: u64 = 8 * 1024 * 1024;

/// Both shortcuts, with budgets larger than the echo (the client may send
/// all of it before reading a byte back).
const ON: &str = "[redirect]\nreply_shortcut = true\nreply_shortcut_max_unanswered = 67108864\n\
                  request_shortcut = true\nrequest_shortcut_max_unread = 67108864\n";
/// The reply shortcut alone: the requests cross loopback.
const REPLIES_ONLY: &str =
    "[redirect]\nreply_shortcut = true\nreply_shortcut_max_unanswered = 67108864\n";

/// With both shortcuts an 8 MiB echo arrives byte-exact and next to nothing
/// crosses the pod's loopback (the handshake, the closing FINs); the pod's
/// kernel bytes out count the requests all the same, as sockmap bytes.
/// With the reply shortcut alone the requests cross loopback. Same traffic.
#[test]
fn requests_skip_the_pods_loopback_and_arrive_whole() {
    require_agent_or_skip!();
    let on = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(ON);
    with_world(on, |world| {
        let (bytes_before, sockmap_before) = pod_kernel_bytes(world, "out")?;
        let lo = echo_through_agent(world, SIZE)?;
        ensure!(
            lo < SIZE / 8,
            "{lo} bytes crossed the client pod's lo for {SIZE} bytes each way: the requests (or replies) did"
        );
        eventually(DEFAULT_PATIENCE, || {
            let (bytes, sockmap) = pod_kernel_bytes(world, "out")?;
            let (bytes, sockmap) = (bytes - bytes_before, sockmap - sockmap_before);
            ensure!(
                sockmap >= SIZE as f64 && sockmap < 1.01 * SIZE as f64,
                "the pod's sockmap bytes out should be the {SIZE} request bytes: {sockmap}"
            );
            ensure!(
                bytes >= SIZE as f64 && bytes < 1.05 * SIZE as f64,
                "the pod's bytes out should be the {SIZE} request bytes: {bytes}"
            );
            Ok(())
        })?;
        Ok(())
    });
    let off = World::builder(&format!("{}-off", world_name!()))
        .pods_per_node(1)
        .agent_config_extra(REPLIES_ONLY);
    with_world(off, |world| {
        let lo = echo_through_agent(world, SIZE)?;
        ensure!(
            lo >= SIZE,
            "{lo} bytes crossed the client pod's lo with the request shortcut off: expected the requests (>= {SIZE})"
        );
        let (_, sockmap) = pod_kernel_bytes(world, "out")?;
        ensure!(
            sockmap == 0.0,
            "request shortcut off, yet {sockmap} sockmap bytes out"
        );
        Ok(())
    });
}

/// A server that answers each connection once the client has shut its side
/// down, with everything it read: what an HTTP/1.0 upload or a `nc -N`
/// does. Until then the agent writes nothing to the client, so nothing but
/// the client's own bytes and its FIN can wake the agent's reads.
fn serve_answer_at_eof(srv: &Pod, port: u16) -> Result<Server> {
    srv.serve(python().args([
        "-c",
        &format!(
            r#"
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", {port})); l.listen(64)
print("listening ", flush=True)
def answer(c):
    got = bytearray()
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        got += b
    c.sendall(got)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=answer, args=(c,)).start()
"#
        ),
    ]))
}

/// Many short connections, each sending its request in two writes the
/// moment `connect()` returns and shutting its side down right after, to a
/// server that answers only at that end: every answer is whole and in
/// order whichever path each connection's requests took, so the agent saw
/// every FIN (always TCP's, behind redirected bytes) after them and
/// forwarded it; and most requests took the shortcut.
#[test]
fn connections_that_send_and_shut_down_at_once_are_answered_in_order() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(ON);
    with_world(b, |world| {
        let (cl, srv) = (world.pod(0, 0), world.pod(1, 0));
        let _server = serve_answer_at_eof(srv, 7400)?;
        let before = lo_rx_bytes(cl)?;
        let script = format!(
            r#"
import json, socket
bad = []
for i in range(200):
    msg = b"".join(b"%d:%d," % (i, k) for k in range(400))
    s = socket.create_connection(("{ip}", 7400), timeout=10)
    s.sendall(msg[:100]); s.sendall(msg[100:])
    s.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
    except OSError as e:
        bad.append((i, str(e)))
        continue
    if got != msg:
        bad.append((i, len(got)))
    s.close()
print(json.dumps({{"bad": bad, "bytes": 200 * len(msg)}}))
"#,
            ip = srv.ip()
        );
        let r = run_json(cl, &script, Duration::from_secs(120))?;
        ensure!(
            r["bad"].as_array().is_some_and(Vec::is_empty),
            "answers came back wrong or never: {r}"
        );
        let total = r["bytes"].as_u64().context("bytes")?;
        let lo = lo_rx_bytes(cl)? - before;
        // The answers come after each client's half-close, when the
        // agent's socket has left ESTABLISHED: they take TCP by design (see
        // `shortcut.rs`). The requests did not: with them, lo would carry
        // twice the total.
        ensure!(
            lo < total + total / 2,
            "{lo} bytes crossed the client pod's lo for {total} bytes each way: most requests should have taken the shortcut"
        );
        Ok(())
    });
}

/// Socket to socket there is no TCP window: a pod sending faster than its
/// upstream takes would have everything queued in the agent's socket.
/// Once `redirect.request_shortcut_max_unread` bytes are redirected beyond
/// what the agent has read, the connection's requests take TCP, whose
/// window holds the pod back: against a server that reads nothing for two
/// seconds, a client trying to send 96 MiB gets some tens of MiB into its
/// socket (TCP's own buffers along the path), not all of it; then all of it
/// arrives, in order, across the switch.
#[test]
fn a_pod_sending_faster_than_its_upstream_takes_is_held_back() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(
            "[redirect]\nreply_shortcut = true\nrequest_shortcut = true\nrequest_shortcut_max_unread = 1048576\n",
        );
    with_world(b, |world| {
        let (cl, srv) = (world.pod(0, 0), world.pod(1, 0));
        const TOTAL: usize = 96 << 20;
        let _slow = srv.serve(python().args([
            "-c",
            r#"
import hashlib, socket, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 7300)); l.listen(8)
print("listening ", flush=True)
while True:
    c, _ = l.accept()
    time.sleep(2)
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b); n += len(b)
    c.sendall(b"%d %s" % (n, h.hexdigest().encode()))
    c.close()
"#,
        ]))?;
        let script = format!(
            r#"
import hashlib, json, socket, threading, time
data = bytes(range(251)) * ({TOTAL} // 251) + bytes(range({TOTAL} % 251))
s = socket.create_connection(("{ip}", 7300), timeout=30)
sent = [0]
def send():
    view = memoryview(data)
    while sent[0] < len(data):
        sent[0] += s.send(view[sent[0]:sent[0] + (1 << 20)])
t = threading.Thread(target=send)
t.start()
time.sleep(1.5)
early = sent[0]
t.join()
s.shutdown(socket.SHUT_WR)
answer = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    answer += b
print(json.dumps({{"early": early, "answer": answer.decode(), "expected": "%d %s" % (len(data), hashlib.sha256(data).hexdigest())}}))
"#,
            ip = srv.ip()
        );
        let r = run_json(cl, &script, Duration::from_secs(90))?;
        ensure!(
            r["answer"] == r["expected"],
            "the server did not get the {TOTAL} bytes whole and in order: {r}"
        );
        let early = r["early"].as_u64().context("early")?;
        ensure!(
            early < 48 << 20,
            "{early} bytes went into the client's socket while the server read nothing: the shortcut kept pushing"
        );
        Ok(())
    });
}
