//! `cargo xtask demo`: the newcomer's tour. Builds a two-node world with a
//! real `waymark agent` per node (mTLS between them), runs real servers and
//! clients in pods, and shows what the agents did: a diagnostic trace across
//! both agents, `waymark stat`, `edges`, the receiving agent's live `tap` and
//! `top`, the kernel's counters (`waymark drops`),
//! log lines, metrics, a refused destination, a rollout of an agent under
//! HTTP load and a long opaque transfer, and what happens to pods when the
//! agent is killed and restarted.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use waymark_tests::world::agent::waymark_bin;
use waymark_tests::{Node, Signal, World, metric_value, pod_ip, testpeer};

use crate::{setup, test::cargo};

pub fn run() -> Result<()> {
    setup::ensure_all()?;
    section("Building the agent and the test peers");
    setup::run(&mut cargo(&[
        "build",
        "-p",
        "waymark-agent",
        "-p",
        "waymark-tests",
        "--bins",
    ]))?;

    section(
        "Bringing up the world: 2 nodes x 2 pods, one waymark agent per node, mTLS between them",
    );
    // One HTTP service whose endpoint is on node 1: requests from node 0's
    // pods cross both agents through the mTLS tunnel.
    let services = format!(
        r#"
[[services]]
name = "web"
addresses = ["{WEB_VIP}"]
protocol = "http1"
endpoints = [ {{ addr = "{}:8080", node = "node1" }} ]
[[services.routes]]
name = "all"
retry = {{ attempts = 2, on = ["5xx"] }}
"#,
        pod_ip(1, 0)
    );
    let world = World::builder("demo")
        .nodes(2)
        .pods_per_node(2)
        .mtls(true)
        .agent_config_extra(services)
        .build()?;
    for node in world.nodes() {
        println!(
            "  {}  netns {}  fabric {}  admin {} (inside the node netns), socket {}",
            node.name(),
            node.netns_name(),
            node.fabric_ip(),
            node.admin_addr(),
            node.admin_socket().display()
        );
        for pod in node.pods() {
            println!(
                "    pod {:<14} {:<10} netns {}",
                pod.name(),
                pod.ip(),
                pod.netns_name()
            );
        }
    }
    let client = world.pod(0, 0);
    let web = world.pod(1, 0);
    let echo = world.pod(1, 1);

    section("Servers on node 1: a python3 HTTP app and a TCP echo server");
    let _http = web.serve_until(
        Command::new("python3").args(["-u", "-c", WEB_APP, "8080"]),
        "listening",
        Duration::from_secs(10),
    )?;
    let _echo = echo.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:9000"]))?;
    println!("  http://{}:8080/ and {}:9000 (echo)", web.ip(), echo.ip());

    section(&format!(
        "curl from pod {} to http://{}:8080/",
        client.name(),
        web.ip()
    ));
    let out = client.run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "HTTP %{http_code}, %{size_download} bytes, connected to %{remote_ip}:%{remote_port} in %{time_connect}s\n",
        &format!("http://{}:8080/", web.ip()),
    ]))?;
    print!("  {out}");
    println!("  (curl sees the address it dialled: getpeername is answered by the kernel program)");

    section(&format!(
        "The service web ({WEB_VIP}, endpoint on node 1): 50 requests from {}",
        client.name()
    ));
    let out = client.run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} ",
        &format!("http://{WEB_VIP}/hello?i=[1-50]"),
    ]))?;
    let ok = out.split_whitespace().filter(|c| *c == "200").count();
    println!(
        "  {ok} of 50 answered 200, through node 0's agent, the mTLS tunnel and node 1's agent"
    );
    ensure!(ok == 50, "expected 50 × 200 from the web service: {out}");

    let node0 = world.node(0);
    section(&format!(
        "waymark trace http://{WEB_VIP}/hello --pod {}: each agent appends its block",
        client.name()
    ));
    let out = cli(
        node0,
        &[
            "trace",
            &format!("http://{WEB_VIP}/hello"),
            "--pod",
            client.name(),
        ],
    )?;
    for line in out.lines() {
        println!("  {line}");
    }

    section(&format!(
        "waymark stat on {} (sliding window in the agent)",
        node0.name()
    ));
    print_indented(&cli(node0, &["stat", "--window", "1m"])?);
    section(&format!("waymark edges on {}", node0.name()));
    print_indented(&cli(node0, &["edges", "--window", "1m"])?);

    section(&format!(
        "waymark check on {}: kernel, programs, listeners, config, certificates, peer agents",
        node0.name()
    ));
    // Printed whatever the verdict: the demo machine's clock or kernel may
    // earn a ✖ that is worth seeing.
    let out = node0.run(Command::new(waymark_bin()?).arg("check"))?;
    print_indented(&String::from_utf8_lossy(&out.stdout));

    let node1 = world.node(1);
    section(&format!(
        "waymark tap and waymark top on {}: the requests its pod received through the tunnel",
        node1.name()
    ));
    let burst = || {
        client.run_ok(Command::new("curl").args([
            "-sS",
            "-o",
            "/dev/null",
            &format!("http://{WEB_VIP}/hello?i=[1-20]"),
            &format!("http://{WEB_VIP}/fail?i=[1-5]"),
        ]))
    };
    let tap = cli_during(node1, &["tap", "--direction", "in", "--max", "3"], burst)?;
    print_indented(&tap);
    let top = cli_during(
        node1,
        &["top", "--direction", "in", "--duration", "3s"],
        burst,
    )?;
    print_indented(&top);
    println!(
        "  (node 1 counts every attempt: node 0's agent retried each failed GET before answering the client)"
    );

    section("1 MiB through the echo server, then 200 connections, 50 at a time");
    let out = client.run_ok(&mut testpeer([
        "client",
        "--connect",
        &format!("{}:9000", echo.ip()),
        "--bytes",
        "1048576",
    ]))?;
    println!("  {}", out.trim());
    let out = client.run_ok(&mut testpeer([
        "many",
        "--connect",
        &format!("{}:9000", echo.ip()),
        "--count",
        "200",
        "--concurrency",
        "50",
    ]))?;
    println!("  {}", out.trim());

    section("A destination nobody listens on: the client gets a prompt reset");
    let out = client.run(&mut testpeer([
        "client",
        "--connect",
        &format!("{}:9999", echo.ip()),
        "--bytes",
        "10",
    ]))?;
    println!("  {}", String::from_utf8_lossy(&out.stdout).trim());

    section(&format!(
        "waymark drops on {}: what the kernel dropped, retransmitted and reset",
        node0.name()
    ));
    print_indented(&cli(node0, &["drops", "--window", "1m"])?);

    section(&format!(
        "What {}'s agent logged (connection lines)",
        node0.name()
    ));
    let log = node0.agent_log();
    let interesting: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("outbound{") || l.contains("ready") || l.contains("attached"))
        .collect();
    for line in interesting.iter().take(6) {
        println!("  {line}");
    }
    println!(
        "  … {} lines in {}",
        log.lines().count(),
        node0.agent_log_path().display()
    );

    section(&format!("{}'s /metrics (TCP series)", node0.name()));
    let metrics = node0.metrics()?;
    for line in metrics
        .lines()
        .filter(|l| (l.starts_with("tcp_") || l.starts_with("waymark_")) && !l.contains("_bucket"))
    {
        println!("  {line}");
    }
    let opened = metric_value(&metrics, "tcp_open_total", &[]).unwrap_or(0.0);
    ensure!(
        opened >= 203.0,
        "expected at least 203 proxied connections, metrics say {opened}"
    );

    section(
        "Rolling node 0's agent under load: a new agent binds beside it, adopts the pinned programs, becomes ready, and the old one drains",
    );
    let wrk = client.spawn(
        Command::new("wrk")
            .args(["-t1", "-c16", "-d6s", "--timeout", "5s"])
            .arg(format!("http://{WEB_VIP}/hello"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )?;
    // An opaque transfer across nodes that outlives the rollout: it must
    // arrive byte-exact.
    let transfer = client.spawn(
        testpeer([
            "client",
            "--connect",
            &format!("{}:9000", echo.ip()),
            "--bytes",
            &(128u64 << 20).to_string(),
            "--timeout",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped()),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let mut successor = node0.spawn_successor(19_190)?;
    successor.wait_ready(node0)?;
    let ready_in = started.elapsed();
    let status = node0.wait_agent_exit(Duration::from_secs(30))?;
    let gone_in = started.elapsed();
    let out = wrk.wait_with_output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests = report
        .lines()
        .find(|l| l.contains(" requests in "))
        .map(str::trim)
        .unwrap_or("no summary")
        .to_string();
    let errors: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Socket errors") || l.starts_with("Non-2xx"))
        .collect();
    println!(
        "  new agent ready {:.1} s after it started; the old one drained and exited ({status}) {:.1} s after the new one started",
        ready_in.as_secs_f64(),
        gone_in.as_secs_f64()
    );
    println!(
        "  rollout under wrk -c16 keep-alive, across nodes with mTLS: {requests}, {} failed",
        if errors.is_empty() {
            "0".to_string()
        } else {
            errors.join("; ")
        }
    );
    ensure!(
        errors.is_empty(),
        "requests failed during the rollout:\n{report}"
    );
    let out = transfer.wait_with_output()?;
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    println!(
        "  an opaque 128 MiB transfer across the rollout: {} bytes echoed, byte-exact: {}",
        moved["received"], moved["identical"]
    );
    ensure!(
        moved["identical"] == true,
        "the opaque transfer did not survive the rollout: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    section(
        "kill -9 of the agent: pods' connections are refused, never sent around the mesh, until a restarted agent adopts the pinned state",
    );
    successor.signal(Signal::SIGKILL)?;
    let crashed = std::time::Instant::now();
    let status = successor.wait_exit(Duration::from_secs(30))?;
    println!("  agent killed: {status}");
    let small_exchange = || -> Result<String> {
        let out = client.run(&mut testpeer([
            "client",
            "--connect",
            &format!("{}:9000", echo.ip()),
            "--bytes",
            "10",
            "--timeout",
            "2s",
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let report = small_exchange()?;
    println!("  {}", report.trim());
    ensure!(
        report.contains("refused"),
        "with no agent, the pod's connection was not refused: {report}"
    );
    println!(
        "  (redirect.on_agent_down = \"closed\", the default: the pinned links keep redirecting to the pod's loopback, where nothing listens; \"open\" would let pods connect directly, without mTLS)"
    );
    node0.spawn_agent()?;
    let recovered = loop {
        if small_exchange()?.contains("\"identical\":true") {
            break crashed.elapsed();
        }
        ensure!(
            crashed.elapsed() < Duration::from_secs(30),
            "no traffic 30 s after the crash:\n{}",
            node0.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    node0.wait_agent_ready()?;
    println!(
        "  restarted agent: traffic flowing again {:.2} s after the crash (debug build; the agent's start is most of it)",
        recovered.as_secs_f64()
    );

    section("Tearing the world down");
    drop(world);
    println!("  done: namespaces, cgroups and processes removed");
    Ok(())
}

/// The demo's web service address (a virtual IP, like a ClusterIP).
const WEB_VIP: &str = "10.96.0.80:80";

/// An HTTP/1.1 app that answers GET and TRACE (echoing the request, as
/// RFC 9110 says TRACE does), so the diagnostic trace has a body to extend.
const WEB_APP: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are two writes: without this, Nagle holds the body for
    # the client's delayed ACK (~40 ms), and `end` in the tap shows it.
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = b"hello from web\n"
        ctype = "text/plain"
        if self.command == "TRACE":
            ctype = "message/http"
            body = ("%s %s %s\r\n" % (self.command, self.path, self.request_version)).encode()
            body += b"".join(("%s: %s\r\n" % kv).encode() for kv in self.headers.items()) + b"\r\n"
        self.send_response(500 if self.path.startswith("/fail") else 200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_TRACE = do_GET
srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
print("listening", sys.argv[1], flush=True)
srv.serve_forever()
"#;

/// Runs the `waymark` CLI on `node` (where its admin API listens).
fn cli(node: &Node, args: &[&str]) -> Result<String> {
    let out = node.run(Command::new(waymark_bin()?).args(args))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "waymark {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Runs the `waymark` CLI on `node` while `traffic` runs, once the agent
/// has the CLI's tap open (tap and top watch live requests only).
fn cli_during(
    node: &Node,
    args: &[&str],
    traffic: impl FnOnce() -> Result<String>,
) -> Result<String> {
    std::thread::scope(|s| {
        let run = s.spawn(|| cli(node, args));
        let opened = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            node.metrics()
                .ok()
                .and_then(|m| metric_value(&m, "waymark_tap_streams", &[]))
                .is_some_and(|v| v >= 1.0)
        });
        ensure!(
            opened,
            "waymark {args:?} did not open its tap on {}",
            node.name()
        );
        traffic()?;
        run.join()
            .map_err(|_| anyhow::anyhow!("waymark {args:?} panicked"))?
    })
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

fn section(title: &str) {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m== {title}\x1b[0m");
    } else {
        println!("\n== {title}");
    }
}
