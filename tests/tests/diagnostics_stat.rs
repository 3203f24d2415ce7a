//! End-to-end tests of the agent's sliding-window golden metrics (`/stat`,
//! `/routes`, `/edges` and `waymark stat`/`routes`/`edges`) against a known
//! load, the exact counts of `/metrics` for the same traffic, and
//! `waymark check` on a healthy node and on one whose programs were
//! detached behind the agent's back. Real agents, the test application, curl
//! and testpeer in pods; see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, services_toml};
use waymark_tests::world::agent::waymark_bin;
use waymark_tests::{
    Node, Pod, Server, World, bpftool_missing, cgroup_links, curl_codes, detach_link, http_app,
    metric, require_agent_or_skip, testpeer, with_world, world_name,
};

const VIP: &str = "10.96.0.10:80";

/// The test application: `/fail…` answers 500, `/slow/50` 200 after
/// 50 ms, anything else 200; `extra` are more of its flags. It prints
/// `req <k> <method> <path> <status>` per request.
fn app(pod: &Pod, extra: &[&str]) -> Result<Server> {
    http_app(pod, 8080, "web", extra)
}

/// Service `web` on [`VIP`], served by pod 0 of node 1, with routes `slow`
/// and `fail` (which retries twice on 5xx); other paths take `[DEFAULT]`.
fn web() -> Service {
    Service::new("web", VIP)
        .endpoint(Endpoint::pod(1, 0, 8080))
        .route(
            r#"name = "slow"
matches = [{ path = { prefix = "/slow" } }]"#,
        )
        .route(
            r#"name = "fail"
matches = [{ path = { prefix = "/fail" } }]
retry = { attempts = 2, on = ["5xx"], backoff_base = "5ms", backoff_max = "10ms" }"#,
        )
}

fn urls(path: &str, n: u32) -> Vec<String> {
    (1..=n)
        .map(|i| format!("http://{VIP}{path}?i={i}"))
        .collect()
}

/// `GET path` on the node's admin API, as JSON.
fn admin_json(node: &Node, path: &str) -> Result<Value> {
    match node.admin_socket_get(path)? {
        (200, body) => serde_json::from_str(&body).with_context(|| format!("{path}: {body}")),
        (status, body) => bail!("GET {path}: {status} {body}"),
    }
}

/// The row of `report["rows"]` whose `key` is `value`.
fn row<'a>(report: &'a Value, key: &str, value: &str) -> Result<&'a Value> {
    report["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r[key] == value))
        .with_context(|| format!("no row with {key}={value} in {report:#}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(u64::MAX)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Runs `waymark ARGS…` on `node` (its netns, so the CLI reaches the
/// agent's loopback admin API); returns the exit status and stdout.
fn waymark(node: &Node, args: &[&str]) -> Result<(i32, String)> {
    let out = node.run(Command::new(waymark_bin()?).args(args))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.trim().is_empty() || out.status.success() || !stdout.is_empty(),
        "waymark {args:?}: {stderr}"
    );
    Ok((out.status.code().unwrap_or(-1), stdout))
}

/// 20 requests on `[DEFAULT]`, 5 on `fail` (each tried 3 times: all 500),
/// 10 on `slow` (50 ms each): the windows, the tables and `/metrics` count
/// exactly these, and the rates agree with the time they cover.
#[test]
fn stat_routes_and_edges_count_a_known_load() {
    require_agent_or_skip!();
    let built = Instant::now();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[web()]));
    with_world(b, |world| {
        let (client, node) = (world.pod(0, 0), world.node(0));
        let server = app(world.pod(1, 0), &[])?;
        let load = Instant::now();
        let mut codes = curl_codes(client, &[], &urls("/ok", 20))?;
        codes.extend(curl_codes(client, &[], &urls("/fail", 5))?);
        codes.extend(curl_codes(client, &[], &urls("/slow/50", 10))?);
        let load = load.elapsed().as_secs_f64();
        let count = |c: &str| codes.iter().filter(|s| *s == c).count();
        ensure!(
            count("200") == 30 && count("500") == 5,
            "curl saw {codes:?}"
        );
        // Every attempt reached the server: 5 failing requests, 3 tries each.
        let fails = || {
            server
                .lines()
                .iter()
                .filter(|l| {
                    l.starts_with("req ")
                        && l.split_whitespace()
                            .nth(3)
                            .is_some_and(|p| p.starts_with("/fail"))
                })
                .count()
        };
        waymark_tests::eventually(Duration::from_secs(5), || {
            ensure!(fails() == 15, "server saw {} /fail requests", fails());
            Ok(())
        })?;

        // Per route, exactly what was sent.
        let routes = admin_json(node, "/routes?service=web&window=10m")?;
        let names: Vec<&str> = routes["rows"]
            .as_array()
            .context("rows")?
            .iter()
            .filter_map(|r| r["route"].as_str())
            .collect();
        ensure!(names == ["slow", "fail", "[DEFAULT]"], "routes {names:?}");
        for (route, requests, successes, retries) in [
            ("[DEFAULT]", 20, 20, 0),
            ("fail", 5, 0, 10),
            ("slow", 10, 10, 0),
        ] {
            let r = row(&routes, "route", route)?;
            ensure!(
                (u(&r["requests"]), u(&r["successes"]), u(&r["retries"]))
                    == (requests, successes, retries),
                "route {route}: {r:#}"
            );
        }
        let fail = row(&routes, "route", "fail")?;
        ensure!(u(&fail["retried_requests"]) == 5, "{fail:#}");
        // A server that sleeps 50 ms: no percentile below it.
        let slow = row(&routes, "route", "slow")?;
        for p in ["latency_ms_p50", "latency_ms_p95", "latency_ms_p99"] {
            let v = f(&slow[p]);
            ensure!((50.0..5000.0).contains(&v), "slow {p} = {v} ms: {slow:#}");
        }
        let fast = row(&routes, "route", "[DEFAULT]")?;
        ensure!(
            f(&fast["latency_ms_p50"]) < f(&slow["latency_ms_p50"]),
            "[DEFAULT] is not faster than slow: {routes:#}"
        );

        // By service: success rate 30/35, and the rate is the count over
        // the span the window covers, which holds the whole load and lies
        // within the agent's life.
        let stat = admin_json(node, "/stat?by=service&window=10m")?;
        let web = row(&stat, "name", "web")?;
        let covered = f(&stat["window_seconds"]);
        ensure!(
            (u(&web["requests"]), u(&web["failures"])) == (35, 5),
            "{web:#}"
        );
        ensure!(
            (f(&web["success_rate"]) - 30.0 / 35.0).abs() < 1e-9,
            "{web:#}"
        );
        ensure!(
            load <= covered && covered <= built.elapsed().as_secs_f64(),
            "window covers {covered} s; the load took {load} s, the world is {} s old",
            built.elapsed().as_secs_f64()
        );
        ensure!(
            (f(&web["rps"]) * covered - 35.0).abs() < 1e-6,
            "rps {} over {covered} s",
            web["rps"]
        );
        ensure!(
            u(&web["tcp_opened"]) >= 3,
            "curl opened connections: {web:#}"
        );

        // By source pod, to web only.
        let by_pod = admin_json(node, "/stat?by=pod&to=web&window=10m")?;
        let p = row(&by_pod, "name", client.name())?;
        ensure!(
            (u(&p["requests"]), p["meshed"].as_str()) == (35, Some("1/1")),
            "{p:#}"
        );

        // The edge from the client pod to the service.
        let edges = admin_json(node, "/edges?window=10m")?;
        let e = row(&edges, "src", client.name())?;
        ensure!(
            e["dst"] == "web" && e["tls"] == "no_identity" && u(&e["requests"]) == 35,
            "{edges:#}"
        );

        // /metrics counts the same requests, each once.
        let web_label = [("service", "web")];
        ensure!(metric(node, "request_total", &web_label)? == 35.0);
        ensure!(metric(node, "response_total", &web_label)? == 35.0);
        let failed = [("service", "web"), ("classification", "failure")];
        ensure!(metric(node, "response_total", &failed)? == 5.0);
        for (route, n) in [("[DEFAULT]", 20.0), ("fail", 5.0), ("slow", 10.0)] {
            let l = [("service", "web"), ("route", route)];
            let (req, resp) = (
                metric(node, "request_total", &l)?,
                metric(node, "response_total", &l)?,
            );
            ensure!(
                (req, resp) == (n, n),
                "route {route}: request_total {req}, response_total {resp}"
            );
        }

        // The CLI's tables show the same.
        let (code, out) = waymark(node, &["stat", "--window", "10m"])?;
        ensure!(code == 0, "waymark stat: {out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("web "))
            .context(out.clone())?;
        ensure!(line.contains("85.71%"), "{out}");
        ensure!(
            out.lines()
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                == [
                    "NAME",
                    "MESHED",
                    "SUCCESS",
                    "RPS",
                    "LATENCY_P50",
                    "LATENCY_P95",
                    "LATENCY_P99",
                    "TCP_CONN",
                    "RETRIES",
                    "RETRY_BUDGET"
                ],
            "{out}"
        );
        let (_, out) = waymark(node, &["routes", "web", "-w", "10m"])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("fail "))
            .context(out.clone())?;
        ensure!(
            line.contains("0.00%") && line.contains("200.00%"),
            "fail row: {out}"
        );
        ensure!(out.contains("[DEFAULT]"), "{out}");
        let (_, out) = waymark(node, &["edges", "-w", "10m"])?;
        ensure!(
            out.contains(client.name()) && out.contains("no_identity"),
            "{out}"
        );
        let (_, out) = waymark(
            node,
            &["stat", "pod", "-o", "json", "-w", "10m", "--to", "web"],
        )?;
        let json: Value = serde_json::from_str(&out).context(out.clone())?;
        ensure!(
            u(&row(&json, "name", client.name())?["requests"]) == 35,
            "{json:#}"
        );
        Ok(())
    });
}

/// A service whose retry budget allows nothing (`ratio = 0`, no minimum):
/// every retry its `fail` route wants is refused, and `waymark routes` and
/// `waymark stat` say the budget ran out (not only a 0% retry rate), while
/// `web`, whose budget lets its retries through, says nothing of the kind.
#[test]
fn routes_and_stat_say_when_the_retry_budget_is_exhausted() {
    require_agent_or_skip!();
    let tight = Service::new("tight", "10.96.0.11:80")
        .endpoint(Endpoint::pod(1, 0, 8080))
        .retry_budget(0.0, 0)
        .route(
            r#"name = "fail"
matches = [{ path = { prefix = "/fail" } }]
retry = { attempts = 2, on = ["5xx"], backoff_base = "5ms", backoff_max = "10ms" }"#,
        );
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[web(), tight]));
    with_world(b, |world| {
        let (client, node) = (world.pod(0, 0), world.node(0));
        let _server = app(world.pod(1, 0), &[])?;
        let tight_urls: Vec<String> = (1..=6)
            .map(|i| format!("http://10.96.0.11/fail?i={i}"))
            .collect();
        ensure!(curl_codes(client, &[], &tight_urls)? == ["500"; 6]);
        ensure!(curl_codes(client, &[], &urls("/fail", 2))? == ["500"; 2]);

        let routes = admin_json(node, "/routes?service=tight&window=10m")?;
        let fail = row(&routes, "route", "fail")?;
        ensure!(
            (
                u(&fail["requests"]),
                u(&fail["retries"]),
                u(&fail["budget_exhausted"])
            ) == (6, 0, 6),
            "{fail:#}"
        );
        let (code, out) = waymark(node, &["routes", "tight", "-w", "10m"])?;
        ensure!(code == 0, "{out}");
        ensure!(
            out.lines()
                .next()
                .is_some_and(|h| h.ends_with("RETRIES   RETRY_BUDGET")),
            "{out}"
        );
        let line = out
            .lines()
            .find(|l| l.starts_with("fail "))
            .context(out.clone())?;
        ensure!(line.ends_with("exhausted:6"), "{out}");
        ensure!(
            out.contains(
                "retry budget exhausted for route fail of service tight: 6 of 6 requests were not retried"
            ),
            "{out}"
        );
        // web's budget let its retries through: nothing to say.
        let (_, out) = waymark(node, &["routes", "web", "-w", "10m"])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("fail "))
            .context(out.clone())?;
        ensure!(line.contains("200.00%") && line.ends_with(" -"), "{out}");
        ensure!(!out.contains("retry budget exhausted"), "{out}");

        let (_, out) = waymark(node, &["stat", "-w", "10m"])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("tight "))
            .context(out.clone())?;
        ensure!(line.ends_with("exhausted:6"), "{out}");
        ensure!(
            out.contains("retry budget exhausted for service tight: 6 of 6 requests"),
            "{out}"
        );
        ensure!(!out.contains("for service web"), "{out}");
        Ok(())
    });
}

/// A steady load of 40 requests/s, one in four failing: the 10 s window's
/// rate and success rate follow it.
#[test]
fn stat_follows_a_steady_load() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[web()]));
    with_world(b, |world| {
        let (client, node) = (world.pod(0, 0), world.node(0));
        // One request in four fails.
        let _server = app(world.pod(1, 0), &["--fail-every", "4"])?;
        let out = client.run_timeout(
            &mut testpeer([
                "http-rate",
                "--connect",
                VIP,
                "--rate",
                "40",
                "--conns",
                "4",
                "--duration",
                "25s",
                "--path",
                "/mixed",
            ]),
            Duration::from_secs(60),
        )?;
        let report: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
            .with_context(|| format!("http-rate: {}", String::from_utf8_lossy(&out.stderr)))?;
        ensure!(u(&report["errors"]) == 0, "{report:#}");
        let sent = u(&report["requests"]);
        // Everything, over the agent's whole life.
        let all = admin_json(node, "/stat?window=10m")?;
        let web = row(&all, "name", "web")?;
        ensure!(u(&web["requests"]) == sent, "sent {sent}: {web:#}");
        ensure!(
            u(&web["failures"]) == u(&report["non_2xx"]),
            "{report:#} {web:#}"
        );
        // The last 10 s (10 to 20 s of it, all during the load).
        let recent = admin_json(node, "/stat?window=10s")?;
        let covered = f(&recent["window_seconds"]);
        ensure!((10.0..20.0).contains(&covered), "{recent:#}");
        let web = row(&recent, "name", "web")?;
        let (rps, success) = (f(&web["rps"]), f(&web["success_rate"]));
        ensure!(
            (30.0..=50.0).contains(&rps),
            "40 rps sent, {rps} seen: {recent:#}"
        );
        ensure!(
            (0.70..=0.80).contains(&success),
            "3 in 4 succeed, {success} seen: {recent:#}"
        );
        Ok(())
    });
}

/// `waymark check` passes on a healthy node; after the connect4 program is
/// detached from the world's own cgroup it fails, names the program in the
/// agent's and the kernel's view, and says to restart the agent; a service
/// without endpoints and a config file changed in a section only a restart
/// applies fail too.
#[test]
fn check_passes_when_healthy_and_fails_when_detached() {
    require_agent_or_skip!();
    if bpftool_missing("check_passes_when_healthy_and_fails_when_detached") {
        return;
    }
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[
            Service::new("web", VIP).endpoint(Endpoint::pod(0, 0, 8080))
        ]));
    with_world(b, |world| {
        let node = world.node(0);
        let (code, out) = waymark(node, &["check"])?;
        ensure!(code == 0, "check failed on a healthy node:\n{out}");
        ensure!(out.contains("Status check results are ✔"), "{out}");
        ensure!(!out.contains('✖'), "{out}");
        // The kernel's own list of the cgroup's programs includes the
        // cookie map's cleanup (sock_release), not only the redirect.
        ensure!(
            out.contains("getpeername6, sock_release attached"),
            "check does not list sock_release:\n{out}"
        );
        let (code, out) = waymark(node, &["check", "--pre"])?;
        ensure!(code == 0 && !out.contains("agent ("), "--pre:\n{out}");

        // Detach connect4 behind the agent's back. The agent attached with
        // BPF links, which `bpftool cgroup detach` cannot remove (the kernel
        // only detaches a link-attached program through its link).
        let links = cgroup_links(node)?;
        // The six redirect programs (the kernel diagnostics' cgroup_skb
        // programs sit beside them).
        for kind in [
            "cgroup_sock_ops",
            "cgroup_inet_sock_release",
            "cgroup_inet4_getpeername",
            "cgroup_inet6_getpeername",
            "cgroup_inet4_connect",
            "cgroup_inet6_connect",
        ] {
            ensure!(
                links.iter().any(|(_, t)| t == kind),
                "no {kind} link on the node's cgroup: {links:?}"
            );
        }
        detach_link(node, "cgroup_inet4_connect")?;

        let (code, out) = waymark(node, &["check"])?;
        ensure!(code == 1, "check passed with a detached program:\n{out}");
        ensure!(
            out.contains("✖ agent: 1 of its 6 programs is no longer attached"),
            "{out}"
        );
        ensure!(
            out.contains("connect4: wm_connect4 is not attached"),
            "{out}"
        );
        ensure!(
            out.contains("hint: pods' connections bypass the proxy")
                && out.contains("restart the agent"),
            "{out}"
        );
        let (code, out) = waymark(node, &["check", "-o", "json"])?;
        let report: Value = serde_json::from_str(&out).context(out.clone())?;
        ensure!(code == 1 && report["ok"] == false, "{report:#}");

        // Without sock_release nothing is misrouted, but a pod churning
        // failing connects fills the node-wide cookie map: check says so.
        detach_link(node, "cgroup_inet_sock_release")?;
        let (code, out) = waymark(node, &["check"])?;
        ensure!(
            code == 1
                && out.contains("2 of its 6 programs are no longer attached")
                && out.contains("sock_release: wm_sock_release is not attached"),
            "check after detaching sock_release:\n{out}"
        );

        // A service without endpoints (services reload live) cannot be served.
        node.update_config(|c| {
            let mut empty = toml::Table::new();
            empty.insert("name".into(), "empty".into());
            empty.insert(
                "addresses".into(),
                toml::Value::Array(vec!["10.96.0.11:80".into()]),
            );
            if let Some(toml::Value::Array(services)) = c.get_mut("services") {
                services.push(toml::Value::Table(empty));
            }
        })?;
        waymark_tests::eventually(Duration::from_secs(10), || {
            let (code, out) = waymark(node, &["check"])?;
            ensure!(
                code == 1 && out.contains("✖ discovery: 1 of 2 services cannot be served"),
                "{out}"
            );
            ensure!(
                out.contains("empty: no endpoints")
                    && out.contains("hint: a service without endpoints"),
                "{out}"
            );
            ensure!(
                out.contains("is valid and is the config in force"),
                "not reloaded yet: {out}"
            );
            Ok(())
        })?;

        // A restart-only change on disk is not the config in force.
        node.update_config(|c| {
            if let Some(toml::Value::Table(n)) = c.get_mut("node") {
                n.insert("name".into(), "renamed".into());
            }
        })?;
        let (_, out) = waymark(node, &["check"])?;
        ensure!(
            out.contains("differs from the config in force in sections only a restart applies"),
            "{out}"
        );
        ensure!(out.contains("sections that differ: node"), "{out}");
        Ok(())
    });
}
