//! The paths the bench measures: who dials what, through which proxies, and
//! what state the waymark agents must be in.
//!
//! ```text
//! client pod (0,0) 10.1.0.2 ── node0 ── fabric ── node1 ─┬ server pod (1,0) 10.2.0.2
//!                                 │                        └ server pod (1,1) 10.2.0.3 (mTLS rows)
//!                                 └── server pod (0,1) 10.1.0.3 (same-node paths)
//! ```
//! The mTLS rows' endpoints live in a pod of their own: an agent tunnels
//! every connection to a meshed endpoint's address (no mesh bypass), so if
//! (1,0) were the tunnelled services' endpoint, the one-hop rows (node 1's
//! agent stopped) could not dial it directly.
//! Peer proxies run in the node netns, one process per path and node, and
//! the client dials them explicitly: node 0's pods-bridge address
//! `10.1.0.1:<port>`. A two-hop peer's first proxy forwards to node 1's fabric
//! address `10.0.0.2:<port>`, where the second one listens.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use waymark_tests::world::topology::{node_bridge_ip, node_fabric_ip, pod_ip};

use super::peers::{Listener, Mode, PeerSpec, PeerTls, Software};

/// The HTTP port of the backend nginx in the server pods.
pub const HTTP_PORT: u16 = 80;
/// iperf3's port in the server pods.
pub const IPERF_PORT: u16 = 5201;

/// The backend's h2c (HTTP/2 with prior knowledge, no TLS) port.
pub const H2C_PORT: u16 = 8080;
/// `testpeer grpc`'s port in the far server pod (1,0): the gRPC rows'
/// backend (a unary responder on hyper; nginx cannot answer gRPC itself).
pub const GRPC_PORT: u16 = 50051;

/// The service address the `waymark-l7` row dials (a ClusterIP-like
/// virtual address: the kernel programs redirect it before any routing).
pub const SERVICE_ADDR: &str = "10.96.0.10:80";
/// `waymark-l7-mtls`: the same HTTP/1.1 service, endpoint on node1 (tunnelled).
pub const MTLS_HTTP_ADDR: &str = "10.96.0.11:80";
/// `waymark-l4-mtls`: an opaque service, endpoint on node1 (tunnelled); its
/// port 5201 is the bulk (iperf3) service.
pub const MTLS_TCP_ADDR: &str = "10.96.0.12:80";
pub const MTLS_BULK_ADDR: &str = "10.96.0.12:5201";
/// `waymark-h2`: an HTTP/2 service whose endpoint is the backend's h2c port.
pub const H2_ADDR: &str = "10.96.0.13:80";
/// `waymark-h2-mtls`: the same, endpoint on node1 (tunnelled).
pub const MTLS_H2_ADDR: &str = "10.96.0.14:80";
/// `waymark-grpc`: a gRPC service whose endpoint is `testpeer grpc`.
pub const GRPC_ADDR: &str = "10.96.0.15:80";
/// `waymark-grpc-mtls`: the same, endpoint on node1 (tunnelled).
pub const MTLS_GRPC_ADDR: &str = "10.96.0.16:80";

/// One `[[services]]` entry: one endpoint, on `node` (tunnelled when the
/// node is another one) or without a node (always dialled directly).
fn service(
    name: &str,
    addr: &str,
    protocol: &str,
    endpoint: SocketAddr,
    node: Option<&str>,
) -> String {
    let node = node
        .map(|n| format!(", node = \"{n}\""))
        .unwrap_or_default();
    format!(
        "\n[[services]]\nname = \"{name}\"\naddresses = [\"{addr}\"]\nprotocol = \"{protocol}\"\n\
         endpoints = [ {{ addr = \"{endpoint}\"{node} }} ]\n"
    )
}

/// The agent config every bench agent gets (on top of the world's, which
/// has mTLS on: `[identity]`, `[[nodes]]`, an identity per pod): one
/// worker, and the services of the waymark L7, h2 and mTLS rows. The
/// one-hop services' endpoints name no node, so they are dialled directly
/// (mTLS applies only to an endpoint on another node in `[[nodes]]`); the
/// `*-mtls` services' endpoint is on node1, so node0's agent tunnels to
/// node1's. Other destinations are no service's address, so the L4 rows
/// stay opaque TCP and direct.
pub fn agent_config_extra() -> String {
    let http = sa(server_ip(), HTTP_PORT);
    let h2c = sa(server_ip(), H2C_PORT);
    let mesh_http = sa(mesh_server_ip(), HTTP_PORT);
    let mesh_h2c = sa(mesh_server_ip(), H2C_PORT);
    let mesh_bulk = sa(mesh_server_ip(), IPERF_PORT);
    // The direct and peer rows run with node 0's agent stopped: its
    // programs must go with it (fail open), or every pod connection is
    // refused (the agent's default, `on_agent_down = "closed"`).
    // One pod (the client) holds the memory rows' 10,000 idle connections,
    // more than the limits derived from the bench world's 20,000 open
    // files allow: the pod's share is half the agent's connections (4,744),
    // and the descriptor budget counts two per pod connection (the pod's
    // side and an upstream of its own, 9,488 connections), where an HTTP
    // connection at rest holds one (its upstream is back in the pool). The
    // limits stay on, so the connect hook and the budget count as they do
    // by default, only against higher bounds.
    let mut s = String::from(
        "[runtime]\nworkers = 1\n[redirect]\non_agent_down = \"open\"\n\
         [outbound]\nmax_connections = 11000\nmax_connections_per_pod = 10500\n\
         [limits]\nconnection_descriptors = 22000\n",
    );
    s += &service("bench", SERVICE_ADDR, "http1", http, None);
    s += &service("bench-h2", H2_ADDR, "http2", h2c, None);
    s += &service(
        "bench-mtls",
        MTLS_HTTP_ADDR,
        "http1",
        mesh_http,
        Some("node1"),
    );
    s += &service(
        "bench-mtls-tcp",
        MTLS_TCP_ADDR,
        "opaque",
        mesh_http,
        Some("node1"),
    );
    s += &service(
        "bench-mtls-bulk",
        MTLS_BULK_ADDR,
        "opaque",
        mesh_bulk,
        Some("node1"),
    );
    s += &service(
        "bench-mtls-h2",
        MTLS_H2_ADDR,
        "http2",
        mesh_h2c,
        Some("node1"),
    );
    let grpc = sa(server_ip(), GRPC_PORT);
    s += &service("bench-grpc", GRPC_ADDR, "grpc", grpc, None);
    s += &service(
        "bench-mtls-grpc",
        MTLS_GRPC_ADDR,
        "grpc",
        sa(mesh_server_ip(), GRPC_PORT),
        Some("node1"),
    );
    s
}

/// What the waymark agents must be doing while a path is measured.
/// Node 1's agent runs only for the two-hop (mTLS) rows: on the one-hop
/// rows it would have nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentState {
    /// Stopped: the kernel programs are detached, pods connect directly
    /// (waymark fails open). Direct and peer paths.
    Stopped,
    /// Node 0's agent running with this many data-path workers; node 1's
    /// stopped.
    Workers(usize),
    /// The same, with `outbound.dial_from = "node"`: upstream connections
    /// made in the node's network namespace, as the per-node peer proxies
    /// make theirs, instead of in the client pod's (the default, which
    /// keeps the agent from being a confused deputy).
    DialNode(usize),
    /// Both agents running (node 0's with this many workers, node 1's with
    /// one): the mTLS tunnel rows.
    Mesh(usize),
}

impl AgentState {
    pub fn describe(self) -> String {
        match self {
            AgentState::Stopped => "agents stopped".into(),
            AgentState::Workers(w) => format!("node0 agent, {w} worker(s)"),
            AgentState::DialNode(w) => {
                format!("node0 agent, {w} worker(s), dialling from the node")
            }
            AgentState::Mesh(w) => format!("node0 agent ({w} worker(s)) + node1 agent (1), mTLS"),
        }
    }

    /// Node 0's agent, if it runs: its workers, and whether it dials from
    /// the node's namespace.
    pub fn node0(self) -> Option<(usize, bool)> {
        match self {
            AgentState::Stopped => None,
            AgentState::Workers(w) | AgentState::Mesh(w) => Some((w, false)),
            AgentState::DialNode(w) => Some((w, true)),
        }
    }
}

/// What the HTTP load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// HTTP/1.1: wrk, testpeer http-rate and hold.
    Http1,
    /// HTTP/2 with prior knowledge (h2c): h2load; no fixed-rate and idle
    /// runs (their generators speak HTTP/1.1).
    H2c,
    /// gRPC unary calls over h2c: h2load POSTs one length-prefixed
    /// message per call (`content-type: application/grpc`, `te: trailers`)
    /// to `testpeer grpc`, which echoes it with `grpc-status: 0` in
    /// trailers. Like h2c: no fixed-rate and idle runs.
    Grpc,
}

/// A process whose CPU and memory count as the path's proxy cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyRef {
    /// The waymark agent of this node.
    Agent(usize),
    /// This peer proxy (index into [`Plan::peers`]).
    Peer(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    L4,
    L7,
}

/// One measured path.
#[derive(Debug, Clone)]
pub struct PathSpec {
    pub id: String,
    pub label: String,
    /// What exactly it is, for the report.
    pub what: String,
    /// Proxies on the way (0 for direct).
    pub hops: usize,
    pub layer: Layer,
    pub same_node: bool,
    pub agent: AgentState,
    /// What the HTTP load generators dial.
    pub http: SocketAddr,
    /// What iperf3 dials (L4 paths only).
    pub bulk: Option<SocketAddr>,
    pub proxies: Vec<ProxyRef>,
    /// The direct path this one is compared with.
    pub baseline: &'static str,
    /// Paths of this class are compared with each other ("best peer of the
    /// same kind"); `None`: no peer of the same kind is measured.
    pub class: Option<&'static str>,
    /// In `--quick`.
    pub quick: bool,
    /// Whether the path's proxy is waymark (its metrics must show the
    /// connections, or the row is not what it claims).
    pub waymark: bool,
    /// waymark through the node-to-node mTLS tunnel: the connections and
    /// requests counted must carry `tls="true"`.
    pub tunnel: bool,
    pub proto: Proto,
    /// The peer row that does the same work as this one, where the
    /// best peer of its class does not: waymark dials a pod's upstream
    /// from the pod's own network namespace, a per-node peer from the
    /// node's, and the two cost the kernel differently per request
    /// (bench/README.md, "Dialling as the pod").
    pub same_work: Option<&'static str>,
}

/// Everything the bench sets up: paths and the peer proxies they need.
pub struct Plan {
    pub paths: Vec<PathSpec>,
    pub peers: Vec<PeerSpec>,
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// The server pod of the cross-node paths, (1,0).
pub fn server_ip() -> Ipv4Addr {
    pod_ip(1, 0)
}

/// The server pod of the mTLS (tunnelled) paths, (1,1): the same servers
/// as (1,0).
pub fn mesh_server_ip() -> Ipv4Addr {
    pod_ip(1, 1)
}

/// The server pod of the same-node paths, (0,1).
pub fn same_node_server_ip() -> Ipv4Addr {
    pod_ip(0, 1)
}

struct PeerKind {
    software: Software,
    mode: Mode,
    /// Port offset; 1-hop ports are 10000+n (HTTP) and 10100+n (iperf3),
    /// 2-hop ones 11000+n / 11100+n on node 0 and 12000+n / 12100+n on node 1.
    n: u16,
    slug: &'static str,
    name: &'static str,
    /// TLS (mutual, TLS 1.3) between the two hops; two-hop rows only.
    tls: bool,
}

const PEER_KINDS: [PeerKind; 8] = [
    PeerKind {
        software: Software::Haproxy,
        mode: Mode::Tcp,
        n: 1,
        slug: "haproxy-tcp",
        name: "HAProxy TCP mode",
        tls: false,
    },
    PeerKind {
        software: Software::Haproxy,
        mode: Mode::Http,
        n: 2,
        slug: "haproxy-http",
        name: "HAProxy HTTP mode",
        tls: false,
    },
    PeerKind {
        software: Software::Nginx,
        mode: Mode::Tcp,
        n: 3,
        slug: "nginx-stream",
        name: "nginx stream",
        tls: false,
    },
    PeerKind {
        software: Software::Nginx,
        mode: Mode::Http,
        n: 4,
        slug: "nginx-http",
        name: "nginx http reverse proxy",
        tls: false,
    },
    PeerKind {
        software: Software::Haproxy,
        mode: Mode::Tcp,
        n: 5,
        slug: "haproxy-tcp-tls",
        name: "HAProxy TCP mode",
        tls: true,
    },
    PeerKind {
        software: Software::Haproxy,
        mode: Mode::Http,
        n: 6,
        slug: "haproxy-http-tls",
        name: "HAProxy HTTP mode",
        tls: true,
    },
    PeerKind {
        software: Software::Nginx,
        mode: Mode::Tcp,
        n: 7,
        slug: "nginx-stream-tls",
        name: "nginx stream",
        tls: true,
    },
    PeerKind {
        software: Software::Nginx,
        mode: Mode::Http,
        n: 8,
        slug: "nginx-http-tls",
        name: "nginx http reverse proxy",
        tls: true,
    },
];

/// All paths, in report order.
pub fn plan() -> Plan {
    let client_node_bridge = node_bridge_ip(0);
    let node1_fabric = node_fabric_ip(1);
    let server = server_ip();
    let mesh_server = mesh_server_ip();
    let local_server = same_node_server_ip();
    let waymark_l7 = PathSpec {
        id: "waymark-l7".into(),
        label: "waymark 1 hop (L7 HTTP/1.1 service), 1 worker".into(),
        what: format!(
            "client dials the service address {SERVICE_ADDR} (`[[services]]` in the agent's \
             config, protocol http1, one endpoint {server}:{HTTP_PORT}); node0's agent parses \
             each request, routes it ([DEFAULT] route), picks the endpoint (P2C peak-EWMA) \
             and forwards it. One hop. `[runtime] workers = 1`"
        ),
        hops: 1,
        layer: Layer::L7,
        same_node: false,
        agent: AgentState::Workers(1),
        http: SERVICE_ADDR.parse().expect("valid service address"),
        bulk: None,
        proxies: vec![ProxyRef::Agent(0)],
        baseline: "direct",
        class: Some("l7-1hop"),
        quick: true,
        waymark: true,
        tunnel: false,
        proto: Proto::Http1,
        same_work: Some("haproxy-http-pod"),
    };
    let mut paths = vec![
        PathSpec {
            id: "direct".into(),
            label: "direct pod→pod, across nodes".into(),
            what: format!(
                "client pod (0,0) dials {server}:{HTTP_PORT} in pod (1,0); routed by node0 and node1; \
                 no proxy (agents stopped: nothing is attached)"
            ),
            hops: 0,
            layer: Layer::L4,
            same_node: false,
            agent: AgentState::Stopped,
            http: sa(server, HTTP_PORT),
            bulk: Some(sa(server, IPERF_PORT)),
            proxies: vec![],
            baseline: "direct",
            class: None,
            quick: true,
            waymark: false,
            tunnel: false,
            proto: Proto::Http1,
            same_work: None,
        },
        PathSpec {
            id: "direct-same-node".into(),
            label: "direct pod→pod, same node".into(),
            what: format!(
                "client pod (0,0) dials {local_server}:{HTTP_PORT} in pod (0,1) over node0's bridge; no proxy"
            ),
            hops: 0,
            layer: Layer::L4,
            same_node: true,
            agent: AgentState::Stopped,
            http: sa(local_server, HTTP_PORT),
            bulk: Some(sa(local_server, IPERF_PORT)),
            proxies: vec![],
            baseline: "direct-same-node",
            class: None,
            quick: false,
            waymark: false,
            tunnel: false,
            proto: Proto::Http1,
            same_work: None,
        },
        PathSpec {
            id: "waymark".into(),
            label: "waymark 1 hop (L4), 1 worker".into(),
            what: format!(
                "client dials {server}:{HTTP_PORT}; cgroup/connect4 redirects it to node0's agent \
                 (listener in the client pod), which connects to the server pod and copies bytes. \
                 One hop: there is no inbound proxy on node1 yet. `[runtime] workers = 1`"
            ),
            hops: 1,
            layer: Layer::L4,
            same_node: false,
            agent: AgentState::Workers(1),
            http: sa(server, HTTP_PORT),
            bulk: Some(sa(server, IPERF_PORT)),
            proxies: vec![ProxyRef::Agent(0)],
            baseline: "direct",
            class: Some("l4-1hop"),
            quick: true,
            waymark: true,
            tunnel: false,
            proto: Proto::Http1,
            same_work: None,
        },
        PathSpec {
            id: "waymark-2w".into(),
            label: "waymark 1 hop (L4), 2 workers".into(),
            what: "the same as `waymark` with `[runtime] workers = 2`".into(),
            hops: 1,
            layer: Layer::L4,
            same_node: false,
            agent: AgentState::Workers(2),
            http: sa(server, HTTP_PORT),
            bulk: Some(sa(server, IPERF_PORT)),
            proxies: vec![ProxyRef::Agent(0)],
            baseline: "direct",
            class: Some("l4-1hop"),
            quick: false,
            waymark: true,
            tunnel: false,
            proto: Proto::Http1,
            same_work: None,
        },
        waymark_l7.clone(),
        PathSpec {
            id: "waymark-l7-node".into(),
            label: "waymark 1 hop (L7 HTTP/1.1 service), 1 worker, dialling from the node".into(),
            what: "as `waymark-l7`, with `outbound.dial_from = \"node\"`: the agent makes the \
                 upstream connection in node0's network namespace, as the per-node peers make \
                 theirs, instead of in the client pod's (the default, which keeps the agent from \
                 reaching what the pod cannot: SECURITY.md). The same work as the per-node peer rows. \
                 `[runtime] workers = 1`"
                .into(),
            agent: AgentState::DialNode(1),
            quick: false,
            same_work: Some("haproxy-http-1hop"),
            ..waymark_l7
        },
        PathSpec {
            id: "waymark-same-node".into(),
            label: "waymark same node (L4), 1 worker".into(),
            what: format!(
                "client dials {local_server}:{HTTP_PORT} in pod (0,1); node0's agent proxies it \
                 (no peer row of this kind: compare with direct same node)"
            ),
            hops: 1,
            layer: Layer::L4,
            same_node: true,
            agent: AgentState::Workers(1),
            http: sa(local_server, HTTP_PORT),
            bulk: Some(sa(local_server, IPERF_PORT)),
            proxies: vec![ProxyRef::Agent(0)],
            baseline: "direct-same-node",
            class: None,
            quick: false,
            waymark: true,
            tunnel: false,
            proto: Proto::Http1,
            same_work: None,
        },
        PathSpec {
            id: "waymark-l7-mtls".into(),
            label: "waymark 2 hops mTLS (L7 HTTP/1.1 service)".into(),
            what: format!(
                "client dials the service address {MTLS_HTTP_ADDR} (protocol http1, one endpoint \
                 {mesh_server}:{HTTP_PORT} on node1); node0's agent parses and routes each request and \
                 sends it through its pooled upstream connection, a CONNECT stream in the mTLS \
                 tunnel (TLS 1.3, HTTP/2, port 15008) to node1's agent, which checks the client's \
                 identity and connects to the server pod. Both agents `[runtime] workers = 1`"
            ),
            hops: 2,
            layer: Layer::L7,
            same_node: false,
            agent: AgentState::Mesh(1),
            http: MTLS_HTTP_ADDR.parse().expect("valid service address"),
            bulk: None,
            proxies: vec![ProxyRef::Agent(0), ProxyRef::Agent(1)],
            baseline: "direct",
            class: Some("l7-2hop-tls"),
            quick: false,
            waymark: true,
            tunnel: true,
            proto: Proto::Http1,
            same_work: None,
        },
        PathSpec {
            id: "waymark-l4-mtls".into(),
            label: "waymark 2 hops mTLS (L4 opaque service)".into(),
            what: format!(
                "client dials {MTLS_TCP_ADDR} (bulk: {MTLS_BULK_ADDR}), an opaque service whose \
                 endpoint {mesh_server}:{HTTP_PORT} (:{IPERF_PORT}) is on node1: node0's agent opens one \
                 CONNECT stream per connection in the mTLS tunnel to node1's agent, which connects \
                 to the server pod; bytes copied, HTTP not parsed. Both agents `[runtime] workers = 1`"
            ),
            hops: 2,
            layer: Layer::L4,
            same_node: false,
            agent: AgentState::Mesh(1),
            http: MTLS_TCP_ADDR.parse().expect("valid service address"),
            bulk: Some(MTLS_BULK_ADDR.parse().expect("valid service address")),
            proxies: vec![ProxyRef::Agent(0), ProxyRef::Agent(1)],
            baseline: "direct",
            class: Some("l4-2hop-tls"),
            quick: false,
            waymark: true,
            tunnel: true,
            proto: Proto::Http1,
            same_work: None,
        },
    ];
    let mut peers = Vec::new();
    for hops in [1usize, 2] {
        for k in &PEER_KINDS {
            if k.tls && hops == 1 {
                continue;
            }
            let tcp = k.mode == Mode::Tcp;
            let (first_http, first_bulk) = match hops {
                1 => (10_000 + k.n, 10_100 + k.n),
                _ => (11_000 + k.n, 11_100 + k.n),
            };
            let http = sa(client_node_bridge, first_http);
            let bulk = tcp.then(|| sa(client_node_bridge, first_bulk));
            let mut proxies = Vec::new();
            if hops == 1 {
                let mut listeners = vec![Listener {
                    listen: http,
                    upstream: sa(server, HTTP_PORT),
                }];
                if let Some(b) = bulk {
                    listeners.push(Listener {
                        listen: b,
                        upstream: sa(server, IPERF_PORT),
                    });
                }
                proxies.push(ProxyRef::Peer(peers.len()));
                peers.push(PeerSpec {
                    name: format!("{}-1hop-node0", k.slug),
                    software: k.software,
                    mode: k.mode,
                    node: 0,
                    pod: None,
                    listeners,
                    tls: None,
                });
            } else {
                let (second_http, second_bulk) = (12_000 + k.n, 12_100 + k.n);
                let mut first = vec![Listener {
                    listen: http,
                    upstream: sa(node1_fabric, second_http),
                }];
                let mut second = vec![Listener {
                    listen: sa(node1_fabric, second_http),
                    upstream: sa(server, HTTP_PORT),
                }];
                if let Some(b) = bulk {
                    first.push(Listener {
                        listen: b,
                        upstream: sa(node1_fabric, second_bulk),
                    });
                    second.push(Listener {
                        listen: sa(node1_fabric, second_bulk),
                        upstream: sa(server, IPERF_PORT),
                    });
                }
                let tls = [
                    k.tls.then_some(PeerTls::Client),
                    k.tls.then_some(PeerTls::Server),
                ];
                for ((node, listeners), tls) in [(0, first), (1, second)].into_iter().zip(tls) {
                    proxies.push(ProxyRef::Peer(peers.len()));
                    peers.push(PeerSpec {
                        name: format!("{}-2hop-node{node}", k.slug),
                        software: k.software,
                        mode: k.mode,
                        node,
                        pod: None,
                        listeners,
                        tls,
                    });
                }
            }
            let layer = if tcp { Layer::L4 } else { Layer::L7 };
            let id = format!("{}-{hops}hop", k.slug);
            let class: &'static str = match (layer, hops, k.tls) {
                (Layer::L4, 1, _) => "l4-1hop",
                (Layer::L7, 1, _) => "l7-1hop",
                (Layer::L4, _, false) => "l4-2hop",
                (Layer::L7, _, false) => "l7-2hop",
                (Layer::L4, _, true) => "l4-2hop-tls",
                (Layer::L7, _, true) => "l7-2hop-tls",
            };
            let route = if hops == 1 {
                format!(
                    "client → {http} ({} on node0) → {server}:{HTTP_PORT}",
                    k.name
                )
            } else {
                format!(
                    "client → {http} ({} on node0) → {node1_fabric}:{} (same on node1) → {server}:{HTTP_PORT}",
                    k.name,
                    12_000 + k.n
                )
            };
            let level = if tcp {
                "L4: bytes copied, HTTP not parsed"
            } else {
                "L7: HTTP parsed, upstream keep-alive pool"
            };
            let level = if k.tls {
                format!(
                    "{level}; node0's proxy → node1's proxy over TLS 1.3 with client and server \
                     certificates (EC P-256, one CA, made with openssl at run time), both verified"
                )
            } else {
                level.to_string()
            };
            paths.push(PathSpec {
                id,
                label: format!(
                    "{} {hops} hop{}{} ({})",
                    k.name,
                    if hops == 1 { "" } else { "s" },
                    if k.tls { " mTLS" } else { "" },
                    if tcp { "L4" } else { "L7" }
                ),
                what: format!("{route}; one worker/thread per proxy; {level}"),
                hops,
                layer,
                same_node: false,
                agent: AgentState::Stopped,
                http,
                bulk,
                proxies,
                baseline: "direct",
                class: Some(class),
                quick: hops == 1 && k.slug != "haproxy-http",
                waymark: false,
                tunnel: false,
                proto: Proto::Http1,
                same_work: None,
            });
        }
    }
    // HAProxy as a sidecar would run it: in the client pod's own network
    // namespace, so its upstream connection is the pod's, as waymark's is.
    let sidecar = sa(pod_ip(0, 0), 10_009);
    paths.push(PathSpec {
        id: "haproxy-http-pod".into(),
        label: "HAProxy HTTP mode 1 hop in the client pod (L7)".into(),
        what: format!(
            "client → {sidecar} (HAProxy `mode http` in the client pod's network namespace, the \
             sidecar shape: the client reaches it over the pod's loopback, and it dials \
             {server}:{HTTP_PORT} as the pod, as waymark does by default); one thread; L7: HTTP \
             parsed, upstream keep-alive pool"
        ),
        hops: 1,
        layer: Layer::L7,
        same_node: false,
        agent: AgentState::Stopped,
        http: sidecar,
        bulk: None,
        proxies: vec![ProxyRef::Peer(peers.len())],
        baseline: "direct",
        class: Some("l7-1hop"),
        quick: false,
        waymark: false,
        tunnel: false,
        proto: Proto::Http1,
        same_work: None,
    });
    peers.push(PeerSpec {
        name: "haproxy-http-pod".into(),
        software: Software::Haproxy,
        mode: Mode::Http,
        node: 0,
        pod: Some(0),
        listeners: vec![Listener {
            listen: sidecar,
            upstream: sa(server, HTTP_PORT),
        }],
        tls: None,
    });
    paths.extend(h2_paths());
    paths.extend(grpc_paths());
    Plan { paths, peers }
}

/// The HTTP/2 rows: h2load with prior knowledge against the backend's h2c
/// listener, directly and through waymark (one hop, and two hops in the
/// mTLS tunnel). Compared with the direct h2c path only: no peer row.
fn h2_paths() -> Vec<PathSpec> {
    let server = server_ip();
    let mesh_server = mesh_server_ip();
    let base = PathSpec {
        id: "direct-h2".into(),
        label: "direct HTTP/2 (h2c), across nodes".into(),
        what: format!(
            "h2load (prior knowledge) dials {server}:{H2C_PORT}, the backend nginx's h2c listener; \
             no proxy (agents stopped)"
        ),
        hops: 0,
        layer: Layer::L4,
        same_node: false,
        agent: AgentState::Stopped,
        http: sa(server, H2C_PORT),
        bulk: None,
        proxies: vec![],
        baseline: "direct-h2",
        class: None,
        quick: false,
        waymark: false,
        tunnel: false,
        proto: Proto::H2c,
        same_work: None,
    };
    vec![
        base.clone(),
        PathSpec {
            id: "waymark-h2".into(),
            label: "waymark 1 hop (L7 HTTP/2 service)".into(),
            what: format!(
                "h2load dials the service address {H2_ADDR} (protocol http2, one endpoint \
                 {server}:{H2C_PORT}); node0's agent serves HTTP/2, routes each stream and \
                 forwards it over its HTTP/2 upstream connection. One hop. `[runtime] workers = 1`"
            ),
            hops: 1,
            layer: Layer::L7,
            agent: AgentState::Workers(1),
            http: H2_ADDR.parse().expect("valid service address"),
            proxies: vec![ProxyRef::Agent(0)],
            waymark: true,
            ..base.clone()
        },
        PathSpec {
            id: "waymark-h2-mtls".into(),
            label: "waymark 2 hops mTLS (L7 HTTP/2 service)".into(),
            what: format!(
                "h2load dials {MTLS_H2_ADDR} (protocol http2, endpoint {mesh_server}:{H2C_PORT} on \
                 node1): node0's agent forwards each stream over its HTTP/2 upstream connection, \
                 carried by a CONNECT stream in the mTLS tunnel to node1's agent. Both agents \
                 `[runtime] workers = 1`"
            ),
            hops: 2,
            layer: Layer::L7,
            agent: AgentState::Mesh(1),
            http: MTLS_H2_ADDR.parse().expect("valid service address"),
            proxies: vec![ProxyRef::Agent(0), ProxyRef::Agent(1)],
            waymark: true,
            tunnel: true,
            ..base
        },
    ]
}

/// The gRPC unary rows: h2load sending gRPC calls to `testpeer grpc`,
/// directly and through waymark (one hop, and two hops in the mTLS
/// tunnel), each call routed and balanced on its own. Compared with the
/// direct gRPC path only.
fn grpc_paths() -> Vec<PathSpec> {
    let server = server_ip();
    let mesh_server = mesh_server_ip();
    let base = PathSpec {
        id: "direct-grpc".into(),
        label: "direct gRPC unary (h2c), across nodes".into(),
        what: format!(
            "h2load sends gRPC unary calls (100-byte message) to {server}:{GRPC_PORT}, \
             `testpeer grpc` (a hyper responder echoing the message with grpc-status 0 in \
             trailers); no proxy (agents stopped)"
        ),
        hops: 0,
        layer: Layer::L4,
        same_node: false,
        agent: AgentState::Stopped,
        http: sa(server, GRPC_PORT),
        bulk: None,
        proxies: vec![],
        baseline: "direct-grpc",
        class: None,
        quick: false,
        waymark: false,
        tunnel: false,
        proto: Proto::Grpc,
        same_work: None,
    };
    vec![
        base.clone(),
        PathSpec {
            id: "waymark-grpc".into(),
            label: "waymark 1 hop (L7 gRPC service)".into(),
            what: format!(
                "h2load's gRPC calls dial the service address {GRPC_ADDR} (protocol grpc, one \
                 endpoint {server}:{GRPC_PORT}); node0's agent routes each call and forwards it \
                 over its HTTP/2 upstream connection, trailers included. One hop. \
                 `[runtime] workers = 1`"
            ),
            hops: 1,
            layer: Layer::L7,
            agent: AgentState::Workers(1),
            http: GRPC_ADDR.parse().expect("valid service address"),
            proxies: vec![ProxyRef::Agent(0)],
            waymark: true,
            ..base.clone()
        },
        PathSpec {
            id: "waymark-grpc-mtls".into(),
            label: "waymark 2 hops mTLS (L7 gRPC service)".into(),
            what: format!(
                "h2load's gRPC calls dial {MTLS_GRPC_ADDR} (protocol grpc, endpoint \
                 {mesh_server}:{GRPC_PORT} on node1): node0's agent forwards each call over its \
                 HTTP/2 upstream connection, carried by a CONNECT stream in the mTLS tunnel to \
                 node1's agent. Both agents `[runtime] workers = 1`"
            ),
            hops: 2,
            layer: Layer::L7,
            agent: AgentState::Mesh(1),
            http: MTLS_GRPC_ADDR.parse().expect("valid service address"),
            proxies: vec![ProxyRef::Agent(0), ProxyRef::Agent(1)],
            waymark: true,
            tunnel: true,
            ..base
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ids_are_unique_and_baselines_exist() {
        let p = plan();
        let mut ids: Vec<&str> = p.paths.iter().map(|x| x.id.as_str()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        for path in &p.paths {
            assert!(ids.contains(&path.baseline), "{}", path.id);
            // A same-work peer is a peer row (not waymark) of the same layer.
            if let Some(w) = path.same_work {
                let peer = p.paths.iter().find(|q| q.id == w).expect("same-work row");
                assert!(!peer.waymark && peer.layer == path.layer, "{}", path.id);
            }
            if let Some(c) = path.class {
                assert!(c.starts_with(if path.layer == Layer::L4 { "l4" } else { "l7" }));
            }
            for r in &path.proxies {
                if let ProxyRef::Peer(i) = r {
                    assert!(*i < p.peers.len());
                }
            }
        }
        let mut listens: Vec<SocketAddr> = p
            .peers
            .iter()
            .flat_map(|s| s.listeners.iter().map(|l| l.listen))
            .collect();
        let m = listens.len();
        listens.sort();
        listens.dedup();
        assert_eq!(listens.len(), m);
        assert_eq!(p.paths.len(), 28);
        assert!(agent_config_extra().parse::<toml::Table>().is_ok());
    }
}
