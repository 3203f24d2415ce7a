//! End-to-end tests of the foundation: eBPF redirection of pod sockets and
//! the opaque TCP proxy, with real agents in a network-namespace world.
//! They need root and eBPF; see tests/README.md.
//!
//! Each test body runs inside [`with_world`], which turns an error into a
//! panic while the world is still alive, so the agents' logs are kept and
//! their last lines printed.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::support::open_files::{self, AgentWithFiles};
use waymark_tests::world::{agent, cgroup, in_ci, topology};
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, Signal, World, eventually, metric, metric_value,
    require_agent_or_skip, testpeer, testpeer_bin, with_world, world_name,
};

const OPEN: &str = "tcp_open_total";
const CLOSE: &str = "tcp_close_total";

/// Runs `testpeer client ARGS…` in `pod` and parses its JSON report.
fn client(pod: &Pod, args: &[&str]) -> Result<Value> {
    let out = pod.run(&mut testpeer(["client"].iter().chain(args)))?;
    parse_report(&out)
}

fn parse_report(out: &std::process::Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "testpeer said {stdout:?} ({}), stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `testpeer many` in `pod`; fails unless every round trip succeeded.
fn many(pod: &Pod, target: &str, count: u32, concurrency: u32) -> Result<Value> {
    let out = pod.run_timeout(
        &mut testpeer([
            "many",
            "--connect",
            target,
            "--count",
            &count.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ]),
        Duration::from_secs(150),
    )?;
    let r: Value = parse_report(&out)?;
    ensure!(
        r["ok"] == count && r["failed"] == 0,
        "{count} connections to {target} ({concurrency} at a time) from {}: {r}",
        pod.name()
    );
    Ok(r)
}

/// The source address a `testpeer whoami` server reported to a client.
fn seen_as(r: &Value) -> Result<IpAddr> {
    let text = r["text"].as_str().unwrap_or_default().trim();
    let addr: SocketAddr = text
        .strip_prefix("peer=")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("not a whoami answer: {r}"))?;
    Ok(addr.ip().to_canonical())
}

/// Connects from `pod` to a whoami server at `target`: who the server saw.
fn whoami(pod: &Pod, target: &str) -> Result<IpAddr> {
    let r = client(pod, &["--connect", target, "--read-only"])?;
    ensure!(
        r["error"].is_null(),
        "whoami {target} from {}: {r}",
        pod.name()
    );
    seen_as(&r)
}

/// The labels of one pod's outbound series towards `target`.
fn conn<'a>(pod: &'a Pod, target: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("direction", "outbound"),
        ("pod", pod.name()),
        ("target_addr", target),
    ]
}

/// Waits until the metric reaches `want`, then checks it is exactly `want`.
fn expect_metric(node: &Node, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    let got = eventually(DEFAULT_PATIENCE, || {
        let v = metric(node, name, labels)?;
        ensure!(v >= want, "{name}{labels:?} is {v}, expected {want}");
        Ok(v)
    })
    .with_context(|| format!("on {}", node.name()))?;
    ensure!(
        got == want,
        "{name}{labels:?} on {} is {got}, expected exactly {want}",
        node.name()
    );
    Ok(())
}

/// Debian's python3 where it is, else whatever `python3` is on PATH.
fn python() -> Command {
    let debian = std::path::Path::new("/usr/bin/python3");
    Command::new(if debian.exists() {
        debian.as_os_str()
    } else {
        "python3".as_ref()
    })
}

fn is_reset(r: &Value) -> bool {
    let e = r["error"].as_str().unwrap_or_default().to_lowercase();
    e.contains("reset") || e.contains("refused")
}

/// (1) HTTP and echo from node 0 to node 1 cross node 0's agent: counted per
/// connection, logged with the destination, and the server sees the agent.
#[test]
fn pod_reaches_pod_on_another_node_through_the_agent() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let www = world.dir().join("www");
        std::fs::create_dir_all(&www)?;
        let body = "hello from a pod on node 1\n";
        std::fs::write(www.join("hello.txt"), body)?;
        let _http = srv.serve_until(
            python()
                .args(["-u", "-m", "http.server", "8080", "--bind", "0.0.0.0"])
                .arg("--directory")
                .arg(&www),
            "Serving HTTP",
            Duration::from_secs(10),
        )?;
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let _who = srv.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7001"]))?;
        let (web, echo, who) = (
            format!("{}:8080", srv.ip()),
            format!("{}:7000", srv.ip()),
            format!("{}:7001", srv.ip()),
        );

        let out = cl.run_ok(Command::new("curl").args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            &format!("http://{web}/hello.txt"),
        ]))?;
        let (got, code) = out.rsplit_once('\n').context("no status from curl")?;
        ensure!(code == "200", "curl http://{web}/hello.txt: status {code}");
        ensure!(got == body, "curl got {got:?}, served {body:?}");

        for seed in 1..=3 {
            let seed = seed.to_string();
            let r = client(
                cl,
                &["--connect", &echo, "--bytes", "5000", "--seed", &seed],
            )?;
            ensure!(r["identical"] == true && r["error"].is_null(), "echo: {r}");
        }
        // The agent dials as the pod (in its network namespace): the server
        // sees the pod's own address; that the connection went through the
        // agent is in the agent's metrics below.
        let source = whoami(cl, &who)?;
        ensure!(
            source == cl.ip(),
            "the server saw {source}; expected the pod ({}), not node 0 ({})",
            cl.ip(),
            node.fabric_ip()
        );

        expect_metric(node, OPEN, &conn(cl, &web), 1.0)?;
        expect_metric(node, OPEN, &conn(cl, &echo), 3.0)?;
        expect_metric(node, OPEN, &conn(cl, &who), 1.0)?;
        for dst in [&web, &echo, &who] {
            eventually(DEFAULT_PATIENCE, || {
                let log = node.agent_log();
                ensure!(
                    log.lines().any(|l| l.contains(dst.as_str())),
                    "no line of node 0's agent log names {dst}"
                );
                Ok(())
            })?;
        }
        Ok(())
    });
}

/// (2) The application's getpeername returns what it dialled, IPv4 and IPv6,
/// although the socket is connected to the agent.
#[test]
fn getpeername_returns_the_dialled_address_v4_and_v6() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "[::]:7000"]))?;
        for target in [
            format!("{}:7000", srv.ip()),
            format!("[{}]:7000", srv.ip6()),
        ] {
            let r = client(cl, &["--connect", &target, "--bytes", "1000"])?;
            ensure!(r["identical"] == true, "{target}: {r}");
            ensure!(
                r["peer"] == target.as_str(),
                "getpeername gave {}, the client dialled {target}: {r}",
                r["peer"]
            );
            // …and it really went through the agent.
            expect_metric(node, OPEN, &conn(cl, &target), 1.0)?;
        }
        Ok(())
    });
}

/// (3) 16 MiB round-trip byte-identical, and the byte counters see exactly it.
#[test]
fn sixteen_mib_round_trip_and_byte_counters() {
    require_agent_or_skip!();
    const SIZE: u64 = 16 * 1024 * 1024;
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let target = format!("{}:7000", srv.ip());
        let r = client(
            cl,
            &[
                "--connect",
                &target,
                "--bytes",
                &SIZE.to_string(),
                "--seed",
                "16",
                "--timeout",
                "25s",
            ],
        )?;
        ensure!(
            r["identical"] == true && r["sent"] == SIZE && r["received"] == SIZE,
            "16 MiB through the echo server: {r}"
        );
        let labels = conn(cl, &target);
        expect_metric(node, "tcp_write_bytes_total", &labels, SIZE as f64)?;
        expect_metric(node, "tcp_read_bytes_total", &labels, SIZE as f64)?;
        expect_metric(node, OPEN, &labels, 1.0)
    });
}

/// (4) A client that shuts down its write side still gets the answer.
#[test]
fn half_close_is_forwarded() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _hc = srv.serve(&mut testpeer([
            "halfclose-server",
            "--listen",
            "0.0.0.0:7002",
        ]))?;
        let target = format!("{}:7002", srv.ip());
        let r = client(cl, &["--connect", &target, "--bytes", "100000"])?;
        ensure!(
            r["error"].is_null() && r["sent"] == 100000,
            "half-close: {r}"
        );
        ensure!(
            r["text"] == "got 100000 bytes\n",
            "the server's answer after the client's FIN was lost: {r}"
        );
        let mut labels = conn(cl, &target);
        expect_metric(node, OPEN, &labels, 1.0)?;
        labels.extend([("reason", "eof"), ("classification", "success")]);
        expect_metric(node, CLOSE, &labels, 1.0)
    });
}

/// (5a) A refused upstream connect resets the client at once, well before
/// the connect timeout.
#[test]
fn refused_destination_resets_the_client_promptly() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra("[outbound]\nconnect_timeout = \"5s\"\n");
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let target = format!("{}:7999", srv.ip());
        let r = client(cl, &["--connect", &target, "--read-only"])?;
        ensure!(is_reset(&r), "expected a reset or refusal: {r}");
        let ms = r["elapsed_ms"].as_f64().context("no elapsed_ms")?;
        ensure!(
            ms < 5000.0,
            "the refusal took {ms} ms: the client waited for connect_timeout (5s) instead"
        );
        let mut labels = conn(cl, &target);
        expect_metric(node, OPEN, &labels, 1.0)?;
        labels.extend([("reason", "connect_refused"), ("classification", "failure")]);
        expect_metric(node, CLOSE, &labels, 1.0)
    });
}

/// (5b) An upstream that never answers: reset after `connect_timeout`, no hang.
#[test]
fn silent_destination_times_out_and_resets_the_client() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra("[outbound]\nconnect_timeout = \"1s\"\n");
    with_world(b, |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        // On the fabric's /24, assigned to nobody: ARP never resolves.
        let target = "10.0.0.200:7000";
        let r = client(
            cl,
            &["--connect", target, "--read-only", "--timeout", "10s"],
        )?;
        ensure!(is_reset(&r), "expected a reset after the timeout: {r}");
        let ms = r["elapsed_ms"].as_f64().context("no elapsed_ms")?;
        ensure!(
            (950.0..9000.0).contains(&ms),
            "reset after {ms} ms; expected just after connect_timeout (1s): {r}"
        );
        let mut labels = conn(cl, target);
        labels.extend([("reason", "connect_timeout"), ("classification", "failure")]);
        expect_metric(node, CLOSE, &labels, 1.0)
    });
}

/// (6) A process in the pod's netns but outside the pods' cgroup is left
/// alone.
#[test]
fn process_outside_the_pod_cgroup_is_not_redirected() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _who = srv.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7001"]))?;
        let target = format!("{}:7001", srv.ip());
        let me = cgroup::process_cgroup(std::process::id() as i32).unwrap_or_default();
        ensure!(
            !me.contains(&format!("waymark-{}", world.name())),
            "the test process is in the world's cgroup {me}"
        );
        let out = Command::new("nsenter")
            .arg(format!("--net={}", cl.netns_path().display()))
            .arg(testpeer_bin()?)
            .args(["client", "--connect", &target, "--read-only"])
            .args(["--timeout", "5s"])
            .stdin(Stdio::null())
            .output()
            .context("running nsenter")?;
        let r = parse_report(&out)?;
        ensure!(r["error"].is_null(), "nsenter client: {r}");
        let source = seen_as(&r)?;
        ensure!(
            source == cl.ip(),
            "a process outside the pods' cgroup was seen as {source}, not as the pod ({})",
            cl.ip()
        );
        // The same from inside the pod is redirected (and dialled as the
        // pod): only that one counts.
        let source = whoami(cl, &target)?;
        ensure!(source == cl.ip(), "pod process seen as {source}");
        expect_metric(node, OPEN, &conn(cl, &target), 1.0)?;
        expect_metric(node, OPEN, &[], 1.0)
    });
}

/// (7) The agent's own upstream connections are not redirected back to it.
#[test]
fn agent_upstream_connections_are_not_redirected() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let target = format!("{}:7000", srv.ip());
        ensure!(metric(node, OPEN, &[])? == 0.0, "connections before any");
        many(cl, &target, 5, 1)?;
        expect_metric(node, OPEN, &[], 5.0)?;
        expect_metric(node, OPEN, &conn(cl, &target), 5.0)?;
        let mut eof = conn(cl, &target);
        eof.push(("reason", "eof"));
        expect_metric(node, CLOSE, &eof, 5.0)?;
        let body = node.metrics()?;
        let lost = metric_value(&body, "waymark_outbound_no_original_dst_total", &[]);
        ensure!(
            lost.unwrap_or(0.0) == 0.0,
            "connections without an original destination: {lost:?}"
        );
        for n in world.nodes() {
            ensure!(
                !n.agent_log().contains("no original destination"),
                "{}'s agent accepted a connection it cannot route",
                n.name()
            );
        }
        Ok(())
    });
}

/// (8) 1,000 sequential and 200 concurrent connections, and the kernel's
/// original-destination maps are empty afterwards.
#[test]
fn many_connections_and_maps_drain_to_zero() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let target = format!("{}:7000", srv.ip());
        many(cl, &target, 1000, 1)?;
        many(cl, &target, 200, 200)?;
        expect_metric(node, OPEN, &conn(cl, &target), 1200.0)?;
        for map in ["original_dst_by_cookie", "original_dst_by_flow"] {
            eventually(Duration::from_secs(15), || {
                let body = node.metrics()?;
                let v = metric_value(&body, "waymark_redirect_map_entries", &[("map", map)]);
                ensure!(v == Some(0.0), "{map} holds {v:?} entries");
                Ok(())
            })?;
        }
        Ok(())
    });
}

const UDP_SERVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000))
print("listening", s.getsockname(), flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(("from=%s " % addr[0]).encode() + data, addr)
"#;

/// Sends one datagram unconnected (sendto) and one on a connected socket
/// (connect() runs the connect4 hook); prints each answer.
const UDP_CLIENT: &str = r#"
import socket, sys
dst = (sys.argv[1], int(sys.argv[2]))
for connected in (False, True):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    if connected:
        s.connect(dst)
    msg = b"connected" if connected else b"sendto"
    for _ in range(5):
        try:
            s.send(msg) if connected else s.sendto(msg, dst)
            print(s.recv(2048).decode(), flush=True)
            break
        except socket.timeout:
            pass
    else:
        print("no answer", flush=True)
"#;

/// (9) UDP is not touched: datagrams flow pod to pod, the agent counts none.
#[test]
fn udp_is_not_redirected() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).pods_per_node(1);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let _udp = srv.serve(python().args(["-u", "-c", UDP_SERVER]))?;
        let ip = srv.ip().to_string();
        let out = cl.run_ok(python().args(["-c", UDP_CLIENT, &ip, "9000"]))?;
        let want = format!("from={} sendto\nfrom={} connected\n", cl.ip(), cl.ip());
        ensure!(
            out == want,
            "UDP answers {out:?}, expected {want:?} (straight from the pod)"
        );
        // One TCP connection afterwards: the only one the agent counted.
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let r = client(cl, &["--connect", &format!("{ip}:7000"), "--bytes", "10"])?;
        ensure!(r["identical"] == true, "{r}");
        expect_metric(node, OPEN, &[], 1.0)
    });
}

/// (10) `redirect.exclude` keeps a destination ip:port off the proxy, and only
/// that port.
#[test]
fn excluded_destination_is_not_redirected() {
    require_agent_or_skip!();
    let server_ip = topology::pod_ip(1, 0);
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config(move |_, cfg| {
            // Appended, so the world's own exclusion (the admin port) stays.
            let extra: toml::Table = format!("net = \"{server_ip}/32\"\nports = [7001]\n")
                .parse()
                .expect("valid TOML");
            cfg["redirect"]["exclude"]
                .as_array_mut()
                .expect("the world writes redirect.exclude")
                .push(toml::Value::Table(extra));
        });
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        ensure!(srv.ip() == server_ip);
        let _a = srv.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7001"]))?;
        let _b = srv.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7002"]))?;
        let (excluded, proxied) = (format!("{server_ip}:7001"), format!("{server_ip}:7002"));
        let source = whoami(cl, &excluded)?;
        ensure!(
            source == cl.ip(),
            "excluded {excluded} saw {source}, not the pod"
        );
        let source = whoami(cl, &proxied)?;
        ensure!(
            source == cl.ip(),
            "{proxied} saw {source}, not the pod the agent dials as"
        );
        expect_metric(node, OPEN, &conn(cl, &proxied), 1.0)?;
        expect_metric(node, OPEN, &conn(cl, &excluded), 0.0)
    });
}

/// (11) Pod to pod on the same node also goes through the node's agent.
#[test]
fn same_node_pods_go_through_the_agent() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).nodes(1).pods_per_node(2);
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(0, 1), world.node(0));
        let _who = srv.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7001"]))?;
        let target = format!("{}:7001", srv.ip());
        let source = whoami(cl, &target)?;
        let bridge = topology::node_bridge_ip(0);
        ensure!(
            source == cl.ip(),
            "seen as {source}; the agent dials as the pod ({}), not from the node's pods bridge {bridge}",
            cl.ip()
        );
        expect_metric(node, OPEN, &conn(cl, &target), 1.0)
    });
}

/// (11d) The agent raises its open-files soft limit to the hard limit at
/// start (every proxied connection holds two descriptors): started with
/// 1,024 of 20,000, it runs with 20,000 and says so in its log. And its
/// descriptor table is already that big: growing it later, with several
/// threads, stalls the thread that opens a descriptor for an RCU grace
/// period (8-16 ms here) at each doubling.
#[test]
fn the_open_files_limit_is_raised_and_the_descriptor_table_sized_for_it() {
    require_agent_or_skip!();
    let (wrapper, hard) = (|| -> Result<_> {
        let hard = open_files::hard_limit()?;
        Ok((AgentWithFiles::soft_hard(1024, hard)?, hard.to_string()))
    })()
    .unwrap_or_else(|e| panic!("{e:#}"));
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(1)
        .agent_bin(wrapper.path());
    with_world(b, |world| {
        let node = world.node(0);
        let pid = node.agent_pid().context("no agent")?;
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .context("no open files line")?;
        let cols: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            cols.get(3) == Some(&hard.as_str()) && cols.get(4) == Some(&hard.as_str()),
            "the agent runs with {line:?}, expected soft = hard = {hard}"
        );
        let log = node.agent_log();
        ensure!(
            log.contains("open files limit raised to the hard limit from=1024"),
            "the agent does not log the raise: {log}"
        );
        // The kernel's table size, in descriptors; the agent holds ~100.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let fd_size: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no FDSize in the agent's status")?;
        let want = hard.parse::<u64>().unwrap_or(u64::MAX).min(1 << 16);
        ensure!(
            fd_size >= want,
            "the agent's descriptor table holds {fd_size}, not the {want} of its limit: \
             it will grow while the agent serves"
        );
        Ok(())
    });
}

/// Opens N connections to an echo server and holds them all; prints how
/// many echoed, then waits for stdin to close.
const HOLD_N: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, ok, refused = [], 0, 0
errors = []
for i in range(n):
    try:
        socks.append(socket.create_connection((host, port), timeout=10))
    except OSError as e:
        # Reset at accept before connect() returned, or no answer.
        refused += 1
        errors.append(repr(e))
for s in socks:
    try:
        s.sendall(b"x")
        if s.recv(1) == b"x":
            ok += 1
        else:
            refused += 1
    except OSError:
        refused += 1
print("ok", ok, "refused", refused, flush=True)
print("errors", errors, file=sys.stderr, flush=True)
sys.stdin.read()
"#;

/// (11e) One pod cannot take the agent from the others: past
/// `outbound.max_connections_per_pod` its new connections are reset at
/// accept and counted with the pod and the limit, while another pod's
/// connections go through; when the pod closes some, it may open again.
#[test]
fn a_pod_over_its_connection_limit_is_refused_and_others_are_not() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(2)
        .pods_per_node(2)
        .agent_config_extra("[outbound]\nmax_connections_per_pod = 5\n");
    with_world(b, |world| {
        let (greedy, other, srv, node) = (
            world.pod(0, 0),
            world.pod(0, 1),
            world.pod(1, 0),
            world.node(0),
        );
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let ip = srv.ip().to_string();
        let mut held = greedy.spawn(
            python()
                .args(["-u", "-c", HOLD_N, &ip, "7000", "7"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(held.stdout.take().context("no stdout")?),
            &mut line,
        )?;
        ensure!(
            line.trim() == "ok 5 refused 2",
            "7 connections with a limit of 5: {line:?}"
        );
        // The other pod is not held back by the greedy one.
        let r = client(
            other,
            &["--connect", &format!("{ip}:7000"), "--bytes", "1000"],
        )?;
        ensure!(r["identical"] == true, "the other pod: {r}");
        expect_metric(
            node,
            "waymark_outbound_refused_total",
            &[("pod", greedy.name()), ("limit", "pod_connections")],
            2.0,
        )?;
        // Closed connections give their places back.
        drop(held.stdin.take());
        let _ = held.wait();
        eventually(DEFAULT_PATIENCE, || {
            let r = client(
                greedy,
                &["--connect", &format!("{ip}:7000"), "--bytes", "10"],
            )?;
            ensure!(r["identical"] == true, "after closing: {r}");
            Ok(())
        })?;
        ensure!(
            node.agent_log()
                .contains("outbound connection limits per_pod=5")
        );
        Ok(())
    });
}

/// The agent-wide bound (`outbound.max_connections`) holds across pods:
/// with 5 in all (and 4 per pod, as unset it would be half of 5), a pod
/// holding 4 leaves one for the next pod, whose second
/// connection is reset at accept and counted with that pod and
/// `limit="agent_connections"`.
#[test]
fn the_agent_wide_connection_limit_holds_across_pods() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(2)
        .pods_per_node(2)
        .agent_config_extra("[outbound]\nmax_connections = 5\nmax_connections_per_pod = 4\n");
    with_world(b, |world| {
        let (first, second, srv, node) = (
            world.pod(0, 0),
            world.pod(0, 1),
            world.pod(1, 0),
            world.node(0),
        );
        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let ip = srv.ip().to_string();
        let hold = |pod: &Pod, n: &str| -> Result<(std::process::Child, String)> {
            let mut held = pod.spawn(
                python()
                    .args(["-u", "-c", HOLD_N, &ip, "7000", n])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped()),
            )?;
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(held.stdout.take().context("no stdout")?),
                &mut line,
            )?;
            Ok((held, line.trim().to_string()))
        };
        let (_a, line) = hold(first, "4")?;
        ensure!(line == "ok 4 refused 0", "the first pod's 4: {line:?}");
        let (_b, line) = hold(second, "2")?;
        ensure!(
            line == "ok 1 refused 1",
            "2 more with 1 left of 5 in all: {line:?}"
        );
        expect_metric(
            node,
            "waymark_outbound_refused_total",
            &[("pod", second.name()), ("limit", "agent_connections")],
            1.0,
        )?;
        ensure!(
            node.agent_log()
                .contains("outbound connection limits per_pod=4 total=5")
        );
        Ok(())
    });
}

/// (11c) Link-local destinations (the cloud metadata address lives there)
/// are not redirected by default: the pod reaches them as itself, and the
/// agent never dials them on its behalf.
#[test]
fn link_local_destinations_are_left_to_the_pod() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).nodes(1).pods_per_node(1);
    with_world(b, |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        // A metadata-like service on a link-local address of the node.
        node.run_ok(Command::new("ip").args(["addr", "add", "169.254.77.1/32", "dev", "lo"]))?;
        let target = "169.254.77.1:7400";
        let _svc = node.serve(&mut testpeer(["whoami", "--listen", target]))?;
        let source = whoami(cl, target)?;
        ensure!(source == cl.ip(), "the service saw {source}, not the pod");
        // A proxied destination for comparison, so the metric is live.
        let bridge = format!("{}:7401", topology::node_bridge_ip(0));
        let _other = node.serve(&mut testpeer(["whoami", "--listen", &bridge]))?;
        whoami(cl, &bridge)?;
        expect_metric(node, OPEN, &conn(cl, &bridge), 1.0)?;
        expect_metric(node, OPEN, &conn(cl, target), 0.0)
    });
}

/// (11b) The agent is no confused deputy: it dials a pod's connection from
/// the pod's own network namespace, so what the node's firewall forbids the
/// pod stays forbidden through the agent. A service on the node's own
/// address that an nftables rule on the node closes to the pod: the node
/// itself reaches it; the pod, redirected to the agent, does not (the agent
/// would have reached it as the node before). With `dial_from = "node"` the
/// agent reaches it, which shows the rule is what stops the pod.
#[test]
fn the_agent_dials_as_the_pod_not_as_the_node() {
    require_agent_or_skip!();
    for dial_from in ["pod", "node"] {
        let b = World::builder(&format!("{}-{dial_from}", world_name!()))
            .nodes(1)
            .pods_per_node(1)
            .agent_config_extra(format!(
                "[outbound]\ndial_from = \"{dial_from}\"\nconnect_timeout = \"1s\"\n"
            ));
        with_world(b, |world| {
            let (cl, node) = (world.pod(0, 0), world.node(0));
            let bridge = topology::node_bridge_ip(0);
            let target = format!("{bridge}:7300");
            let _svc = node.serve(&mut testpeer(["whoami", "--listen", &target]))?;
            // The node's firewall: the pod may not reach port 7300 on the node.
            let rule = format!(
                "add rule inet wm_deputy input ip saddr {} tcp dport 7300 counter drop",
                cl.ip()
            );
            node.run_ok(Command::new("nft").args([
                "add table inet wm_deputy;",
                "add chain inet wm_deputy input { type filter hook input priority 0; policy accept; };",
                &rule,
            ]))?;
            let from_node = node.run(&mut testpeer([
                "client",
                "--connect",
                &target,
                "--read-only",
                "--timeout",
                "5s",
            ]))?;
            let r = parse_report(&from_node)?;
            ensure!(
                r["error"].is_null(),
                "the node itself must reach {target}: {r}"
            );

            let r = client(
                cl,
                &["--connect", &target, "--read-only", "--timeout", "5s"],
            )?;
            let dropped = node.run_ok(Command::new("nft").args([
                "list",
                "chain",
                "inet",
                "wm_deputy",
                "input",
            ]))?;
            match dial_from {
                "pod" => {
                    ensure!(
                        r["text"].as_str().unwrap_or_default().is_empty(),
                        "through the agent the pod reached {target}, which the node's firewall closes to it: {r}"
                    );
                    ensure!(
                        !dropped.contains("counter packets 0 "),
                        "the node's rule never saw the pod's packets: {dropped}"
                    );
                    expect_metric(
                        node,
                        CLOSE,
                        &[
                            ("direction", "outbound"),
                            ("pod", cl.name()),
                            ("target_addr", &target),
                            ("reason", "connect_timeout"),
                        ],
                        1.0,
                    )
                }
                _ => {
                    ensure!(r["error"].is_null(), "dial_from = node: {r}");
                    let seen = seen_as(&r)?;
                    ensure!(
                        seen == bridge,
                        "dial_from = node: the service saw {seen}, not the node ({bridge})"
                    );
                    Ok(())
                }
            }
        });
    }
}

/// A long-lived connection driven line by line from the test: each line
/// sent on stdin goes out on the socket, each echo comes back on stdout.
const HOLDER: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                print("eof", flush=True)
                sys.exit(0)
            got += chunk
        print("echo " + got.decode().strip(), flush=True)
    except OSError as e:
        print("error %r" % e, flush=True)
        sys.exit(0)
"#;

struct Holder {
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn start(pod: &Pod, ip: &str, port: &str) -> Result<Holder> {
        let mut child = pod.spawn(
            python()
                .args(["-u", "-c", HOLDER, ip, port])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )?;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().context("stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        let mut h = Holder {
            stdin: child.stdin.take().context("stdin")?,
            lines,
        };
        let first = h.next_line()?;
        ensure!(first == "connected", "holder: {first}");
        Ok(h)
    }

    fn next_line(&mut self) -> Result<String> {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .context("no answer from the python client within 10s")
    }

    /// Sends `msg`; returns what the client printed (`echo msg`, `eof`, …).
    fn say(&mut self, msg: &str) -> Result<String> {
        // A client that already exited makes this fail; next_line says so.
        let _ = writeln!(self.stdin, "{msg}").and_then(|_| self.stdin.flush());
        self.next_line()
    }
}

/// (12) Ready, config, and SIGTERM: not ready while draining, established
/// connections keep flowing for the grace period, exit 0, then fail-open
/// (`redirect.on_agent_down = "open"`; the default, closed, is tested in
/// `rollout.rs`).
#[test]
fn lifecycle_ready_config_drain_and_fail_open() {
    require_agent_or_skip!();
    const GRACE: Duration = Duration::from_secs(3);
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(
            "[shutdown]\ndrain_grace = \"3s\"\n[redirect]\non_agent_down = \"open\"\n",
        );
    with_world(b, |world| {
        let (cl, srv, node) = (world.pod(0, 0), world.pod(1, 0), world.node(0));
        let (status, body) = node.admin_get("/ready")?;
        ensure!(status == 200, "/ready: {status} {body}");
        let (status, body) = node.admin_socket_get("/config")?;
        ensure!(status == 200, "/config: {status} {body}");
        let cfg: Value = serde_json::from_str(&body).context("/config is not JSON")?;
        ensure!(cfg["node"]["name"] == "node0", "/config: {cfg}");

        let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let _who = srv.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7001"]))?;
        let ip = srv.ip().to_string();
        let mut held = Holder::start(cl, &ip, "7000")?;
        ensure!(held.say("one")? == "echo one");
        let echo = format!("{ip}:7000");
        expect_metric(node, OPEN, &conn(cl, &echo), 1.0)?;

        let sigterm = Instant::now();
        node.signal_agent(Signal::SIGTERM)?;
        eventually(GRACE, || {
            let (status, body) = node.admin_get("/ready")?;
            ensure!(status == 503, "/ready while draining: {status} {body}");
            ensure!(body.contains("draining"), "/ready while draining: {body}");
            Ok(())
        })?;
        let answer = held.say("two")?;
        ensure!(
            answer == "echo two",
            "the held connection stopped forwarding {:?} after SIGTERM: {answer}",
            sigterm.elapsed()
        );
        // The admin API still answers while draining: "one\n" and "two\n".
        for bytes in ["tcp_write_bytes_total", "tcp_read_bytes_total"] {
            expect_metric(node, bytes, &conn(cl, &echo), 8.0)?;
        }
        ensure!(
            node.agent_pid().is_some(),
            "the agent exited before the grace period was over"
        );

        let status = node.wait_agent_exit(GRACE + Duration::from_secs(10))?;
        let took = sigterm.elapsed();
        ensure!(status.code() == Some(0), "agent exited with {status}");
        ensure!(
            took >= GRACE - Duration::from_millis(100),
            "the agent exited {took:?} after SIGTERM, before the {GRACE:?} grace period"
        );
        let answer = held.say("three")?;
        ensure!(
            answer == "eof" || answer.starts_with("error"),
            "the held connection outlived the agent: {answer}"
        );
        let source = whoami(cl, &format!("{ip}:7001"))?;
        ensure!(
            source == cl.ip(),
            "with no agent, a new connection was seen as {source}, not the pod (fail open)"
        );
        Ok(())
    });
}

/// (13) An invalid config: exit code 2, every bad field named. Needs neither
/// root nor a world.
#[test]
fn invalid_config_exits_2_naming_every_field() {
    let bin = match agent::waymark_bin() {
        Ok(b) => b,
        Err(e) if in_ci() => panic!("this test needs the waymark binary: {e:#} (CI is set)"),
        Err(e) => {
            eprintln!("SKIPPED invalid_config_exits_2_naming_every_field: {e:#}");
            return;
        }
    };
    let file = std::env::temp_dir().join(format!("waymark-bad-config-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[admin]\nlisten = \"0.0.0.0:4191\"\n[outbound]\nport = 0\n",
    )
    .unwrap();
    let mut child = Command::new(&bin)
        .arg("agent")
        .arg("--config")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&file);
            panic!("`waymark agent` with an invalid config still runs after 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_file(&file);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status}; stderr:\n{stderr}"
    );
    for field in ["admin.listen", "outbound.port"] {
        assert!(
            stderr.contains(field),
            "stderr does not name {field}:\n{stderr}"
        );
    }
}
