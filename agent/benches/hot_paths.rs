//! Microbenchmarks of the pieces every connection or request goes through:
//! protocol detection, route selection, the balancer's pick, recording the
//! golden metrics, rendering a diagnostic trace block, and keeping the
//! connection table (`waymark conns`). Run with
//! `cargo bench -p waymark-agent` (or `cargo xtask bench --micro`); the
//! end-to-end comparison with the direct path and peer proxies is
//! `cargo xtask bench`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::BodyExt;
use waymark_agent::balance::{BalanceConfig, Balancer, EndpointStats};
use waymark_agent::http::body::full;
use waymark_agent::proxy::detect::{H2_PREFACE, classify};
use waymark_agent::routing::{HeaderMatch, PathMatch, Route, RouteMatch, RouteTable, ValueMatch};
use waymark_agent::telemetry::http_metrics::{HttpMetrics, observe};
use waymark_agent::telemetry::trace::{AttemptRecord, Context, Selected};

fn detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("detect");
    let http1 = b"GET /api/v1/orders/12345?expand=items HTTP/1.1\r\nHost: orders\r\nUser-Agent: curl/8\r\n\r\n";
    let mut tls = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    tls.resize(517, 0);
    let opaque = b"\x00\x00\x00\x4a\x0a\x35\x2e\x37\x2e\x34\x33\x00";
    g.bench_function("http1_request_line", |b| {
        b.iter(|| classify(black_box(http1)))
    });
    g.bench_function("h2_preface", |b| b.iter(|| classify(black_box(H2_PREFACE))));
    g.bench_function("tls_client_hello", |b| b.iter(|| classify(black_box(&tls))));
    g.bench_function("opaque", |b| b.iter(|| classify(black_box(opaque))));
    g.finish();
}

/// Twelve routes of the kinds real configs have: exact and prefix paths,
/// method and header conditions, one regex.
fn route_table() -> RouteTable<usize> {
    let mut routes = Vec::new();
    for (i, prefix) in [
        "/api/v1/users",
        "/api/v1/orders",
        "/api/v1/items",
        "/static",
        "/admin",
    ]
    .iter()
    .enumerate()
    {
        routes.push(Route {
            name: format!("prefix-{i}"),
            matches: vec![RouteMatch {
                path: Some(PathMatch::prefix(prefix).unwrap()),
                ..Default::default()
            }],
            value: i,
        });
    }
    for (i, exact) in ["/healthz", "/readyz", "/metrics"].iter().enumerate() {
        routes.push(Route {
            name: format!("exact-{i}"),
            matches: vec![RouteMatch {
                path: Some(PathMatch::exact(exact).unwrap()),
                method: Some(http::Method::GET),
                ..Default::default()
            }],
            value: 10 + i,
        });
    }
    for i in 0..3 {
        routes.push(Route {
            name: format!("canary-{i}"),
            matches: vec![RouteMatch {
                path: Some(PathMatch::prefix("/api").unwrap()),
                headers: vec![
                    HeaderMatch::new("x-canary", ValueMatch::exact(&i.to_string())).unwrap(),
                ],
                ..Default::default()
            }],
            value: 20 + i,
        });
    }
    routes.push(Route {
        name: "regex".into(),
        matches: vec![RouteMatch {
            path: Some(PathMatch::regex(r"^/v[0-9]+/reports/[a-z]+$").unwrap()),
            ..Default::default()
        }],
        value: 30,
    });
    RouteTable::new(routes)
}

fn routing(c: &mut Criterion) {
    let table = route_table();
    let head = |uri: &str, headers: &[(&str, &str)]| {
        let mut b = Request::builder().method("GET").uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    };
    let prefix = head("/api/v1/orders/12345", &[("host", "orders")]);
    let canary = head("/api/v1/orders/1", &[("x-canary", "2")]);
    let unmatched = head("/nothing/here", &[]);
    let mut g = c.benchmark_group("route_select");
    g.bench_function("prefix", |b| {
        b.iter(|| table.select(black_box(&prefix)).map(|r| r.1))
    });
    g.bench_function("header_canary", |b| {
        b.iter(|| table.select(black_box(&canary)).map(|r| r.1))
    });
    g.bench_function("unmatched", |b| {
        b.iter(|| table.select(black_box(&unmatched)).map(|r| r.1))
    });
    g.finish();
}

fn balancing(c: &mut Criterion) {
    let config = BalanceConfig::default();
    let mut g = c.benchmark_group("balancer");
    for n in [3usize, 30] {
        let now = Instant::now();
        let endpoints = (0..n)
            .map(|i| (i, Arc::new(EndpointStats::new(now, &config))))
            .collect();
        let b = Balancer::with_stats(endpoints, config);
        g.bench_function(format!("pick_complete_{n}_endpoints"), |bench| {
            bench.iter(|| {
                let now = Instant::now();
                let p = b.pick(now).unwrap();
                p.complete(now, Duration::from_micros(800), true);
            })
        });
    }
    g.finish();
}

fn metrics(c: &mut Criterion) {
    let mut registry = prometheus_client::registry::Registry::default();
    // The sliding windows behind `waymark stat` are recorded on the same
    // path, so they are part of the figure.
    let stats = Arc::new(waymark_agent::telemetry::stats::Stats::new(1000));
    let m = Arc::new(HttpMetrics::new(&mut registry, 100, stats));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    c.bench_function("metrics/request_and_response", |b| {
        b.iter(|| {
            let labels = m.request("default/client", Some("orders:80"), "orders", "get-order");
            let resp = http::Response::new(full(Bytes::from_static(b"ok")));
            let observed = observe(m.clone(), labels, Instant::now(), resp, false);
            rt.block_on(observed.into_body().collect()).unwrap();
        })
    });
}

fn trace(c: &mut Criterion) {
    let ctx = Context {
        node: "node-a".into(),
        direction: "outbound",
        dialled: Some("10.96.0.10:80".parse().unwrap()),
        service: Some("hello".into()),
        route: Some("get-hello".into()),
        route_match: Some("path prefix /hello".into()),
        backends: vec![("hello-v1".into(), 90), ("hello-v2".into(), 10)],
        chosen_backend: Some("hello-v1".into()),
        endpoints: (0..8)
            .map(|i| format!("10.1.{i}.5:8080").parse().unwrap())
            .collect(),
        selected: Some(Selected {
            addr: "10.1.3.5:8080".parse().unwrap(),
            pod: Some("default/hello-3".into()),
            node: Some("node-b".into()),
            zone: None,
            identity: None,
            weight: 1,
            ewma: Duration::from_micros(1200),
            in_flight: 0,
        }),
        attempts: vec![
            AttemptRecord {
                endpoint: "10.1.2.5:8080".parse().unwrap(),
                result: "503".into(),
            },
            AttemptRecord {
                endpoint: "10.1.3.5:8080".parse().unwrap(),
                result: "200".into(),
            },
        ],
        duration: Duration::from_millis(3),
        peer_identity: None,
        upstream: Some((
            "10.0.0.1:40512".parse().unwrap(),
            "10.1.3.5:8080".parse().unwrap(),
        )),
        result: Some((200, waymark_agent::http::errors::StatusSource::App)),
        kernel: Some(waymark_agent::telemetry::trace::KernelFlow {
            local: "10.0.0.1:40512".parse().unwrap(),
            peer: "10.1.3.5:8080".parse().unwrap(),
            drops: 0,
            retransmits: 1,
        }),
    };
    let mut g = c.benchmark_group("trace");
    g.bench_function("render_block", |b| {
        b.iter(|| black_box(&ctx).render_block())
    });
    g.bench_function("render_header", |b| {
        b.iter(|| black_box(&ctx).render_header())
    });
    g.finish();
}

/// What dialling as the pod costs per new upstream connection: creating the
/// socket in the pod's network namespace (two `setns` calls around
/// `socket()`) against creating it in the agent's own. Needs root (a
/// network namespace is made for it); skipped otherwise.
fn upstream_socket(c: &mut Criterion) {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::OwnedFd;
    use waymark_agent::transport::netns::PodNetns;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("upstream_socket: skipped (making a network namespace needs root)");
        return;
    }
    let made = std::thread::spawn(|| -> std::io::Result<std::fs::File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        std::fs::File::open("/proc/thread-self/ns/net")
    })
    .join();
    let Ok(Ok(file)) = made else {
        eprintln!("upstream_socket: skipped (cannot make a network namespace)");
        return;
    };
    let pod = PodNetns::from_fd(OwnedFd::from(file), 1);
    let addr = "10.1.0.2:8080".parse().expect("constant address");
    let mut g = c.benchmark_group("upstream_socket");
    g.bench_function("node_netns", |b| {
        b.iter(|| Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).map(black_box))
    });
    g.bench_function("pod_netns", |b| {
        b.iter(|| pod.tcp_socket(addr).map(black_box))
    });
    g.finish();
}

/// The connection table's share of a connection (entered at accept, out
/// when its guard drops) and of a request (counted, its endpoint noted),
/// with 10,000 other connections open.
fn conns(c: &mut Criterion) {
    use waymark_agent::diagnostics::tap::filter::Direction;
    use waymark_agent::telemetry::conns::{ConnProtocol, ConnTable, NewConn};
    let table = ConnTable::new();
    let new = |port: u16| NewConn {
        direction: Direction::Out,
        pod: Some("default/web-5d8f-x2".into()),
        src: Some(std::net::SocketAddr::from(([10, 1, 0, 2], port))),
        dst: "10.96.0.10:80".parse().unwrap(),
        client_flow: Some((
            "127.0.0.1:15001".parse().unwrap(),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        )),
        protocol: ConnProtocol::Detecting,
    };
    let _others: Vec<_> = (0..10_000u16).map(|p| table.open(new(p))).collect();
    let mut g = c.benchmark_group("conns");
    g.bench_function("open_and_close", |b| {
        b.iter(|| drop(black_box(table.open(new(40_000)))))
    });
    let live = table.open(new(40_001));
    live.set_service("web");
    let endpoints: [std::net::SocketAddr; 2] = [
        "10.2.0.7:8080".parse().unwrap(),
        "10.2.0.8:8080".parse().unwrap(),
    ];
    let mut i = 0usize;
    g.bench_function("request", |b| {
        b.iter(|| {
            i += 1;
            live.request(false);
            live.set_upstream(None, black_box(endpoints[i % 2]), None, None);
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    conns,
    detection,
    routing,
    balancing,
    metrics,
    trace,
    upstream_socket
);
criterion_main!(benches);
