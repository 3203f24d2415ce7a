//! End-to-end tests of retrying requests whose bodies have no known length:
//! chunked HTTP/1.1 uploads and gRPC calls (gRPC clients send no
//! `content-length`). The agent streams such a body to the first attempt
//! while keeping a copy up to `proxy.retry_buffer_bytes`, and a retry sends
//! the copy again. Real agents, python3 servers in pods, curl and grpcio
//! clients; see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, services_toml};
use waymark_tests::{Pod, Server, World, python, require_agent_or_skip, with_world, world_name};

/// Servers. `http NAME PORT`: reads the request body (chunked or with a
/// length), answers 503 to every odd request and 200 to the others, with
/// the body's length and MD5 in the response body; prints
/// `req <n> <status> <length> <md5>`. `grpc NAME PORT`: unary
/// `waymark.test.Echo/Echo` that aborts every odd call with UNAVAILABLE
/// (trailers-only) and echoes the request bytes otherwise; prints
/// `call <n> <length> <md5>`.
const SERVERS: &str = r#"
import hashlib, http.server, socketserver, sys, threading
lock, count = threading.Lock(), [0]
def next_n():
    with lock:
        count[0] += 1
        return count[0]
def http_server(name, port):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a):
            pass
        def body(self):
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        def do_PUT(self):
            data = self.body()
            n = next_n()
            status = 503 if n % 2 else 200
            digest = hashlib.md5(data).hexdigest()
            print("req", n, status, len(data), digest, flush=True)
            out = ("%d %s\n" % (len(data), digest)).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
    class S(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
    srv = S(("0.0.0.0", int(port)), H)
    print("listening", port, flush=True)
    srv.serve_forever()
def grpc_server(name, port):
    from concurrent import futures
    import grpc
    def echo(req, ctx):
        n = next_n()
        print("call", n, len(req), hashlib.md5(req).hexdigest(), flush=True)
        if n % 2:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "odd call")
        return req
    handler = grpc.method_handlers_generic_handler("waymark.test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    srv.add_insecure_port("0.0.0.0:%s" % port)
    srv.start()
    print("listening", port, flush=True)
    srv.wait_for_termination()
{"http": http_server, "grpc": grpc_server}[sys.argv[1]](*sys.argv[2:])
"#;

/// `CALLS` sequential unary calls with distinct 10 KiB payloads on one
/// channel; prints `{"ok": n, "echoed": n, "errors": [...]}`.
const GRPC_CLIENT: &str = r#"
import json, os, sys
import grpc
target, calls = sys.argv[1], int(sys.argv[2])
ch = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
echo = ch.unary_unary("/waymark.test.Echo/Echo")
ok, echoed, errors = 0, 0, []
for i in range(calls):
    payload = os.urandom(10240)
    try:
        got = echo(payload, timeout=10)
        ok += 1
        echoed += got == payload
    except grpc.RpcError as e:
        errors.append("%s: %s" % (e.code(), e.details()))
print(json.dumps({"ok": ok, "echoed": echoed, "errors": errors[:5]}), flush=True)
"#;

/// `upload` at `vip`: the HTTP/1.1 server in pod (1, 0), every 5xx
/// retried once.
fn upload(vip: &str) -> Service {
    Service::new("upload", vip)
        .protocol("http1")
        .endpoint(Endpoint::pod(1, 0, 8080))
        .retry_budget(1.0, 10)
        .retry_all(1, "5xx", "2ms", "5ms")
}

fn serve(pod: &Pod, kind: &str, port: u16) -> Result<Server> {
    pod.serve(
        python()
            .args(["-u", "-c", SERVERS, kind, pod.name()])
            .arg(port.to_string()),
    )
}

/// The server's `req`/`call` lines, split into fields.
fn seen(server: &Server, prefix: &str) -> Vec<Vec<String>> {
    server
        .lines()
        .iter()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.split(' ').skip(1).map(str::to_string).collect())
        .collect()
}

fn md5_of(path: &std::path::Path) -> Result<String> {
    let out = Command::new("md5sum").arg(path).output()?;
    ensure!(out.status.success(), "md5sum {}", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A chunked PUT under the replay limit is retried with every byte; one
/// over it streams once and the client gets the server's 503.
#[test]
fn chunked_uploads_are_replayed_up_to_the_buffer_limit() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.30:80";
    let b = World::builder(world_name!())
        .agent_config_extra(services_toml(&[upload(VIP)]))
        .agent_config_extra("[proxy]\nretry_buffer_bytes = 65536\n");
    with_world(b, |world| {
        let cl = world.pod(0, 0);
        let server = serve(world.pod(1, 0), "http", 8080)?;
        let dir = world.dir();
        let small = dir.join("small.bin");
        let large = dir.join("large.bin");
        std::fs::write(&small, rand_bytes(40_000)?)?;
        std::fs::write(&large, rand_bytes(200_000)?)?;

        let put = |file: &std::path::Path| -> Result<String> {
            cl.run_ok(
                Command::new("curl")
                    .args(["-sS", "--noproxy", "*", "--max-time", "10"])
                    .args(["-H", "Transfer-Encoding: chunked", "-T"])
                    .arg(file)
                    .args(["-w", " status=%{http_code}"])
                    .arg(format!("http://{VIP}/upload")),
            )
        };

        // Under the limit: the 503 of the first attempt is hidden by a retry
        // that carries the whole body again.
        let out = put(&small)?;
        let want = md5_of(&small)?;
        ensure!(
            out.trim() == format!("40000 {want}\n status=200").trim(),
            "chunked PUT of 40000 bytes through a retrying route: {out:?}"
        );
        let reqs = seen(&server, "req ");
        ensure!(
            reqs.len() == 2 && reqs.iter().all(|r| r[2] == "40000" && r[3] == want),
            "expected two attempts, each with the whole body: {reqs:?}"
        );

        // Over the limit: streamed once, not retried.
        let out = put(&large)?;
        ensure!(
            out.ends_with("status=503"),
            "a body over retry_buffer_bytes must not be retried: {out:?}"
        );
        let reqs = seen(&server, "req ");
        ensure!(
            reqs.len() == 3 && reqs[2][2] == "200000" && reqs[2][3] == md5_of(&large)?,
            "expected one more attempt with the whole large body: {reqs:?}"
        );
        Ok(())
    });
}

/// gRPC calls carry no content-length; a route retrying UNAVAILABLE still
/// retries them, with the same request message.
#[test]
fn grpc_calls_are_retried_with_their_message() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.31:50051";
    const CALLS: usize = 20;
    let echo = Service::new("echo", VIP)
        .protocol("grpc")
        .endpoint(Endpoint::pod(1, 0, 50051))
        .retry_budget(1.0, 10)
        .retry_all(1, "unavailable", "2ms", "5ms");
    let b = World::builder(world_name!()).agent_config_extra(services_toml(&[echo]));
    with_world(b, |world| {
        let server = serve(world.pod(1, 0), "grpc", 50051)?;
        let out = world.pod(0, 0).run_timeout(
            python().args(["-c", GRPC_CLIENT, VIP, &CALLS.to_string()]),
            Duration::from_secs(60),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let r: Value = serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "grpc client said {stdout:?}, stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        ensure!(
            r["ok"] == CALLS && r["echoed"] == CALLS,
            "every call must succeed with its own message echoed: {r}"
        );
        let calls = seen(&server, "call ");
        ensure!(
            calls.len() == 2 * CALLS,
            "expected each call tried twice (UNAVAILABLE, then OK): {} calls: {calls:?}",
            calls.len()
        );
        for pair in calls.chunks(2) {
            ensure!(
                pair[0][1] == "10240" && pair[0][1..] == pair[1][1..],
                "a retry must carry the same message as its first attempt: {pair:?}"
            );
        }
        Ok(())
    });
}

/// Incompressible bytes from the kernel's generator.
fn rand_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut v)?;
    Ok(v)
}

/// Starts a chunked PUT of `bytes` bytes to `vip` and holds its body open
/// (no last chunk) until stdin closes.
const HELD_UPLOAD: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=10)
s.sendall(b"PUT /held HTTP/1.1\r\nhost: upload\r\ntransfer-encoding: chunked\r\n\r\n")
s.sendall(b"%x\r\n" % n + b"h" * n + b"\r\n")
print("sent", n, flush=True)
sys.stdin.read()
"#;

/// `limits.buffer_memory_bytes` bounds the retry copies of every request
/// together: while one pod's upload holds most of the budget, another
/// request's body finds no room, so it is forwarded without a copy — the
/// server's 503 reaches the client instead of being retried — and counted
/// with its pod. Once the upload goes, retries are back.
#[test]
fn retry_copies_share_a_node_wide_budget() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.32:80";
    let b = World::builder(world_name!())
        .pods_per_node(2)
        .agent_config_extra(services_toml(&[upload(VIP)]))
        .agent_config_extra(
            "[proxy]\nretry_buffer_bytes = 65536\n[limits]\nbuffer_memory_bytes = 65536\n",
        );
    with_world(b, |world| {
        let (holder, cl, node) = (world.pod(0, 1), world.pod(0, 0), world.node(0));
        let _server = serve(world.pod(1, 0), "http", 8080)?;
        let small = world.dir().join("small.bin");
        std::fs::write(&small, rand_bytes(40_000)?)?;
        let put = || -> Result<String> {
            cl.run_ok(
                Command::new("curl")
                    .args(["-sS", "--noproxy", "*", "--max-time", "10"])
                    .args(["-H", "Transfer-Encoding: chunked", "-T"])
                    .arg(&small)
                    .args(["-w", " status=%{http_code}"])
                    .arg(format!("http://{VIP}/upload")),
            )
        };
        let refused = [("pod", cl.name()), ("limit", "buffer_memory")];
        let held_bytes = || waymark_tests::metric(node, "waymark_buffer_memory_bytes", &[]);

        let mut held = holder.spawn(
            python()
                .args(["-u", "-c", HELD_UPLOAD, "10.96.0.32", "80", "50000"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped()),
        )?;
        waymark_tests::eventually(waymark_tests::DEFAULT_PATIENCE, || {
            let b = held_bytes()?;
            ensure!(b == 50_000.0, "the held upload's copy: {b} bytes");
            Ok(())
        })?;
        // 50,000 + 40,000 bytes do not fit 65,536: no copy, no retry. The
        // held request has not reached the server's counter (its body is
        // not complete), so this PUT is its first request and gets 503.
        let out = put()?;
        ensure!(
            out.ends_with("status=503"),
            "with the budget spent the 503 must not be retried: {out:?}"
        );
        ensure!(
            waymark_tests::metric(node, "waymark_limit_refused_total", &refused)? == 1.0,
            "the unbuffered request is counted with its pod"
        );

        // The upload goes, its copy with it; both of the next two PUTs
        // succeed, one of them through a retry of the server's 503.
        drop(held.stdin.take());
        let _ = held.wait();
        waymark_tests::eventually(waymark_tests::DEFAULT_PATIENCE, || {
            let b = held_bytes()?;
            ensure!(b == 0.0, "{b} bytes still held after the upload ended");
            Ok(())
        })?;
        for _ in 0..2 {
            let out = put()?;
            ensure!(out.ends_with("status=200"), "budget free again: {out:?}");
        }
        ensure!(waymark_tests::metric(node, "waymark_limit_refused_total", &refused)? == 1.0);
        Ok(())
    });
}
