//! End-to-end tests of the live tap on both sides of the mTLS tunnel, and
//! of `waymark top` built on it: a client pod on node 0 calls an HTTP
//! server pod on node 1 through a service; node 0's agent proxies the
//! requests out (`proxy=out`), node 1's agent serves them on tunnel streams
//! (`proxy=in`, the client's verified identity, the pod, `tls=true`).
//!
//! Every assertion counts against a known burst of requests: 30 to `/a`
//! (answered 200) and 10 to `/b` (answered 500), sent with curl from the
//! client pod; the server is the test application (`testpeer http`).

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
use waymark_tests::world::agent::pod_identity;
use waymark_tests::{
    Node, Pod, Server, World, await_metric, http_app, require_agent_or_skip, testpeer, with_world,
    world_name,
};

const VIP: &str = "10.96.0.50:80";
/// An opaque echo service (testpeer) on the same pod.
const ECHO_VIP: &str = "10.96.0.51:7000";
const PORT: u16 = 8080;
/// Requests of one burst: every fourth to `/b`.
const REQUESTS: usize = 40;
const TO_A: usize = 30;
const TO_B: usize = 10;

fn world(name: &str) -> waymark_tests::WorldBuilder {
    let services = [
        Service::new("web", VIP).endpoint(Endpoint::meshed(1, 0, PORT)),
        Service::new("echo", ECHO_VIP).endpoint(Endpoint::meshed(1, 0, 7000)),
    ];
    meshed_pair(name, 1, &services)
        // The tests follow requests by their query values (`?i=N`): tap
        // shows queries as sent here (redaction, the default, is tested in
        // diagnostics_tap.rs).
        .agent_config_extra("[diagnostics]\ntap_redact_query = false\n")
}

/// The test application, named after the pod: `/b…` answers 500,
/// anything else 200 with `<pod> <path>`.
fn app(pod: &Pod) -> Result<Server> {
    http_app(pod, PORT, pod.name(), &["--status", "/b=500"])
}

fn waymark() -> Command {
    let bin = waymark_tests::world::agent::waymark_bin().expect("the waymark binary");
    Command::new(bin)
}

/// The burst's paths, in the order sent: `/a?i=N` and, every fourth,
/// `/b?i=N`.
fn paths() -> Vec<String> {
    (0..REQUESTS)
        .map(|i| {
            if i % 4 == 3 {
                format!("/b?i={i}")
            } else {
                format!("/a?i={i}")
            }
        })
        .collect()
}

/// Sends the burst from `client` (one curl, one connection) and checks the
/// answers: 200 for `/a`, 500 for `/b`.
fn burst(client: &Pod) -> Result<()> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "20"])
        .args(["-w", "%{http_code}\n"]);
    for p in paths() {
        cmd.args(["-o", "/dev/null", &format!("http://{VIP}{p}")]);
    }
    let out = client.run_timeout(&mut cmd, Duration::from_secs(60))?;
    let codes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<&str> = paths()
        .iter()
        .map(|p| if p.starts_with("/b") { "500" } else { "200" })
        .collect();
    ensure!(
        codes == want,
        "curl through the tunnel: {codes:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CLI command (`tap` or `top`: each opens one tap stream) to run on a
/// node while the burst is sent.
struct Run<'a> {
    node: &'a Node,
    args: Vec<String>,
}

fn on<'a>(node: &'a Node, args: &[&str]) -> Run<'a> {
    Run {
        node,
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

/// Runs every command at once, waits until every node has all its tap
/// streams open, sends the burst, and returns each command's stdout (each
/// must end by itself: `--max` or `--duration`).
fn during_burst(world: &World, runs: &[Run<'_>]) -> Result<Vec<String>> {
    during(world, runs, || burst(world.pod(0, 0)))
}

/// [`during_burst`] with other traffic.
fn during(
    world: &World,
    runs: &[Run<'_>],
    traffic: impl FnOnce() -> Result<()>,
) -> Result<Vec<String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|r| {
                s.spawn(move || {
                    r.node
                        .run_timeout(waymark().args(&r.args), Duration::from_secs(120))
                })
            })
            .collect();
        let mut opened = Ok(());
        for node in world.nodes() {
            let n = runs.iter().filter(|r| r.node.name() == node.name()).count();
            if n > 0 && opened.is_ok() {
                opened = await_metric(node, "waymark_tap_streams", &[], n as f64);
            }
        }
        let sent = opened.and_then(|()| traffic());
        let outs: Vec<Result<Output>> = handles
            .into_iter()
            .map(|h| h.join().expect("a CLI thread"))
            .collect();
        sent?;
        runs.iter()
            .zip(outs)
            .map(|(r, out)| {
                let out = out?;
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                ensure!(
                    out.status.success(),
                    "waymark {:?} on {}: {}\nstdout: {stdout}\nstderr: {}",
                    r.args,
                    r.node.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(stdout)
            })
            .collect()
    })
}

fn events(out: &str) -> Result<Vec<Value>> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("tap line {l:?}")))
        .collect()
}

/// The `req` events, after checking each has its `rsp` and `end` and
/// nothing else is there.
fn requests(events: &[Value]) -> Result<Vec<&Value>> {
    let reqs: Vec<&Value> = events.iter().filter(|e| e["type"] == "req").collect();
    for req in &reqs {
        for kind in ["rsp", "end"] {
            ensure!(
                events
                    .iter()
                    .filter(|e| e["type"] == kind && e["id"] == req["id"])
                    .count()
                    == 1,
                "no single {kind} for {req}"
            );
        }
    }
    ensure!(
        events.len() == 3 * reqs.len(),
        "unpaired or unexpected events: {events:?}"
    );
    Ok(reqs)
}

fn req_paths(reqs: &[&Value]) -> Vec<String> {
    reqs.iter()
        .map(|r| r["path"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn status_of(events: &[Value], id: &Value) -> Option<u64> {
    events
        .iter()
        .find(|e| e["type"] == "rsp" && &e["id"] == id)
        .and_then(|e| e["status"].as_u64())
}

/// (a) Node 1's tap shows exactly the burst as inbound requests (the
/// client's identity and address, the pod, `tls=true`, the statuses, the
/// kernel's view of the pod connection), node 0's shows it as outbound
/// (through the tunnel: `tls=true` too);
/// path, direction, destination, source, status and sample-limit filters
/// select exactly the matching requests; a filter that matches nothing
/// shows nothing. An opaque stream through the tunnel is one inbound `tcp`
/// event.
#[test]
fn inbound_tap_shows_what_crossed_the_tunnel() {
    require_agent_or_skip!();
    with_world(world(world_name!()), |world| {
        let (n0, n1) = (world.node(0), world.node(1));
        let (client, server) = (world.pod(0, 0), world.pod(1, 0));
        let _app = app(server)?;
        let server_addr = format!("{}:{PORT}", server.ip());
        let client_id = pod_identity(client.name());
        let all = REQUESTS.to_string();
        let json = ["--duration", "60s", "-o", "json"];
        let tap = |node, extra: &[&str]| {
            let mut a = vec!["tap"];
            a.extend_from_slice(extra);
            a.extend_from_slice(&json);
            on(node, &a)
        };
        let outs = during_burst(
            world,
            &[
                // 0: node 1, everything it saw.
                tap(n1, &["--max", &all]),
                // 1: node 0, everything it saw.
                tap(n0, &["--max", &all]),
                // 2: node 1, /b only.
                tap(n1, &["--path", "/b", "--max", &TO_B.to_string()]),
                // 3: node 1, inbound, from the client's workload to the pod.
                tap(
                    n1,
                    &[
                        "--direction",
                        "in",
                        "--from",
                        client.name(),
                        "--to",
                        server.name(),
                        "--max",
                        &all,
                    ],
                ),
                // 4: node 1, the first five only.
                tap(n1, &["--max", "5"]),
                // 5: node 1, 5xx by the whole SPIFFE ID.
                tap(
                    n1,
                    &[
                        "--status",
                        "5xx",
                        "--from",
                        &client_id,
                        "--max",
                        &TO_B.to_string(),
                    ],
                ),
                // 6, 7: nothing matches: node 1 proxies nothing out, node 0
                // serves nothing in.
                on(
                    n1,
                    &[
                        "tap",
                        "--direction",
                        "out",
                        "--duration",
                        "12s",
                        "-o",
                        "json",
                    ],
                ),
                on(
                    n0,
                    &[
                        "tap",
                        "--direction",
                        "in",
                        "--duration",
                        "12s",
                        "-o",
                        "json",
                    ],
                ),
                // 8: node 1, another source identity.
                on(
                    n1,
                    &[
                        "tap",
                        "--from",
                        "default/nobody",
                        "--duration",
                        "12s",
                        "-o",
                        "json",
                    ],
                ),
                // 9: node 1, text lines.
                on(n1, &["tap", "--max", "1", "-o", "wide"]),
            ],
        )?;

        // Node 1: the burst, in order, inbound.
        let ev = events(&outs[0])?;
        let reqs = requests(&ev)?;
        assert_eq!(req_paths(&reqs), paths(), "{}", outs[0]);
        for e in &ev {
            assert_eq!(e["proxy"], "in", "{e}");
            assert_eq!(e["tls"], "true", "{e}");
            assert_eq!(e["src"]["identity"], client_id.as_str(), "{e}");
            assert_eq!(
                e["src"]["addr"]
                    .as_str()
                    .unwrap()
                    .rsplit_once(':')
                    .unwrap()
                    .0,
                client.ip().to_string(),
                "{e}"
            );
            assert_eq!(e["dst"]["addr"], server_addr.as_str(), "{e}");
            assert_eq!(e["dst"]["pod"], server.name(), "{e}");
            assert_eq!(e["dst"]["service"], "web", "{e}");
        }
        for r in &reqs {
            let want = if r["path"].as_str().unwrap().starts_with("/b") {
                500
            } else {
                200
            };
            assert_eq!(status_of(&ev, &r["id"]), Some(want), "{r}");
            assert_eq!(r["method"], "GET");
        }
        let end = ev.iter().find(|e| e["type"] == "end").unwrap();
        assert_eq!(
            end["response_bytes"].as_u64(),
            Some(format!("{} /a?i=0\n", server.name()).len() as u64),
            "{end}"
        );
        // The kernel diagnostics run in the world: the end names the
        // agent's connection to the pod.
        assert_eq!(end["kernel"]["peer"], server_addr.as_str(), "{end}");

        // Node 0: the same burst, outbound, from the client pod.
        let ev0 = events(&outs[1])?;
        let reqs0 = requests(&ev0)?;
        assert_eq!(req_paths(&reqs0), paths(), "{}", outs[1]);
        for e in &ev0 {
            assert_eq!(e["proxy"], "out", "{e}");
            // The endpoint is on node 1: the request went through the tunnel.
            assert_eq!(e["tls"], "true", "{e}");
            assert_eq!(e["src"]["pod"], client.name(), "{e}");
            assert_eq!(e["dst"]["addr"], server_addr.as_str(), "{e}");
            assert!(e["src"].get("identity").is_none(), "{e}");
        }

        // Filters.
        let b: Vec<String> = paths()
            .into_iter()
            .filter(|p| p.starts_with("/b"))
            .collect();
        let ev = events(&outs[2])?;
        assert_eq!(req_paths(&requests(&ev)?), b, "--path /b: {}", outs[2]);
        let ev = events(&outs[3])?;
        assert_eq!(
            req_paths(&requests(&ev)?),
            paths(),
            "--direction in --from --to: {}",
            outs[3]
        );
        let ev = events(&outs[4])?;
        assert_eq!(
            req_paths(&requests(&ev)?),
            paths()[..5],
            "--max 5: {}",
            outs[4]
        );
        let ev = events(&outs[5])?;
        assert_eq!(req_paths(&requests(&ev)?), b, "--status 5xx: {}", outs[5]);
        for (i, what) in [
            (6, "--direction out on node1"),
            (7, "--direction in on node0"),
            (8, "--from default/nobody"),
        ] {
            assert_eq!(outs[i].trim(), "", "{what}");
        }

        // Text: Linkerd's `proxy=in`, `tls=true`; wide names the peer and the pod.
        let lines: Vec<&str> = outs[9].lines().collect();
        assert_eq!(lines.len(), 3, "{}", outs[9]);
        let head = format!(" proxy=in src={}:", client.ip());
        assert!(
            lines[0].starts_with("req id=") && lines[0].contains(&head),
            "{}",
            lines[0]
        );
        for l in &lines {
            assert!(
                l.contains(&format!(" dst={server_addr} tls=true "))
                    && l.contains(&format!(
                        " src_identity={client_id} dst_pod={}",
                        server.name()
                    )),
                "{l}"
            );
        }
        assert!(lines[0].contains(" :method=GET "), "{}", lines[0]);
        assert!(
            lines[1].starts_with("rsp ") && lines[1].contains(":status=200"),
            "{}",
            lines[1]
        );
        assert!(lines[2].starts_with("end "), "{}", lines[2]);

        // An opaque stream through the tunnel: one `tcp` event on node 1
        // when it closes, with the bytes both ways; an HTTP-only filter
        // does not take it.
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let outs = during(
            world,
            &[
                on(
                    n1,
                    &["tap", "--max", "1", "--duration", "60s", "-o", "json"],
                ),
                on(
                    n1,
                    &["tap", "--path", "/", "--duration", "12s", "-o", "json"],
                ),
            ],
            || {
                let out = client.run_ok(&mut testpeer([
                    "client",
                    "--connect",
                    ECHO_VIP,
                    "--bytes",
                    "5000",
                ]))?;
                let report: Value = serde_json::from_str(out.trim())?;
                ensure!(report["identical"] == true, "{report}");
                Ok(())
            },
        )?;
        let ev = events(&outs[0])?;
        assert_eq!(ev.len(), 1, "{}", outs[0]);
        let tcp = &ev[0];
        assert_eq!(tcp["type"], "tcp", "{tcp}");
        assert_eq!(tcp["proxy"], "in", "{tcp}");
        assert_eq!(tcp["tls"], "true", "{tcp}");
        assert_eq!(tcp["src"]["identity"], client_id.as_str(), "{tcp}");
        assert_eq!(tcp["dst"]["addr"], format!("{}:7000", server.ip()), "{tcp}");
        assert_eq!(tcp["dst"]["pod"], server.name(), "{tcp}");
        assert_eq!(tcp["dst"]["service"], "echo", "{tcp}");
        assert_eq!(tcp["close"], "eof", "{tcp}");
        assert_eq!(
            (tcp["bytes_out"].as_u64(), tcp["bytes_in"].as_u64()),
            (Some(5000), Some(5000)),
            "{tcp}"
        );
        assert_eq!(outs[1].trim(), "", "an HTTP filter took an opaque stream");
        Ok(())
    });
}

/// (b) `waymark top` over the burst counts exactly what was sent per path,
/// with its success rate, on the receiving node and the sending node; the
/// JSON agrees with the table.
#[test]
fn top_counts_the_burst_per_path() {
    require_agent_or_skip!();
    with_world(world(world_name!()), |world| {
        let (n0, n1) = (world.node(0), world.node(1));
        let (client, server) = (world.pod(0, 0), world.pod(1, 0));
        let _app = app(server)?;
        let top = |node, extra: &[&str]| {
            let mut a = vec!["top", "--duration", "10s"];
            a.extend_from_slice(extra);
            on(node, &a)
        };
        let outs = during_burst(
            world,
            &[
                top(n1, &[]),
                top(n1, &["-o", "json"]),
                top(n0, &["-o", "json"]),
                top(n1, &["--path", "/b", "-o", "json"]),
                // Not a terminal, no --duration: the default 10s, one table.
                on(n1, &["top", "--path", "/a"]),
            ],
        )?;

        // The table on node 1: the client's workload, the pod, /a then /b.
        let table = &outs[0];
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "Source",
                "Destination",
                "Method",
                "Path",
                "Count",
                "Best",
                "Worst",
                "Last",
                "Success",
                "Rate",
                "Failures"
            ],
            "{table}"
        );
        // The 500s are the application's, and top says so.
        let app_failures = format!("app={TO_B}");
        for (line, path, count, rate, failures) in [
            (lines[1], "/a", TO_A, "100.00%", "-"),
            (lines[2], "/b", TO_B, "0.00%", app_failures.as_str()),
        ] {
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cells.len(), 10, "{table}");
            assert_eq!(cells[9], failures, "{table}");
            assert_eq!(
                (cells[0], cells[1], cells[2], cells[3], cells[4], cells[8]),
                (
                    client.name(),
                    server.name(),
                    "GET",
                    path,
                    count.to_string().as_str(),
                    rate
                ),
                "{table}"
            );
            for latency in &cells[5..8] {
                assert!(latency.ends_with("ms"), "{table}");
            }
        }

        // JSON: the same counts, on both nodes (node 0 names the endpoint).
        let server_addr = format!("{}:{PORT}", server.ip());
        for (out, direction, destination) in [
            (&outs[1], "in", server.name().to_string()),
            (&outs[2], "out", server_addr.clone()),
        ] {
            let v: Value = serde_json::from_str(out).with_context(|| out.clone())?;
            let rows = v["rows"].as_array().context("rows")?;
            assert_eq!(rows.len(), 2, "{v}");
            for (row, path, count, ok) in [(&rows[0], "/a", TO_A, 1.0), (&rows[1], "/b", TO_B, 0.0)]
            {
                assert_eq!(row["direction"], direction, "{row}");
                assert_eq!(row["source"], client.name(), "{row}");
                assert_eq!(row["destination"], destination.as_str(), "{row}");
                assert_eq!(row["method"], "GET", "{row}");
                assert_eq!(row["path"], path, "{row}");
                assert_eq!(row["count"], count, "{row}");
                assert_eq!(row["success_rate"], ok, "{row}");
                // Both ends: the pod's 500s are the application's (the
                // sending agent reads no proxy answer from its peer).
                let sources = if ok == 1.0 {
                    serde_json::json!({})
                } else {
                    serde_json::json!({ "app": count })
                };
                assert_eq!(row["failure_sources"], sources, "{row}");
                let (best, worst) = (row["best_us"].as_u64(), row["worst_us"].as_u64());
                assert!(best.is_some() && best <= worst, "{row}");
            }
            assert_eq!(v["dropped_events"], 0, "{v}");
        }

        // The filter applies: /b only.
        let v: Value = serde_json::from_str(&outs[3])?;
        let rows = v["rows"].as_array().context("rows")?;
        assert_eq!(rows.len(), 1, "{v}");
        assert_eq!(
            (rows[0]["path"].as_str(), rows[0]["count"].as_u64()),
            (Some("/b"), Some(TO_B as u64))
        );
        let lines: Vec<&str> = outs[4].lines().collect();
        assert_eq!(lines.len(), 2, "{}", outs[4]);
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            (cells[3], cells[4], cells[8]),
            ("/a", TO_A.to_string().as_str(), "100.00%"),
            "{}",
            outs[4]
        );
        Ok(())
    });
}
