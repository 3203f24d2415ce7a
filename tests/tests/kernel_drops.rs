//! End-to-end tests of the kernel diagnostics: real drops, resets and
//! retransmits provoked in the world, counted by the agents' eBPF programs,
//! and shown by `/metrics`, `waymark drops` and `waymark drops --follow`.
//! They need root and eBPF (and nftables); see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::world::agent::waymark_bin;
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, World, eventually, http_app, metric, nft_in, pod_ip,
    require_agent_or_skip, testpeer, with_world, world_name,
};

const DROPS: &str = "waymark_kernel_drops_total";
const RESETS: &str = "waymark_kernel_tcp_resets_total";
const RETRANSMITS: &str = "waymark_kernel_tcp_retransmits_total";
const BYTES: &str = "waymark_kernel_bytes_total";
const PACKETS: &str = "waymark_kernel_packets_total";

/// `testpeer client` from `pod`; its JSON report, whatever the exit code.
fn client(pod: &Pod, args: &[&str]) -> Result<Value> {
    let out = pod.run_timeout(
        &mut testpeer(["client"].iter().chain(args)),
        Duration::from_secs(90),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("testpeer said {stdout:?} ({})", out.status))
}

/// `waymark ARGS…` on `node` (the CLI talks to that node's agent).
fn waymark(node: &Node, args: &[&str]) -> Result<String> {
    node.run_ok(Command::new(waymark_bin()?).args(args))
}

/// The packets a rule's `counter` has seen.
fn counter_packets(listing: &str) -> Result<u64> {
    let rest = listing
        .split("counter packets ")
        .nth(1)
        .context("no counter in the listing")?;
    Ok(rest.split_whitespace().next().unwrap_or_default().parse()?)
}

/// The report of `waymark drops -o json`, and the counts of one pod in it.
fn drops_json(node: &Node, args: &[&str]) -> Result<Value> {
    let mut all = vec!["drops", "-o", "json"];
    all.extend_from_slice(args);
    Ok(serde_json::from_str(&waymark(node, &all)?)?)
}

fn pod_entry<'a>(report: &'a Value, pod: &str) -> Result<&'a Value> {
    report["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["pod"] == pod))
        .with_context(|| format!("no pod {pod} in {report}"))
}

fn reason_count(entry: &Value, reason: &str) -> u64 {
    entry["drops"]
        .as_array()
        .and_then(|d| d.iter().find(|r| r["reason"] == reason))
        .and_then(|r| r["count"].as_u64())
        .unwrap_or(0)
}

/// `waymark drops --follow -o json` on `node`, its lines on a channel.
fn follow(node: &Node) -> Result<mpsc::Receiver<String>> {
    let mut child = node.spawn(
        Command::new(waymark_bin()?)
            .args(["drops", "--follow", "-o", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

#[test]
fn a_closed_port_is_a_no_socket_drop_and_a_reset_of_that_pod() {
    require_agent_or_skip!();
    with_world(World::builder(world_name!()).nodes(1), |world| {
        let node = world.node(0);
        let (client_pod, target) = (world.pod(0, 0), world.pod(0, 1));
        let target_name = target.name();
        // Nothing listens on port 9 in the target pod: every SYN the agent
        // sends there is dropped (no socket) and answered with a reset.
        let dst = format!("{}:9", target.ip());
        const ATTEMPTS: u64 = 3;
        for _ in 0..ATTEMPTS {
            let r = client(client_pod, &["--connect", &dst, "--timeout", "5s"])?;
            ensure!(r["error"].is_string(), "connecting to {dst} worked? {r}");
        }
        let labels = [("reason", "NO_SOCKET"), ("pod", target_name)];
        eventually(DEFAULT_PATIENCE, || {
            let drops = metric(node, DROPS, &labels)?;
            let sent = metric(node, RESETS, &[("pod", target_name), ("direction", "sent")])?;
            // The agent dials as the client pod (in its network namespace),
            // so the kernel counts the reset its socket received there.
            let received = metric(
                node,
                RESETS,
                &[("pod", client_pod.name()), ("direction", "received")],
            )?;
            ensure!(
                drops == ATTEMPTS as f64 && sent == ATTEMPTS as f64 && received >= ATTEMPTS as f64,
                "{ATTEMPTS} refused connections: drops {drops}, resets sent by the pod {sent}, received by the client pod {received}"
            );
            Ok(())
        })?;
        // The client pod dropped nothing for lack of a socket.
        ensure!(
            metric(
                node,
                DROPS,
                &[("reason", "NO_SOCKET"), ("pod", client_pod.name())]
            )? == 0.0
        );

        // The CLI's table and JSON say the same.
        let report = drops_json(node, &["--window", "10m"])?;
        let entry = pod_entry(&report, target_name)?;
        ensure!(reason_count(entry, "NO_SOCKET") == ATTEMPTS, "{report}");
        ensure!(entry["resets_sent"] == ATTEMPTS, "{report}");
        let table = waymark(node, &["drops", "--pod", target_name])?;
        ensure!(
            table.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols == [target_name, "NO_SOCKET", &ATTEMPTS.to_string()]
            }),
            "{table}"
        );
        ensure!(
            !table.contains(client_pod.name()),
            "--pod keeps one pod:\n{table}"
        );

        // `--follow` streams the drop and the reset with their flow. The
        // stream starts when the agent has the request, so provoke until
        // the events show up.
        let lines = follow(node)?;
        let deadline = Instant::now() + DEFAULT_PATIENCE;
        let (mut drop_seen, mut reset_seen) = (false, false);
        let mut seen = Vec::new();
        while !(drop_seen && reset_seen) {
            ensure!(
                Instant::now() < deadline,
                "no drop and reset events for {dst}; got: {seen:#?}"
            );
            client(client_pod, &["--connect", &dst, "--timeout", "5s"])?;
            while let Ok(line) = lines.recv_timeout(Duration::from_millis(500)) {
                let e: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
                if e["pod"] == target_name && e["reason"] == "NO_SOCKET" {
                    if e["kind"] == "drop" && e["dst"] == dst.as_str() && e["proto"] == "tcp" {
                        drop_seen = true;
                    }
                    if e["kind"] == "reset_sent" && e["src"] == dst.as_str() {
                        reset_seen = true;
                    }
                }
                seen.push(line);
            }
        }
        Ok(())
    });
}

#[test]
fn netfilter_drops_and_retransmits_count_for_the_pod() {
    require_agent_or_skip!();
    with_world(
        World::builder(world_name!()).nodes(2).pods_per_node(1),
        |world| {
            let node = world.node(0);
            let (pod, server) = (world.pod(0, 0), world.pod(1, 0));
            let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
            // The pod reaches the agent over its own loopback (the redirect
            // target). Dropping ~10% of what the pod sends there that
            // carries data makes the pod's socket retransmit, and both the
            // drops and the retransmits belong to the pod.
            nft_in(
                pod,
                &[
                    "add table inet wmtest;",
                    "add chain inet wmtest in { type filter hook input priority 0; policy accept; };",
                    "add rule inet wmtest in iifname lo tcp dport 15001 meta length > 100 numgen random mod 10 == 0 counter drop",
                ],
            )?;
            let bytes = 4_000_000.to_string();
            let target = format!("{}:7000", server.ip());
            let r = client(
                pod,
                &["--connect", &target, "--bytes", &bytes, "--timeout", "60s"],
            )?;
            ensure!(r["identical"] == true, "the echo through 10% loss: {r}");
            let dropped =
                counter_packets(&nft_in(pod, &["list", "chain", "inet", "wmtest", "in"])?)?;
            ensure!(dropped > 0, "the rule dropped nothing");

            let labels = [("reason", "NETFILTER_DROP"), ("pod", pod.name())];
            // Within 2% of the rule's own count (they count the same
            // packets; the margin is for nothing more than timing).
            let tolerance = (dropped as f64 * 0.02).max(1.0);
            eventually(DEFAULT_PATIENCE, || {
                let counted = metric(node, DROPS, &labels)?;
                ensure!(
                    (counted - dropped as f64).abs() <= tolerance,
                    "the rule dropped {dropped} packets, the agent counted {counted}"
                );
                Ok(())
            })?;
            let retransmits = metric(node, RETRANSMITS, &[("pod", pod.name())])?;
            ensure!(
                retransmits >= 1.0,
                "{dropped} data packets dropped but no retransmit counted"
            );
            // Nothing of this is the other pod's or the node's.
            let server_drops = metric(world.node(1), DROPS, &[("reason", "NETFILTER_DROP")])?;
            ensure!(
                server_drops == 0.0,
                "node1 counted {server_drops} netfilter drops"
            );

            let report = drops_json(node, &["--window", "1m", "--pod", pod.name()])?;
            let entry = pod_entry(&report, pod.name())?;
            let shown = reason_count(entry, "NETFILTER_DROP");
            ensure!(
                (shown as f64 - dropped as f64).abs() <= tolerance,
                "waymark drops shows {shown}, the rule dropped {dropped}: {report}"
            );
            ensure!(entry["retransmits"].as_u64() >= Some(1), "{report}");
            Ok(())
        },
    );
}

#[test]
fn bytes_per_pod_match_a_known_transfer() {
    require_agent_or_skip!();
    with_world(
        World::builder(world_name!()).nodes(2).pods_per_node(1),
        |world| {
            let (client_pod, server) = (world.pod(0, 0), world.pod(1, 0));
            let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
            let series = |node: &Node, pod: &Pod| -> Result<[f64; 4]> {
                let m = |name, dir| metric(node, name, &[("pod", pod.name()), ("direction", dir)]);
                Ok([
                    m(BYTES, "in")?,
                    m(BYTES, "out")?,
                    m(PACKETS, "in")?,
                    m(PACKETS, "out")?,
                ])
            };
            let before = [
                series(world.node(0), client_pod)?,
                series(world.node(1), server)?,
            ];
            const N: u64 = 4_000_000;
            let target = format!("{}:7000", server.ip());
            let r = client(
                client_pod,
                &[
                    "--connect",
                    &target,
                    "--bytes",
                    &N.to_string(),
                    "--timeout",
                    "60s",
                ],
            )?;
            ensure!(r["identical"] == true, "{r}");
            // Both ends' sockets sent and received N bytes of payload; the
            // counters add IP and TCP headers and acknowledgements: a few
            // percent, never less than the payload.
            for (i, (node, pod)) in [(world.node(0), client_pod), (world.node(1), server)]
                .into_iter()
                .enumerate()
            {
                eventually(DEFAULT_PATIENCE, || {
                    let now = series(node, pod)?;
                    let d: Vec<f64> = now.iter().zip(before[i]).map(|(a, b)| a - b).collect();
                    for (what, bytes) in [("in", d[0]), ("out", d[1])] {
                        ensure!(
                            bytes >= N as f64 && bytes <= N as f64 * 1.10,
                            "{} bytes {what}: {bytes}, transferred {N}",
                            pod.name()
                        );
                    }
                    ensure!(d[2] >= 1.0 && d[3] >= 1.0, "{} packets {d:?}", pod.name());
                    Ok(())
                })?;
            }
            Ok(())
        },
    );
}

#[test]
fn a_trace_shows_the_kernel_counts_of_its_upstream_flow() {
    require_agent_or_skip!();
    let services = format!(
        "[[services]]\nname = \"web\"\naddresses = [\"10.96.0.10:80\"]\nendpoints = [{{ addr = \"{}:8080\" }}]\n",
        pod_ip(1, 0)
    );
    let b = World::builder(world_name!())
        .nodes(2)
        .pods_per_node(1)
        .agent_config_extra(services);
    with_world(b, |world| {
        let (client_pod, server) = (world.pod(0, 0), world.pod(1, 0));
        let _app = http_app(server, 8080, "ok", &[])?;
        // Every other packet with data that reaches the server is dropped,
        // the first one included: the agent's upstream socket has to
        // retransmit the request.
        nft_in(
            server,
            &[
                "add table inet wmtest;",
                "add chain inet wmtest in { type filter hook input priority 0; policy accept; };",
                "add rule inet wmtest in tcp dport 8080 meta length > 100 numgen inc mod 2 == 0 counter drop",
            ],
        )?;
        // A tap of the same request reports the same flow's counters in its
        // `end` event.
        let node = world.node(0);
        let mut tap = node.spawn(
            Command::new(waymark_bin()?)
                .args(["tap", "--max", "1", "-o", "json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )?;
        let tap_out = tap.stdout.take().context("no tap stdout")?;
        eventually(DEFAULT_PATIENCE, || {
            let open = metric(node, "waymark_tap_streams", &[])?;
            ensure!(open == 1.0, "tap streams open: {open}");
            Ok(())
        })?;
        let out = client_pod.run_ok(Command::new("curl").args([
            "-sS",
            "-m",
            "20",
            "-X",
            "TRACE",
            "-H",
            "l5d-add-context: true",
            "http://10.96.0.10/x",
        ]))?;
        let line = out
            .lines()
            .find(|l| l.starts_with("kernel: "))
            .with_context(|| format!("no kernel line in the trace:\n{out}"))?;
        // "kernel: 0 drops, 1 retransmits on 10.0.0.1:40000→10.2.0.2:8080"
        let words: Vec<&str> = line.split_whitespace().collect();
        let retransmits: u64 = words.get(3).and_then(|w| w.parse().ok()).unwrap_or(0);
        ensure!(retransmits >= 1, "the request was retransmitted: {line}");
        let endpoint = format!("\u{2192}{}:8080", server.ip());
        ensure!(line.ends_with(&endpoint), "{line}");

        let end = BufReader::new(tap_out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .find(|e| e["type"] == "end")
            .context("the tap ended without an end event")?;
        let kernel = &end["kernel"];
        ensure!(
            kernel["retransmits"].as_u64().unwrap_or(0) >= 1
                && kernel["peer"] == format!("{}:8080", server.ip()),
            "the tap's end event must carry the upstream flow's kernel counters: {end}"
        );
        let _ = tap.wait();
        Ok(())
    });
}
