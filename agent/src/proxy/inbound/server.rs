//! The inbound tunnel server (port 15008): TLS with client certificates,
//! HTTP/2, one `CONNECT` per proxied connection.
//!
//! Hostile input is bounded before it costs anything: at most
//! `max_handshakes` TLS handshakes run at once (a connection beyond them is
//! reset before any TLS work, so a flood of ClientHellos or of connections
//! that never send one cannot take the data path's threads, and the
//! tunnel connections already up keep carrying streams), a TLS handshake must
//! finish within `handshake_timeout` (a stalled client is dropped), HTTP/2
//! limits the number of concurrent streams and the size of a header list
//! (an oversize `CONNECT` is refused by h2 before it reaches us), and
//! garbage or plaintext on the port fails the handshake of that connection
//! only.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::drain::Drain;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};

use super::stream_limits::PeerStreams;
use crate::identity::{CertInfo, TlsFailure, peer_info};
use crate::transport::copy;
use crate::transport::idle::{OpenStream, Streams, streams_expired};
use crate::transport::linger::h2_io;
use crate::transport::tunnel::{DENY_REASON, ERROR_REASON, SOURCE_WORKLOAD};

const SOURCE_MISMATCH: &str = "source workload header does not match the client certificate";

/// Limits and timeouts of the inbound side.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once (`limits.tunnel_max_handshakes`).
    pub max_handshakes: usize,
    pub connect_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// Streams one peer identity may hold at once over all its tunnel
    /// connections (`limits.tunnel_max_streams_per_peer`; 0: no bound).
    pub max_streams_per_peer: usize,
    /// The agent's descriptor budget, one per stream (`None`: not
    /// counted, as in the unit tests that do not ask for it).
    pub descriptors: Option<Arc<crate::proxy::descriptors::Descriptors>>,
    pub max_header_list_size: u32,
    /// HTTP/2 flow-control windows: large enough that one bulk stream is not
    /// throttled by round trips between nodes.
    pub stream_window: u32,
    pub connection_window: u32,
    /// Where session secrets go (a capture's key log); `None`: nowhere.
    pub key_log: Option<std::sync::Arc<dyn rustls::KeyLog>>,
    /// A tunnel connection with no stream open for this long is closed
    /// with a GOAWAY (`limits.idle_timeout`): a peer agent, or a pod that
    /// dialled once through it, cannot keep a TLS session, its buffers and
    /// its socket here for ever with PINGs alone.
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: crate::config::limits::DEFAULT_TUNNEL_MAX_HANDSHAKES,
            connect_timeout: Duration::from_secs(5),
            max_concurrent_streams: 1000,
            max_streams_per_peer: 0,
            descriptors: None,
            max_header_list_size: 16 * 1024,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            key_log: None,
            idle_timeout: crate::config::limits::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What the authorizer is asked about.
#[derive(Debug)]
pub struct ConnectInfo<'a> {
    /// The verified client identity (from its certificate, not a header).
    pub peer: &'a CertInfo,
    pub target: SocketAddr,
    pub headers: &'a HeaderMap,
}

/// Why a stream was refused; sent back in `x-waymark-deny-reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyReason(pub String);

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type AuthorizeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), DenyReason>> + Send + 'a>>;

/// Authorization of a source identity for a target; async so a policy
/// source (config, Kubernetes) can be consulted.
pub trait Authorize: Send + Sync + 'static {
    fn authorize<'a>(&'a self, req: ConnectInfo<'a>) -> AuthorizeFuture<'a>;
}

/// Synchronous closures are authorizers too.
impl<F> Authorize for F
where
    F: Fn(&ConnectInfo<'_>) -> Result<(), DenyReason> + Send + Sync + 'static,
{
    fn authorize<'a>(&'a self, req: ConnectInfo<'a>) -> AuthorizeFuture<'a> {
        Box::pin(std::future::ready(self(&req)))
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub tcp_accepted: AtomicU64,
    pub tls_established: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Connections reset because `max_handshakes` were in progress.
    pub handshakes_refused: AtomicU64,
    handshake_failures: [AtomicU64; 6],
    pub streams_opened: AtomicU64,
    pub streams_denied: AtomicU64,
    /// Streams answered 503 at `max_streams_per_peer` or for want of a
    /// descriptor.
    pub streams_limited: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Connections closed (GOAWAY) after `idle_timeout` without a stream.
    pub idle_closed: AtomicU64,
    /// Connections closed because a new trust bundle no longer accepts the
    /// peer's certificate chain.
    pub untrusted_closed: AtomicU64,
}

pub use crate::transport::tunnel::FAILURES;

impl ServerStats {
    pub fn handshake_failures(&self, why: TlsFailure) -> u64 {
        let i = FAILURES
            .iter()
            .position(|f| *f == why)
            .unwrap_or(FAILURES.len() - 1);
        self.handshake_failures[i].load(Ordering::Relaxed)
    }

    fn count_failure(&self, why: TlsFailure) {
        let i = FAILURES
            .iter()
            .position(|f| *f == why)
            .unwrap_or(FAILURES.len() - 1);
        self.handshake_failures[i].fetch_add(1, Ordering::Relaxed);
    }
}

pub struct TunnelServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// The server's TLS configuration, replaceable while it runs (a new trust
/// bundle): each handshake takes the one current when it starts, and each
/// open connection checks its peer's chain again against a new bundle.
pub struct ServerTls {
    acceptor: std::sync::RwLock<TlsAcceptor>,
    /// The client verifier of the bundle in force once it has changed
    /// (`None`: the one the connections were verified with).
    trust: tokio::sync::watch::Sender<Option<Arc<dyn ClientCertVerifier>>>,
}

impl ServerTls {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Arc<Self> {
        Arc::new(Self {
            acceptor: std::sync::RwLock::new(TlsAcceptor::from(config)),
            trust: tokio::sync::watch::Sender::new(None),
        })
    }

    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(config);
    }

    /// A new trust bundle's verifier: every open connection whose peer's
    /// chain it does not accept (an issuer dropped from the bundle) is
    /// closed, with the streams on it.
    pub fn set_trust(&self, verifier: Arc<dyn ClientCertVerifier>) {
        self.trust.send_replace(Some(verifier));
    }

    fn current(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Resolves with the reason once a new trust bundle no longer accepts
/// `chain` (the peer's certificates as presented in its handshake).
async fn distrusted(
    mut trust: tokio::sync::watch::Receiver<Option<Arc<dyn ClientCertVerifier>>>,
    chain: Vec<CertificateDer<'static>>,
) -> rustls::Error {
    loop {
        if trust.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let verifier = trust.borrow_and_update().clone();
        if let (Some(v), Some((leaf, intermediates))) = (verifier, chain.split_first())
            && let Err(e) = v.verify_client_cert(leaf, intermediates, UnixTime::now())
        {
            return e;
        }
    }
}

struct Shared {
    /// Permits for TLS handshakes in progress.
    handshakes: Arc<tokio::sync::Semaphore>,
    tls: Arc<ServerTls>,
    authorizer: Arc<dyn Authorize>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
    handler: Arc<dyn StreamHandler>,
    drain: Drain,
    /// Streams open per peer identity.
    peers: Arc<PeerStreams>,
}

/// A stream that passed authorization and whose target is connected: the
/// tunnel end (after the `200`) and the connection to the target.
pub struct Admitted {
    pub peer: Arc<CertInfo>,
    pub target: SocketAddr,
    /// The `CONNECT` request's headers (`forwarded`, `x-request-id`, …).
    pub headers: HeaderMap,
    /// Cancelled when the agent drains: a handler serving HTTP on the
    /// stream finishes the request in flight and closes.
    pub stop: CancellationToken,
    pub tunnel: TokioIo<hyper::upgrade::Upgraded>,
    pub upstream: TcpStream,
}

pub type HandleFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What is done with an admitted stream: the agent looks at HTTP on it
/// (`proxy::inbound_http`); without a handler the bytes are spliced.
pub trait StreamHandler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, stream: Admitted) -> HandleFuture;
}

/// The default handler: bytes both ways, untouched.
struct Splice;

impl StreamHandler for Splice {
    fn handle(self: Arc<Self>, stream: Admitted) -> HandleFuture {
        Box::pin(splice(stream.tunnel, stream.upstream))
    }
}

impl TunnelServer {
    /// Binds `addr` with counters and TLS of its own (the unit tests' way;
    /// the agent binds its listeners itself and uses [`TunnelServer::new`]).
    #[cfg(test)]
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        authorizer: Arc<dyn Authorize>,
        config: ServerConfig,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::new(
            listener,
            ServerTls::new(tls),
            authorizer,
            config,
            Arc::default(),
        ))
    }

    /// A server on an already bound listener; several servers (one per
    /// listen address) may share the TLS configuration and the counters.
    pub fn new(
        listener: TcpListener,
        tls: Arc<ServerTls>,
        authorizer: Arc<dyn Authorize>,
        config: ServerConfig,
        stats: Arc<ServerStats>,
    ) -> Self {
        let shared = Arc::new(Shared {
            handshakes: Arc::new(tokio::sync::Semaphore::new(config.max_handshakes.max(1))),
            tls,
            authorizer,
            config,
            stats,
            handler: Arc::new(Splice),
            drain: Drain::default(),
            peers: Arc::default(),
        });
        Self { listener, shared }
    }

    /// The TLS configuration, to swap trust bundles (the unit tests').
    #[cfg(test)]
    pub fn tls(&self) -> Arc<ServerTls> {
        self.shared.tls.clone()
    }

    /// Hands admitted streams to `handler` instead of splicing them.
    pub fn with_handler(mut self, handler: Arc<dyn StreamHandler>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.handler = handler;
        }
        self
    }

    /// Stops and is waited for through the agent's `drain`: when it starts
    /// the listener closes and every connection gets a GOAWAY (no new
    /// streams; the streams in flight go on, and HTTP served on them closes
    /// once its current request is answered); every connection and stream
    /// is tracked in its inbound tracker.
    pub fn with_drain(mut self, drain: Drain) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.drain = drain;
        }
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    #[cfg(test)]
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }

    /// Accepts until the drain starts (or the task is dropped); each
    /// connection runs on its own task.
    pub async fn serve(self) {
        let stop = self.shared.drain.started().clone();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.shared
                .stats
                .tcp_accepted
                .fetch_add(1, Ordering::Relaxed);
            let Ok(permit) = self.shared.handshakes.clone().try_acquire_owned() else {
                // Reset rather than queue: a queue would hold the socket
                // (and the peer's retry) for as long as the flood lasts.
                self.shared
                    .stats
                    .handshakes_refused
                    .fetch_add(1, Ordering::Relaxed);
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                debug!(%peer, max = self.shared.config.max_handshakes, "tunnel connection reset: limits.tunnel_max_handshakes handshakes in progress");
                continue;
            };
            let shared = self.shared.clone();
            self.shared.drain.inbound().spawn(
                shared
                    .connection(tcp, permit)
                    .instrument(info_span!("tunnel_in", %peer)),
            );
        }
        info!(listen = ?self.listener.local_addr().ok(), "inbound tunnel listener closed for the drain");
    }
}

impl Shared {
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(
            self.config.handshake_timeout,
            self.tls.current().accept(tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let why = TlsFailure::find(&e).unwrap_or(TlsFailure::Protocol);
                self.stats.count_failure(why);
                warn!(reason = why.as_str(), error = %e, "tunnel TLS handshake failed");
                return;
            }
            Err(_) => {
                self.stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                warn!(timeout = ?self.config.handshake_timeout, "tunnel TLS handshake timed out");
                return;
            }
        };
        drop(permit);
        // The verifier accepted a chain with a SPIFFE ID, so this is present.
        let Some(peer) = peer_info(tls.get_ref().1) else {
            self.stats.count_failure(TlsFailure::WrongIdentity);
            return;
        };
        self.stats.tls_established.fetch_add(1, Ordering::Relaxed);
        debug!(peer_id = %peer.id, serial = %peer.serial, "tunnel connection established");
        // Subscribed before anything else can change: a bundle swapped
        // after this handshake is checked against this peer.
        let chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let distrusted = distrusted(self.tls.trust.subscribe(), chain);
        let peer = Arc::new(peer);
        let peer_id = peer.id.clone();
        let this = self.clone();
        let streams = Arc::new(Streams::default());
        let svc_streams = streams.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let peer = peer.clone();
            let open = svc_streams.begin();
            async move { Ok::<_, Infallible>(this.stream(req, peer, open).await) }
        });
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.max_concurrent_streams(self.config.max_concurrent_streams)
            .max_header_list_size(self.config.max_header_list_size)
            .initial_stream_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_send_buf_size(1 << 20);
        // Many streams' frames leave in one record, and the peer gets what
        // is still on its way when the connection ends (see `h2_io`).
        let conn = h2.serve_connection(TokioIo::new(h2_io(tls)), service);
        tokio::pin!(conn);
        let idle_timeout = self.config.idle_timeout;
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = self.drain.started().cancelled() => {
                debug!("draining: GOAWAY sent, waiting for the streams in flight");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            error = distrusted => {
                // Not a GOAWAY: nothing more may pass on a connection whose
                // peer is no longer trusted, its open streams included.
                self.stats.untrusted_closed.fetch_add(1, Ordering::Relaxed);
                warn!(peer_id = %peer_id, %error, "the trust bundle no longer accepts this tunnel peer: connection closed");
                return;
            }
            () = streams_expired(&streams, idle_timeout) => {
                self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                debug!(timeout = ?idle_timeout, "idle tunnel connection: GOAWAY sent");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "tunnel connection ended with an error");
        }
    }

    /// `open` counts the stream on its connection until the stream ends
    /// (its splice, when admitted) for the connection's idle timeout.
    async fn stream(
        &self,
        req: Request<Incoming>,
        peer: Arc<CertInfo>,
        open: OpenStream,
    ) -> Response<Empty<Bytes>> {
        let target = match connect_target(req.method(), req.uri()) {
            Ok(t) => t,
            Err((status, why)) => return reply(status, ERROR_REASON, why),
        };
        // A debug span, as the outbound connection's: enabled, it would
        // cost every open stream a few hundred bytes and work on every
        // poll; the warnings below name the peer and the target themselves.
        let span = debug_span!("tunnel_stream", peer_id = %peer.id, %target);
        self.admit(req, peer, target, open).instrument(span).await
    }

    /// Checks the source header and authorization, connects to the target
    /// and, once the 200 is sent, splices the upgraded stream to it.
    async fn admit(
        &self,
        mut req: Request<Incoming>,
        peer: Arc<CertInfo>,
        target: SocketAddr,
        open: OpenStream,
    ) -> Response<Empty<Bytes>> {
        if let Some(claimed) = req.headers().get(SOURCE_WORKLOAD)
            && claimed.as_bytes() != peer.id_text.as_bytes()
        {
            self.stats.streams_denied.fetch_add(1, Ordering::Relaxed);
            warn!(peer_id = %peer.id, %target, claimed = ?claimed, "{SOURCE_MISMATCH}");
            return reply(StatusCode::FORBIDDEN, DENY_REASON, SOURCE_MISMATCH);
        }
        let info = ConnectInfo {
            peer: &peer,
            target,
            headers: req.headers(),
        };
        if let Err(deny) = self.authorizer.authorize(info).await {
            self.stats.streams_denied.fetch_add(1, Ordering::Relaxed);
            warn!(peer_id = %peer.id, %target, reason = %deny, "tunnel stream denied");
            return reply(StatusCode::FORBIDDEN, DENY_REASON, &deny.0);
        }
        let slot = match self.peers.admit(
            &peer.id_text,
            self.config.max_streams_per_peer,
            self.config.descriptors.as_ref(),
        ) {
            Ok(slot) => slot,
            Err(limit) => {
                self.stats.streams_limited.fetch_add(1, Ordering::Relaxed);
                // Debug only: a peer pressing on its bound must not flood
                // the log; the counter has every one.
                debug!(peer_id = %peer.id, %target, ?limit, per_peer = self.config.max_streams_per_peer, "tunnel stream refused: limit reached");
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ERROR_REASON,
                    limit.reason(),
                );
            }
        };
        let connect = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(target));
        let upstream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                warn!(peer_id = %peer.id, %target, error = %e, "tunnel target connect failed");
                let status = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                return reply(status, ERROR_REASON, &format!("connect to {target}: {e}"));
            }
            Err(_) => {
                self.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                let reason = format!("connect to {target} timed out");
                return reply(StatusCode::GATEWAY_TIMEOUT, ERROR_REASON, &reason);
            }
        };
        let _ = upstream.set_nodelay(true);
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        let upgrade = hyper::upgrade::on(&mut req);
        let handler = self.handler.clone();
        let headers = std::mem::take(req.headers_mut());
        let stop = self.drain.started().clone();
        self.drain.inbound().spawn(
            async move {
                let _open = open;
                let _slot = slot;
                match upgrade.await {
                    Ok(upgraded) => {
                        let stream = Admitted {
                            peer,
                            target,
                            headers,
                            stop,
                            tunnel: TokioIo::new(upgraded),
                            upstream,
                        };
                        handler.handle(stream).await
                    }
                    Err(e) => debug!(error = %e, "tunnel stream upgrade failed"),
                }
            }
            .in_current_span(),
        );
        Response::new(Empty::new())
    }
}

/// Copies both ways until both sides are done (half-closes propagate).
/// With the proxy's copy loop, whose buffers exist only while bytes move:
/// an idle tunnelled connection holds none (fixed 64 KiB buffers each way
/// made every open stream cost 128 KiB).
pub async fn splice<T>(tunnel: T, upstream: TcpStream)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = splice_counted(tunnel, upstream).await;
}

/// [`splice`], returning the bytes moved to the target and back, or the
/// error that ended it (for the tap's `tcp` event).
pub async fn splice_counted<T>(tunnel: T, mut upstream: TcpStream) -> std::io::Result<(u64, u64)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The copy loop's "client" is the socket it can wait on without a
    // buffer: here the target's.
    let counters = copy::Counters {
        client_to_upstream: Default::default(),
        upstream_to_client: Default::default(),
        activity: None,
    };
    let mut t = copy::Transferred::default();
    let copied = copy::bidirectional_io(&mut upstream, tunnel, &counters, &mut t).await;
    let (to_target, from_target) = (t.upstream_to_client, t.client_to_upstream);
    match copied {
        Ok(()) => {
            debug!(
                bytes_to_target = to_target,
                bytes_from_target = from_target,
                "tunnel stream closed"
            );
            Ok((to_target, from_target))
        }
        Err(e) => {
            debug!(
                error = %e,
                bytes_to_target = to_target,
                bytes_from_target = from_target,
                "tunnel stream ended with an error"
            );
            Err(e.error)
        }
    }
}

/// The target of a tunnel stream: only `CONNECT ip:port` is served (a host
/// name would make this agent resolve names for its peer; a path or query
/// has no meaning here).
pub(crate) fn connect_target(
    method: &Method,
    uri: &http::Uri,
) -> Result<SocketAddr, (StatusCode, &'static str)> {
    if method != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT is served here",
        ));
    }
    uri.authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or((StatusCode::BAD_REQUEST, "CONNECT authority must be ip:port"))
}

fn reply(status: StatusCode, header: http::HeaderName, reason: &str) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    let value = HeaderValue::from_str(reason)
        .unwrap_or_else(|_| HeaderValue::from_static("invalid reason text"));
    resp.headers_mut().insert(header, value);
    resp
}
