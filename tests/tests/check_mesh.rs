//! `waymark check` on mTLS worlds: the issuer and trust-anchor expiry
//! checks against a world CA made to expire in 10 days, and the `peers`
//! group, which has the agent probe every other node's agent over the
//! tunnel port (TCP connect + TLS 1.3 handshake verifying the node
//! identity): passing, failing while the peer agent is stopped, passing
//! again once it is back, and failing with a foreign trust anchor.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
use waymark_tests::world::agent::waymark_bin;
use waymark_tests::{
    Node, World, bpftool_missing, detach_link, eventually, require_agent_or_skip, with_world,
    world_name,
};

const DAY: Duration = Duration::from_secs(86_400);

/// `waymark check ARGS` in `node`'s namespace: (exit code, stdout).
fn check(node: &Node, args: &[&str]) -> Result<(i32, String)> {
    let admin = node.admin_socket().display().to_string();
    let out = node.run(
        Command::new(waymark_bin()?)
            .arg("check")
            .args(args)
            .args(["--admin", &admin]),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        !stdout.is_empty(),
        "waymark check {args:?} printed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), stdout))
}

/// The lines of the group named `name` (up to the blank line that ends it).
fn group<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    out.lines()
        .skip_while(|l| !l.starts_with(name))
        .skip(2)
        .take_while(|l| !l.is_empty())
        .collect()
}

/// An issuer that expires in 10 days fails `--expiry-days 30` with a ✖
/// naming it, when, and what to do; `--expiry-days 5` passes.
#[test]
fn check_flags_an_issuer_expiring_within_the_window() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(1)
        .mtls(true)
        .mtls_ca_lifetimes(Some(10 * DAY), Some(400 * DAY));
    with_world(b, |world| {
        let node = world.node(0);
        let (code, out) = check(node, &["--expiry-days", "30"])?;
        ensure!(
            code == 1,
            "an issuer expiring in 10 days passed --expiry-days 30:\n{out}"
        );
        let agent = group(&out, "agent (");
        let flagged: Vec<&&str> = agent.iter().filter(|l| l.starts_with("✖")).collect();
        ensure!(flagged.len() == 1, "exactly the issuer must fail:\n{out}");
        let line = flagged[0];
        ensure!(
            line.starts_with("✖ issuer \"")
                && line.contains("waymark development issuer")
                && line.contains("within --expiry-days 30"),
            "the ✖ line must name the issuer and the window: {line}\n{out}"
        );
        // "in 9.9 days" or "in 10.0 days", depending on the second.
        ensure!(
            line.contains(" in 9.9 days") || line.contains(" in 10.0 days"),
            "the ✖ line must say when: {line}"
        );
        ensure!(
            out.contains("hint: rotate the issuer") && out.contains("docs/mtls.md"),
            "the hint must say what to do:\n{out}"
        );
        ensure!(
            out.contains("✔ certificates: 2 valid"),
            "the leaves (node and pod) are fine:\n{out}"
        );
        ensure!(
            out.contains("Status check results are ✖ (1 failed)"),
            "{out}"
        );

        let (code, out) = check(node, &["--expiry-days", "5"])?;
        ensure!(
            code == 0,
            "an issuer expiring in 10 days failed --expiry-days 5:\n{out}"
        );
        ensure!(
            out.contains("✔ issuer and 1 trust anchor valid for more than 5 days"),
            "{out}"
        );

        // The same facts for scripts.
        let (_, json) = check(node, &["--expiry-days", "30", "-o", "json"])?;
        let report: serde_json::Value = serde_json::from_str(&json).context(json.clone())?;
        ensure!(report["ok"] == false, "{json}");
        Ok(())
    });
}

/// Two nodes with mTLS: node0's check reaches node1's agent; with node1's
/// agent stopped the peers group fails naming node1 and why; once it is
/// back the group passes again.
#[test]
fn check_probes_the_peer_agents() {
    require_agent_or_skip!();
    let b = meshed_pair(world_name!(), 1, &[]);
    with_world(b, |world| {
        let (n0, n1) = (world.node(0), world.node(1));
        let tunnel = format!("{}:15008", n1.fabric_ip());
        let (code, out) = check(n0, &[])?;
        ensure!(
            code == 0,
            "check failed on a healthy 2-node mTLS world:\n{out}"
        );
        let peers = group(&out, "peers");
        ensure!(
            peers.len() == 1
                && peers[0].starts_with(&format!(
                    "✔ node1 at {tunnel}: spiffe://cluster.local/ns/waymark-system/sa/node1 in "
                ))
                && peers[0].ends_with(" ms"),
            "the peers group must show node1 verified, with its time:\n{out}"
        );

        let status = n1.stop_agent(Signal::SIGTERM)?;
        ensure!(status.success(), "node1's agent exited with {status}");
        let (code, out) = check(n0, &[])?;
        ensure!(code == 1, "check passed with node1's agent stopped:\n{out}");
        let peers = group(&out, "peers");
        ensure!(
            peers.first() == Some(&format!("✖ node1 at {tunnel}: refused").as_str()),
            "the peers group must name node1 and the reason:\n{out}"
        );
        ensure!(
            out.contains("hint: is the agent running on node1?"),
            "{out}"
        );
        ensure!(
            out.contains("Status check results are ✖ (1 failed)"),
            "only the peer may fail:\n{out}"
        );

        n1.start_agent().context("restarting node1's agent")?;
        eventually(Duration::from_secs(20), || {
            let (code, out) = check(n0, &[])?;
            ensure!(code == 0, "{out}");
            ensure!(group(&out, "peers")[0].starts_with("✔ node1 at"), "{out}");
            Ok(())
        })
        .context("check after node1's agent came back")?;
        Ok(())
    });
}

/// A peer agent whose certificates chain to another trust anchor is
/// reachable over TCP but fails the handshake: the group says so.
#[test]
fn check_names_a_peer_with_a_foreign_trust_anchor() {
    require_agent_or_skip!();
    let b = meshed_pair(world_name!(), 1, &[]).mtls_foreign_anchor(1);
    with_world(b, |world| {
        let n0 = world.node(0);
        let (code, out) = check(n0, &[])?;
        ensure!(
            code == 1,
            "check passed against a foreign trust anchor:\n{out}"
        );
        let peers = group(&out, "peers");
        ensure!(
            peers
                .first()
                .is_some_and(|l| l.starts_with("✖ node1 at") && l.ends_with(": unknown_ca")),
            "the peers group must name node1 and unknown_ca:\n{out}"
        );
        ensure!(out.contains("hint: do the trust anchors match?"), "{out}");
        Ok(())
    });
}

/// `waymark stat -o json` on `node`: the MESHED value of each row.
fn meshed(node: &Node, args: &[&str]) -> Result<Vec<(String, String)>> {
    let admin = node.admin_socket().display().to_string();
    let out = node.run_ok(
        Command::new(waymark_bin()?)
            .arg("stat")
            .args(args)
            .args(["-o", "json", "--admin", &admin]),
    )?;
    let report: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    Ok(report["rows"]
        .as_array()
        .context(out.clone())?
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                r["meshed"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect())
}

/// MESHED counts pods whose traffic waymark proxies: node0's pod while
/// the programs are attached (`1/1`), not once connect4 is detached
/// (`0/1`); the service counts its local pod, the pod on node1 (a peer
/// agent terminates the tunnel) and not an address that is no pod.
#[test]
fn stat_meshed_counts_the_pods_waymark_proxies() {
    require_agent_or_skip!();
    if bpftool_missing("stat_meshed_counts_the_pods_waymark_proxies") {
        return;
    }
    let web = Service::new("web", "10.96.0.60:80").endpoints([
        Endpoint::pod(0, 0, 8080),
        Endpoint::meshed(1, 0, 8080),
        Endpoint::at("10.99.0.1:8080"),
    ]);
    let b = meshed_pair(world_name!(), 1, &[web]);
    with_world(b, |world| {
        let n0 = world.node(0);
        let row = |rows: &[(String, String)], name: &str| {
            rows.iter()
                .find(|(n, _)| n == name)
                .map(|(_, m)| m.clone())
                .with_context(|| format!("no row {name}: {rows:?}"))
        };
        let pod = world.pod(0, 0).name().to_string();
        ensure!(row(&meshed(n0, &["pod"])?, &pod)? == "1/1");
        let svc = meshed(n0, &[])?;
        ensure!(row(&svc, "web")? == "2/3", "{svc:?}");

        detach_link(n0, "cgroup_inet4_connect")?;
        let pods = meshed(n0, &["pod"])?;
        ensure!(
            row(&pods, &pod)? == "0/1",
            "a detached pod counted as meshed: {pods:?}"
        );
        let svc = meshed(n0, &[])?;
        ensure!(row(&svc, "web")? == "1/3", "{svc:?}");
        Ok(())
    });
}
