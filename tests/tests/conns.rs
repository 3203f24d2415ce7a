//! End to end: `waymark conns` (admin `GET /conns`) lists the connections
//! the agents carry now, on both sides of the mTLS tunnel.
//!
//! A pod opens a long-lived opaque connection to a service on the other
//! node (through the tunnel) and a keep-alive HTTP/1.1 connection to a
//! service on its own node, and keeps both open: node 0's table lists them
//! with the pod, the original destination, the service, the endpoint, the
//! protocol, the tunnel, the bytes and the requests; node 1's lists the
//! tunnel stream to its pod as inbound; every filter narrows the list; a bad
//! filter is refused with what it takes; a closed connection leaves the
//! table. And the kernel's counters are joined to the connection by
//! 5-tuple: packets dropped on the way to the endpoint show as the
//! upstream leg's retransmits. They need root and eBPF (and nftables for
//! the last); see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair, services_toml};
use waymark_tests::{
    DEFAULT_PATIENCE, Node, Pod, Server, World, eventually, http_app, nft_in, pod_ip, python,
    require_agent_or_skip, testpeer, waymark, with_world, world_name,
};

/// Opens both connections, uses them, prints `ready DB_PORT WEB_PORT`
/// (its local ports: the table's source ports), closes the HTTP one once
/// the file `argv[1]` exists, and holds the opaque one until killed.
const CLIENT: &str = r#"
import http.client, os, socket, sys, time
marker, db_host, db_port, web_host, web_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
db = socket.create_connection((db_host, db_port))
db.sendall(b"x" * 1000)
got = b""
while len(got) < 1000:
    chunk = db.recv(4096)
    if not chunk:
        sys.exit("the echo closed early")
    got += chunk
web = http.client.HTTPConnection(web_host, web_port)
for _ in range(3):
    web.request("GET", "/hello")
    r = web.getresponse()
    assert r.status == 200 and r.read() == b"web /hello\n", r.status
print("ready", db.getsockname()[1], web.sock.getsockname()[1], flush=True)
while not os.path.exists(marker):
    time.sleep(0.05)
web.close()
print("closed", flush=True)
time.sleep(600)
"#;

const DB_VIP: &str = "10.96.0.70";
const WEB_VIP: &str = "10.96.0.71";

/// `db`: opaque, its endpoint an echo server on node 1 (through the
/// tunnel); `web`: HTTP/1.1, its endpoint on node 0 (direct).
fn services() -> [Service; 2] {
    [
        Service::new("db", &format!("{DB_VIP}:5432"))
            .protocol("opaque")
            .endpoint(Endpoint::meshed(1, 0, 7000)),
        Service::new("web", &format!("{WEB_VIP}:80"))
            .protocol("http1")
            .endpoint(Endpoint::pod(0, 1, 8080)),
    ]
}

fn conns(node: &Node, query: &str) -> Result<Value> {
    let (status, body) = node.admin_socket_get(&format!("/conns{query}"))?;
    ensure!(status == 200, "/conns{query}: {status} {body}");
    serde_json::from_str(&body).with_context(|| body.clone())
}

fn rows(report: &Value) -> Vec<Value> {
    report["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The one row whose destination is `dst`.
fn row_to(report: &Value, dst: &str) -> Result<Value> {
    let found: Vec<Value> = rows(report)
        .into_iter()
        .filter(|r| r["dst"] == dst)
        .collect();
    ensure!(
        found.len() == 1,
        "one connection to {dst} expected: {report}"
    );
    Ok(found[0].clone())
}

struct Client {
    server: Server,
    marker: std::path::PathBuf,
    db_port: u16,
    web_port: u16,
}

fn client(world: &World, pod: &Pod) -> Result<Client> {
    let marker = world.dir().join("close-web");
    let server = pod.serve_until(
        python().args([
            "-c",
            CLIENT,
            marker.to_str().context("marker path")?,
            DB_VIP,
            "5432",
            WEB_VIP,
            "80",
        ]),
        "ready ",
        Duration::from_secs(20),
    )?;
    let line = server
        .lines()
        .into_iter()
        .find(|l| l.starts_with("ready "))
        .context("no ready line")?;
    let ports: Vec<u16> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| line.clone())?;
    ensure!(ports.len() == 2, "{line}");
    Ok(Client {
        server,
        marker,
        db_port: ports[0],
        web_port: ports[1],
    })
}

#[test]
fn conns_lists_open_connections_by_pod_and_five_tuple() {
    require_agent_or_skip!();
    let b = meshed_pair(world_name!(), 2, &services());
    with_world(b, |world| {
        let (n0, n1) = (world.node(0), world.node(1));
        let pod = world.pod(0, 0);
        let _echo = world
            .pod(1, 0)
            .serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let _web = http_app(world.pod(0, 1), 8080, "web", &[])?;
        let mut c = client(world, pod)?;
        let (db_dst, web_dst) = (format!("{DB_VIP}:5432"), format!("{WEB_VIP}:80"));
        let db_endpoint = format!("{}:7000", pod_ip(1, 0));
        let web_endpoint = format!("{}:8080", pod_ip(0, 1));

        // Node 0: both of the pod's connections, as routed and counted.
        // Bytes are counted as they move, so the last response may still
        // be on its way when the client prints `ready`: wait for it.
        let mut all = Value::Null;
        eventually(DEFAULT_PATIENCE, || {
            all = conns(n0, &format!("?pod={}", pod.name()))?;
            let db = row_to(&all, &db_dst)?;
            ensure!(db["bytes_in"] == 1000, "{db}");
            Ok(())
        })?;
        ensure!(rows(&all).len() == 2, "{all}");
        let db = row_to(&all, &db_dst)?;
        ensure!(
            db["direction"] == "out"
                && db["pod"] == pod.name()
                && db["src"] == format!("{}:{}", pod.ip(), c.db_port)
                && db["service"] == "db"
                && db["endpoint"] == db_endpoint.as_str()
                && db["protocol"] == "opaque"
                && db["tunnel"] == true
                && db["peer_identity"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("spiffe://cluster.local/"))
                && db["bytes_out"] == 1000
                && db["bytes_in"] == 1000
                && db["requests"] == 0,
            "{db}"
        );
        let web = row_to(&all, &web_dst)?;
        ensure!(
            web["direction"] == "out"
                && web["src"] == format!("{}:{}", pod.ip(), c.web_port)
                && web["service"] == "web"
                && web["endpoint"] == web_endpoint.as_str()
                && web["protocol"] == "http1"
                && web["tunnel"] == false
                && web["requests"] == 3
                // Three request heads out; three heads and 6-byte bodies in.
                && web["bytes_out"].as_u64().is_some_and(|b| b > 3 * 20)
                && web["bytes_in"].as_u64().is_some_and(|b| b > 3 * 6),
            "{web}"
        );
        if all["kernel_counters"] == true {
            // The accepted socket and the direct upstream socket are joined
            // with the kernel's flow map; the tunnelled one has the
            // accepted socket only.
            let legs = |r: &Value| -> Vec<String> {
                r["kernel"]
                    .as_array()
                    .map(|a| a.iter().map(|f| f["leg"].to_string()).collect())
                    .unwrap_or_default()
            };
            ensure!(legs(&web) == ["\"client\"", "\"upstream\""], "{web}");
            ensure!(legs(&db) == ["\"client\""], "{db}");
        }

        // Each filter narrows the list.
        let only = |query: &str, want: &[&str]| -> Result<()> {
            let r = conns(n0, query)?;
            let mut got: Vec<String> = rows(&r)
                .iter()
                .map(|r| r["dst"].as_str().unwrap_or_default().to_string())
                .collect();
            got.sort();
            ensure!(got == want, "{query}: {got:?}, expected {want:?}");
            Ok(())
        };
        let both = [db_dst.as_str(), web_dst.as_str()];
        only("", &both)?;
        only(&format!("?pod={}", pod.name()), &both)?;
        only("?pod=default/n0", &[])?;
        only(&format!("?pod={}", world.pod(0, 1).name()), &[])?;
        only("?proto=opaque", &[&db_dst])?;
        only("?proto=http", &[&web_dst])?;
        only(&format!("?dst={web_dst}"), &[&web_dst])?;
        only(&format!("?dst={}", pod_ip(1, 0)), &[&db_dst])?;
        only(&format!("?dst={}/16", pod_ip(1, 0)), &[&db_dst])?;
        only(&format!("?src=:{}", c.web_port), &[&web_dst])?;
        only(&format!("?src={}", pod.ip()), &both)?;
        only("?service=db&direction=out", &[&db_dst])?;
        only("?direction=in", &[])?;

        // Node 1: the tunnel stream to its pod, inbound, with the calling
        // pod's address and verified identity.
        let inbound = conns(n1, "?direction=in")?;
        let stream = row_to(&inbound, &db_endpoint)?;
        ensure!(
            stream["pod"] == world.pod(1, 0).name()
                && stream["src"] == format!("{}:{}", pod.ip(), c.db_port)
                && stream["service"] == "db"
                && stream["protocol"] == "opaque"
                && stream["tunnel"] == true
                && stream["peer_identity"]
                    == format!(
                        "spiffe://cluster.local/ns/default/sa/{}",
                        pod.name().trim_start_matches("default/")
                    )
                && stream["bytes_out"] == 1000
                && stream["bytes_in"] == 1000,
            "{stream}"
        );

        // The CLI: a table naming both, `--proto` narrowing it, JSON, and a
        // bad filter refused before anything is sent, with what it takes.
        let out = n0.run_ok(waymark().args(["conns", "--pod", pod.name()]))?;
        ensure!(
            out.lines().any(|l| l.starts_with("out ")
                && l.contains(&db_dst)
                && l.contains(" db ")
                && l.contains(&db_endpoint)
                && l.contains(" opaque ")
                && l.contains(" tunnel ")),
            "{out}"
        );
        ensure!(out.contains("2 of 2 open connections"), "{out}");
        let out = n0.run_ok(waymark().args(["conns", "--proto", "http1", "-o", "json"]))?;
        let report: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
        ensure!(
            rows(&report).len() == 1 && row_to(&report, &web_dst).is_ok(),
            "{out}"
        );
        let out = n0.run(waymark().args(["conns", "--dst", "10.96.0.300"]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains("conns filter dst=\"10.96.0.300\": give an address"),
            "{stderr}"
        );
        let (status, body) = n0.admin_socket_get("/conns?proto=quic")?;
        ensure!(
            status == 400 && body.contains("give opaque, tls, http1, h2, grpc"),
            "{status} {body}"
        );

        // A closed connection leaves the table: the HTTP one first, then
        // the opaque one on both nodes once the client is gone.
        std::fs::write(&c.marker, b"")?;
        c.server.wait_line("closed", Duration::from_secs(10))?;
        eventually(DEFAULT_PATIENCE, || {
            let r = conns(n0, &format!("?pod={}", pod.name()))?;
            ensure!(rows(&r).len() == 1, "{r}");
            row_to(&r, &db_dst).map(drop)
        })?;
        c.server.stop();
        eventually(DEFAULT_PATIENCE, || {
            let (r0, r1) = (conns(n0, "")?, conns(n1, "")?);
            ensure!(rows(&r0).is_empty() && r0["open"] == 0, "{r0}");
            ensure!(rows(&r1).is_empty(), "{r1}");
            Ok(())
        })?;
        Ok(())
    });
}

/// Sends 4 × 4000 bytes on one connection, each echoed back, then holds it.
const BULK_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for _ in range(4):
    s.sendall(b"y" * 4000)
    got = 0
    while got < 4000:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("the echo closed early")
        got += len(chunk)
print("ready", s.getsockname()[1], flush=True)
time.sleep(600)
"#;

/// Every other data packet to the endpoint is dropped in its pod (an
/// nftables rule there): the agent's upstream socket retransmits, and the
/// open connection's row says so on its `upstream` leg, joined by 5-tuple
/// with the kernel's per-flow map.
#[test]
fn conns_joins_the_kernels_counters_of_its_flows() {
    require_agent_or_skip!();
    let db = Service::new("db", &format!("{DB_VIP}:5432"))
        .protocol("opaque")
        .endpoint(Endpoint::pod(1, 0, 7000));
    let b = World::builder(world_name!())
        .nodes(2)
        .pods_per_node(1)
        .agent_config_extra(services_toml(&[db]));
    with_world(b, |world| {
        let (pod, server) = (world.pod(0, 0), world.pod(1, 0));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        nft_in(
            server,
            &[
                "add table inet wmtest;",
                "add chain inet wmtest in { type filter hook input priority 0; policy accept; };",
                "add rule inet wmtest in tcp dport 7000 meta length > 100 numgen inc mod 2 == 0 counter drop",
            ],
        )?;
        let _client = pod.serve_until(
            python().args(["-c", BULK_CLIENT, DB_VIP, "5432"]),
            "ready ",
            Duration::from_secs(60),
        )?;
        let node = world.node(0);
        let endpoint = format!("{}:7000", server.ip());
        // The client has had every byte back, but the agent counts a
        // chunk once its write to the client returns: on a loaded machine
        // the table can be read in between, so it is read until the
        // counts are whole.
        eventually(DEFAULT_PATIENCE, || {
            let report = conns(node, "?service=db")?;
            ensure!(report["kernel_counters"] == true, "{report}");
            let row = row_to(&report, &format!("{DB_VIP}:5432"))?;
            let upstream = row["kernel"]
                .as_array()
                .and_then(|k| k.iter().find(|f| f["leg"] == "upstream"))
                .with_context(|| format!("no upstream leg: {row}"))?;
            ensure!(
                upstream["peer"] == endpoint.as_str()
                    && upstream["local"]
                        .as_str()
                        .is_some_and(|l| l.starts_with(&format!("{}:", pod.ip())))
                    && upstream["retransmits"].as_u64().is_some_and(|r| r >= 1)
                    && row["bytes_out"] == 16000
                    && row["bytes_in"] == 16000,
                "{row}"
            );
            Ok(())
        })?;
        let out = node.run_ok(waymark().args(["conns", "--dst", &endpoint]))?;
        ensure!(
            out.lines()
                .any(|l| l.starts_with("out ") && l.contains(" retx=")),
            "{out}"
        );
        Ok(())
    });
}
