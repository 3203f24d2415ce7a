//! Prometheus metrics. Names follow linkerd2-proxy's where the meaning is the
//! same (`tcp_open_total`, `tcp_close_total`, `tcp_read_bytes_total`, …) so
//! existing dashboards keep working; waymark's own carry a `waymark_` prefix.
//!
//! Label values are bounded: destinations beyond `metrics.max_destinations`
//! collapse into `target_addr="overflow"`, and an unknown value is written
//! as `unknown`, never empty.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which way a connection runs through the agent, as Linkerd labels it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    /// Requests that arrived through the tunnel for this node's pods.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

pub use crate::transport::tls_label::{NoTlsReason, TlsLabel};

/// Labels of every TCP series: the direction, the source pod, where the
/// connection was going and whether it crossed nodes in mTLS.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
    /// Linkerd's `peer` label: which side of the proxy the series counts.
    pub peer: &'static str,
    pub pod: String,
    pub target_addr: String,
    #[prometheus(flatten)]
    pub tls: TlsLabel,
}

/// Success or failure of a whole connection, Linkerd's `classification`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpCloseLabels {
    pub direction: Direction,
    pub peer: &'static str,
    pub pod: String,
    pub target_addr: String,
    #[prometheus(flatten)]
    pub tls: TlsLabel,
    pub classification: &'static str,
    /// Why the agent closed it: `eof`, `connect_refused`, `connect_timeout`,
    /// `reset`, `drain`, ….
    pub reason: &'static str,
}

impl TcpCloseLabels {
    pub fn new(
        base: &TcpLabels,
        classification: &'static str,
        reason: &'static str,
    ) -> TcpCloseLabels {
        TcpCloseLabels {
            direction: base.direction,
            peer: base.peer,
            pod: base.pod.clone(),
            target_addr: base.target_addr.clone(),
            tls: base.tls,
            classification,
            reason,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

/// `path` of [`TcpMetrics::reply_path_total`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplyPathLabels {
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod: String,
}

/// A refused connection: the pod, and which limit (`pod_connections`,
/// `agent_connections`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub pod: String,
    pub limit: &'static str,
}

/// Connection-duration buckets in milliseconds: from a fast RPC to an
/// hour-long stream.
const DURATION_BUCKETS_MS: [f64; 12] = [
    1.0,
    5.0,
    10.0,
    50.0,
    100.0,
    500.0,
    1_000.0,
    5_000.0,
    10_000.0,
    60_000.0,
    300_000.0,
    3_600_000.0,
];

/// The TCP-level metrics of the proxy.
pub struct TcpMetrics {
    pub open_total: Family<TcpLabels, Counter>,
    pub open_connections: Family<TcpLabels, Gauge>,
    pub close_total: Family<TcpCloseLabels, Counter>,
    pub read_bytes_total: Family<TcpLabels, Counter>,
    pub write_bytes_total: Family<TcpLabels, Counter>,
    pub connection_duration_ms: Family<TcpLabels, Histogram>,
    /// Redirected connections whose original destination the kernel had no
    /// record of. Should stay 0; anything else is a bug or a map overflow.
    pub no_original_dst_total: Family<PodLabels, Counter>,
    /// Accepted connections whose replies to the pod go socket to socket
    /// (`redirect.reply_shortcut`), by `path`: `sockmap`, or `loopback`
    /// when the shortcut is on but this connection could not take it.
    pub reply_path_total: Family<ReplyPathLabels, Counter>,
    /// Connections taken off the reply shortcut because the agent had
    /// sent the client `redirect.reply_shortcut_max_unanswered` bytes
    /// without hearing from it (see `transport::idle::ReplyBudget`).
    pub reply_shortcut_left_total: Counter,
    /// Connections refused because a limit was reached: by the kernel at
    /// `connect()` (folded in from its counts, see
    /// `proxy::outbound::kernel_refusals`) or by the agent at accept.
    pub refused_total: Family<RefusedLabels, Counter>,
    /// Connections the agent closed because a limit was reached while
    /// they were open (`limit="idle_timeout"`).
    pub limit_closed_total: Family<RefusedLabels, Counter>,
    /// Connections a pod opened that waited for a limit before the agent
    /// took them (`limit="accept_rate"`).
    pub limit_delayed_total: Family<RefusedLabels, Counter>,
    /// What a limit refused a pod on a connection it keeps: HTTP/2 streams
    /// over `limits.h2_max_concurrent_streams` (`limit="h2_streams"`),
    /// requests left unbuffered by `limits.buffer_memory_bytes`
    /// (`limit="buffer_memory"`).
    pub limit_refused_total: Family<RefusedLabels, Counter>,
    /// Bytes held by buffered messages (retry copies, `TRACE` bodies).
    pub buffer_memory_bytes: Gauge,
    /// Entries in the original-destination maps, sampled at scrape time.
    pub redirect_map_entries: Family<MapLabels, Gauge>,
    destinations: BoundedLabel,
    /// The sliding windows of `waymark stat` (connections per edge).
    pub stats: std::sync::Arc<super::stats::Stats>,
}

/// Admits up to `max` distinct values for a label; later ones are written
/// as `overflow`, so a scan or a client inventing authorities cannot grow
/// the metrics without bound.
pub struct BoundedLabel {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl BoundedLabel {
    pub fn new(max: usize) -> Self {
        BoundedLabel {
            seen: Mutex::new(HashSet::new()),
            max,
        }
    }

    pub fn get(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value.to_string();
        }
        "overflow".to_string()
    }
}

impl TcpMetrics {
    pub fn new(
        registry: &mut Registry,
        max_destinations: usize,
        stats: std::sync::Arc<super::stats::Stats>,
    ) -> Self {
        let m = TcpMetrics {
            open_total: Family::default(),
            open_connections: Family::default(),
            close_total: Family::default(),
            read_bytes_total: Family::default(),
            write_bytes_total: Family::default(),
            connection_duration_ms: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS_MS)
            }),
            no_original_dst_total: Family::default(),
            reply_path_total: Family::default(),
            reply_shortcut_left_total: Counter::default(),
            refused_total: Family::default(),
            limit_closed_total: Family::default(),
            limit_delayed_total: Family::default(),
            limit_refused_total: Family::default(),
            buffer_memory_bytes: Gauge::default(),
            redirect_map_entries: Family::default(),
            destinations: BoundedLabel::new(max_destinations),
            stats,
        };
        registry.register(
            "tcp_open",
            "Total number of TCP connections opened",
            m.open_total.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "Number of currently open TCP connections",
            m.open_connections.clone(),
        );
        registry.register(
            "tcp_close",
            "Total number of TCP connections closed, by classification and reason",
            m.close_total.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Total bytes read from the peer named by the peer label",
            m.read_bytes_total.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Total bytes written to the peer named by the peer label",
            m.write_bytes_total.clone(),
        );
        registry.register(
            "tcp_connection_duration_ms",
            "Duration of closed TCP connections in milliseconds",
            m.connection_duration_ms.clone(),
        );
        registry.register(
            "waymark_outbound_no_original_dst",
            "Redirected connections accepted without a recorded original destination",
            m.no_original_dst_total.clone(),
        );
        registry.register(
            "waymark_outbound_reply_path",
            "Pods' redirected connections by how the agent's replies reach the pod: sockmap (socket to socket) or loopback (TCP through the pod's lo)",
            m.reply_path_total.clone(),
        );
        registry.register(
            "waymark_outbound_reply_shortcut_left",
            "Connections taken off the reply shortcut (their later replies take loopback TCP, with its flow control) because the agent sent the client redirect.reply_shortcut_max_unanswered bytes without the client sending any",
            m.reply_shortcut_left_total.clone(),
        );
        registry.register(
            "waymark_outbound_refused",
            "Pods' connections refused because a connection limit was reached (by the kernel at connect(), ECONNREFUSED; or reset at accept), by pod and limit",
            m.refused_total.clone(),
        );
        registry.register(
            "waymark_limit_closed",
            "Pods' connections the agent closed because a limit was reached while they were open (limits.idle_timeout), by pod and limit",
            m.limit_closed_total.clone(),
        );
        registry.register(
            "waymark_limit_delayed",
            "Pods' connections that waited in their listener's accept queue because the pod opened connections faster than outbound.accept_rate_per_pod (accept_rate), by pod and limit",
            m.limit_delayed_total.clone(),
        );
        registry.register(
            "waymark_limit_refused",
            "What a limit refused a pod on an open connection: HTTP/2 streams over limits.h2_max_concurrent_streams (h2_streams), requests not buffered because limits.buffer_memory_bytes was spent (buffer_memory), by pod and limit",
            m.limit_refused_total.clone(),
        );
        registry.register(
            "waymark_buffer_memory_bytes",
            "Bytes held by buffered messages (request copies for retries, TRACE response bodies), bounded by limits.buffer_memory_bytes",
            m.buffer_memory_bytes.clone(),
        );
        registry.register(
            "waymark_redirect_map_entries",
            "Entries in the kernel's original-destination maps",
            m.redirect_map_entries.clone(),
        );
        m
    }

    /// The label value for a destination, bounded by `max_destinations`.
    pub fn target_label(&self, dst: SocketAddr) -> String {
        self.destinations.get(&dst.to_string())
    }

    /// Counts a connection of `labels.pod` on its edge in the windows, to
    /// the service `dst` belongs to, else to the address; open until the
    /// guard is dropped.
    pub fn open_edge(
        &self,
        labels: &TcpLabels,
        discovery: &crate::discovery::Discovery,
        dst: SocketAddr,
    ) -> super::stats::OpenConnection {
        let table = discovery.current();
        let name = table
            .by_addr(&dst)
            .map_or(labels.target_addr.as_str(), |s| s.name.as_str());
        self.stats.connection(&labels.pod, name)
    }

    pub fn record_duration(&self, labels: &TcpLabels, d: Duration) {
        self.connection_duration_ms
            .get_or_create(labels)
            .observe(d.as_secs_f64() * 1000.0);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// The balancer's and the retry budget's view of each service, sampled at
/// scrape time from the live service table (so a removed endpoint's series
/// disappear with it).
pub struct BalancerMetrics {
    pub latency_ewma_ms: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub connect_ms: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub connects: Family<EndpointLabels, Gauge>,
    pub in_flight: Family<EndpointLabels, Gauge>,
    pub ejected: Family<EndpointLabels, Gauge>,
    pub ejections: Family<EndpointLabels, Gauge>,
    pub retry_budget_available: Family<ServiceLabels, Gauge>,
    pub endpoints: Family<ServiceLabels, Gauge>,
    pub endpoints_available: Family<ServiceLabels, Gauge>,
}

impl BalancerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = BalancerMetrics {
            latency_ewma_ms: Family::default(),
            connect_ms: Family::default(),
            connects: Family::default(),
            in_flight: Family::default(),
            ejected: Family::default(),
            ejections: Family::default(),
            retry_budget_available: Family::default(),
            endpoints: Family::default(),
            endpoints_available: Family::default(),
        };
        registry.register(
            "waymark_service_endpoints",
            "Endpoints of each service",
            m.endpoints.clone(),
        );
        registry.register(
            "waymark_service_endpoints_available",
            "Endpoints of each service not ejected by failure accrual",
            m.endpoints_available.clone(),
        );
        registry.register(
            "waymark_endpoint_latency_ewma_ms",
            "The balancer's peak-EWMA latency estimate of each endpoint",
            m.latency_ewma_ms.clone(),
        );
        registry.register(
            "waymark_endpoint_connect_ms",
            "Setup time of the last upstream connection made to each endpoint (TCP connect, tunnel CONNECT and TLS handshake, HTTP handshake); never part of the latency estimate",
            m.connect_ms.clone(),
        );
        registry.register(
            "waymark_endpoint_connects",
            "Upstream connections made to the endpoint for requests since it appeared (sampled counter)",
            m.connects.clone(),
        );
        registry.register(
            "waymark_endpoint_in_flight",
            "Requests (or opaque connections) in flight to each endpoint",
            m.in_flight.clone(),
        );
        registry.register(
            "waymark_endpoint_ejected",
            "1 while failure accrual keeps the endpoint out of the balancer",
            m.ejected.clone(),
        );
        registry.register(
            "waymark_endpoint_ejections",
            "Times the endpoint was ejected since it appeared (sampled counter)",
            m.ejections.clone(),
        );
        registry.register(
            "waymark_retry_budget_available",
            "Retries the service's budget would allow right now",
            m.retry_budget_available.clone(),
        );
        m
    }

    /// Replaces every series with the table's current state.
    pub fn sample(&self, table: &crate::discovery::ServiceTable, now: std::time::Instant) {
        self.latency_ewma_ms.clear();
        self.connect_ms.clear();
        self.connects.clear();
        self.in_flight.clear();
        self.ejected.clear();
        self.ejections.clear();
        self.retry_budget_available.clear();
        self.endpoints.clear();
        self.endpoints_available.clear();
        for service in table.services() {
            let s = ServiceLabels {
                service: service.name.clone(),
            };
            self.endpoints
                .get_or_create(&s)
                .set(service.balancer.len() as i64);
            self.endpoints_available
                .get_or_create(&s)
                .set(service.balancer.available(now) as i64);
            for (ep, stats) in service.balancer.entries() {
                let l = EndpointLabels {
                    service: service.name.clone(),
                    endpoint: ep.addr.to_string(),
                };
                self.latency_ewma_ms
                    .get_or_create(&l)
                    .set(stats.ewma(now).as_secs_f64() * 1000.0);
                let connects = stats.connects();
                if let Some(last) = connects.last {
                    self.connect_ms
                        .get_or_create(&l)
                        .set(last.as_secs_f64() * 1000.0);
                }
                self.connects
                    .get_or_create(&l)
                    .set(i64::try_from(connects.total).unwrap_or(i64::MAX));
                self.in_flight
                    .get_or_create(&l)
                    .set(stats.in_flight() as i64);
                self.ejected
                    .get_or_create(&l)
                    .set(stats.is_ejected(now) as i64);
                self.ejections
                    .get_or_create(&l)
                    .set(stats.ejections_total() as i64);
            }
            self.retry_budget_available
                .get_or_create(&s)
                .set(service.budget.available(now) as i64);
        }
    }
}

/// Builds the registry and every metric family of the agent.
pub struct Metrics {
    pub registry: Registry,
    pub tcp: std::sync::Arc<TcpMetrics>,
    pub http: std::sync::Arc<super::http_metrics::HttpMetrics>,
    pub balancer: std::sync::Arc<BalancerMetrics>,
    pub stats: std::sync::Arc<super::stats::Stats>,
}

impl Metrics {
    /// `max_stat_edges` bounds the edges of the sliding windows.
    pub fn new(max_destinations: usize, max_stat_edges: usize) -> Self {
        let mut registry = Registry::default();
        let stats = std::sync::Arc::new(super::stats::Stats::new(max_stat_edges));
        let tcp = std::sync::Arc::new(TcpMetrics::new(
            &mut registry,
            max_destinations,
            stats.clone(),
        ));
        let http = std::sync::Arc::new(super::http_metrics::HttpMetrics::new(
            &mut registry,
            max_destinations,
            stats.clone(),
        ));
        let balancer = std::sync::Arc::new(BalancerMetrics::new(&mut registry));
        Metrics {
            registry,
            tcp,
            http,
            balancer,
            stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn destinations_beyond_the_cap_collapse_to_overflow() {
        let m = Metrics::new(2, 8);
        let a = m.tcp.target_label("10.0.0.1:80".parse().unwrap());
        let b = m.tcp.target_label("10.0.0.2:80".parse().unwrap());
        let c = m.tcp.target_label("10.0.0.3:80".parse().unwrap());
        assert_eq!(a, "10.0.0.1:80");
        assert_eq!(b, "10.0.0.2:80");
        assert_eq!(c, "overflow");
        // Already admitted values keep their own label.
        assert_eq!(
            m.tcp.target_label("10.0.0.1:80".parse().unwrap()),
            "10.0.0.1:80"
        );
    }

    #[test]
    fn text_output_uses_linkerd_names() {
        let m = Metrics::new(8, 8);
        let labels = TcpLabels {
            direction: Direction::Outbound,
            peer: "dst",
            pod: "default/a".into(),
            target_addr: "10.2.0.2:80".into(),
            tls: TlsLabel::True,
        };
        m.tcp.open_total.get_or_create(&labels).inc();
        m.tcp.read_bytes_total.get_or_create(&labels).inc_by(42);
        m.tcp
            .close_total
            .get_or_create(&TcpCloseLabels::new(&labels, "success", "eof"))
            .inc();
        let mut out = String::new();
        encode(&mut out, &m.registry).unwrap();
        assert!(out.contains(
            r#"tcp_open_total{direction="outbound",peer="dst",pod="default/a",target_addr="10.2.0.2:80",tls="true"} 1"#
        ), "{out}");
        assert!(out.contains(r#"tcp_read_bytes_total{direction="outbound",peer="dst",pod="default/a",target_addr="10.2.0.2:80",tls="true"} 42"#), "{out}");
        assert!(
            out.contains(r#"tls="true",classification="success",reason="eof"} 1"#),
            "{out}"
        );
        let plain = TcpLabels {
            tls: TlsLabel::NoIdentity(NoTlsReason::LocalEndpoint),
            ..labels
        };
        m.tcp.open_total.get_or_create(&plain).inc();
        let mut out = String::new();
        encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains(r#"tls="no_identity",no_tls_reason="local_endpoint"} 1"#),
            "{out}"
        );
    }
}
