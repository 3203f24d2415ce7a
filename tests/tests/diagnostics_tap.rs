//! End-to-end tests of the operator's diagnostics on real agents: the live
//! tap (`waymark tap`, the admin API's `/tap`), diagnostic traces sent from
//! a pod (`waymark trace`), and changing the log filter at runtime
//! (`waymark log-level`).
//!
//! The taps' filters are checked against a known mix of requests (paths,
//! methods, statuses, authorities, latencies, source pods, services) sent
//! with curl from pods: each tap must show exactly the requests that match,
//! in order, and nothing else. Servers are the test
//! application (`testpeer http`) in pods (see tests/README.md).

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, services_toml};
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, Server, World, WorldBuilder, await_metric, curl_codes, eventually,
    http_app, metric, pod_ip, require_agent_or_skip, tap, tap_events as events, testpeer, waymark,
    with_world, world_name,
};

const WEB: &str = "10.96.0.30:80";
const API: &str = "10.96.0.31:80";

/// Two services on node 1's pods: `web` (n1p0) and `api` (n1p1). The
/// tests tag requests with query values (`?t=x1`), so tap shows queries as
/// sent here; redaction, the default, has its own test.
fn world(name: &str) -> WorldBuilder {
    world_with_tap_defaults(name).agent_config_extra("[diagnostics]\ntap_redact_query = false\n")
}

/// The two services alone, with the diagnostics' defaults (two nodes of
/// two pods, no mTLS).
fn world_with_tap_defaults(name: &str) -> WorldBuilder {
    World::builder(name).agent_config_extra(services_toml(&[
        Service::new("web", WEB).endpoint(Endpoint::pod(1, 0, 8080)),
        Service::new("api", API).endpoint(Endpoint::pod(1, 1, 8080)),
    ]))
}

/// The test application, named after the pod, for every method:
/// `/status/N` answers N, `/slow/MS` 200 after MS milliseconds, TRACE
/// echoes the request head; it prints `req <k> <method> <path> <status>`.
fn app(pod: &Pod, port: u16) -> Result<Server> {
    http_app(pod, port, pod.name(), &[])
}

fn url(vip: &str, path: &str) -> String {
    format!("http://{vip}{path}")
}

/// The `t=` tags of the requests a JSON tap showed, in order, after
/// checking that each shown request has its `req`, `rsp` and `end`.
fn tags(events: &[Value]) -> Result<Vec<String>> {
    let mut tags = Vec::new();
    for req in events.iter().filter(|e| e["type"] == "req") {
        let id = &req["id"];
        for kind in ["rsp", "end"] {
            ensure!(
                events.iter().any(|e| e["type"] == kind && &e["id"] == id),
                "no {kind} for {req}"
            );
        }
        let path = req["path"].as_str().unwrap_or_default();
        let tag = path.split("t=").nth(1).unwrap_or(path);
        tags.push(tag.to_string());
    }
    let n = |k: &str| events.iter().filter(|e| e["type"] == k).count();
    ensure!(
        n("rsp") == tags.len() && n("end") == tags.len(),
        "unpaired events: {events:?}"
    );
    Ok(tags)
}

/// (0) By default tap shows query strings with their values redacted in
/// the agent (keys kept): `?token=…` never leaves it; the application still
/// gets the query as sent.
#[test]
fn tap_redacts_query_values_by_default() {
    require_agent_or_skip!();
    let b = world_with_tap_defaults(world_name!());
    with_world(b, |world| {
        let node = world.node(0);
        let c0 = world.pod(0, 0);
        let _web = app(world.pod(1, 0), 8080)?;
        let out = tap(node, &["--max", "1", "-o", "json"], || {
            let codes = curl_codes(c0, &[], &[url(WEB, "/login?user=ann&token=s3cr3t-value")])?;
            ensure!(codes == ["200"], "{codes:?}");
            Ok(())
        })?;
        ensure!(
            !out.contains("s3cr3t-value"),
            "a query value left the agent: {out}"
        );
        let shown = events(&out)?;
        let req = shown
            .iter()
            .find(|e| e["type"] == "req")
            .context("no req event")?;
        ensure!(
            req["path"] == "/login?user=<redacted>&token=<redacted>",
            "{req}"
        );
        Ok(())
    });
}

/// (0b) `diagnostics.trace_context = "deny"`: a pod's `l5d-add-context`
/// gets no routing context (the TRACE is forwarded like any request); a
/// reload to `allow` brings it back for the next request.
#[test]
fn trace_context_can_be_denied_and_allowed_again() {
    require_agent_or_skip!();
    let b = world_with_tap_defaults(world_name!())
        .agent_config_extra("[diagnostics]\ntrace_context = \"deny\"\n");
    with_world(b, |world| {
        let node = world.node(0);
        let c0 = world.pod(0, 0);
        let _web = app(world.pod(1, 0), 8080)?;
        let trace = || {
            waymark_tests::curl(
                c0,
                &url(WEB, "/traced"),
                &["-X", "TRACE", "-H", "l5d-add-context: true"],
            )
        };
        let (code, body) = trace()?;
        ensure!(code == 200, "{code} {body}");
        ensure!(
            body.contains("TRACE /traced"),
            "the app did not get it: {body}"
        );
        ensure!(
            !body.contains("--- waymark"),
            "context added although denied: {body}"
        );
        node.update_config(|c| {
            let mut d = toml::Table::new();
            d.insert("trace_context".into(), "allow".into());
            c.insert("diagnostics".into(), toml::Value::Table(d));
        })?;
        eventually(Duration::from_secs(10), || {
            let (_, body) = trace()?;
            ensure!(body.contains("--- waymark node0 outbound ---"), "{body}");
            Ok(())
        })
    });
}

/// (1) Each filter shows exactly the requests that match it: source pod,
/// destination service, path prefix and method together; status class and
/// authority; minimum latency. The sample limit ends the stream by itself,
/// and the text lines read like `linkerd tap`'s. Credentials never leave
/// the agent.
#[test]
fn tap_filters_show_exactly_the_matching_requests() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let node = world.node(0);
        let (c0, c1) = (world.pod(0, 0), world.pod(0, 1));
        let _servers = [app(world.pod(1, 0), 8080)?, app(world.pod(1, 1), 8080)?];
        let get = |pod, vip, paths: &[&str]| {
            curl_codes(
                pod,
                &[],
                &paths.iter().map(|p| url(vip, p)).collect::<Vec<_>>(),
            )
        };

        // From n0p0, to web, path /a, GET: m1..m3 match; x* each miss one key.
        let out = tap(
            node,
            &[
                "--from",
                c0.name(),
                "--to",
                "web",
                "--path",
                "/a",
                "--method",
                "GET",
                "--max",
                "3",
                "--duration",
                "30s",
                "-o",
                "json",
            ],
            || {
                get(c0, WEB, &["/b?t=x1"])?;
                curl_codes(c0, &["-X", "POST"], &[url(WEB, "/a?t=x2")])?;
                get(c1, WEB, &["/a?t=x3"])?;
                get(c0, API, &["/a?t=x4"])?;
                get(c0, WEB, &["/a?t=m1"])?;
                curl_codes(c0, &["-X", "DELETE"], &[url(WEB, "/a/deep?t=x5")])?;
                get(c1, API, &["/a/deep?t=x6"])?;
                get(c0, WEB, &["/a/deep?t=m2", "/c?t=x7", "/a?t=m3"])?;
                Ok(())
            },
        )?;
        let ev = events(&out)?;
        assert_eq!(tags(&ev)?, ["m1", "m2", "m3"], "{out}");
        let req = ev.iter().find(|e| e["type"] == "req").unwrap();
        assert_eq!(req["src"]["pod"], c0.name(), "{req}");
        assert_eq!(
            req["src"]["addr"].as_str().unwrap().split(':').next(),
            Some(pod_ip(0, 0).as_str())
        );
        assert_eq!(
            req["dst"]["addr"],
            format!("{}:8080", pod_ip(1, 0)),
            "{req}"
        );
        assert_eq!(req["dst"]["dialled"], WEB, "{req}");
        assert_eq!(req["dst"]["service"], "web", "{req}");
        assert_eq!(req["method"], "GET", "{req}");
        let end = ev.iter().find(|e| e["type"] == "end").unwrap();
        assert_eq!(
            end["response_bytes"].as_u64(),
            Some(format!("{} /a?t=m1\n", world.pod(1, 0).name()).len() as u64),
            "{end}"
        );

        // Status class and authority: only 5xx answers to web.test.
        let out = tap(
            node,
            &[
                "--status",
                "5xx",
                "--authority",
                "web.test",
                "--max",
                "2",
                "--duration",
                "30s",
                "-o",
                "json",
            ],
            || {
                let host = ["-H", "Host: web.test"];
                curl_codes(
                    c0,
                    &host,
                    &[url(WEB, "/status/200?t=x1"), url(WEB, "/status/404?t=x2")],
                )?;
                curl_codes(c1, &host, &[url(WEB, "/status/503?t=m1")])?;
                curl_codes(
                    c0,
                    &["-H", "Host: other.test"],
                    &[url(WEB, "/status/500?t=x3")],
                )?;
                curl_codes(
                    c0,
                    &host,
                    &[url(API, "/status/201?t=x4"), url(API, "/status/500?t=m2")],
                )?;
                Ok(())
            },
        )?;
        let ev = events(&out)?;
        assert_eq!(tags(&ev)?, ["m1", "m2"], "{out}");
        let statuses: Vec<u64> = ev
            .iter()
            .filter(|e| e["type"] == "rsp")
            .filter_map(|e| e["status"].as_u64())
            .collect();
        assert_eq!(statuses, [503, 500]);

        // Minimum latency: only the slow request.
        let out = tap(
            node,
            &[
                "--min-latency",
                "300ms",
                "--max",
                "1",
                "--duration",
                "30s",
                "-o",
                "json",
            ],
            || {
                get(
                    c0,
                    WEB,
                    &[
                        "/slow/0?t=x1",
                        "/slow/10?t=x2",
                        "/slow/500?t=m1",
                        "/slow/0?t=x3",
                    ],
                )?;
                Ok(())
            },
        )?;
        let ev = events(&out)?;
        assert_eq!(tags(&ev)?, ["m1"], "{out}");
        let rsp = ev.iter().find(|e| e["type"] == "rsp").unwrap();
        assert!(rsp["latency_us"].as_u64().unwrap() >= 300_000, "{rsp}");

        // The sample limit alone ends the stream (no --duration), in text.
        let started = Instant::now();
        let out = tap(node, &["--max", "5"], || {
            let urls: Vec<String> = (1..=20).map(|i| url(WEB, &format!("/n?i={i}"))).collect();
            curl_codes(c0, &[], &urls)?;
            Ok(())
        })?;
        assert!(started.elapsed() < Duration::from_secs(60));
        let lines: Vec<&str> = out.lines().collect();
        let count = |k: &str| lines.iter().filter(|l| l.starts_with(k)).count();
        assert_eq!(
            (count("req "), count("rsp "), count("end ")),
            (5, 5, 5),
            "{out}"
        );
        assert_eq!(lines.len(), 15, "{out}");
        let src = format!("src={}:", pod_ip(0, 0));
        let dst = format!("dst={}:8080 tls=no_identity", pod_ip(1, 0));
        for l in &lines {
            assert!(
                l.contains(" proxy=out ") && l.contains(&src) && l.contains(&dst),
                "{l}"
            );
        }
        let req = lines.iter().find(|l| l.starts_with("req ")).unwrap();
        assert!(
            // curl leaves the default port out of Host.
            req.contains(&format!(
                ":method=GET :authority={} :path=/n?i=1",
                WEB.trim_end_matches(":80")
            )),
            "{req}"
        );
        let rsp = lines.iter().find(|l| l.starts_with("rsp ")).unwrap();
        assert!(
            rsp.contains(":status=200 source=app latency=") && rsp.ends_with("µs"),
            "{rsp}"
        );
        let end = lines.iter().find(|l| l.starts_with("end ")).unwrap();
        assert!(
            end.contains(" duration=")
                && end.contains(" response-length=")
                && end.contains(" source=app"),
            "{end}"
        );
        await_metric(node, "waymark_tap_streams", &[], 0.0)?;

        // Credentials are redacted; other headers are shown.
        let out = tap(
            node,
            &[
                "--path",
                "/secret",
                "--max",
                "1",
                "--duration",
                "30s",
                "-o",
                "json",
            ],
            || {
                let h = [
                    "-H",
                    "Authorization: Bearer s3cr3t-t0ken",
                    "-H",
                    "Cookie: session=c00kie-value",
                    "-H",
                    "x-api-key: k3y-value",
                    "-H",
                    "x-visible: shown",
                ];
                curl_codes(c0, &h, &[url(WEB, "/secret")])?;
                Ok(())
            },
        )?;
        for secret in ["s3cr3t", "c00kie", "k3y-value"] {
            assert!(!out.contains(secret), "{secret} leaked: {out}");
        }
        let ev = events(&out)?;
        let req = ev.iter().find(|e| e["type"] == "req").context("no req")?;
        let header = |n: &str| {
            req["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|h| h["name"] == n)
                .and_then(|h| h["value"].as_str())
                .map(str::to_string)
        };
        assert_eq!(
            header("authorization").as_deref(),
            Some("Bearer <redacted>"),
            "{req}"
        );
        assert_eq!(header("cookie").as_deref(), Some("<redacted>"), "{req}");
        assert_eq!(header("x-api-key").as_deref(), Some("<redacted>"), "{req}");
        assert_eq!(header("x-visible").as_deref(), Some("shown"), "{req}");

        // A connection to an address that is no service is opaque TCP: one
        // `tcp` event when it closes, matched by source and destination.
        let direct = format!("{}:8080", pod_ip(1, 0));
        let out = tap(
            node,
            &[
                "--from",
                c0.name(),
                "--to",
                &direct,
                "--max",
                "1",
                "--duration",
                "30s",
                "-o",
                "json",
            ],
            || {
                curl_codes(c1, &[], &[format!("http://{direct}/x1")])?;
                curl_codes(c0, &[], &[format!("http://{direct}/m1")])?;
                Ok(())
            },
        )?;
        let ev = events(&out)?;
        assert_eq!(ev.len(), 1, "{out}");
        let tcp = &ev[0];
        assert_eq!(tcp["type"], "tcp", "{tcp}");
        assert_eq!(tcp["src"]["pod"], c0.name(), "{tcp}");
        assert_eq!(tcp["dst"]["addr"], direct, "{tcp}");
        assert_eq!(tcp["close"], "eof", "{tcp}");
        assert!(
            tcp["bytes_out"].as_u64() > Some(0) && tcp["bytes_in"].as_u64() > Some(0),
            "{tcp}"
        );

        // A bad filter is refused with the reason, before streaming.
        let out = node.run(waymark().args(["tap", "--status", "7xx"]))?;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("5xx"));
        let (status, body) = node.admin_socket_get("/tap?colour=red")?;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("unknown tap filter"), "{body}");
        Ok(())
    });
}

/// The agent's resident memory, KiB.
fn rss_kib(node: &Node) -> Result<u64> {
    let pid = node.agent_pid().context("no agent")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Opens `/tap` on a raw connection to the admin socket and returns it
/// (head not read).
fn raw_tap(node: &Node, query: &str) -> Result<std::os::unix::net::UnixStream> {
    let mut s = std::os::unix::net::UnixStream::connect(node.admin_socket())?;
    write!(s, "GET /tap{query} HTTP/1.1\r\nHost: admin\r\n\r\n")?;
    Ok(s)
}

/// (2) A tap whose consumer never reads does not slow traffic or grow the
/// agent's memory with the events it cannot deliver: they are dropped,
/// counted, and the stream says so once it is read again. A client that
/// goes away ends its tap, also while nothing is being sent.
#[test]
fn a_stuck_tap_consumer_is_bounded_and_told() {
    require_agent_or_skip!();
    const FAST_VIP: &str = "10.96.0.33:80";
    const REQUESTS: u32 = 8_000;
    let fast = Service::new("fast", FAST_VIP).endpoint(Endpoint::pod(1, 0, 8080));
    let b = World::builder(world_name!())
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[fast]));
    with_world(b, |world| {
        let node = world.node(0);
        let _fast = waymark_tests::support::fast_http(world.pod(1, 0), 8080)?;
        // Warm up (pool, allocator) before the baseline.
        curl_codes(world.pod(0, 0), &[], &[url(FAST_VIP, "/warm")])?;
        let before = rss_kib(node)?;

        let mut stuck = raw_tap(node, "")?;
        await_metric(node, "waymark_tap_streams", &[], 1.0)?;
        // 30 headers of 240 bytes: every req event is ~8 KiB, so this run's
        // events (~65 MiB) do not fit in the bound the agent must keep to.
        let pad = "p".repeat(240);
        let headers: Vec<String> = (0..30).map(|i| format!("x-pad-{i:02}: {pad}")).collect();
        let mut cmd = Command::new("h2load");
        cmd.args(["--h1", "-n", &REQUESTS.to_string(), "-c", "8", "-t", "1"]);
        for h in &headers {
            cmd.args(["-H", h]);
        }
        cmd.arg(url(FAST_VIP, "/load"));
        let started = Instant::now();
        let out = world
            .pod(0, 0)
            .run_timeout(&mut cmd, Duration::from_secs(240))?;
        let took = started.elapsed();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let want = format!("{REQUESTS} succeeded, 0 failed, 0 errored, 0 timeout");
        assert!(
            report.contains(&want),
            "h2load through the tapped agent:\n{report}"
        );
        let after = rss_kib(node)?;
        let grown = after.saturating_sub(before);
        eprintln!("{REQUESTS} requests in {took:?}; agent RSS {before} KiB -> {after} KiB");
        assert!(
            grown < 32 * 1024,
            "agent memory grew by {grown} KiB while the tap consumer was stuck"
        );
        let dropped = metric(node, "waymark_tap_dropped_events_total", &[])?;
        assert!(dropped > 0.0, "nothing was dropped");

        // Now read: the queued events, then the report of what was lost.
        stuck.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(30);
        let found = loop {
            if let Some(i) = find(&seen, br#""type":"dropped","count":"#) {
                break Some(i);
            }
            if Instant::now() > deadline {
                break None;
            }
            match stuck.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => bail!("reading the tap: {e}"),
            }
            // Keep the search window small.
            if seen.len() > 1 << 20 {
                seen.drain(..seen.len() - 4096);
            }
        };
        let at = found.context("the stream never said events were dropped")?;
        let tail = String::from_utf8_lossy(&seen[at..]).into_owned();
        let count: u64 = tail
            .split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
            .context("dropped count")?;
        assert!(count > 0, "{tail}");

        // Untapped traffic still flows, and going away ends the tap.
        drop(stuck);
        await_metric(node, "waymark_tap_streams", &[], 0.0)?;
        curl_codes(world.pod(0, 0), &[], &[url(FAST_VIP, "/after")])?;

        // An idle tap whose client leaves is closed too.
        let idle = raw_tap(node, "?path=/nothing")?;
        await_metric(node, "waymark_tap_streams", &[], 1.0)?;
        drop(idle);
        await_metric(node, "waymark_tap_streams", &[], 0.0)?;
        Ok(())
    });
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// (3) `waymark trace --pod` sends from inside the pod (its cgroup and
/// netns): the kernel redirects it to the agent like the pod's own traffic,
/// and the answer carries the agent's hop block naming the endpoint it
/// selected. `--node` sends it unproxied, for comparison.
#[test]
fn trace_from_a_pod_shows_the_hop_block() {
    require_agent_or_skip!();
    let b = world(world_name!());
    with_world(b, |world| {
        let node = world.node(0);
        let web = world.pod(1, 0);
        let server = app(web, 8080)?;
        // A process of the pod, as a real pod has, whose cgroup the CLI joins.
        world.pod(0, 0).spawn(Command::new("sleep").arg("120"))?;
        let endpoint = format!("{}:8080", web.ip());

        let out =
            node.run_ok(waymark().args(["trace", &url(WEB, "/hello"), "--pod", "default/n0p0"]))?;
        assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
        assert!(
            out.contains(&format!("--- waymark {} outbound ---", node.name())),
            "{out}"
        );
        assert!(
            out.contains(&format!("service name: web (dialled {WEB})")),
            "{out}"
        );
        assert!(
            out.contains(&format!("selected address: {endpoint}")),
            "{out}"
        );
        assert!(
            out.contains("TRACE /hello HTTP/1.1"),
            "the endpoint's echo: {out}"
        );
        assert!(
            out.contains(&format!("from pod {}", world.pod(0, 0).name())),
            "{out}"
        );
        assert!(out.contains(&pod_ip(0, 0)), "{out}");
        // The server's output is read by another thread: give it a moment.
        eventually(DEFAULT_PATIENCE, || {
            ensure!(
                server.lines().iter().any(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w.first() == Some(&"req") && w.get(2..) == Some(&["TRACE", "/hello", "200"][..])
                }),
                "the server did not log the traced request: {:?}",
                server.lines()
            );
            Ok(())
        })
        .unwrap();

        // Another method: the hop's context comes back as a header.
        let out = node.run_ok(waymark().args([
            "trace",
            &url(WEB, "/hi"),
            "--pod",
            "n0p1",
            "-X",
            "GET",
            "-H",
            "x-test: 1",
        ]))?;
        assert!(out.contains("l5d-context: "), "{out}");
        assert!(out.contains(&format!("endpoint={endpoint}")), "{out}");
        assert!(out.contains(&format!("{} /hi", web.name())), "{out}");

        // From the node: straight to the endpoint, no hop block.
        let out =
            node.run_ok(waymark().args(["trace", &format!("http://{endpoint}/direct"), "--node"]))?;
        assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
        assert!(!out.contains("--- waymark"), "{out}");

        // A pod the agent does not have is an error that lists its pods.
        let out = node.run(waymark().args(["trace", &url(WEB, "/"), "--pod", "nope"]))?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("default/n0p0"), "{err}");
        Ok(())
    });
}

/// (4) `waymark log-level set` changes the agent's filter at runtime: debug
/// lines appear in its log from then on and `get` shows the filter; a bad
/// filter is refused and the one in force stays.
#[test]
fn log_level_changes_at_runtime() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .agent_env("RUST_LOG", "waymark=info,warn");
    with_world(b, |world| {
        let node = world.node(0);
        let (client, server) = (world.pod(0, 0), world.pod(0, 1));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let target = format!("{}:7000", server.ip());
        let connect = || -> Result<()> {
            client.run_ok(&mut testpeer([
                "client",
                "--connect",
                &target,
                "--bytes",
                "100",
            ]))?;
            Ok(())
        };
        let debug_lines = || {
            node.agent_log()
                .lines()
                .filter(|l| l.contains(" DEBUG ") && l.contains("connection closed"))
                .count()
        };
        let log_level = |args: &[&str]| node.run(waymark().arg("log-level").args(args));

        let got = log_level(&["get"])?;
        let shown = String::from_utf8_lossy(&got.stdout).into_owned();
        assert!(shown.contains("waymark=info"), "{got:?}");
        connect()?;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            debug_lines(),
            0,
            "debug lines at info:\n{}",
            node.agent_log()
        );

        let set = log_level(&["set", "waymark=debug"])?;
        assert!(set.status.success(), "{set:?}");
        assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "waymark=debug");
        let got = log_level(&["get"])?;
        assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "waymark=debug");
        connect()?;
        eventually(Duration::from_secs(10), || {
            ensure!(debug_lines() > 0, "no debug line yet");
            Ok(())
        })
        .with_context(|| node.agent_log())?;

        let bad = log_level(&["set", "waymark=loud"])?;
        assert!(!bad.status.success(), "a bad filter was accepted: {bad:?}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains("400") && err.contains("waymark=loud"), "{err}");
        let got = log_level(&["get"])?;
        assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "waymark=debug");
        Ok(())
    });
}
