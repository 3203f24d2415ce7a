//! End to end: every request event in `waymark tap`, `waymark top` and a
//! diagnostic trace says where its status came from, `source=app` or
//! `source=proxy` with the proxy's reason, and timeouts read as configured.
//!
//! The scenarios an on-call engineer meets (issue 18): a failing
//! application (`/fail` answers 500: `source=app`), a split whose second
//! backend has no endpoints (`source=proxy reason=no_endpoints`, naming the
//! backend), an endpoint whose pod is gone (`source=proxy
//! reason=connect_failure`, naming the endpoint), and a route timeout of
//! `1s` (the 504 says `1s`, not what was left of it). And the balancer's
//! view of each endpoint (`waymark endpoints`), with `waymark check`
//! naming the endpoint that failed.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, services_toml};
use waymark_tests::{
    Pod, Server, World, WorldBuilder, curl, http_app, require_agent_or_skip, tap, tap_events,
    waymark, with_world, world_name,
};

const WEB: &str = "10.96.0.60:80";
const SHOP: &str = "10.96.0.61:80";
const GONE: &str = "10.96.0.62:80";
/// One live endpoint, one whose pod is gone.
const MIXED: &str = "10.96.0.65:80";
/// A service whose retry budget allows no retry.
const TIGHT: &str = "10.96.0.66:80";
/// An address on node 1's pod network that no pod has: its pod is gone.
const GONE_ENDPOINT: &str = "10.2.0.250:8080";

/// `web` (n1p0, a 1s timeout on `/slow`), `shop` split 1:1 between
/// `shop-v1` (n1p0) and `shop-v2` (no endpoints), `gone` whose only
/// endpoint's pod no longer exists, and `mixed`: n1p0 and that endpoint;
/// in the default world (two nodes of two pods, no mTLS), with a 1s
/// connect timeout.
fn world(name: &str) -> WorldBuilder {
    let app = || Endpoint::pod(1, 0, 8080).of_pod("default/n1p0");
    let gone = || Endpoint::at(GONE_ENDPOINT).of_pod("default/gone-1");
    let services = [
        Service::new("web", WEB).endpoint(app()).route(
            r#"name = "slow"
matches = [ { path = { prefix = "/slow" } } ]
timeout = "1s""#,
        ),
        Service::new("shop", SHOP).route(
            r#"name = "split"
backends = [ { service = "shop-v1", weight = 1 }, { service = "shop-v2", weight = 1 } ]"#,
        ),
        Service::new("shop-v1", "10.96.0.63:80").endpoint(app()),
        Service::new("shop-v2", "10.96.0.64:80"),
        Service::new("gone", GONE).endpoint(gone()),
        Service::new("tight", TIGHT)
            .endpoint(app())
            .retry_budget(0.0, 0)
            .retry_all(2, "5xx", "5ms", "10ms"),
        // The gone endpoint looks 100 times bigger once both have been tried.
        Service::new("mixed", MIXED).endpoints([app(), gone().weight(100)]),
    ];
    World::builder(name)
        .agent_config_extra(services_toml(&services))
        .agent_config_extra("[outbound]\nconnect_timeout = \"1s\"\n")
}

/// The test application, named after the pod: `/fail` answers 500,
/// `/slow/MS` 200 after MS milliseconds, anything else 200; TRACE too (so a
/// trace reaches the app and comes back with its status).
fn app(pod: &Pod) -> Result<Server> {
    http_app(pod, 8080, pod.name(), &[])
}

fn get(client: &Pod, vip: &str, path: &str) -> Result<u16> {
    Ok(curl(client, &format!("http://{vip}{path}"), &[])?.0)
}

/// The `rsp` and `end` events of the requests whose `req` had `path`.
fn answers<'a>(events: &'a [Value], path: &str) -> Vec<(&'a Value, &'a Value)> {
    let by_id =
        |kind: &str, id: &Value| events.iter().find(|e| e["type"] == kind && &e["id"] == id);
    events
        .iter()
        .filter(|e| e["type"] == "req" && e["path"] == path)
        .filter_map(|req| Some((by_id("rsp", &req["id"])?, by_id("end", &req["id"])?)))
        .collect()
}

/// Tap (text and JSON) and top name the source of every status: the
/// application's 500, the proxy's 503 for the split's empty backend (and
/// which backend), the proxy's 503 for the endpoint whose pod is gone (and
/// which endpoint), and an application's 500 the retry budget kept from
/// being retried.
#[test]
fn tap_and_top_say_where_each_status_came_from() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let node = world.node(0);
        let client = world.pod(0, 0);
        let _app = app(world.pod(1, 0))?;
        // 1 + 1 + 12 + 1 requests.
        let traffic = || -> Result<()> {
            ensure!(get(client, WEB, "/fail")? == 500);
            ensure!(get(client, WEB, "/ok")? == 200);
            for _ in 0..12 {
                let code = get(client, SHOP, "/cart")?;
                ensure!(code == 200 || code == 503, "shop answered {code}");
            }
            ensure!(get(client, GONE, "/x")? == 503);
            Ok(())
        };
        let out = tap(
            node,
            &["--from", client.name(), "--max", "15", "-o", "json"],
            traffic,
        )?;
        let events = tap_events(&out)?;

        let fail = answers(&events, "/fail");
        ensure!(fail.len() == 1, "{out}");
        let (rsp, end) = fail[0];
        ensure!(rsp["status"] == 500 && rsp["source"] == "app", "{rsp}");
        ensure!(rsp.get("reason").is_none(), "{rsp}");
        ensure!(
            end["source"] == "app" && end.get("error").is_none(),
            "{end}"
        );
        // The endpoint names its pod.
        ensure!(rsp["dst"]["pod"] == "default/n1p0", "{rsp}");

        let shop = answers(&events, "/cart");
        ensure!(shop.len() == 12, "{out}");
        let empty: Vec<_> = shop
            .iter()
            .filter(|(rsp, _)| rsp["dst"]["backend"] == "shop-v2")
            .collect();
        // 1:1 over 12 requests: both backends are picked (all twelve going
        // one way happens once in 2048 runs).
        ensure!(!empty.is_empty() && empty.len() < 12, "{out}");
        for (rsp, end) in &shop {
            if rsp["dst"]["backend"] == "shop-v2" {
                ensure!(
                    rsp["status"] == 503
                        && rsp["source"] == "proxy"
                        && rsp["reason"] == "no_endpoints",
                    "{rsp}"
                );
                ensure!(end["reason"] == "no_endpoints", "{end}");
            } else {
                ensure!(
                    rsp["dst"]["backend"] == "shop-v1"
                        && rsp["status"] == 200
                        && rsp["source"] == "app",
                    "{rsp}"
                );
            }
        }

        let gone = answers(&events, "/x");
        ensure!(gone.len() == 1, "{out}");
        let (rsp, _) = gone[0];
        ensure!(
            rsp["status"] == 503
                && rsp["source"] == "proxy"
                && rsp["reason"] == "connect_failure"
                && rsp["dst"]["addr"] == GONE_ENDPOINT
                && rsp["dst"]["pod"] == "default/gone-1",
            "{rsp}"
        );

        // The text form says it on the line, and `-o wide` names the
        // destination pod and the backend.
        let out = tap(
            node,
            &["--path", "/fail", "--max", "1", "-o", "wide"],
            || get(client, WEB, "/fail").map(drop),
        )?;
        let rsp = out
            .lines()
            .find(|l| l.starts_with("rsp "))
            .context("no rsp line")?;
        ensure!(rsp.contains(":status=500 source=app latency="), "{out}");
        ensure!(rsp.contains(" dst_pod=default/n1p0"), "{out}");
        let out = tap(
            node,
            &["--to", "shop-v2", "--max", "1", "-o", "wide"],
            || {
                for _ in 0..30 {
                    get(client, SHOP, "/cart")?;
                }
                Ok(())
            },
        )?;
        ensure!(
            out.lines().any(|l| l.starts_with("rsp ")
                && l.contains(":status=503 source=proxy reason=no_endpoints ")
                && l.contains(" dst_service=shop-v2")),
            "{out}"
        );

        // `waymark routes` breaks the split down by backend: the empty one
        // is marked and fails every request it got (42 requests in all).
        let routes = node.admin_socket_get("/routes?service=shop&window=10m")?;
        ensure!(routes.0 == 200, "{routes:?}");
        let routes: Value = serde_json::from_str(&routes.1)?;
        let split = routes["rows"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["route"] == "split"))
            .with_context(|| format!("no split row: {routes}"))?;
        let backend = |name: &str| {
            split["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["backend"] == name))
                .cloned()
                .unwrap_or_default()
        };
        let (v1, v2) = (backend("shop-v1"), backend("shop-v2"));
        let n = |b: &Value| b["requests"].as_u64().unwrap_or(0);
        ensure!(n(&v1) + n(&v2) == 42 && n(&v2) > 0, "{split}");
        ensure!(
            v2["no_endpoints"] == true && v2["success_rate"] == 0.0 && v2["weight"] == 1,
            "{split}"
        );
        ensure!(
            v1["no_endpoints"] == false && v1["success_rate"] == 1.0,
            "{split}"
        );
        let out = node.run_ok(waymark().args(["routes", "shop", "-w", "10m"]))?;
        let v2_line = out
            .lines()
            .find(|l| l.starts_with("split ") && l.contains(" shop-v2 "))
            .with_context(|| out.clone())?;
        ensure!(
            v2_line.contains(" 0.00% ") && v2_line.ends_with(" none"),
            "{out}"
        );

        // The application's 500 whose retry the budget refused says both.
        let out = tap(node, &["--to", "tight", "--max", "1"], || {
            ensure!(get(client, TIGHT, "/fail")? == 500);
            Ok(())
        })?;
        ensure!(
            out.lines().any(|l| l.starts_with("rsp ")
                && l.contains(":status=500 source=app retry_budget=exhausted latency=")),
            "{out}"
        );

        // Top counts the failures by their source.
        let top = std::thread::scope(|s| -> Result<String> {
            let cli = s.spawn(|| {
                node.run_ok(waymark().args([
                    "top",
                    "--from",
                    client.name(),
                    "--duration",
                    "6s",
                    "-o",
                    "json",
                ]))
            });
            waymark_tests::await_metric(node, "waymark_tap_streams", &[], 1.0)?;
            get(client, WEB, "/fail")?;
            get(client, WEB, "/fail")?;
            get(client, GONE, "/x")?;
            cli.join().expect("the top thread")
        })?;
        let top: Value = serde_json::from_str(&top).with_context(|| top.clone())?;
        let row = |path: &str| {
            top["rows"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["path"] == path))
                .cloned()
                .unwrap_or_default()
        };
        ensure!(
            row("/fail")["failure_sources"] == serde_json::json!({"app": 2}),
            "{top}"
        );
        ensure!(
            row("/x")["failure_sources"] == serde_json::json!({"proxy:connect_failure": 1}),
            "{top}"
        );
        Ok(())
    });
}

/// The diagnostic trace's `result:` line names the source (the app's 500,
/// the proxy's 503 with the backend that has no endpoints), and a route
/// timeout of `1s` reads `1s` in the 504, which tap shows as
/// `source=proxy reason=timeout`.
#[test]
fn trace_results_name_the_source_and_timeouts_read_as_configured() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let node = world.node(0);
        let client = world.pod(0, 0);
        let _app = app(world.pod(1, 0))?;
        let trace = |vip: &str, path: &str| {
            node.run_ok(waymark().args([
                "trace",
                &format!("http://{vip}{path}"),
                "--pod",
                client.name(),
            ]))
        };
        let out = trace(WEB, "/fail")?;
        ensure!(out.contains("\nresult: 500 source=app\n"), "{out}");
        ensure!(out.contains("selected address: "), "{out}");
        ensure!(out.contains("(pod default/n1p0, "), "{out}");

        let mut empty = None;
        for _ in 0..30 {
            let out = trace(SHOP, "/cart")?;
            if out.contains("-> shop-v2\n") {
                empty = Some(out);
                break;
            }
        }
        let out = empty.context("30 traces never picked shop-v2")?;
        ensure!(
            out.contains(
                "\nresult: 503 source=proxy reason=no_endpoints (no endpoints available)\n"
            ),
            "{out}"
        );

        let mut answer = None;
        let out = tap(
            node,
            &["--path", "/slow", "--max", "1", "-o", "json"],
            || {
                answer = Some(curl(client, &format!("http://{WEB}/slow/1500"), &[])?);
                Ok(())
            },
        )?;
        let (code, body) = answer.context("no answer")?;
        ensure!(code == 504, "{code} {body}");
        ensure!(
            body.contains("within the route's timeout 1s)"),
            "the configured timeout, not what was left of it: {body}"
        );
        // The tap says the 504 is the proxy's, because of the timeout.
        let events = tap_events(&out)?;
        let slow = answers(&events, "/slow/1500");
        ensure!(slow.len() == 1, "{out}");
        let (rsp, end) = slow[0];
        ensure!(
            rsp["status"] == 504 && rsp["source"] == "proxy" && rsp["reason"] == "timeout",
            "{rsp}"
        );
        ensure!(end["reason"] == "timeout", "{end}");
        Ok(())
    });
}

/// An endpoint whose pod is gone: once a request has failed on it,
/// `waymark endpoints` names it with its failure, its last error and when,
/// beside the live one, and `waymark check` warns about it by name.
#[test]
fn endpoints_and_check_name_the_endpoint_whose_pod_is_gone() {
    require_agent_or_skip!();
    // One failure ejects for two minutes: the ejection outlasts the test.
    let b = world(world_name!()).agent_config_extra(
        "[balancer]\nfailure_threshold = 1\neject_base = \"2m\"\neject_max = \"4m\"\n",
    );
    with_world(b, |world| {
        let node = world.node(0);
        let client = world.pod(0, 0);
        let _app = app(world.pod(1, 0))?;
        // Both endpoints are new, so the balancer tries each within the
        // first three requests (the live one has answered twice by then,
        // the gone one still costs nothing); the gone one's one failure
        // ejects it, and the live one answers the rest.
        let codes: Vec<u16> = (0..6)
            .map(|_| get(client, MIXED, "/ok"))
            .collect::<Result<_>>()?;
        ensure!(
            codes.iter().filter(|c| **c == 503).count() == 1
                && codes[..3].contains(&503)
                && codes.iter().all(|c| [200, 503].contains(c)),
            "{codes:?}"
        );

        let run = |args: &[&str]| -> Result<(bool, String, String)> {
            let out = node.run(waymark().args(args))?;
            Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        };
        let (ok, out, err) = run(&["endpoints", "mixed", "-o", "json"])?;
        ensure!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
        let eps = v["services"][0]["endpoints"]
            .as_array()
            .context("endpoints")?;
        ensure!(
            v["services"][0]["service"] == "mixed" && eps.len() == 2,
            "{v}"
        );
        let gone = eps
            .iter()
            .find(|e| e["addr"] == GONE_ENDPOINT)
            .context("the gone endpoint")?;
        ensure!(gone["pod"] == "default/gone-1", "{gone}");
        ensure!(
            gone["recent_failures"] == 1 && gone["recent_successes"] == 0,
            "{gone}"
        );
        ensure!(
            gone["state"] == "ejected"
                && gone["ejection_reason"] == "1 consecutive failure"
                && gone["ejected_for_ms"].as_u64() > Some(60_000)
                && gone["ejected_until"]
                    .as_str()
                    .is_some_and(|t| t.ends_with('Z')),
            "{gone}"
        );
        let last = &gone["last_error"];
        ensure!(
            last["error"]
                .as_str()
                .is_some_and(|e| e.contains("10.2.0.250:8080"))
                && last["ago_ms"].as_u64().is_some_and(|ms| ms < 60_000)
                && last["at"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{gone}"
        );
        ensure!(
            gone["tunnel"] == false && gone["direct_because"] == "mTLS is off",
            "{gone}"
        );
        let live = eps
            .iter()
            .find(|e| e["pod"] == "default/n1p0")
            .context("the live endpoint")?;
        ensure!(
            live["recent_successes"].as_u64() >= Some(1)
                && live["recent_failures"] == 0
                && live["last_error"].is_null()
                && live["state"] == "ok",
            "{live}"
        );

        // The table: one line per endpoint, the gone one with its error.
        let (ok, out, err) = run(&["endpoints", "mixed"])?;
        ensure!(ok, "{err}");
        let line = out
            .lines()
            .find(|l| l.contains(GONE_ENDPOINT))
            .with_context(|| out.clone())?;
        ensure!(
            line.starts_with("mixed")
                && line.contains("default/gone-1")
                && line.contains("ejected for ")
                && line.contains(": 1 consecutive failure")
                && line.contains("s ago: "),
            "{out}"
        );
        // A service with no endpoints says so.
        let (ok, out, _) = run(&["endpoints", "shop-v2"])?;
        ensure!(
            ok && out.contains("service shop-v2 has no endpoints"),
            "{out}"
        );
        // An unknown service is an error naming the ones there are.
        let (ok, _, err) = run(&["endpoints", "nope"])?;
        ensure!(
            !ok && err.contains("no service \"nope\"") && err.contains("mixed"),
            "{err}"
        );
        let (status, body) = node.admin_socket_get("/endpoints?servce=mixed")?;
        ensure!(
            status == 400 && body.contains("unknown parameter"),
            "{status} {body}"
        );

        // Check warns, naming the endpoint and its pod.
        let (_, out, _) = run(&["check"])?;
        ensure!(
            out.lines().any(|l| l.contains("endpoints: 1 of ")
                && l.contains("ejected or failing in the last 60s")),
            "{out}"
        );
        ensure!(
            out.contains(&format!(
                "service mixed endpoint {GONE_ENDPOINT} (pod default/gone-1) is ejected for "
            )) && out.contains("s more (1 consecutive failure); last error "),
            "{out}"
        );
        Ok(())
    });
}

/// A tap that matches nothing says why on stderr after a few seconds: a
/// pod that is not on this node, no requests through this agent at all,
/// or a filter that excludes everything seen (with what was seen).
#[test]
fn an_empty_tap_says_why() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let node = world.node(0);
        let client = world.pod(0, 0);
        let _app = app(world.pod(1, 0))?;
        let tap_stderr = |args: &[&str]| -> Result<String> {
            let out = node.run_timeout(
                waymark().arg("tap").args(args).args(["--duration", "7s"]),
                std::time::Duration::from_secs(30),
            )?;
            ensure!(out.status.success(), "{out:?}");
            ensure!(out.stdout.is_empty(), "{out:?}");
            Ok(String::from_utf8_lossy(&out.stderr).into_owned())
        };
        // No traffic yet: two taps at once.
        let (nope, idle) = std::thread::scope(|s| {
            let nope = s.spawn(|| tap_stderr(&["--from", "default/nope"]));
            let idle = s.spawn(|| tap_stderr(&["--to", "web"]));
            (nope.join(), idle.join())
        });
        let (nope, idle) = (
            nope.expect("the tap thread")?,
            idle.expect("the tap thread")?,
        );
        ensure!(
            nope.starts_with("waymark tap: nothing matched in 5s; why it may be empty:\n")
                && nope.contains(&format!(
                    "  - no pod default/nope on this node (its pods: {}, {})",
                    world.pod(0, 0).name(),
                    world.pod(0, 1).name()
                )),
            "{nope}"
        );
        ensure!(
            idle.contains("  - this agent proxied no HTTP requests in the last 10s"),
            "{idle}"
        );
        // Requests that the filter leaves out: counted.
        for _ in 0..3 {
            ensure!(get(client, WEB, "/ok")? == 200);
        }
        let excluded = tap_stderr(&["--path", "/nothing"])?;
        ensure!(
            excluded.contains(&format!(
                "  - the filter excludes everything seen: 3 requests in the last 10s (3 from {} to web)",
                client.name()
            )),
            "{excluded}"
        );
        Ok(())
    });
}
