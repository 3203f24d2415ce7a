//! End-to-end tests of the L7 data path when things go wrong: retries under a
//! budget, timeouts, failure accrual, config reload, malformed input and the
//! proxy's own error responses. Real agents, the test application in pods
//! (`testpeer http`), curl as the client; see tests/README.md.
//!
//! Services are declared in the agents' config (`[[services]]`); their
//! addresses (10.96.0.x) are virtual IPs that route nowhere: the kernel
//! redirects the pod's `connect()` to the agent before routing.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, merge_toml, services_toml};
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, Server, World, await_metric, curl_many, eventually, http_app,
    metric, pod_ip, python, require_agent_or_skip, with_world, world_name,
};

/// Starts the test application on `port` in `pod`, named after the pod
/// (`x-pod`), printing `req <n> <method> <path> <status>` per request;
/// `opts` are its flags (`--fail alternate`, `--fail all`, `--delay 2s`);
/// a `?sleep=MS` query delays one request.
fn app(pod: &Pod, port: u16, opts: &[&str]) -> Result<Server> {
    http_app(pod, port, pod.name(), opts)
}

/// Requests an app server has received so far.
fn seen(server: &Server) -> usize {
    server
        .lines()
        .iter()
        .filter(|l| l.starts_with("req "))
        .count()
}

/// One GET with curl: status, headers (lower-case names), body, seconds.
fn curl_one(pod: &Pod, url: &str) -> Result<(u16, BTreeMap<String, String>, String, f64)> {
    let start = Instant::now();
    let out = pod.run_ok(Command::new("curl").args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-D",
        "-",
        url,
    ]))?;
    let secs = start.elapsed().as_secs_f64();
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("no response head from {url}: {out:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line from {url}: {out:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string(), secs))
}

/// (5) Retries: a route retrying 5xx twice hides an endpoint that fails every
/// other request; under a full outage the retry budget caps the extra load.
#[test]
fn retries_hide_flaky_endpoint_and_budget_caps_an_outage() {
    require_agent_or_skip!();
    const FLAKY: &str = "10.96.0.15:80";
    const DOWN: &str = "10.96.0.16:80";
    // The outage service's budget: retries ≤ 0.2 × requests + 1/s × 10 s.
    const RATIO: f64 = 0.2;
    const RESERVE: f64 = 10.0;
    let services = [
        Service::new("flaky", FLAKY)
            .endpoint(Endpoint::pod(1, 0, 8080))
            // Every request needs one retry: more than the default ratio
            // (0.2) allows.
            .retry_budget(1.0, 10)
            .retry_all(2, "5xx", "2ms", "10ms"),
        Service::new("down", DOWN)
            .endpoint(Endpoint::pod(1, 1, 8080))
            .retry_budget(RATIO, 1)
            .retry_all(2, "5xx", "2ms", "10ms"),
    ];
    let b = World::builder(world_name!()).agent_config_extra(services_toml(&services));
    with_world(b, |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        let flaky = app(world.pod(1, 0), 8080, &["--fail", "alternate"])?;
        let down = app(world.pod(1, 1), 8080, &["--fail", "all"])?;

        // The server fails exactly every other request. Sequential requests:
        // the first attempt of each gets a failing turn, the retry the next.
        let t = curl_many(cl, &format!("http://{FLAKY}/f?i=[1-100]"), 1, &[])?;
        ensure!(
            t.requests == 100 && t.status("200") == 100,
            "the client saw failures through a retrying route: {t:?}"
        );
        ensure!(
            seen(&flaky) == 200,
            "expected each of the 100 requests tried twice (503, then 200); the server saw {}",
            seen(&flaky)
        );

        // Full outage: every answer is the server's own 503, and retries add
        // at most RATIO of the requests plus the reserve, all within one ttl
        // (the run takes about a second); +2 of slack for rounding.
        const R: u32 = 100;
        let t = curl_many(cl, &format!("http://{DOWN}/d?i=[1-{R}]"), 1, &[])?;
        ensure!(
            t.status("503") == R && t.pod(world.pod(1, 1).name()) == R,
            "expected {R} × the server's 503: {t:?}"
        );
        let got = seen(&down) as f64;
        eprintln!("outage: {R} requests, {got} reached the server");
        let cap = f64::from(R) * (1.0 + RATIO) + RESERVE + 2.0;
        ensure!(
            got <= cap,
            "the servers received {got} requests for {R}: more than the budget allows ({cap})"
        );
        ensure!(
            got >= f64::from(R) + RESERVE,
            "the servers received {got} requests for {R}: the budget's reserve ({RESERVE}) was not even used"
        );
        let left = metric(
            node,
            "waymark_retry_budget_available",
            &[("service", "down")],
        )?;
        ensure!(
            left < 1.0,
            "after the outage the budget still allows {left} retries"
        );
        Ok(())
    });
}

/// (6) Timeouts: an attempt that outlives `per_try_timeout` is retried on the
/// fast endpoint; a route `timeout` ends in the proxy's 504, promptly.
#[test]
fn per_try_timeout_retries_elsewhere_and_route_timeout_gives_504() {
    require_agent_or_skip!();
    const MIXED: &str = "10.96.0.17:80";
    const SLOW: &str = "10.96.0.18:80";
    let (slow, fast) = (Endpoint::pod(1, 0, 8080), Endpoint::pod(1, 1, 8080));
    let services = [
        Service::new("mixed", MIXED)
            .endpoints([slow.clone(), fast])
            .route(
                r#"name = "all"
per_try_timeout = "200ms"
retry = { attempts = 2, on = ["gateway-error"], backoff_base = "2ms", backoff_max = "10ms" }"#,
            ),
        Service::new("slowonly", SLOW).endpoint(slow).route(
            r#"name = "all"
timeout = "300ms""#,
        ),
    ];
    // default_rtt 1ms: an endpoint not yet measured looks cheaper than one
    // that answered in a few ms, so the slow endpoint is certainly tried by
    // the second request (with Linkerd's 30 ms it may be passed over for
    // ~10 s of sequential requests).
    let b = World::builder(world_name!())
        .agent_config_extra(services_toml(&services))
        .agent_config_extra("[balancer]\ndefault_rtt = \"1ms\"\n");
    with_world(b, |world| {
        let cl = world.pod(0, 0);
        let slow = app(world.pod(1, 0), 8080, &["--delay", "2s"])?;
        let _fast = app(world.pod(1, 1), 8080, &[])?;
        let fast = world.pod(1, 1).name();

        let t = curl_many(cl, &format!("http://{MIXED}/m?i=[1-20]"), 1, &[])?;
        ensure!(
            t.status("200") == 20 && t.pod(fast) == 20,
            "expected every request answered by the fast endpoint: {t:?}"
        );
        ensure!(
            seen(&slow) >= 1,
            "the slow endpoint was never tried, so no retry was exercised: {t:?}"
        );
        // One per-try timeout (200 ms) plus a retry; nobody waited out the
        // slow endpoint's 2 s.
        ensure!(
            t.max_secs < 1.5,
            "the slowest request took {} s: {t:?}",
            t.max_secs
        );

        let (status, headers, body, secs) = curl_one(cl, &format!("http://{SLOW}/s"))?;
        ensure!(
            status == 504,
            "expected 504 from the proxy, got {status}: {headers:?} {body}"
        );
        for h in ["l5d-proxy-error", "waymark-proxy-error"] {
            ensure!(
                headers.get(h).map(String::as_str) == Some("request timed out"),
                "{h} is {:?}: {headers:?}",
                headers.get(h)
            );
        }
        ensure!(
            body.contains("waymark node0") && body.contains("service slowonly"),
            "the 504's body does not name the agent's node and the service: {body:?}"
        );
        ensure!(
            secs < 1.5,
            "the 504 took {secs} s for a 300 ms timeout (the endpoint needs 2 s)"
        );
        Ok(())
    });
}

/// (7) Failure accrual: an endpoint refusing connections is ejected after
/// `failure_threshold` (5) consecutive failures; then no request fails.
#[test]
fn dead_endpoint_is_ejected_and_traffic_keeps_flowing() {
    require_agent_or_skip!();
    const PLAIN: &str = "10.96.0.19:80";
    const RETRYING: &str = "10.96.0.20:80";
    let (a, b, dead) = (pod_ip(1, 0), pod_ip(1, 1), format!("{}:8099", pod_ip(0, 1)));
    let endpoints = [
        Endpoint::at(&format!("{a}:8080")),
        Endpoint::at(&format!("{b}:8080")),
        Endpoint::at(&dead),
    ];
    let services = [
        Service::new("plain", PLAIN).endpoints(endpoints.clone()),
        Service::new("retrying", RETRYING)
            .endpoints(endpoints)
            .retry_all(5, "connect-failure", "2ms", "10ms"),
    ];
    // default_rtt 1ms and healthy endpoints that take 20 ms to answer keep
    // the dead endpoint the cheaper one of any pair it is in (its fast
    // failures never raise its cost past theirs, whatever the machine's
    // load), so it really is picked until ejected; a long ejection keeps
    // probes out of the test's time.
    let bld = World::builder(world_name!())
        .agent_config_extra(services_toml(&services))
        .agent_config_extra(
            "[balancer]\ndefault_rtt = \"1ms\"\nfailure_threshold = 5\neject_base = \"60s\"\neject_max = \"120s\"\n",
        );
    with_world(bld, |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        let _a = app(world.pod(1, 0), 8080, &["--delay", "20ms"])?;
        let _b = app(world.pod(1, 1), 8080, &["--delay", "20ms"])?;
        let ejected = |svc: &'static str| vec![("service", svc), ("endpoint", dead.as_str())];

        // Without retries, each pick of the dead endpoint is a failed request
        // (the proxy's 503), until the fifth consecutive one ejects it. How
        // often the balancer picks it is random (and a loaded machine skews
        // the healthy endpoints' latency), so requests go in batches until
        // the ejection, and the failures are counted over all of them.
        let (mut failed, mut ok, mut connect_errors) = (0, 0, 0);
        for batch in 0..10 {
            let t = curl_many(cl, &format!("http://{PLAIN}/p?b={batch}&i=[1-30]"), 1, &[])?;
            failed += t.status("503");
            ok += t.status("200");
            connect_errors += t
                .proxy_errors
                .get("connection to the endpoint failed")
                .copied()
                .unwrap_or(0);
            ensure!(
                t.status("503") + t.status("200") == 30,
                "answers other than 200 and 503: {t:?}"
            );
            if metric(node, "waymark_endpoint_ejected", &ejected("plain"))? == 1.0 {
                break;
            }
        }
        ensure!(
            failed == 5,
            "expected exactly 5 failures (the threshold) before the ejection, got {failed} (and {ok} answered)"
        );
        ensure!(
            connect_errors == 5,
            "the failures are not the proxy's connect errors: {connect_errors} of {failed}"
        );
        await_metric(node, "waymark_endpoint_ejected", &ejected("plain"), 1.0)?;
        await_metric(
            node,
            "waymark_service_endpoints_available",
            &[("service", "plain")],
            2.0,
        )?;
        let t = curl_many(cl, &format!("http://{PLAIN}/p?i=[1-200]"), 4, &[])?;
        ensure!(
            t.status("200") == 200,
            "requests failed after the dead endpoint was ejected: {t:?}"
        );

        // With retries on connect-failure the client never sees it at all:
        // a retry avoids the endpoints already tried, so one refused
        // connection is followed by a try elsewhere. (Whether this service
        // also ejects the dead endpoint depends on how often the balancer
        // picks it first, so it is not asserted here; ejection itself is
        // checked above.)
        let t = curl_many(cl, &format!("http://{RETRYING}/r?i=[1-100]"), 1, &[])?;
        ensure!(
            t.status("200") == 100,
            "a retrying route let a connect failure through: {t:?}"
        );
        Ok(())
    });
}

/// (7b) A retry after a refused connection goes to another endpoint when
/// there is one ("a retry goes to the endpoint the balancer now prefers,
/// usually another one", proxy/outbound/forward/). Ejection is off so that only the
/// retry's choice of endpoint is measured; default_rtt 1ms makes the dead
/// endpoint look as cheap as it does to a fresh balancer.
#[test]
fn retry_after_connect_failure_goes_to_another_endpoint() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.21:80";
    let retrying = Service::new("retrying", VIP)
        .endpoints([
            Endpoint::pod(1, 0, 8080),
            Endpoint::pod(1, 1, 8080),
            Endpoint::pod(0, 1, 8099),
        ])
        .retry_all(1, "connect-failure", "2ms", "10ms");
    let bld = World::builder(world_name!())
        .agent_config_extra(services_toml(&[retrying]))
        .agent_config_extra("[balancer]\ndefault_rtt = \"1ms\"\nfailure_threshold = 0\n");
    with_world(bld, |world| {
        let cl = world.pod(0, 0);
        let _a = app(world.pod(1, 0), 8080, &[])?;
        let _b = app(world.pod(1, 1), 8080, &[])?;
        let t = curl_many(cl, &format!("http://{VIP}/r?i=[1-100]"), 1, &[])?;
        ensure!(
            t.status("200") == 100,
            "requests failed although a retry could have gone to a live endpoint: {t:?}"
        );
        Ok(())
    });
}

/// The services of the reload test; `v` routes `/v` to `backend`.
fn reload_services(vip: &str, backend: &str) -> String {
    services_toml(&[
        Service::new("web", vip)
            .endpoint(Endpoint::pod(0, 1, 8080))
            .route(&format!(
                r#"name = "v"
matches = [{{ path = {{ prefix = "/v" }} }}]
backends = [{{ service = "{backend}" }}]"#
            )),
        Service::backend("blue").endpoint(Endpoint::pod(1, 0, 8080)),
        Service::backend("green").endpoint(Endpoint::pod(1, 1, 8080)),
    ])
}

/// Replaces the node's `[[services]]` with those in `text`; the agent sees
/// the file change by itself.
fn set_services(node: &Node, text: &str) -> Result<()> {
    node.update_config(|cfg| merge_toml(cfg, text))
}

/// (11) Reload: new routes apply to new requests while a request in flight
/// completes; an invalid config is rejected, logged, and the old one stays.
#[test]
fn reload_changes_routes_keeps_inflight_and_rejects_invalid_config() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.24:80";
    const RELOADS: &str = "waymark_config_reloads_total";
    let b = World::builder(world_name!()).agent_config_extra(reload_services(VIP, "blue"));
    with_world(b, |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        let (origin, blue, green) = (world.pod(0, 1), world.pod(1, 0), world.pod(1, 1));
        let _o = app(origin, 8080, &[])?;
        let mut blue_srv = app(blue, 8080, &[])?;
        let _g = app(green, 8080, &[])?;
        let t = curl_many(cl, &format!("http://{VIP}/v/a?i=[1-3]"), 1, &[])?;
        ensure!(t.pod(blue.name()) == 3, "before the reload: {t:?}");

        let success = [("result", "success")];
        let before = metric(node, RELOADS, &success)?;
        std::thread::scope(|s| -> Result<()> {
            // 2.5 s in flight: the file is polled every second.
            let inflight =
                s.spawn(|| curl_many(cl, &format!("http://{VIP}/v/slow?sleep=2500"), 1, &[]));
            blue_srv.wait_line("req 4 GET /v/slow", Duration::from_secs(10))?;
            set_services(node, &reload_services(VIP, "green"))?;
            await_metric(node, RELOADS, &success, before + 1.0)?;
            ensure!(
                !inflight.is_finished(),
                "the reload was only seen after the in-flight request ended; nothing was proven"
            );
            let t = inflight
                .join()
                .map_err(|_| anyhow::anyhow!("in-flight client panicked"))??;
            ensure!(
                t.status("200") == 1 && t.pod(blue.name()) == 1,
                "the request in flight during the reload did not complete: {t:?}"
            );
            Ok(())
        })?;
        let t = curl_many(cl, &format!("http://{VIP}/v/b?i=[1-3]"), 1, &[])?;
        ensure!(t.pod(green.name()) == 3, "after the reload: {t:?}");
        let t = curl_many(cl, &format!("http://{VIP}/other"), 1, &[])?;
        ensure!(t.pod(origin.name()) == 1, "unrouted request: {t:?}");

        // Invalid: a backend that is no service. Were it applied, /v would
        // go back to blue.
        let failure = [("result", "failure")];
        let bad = reload_services(VIP, "blue").replace(
            "backends = [{ service = \"blue\" }]",
            "backends = [{ service = \"blue\" }, { service = \"nope\" }]",
        );
        ensure!(bad.contains("nope"), "the invalid config was not built");
        set_services(node, &bad)?;
        await_metric(node, RELOADS, &failure, 1.0)?;
        eventually(DEFAULT_PATIENCE, || {
            let log = node.agent_log();
            // The reason follows on the same record (problems are listed
            // one per line).
            let rejected = log
                .find("config reload rejected")
                .context("no rejection logged")?;
            ensure!(
                log[rejected..].contains("no service named \"nope\""),
                "the agent log does not say why the reload was rejected"
            );
            Ok(())
        })?;
        let t = curl_many(cl, &format!("http://{VIP}/v/c?i=[1-3]"), 1, &[])?;
        ensure!(
            t.pod(green.name()) == 3,
            "after a rejected reload, routing changed: {t:?}"
        );
        ensure!(
            metric(node, RELOADS, &success)? == before + 1.0,
            "the invalid config counted as a success"
        );
        Ok(())
    });
}

/// Malformed requests, each on a new connection; prints what came back.
const BAD_CLIENT: &str = r#"
import json, socket, sys
cases = [
    ("bad-request-line", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bad-header-name", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"),
    ("absurd-content-length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999999\r\n\r\nabc"),
    ("huge-header", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (200 * 1024) + b"\r\n\r\n"),
]
r = {}
for name, data in cases:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    end, got = None, b""
    try:
        s.sendall(data)
    except OSError as e:
        end = "send failed: %r" % e
    while end is None:
        try:
            d = s.recv(65536)
        except socket.timeout:
            end = "timeout"
            break
        except ConnectionResetError:
            end = "reset"
            break
        if not d:
            end = "eof"
        got += d
    s.close()
    r[name] = {"end": end, "status_line": got.split(b"\r\n", 1)[0].decode("latin-1"), "bytes": len(got)}
print(json.dumps(r))
"#;

/// (12) Errors: a service without endpoints gets the proxy's 503; malformed
/// requests get a 4xx or a clean close, never reach the endpoint, and the
/// agent keeps serving.
#[test]
fn proxy_errors_and_malformed_requests_leave_the_agent_serving() {
    require_agent_or_skip!();
    const EMPTY: &str = "10.96.0.25:80";
    const WEB: &str = "10.96.0.26:80";
    let services = [
        Service::new("empty", EMPTY),
        Service::new("web", WEB).endpoint(Endpoint::pod(1, 0, 8080)),
    ];
    let b = World::builder(world_name!()).agent_config_extra(services_toml(&services));
    with_world(b, |world| {
        let (cl, node) = (world.pod(0, 0), world.node(0));
        let web = app(world.pod(1, 0), 8080, &[])?;

        let (status, headers, body, _) = curl_one(cl, &format!("http://{EMPTY}/x"))?;
        ensure!(status == 503, "no endpoints: {status} {headers:?} {body}");
        for h in ["l5d-proxy-error", "waymark-proxy-error"] {
            ensure!(
                headers.get(h).map(String::as_str) == Some("no endpoints available"),
                "{h}: {headers:?}"
            );
        }
        ensure!(
            body.contains("waymark node0") && body.contains("service empty"),
            "the 503's body does not name the agent's node and the service: {body:?}"
        );

        let (host, port) = WEB.split_once(':').expect("ip:port");
        let out = cl.run_ok(python().args(["-c", BAD_CLIENT, host, port]))?;
        let r: Value = serde_json::from_str(out.trim()).context("bad client's report")?;
        eprintln!("malformed requests: {r}");
        for (case, got) in r.as_object().context("a JSON object")? {
            let line = got["status_line"].as_str().unwrap_or_default();
            let answered_4xx = line.starts_with("HTTP/1.1 4");
            let closed = got["end"] == "eof" && got["bytes"] == 0;
            ensure!(
                answered_4xx || closed,
                "{case}: expected a 4xx or a clean close, got {got}"
            );
            ensure!(
                got["end"] == "eof",
                "{case}: the connection was not closed cleanly: {got}"
            );
            if case == "huge-header" {
                ensure!(
                    line.starts_with("HTTP/1.1 431"),
                    "a 200 KiB header (the limit is 96 KiB) should get 431: {got}"
                );
            }
        }
        ensure!(
            seen(&web) == 0,
            "a malformed request reached the endpoint: {:?}",
            web.lines()
        );

        ensure!(node.agent_pid().is_some(), "the agent died");
        let (status, body) = node.admin_get("/live")?;
        ensure!(status == 200, "/live: {status} {body}");
        let t = curl_many(cl, &format!("http://{WEB}/ok?i=[1-3]"), 1, &[])?;
        ensure!(
            t.status("200") == 3,
            "good requests after the bad ones: {t:?}"
        );
        // The server's output is read by another thread: wait for its lines.
        eventually(DEFAULT_PATIENCE, || {
            ensure!(seen(&web) == 3, "the server saw {:?}", web.lines());
            Ok(())
        })
    });
}

/// An HTTP/1.1 server that answers the first request of each connection
/// (keep-alive) and closes the connection on reading the second one without
/// answering: keep-alive's race, where a server (or a draining peer agent)
/// closes an idle connection just as the client sends on it. Prints
/// `answered` and `closed` lines.
const CLOSES_SECOND: &str = r#"
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(64)
print("listening", sys.argv[1], flush=True)
def head(c):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data
def serve(c):
    if head(c) is None:
        return c.close()
    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    print("answered", flush=True)
    if head(c) is not None:
        print("closed", flush=True)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A GET that the endpoint's keep-alive connection closes under (request
/// written, no answer) is sent again on a new connection instead of
/// failing with 502: it has no body and is idempotent (RFC 9112 §9.3.1).
#[test]
fn a_get_on_a_keepalive_connection_the_endpoint_closes_is_sent_again() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.24:80";
    let closing = Service::new("closing", VIP)
        .protocol("http1")
        .endpoint(Endpoint::pod(1, 0, 8080));
    let bld = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[closing]));
    with_world(bld, |world| {
        let server = world
            .pod(1, 0)
            .serve(python().args(["-u", "-c", CLOSES_SECOND, "8080"]))?;
        let urls: Vec<String> = (0..6).map(|i| format!("http://{VIP}/k?i={i}")).collect();
        let codes = waymark_tests::curl_codes(world.pod(0, 0), &[], &urls)?;
        ensure!(
            codes.iter().all(|c| c == "200"),
            "requests failed on connections the endpoint closed: {codes:?}\n{}",
            world.node(0).agent_log()
        );
        let lines = server.lines();
        ensure!(
            lines.iter().any(|l| l == "closed"),
            "the server never closed a connection under a request, so nothing was tested: {lines:?}"
        );
        Ok(())
    });
}
