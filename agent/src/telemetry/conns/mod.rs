//! The connection table behind `waymark conns` (`GET /conns`): every
//! connection the agent carries now, outbound (a pod's, accepted on its
//! listener) and inbound (a tunnel stream to a pod of this node), with its
//! pod, source and original destination, service and endpoint, protocol,
//! tunnel and peer identity, age, bytes each way and requests served; the
//! admin side joins the kernel's per-flow counters by 5-tuple when asked.
//!
//! It is a registry the data path keeps, not a scan: a connection is
//! entered when it is accepted and removed when its [`ConnGuard`] drops,
//! whatever way it ends. The data path's cost is kept to what it already
//! paid or nearly: an id and a lock of one shard of [`SHARDS`] at open and
//! at close, the bytes counted in the [`Activity`] the idle timeout
//! already touched, one relaxed add per request, and for HTTP one
//! uncontended lock per request to note the endpoint it went to. Readers
//! (the admin API) copy the entries out and never hold a lock while they
//! format.

pub mod filter;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::kernel::FlowCounters;
use crate::transport::idle::Activity;
use filter::Direction;

pub use filter::{ConnFilter, FilterError};

/// Shards of the table: connections opened at once on the data-path
/// threads rarely wait on each other's lock.
const SHARDS: usize = 16;

/// What a connection carries, as far as the agent knows yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnProtocol {
    /// Accepted; the first bytes are not read yet.
    Detecting = 0,
    /// Bytes forwarded as they are (not HTTP, or kept opaque).
    Opaque = 1,
    /// A TLS ClientHello: the application's TLS, forwarded opaque.
    Tls = 2,
    Http1 = 3,
    Http2 = 4,
    /// HTTP/2 whose requests are gRPC.
    Grpc = 5,
}

impl ConnProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnProtocol::Detecting => "detecting",
            ConnProtocol::Opaque => "opaque",
            ConnProtocol::Tls => "tls",
            ConnProtocol::Http1 => "http1",
            ConnProtocol::Http2 => "h2",
            ConnProtocol::Grpc => "grpc",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ConnProtocol::Opaque,
            2 => ConnProtocol::Tls,
            3 => ConnProtocol::Http1,
            4 => ConnProtocol::Http2,
            5 => ConnProtocol::Grpc,
            _ => ConnProtocol::Detecting,
        }
    }
}

/// Where a connection goes, once routing has said (per request for HTTP:
/// the last request's).
#[derive(Debug, Default, Clone)]
struct Routed {
    service: Option<String>,
    /// The route's backend, when it is not the service itself (a split).
    backend: Option<String>,
    endpoint: Option<SocketAddr>,
    tunnel: bool,
    /// Outbound: the destination agent the tunnel verified; inbound: the
    /// source workload whose certificate the tunnel verified.
    peer_identity: Option<SpiffeId>,
    /// The upstream TCP connection (local, peer), for the kernel's
    /// per-flow counters; none through the tunnel (a shared connection).
    upstream_flow: Option<(SocketAddr, SocketAddr)>,
}

/// One open connection, updated by the data path.
#[derive(Debug)]
pub struct LiveConn {
    id: u64,
    direction: Direction,
    /// The pod of this node it belongs to: the client (outbound) or the
    /// destination (inbound); `None` inbound to an address no pod has.
    pod: Option<String>,
    /// The client: the pod's address and port (outbound), the calling pod's
    /// as the sending agent said (inbound; `None` when it did not say).
    src: Option<SocketAddr>,
    /// What the client dialled (outbound), the target (inbound).
    dst: SocketAddr,
    /// The accepted socket (local, peer), for the kernel's counters.
    client_flow: Option<(SocketAddr, SocketAddr)>,
    activity: Arc<Activity>,
    requests: AtomicU64,
    protocol: AtomicU8,
    routed: Mutex<Routed>,
}

impl LiveConn {
    /// Bytes and the idle clock: the opaque copy and the HTTP server's
    /// stream count into it.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub fn set_protocol(&self, p: ConnProtocol) {
        self.protocol.store(p as u8, Ordering::Relaxed);
    }

    /// A request was served on it; `grpc` marks an HTTP/2 connection gRPC.
    #[inline]
    pub fn request(&self, grpc: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if grpc && self.protocol.load(Ordering::Relaxed) == ConnProtocol::Http2 as u8 {
            self.set_protocol(ConnProtocol::Grpc);
        }
    }

    /// The service it was routed to (the one dialled).
    pub fn set_service(&self, service: &str) {
        self.lock().service = Some(service.to_string());
    }

    /// Where it (or its last request) went: `backend` when a route sent it
    /// to another service than the dialled one, the endpoint, the tunnel's
    /// peer identity (none: direct) and the upstream TCP connection.
    pub fn set_upstream(
        &self,
        backend: Option<&str>,
        endpoint: SocketAddr,
        peer_identity: Option<&SpiffeId>,
        upstream_flow: Option<(SocketAddr, SocketAddr)>,
    ) {
        let mut r = self.lock();
        if r.backend.as_deref() != backend {
            r.backend = backend.map(str::to_string);
        }
        r.endpoint = Some(endpoint);
        r.tunnel = peer_identity.is_some();
        if r.peer_identity.as_ref() != peer_identity {
            r.peer_identity = peer_identity.cloned();
        }
        r.upstream_flow = upstream_flow;
    }

    /// Inbound: it came through the tunnel from `peer`, and goes to the pod
    /// over `upstream_flow`.
    pub fn set_inbound(
        &self,
        service: Option<&str>,
        peer: &SpiffeId,
        upstream_flow: Option<(SocketAddr, SocketAddr)>,
    ) {
        let mut r = self.lock();
        r.service = service.map(str::to_string);
        r.endpoint = Some(self.dst);
        r.tunnel = true;
        r.peer_identity = Some(peer.clone());
        r.upstream_flow = upstream_flow;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routed> {
        self.routed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy for the report (without the kernel's counters: see
    /// [`LiveConn::kernel_flows`]).
    pub fn row(&self) -> ConnRow {
        let routed = self.lock().clone();
        let (bytes_out, bytes_in) = self.activity.bytes();
        ConnRow {
            id: self.id,
            direction: self.direction.as_str().to_string(),
            pod: self.pod.clone(),
            src: self.src,
            dst: self.dst,
            protocol: ConnProtocol::from_u8(self.protocol.load(Ordering::Relaxed))
                .as_str()
                .to_string(),
            service: routed.service,
            backend: routed.backend,
            endpoint: routed.endpoint,
            tunnel: routed.tunnel,
            peer_identity: routed.peer_identity.map(|i| i.to_string()),
            age_ms: self.activity.age().as_millis() as u64,
            idle_ms: self.activity.idle_for().as_millis() as u64,
            bytes_out,
            bytes_in,
            requests: self.requests.load(Ordering::Relaxed),
            kernel: None,
        }
    }

    /// What `counters` (the kernel's flow map) says of each TCP connection
    /// it rides on: the accepted socket, and the upstream one when it is
    /// its own (not a tunnel shared with other streams).
    pub fn kernel_flows(
        &self,
        counters: &dyn Fn(SocketAddr, SocketAddr) -> FlowCounters,
    ) -> Vec<KernelFlowRow> {
        let upstream = self.lock().upstream_flow;
        [("client", self.client_flow), ("upstream", upstream)]
            .into_iter()
            .filter_map(|(leg, flow)| {
                flow.map(|(local, peer)| {
                    KernelFlowRow::new(leg, local, peer, counters(local, peer))
                })
            })
            .collect()
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }
}

/// A new connection, as its listener knows it.
pub struct NewConn {
    pub direction: Direction,
    pub pod: Option<String>,
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    /// The accepted socket's (local, peer) when it is a TCP socket of its
    /// own (not a tunnel stream).
    pub client_flow: Option<(SocketAddr, SocketAddr)>,
    pub protocol: ConnProtocol,
}

/// One shard of the table: connections by id.
type Shard = Mutex<HashMap<u64, Arc<LiveConn>>>;

/// Every open connection of the agent.
#[derive(Debug)]
pub struct ConnTable {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    /// Whether the kernel diagnostics run: only then are the upstream
    /// sockets' local addresses (a `getsockname` each) worth asking.
    flows_wanted: AtomicBool,
    /// The outbound connection limits in force, once the agent has derived
    /// them (`/conns` reports them, so `waymark trace` can say which one a
    /// refused connection met without re-deriving them from the config).
    limits: OnceLock<OutboundLimits>,
    /// Each pod's redirected sockets as the kernel counts them against its
    /// connection limit (see `proxy::outbound::kernel_refusals`), set by
    /// the agent at start.
    kernel_sockets: OnceLock<KernelSockets>,
}

/// Reads each pod's kernel socket count, by pod name.
pub struct KernelSockets(pub Box<dyn Fn() -> Vec<(String, i64)> + Send + Sync>);

impl std::fmt::Debug for KernelSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelSockets")
    }
}

/// How many outbound connections the agent takes, per pod and in all (0:
/// no limit), as derived at start from `[outbound]` and the open-files
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundLimits {
    pub per_pod: usize,
    pub total: usize,
}

impl Default for ConnTable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            flows_wanted: AtomicBool::new(false),
            limits: OnceLock::new(),
            kernel_sockets: OnceLock::new(),
        }
    }
}

impl ConnTable {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records the outbound limits in force (the first call wins: they are
    /// derived once, at start).
    pub fn set_limits(&self, limits: OutboundLimits) {
        let _ = self.limits.set(limits);
    }

    pub fn limits(&self) -> Option<OutboundLimits> {
        self.limits.get().copied()
    }

    pub fn set_kernel_sockets(&self, read: KernelSockets) {
        let _ = self.kernel_sockets.set(read);
    }

    /// Each pod's redirected sockets as the kernel counts them (`None`
    /// where nothing reads them: a table outside the agent, as in tests).
    pub fn kernel_sockets(&self) -> Option<Vec<(String, i64)>> {
        self.kernel_sockets.get().map(|read| (read.0)())
    }

    /// Enters a connection; it stays in the table until the guard drops.
    pub fn open(self: &Arc<Self>, c: NewConn) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(LiveConn {
            id,
            direction: c.direction,
            pod: c.pod,
            src: c.src,
            dst: c.dst,
            client_flow: c.client_flow,
            activity: Arc::new(Activity::new()),
            requests: AtomicU64::new(0),
            protocol: AtomicU8::new(c.protocol as u8),
            routed: Mutex::default(),
        });
        self.shard(id).insert(id, conn.clone());
        ConnGuard {
            table: self.clone(),
            conn,
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConn>>> {
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.shard(i as u64).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open connections, oldest first (shards are copied one at a time:
    /// the data path waits on none for longer than a copy of its pointers).
    pub fn connections(&self) -> Vec<Arc<LiveConn>> {
        let mut all: Vec<Arc<LiveConn>> = (0..SHARDS)
            .flat_map(|i| self.shard(i as u64).values().cloned().collect::<Vec<_>>())
            .collect();
        all.sort_unstable_by_key(|c| c.id);
        all
    }

    /// The kernel diagnostics run: note upstream sockets' addresses.
    pub fn want_flows(&self) {
        self.flows_wanted.store(true, Ordering::Relaxed);
    }

    pub fn flows_wanted(&self) -> bool {
        self.flows_wanted.load(Ordering::Relaxed)
    }
}

/// Keeps a connection in the table; dropping it takes it out.
#[derive(Debug)]
pub struct ConnGuard {
    table: Arc<ConnTable>,
    conn: Arc<LiveConn>,
}

impl ConnGuard {
    pub fn conn(&self) -> &Arc<LiveConn> {
        &self.conn
    }
}

impl std::ops::Deref for ConnGuard {
    type Target = LiveConn;
    fn deref(&self) -> &LiveConn {
        &self.conn
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.shard(self.conn.id).remove(&self.conn.id);
    }
}

/// `GET /conns`: the agent serializes and the CLI parses the same types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnsReport {
    /// Connections open on the agent, before the filter.
    pub open: usize,
    /// Whether the kernel diagnostics run (else no `kernel` per row).
    pub kernel_counters: bool,
    /// The outbound limits in force (absent from an agent that predates
    /// them).
    #[serde(default)]
    pub limits: Option<OutboundLimits>,
    /// Each pod's redirected sockets as the kernel counts them against its
    /// connection limit: from `connect()` to close, so also those not
    /// accepted yet and those the agent has closed but the pod has not
    /// (filtered by `pod=`). The kernel refuses the pod's next `connect()`
    /// once this reaches the limit, whatever the agent holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_sockets: Option<std::collections::BTreeMap<String, i64>>,
    pub connections: Vec<ConnRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnRow {
    /// In accept order, unique while the agent runs.
    pub id: u64,
    /// `out` (a pod of this node's) or `in` (through the tunnel to one).
    pub direction: String,
    #[serde(default)]
    pub pod: Option<String>,
    /// The client (inbound: as the sending agent said, when it did).
    #[serde(default)]
    pub src: Option<SocketAddr>,
    /// The original destination: what the client dialled (outbound), the
    /// pod's address the sending agent asked for (inbound).
    pub dst: SocketAddr,
    /// `detecting`, `opaque`, `tls`, `http1`, `h2`, `grpc`.
    pub protocol: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    /// Where it goes (HTTP: where its last request went).
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    pub tunnel: bool,
    #[serde(default)]
    pub peer_identity: Option<String>,
    pub age_ms: u64,
    /// Since a byte last moved either way.
    pub idle_ms: u64,
    /// From the client towards the destination, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// HTTP requests served on it (0 for opaque bytes).
    pub requests: u64,
    /// The kernel's counters on its TCP connections; absent when the kernel
    /// diagnostics do not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<Vec<KernelFlowRow>>,
}

/// What the kernel counted on one TCP connection of a proxied connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelFlowRow {
    /// `client` (the accepted socket) or `upstream` (the agent's socket to
    /// the endpoint or pod).
    pub leg: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub drops: u64,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
}

impl KernelFlowRow {
    fn new(leg: &str, local: SocketAddr, peer: SocketAddr, c: FlowCounters) -> Self {
        Self {
            leg: leg.to_string(),
            local,
            peer,
            drops: c.drops,
            retransmits: c.retransmits,
            resets_sent: c.resets_sent,
            resets_received: c.resets_received,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn new(pod: &str) -> NewConn {
        NewConn {
            direction: Direction::Out,
            pod: Some(pod.into()),
            src: Some(addr("10.1.0.2:40000")),
            dst: addr("10.96.0.1:80"),
            client_flow: Some((addr("127.0.0.1:15001"), addr("127.0.0.1:40000"))),
            protocol: ConnProtocol::Detecting,
        }
    }

    #[test]
    fn a_connection_is_listed_while_its_guard_lives() {
        let table = ConnTable::new();
        let a = table.open(new("default/a"));
        let b = table.open(new("default/b"));
        assert_eq!(table.len(), 2);
        a.set_protocol(ConnProtocol::Http2);
        a.set_service("web");
        a.set_upstream(Some("web-v2"), addr("10.2.0.5:8080"), None, None);
        a.request(true);
        a.request(false);
        a.activity().moved_out(10);
        a.activity().moved_in(7);
        let rows: Vec<ConnRow> = table.connections().iter().map(|c| c.row()).collect();
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(r.pod.as_deref(), Some("default/a"));
        assert_eq!(r.protocol, "grpc");
        assert_eq!(r.service.as_deref(), Some("web"));
        assert_eq!(r.backend.as_deref(), Some("web-v2"));
        assert_eq!(r.endpoint, Some(addr("10.2.0.5:8080")));
        assert_eq!((r.requests, r.bytes_out, r.bytes_in), (2, 10, 7));
        assert!(!r.tunnel);
        // The client leg only: no upstream socket was noted.
        let zero = |_, _| FlowCounters::default();
        assert_eq!(a.kernel_flows(&zero).len(), 1);
        a.set_upstream(
            None,
            addr("10.2.0.5:8080"),
            None,
            Some((addr("10.1.0.2:50000"), addr("10.2.0.5:8080"))),
        );
        let legs: Vec<String> = a.kernel_flows(&zero).into_iter().map(|f| f.leg).collect();
        assert_eq!(legs, ["client", "upstream"]);
        assert_eq!(a.row().backend, None);
        assert_eq!(rows[1].protocol, "detecting");
        drop(a);
        assert_eq!(table.len(), 1);
        assert_eq!(
            table.connections()[0].row().pod.as_deref(),
            Some("default/b")
        );
        drop(b);
        assert!(table.is_empty());
    }
}
