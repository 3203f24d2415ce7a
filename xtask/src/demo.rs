//! `cargo xtask demo`: the newcomer's tour. Builds a two-node world with a
//! real `waymark agent` per node, runs real servers and clients in pods, and
//! shows what the agent did: its log lines, its metrics, the kernel's maps,
//! a refused destination, and what happens to pods when the agent stops.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use waymark_tests::{Signal, World, metric_value, testpeer};

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

    section("Bringing up the world: 2 nodes x 2 pods, one waymark agent per node");
    let world = World::builder("demo").nodes(2).pods_per_node(2).build()?;
    for node in world.nodes() {
        println!(
            "  {}  netns {}  fabric {}  admin {} (inside the node netns)",
            node.name(),
            node.netns_name(),
            node.fabric_ip(),
            node.admin_addr()
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

    section("Servers on node 1: python3 http.server and a TCP echo server");
    let _http = web.serve_until(
        Command::new("python3")
            .args(["-u", "-m", "http.server", "8080", "--bind", "0.0.0.0"])
            .current_dir(world.dir()),
        "Serving HTTP",
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

    let node0 = world.node(0);
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

    section("Stopping node 0's agent (SIGTERM): pods fail open and connect directly");
    let status = node0.stop_agent(Signal::SIGTERM)?;
    println!("  agent exited: {status}");
    let who = echo.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:9100"]))?;
    let out = client.run_ok(&mut testpeer([
        "client",
        "--connect",
        &format!("{}:9100", echo.ip()),
        "--bytes",
        "0",
        "--read-only",
    ]))?;
    println!("  {}", out.trim());
    println!(
        "  (the server now sees the pod's own address, {}, not the agent's)",
        client.ip()
    );
    drop(who);

    section("Tearing the world down");
    drop(world);
    println!("  done: namespaces, cgroups and processes removed");
    Ok(())
}

fn section(title: &str) {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m== {title}\x1b[0m");
    } else {
        println!("\n== {title}");
    }
}
