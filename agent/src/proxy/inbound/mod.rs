//! Inbound: the tunnel listener (port 15008) through which other nodes'
//! agents reach this node's pods, and the tunnel's metrics on both sides.
//!
//! The server presents this node's identity, requires a client leaf of the
//! trust domain (the source workload's), authorizes that identity for the
//! target ([`crate::proxy::inbound::authz`]) and connects to the pod. A refused stream gets
//! a 403 with the reason; the outbound agent turns it into the client's
//! error.

pub mod authz;
pub mod http_stream;
mod request;
pub mod server;
pub mod stream_limits;
mod tap;
mod tcp;
pub mod trace;
#[cfg(test)]
mod tunnel_tests;

pub use server::{
    Admitted, Authorize, ConnectInfo, DenyReason, HandleFuture, ServerConfig, ServerStats,
    StreamHandler, TunnelServer,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tracing::info;

use crate::drain::Drain;
use crate::identity::{CertStore, SpiffeId, TrustBundle, server_config, with_server_key_log};
use crate::proxy::inbound::authz::InboundAuthz;
use crate::proxy::inbound::http_stream::InboundHttp;
use crate::proxy::inbound::server::{FAILURES, ServerTls};
use crate::transport::upstream::Upstreams;

/// The running inbound side.
pub struct Inbound {
    pub stats: Arc<ServerStats>,
    tls: Arc<ServerTls>,
    store: Arc<CertStore>,
    node_identity: SpiffeId,
    key_log: Option<Arc<dyn rustls::KeyLog>>,
}

impl Inbound {
    /// Binds every listen address and serves until `drain` starts: `http`'s
    /// authorizer admits streams, and `http` serves them.
    pub async fn start(
        listen: &[SocketAddr],
        config: ServerConfig,
        store: Arc<CertStore>,
        node_identity: SpiffeId,
        bundle: &TrustBundle,
        http: Arc<InboundHttp>,
        drain: &Drain,
    ) -> Result<Self> {
        let authz: Arc<InboundAuthz> = http.authz.clone();
        let key_log = config.key_log.clone();
        let tls = ServerTls::new(with_server_key_log(
            server_config(store.clone(), node_identity.clone(), bundle)
                .context("cannot build the inbound TLS configuration")?,
            key_log.as_ref(),
        ));
        let stats = Arc::new(ServerStats::default());
        for addr in listen {
            let listener = bind(*addr)
                .with_context(|| format!("cannot bind the inbound tunnel listener on {addr}"))?;
            let server = TunnelServer::new(
                listener,
                tls.clone(),
                authz.clone(),
                config.clone(),
                stats.clone(),
            )
            .with_handler(http.clone() as Arc<dyn StreamHandler>)
            .with_drain(drain.clone());
            info!(listen = %server.local_addr()?, identity = %node_identity, "inbound tunnel listening");
            drain.inbound().spawn(server.serve());
        }
        Ok(Self {
            stats,
            tls,
            store,
            node_identity,
            key_log,
        })
    }

    /// Verifies clients against `bundle` from the next handshake on, and
    /// closes open connections whose peer it no longer accepts.
    pub fn set_bundle(&self, bundle: &TrustBundle) {
        let configs = server_config(self.store.clone(), self.node_identity.clone(), bundle)
            .and_then(|c| Ok((c, crate::identity::tls::client_verifier(bundle)?)));
        match configs {
            Ok((c, verifier)) => {
                self.tls.set(with_server_key_log(c, self.key_log.as_ref()));
                self.tls.set_trust(verifier);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot rebuild the inbound TLS configuration; keeping the old trust bundle")
            }
        }
    }
}

/// IPv6 listeners are v6-only so `0.0.0.0` and `[::]` can both be bound.
/// `SO_REUSEPORT`: during a rollout the new agent binds beside the old one
/// (see `crate::handover`).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    direction: &'static str,
    result: &'static str,
}

/// Reads the tunnel's own counters (kept as atomics by the server and the
/// pool) at scrape time.
pub struct TunnelCollector {
    pub inbound: Option<Arc<ServerStats>>,
    pub upstreams: Arc<Upstreams>,
}

impl std::fmt::Debug for TunnelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelCollector").finish_non_exhaustive()
    }
}

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut connections = Vec::new();
        let mut failures = Vec::new();
        let mut streams = Vec::new();
        let mut closed = Vec::new();
        if let Some(s) = &self.inbound {
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            connections.push(("inbound", load(&s.tls_established)));
            for f in FAILURES {
                failures.push(("inbound", f.as_str(), s.handshake_failures(f)));
            }
            failures.push(("inbound", "timeout", load(&s.handshake_timeouts)));
            failures.push((
                "inbound",
                "too_many_handshakes",
                load(&s.handshakes_refused),
            ));
            streams.push(("inbound", "opened", load(&s.streams_opened)));
            streams.push(("inbound", "denied", load(&s.streams_denied)));
            streams.push(("inbound", "limited", load(&s.streams_limited)));
            streams.push(("inbound", "connect_failed", load(&s.connect_failed)));
            closed.push(("inbound", "idle_timeout", load(&s.idle_closed)));
            closed.push(("inbound", "untrusted", load(&s.untrusted_closed)));
        }
        if let Some(m) = self.upstreams.mesh() {
            connections.push(("outbound", m.pool.connections_opened()));
            for f in FAILURES {
                failures.push(("outbound", f.as_str(), m.handshake_failures(f)));
            }
            streams.push((
                "outbound",
                "opened",
                m.streams_opened.load(Ordering::Relaxed),
            ));
            streams.push((
                "outbound",
                "denied",
                m.streams_denied.load(Ordering::Relaxed),
            ));
            streams.push((
                "outbound",
                "failed",
                m.streams_failed.load(Ordering::Relaxed),
            ));
        }
        if connections.is_empty() {
            return Ok(());
        }
        encode_counters(
            &mut encoder,
            "waymark_tunnel_connections",
            "mTLS tunnel connections established between agents (outbound: by this agent's pool; inbound: accepted)",
            connections
                .into_iter()
                .map(|(direction, v)| (DirLabels { direction }, v)),
        )?;
        encode_counters(
            &mut encoder,
            "waymark_tunnel_handshake_failures",
            "Failed tunnel TLS handshakes by reason (unknown_ca, expired, wrong_identity, no_certificate, bad_certificate, protocol, timeout)",
            failures
                .into_iter()
                .map(|(direction, reason, v)| (FailureLabels { direction, reason }, v)),
        )?;
        if !closed.is_empty() {
            encode_counters(
                &mut encoder,
                "waymark_tunnel_closed",
                "Tunnel connections the agent closed: idle_timeout (a GOAWAY after limits.idle_timeout without a stream), untrusted (a new trust bundle no longer accepts the peer's chain)",
                closed
                    .into_iter()
                    .map(|(direction, reason, v)| (ClosedLabels { direction, reason }, v)),
            )?;
        }
        encode_counters(
            &mut encoder,
            "waymark_tunnel_streams",
            "Tunnel CONNECT streams by result",
            streams
                .into_iter()
                .map(|(direction, result, v)| (StreamLabels { direction, result }, v)),
        )
    }
}

/// `waymark_inbound_strict_refused_total{pod}`: the kernel's own count of
/// connection attempts strict inbound refused, per pod, read from its map
/// when scraped (`ebpf/kernel/src/inbound.rs`).
pub struct StrictCollector {
    pub redirect: Arc<std::sync::RwLock<crate::redirect::Redirect>>,
    /// Strict pods' names by network-namespace cookie, filled once the
    /// pods are bound (empty: strict inbound is off).
    pub pods: Arc<std::sync::RwLock<std::collections::HashMap<u64, String>>>,
}

impl std::fmt::Debug for StrictCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrictCollector").finish_non_exhaustive()
    }
}

impl Collector for StrictCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        if pods.is_empty() {
            return Ok(());
        }
        let refused = self
            .redirect
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .strict_refused();
        encode_counters(
            &mut encoder,
            "waymark_inbound_strict_refused",
            "New TCP connections to a meshed pod refused under inbound.mode = \"strict\" (plaintext from another node), by pod",
            refused
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .filter_map(|(cookie, n)| {
                    let pod = pods.get(&cookie)?.clone();
                    Some((crate::telemetry::metrics::PodLabels { pod }, n))
                }),
        )
    }
}

fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let counter = ConstCounter::new(0u64);
    let mut metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    for (labels, v) in series {
        let family = metric.encode_family(&labels)?;
        ConstCounter::new(v).encode(family)?;
    }
    Ok(())
}
