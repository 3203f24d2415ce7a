//! End-to-end test of the tunnel pool surviving a peer agent's restart: the
//! pooled HTTP/2-over-TLS connection to node 1's agent dies with it, the
//! requests sent while it is down get the proxy's own attributable error
//! (not a hang, not an application error), and once it is back new requests
//! go through a fresh tunnel connection. Real agents with `.mtls(true)`,
//! the test application (testpeer http), curl client.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
use waymark_tests::{
    Pod, Server, World, WorldBuilder, curl_i, eventually, http_app, metric, require_agent_or_skip,
    with_world, world_name,
};

const VIP: &str = "10.96.0.50:80";

/// The test application answering `ok <path>`.
fn app(pod: &Pod) -> Result<Server> {
    http_app(pod, 8080, "ok", &[])
}

/// Two nodes with mTLS, one pod each; the service `web` at VIP is served
/// by node 1's pod.
fn world(name: &str) -> WorldBuilder {
    let web = Service::new("web", VIP)
        .protocol("http1")
        .endpoint(Endpoint::meshed(1, 0, 8080));
    meshed_pair(name, 1, &[web])
}

/// One GET from `pod`: (status, headers and body).
fn get(pod: &Pod, path: &str) -> Result<(u16, String)> {
    curl_i(pod, &format!("http://{VIP}{path}"), &[])
}

#[test]
fn a_peer_agent_restart_is_survived_by_new_requests() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let (n0, n1, client) = (world.node(0), world.node(1), world.pod(0, 0));
        let _app = app(world.pod(1, 0))?;
        let opened = || {
            metric(
                n0,
                "waymark_tunnel_connections_total",
                &[("direction", "outbound")],
            )
        };

        let (code, text) = get(client, "/before")?;
        ensure!(code == 200 && text.contains("ok /before"), "{code} {text}");
        let first = opened()?;
        ensure!(first >= 1.0, "no tunnel connection was opened: {first}");

        // The peer agent goes away: its pods are still there, but nothing
        // answers on its tunnel port. The client gets the proxy's 502/503,
        // named as such, promptly.
        let status = n1.stop_agent(Signal::SIGTERM)?;
        ensure!(status.success(), "node1's agent exited with {status}");
        let (code, text) = get(client, "/during")?;
        ensure!(
            (code == 502 || code == 503) && text.to_lowercase().contains("l5d-proxy-error"),
            "with the peer agent down, expected the proxy's own error: {code} {text}"
        );

        // Back again: the dead pooled connection is replaced.
        n1.start_agent().context("restarting node1's agent")?;
        eventually(Duration::from_secs(20), || {
            let (code, text) = get(client, "/after")?;
            ensure!(code == 200 && text.contains("ok /after"), "{code} {text}");
            Ok(())
        })
        .context("requests after the peer agent came back")?;
        for i in 0..20 {
            let (code, text) = get(client, &format!("/again-{i}"))?;
            ensure!(code == 200, "request {i} after the restart: {code} {text}");
        }
        let now = opened()?;
        ensure!(
            now > first,
            "a new tunnel connection must have been opened after the restart ({first} -> {now})"
        );
        Ok(())
    });
}

/// A peer agent told to stop (SIGTERM) drains: the request in flight
/// through its tunnel is answered in full, the pooled keep-alive stream the
/// client agent holds is closed at once (not held until the grace runs
/// out), and the agent exits well before its grace.
#[test]
fn a_stopping_agent_drains_the_streams_in_flight() {
    require_agent_or_skip!();
    let b = world(world_name!()).agent_config_extra(
        r#"
[shutdown]
drain_grace = "40s"
"#,
    );
    with_world(b, |world| {
        let (n1, client) = (world.node(1), world.pod(0, 0));
        let app = app(world.pod(1, 0))?;
        let (code, text) = get(client, "/warm")?;
        ensure!(code == 200, "{code} {text}");

        std::thread::scope(|s| -> Result<()> {
            let slow = s.spawn(|| get(client, "/slow?sleep=3000"));
            eventually(Duration::from_secs(10), || {
                ensure!(app.lines().iter().any(|l| l.contains("/slow")));
                Ok(())
            })
            .context("the slow request did not reach the app")?;
            n1.signal_agent(Signal::SIGTERM)?;
            // The grace is 40 s: exiting within 20 means nothing waited
            // for it (the idle pooled stream was closed by the drain).
            let status = n1.wait_agent_exit(Duration::from_secs(20))?;
            ensure!(status.success(), "node1's agent exited with {status}");
            let (code, text) = slow.join().expect("the slow request's thread")?;
            ensure!(
                code == 200 && text.contains("ok /slow"),
                "the request in flight during the drain: {code} {text}"
            );
            Ok(())
        })?;
        let log = n1.agent_log();
        ensure!(
            log.contains("inbound tunnel listener closed for the drain")
                && !log.contains("drain grace period over"),
            "node1's agent log:\n{log}"
        );
        Ok(())
    });
}

/// `waymark check` on a node with mTLS judges the workload leaves the agent
/// holds: valid, rotated on time.
#[test]
fn check_judges_the_workload_certificates() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(2)
        .mtls(true);
    with_world(b, |world| {
        let node = world.node(0);
        let out = node.run(
            Command::new(waymark_tests::world::agent::waymark_bin()?).args([
                "check",
                "--admin",
                &node.admin_socket().display().to_string(),
            ]),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "check failed on a healthy mTLS node:\n{text}"
        );
        // Both pods' leaves and the agent's own (node identity).
        ensure!(
            text.contains("✔ certificates: 3 valid"),
            "the check must judge both pods' leaves and the node's:\n{text}"
        );
        Ok(())
    });
}

/// `waymark edges` says which edges the mTLS tunnel carried and with which
/// source identity.
#[test]
fn edges_show_the_tunnel_and_the_source_identity() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let (n0, client) = (world.node(0), world.pod(0, 0));
        let _app = app(world.pod(1, 0))?;
        for i in 0..10 {
            let (code, text) = get(client, &format!("/edge-{i}"))?;
            ensure!(code == 200, "{code} {text}");
        }
        let out = n0.run_ok(
            Command::new(waymark_tests::world::agent::waymark_bin()?).args([
                "edges",
                "-o",
                "json",
                "--admin",
                &n0.admin_socket().display().to_string(),
            ]),
        )?;
        let report: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
        let row = report["rows"]
            .as_array()
            .and_then(|rows| {
                rows.iter()
                    .find(|r| r["src"] == client.name() && r["dst"] == "web")
            })
            .with_context(|| format!("no edge from {} to web: {out}", client.name()))?;
        ensure!(
            row["tls"] == "true",
            "the tunnel carried every request: {row}"
        );
        let want = format!(
            "spiffe://cluster.local/ns/default/sa/{}",
            client.name().rsplit('/').next().unwrap_or_default()
        );
        ensure!(
            row["src_id"] == want.as_str(),
            "source identity {want}: {row}"
        );
        Ok(())
    });
}
