//! `[limits]` with real clients: the tunnel port resets connections beyond
//! `tunnel_max_handshakes` while the tunnel connections already up keep
//! carrying streams (openssl s_client, testpeer); a pod's HTTP/2 connection
//! is offered `h2_max_concurrent_streams` and a client that honours it is
//! served (nghttp, h2load); opaque and HTTP connections idle for
//! `idle_timeout` are closed and counted with their pod, and so are tunnel
//! connections between agents without a stream; h2 streams refused over
//! the limit are counted with the pod; a connection refused at
//! `outbound.max_connections_per_pod` reads `source=proxy reason=limit` in
//! tap and top, and never enters `waymark conns`; a pod opening
//! connections faster than `outbound.accept_rate_per_pod` waits, others do
//! not. They need root and eBPF;
//! see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair, services_toml};
use waymark_tests::support::open_files::AgentWithFiles;
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, Server, World, await_metric, eventually, http_app, metric,
    require_agent_or_skip, tap, tap_events, testpeer, waymark, with_world, world_name,
};

const VIP: &str = "10.96.0.60:80";

fn app(pod: &Pod) -> Result<Server> {
    http_app(pod, 8080, "app", &[])
}

/// `web` at [`VIP`]: the test application in pod 1 of a one-node world,
/// which the agent reaches directly.
fn local_web() -> Service {
    Service::new("web", VIP)
        .protocol("http1")
        .endpoint(Endpoint::pod(0, 1, 8080))
}

/// `testpeer client` from `pod` to `addr` through the agents; the echo must
/// come back whole.
fn echo_ok(pod: &Pod, addr: &str) -> Result<()> {
    let out = pod.run(&mut testpeer([
        "client",
        "--connect",
        addr,
        "--bytes",
        "2000",
        "--timeout",
        "10s",
    ]))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    ensure!(report["identical"] == true, "{report}");
    Ok(())
}

/// `openssl s_client` from `node` to `addr`: its stdout and stderr.
fn s_client(node: &Node, addr: &str) -> Result<String> {
    let out = node.run(
        Command::new("timeout").args(["10", "openssl", "s_client", "-connect", addr, "-tls1_3"]),
    )?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

const TOO_MANY: [(&str, &str); 2] = [("direction", "inbound"), ("reason", "too_many_handshakes")];

/// Two connections that never send a ClientHello hold node 1's two
/// handshake slots: a third connection is reset before any TLS (s_client
/// sees no certificate) and counted, while a pod's traffic over the tunnel
/// connection already up still flows. Once the slots are free, a handshake
/// gets as far as the server's certificate again.
#[test]
fn tunnel_handshakes_beyond_the_cap_are_reset_and_the_data_path_flows() {
    require_agent_or_skip!();
    let echo = Service::new("echo", "10.96.0.61:7000")
        .protocol("opaque")
        .endpoint(Endpoint::meshed(1, 0, 7000));
    let b = meshed_pair(world_name!(), 1, &[echo]).agent_config_extra(
        r#"
[limits]
tunnel_max_handshakes = 2
[inbound]
handshake_timeout = "60s"
"#,
    );
    with_world(b, |world| {
        let (n0, n1) = (world.node(0), world.node(1));
        let server = world.pod(1, 0);
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let target = "10.96.0.61:7000";
        let tunnel = format!("{}:15008", n1.fabric_ip());
        // The pool's tunnel connection from node 0 to node 1 is up.
        echo_ok(world.pod(0, 0), target)?;
        ensure!(
            metric(
                n1,
                "waymark_tunnel_streams_total",
                &[("direction", "inbound")]
            )? >= 1.0,
            "the first echo must have crossed the tunnel"
        );

        let stalled: Vec<TcpStream> = (0..2)
            .map(|_| n0.tcp_connect(tunnel.parse()?, Duration::from_secs(2)))
            .collect::<Result<_>>()?;
        eventually(DEFAULT_PATIENCE, || {
            let text = s_client(n0, &tunnel)?;
            ensure!(
                !text.contains("Server certificate"),
                "a handshake beyond the cap got a certificate:\n{text}"
            );
            ensure!(
                metric(n1, "waymark_tunnel_handshake_failures_total", &TOO_MANY)? >= 1.0,
                "not counted yet; s_client said:\n{text}"
            );
            Ok(())
        })?;
        // The data path does not wait for handshakes.
        echo_ok(world.pod(0, 0), target)?;

        drop(stalled);
        eventually(DEFAULT_PATIENCE, || {
            let text = s_client(n0, &tunnel)?;
            ensure!(
                text.contains("Server certificate"),
                "with the slots free the server must present its certificate:\n{text}"
            );
            Ok(())
        })?;
        Ok(())
    });
}

/// A pod's HTTP/2 connection is offered `h2_max_concurrent_streams` in the
/// agent's SETTINGS, and h2load keeping within it gets every one of 200
/// requests answered. (A client that opens more before it has read the
/// SETTINGS, as h2load `-m 50` does, has the excess refused with
/// REFUSED_STREAM by the h2 layer.)
#[test]
fn a_pods_h2_connection_is_offered_the_configured_streams() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(2)
        .agent_config_extra(services_toml(&[local_web()]))
        .agent_config_extra("[limits]\nh2_max_concurrent_streams = 7\n");
    with_world(b, |world| {
        let (client, server) = (world.pod(0, 0), world.pod(0, 1));
        let _app = app(server)?;
        let out = client.run_ok(Command::new("nghttp").args(["-v", &format!("http://{VIP}/")]))?;
        ensure!(
            out.contains("recv SETTINGS frame")
                && out.contains("[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7]"),
            "the agent must offer 7 streams:\n{out}"
        );
        let out = client.run_ok(Command::new("h2load").args([
            "-n",
            "200",
            "-c",
            "1",
            "-m",
            "7",
            &format!("http://{VIP}/"),
        ]))?;
        ensure!(
            out.contains("200 succeeded, 0 failed, 0 errored"),
            "h2load:\n{out}"
        );
        let refused = [("pod", client.name()), ("limit", "h2_streams")];
        ensure!(metric(world.node(0), "waymark_limit_refused_total", &refused)? == 0.0);
        // nghttp opens 40 streams in its first flight, before it has read
        // the SETTINGS that allow 7: h2 refuses the excess itself, and the
        // agent counts each refusal with the pod.
        let out = client.run(Command::new("nghttp").args([
            "-v",
            "-m",
            "40",
            &format!("http://{VIP}/"),
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let seen = text.matches("error_code=REFUSED_STREAM").count();
        ensure!(
            seen > 0,
            "nghttp was refused no stream, so the limit was not exercised:\n{text}"
        );
        await_metric(
            world.node(0),
            "waymark_limit_refused_total",
            &refused,
            seen as f64,
        )?;
        Ok(())
    });
}

/// Opaque connections and keep-alive HTTP connections that go quiet are
/// closed after `idle_timeout` and counted with their pod; tap shows the
/// opaque ones closed by the proxy for a limit.
#[test]
fn idle_connections_are_closed_and_counted_with_the_pod() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(2)
        .agent_config_extra(services_toml(&[local_web()]))
        .agent_config_extra("[limits]\nidle_timeout = \"2s\"\n");
    with_world(b, |world| {
        let node = world.node(0);
        let (client, server) = (world.pod(0, 0), world.pod(0, 1));
        let _app = app(server)?;
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let labels = [("pod", client.name()), ("limit", "idle_timeout")];
        ensure!(metric(node, "waymark_limit_closed_total", &labels)? == 0.0);
        // `hold` prints `holding …` once connected, no `listening` line.
        // The tap sees the five opaque ones closed by the proxy, for a limit.
        let opaque = format!("{}:7000", server.ip());
        let out = tap(node, &["--to", &opaque, "--max", "5", "-o", "json"], || {
            client.spawn(&mut testpeer([
                "hold",
                "--connect",
                &format!("{}:7000", server.ip()),
                "--count",
                "5",
                "--hold",
                "120s",
            ]))?;
            client.spawn(&mut testpeer([
                "hold",
                "--connect",
                VIP,
                "--count",
                "5",
                "--http",
                "--hold",
                "120s",
            ]))?;
            Ok(())
        })?;
        let events = tap_events(&out)?;
        ensure!(
            events.len() == 5
                && events.iter().all(|e| e["type"] == "tcp"
                    && e["close"] == "idle_timeout"
                    && e["source"] == "proxy"
                    && e["reason"] == "limit"
                    && e["error"] == "no byte either way for 2s (limits.idle_timeout)"),
            "{out}"
        );
        eventually(DEFAULT_PATIENCE, || {
            let closed = metric(node, "waymark_limit_closed_total", &labels)?;
            ensure!(closed == 10.0, "{closed} of 10 idle connections closed");
            Ok(())
        })?;
        Ok(())
    });
}

/// A connection over the pod's connection limit is refused by the proxy,
/// and the operator's tools say so: tap shows it as a `tcp` event with
/// `close=refused source=proxy reason=limit`, top counts it as a
/// `proxy:limit` failure, a trace from the pod fails naming the limit, and
/// `waymark conns` lists only the connections the pod holds.
#[test]
fn a_connection_refused_at_a_limit_reads_source_proxy_reason_limit() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(2)
        .agent_config_extra("[outbound]\nmax_connections_per_pod = 2\n");
    with_world(b, |world| {
        let node = world.node(0);
        let (client, server) = (world.pod(0, 0), world.pod(0, 1));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let dst = format!("{}:7000", server.ip());
        let _held = client.serve_until(
            &mut testpeer(["hold", "--connect", &dst, "--count", "2", "--hold", "120s"]),
            "holding 2 failed 0",
            Duration::from_secs(20),
        )?;
        let refused = || -> Result<()> {
            let out = client.run(&mut testpeer([
                "client",
                "--connect",
                &dst,
                "--bytes",
                "10",
                "--timeout",
                "5s",
            ]))?;
            ensure!(!out.status.success(), "a third connection went through");
            Ok(())
        };
        let out = tap(
            node,
            &["--from", client.name(), "--max", "1", "-o", "json"],
            refused,
        )?;
        let events = tap_events(&out)?;
        ensure!(events.len() == 1, "{out}");
        let e = &events[0];
        ensure!(
            e["type"] == "tcp"
                && e["close"] == "refused"
                && e["source"] == "proxy"
                && e["reason"] == "limit"
                && e["dst"]["addr"] == dst.as_str()
                && e["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("outbound.max_connections_per_pod")),
            "{e}"
        );
        // Who in the pod hit the limit, where the kernel tells cgroup
        // programs (6.1 and later): the client's process and thread.
        if kernel_at_least(6, 1) {
            let error = e["error"].as_str().unwrap_or_default();
            ensure!(
                error.contains("(connect() by pid ") && error.ends_with(", thread testpeer)"),
                "{e}"
            );
        }
        let out = tap(node, &["--from", client.name(), "--max", "1"], refused)?;
        ensure!(
            out.lines().any(|l| l.starts_with("tcp ")
                && l.contains(" close=refused source=proxy reason=limit ")),
            "{out}"
        );
        let top = std::thread::scope(|s| -> Result<String> {
            let cli = s.spawn(|| {
                node.run_ok(waymark().args([
                    "top",
                    "--from",
                    client.name(),
                    "--duration",
                    "5s",
                    "-o",
                    "json",
                ]))
            });
            waymark_tests::await_metric(node, "waymark_tap_streams", &[], 1.0)?;
            refused()?;
            cli.join().expect("the top thread")
        })?;
        let top: serde_json::Value = serde_json::from_str(&top).with_context(|| top.clone())?;
        let row = top["rows"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["method"] == "TCP"))
            .with_context(|| format!("no TCP row: {top}"))?;
        ensure!(
            row["failure_sources"] == serde_json::json!({"proxy:limit": 1}),
            "{top}"
        );
        // A trace from the pod cannot get a hop's block (the connection is
        // reset before any HTTP); the CLI says why from the agent's table.
        let out =
            node.run(waymark().args(["trace", &format!("http://{dst}/"), "--pod", client.name()]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains(&format!(
                    "source=proxy reason=limit: pod {} holds 2 connections through the agent and outbound.max_connections_per_pod is 2",
                    client.name()
                )),
            "{stderr}"
        );
        let (status, body) = node.admin_socket_get(&format!("/conns?pod={}", client.name()))?;
        let conns: serde_json::Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        ensure!(
            status == 200
                && conns["connections"].as_array().map(Vec::len) == Some(2)
                && conns["connections"]
                    .as_array()
                    .is_some_and(|c| c.iter().all(|c| c["dst"] == dst.as_str())),
            "{body}"
        );
        // What the kernel's refusals go by: the pod's redirected sockets.
        ensure!(
            conns["pod_sockets"] == serde_json::json!({ client.name(): 2 }),
            "{body}"
        );
        Ok(())
    });
}

/// A pod opening connections faster than `outbound.accept_rate_per_pod`
/// is slowed down, not refused: past its burst, its connections wait in its
/// own listener's queue and are all taken at the rate, each wait counted
/// with the pod; another pod's connection made meanwhile is served at once,
/// while the first pod still has connections waiting.
#[test]
fn a_pod_opening_connections_too_fast_waits_and_other_pods_do_not() {
    require_agent_or_skip!();
    const COUNT: usize = 60;
    const BURST: usize = 5;
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(3)
        .agent_config_extra(format!(
            "[outbound]\naccept_rate_per_pod = 20\naccept_burst_per_pod = {BURST}\n"
        ));
    with_world(b, |world| {
        let node = world.node(0);
        let (noisy, quiet, server) = (world.pod(0, 0), world.pod(0, 1), world.pod(0, 2));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let dst = format!("{}:7000", server.ip());
        let delayed = |pod: &Pod| {
            metric(
                node,
                "waymark_limit_delayed_total",
                &[("pod", pod.name()), ("limit", "accept_rate")],
            )
        };
        let held = |pod: &Pod| -> Result<usize> {
            let (status, body) = node.admin_socket_get(&format!("/conns?pod={}", pod.name()))?;
            ensure!(status == 200, "{status} {body}");
            let v: serde_json::Value = serde_json::from_str(&body).with_context(|| body.clone())?;
            v["connections"]
                .as_array()
                .map(Vec::len)
                .with_context(|| body.clone())
        };
        // The kernel completes the pod's connects (they sit in the
        // listener's queue), so `hold` reports them all held at once.
        let _held = noisy.serve_until(
            &mut testpeer([
                "hold",
                "--connect",
                &dst,
                "--count",
                &COUNT.to_string(),
                "--concurrency",
                &COUNT.to_string(),
                "--hold",
                "120s",
            ]),
            &format!("holding {COUNT} failed 0"),
            Duration::from_secs(30),
        )?;
        eventually(DEFAULT_PATIENCE, || {
            ensure!(
                delayed(noisy)? > 0.0,
                "no connection of the noisy pod waited yet"
            );
            Ok(())
        })?;
        echo_ok(quiet, &dst)?;
        let noisy_taken = held(noisy)?;
        ensure!(
            noisy_taken < COUNT,
            "the quiet pod's connection was served only after all {COUNT} of the noisy pod's: the agent took {noisy_taken}"
        );
        // Every one is taken in the end, none refused.
        eventually(Duration::from_secs(30), || {
            let n = held(noisy)?;
            ensure!(
                n == COUNT,
                "the agent holds {n} of the noisy pod's {COUNT} connections"
            );
            Ok(())
        })?;
        let waited = delayed(noisy)?;
        ensure!(
            waited >= (COUNT - BURST) as f64 / 2.0 && waited <= (COUNT - BURST) as f64,
            "{waited} of the noisy pod's connections waited; {COUNT} opened at once with a burst of {BURST}"
        );
        ensure!(delayed(quiet)? == 0.0, "the quiet pod's connection waited");
        let refused = metric(
            node,
            "waymark_outbound_refused_total",
            &[("pod", noisy.name()), ("limit", "pod_connections")],
        )?;
        ensure!(refused == 0.0, "{refused} refused");
        ensure!(
            node.agent_log()
                .contains(&format!("pod={} per_second=20 burst={BURST}", noisy.name()))
                && node
                    .agent_log()
                    .contains("faster than outbound.accept_rate_per_pod"),
            "the wait is not logged with the pod"
        );
        Ok(())
    });
}

/// A tunnel connection between agents that carries no stream for
/// `idle_timeout` is closed by the receiving agent with a GOAWAY and
/// counted; the next connection through the tunnel opens a new one.
#[test]
fn idle_tunnel_connections_are_closed_and_counted() {
    require_agent_or_skip!();
    let echo = Service::new("echo", "10.96.0.62:7000")
        .protocol("opaque")
        .endpoint(Endpoint::meshed(1, 0, 7000));
    let b = meshed_pair(world_name!(), 1, &[echo])
        .agent_config_extra("[limits]\nidle_timeout = \"2s\"\n");
    with_world(b, |world| {
        let n1 = world.node(1);
        let _echo = world
            .pod(1, 0)
            .serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let idle = [("direction", "inbound"), ("reason", "idle_timeout")];
        let connections = |n: &Node| {
            metric(
                n,
                "waymark_tunnel_connections_total",
                &[("direction", "inbound")],
            )
        };
        ensure!(metric(n1, "waymark_tunnel_closed_total", &idle)? == 0.0);
        echo_ok(world.pod(0, 0), "10.96.0.62:7000")?;
        let before = connections(n1)?;
        ensure!(before >= 1.0, "the echo crossed no tunnel connection");
        await_metric(n1, "waymark_tunnel_closed_total", &idle, 1.0)?;
        // The closed connection is not reused (the stream would fail): a
        // new one carries the next.
        echo_ok(world.pod(0, 0), "10.96.0.62:7000")?;
        ensure!(
            connections(n1)? > before,
            "no new tunnel connection after the idle one was closed"
        );
        Ok(())
    });
}

/// Counts the log lines of `log` (from byte `from`) that contain `what`.
fn lines_with(log: &str, from: usize, what: &str) -> usize {
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

/// With its descriptors used up (an agent held to 400 open files, soft and
/// hard, so it cannot raise them), every accept loop — the pods' listener,
/// the tunnel port, the admin TCP port and the admin socket — fails with
/// `EMFILE` and backs off (50 ms) instead of spinning on a connection
/// waiting in its backlog: at most a few dozen failures per loop in two
/// seconds, where a spinning loop logs thousands. Once the pod lets its
/// connections go, the agent serves again: admin socket and new
/// connections.
#[test]
fn accept_loops_back_off_when_descriptors_run_out() {
    require_agent_or_skip!();
    let wrapper = AgentWithFiles::new(400).unwrap_or_else(|e| panic!("{e:#}"));
    let b = meshed_pair(world_name!(), 2, &[])
        .agent_bin(wrapper.path())
        .agent_config_extra(
            "[outbound]\nmax_connections = 100000\nmax_connections_per_pod = 100000\n\
             [limits]\nconnection_descriptors = 0\n\
             [proxy]\nopaque_ports = [7000]\n",
        );
    with_world(b, |world| {
        let (node, greedy, other) = (world.node(0), world.pod(0, 0), world.pod(0, 1));
        let server = world.pod(1, 0);
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let echo = format!("{}:7000", server.ip());
        echo_ok(other, &echo)?;
        // 600 connections: each proxied one costs the agent two files, so
        // the rest wait in the pod listener's backlog.
        let _held = greedy.serve_until(
            &mut testpeer([
                "hold",
                "--connect",
                &echo,
                "--count",
                "600",
                "--hold",
                "300s",
            ]),
            "holding ",
            Duration::from_secs(60),
        )?;
        eventually(DEFAULT_PATIENCE, || {
            let log = node.agent_log();
            ensure!(
                log.contains("accept failed") && log.contains("Too many open files"),
                "the pods' listener has not hit EMFILE yet"
            );
            Ok(())
        })?;
        // Then wait for the pod listener's loop to fail steadily. Two steady
        // states are possible, depending on whether the descriptors left
        // after the last proxied connection (two each) are even or odd:
        // none left, and every accept fails; or one left, and the loop
        // takes turns: an accept fails, the next one gets the descriptor,
        // the connection's upstream connect fails for want of another, its
        // close frees it again. Either way the loop fails at least every
        // other turn, each failure followed by the 50 ms back-off: several
        // failures within a second.
        eventually(DEFAULT_PATIENCE, || {
            let from = node.agent_log().len();
            std::thread::sleep(Duration::from_millis(1000));
            let n = lines_with(
                &node.agent_log(),
                from,
                "WARN waymark_agent::proxy::outbound: accept failed",
            );
            ensure!(
                n >= 4,
                "{n} failed accepts of the pod listener in 1 s: not out of descriptors yet"
            );
            Ok(())
        })?;
        // Connections waiting on each of the other listeners: several, so
        // that one the agent manages to accept (a descriptor it freed for
        // an instant) leaves others waiting and its loop failing.
        let start = node.agent_log().len();
        let tunnel: std::net::SocketAddr = format!("{}:15008", node.fabric_ip()).parse()?;
        let mut waiting = Vec::new();
        let mut waiting_unix = Vec::new();
        for _ in 0..4 {
            waiting.push(node.tcp_connect(tunnel, Duration::from_secs(2))?);
            waiting.push(node.tcp_connect(node.admin_addr(), Duration::from_secs(2))?);
            waiting_unix.push(std::os::unix::net::UnixStream::connect(
                node.admin_socket(),
            )?);
        }
        std::thread::sleep(Duration::from_millis(500));
        let from = node.agent_log().len();
        std::thread::sleep(Duration::from_secs(2));
        let log = node.agent_log();
        for what in [
            "WARN waymark_agent::proxy::outbound: accept failed",
            "tunnel accept failed",
            "admin accept failed",
            "admin socket accept failed",
        ] {
            let n = lines_with(&log, from, what);
            let all = lines_with(&log, start, what);
            eprintln!("{what:?}: {n} lines in 2 s, {all} since the connections were opened");
            ensure!(
                all >= 1,
                "the loop never failed ({what:?}): it was not exercised"
            );
            ensure!(
                n <= 80,
                "{n} lines of {what:?} in 2 s: the loop must fail and back off (50 ms), not spin"
            );
        }
        drop(waiting);
        drop(waiting_unix);
        drop(_held);
        eventually(DEFAULT_PATIENCE, || {
            let (status, _) = node.admin_socket_get("/config")?;
            ensure!(status == 200, "admin socket answered {status}");
            echo_ok(other, &echo)
        })?;
        Ok(())
    });
}

/// With the limits left unset, one pod cannot run the agent out of
/// descriptors: an agent held to 3,072 open files takes 1,024 connections
/// (two descriptors each, past 1,024 kept back) and a pod half of them, so
/// a pod opening 1,800 holds 512 and the rest are refused and counted with
/// the pod, no accept ever fails, and another pod still opens its
/// connections and is served. Before the derived bounds counted
/// descriptors, the agent took the pod's connections until `EMFILE` and the
/// other pod's new connections waited in its listener's queue. The
/// refusals happen in the kernel, at `connect()` (`ECONNREFUSED`, before a
/// SYN): all but the few that two CPUs let through at once, which the agent
/// resets at accept.
#[test]
fn with_the_default_limits_one_pod_cannot_use_up_the_agents_descriptors() {
    require_agent_or_skip!();
    let wrapper = AgentWithFiles::new(3072).unwrap_or_else(|e| panic!("{e:#}"));
    let b = World::builder(world_name!())
        .nodes(2)
        .pods_per_node(2)
        .agent_bin(wrapper.path());
    with_world(b, |world| {
        let (node, greedy, other) = (world.node(0), world.pod(0, 0), world.pod(0, 1));
        let server = world.pod(1, 0);
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let echo = format!("{}:7000", server.ip());
        eventually(DEFAULT_PATIENCE, || {
            ensure!(
                node.agent_log()
                    .contains("outbound connection limits per_pod=512 total=1024"),
                "the agent has not logged the limits it derived from 3,072 files"
            );
            Ok(())
        })?;
        let hold = |pod: &Pod, count: &str| {
            pod.serve_until(
                &mut testpeer([
                    "hold",
                    "--connect",
                    &echo,
                    "--count",
                    count,
                    "--hold",
                    "300s",
                ]),
                "holding ",
                Duration::from_secs(60),
            )
        };
        let open = |pod: &Pod| {
            metric(
                node,
                "tcp_open_connections",
                &[("direction", "outbound"), ("pod", pod.name())],
            )
        };
        // `/conns` says what the agent derived, for `waymark trace`.
        let (status, body) = node.admin_socket_get("/conns?direction=out")?;
        ensure!(status == 200, "/conns answered {status}: {body}");
        let report: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(
            report["limits"] == serde_json::json!({"per_pod": 512, "total": 1024}),
            "/conns reports the limits {}",
            report["limits"]
        );
        let mut greedy_client = hold(greedy, "1800")?;
        let refused = [("pod", greedy.name()), ("limit", "pod_connections")];
        await_metric(node, "waymark_outbound_refused_total", &refused, 1288.0)?;
        // "holding N failed M refused R": connects that succeeded (held, or
        // reset by the agent at accept), failed, and refused outright.
        let line = greedy_client.wait_line("holding ", Duration::from_secs(1))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> Result<usize> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .with_context(|| format!("testpeer hold said {line:?}"))
        };
        let (connected, failed, at_connect) = (n(1)?, n(3)?, n(5)?);
        ensure!(
            failed == at_connect && connected + at_connect == 1800,
            "every connect either succeeded or was refused: {line:?}"
        );
        ensure!(
            at_connect >= 1200,
            "only {at_connect} of the 1,288 refusals were made at connect(): {line:?}"
        );
        eventually(DEFAULT_PATIENCE, || {
            let n = open(greedy)?;
            ensure!(n == 512.0, "the greedy pod holds {n}");
            Ok(())
        })?;
        let _other = hold(other, "300")?;
        eventually(DEFAULT_PATIENCE, || {
            let n = open(other)?;
            ensure!(n == 300.0, "the other pod holds {n} of its 300");
            Ok(())
        })?;
        echo_ok(other, &echo)?;
        let log = node.agent_log();
        ensure!(
            !log.contains("accept failed") && !log.contains("Too many open files"),
            "the agent ran out of descriptors: {}",
            log.lines()
                .find(|l| l.contains("Too many open files") || l.contains("accept failed"))
                .unwrap_or_default()
        );
        let other_refused = metric(
            node,
            "waymark_outbound_refused_total",
            &[("pod", other.name())],
        )?;
        ensure!(
            other_refused == 0.0,
            "the other pod had {other_refused} refused"
        );
        Ok(())
    });
}

/// Pods' connections and the tunnel's inbound streams share one budget of
/// the agent's descriptors (`limits.connection_descriptors`): with 40 on
/// each agent, a pod of node 1 holding 15 connections through its agent
/// (two descriptors each) leaves 10 for streams from other nodes; a pod of
/// node 0 holds 10 through the tunnel, and then another pod's stream is
/// answered 503 and counted (`result="limited"`) while a new connection of
/// node 1's own pod is refused at accept (`limit="descriptors"`): neither
/// side can run the agent out of descriptors for the other. Let go, both
/// go through again.
#[test]
fn pods_connections_and_tunnel_streams_share_the_agents_descriptors() {
    require_agent_or_skip!();
    const ECHO: &str = "10.96.0.63:7000";
    let echo = Service::new("echo", ECHO)
        .protocol("opaque")
        .endpoint(Endpoint::meshed(1, 1, 7000));
    let b = meshed_pair(world_name!(), 2, &[echo]).agent_config_extra(
        "[limits]\nconnection_descriptors = 40\ntunnel_max_streams_per_peer = 100\n",
    );
    with_world(b, |world| {
        let n1 = world.node(1);
        let (remote, remote_other) = (world.pod(0, 0), world.pod(0, 1));
        let local = world.pod(1, 0);
        let _echo = world
            .pod(1, 1)
            .serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        ensure!(
            n1.agent_log()
                .contains("descriptors for connections and tunnel streams")
                && n1.agent_log().contains("budget=40"),
            "node 1's agent did not log its budget of 40"
        );
        let hold = |pod: &Pod, count: &str| {
            pod.serve_until(
                &mut testpeer([
                    "hold",
                    "--connect",
                    ECHO,
                    "--count",
                    count,
                    "--hold",
                    "300s",
                ]),
                "holding ",
                Duration::from_secs(30),
            )
        };
        let local_held = hold(local, "15")?;
        let open_local = || {
            metric(
                n1,
                "tcp_open_connections",
                &[("direction", "outbound"), ("pod", local.name())],
            )
        };
        eventually(DEFAULT_PATIENCE, || {
            let n = open_local()?;
            ensure!(n == 15.0, "node 1's pod holds {n} of 15");
            Ok(())
        })?;
        let streams = |result: &str| {
            metric(
                n1,
                "waymark_tunnel_streams_total",
                &[("direction", "inbound"), ("result", result)],
            )
        };
        let opened_before = streams("opened")?;
        let remote_held = hold(remote, "10")?;
        eventually(DEFAULT_PATIENCE, || {
            let n = streams("opened")? - opened_before;
            ensure!(n == 10.0, "{n} of node 0's 10 streams opened on node 1");
            Ok(())
        })?;
        ensure!(streams("limited")? == 0.0, "a stream was refused too early");
        // 30 + 10 of 40: nothing left for either side.
        ensure!(
            echo_ok(remote_other, ECHO).is_err(),
            "a stream went through with every descriptor held"
        );
        await_metric(
            n1,
            "waymark_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "limited")],
            1.0,
        )?;
        ensure!(
            echo_ok(local, ECHO).is_err(),
            "node 1's pod opened a connection with every descriptor held"
        );
        await_metric(
            n1,
            "waymark_outbound_refused_total",
            &[("pod", local.name()), ("limit", "descriptors")],
            1.0,
        )?;
        drop(remote_held);
        drop(local_held);
        eventually(DEFAULT_PATIENCE, || {
            echo_ok(remote_other, ECHO)?;
            echo_ok(local, ECHO)
        })?;
        Ok(())
    });
}

/// Whether the running kernel is `major.minor` or later.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}
