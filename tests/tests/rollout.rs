//! Restarting and rolling the agent under load: what clients see while an
//! agent drains, hands its node over to a new agent, or crashes.
//!
//! Real peers in pods: wrk (HTTP/1.1 keep-alive), h2load (HTTP/2), a grpcio
//! bidirectional stream, testpeer (opaque byte-exact transfers), and an
//! asyncio HTTP/1.1 server. Counts are asserted; times are printed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair, services_toml};
use waymark_tests::{
    Node, Pod, Signal, World, pod_ip, python, require_agent_or_skip, with_world, world_name,
};

const WEB_VIP: &str = "10.96.0.40:80";

/// What wrk reported.
#[derive(Debug, Default)]
struct WrkReport {
    requests: u64,
    /// connect, read, write, timeout
    socket_errors: [u64; 4],
    non_2xx: u64,
    text: String,
}

impl WrkReport {
    fn parse(text: &str) -> Result<Self> {
        let mut r = WrkReport {
            text: text.to_string(),
            ..Default::default()
        };
        for line in text.lines().map(str::trim) {
            if let Some((n, rest)) = line.split_once(" requests in ") {
                let _ = rest;
                r.requests = n.trim().parse().context("wrk's request count")?;
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for (i, part) in rest.split(',').enumerate().take(4) {
                    let n = part.split_whitespace().last().unwrap_or("0");
                    r.socket_errors[i] = n.parse().unwrap_or(0);
                }
            } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = n.trim().parse().unwrap_or(0);
            }
        }
        ensure!(r.requests > 0, "wrk made no request:\n{text}");
        Ok(r)
    }

    fn failures(&self) -> u64 {
        self.socket_errors.iter().sum::<u64>() + self.non_2xx
    }
}

/// Starts wrk in `pod` (keep-alive, 64 connections, one thread).
fn spawn_wrk(pod: &Pod, url: &str, duration: Duration) -> Result<Child> {
    pod.spawn(
        Command::new("wrk")
            .args(["-t1", "-c64", "--timeout", "5s"])
            .arg(format!("-d{}s", duration.as_secs()))
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
}

fn wait_report(child: Child) -> Result<WrkReport> {
    let out = child.wait_with_output().context("waiting for wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    WrkReport::parse(&text)
}

/// The service `web` answered at the endpoint's own address: with no
/// agent (and `on_agent_down = "open"`) clients reach the same server
/// directly, so what they see is the drain alone.
fn web_service(endpoint: &str) -> Service {
    let addr = format!("{endpoint}:8080");
    Service::new("web", &addr)
        .protocol("http1")
        .endpoint(Endpoint::at(&addr))
}

/// (1) SIGTERM under HTTP/1.1 keep-alive load: every response written while
/// the agent drains carries `Connection: close`, so wrk reconnects between
/// requests instead of having its connections cut at the end of the grace
/// (64 keep-alive connections used to see a read error each). The agent
/// exits well within the grace, since nothing is left open.
#[test]
fn sigterm_under_keepalive_load_fails_no_request() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[web_service(&pod_ip(1, 0))]))
        // wrk outlasts the grace: connections still open when it ends
        // would be cut under wrk's feet.
        .agent_config_extra(
            "[redirect]\non_agent_down = \"open\"\n[shutdown]\ndrain_grace = \"3s\"\n",
        );
    with_world(b, |world| {
        let _web = waymark_tests::support::fast_http(world.pod(1, 0), 8080)?;
        let web = format!("http://{}:8080", pod_ip(1, 0));
        let wrk = spawn_wrk(world.pod(0, 0), &format!("{web}/"), Duration::from_secs(7))?;
        let h2load = world.pod(0, 0).spawn(
            Command::new("h2load")
                .args(["-c4", "-m4", "-t1", "-D", "7"])
                .arg(format!("{web}/h2"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        std::thread::sleep(Duration::from_millis(1500));
        let node = world.node(0);
        let sent = Instant::now();
        node.signal_agent(Signal::SIGTERM)?;
        let status = node.wait_agent_exit(Duration::from_secs(20))?;
        let drained_in = sent.elapsed();
        let report = wait_report(wrk)?;
        let (h2_total, h2_failed, h2_text) = h2load_report(h2load)?;
        eprintln!(
            "SIGTERM under wrk -c64: agent exited ({status}) {drained_in:?} after the signal; \
             wrk: {} requests, socket errors {:?}, non-2xx {}; h2load: {h2_total} requests, \
             {h2_failed} refused by h2load after GOAWAY",
            report.requests, report.socket_errors, report.non_2xx
        );
        ensure!(
            h2_failed <= H2LOAD_UNPROCESSED,
            "h2load saw failures while the agent drained:\n{h2_text}\nagent log:\n{}",
            node.agent_log()
        );
        ensure!(
            report.failures() == 0,
            "wrk saw failures while the agent drained:\n{}\nagent log:\n{}",
            report.text,
            node.agent_log()
        );
        ensure!(
            node.agent_log().contains("waymark agent stopped"),
            "the agent did not finish its drain:\n{}",
            node.agent_log()
        );
        Ok(())
    });
}

/// A gRPC server with one bidirectional method (raw bytes, no protoc), and
/// a client that keeps one `Chat` stream open for `SECONDS`, sending a
/// message every 20 ms and checking each answer; it prints one JSON line.
const GRPC: &str = r#"
import json, sys, time
import grpc
def server(port):
    from concurrent import futures
    def chat(reqs, ctx):
        for r in reqs:
            yield r.upper()
    handler = grpc.method_handlers_generic_handler("waymark.test.Echo", {
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handler])
    srv.add_insecure_port("0.0.0.0:%s" % port)
    srv.start()
    print("listening", "0.0.0.0:%s" % port, flush=True)
    srv.wait_for_termination()
def client(target, seconds):
    ch = grpc.insecure_channel(target)
    chat = ch.stream_stream("/waymark.test.Echo/Chat")
    sent = []
    def gen():
        end = time.time() + float(seconds)
        i = 0
        while time.time() < end:
            m = ("msg-%d" % i).encode()
            sent.append(m)
            yield m
            i += 1
            time.sleep(0.02)
    got, error = [], None
    try:
        for r in chat(gen(), timeout=float(seconds) + 30):
            got.append(r)
    except grpc.RpcError as e:
        error = "%s: %s" % (e.code(), e.details())
    ok = error is None and got == [m.upper() for m in sent]
    print(json.dumps({"sent": len(sent), "received": len(got), "ok": ok, "error": error}), flush=True)
{"server": server, "client": client}[sys.argv[1]](*sys.argv[2:])
"#;

const LOCAL_VIP: &str = "10.96.0.41:80";
const GRPC_VIP: &str = "10.96.0.42:9090";
const ECHO_VIP: &str = "10.96.0.43:7000";

/// Node 0's pod 0 is the client; node 1's pod 0 serves HTTP/1.1 (8080),
/// gRPC (9090) and an echo (7000); node 0's pod 1 serves HTTP/1.1 for the
/// same-node path.
fn rollout_services() -> [Service; 4] {
    [
        ("web", WEB_VIP, "http1", Endpoint::meshed(1, 0, 8080)),
        ("local", LOCAL_VIP, "http1", Endpoint::meshed(0, 1, 8080)),
        ("chat", GRPC_VIP, "grpc", Endpoint::meshed(1, 0, 9090)),
        ("echo", ECHO_VIP, "opaque", Endpoint::meshed(1, 0, 7000)),
    ]
    .map(|(name, vip, protocol, endpoint)| {
        Service::new(name, vip)
            .protocol(protocol)
            .endpoint(endpoint)
    })
}

/// The load of the rollout: all four kinds at once, started together.
struct Load {
    wrk_remote: Child,
    wrk_local: Child,
    h2load: Child,
    grpc: Child,
    opaque: Child,
}

const LOAD_SECONDS: u64 = 10;
const OPAQUE_BYTES: u64 = 256 << 20;
/// The old agents' drain grace in the rollout under load.
const ROLLOUT_GRACE: Duration = Duration::from_secs(60);

fn start_load(world: &World) -> Result<Load> {
    let client = world.pod(0, 0);
    let piped = |c: &mut Command| {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    };
    let wrk_remote = spawn_wrk(
        client,
        &format!("http://{WEB_VIP}/"),
        Duration::from_secs(LOAD_SECONDS),
    )?;
    let wrk_local = spawn_wrk(
        client,
        &format!("http://{LOCAL_VIP}/"),
        Duration::from_secs(LOAD_SECONDS),
    )?;
    let mut h2 = Command::new("h2load");
    h2.args(["-c4", "-m4", "-t1", "-D", &LOAD_SECONDS.to_string()])
        .arg(format!("http://{WEB_VIP}/h2"));
    piped(&mut h2);
    let h2load = client.spawn(&mut h2)?;
    let mut g = python();
    g.args([
        "-u",
        "-c",
        GRPC,
        "client",
        GRPC_VIP,
        &LOAD_SECONDS.to_string(),
    ]);
    piped(&mut g);
    let grpc = client.spawn(&mut g)?;
    let mut o = waymark_tests::testpeer([
        "client",
        "--connect",
        ECHO_VIP,
        "--bytes",
        &OPAQUE_BYTES.to_string(),
        "--timeout",
        "120s",
    ]);
    piped(&mut o);
    let opaque = client.spawn(&mut o)?;
    Ok(Load {
        wrk_remote,
        wrk_local,
        h2load,
        grpc,
        opaque,
    })
}

/// What the clients saw, as counts.
#[derive(Debug)]
struct Outcome {
    wrk_remote: WrkReport,
    wrk_local: WrkReport,
    h2_total: u64,
    h2_failed: u64,
    h2_text: String,
    grpc: serde_json::Value,
    opaque: serde_json::Value,
}

impl Outcome {
    fn failures(&self) -> u64 {
        let grpc_ok = self.grpc["ok"] == true;
        let opaque_ok = self.opaque["identical"] == true;
        self.wrk_remote.failures()
            + self.wrk_local.failures()
            + self.h2_failed.saturating_sub(H2LOAD_UNPROCESSED)
            + u64::from(!grpc_ok)
            + u64::from(!opaque_ok)
    }

    fn summary(&self) -> String {
        format!(
            "wrk across nodes: {} requests, socket errors {:?}, non-2xx {}; \
             wrk same node: {} requests, socket errors {:?}, non-2xx {}; \
             h2load: {} requests, {} refused by h2load after GOAWAY; \
             gRPC bidi: {}; opaque {} MiB: {}",
            self.wrk_remote.requests,
            self.wrk_remote.socket_errors,
            self.wrk_remote.non_2xx,
            self.wrk_local.requests,
            self.wrk_local.socket_errors,
            self.wrk_local.non_2xx,
            self.h2_total,
            self.h2_failed,
            self.grpc,
            OPAQUE_BYTES >> 20,
            self.opaque,
        )
    }
}

/// h2load's connections (`-c4`) and streams per connection (`-m4`).
const H2LOAD_CONNS: u64 = 4;
const H2LOAD_STREAMS: u64 = 4;

/// What h2load may count as failed without the agent failing a request.
/// h2load (nghttp2) does not reconnect after a GOAWAY in `-D` mode: the
/// requests a connection has queued or opened above the GOAWAY's last
/// stream id at that instant — at most its `-m` streams — were never
/// processed by the agent (HTTP/2 guarantees it: they are safe to retry),
/// yet h2load counts them as failed and stops that connection. A client
/// that retries them, as the gRPC client here does, sees none fail: that
/// one must see zero.
const H2LOAD_UNPROCESSED: u64 = H2LOAD_CONNS * H2LOAD_STREAMS;

/// h2load's summary: requests made, requests failed (failed, errored or
/// timed out), and its whole output.
fn h2load_report(child: Child) -> Result<(u64, u64, String)> {
    let h2 = child.wait_with_output()?;
    let h2_text = String::from_utf8_lossy(&h2.stdout).into_owned();
    // "requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 2 errored, 0 timeout"
    let line = h2_text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .with_context(|| format!("h2load printed no summary:\n{h2_text}"))?;
    let field = |name: &str| -> u64 {
        line.split(',')
            .find(|p| p.trim().ends_with(name))
            .and_then(|p| p.split_whitespace().rev().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let h2_total = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // "errored" is the subset of "failed" that is not an HTTP status, and
    // "timeout" a subset of "errored" (h2load(1)): "failed" alone
    // counts each failed request once.
    let h2_failed = field("failed");
    Ok((h2_total, h2_failed, h2_text))
}

fn finish_load(load: Load) -> Result<Outcome> {
    let wrk_remote = wait_report(load.wrk_remote)?;
    let wrk_local = wait_report(load.wrk_local)?;
    let (h2_total, h2_failed, h2_text) = h2load_report(load.h2load)?;
    let json = |c: Child| -> Result<serde_json::Value> {
        let out = c.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| {
            format!(
                "not a JSON report: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    Ok(Outcome {
        wrk_remote,
        wrk_local,
        h2_total,
        h2_failed,
        h2_text,
        grpc: json(load.grpc)?,
        opaque: json(load.opaque)?,
    })
}

/// Captures node 0's link to the fabric (every packet between the nodes).
fn capture_node_link(world: &World) -> Result<(Child, std::path::PathBuf)> {
    let file = world.dir().join("node0-link.pcap");
    let child = world.spawn_in_fabric(
        Command::new("tcpdump")
            .args(["-i", "n0", "-U", "-s", "200", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    // tcpdump says "listening on" once the capture runs.
    std::thread::sleep(Duration::from_millis(800));
    Ok((child, file))
}

/// TCP segments with payload on node 0's link that are not the mTLS tunnel
/// (port 15008): traffic that left a pod without the mesh.
fn plaintext_segments(mut tcpdump: Child, file: &std::path::Path) -> Result<(u64, u64)> {
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        Signal::SIGINT,
    )?;
    tcpdump.wait()?;
    let count = |filter: &str| -> Result<u64> {
        let out = Command::new("tshark")
            .args(["-r"])
            .arg(file)
            .args(["-Y", filter, "-T", "fields", "-e", "frame.number"])
            .output()?;
        ensure!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).lines().count() as u64)
    };
    let tunnel = count("tcp.port == 15008 && tcp.len > 0")?;
    let other = count("tcp.len > 0 && !(tcp.port == 15008)")?;
    Ok((tunnel, other))
}

/// (2) A rollout of both nodes' agents under load, with mTLS between the
/// nodes: the new agents bind beside the old ones, adopt the pinned
/// kernel state, become ready and tell the old ones to go, which drain.
/// HTTP/1.1 keep-alive (wrk, across nodes and on one node), HTTP/2
/// (h2load), a gRPC bidirectional stream and a 256 MiB opaque transfer all
/// run through it: no request fails, no connection is reset, the transfer
/// is byte-exact, and nothing crosses node 0's link outside the tunnel.
#[test]
fn rollout_under_load_loses_nothing_and_leaks_no_plaintext() {
    require_agent_or_skip!();
    // The old agents wait for the opaque transfer to end (the drain ends as
    // soon as nothing is open), so a long grace costs nothing on a quiet
    // machine. It is long because the debug agent moves the 256 MiB at
    // ~8 MB/s when the machine is busy (a compile beside the tests); a
    // 20 s grace then reset the transfer before it was done. What the test
    // checks is that nothing is lost, not how fast the data moves.
    let b = meshed_pair(world_name!(), 2, &rollout_services()).agent_config_extra(format!(
        "[shutdown]\ndrain_grace = \"{}s\"\n",
        ROLLOUT_GRACE.as_secs()
    ));
    with_world(b, |world| {
        let (remote, local) = (world.pod(1, 0), world.pod(0, 1));
        let _web = waymark_tests::support::fast_http(remote, 8080)?;
        let _local = waymark_tests::support::fast_http(local, 8080)?;
        let _grpc = remote.serve(python().args(["-u", "-c", GRPC, "server", "9090"]))?;
        let _echo = remote.serve(&mut waymark_tests::testpeer([
            "echo",
            "--listen",
            "0.0.0.0:7000",
        ]))?;
        let (tcpdump, pcap) = capture_node_link(world)?;
        let load = start_load(world)?;
        std::thread::sleep(Duration::from_secs(2));

        let started = Instant::now();
        let mut successors = Vec::new();
        for (i, node) in world.nodes().iter().enumerate() {
            successors.push(node.spawn_successor(19_100 + i as u16)?);
        }
        for (s, node) in successors.iter_mut().zip(world.nodes()) {
            s.wait_ready(node)?;
        }
        let ready_in = started.elapsed();
        for node in world.nodes() {
            let st = node.wait_agent_exit(ROLLOUT_GRACE + Duration::from_secs(15))?;
            ensure!(
                st.success(),
                "the old agent of {} exited with {st}",
                node.name()
            );
        }
        let handed_over_in = started.elapsed();
        let outcome = finish_load(load)?;
        let (tunnel, plaintext) = plaintext_segments(tcpdump, &pcap)?;
        eprintln!(
            "rollout: new agents ready {ready_in:?} after start, old agents gone {handed_over_in:?} after start; \
             {}; node 0 link: {tunnel} tunnel segments, {plaintext} outside the tunnel",
            outcome.summary()
        );
        let logs = || {
            world
                .nodes()
                .iter()
                .zip(&successors)
                .map(|(n, s)| {
                    format!(
                        "== {} old:\n{}\n== {} new:\n{}",
                        n.name(),
                        n.agent_log(),
                        n.name(),
                        s.log()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        ensure!(
            outcome.failures() == 0,
            "clients saw failures during the rollout: {}\nh2load:\n{}\n{}",
            outcome.summary(),
            outcome.h2_text,
            logs()
        );
        ensure!(
            tunnel > 0,
            "nothing crossed the tunnel: the capture saw no traffic"
        );
        ensure!(
            plaintext == 0,
            "{plaintext} segments crossed node 0's link outside the tunnel"
        );
        for (s, node) in successors.iter().zip(world.nodes()) {
            ensure!(
                s.log().contains("adopted a pinned link"),
                "the new agent of {} did not adopt the pinned links:\n{}",
                node.name(),
                s.log()
            );
        }
        Ok(())
    });
}

/// One opaque exchange from `pod` to `addr` (1000 bytes echoed).
fn exchange(pod: &Pod, addr: &str) -> Result<serde_json::Value> {
    let out = pod.run_timeout(
        &mut waymark_tests::testpeer([
            "client",
            "--connect",
            addr,
            "--bytes",
            "1000",
            "--timeout",
            "2s",
        ]),
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("testpeer printed {text}"))
}

/// `waymark check` on `node`: what it printed.
fn check_output(node: &Node) -> Result<String> {
    let admin = node.admin_socket();
    let out = node.run(
        Command::new(waymark_tests::world::agent::waymark_bin()?)
            .arg("check")
            .arg("--admin")
            .arg(&admin),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (3) `kill -9` of node 0's agent under load, with the default
/// `redirect.on_agent_down = "closed"`: the pinned links stay attached, so
/// while no agent runs a pod's new connection is refused (ECONNREFUSED
/// from its own loopback), never sent around the mesh; the restarted agent
/// adopts the pinned state and traffic flows again. Failures and the time
/// from the crash to the first successful exchange are printed;
/// nothing crosses node 0's link outside the tunnel at any moment.
#[test]
fn kill_9_with_agent_down_closed_refuses_then_recovers() {
    require_agent_or_skip!();
    let b = meshed_pair(world_name!(), 2, &rollout_services());
    with_world(b, |world| {
        let (client, remote, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _web = waymark_tests::support::fast_http(remote, 8080)?;
        let _echo = remote.serve(&mut waymark_tests::testpeer([
            "echo",
            "--listen",
            "0.0.0.0:7000",
        ]))?;
        let checked = check_output(node)?;
        ensure!(
            checked.contains("redirect.on_agent_down = closed"),
            "waymark check does not say the mode in force:\n{checked}"
        );
        ensure!(
            exchange(client, ECHO_VIP)?["identical"] == true,
            "no traffic before the crash"
        );
        let (tcpdump, pcap) = capture_node_link(world)?;
        let wrk = spawn_wrk(
            client,
            &format!("http://{WEB_VIP}/"),
            Duration::from_secs(6),
        )?;
        std::thread::sleep(Duration::from_millis(1500));

        let crashed = Instant::now();
        node.stop_agent(Signal::SIGKILL)?;
        let down = exchange(client, ECHO_VIP)?;
        ensure!(
            down["identical"] != true
                && down["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("refused"),
            "with no agent, a pod's connection was not refused: {down}"
        );
        node.spawn_agent()?;
        let restarted = crashed.elapsed();
        let recovered = loop {
            if exchange(client, ECHO_VIP)?["identical"] == true {
                break crashed.elapsed();
            }
            ensure!(
                crashed.elapsed() < Duration::from_secs(30),
                "no traffic 30 s after the crash:\n{}",
                node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        node.wait_agent_ready()?;
        let report = wait_report(wrk)?;
        let (tunnel, plaintext) = plaintext_segments(tcpdump, &pcap)?;
        eprintln!(
            "kill -9 (on_agent_down = closed): new agent started {restarted:?} after the crash, \
             traffic flowing again {recovered:?} after it; wrk: {} requests, {} failed \
             (socket errors {:?}, non-2xx {}); node 0 link: {tunnel} tunnel segments, \
             {plaintext} outside the tunnel",
            report.requests,
            report.failures(),
            report.socket_errors,
            report.non_2xx
        );
        ensure!(
            plaintext == 0,
            "{plaintext} segments crossed node 0's link outside the tunnel"
        );
        ensure!(
            node.agent_log().contains("adopted a pinned link"),
            "the restarted agent did not adopt the pinned links:\n{}",
            node.agent_log()
        );
        Ok(())
    });
}

/// (4) `redirect.on_agent_down = "open"`: the links are the agent's own,
/// so after `kill -9` the programs are gone and a pod's connection goes
/// direct (and succeeds) instead of being refused; `waymark check` warns.
#[test]
fn kill_9_with_agent_down_open_goes_direct() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra("[redirect]\non_agent_down = \"open\"\n");
    with_world(b, |world| {
        let (client, remote, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = remote.serve(&mut waymark_tests::testpeer([
            "echo",
            "--listen",
            "0.0.0.0:7000",
        ]))?;
        let checked = check_output(node)?;
        ensure!(
            checked.contains("redirect.on_agent_down = open") && checked.contains("go direct"),
            "waymark check does not warn about the open mode:\n{checked}"
        );
        let addr = format!("{}:7000", pod_ip(1, 0));
        let through = exchange(client, &addr)?;
        ensure!(
            through["identical"] == true,
            "no traffic through the agent: {through}"
        );
        node.stop_agent(Signal::SIGKILL)?;
        let direct = exchange(client, &addr)?;
        ensure!(
            direct["identical"] == true,
            "with no agent and on_agent_down = open, the pod's connection did not go direct: {direct}"
        );
        Ok(())
    });
}

/// A successor that never becomes ready (discovery on, its API server
/// unreachable) never tells the old agent to go: the rollout stalls, the
/// node keeps working. Both agents share the admin port, as two pods of a
/// DaemonSet on the host network do; while the new one is not ready,
/// neither answers `/ready` with 200 there (the old one says a new agent is
/// taking over), so a probe cannot mark the new pod ready too early. Once
/// the stray successor is stopped, the old agent answers ready again and
/// still serves.
#[test]
fn a_successor_that_never_gets_ready_leaves_the_old_agent_serving() {
    require_agent_or_skip!();
    let echo = Service::new("echo", ECHO_VIP)
        .protocol("opaque")
        .endpoint(Endpoint::meshed(1, 0, 7000));
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[echo]));
    with_world(b, |world| {
        let (client, remote, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = remote.serve(&mut waymark_tests::testpeer([
            "echo",
            "--listen",
            "0.0.0.0:7000",
        ]))?;
        ensure!(
            exchange(client, ECHO_VIP)?["identical"] == true,
            "no traffic before the successor started"
        );
        let kubeconfig = node.config_path().with_file_name("unreachable.kubeconfig");
        std::fs::write(&kubeconfig, UNREACHABLE_KUBECONFIG)?;
        let mut successor = node.spawn_successor_with(node.admin_addr().port(), |cfg| {
            let mut kube = toml::Table::new();
            kube.insert("enabled".into(), true.into());
            kube.insert("kubeconfig".into(), kubeconfig.display().to_string().into());
            cfg.insert("kubernetes".into(), kube.into());
        })?;
        // The successor claims its place (its lock) first thing; from then
        // on the serving agent answers "not ready".
        waymark_tests::eventually(Duration::from_secs(20), || {
            ensure!(
                successor.log().contains("taking over once ready"),
                "the successor has not claimed its place:\n{}",
                successor.log()
            );
            Ok(())
        })?;
        // Probes of the shared port land on either agent: ask until the
        // new one has answered (it is up, listening beside the old one).
        let mut answers = Vec::new();
        waymark_tests::eventually(Duration::from_secs(30), || {
            answers.push(node.admin_get("/ready")?);
            ensure!(
                answers
                    .iter()
                    .any(|(_, b)| b.contains("no full picture of the cluster yet")),
                "the new agent has not answered on the shared port yet:\n{}",
                successor.log()
            );
            Ok(())
        })?;
        // Long enough for a successor that does not wait for readiness to
        // have asked the old agent to go.
        std::thread::sleep(Duration::from_secs(3));
        for _ in 0..16 {
            answers.push(node.admin_get("/ready")?);
        }
        ensure!(
            answers.iter().all(|(status, _)| *status != 200),
            "/ready on the shared admin port answered 200 while the new agent was not ready: {answers:?}"
        );
        ensure!(
            answers
                .iter()
                .any(|(_, b)| b.contains("a new agent is taking over")),
            "the serving agent never said a new agent is taking over: {answers:?}"
        );
        exchanges_succeed(client, "with a stalled successor")?;
        ensure!(
            !node.agent_log().contains("takes over this node"),
            "the old agent was told to go by a successor that is not ready:\n{}",
            node.agent_log()
        );

        successor.signal(Signal::SIGTERM)?;
        let st = successor.wait_exit(Duration::from_secs(30))?;
        ensure!(st.success(), "the stalled successor exited with {st}");
        waymark_tests::eventually(Duration::from_secs(10), || {
            for _ in 0..8 {
                let (status, body) = node.admin_get("/ready")?;
                ensure!(status == 200, "/ready: {status} {body}");
            }
            Ok(())
        })
        .context("the old agent alone on the admin port")?;
        exchanges_succeed(client, "after the successor left")?;
        ensure!(
            node.agent_pid().is_some() && !node.agent_log().contains("takes over this node"),
            "the old agent stopped serving:\n{}",
            node.agent_log()
        );
        Ok(())
    });
}

/// Ten opaque exchanges from `pod` to the echo service, all byte-exact.
fn exchanges_succeed(pod: &Pod, when: &str) -> Result<()> {
    for i in 0..10 {
        let r = exchange(pod, ECHO_VIP)?;
        ensure!(r["identical"] == true, "exchange {i} {when}: {r}");
    }
    Ok(())
}

/// A kubeconfig whose API server nothing answers (port 9 on the node's
/// loopback): discovery never lists, so the agent never gets ready.
const UNREACHABLE_KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
  - name: none
    cluster: { server: 'https://127.0.0.1:9', insecure-skip-tls-verify: true }
users:
  - name: none
    user: { token: none }
contexts:
  - name: none
    context: { cluster: none, user: none }
current-context: none
";

/// Uninstalling: `waymark cleanup` refuses while an agent serves the node;
/// once it is gone (pods' connections refused, on_agent_down = closed), it
/// removes the pinned links and maps, the programs are detached and pods
/// connect directly again; a second run finds nothing.
#[test]
fn cleanup_after_the_last_agent_unpins_and_pods_go_direct() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (client, remote, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = remote.serve(&mut waymark_tests::testpeer([
            "echo",
            "--listen",
            "0.0.0.0:7000",
        ]))?;
        let addr = format!("{}:7000", pod_ip(1, 0));
        let pin_path = node.config()["redirect"]["pin_path"]
            .as_str()
            .context("the node's config has no redirect.pin_path")?
            .to_string();
        let cleanup = || -> Result<std::process::Output> {
            node.run(
                Command::new(waymark_tests::world::agent::waymark_bin()?).args([
                    "cleanup",
                    "--pin-path",
                    &pin_path,
                ]),
            )
        };
        let out = cleanup()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("an agent serves this node"),
            "cleanup under a running agent: {} {err}",
            out.status
        );
        ensure!(
            exchange(client, &addr)?["identical"] == true,
            "no traffic through the agent"
        );
        node.stop_agent(Signal::SIGTERM)?;
        let down = exchange(client, &addr)?;
        ensure!(
            down["error"]
                .as_str()
                .unwrap_or_default()
                .contains("refused"),
            "with no agent (closed), a pod's connection was not refused: {down}"
        );
        let out = cleanup()?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success()
                && said.contains("pinned links")
                && !said.contains(" 0 pinned links"),
            "cleanup: {} {said} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !std::path::Path::new(&pin_path).exists(),
            "{pin_path} is still there"
        );
        let direct = exchange(client, &addr)?;
        ensure!(
            direct["identical"] == true,
            "after cleanup the pod's connection did not go direct: {direct}"
        );
        let again = cleanup()?;
        ensure!(
            again.status.success()
                && String::from_utf8_lossy(&again.stdout).contains("nothing pinned"),
            "a second cleanup: {}",
            String::from_utf8_lossy(&again.stdout)
        );
        Ok(())
    });
}
