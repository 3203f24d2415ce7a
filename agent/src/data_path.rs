//! The outbound data path as one part: the HTTP connection pool, the HTTP
//! proxy (routes, balancing, retries, timeouts, budgets, errors) and the
//! accept loops of pods' listeners, built from a config and what the rest of
//! the agent shares with them.
//!
//! `app::run` builds it between the kernel (which supplies original
//! destinations and enrolls pods) and the operator's surface (admin API,
//! reload); `in_process` builds it with neither, so that routing, retries,
//! timeouts, budgets and the proxy's errors can be tested in seconds
//! without root or eBPF. Both go through [`DataPath::new`], so a test
//! exercises the wiring the agent runs.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::config::Config;
use crate::diagnostics::tap::TapHub;
use crate::discovery::Discovery;
use crate::drain::Drain;
use crate::http::budget::BufferBudget;
use crate::http::pool::Pool;
use crate::kernel::KernelDiag;
use crate::proxy::OriginalDst;
use crate::proxy::outbound::accept_rate::AcceptRate;
use crate::proxy::outbound::forward::HttpProxy;
use crate::proxy::outbound::{ConnLimits, Outbound, ShortcutLeaver};
use crate::telemetry::conns::ConnTable;
use crate::telemetry::metrics::Metrics;
use crate::transport::upstream::Upstreams;

/// What the data path shares with the rest of the agent, made before it.
pub struct Shared<'a> {
    pub metrics: &'a Metrics,
    /// Services and endpoints, kept current by reloads and discovery.
    pub discovery: Arc<Discovery>,
    /// Direct or through the tunnel, per endpoint.
    pub upstreams: Arc<Upstreams>,
    /// Where each redirected connection was going.
    pub original_dst: Arc<dyn OriginalDst>,
    pub tap: Arc<TapHub>,
    pub conns: Arc<ConnTable>,
    /// Shared with the inbound side: one bound for the node.
    pub buffer_budget: Arc<BufferBudget>,
    /// Shared with the inbound side: the agent's descriptors.
    pub descriptors: Arc<crate::proxy::descriptors::Descriptors>,
    pub kernel: Option<Arc<KernelDiag>>,
    /// The agent's drain, which the accept loops' connections join.
    pub drain: Drain,
}

/// The parts of the outbound data path the rest of the agent holds on to.
pub struct DataPath {
    pub pool: Arc<Pool>,
    pub http: Arc<HttpProxy>,
    /// Serves pods' listeners (`Outbound::serve`), drained on shutdown.
    pub outbound: Arc<Outbound>,
}

impl DataPath {
    pub fn new(config: &Config, shared: Shared<'_>) -> Self {
        let Shared {
            metrics,
            discovery,
            upstreams,
            original_dst,
            tap,
            conns,
            buffer_budget,
            descriptors,
            kernel,
            drain,
        } = shared;
        let pool = Pool::new(upstreams.clone());
        let http = Arc::new(HttpProxy {
            node: config.node.name.clone(),
            metrics: metrics.http.clone(),
            discovery: discovery.clone(),
            pool: pool.clone(),
            retry_buffer: config.proxy.retry_buffer_bytes,
            buffer_budget,
            limits: config.limits.clone(),
            limit_closed: metrics.tcp.limit_closed_total.clone(),
            limit_refused: metrics.tcp.limit_refused_total.clone(),
            tap,
            kernel,
        });
        let outbound = Arc::new(Outbound {
            shortcut_exit: Arc::new(ShortcutLeaver {
                original_dst: original_dst.clone(),
                metrics: metrics.tcp.clone(),
            }),
            original_dst,
            discovery,
            http: http.clone(),
            detect_timeout: config.proxy.detect_timeout,
            opaque_ports: config.proxy.opaque_ports.clone(),
            metrics: metrics.tcp.clone(),
            upstreams,
            drain,
            limits: ConnLimits::new(
                config.outbound.max_connections_per_pod,
                config.outbound.max_connections,
                AcceptRate {
                    per_second: config.outbound.accept_rate_per_pod,
                    burst: config.outbound.accept_burst_per_pod,
                },
            ),
            idle_timeout: config.limits.idle_timeout,
            open_total: Arc::new(AtomicUsize::new(0)),
            descriptors,
            conns,
        });
        Self {
            pool,
            http,
            outbound,
        }
    }
}
