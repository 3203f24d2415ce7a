//! How the agent reaches an endpoint: directly, or through the mTLS tunnel
//! to the agent of the endpoint's node.
//!
//! The rule: a connection crosses nodes in the tunnel when this agent has
//! mTLS on, the source pod has an identity, and discovery says the endpoint
//! runs on another node whose agent is known. The tunnel then presents the
//! *source workload's* leaf and requires the peer agent's node identity.
//! Endpoints on this node, and sources without an identity, are dialled
//! directly; the reason is kept for the `no_tls_reason` label. Once the
//! tunnel applies, there is no fallback to plaintext: if the peer agent
//! cannot be reached or refuses, the connection fails.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::{Config, NodeEntry};
use crate::identity::{SpiffeId, TlsFailure};
use crate::transport::netns::{self, PodNetns};
use crate::transport::tls_label::{NoTlsReason, TlsLabel};
use crate::transport::tunnel::{ConnectHeaders, TunnelError, TunnelPool, TunnelStream};

/// A peer node's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub tunnel: SocketAddr,
    pub identity: SpiffeId,
}

/// The way to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Path {
    Direct(NoTlsReason),
    Tunnel {
        /// The source workload, whose leaf is presented.
        local: SpiffeId,
        peer: SocketAddr,
        peer_identity: SpiffeId,
    },
}

impl Path {
    pub fn tls(&self) -> TlsLabel {
        match self {
            Path::Direct(r) => TlsLabel::NoIdentity(*r),
            Path::Tunnel { .. } => TlsLabel::True,
        }
    }

    pub fn peer_identity(&self) -> Option<&SpiffeId> {
        match self {
            Path::Tunnel { peer_identity, .. } => Some(peer_identity),
            Path::Direct(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection refused by {0}")]
    Refused(SocketAddr),
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot connect to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

impl UpstreamError {
    /// Whether the peer agent refused the stream by policy.
    pub fn is_denied(&self) -> bool {
        matches!(self, Self::Tunnel(TunnelError::Denied { .. }))
    }
}

/// The mesh side of [`Upstreams`]: present only with `[identity]`.
pub struct Mesh {
    pub pool: TunnelPool,
    /// Other nodes' agents by node name; replaced on config reload.
    peers: RwLock<Arc<HashMap<String, Peer>>>,
    /// Outbound handshake failures by reason (index as in
    /// `tunnel::FAILURES`).
    handshake_failures: [AtomicU64; 6],
    pub streams_opened: AtomicU64,
    pub streams_denied: AtomicU64,
    pub streams_failed: AtomicU64,
}

impl Mesh {
    pub fn new(pool: TunnelPool, config: &Config) -> Self {
        Self {
            pool,
            peers: RwLock::new(Arc::new(peers(config))),
            handshake_failures: Default::default(),
            streams_opened: AtomicU64::new(0),
            streams_denied: AtomicU64::new(0),
            streams_failed: AtomicU64::new(0),
        }
    }

    pub fn handshake_failures(&self, why: TlsFailure) -> u64 {
        self.handshake_failures[failure_index(why)].load(Ordering::Relaxed)
    }
}

fn failure_index(why: TlsFailure) -> usize {
    crate::transport::tunnel::FAILURES
        .iter()
        .position(|f| *f == why)
        .unwrap_or(5)
}

/// The node table of a validated config, without this node.
fn peers(config: &Config) -> HashMap<String, Peer> {
    let td = config
        .identity
        .as_ref()
        .map(|i| i.trust_domain.as_str())
        .unwrap_or_default();
    config
        .nodes
        .iter()
        .filter(|n| n.name != config.node.name)
        .filter_map(|n: &NodeEntry| {
            Some((
                n.name.clone(),
                Peer {
                    tunnel: n.tunnel,
                    identity: n.identity(td)?,
                },
            ))
        })
        .collect()
}

pub struct Upstreams {
    node: String,
    connect_timeout: Duration,
    mesh: Option<Mesh>,
}

impl Upstreams {
    pub fn new(config: &Config, mesh: Option<Mesh>) -> Self {
        Self {
            node: config.node.name.clone(),
            connect_timeout: config.outbound.connect_timeout,
            mesh,
        }
    }

    /// Plaintext only (no mesh).
    #[cfg(test)]
    pub fn direct(node: &str, connect_timeout: Duration) -> Self {
        Self {
            node: node.to_string(),
            connect_timeout,
            mesh: None,
        }
    }

    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.as_ref()
    }

    /// Takes the node table of a reloaded config.
    pub fn reload(&self, config: &Config) {
        if let Some(m) = &self.mesh {
            *m.peers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(peers(config));
        }
    }

    /// The path from a source (its identity, if it has one) to an endpoint
    /// on `node` (`None`: unknown, or not a service's endpoint).
    pub fn path(&self, source: Option<&SpiffeId>, node: Option<&str>) -> Path {
        let Some(mesh) = &self.mesh else {
            return Path::Direct(NoTlsReason::Disabled);
        };
        let Some(node) = node else {
            return Path::Direct(NoTlsReason::NotProvidedByServiceDiscovery);
        };
        if node == self.node {
            return Path::Direct(NoTlsReason::LocalEndpoint);
        }
        let Some(local) = source else {
            return Path::Direct(NoTlsReason::NoSourceIdentity);
        };
        let peers = mesh.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        match peers.get(node) {
            Some(p) => Path::Tunnel {
                local: local.clone(),
                peer: p.tunnel,
                peer_identity: p.identity.clone(),
            },
            // Validation refuses endpoints on undeclared nodes; a reload
            // race is the only way here.
            None => Path::Direct(NoTlsReason::NotProvidedByServiceDiscovery),
        }
    }

    /// Connects to `target` along `path`; a direct connection is made in
    /// `from`, the source pod's network namespace, when given (see
    /// [`super::netns`]).
    pub async fn connect(
        &self,
        path: &Path,
        target: SocketAddr,
        headers: ConnectHeaders,
        from: Option<&PodNetns>,
    ) -> Result<UpstreamIo, UpstreamError> {
        match path {
            Path::Direct(_) => self.connect_direct(target, from).await.map(UpstreamIo::Tcp),
            Path::Tunnel {
                local,
                peer,
                peer_identity,
            } => {
                let Some(mesh) = &self.mesh else {
                    return self.connect_direct(target, from).await.map(UpstreamIo::Tcp);
                };
                let opened = mesh
                    .pool
                    .open(
                        local,
                        *peer,
                        peer_identity,
                        target,
                        headers.to_header_map(),
                        from,
                    )
                    .await;
                match opened {
                    Ok(s) => {
                        mesh.streams_opened.fetch_add(1, Ordering::Relaxed);
                        Ok(UpstreamIo::Tunnel(Box::new(s)))
                    }
                    Err(e) => {
                        match &e {
                            TunnelError::Denied { .. } => {
                                mesh.streams_denied.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => mesh.streams_failed.fetch_add(1, Ordering::Relaxed),
                        };
                        if let Some(f) = e.tls_failure() {
                            mesh.handshake_failures[failure_index(f)]
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        debug!(%peer, %target, error = %e, "tunnel stream failed");
                        Err(e.into())
                    }
                }
            }
        }
    }

    /// A direct TCP connection to `addr`, from the pod's namespace when
    /// `from` is given, else from the node's.
    pub async fn connect_direct(
        &self,
        addr: SocketAddr,
        from: Option<&PodNetns>,
    ) -> Result<TcpStream, UpstreamError> {
        let timeout = self.connect_timeout;
        let stream = match tokio::time::timeout(timeout, netns::connect(from, addr)).await {
            Err(_) => return Err(UpstreamError::Timeout { addr, timeout }),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(UpstreamError::Refused(addr));
            }
            Ok(Err(source)) => return Err(UpstreamError::Io { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// A random id for a connection or request that has none, so both agents'
/// logs can be joined.
pub fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A connection to an endpoint: a socket, or a stream in the tunnel.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<TunnelStream>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tunnel(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Tunnel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::Pki;

    fn config(extra: &str) -> Config {
        let mut c: Config = toml::from_str(&format!("[node]\nname = \"node0\"\n{extra}")).unwrap();
        c.identity = Some(crate::config::IdentityConfig {
            trust_domain: "cluster.local".into(),
            trust_bundle: "/x".into(),
            issuer_cert: "/x".into(),
            issuer_key: "/x".into(),
            leaf_lifetime: Duration::from_secs(60),
            node_identity: None,
        });
        c
    }

    #[test]
    fn path_follows_node_and_identity() {
        let c = config(
            "[[nodes]]\nname = \"node1\"\ntunnel = \"10.0.0.2:15008\"\n[[nodes]]\nname = \"node0\"\ntunnel = \"10.0.0.1:15008\"\n",
        );
        let pki = Pki::new();
        let pool = TunnelPool::new(pki.store.clone(), pki.bundle().clone(), Default::default());
        let up = Upstreams::new(&c, Some(Mesh::new(pool, &c)));
        let web: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(
            up.path(Some(&web), Some("node0")),
            Path::Direct(NoTlsReason::LocalEndpoint)
        );
        assert_eq!(
            up.path(None, Some("node1")),
            Path::Direct(NoTlsReason::NoSourceIdentity)
        );
        assert_eq!(
            up.path(Some(&web), None),
            Path::Direct(NoTlsReason::NotProvidedByServiceDiscovery)
        );
        let p = up.path(Some(&web), Some("node1"));
        assert_eq!(
            p,
            Path::Tunnel {
                local: web.clone(),
                peer: "10.0.0.2:15008".parse().unwrap(),
                peer_identity: "spiffe://cluster.local/ns/waymark-system/sa/node1"
                    .parse()
                    .unwrap(),
            }
        );
        assert_eq!(p.tls(), TlsLabel::True);
        let plain = Upstreams::direct("node0", Duration::from_secs(1));
        assert_eq!(
            plain.path(Some(&web), Some("node1")),
            Path::Direct(NoTlsReason::Disabled)
        );
    }
}
