//! The outbound side: pooled HTTP/2-over-mTLS connections to peer agents,
//! and `CONNECT` streams opened on them.
//!
//! A connection is keyed by (peer agent address, local identity, expected
//! peer identity): the local identity is the certificate presented, so two
//! source workloads never share a connection (the server authorizes per
//! connection's certificate). A connection is dropped from the pool when it
//! closes or when the local leaf it was established with has been rotated;
//! its open streams finish on it undisturbed, new streams get a fresh
//! handshake with the new leaf.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, info_span};

use crate::identity::tls::server_name;
use crate::identity::{
    CertStore, SpiffeId, TlsConfigError, TlsFailure, TrustBundle, client_config,
    with_client_key_log,
};
use crate::transport::linger::h2_io;
use crate::transport::netns::{self, PodNetns};
use crate::transport::tunnel::stream::{ActiveGuard, TunnelStream};
use crate::transport::tunnel::{DENY_REASON, ERROR_REASON};

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// A connection with this many open streams is full; the next stream
    /// opens another connection (up to `max_connections_per_key`).
    pub max_streams_per_connection: usize,
    pub max_connections_per_key: usize,
    pub stream_window: u32,
    pub connection_window: u32,
    /// HTTP/2 PING interval: finds a dead peer agent before a stream does.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Where session secrets go (a capture's key log); `None`: nowhere.
    pub key_log: Option<Arc<dyn rustls::KeyLog>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_streams_per_connection: 1000,
            max_connections_per_key: 4,
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            key_log: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("no certificate for local identity {0}")]
    NoCertificate(SpiffeId),
    #[error(transparent)]
    Config(#[from] TlsConfigError),
    #[error("connecting to peer agent {peer}: {source}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with peer agent {peer} failed ({failure}): {detail}")]
    Tls {
        peer: SocketAddr,
        failure: TlsFailure,
        detail: String,
    },
    #[error("{what} with peer agent {peer} timed out")]
    Timeout {
        peer: SocketAddr,
        what: &'static str,
    },
    #[error("HTTP/2 with peer agent {peer} failed: {source}")]
    Http2 {
        peer: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("peer agent {peer} denied the stream to {target}: {reason}")]
    Denied {
        peer: SocketAddr,
        target: SocketAddr,
        reason: String,
    },
    #[error("peer agent {peer} answered {status} for {target}: {reason}")]
    Refused {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
        reason: String,
    },
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl TunnelError {
    /// The TLS failure, if this error is one (for the `tls` metric label).
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            Self::Tls { failure, .. } => Some(*failure),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    peer: SocketAddr,
    local: SpiffeId,
    expected: SpiffeId,
    /// The source pod's network namespace the connection is made in (see
    /// `transport::netns`): a pod's tunnel leaves with the pod's address,
    /// so pods never share one; `None`: the node's.
    source: Option<PodNetns>,
}

/// How a pooled connection ended.
#[derive(Debug, Clone)]
struct Ended {
    message: String,
}

#[derive(Clone)]
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    /// Serial of the local leaf presented in this connection's handshake.
    serial: String,
    active: Arc<AtomicUsize>,
    /// The peer agent sent GOAWAY: no new streams go here.
    going_away: Arc<AtomicBool>,
    ended: watch::Receiver<Option<Ended>>,
    /// The first TLS error seen on the socket; h2 flattens I/O errors to
    /// text, so the kind is caught below it.
    tls_failure: Arc<OnceLock<TlsFailure>>,
}

impl Conn {
    fn load(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

pub struct TunnelPool {
    store: Arc<CertStore>,
    bundle: std::sync::RwLock<TrustBundle>,
    config: PoolConfig,
    slots: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Vec<Conn>>>>>,
    tls_configs: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<rustls::ClientConfig>>>,
    connections_opened: AtomicU64,
}

impl TunnelPool {
    pub fn new(store: Arc<CertStore>, bundle: TrustBundle, config: PoolConfig) -> Self {
        Self {
            store,
            bundle: std::sync::RwLock::new(bundle),
            config,
            slots: Mutex::default(),
            tls_configs: Mutex::default(),
            connections_opened: AtomicU64::new(0),
        }
    }

    /// Verifies peer agents against `bundle` from now on. Connections
    /// already established stay (they were verified when they were made).
    pub fn set_bundle(&self, bundle: TrustBundle) {
        *self.bundle.write().unwrap_or_else(|e| e.into_inner()) = bundle;
        self.tls_configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// TLS connections this pool has established so far.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    /// Opens a `CONNECT` stream to `target` through the agent at `peer`,
    /// presenting `local`'s certificate and requiring the peer agent to be
    /// `expected_peer`.
    pub async fn open(
        &self,
        local: &SpiffeId,
        peer: SocketAddr,
        expected_peer: &SpiffeId,
        target: SocketAddr,
        headers: HeaderMap,
        from: Option<&PodNetns>,
    ) -> Result<TunnelStream, TunnelError> {
        let key = Key {
            peer,
            local: local.clone(),
            expected: expected_peer.clone(),
            source: from.cloned(),
        };
        // A peer agent that drains (a rollout) sends GOAWAY: a stream it
        // never processed is safe to open again, on a new connection, which
        // reaches the agent that took over. Once is enough: the new
        // connection is to a listener that is not draining.
        let mut attempts = 0;
        let (resp, guard) = loop {
            attempts += 1;
            let (mut conn, guard) = self.checkout(&key).await?;
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::new())?;
            req.headers_mut().extend(headers.clone());
            match conn.sender.send_request(req).await {
                Ok(r) => break (r, guard),
                Err(e) if attempts < 3 && unprocessed(&e) => {
                    conn.going_away.store(true, Ordering::Relaxed);
                    debug!(%peer, %target, error = %e, "the peer agent is going away; opening the stream on a new connection");
                }
                Err(e) => return Err(why_failed(peer, e, &mut conn).await),
            }
        };
        let status = resp.status();
        let reason = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        if status == StatusCode::FORBIDDEN {
            return Err(TunnelError::Denied {
                peer,
                target,
                reason: reason(DENY_REASON),
            });
        }
        if !status.is_success() {
            return Err(TunnelError::Refused {
                peer,
                target,
                status,
                reason: reason(ERROR_REASON),
            });
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|source| TunnelError::Http2 { peer, source })?;
        Ok(TunnelStream::new(upgraded, guard))
    }

    /// Picks a live connection with room, or establishes one. The stream is
    /// counted (guard) before the slot lock is released so concurrent opens
    /// see each other.
    async fn checkout(&self, key: &Key) -> Result<(Conn, ActiveGuard), TunnelError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let mut conns = slot.lock().await;
        let serial = self
            .store
            .current(&key.local)
            .ok_or_else(|| TunnelError::NoCertificate(key.local.clone()))?
            .leaf
            .serial
            .clone();
        // Closed connections and those made with a rotated leaf leave the
        // pool; the latter keep serving the streams they already carry.
        conns.retain(|c| {
            !c.sender.is_closed() && c.serial == serial && !c.going_away.load(Ordering::Relaxed)
        });
        let best = conns.iter().min_by_key(|c| c.load());
        let conn = match best {
            Some(c) if c.load() < self.config.max_streams_per_connection => c.clone(),
            Some(c) if conns.len() >= self.config.max_connections_per_key => c.clone(),
            _ => {
                let c = self.connect(key, serial).await?;
                conns.push(c.clone());
                c
            }
        };
        let guard = ActiveGuard::new(conn.active.clone());
        Ok((conn, guard))
    }

    async fn connect(&self, key: &Key, serial: String) -> Result<Conn, TunnelError> {
        let peer = key.peer;
        let tcp = tokio::time::timeout(
            self.config.connect_timeout,
            netns::connect(key.source.as_ref(), peer),
        )
        .await
        .map_err(|_| TunnelError::Timeout {
            peer,
            what: "TCP connect",
        })?
        .map_err(|source| TunnelError::Connect { peer, source })?;
        let _ = tcp.set_nodelay(true);
        let tls_config = self.tls_config(&key.local, &key.expected)?;
        let tls = tokio::time::timeout(
            self.config.handshake_timeout,
            TlsConnector::from(tls_config).connect(server_name(peer.ip()), tcp),
        )
        .await
        .map_err(|_| TunnelError::Timeout {
            peer,
            what: "TLS handshake",
        })?
        .map_err(|e| TunnelError::Tls {
            peer,
            failure: TlsFailure::find(&e).unwrap_or(TlsFailure::Protocol),
            detail: e.to_string(),
        })?;
        let (tls, first) = self.server_verdict(peer, tls).await?;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_send_buf_size(1 << 20)
            .keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout);
        let tls_failure = Arc::new(OnceLock::new());
        let io = Observed {
            inner: tls,
            first,
            failure: tls_failure.clone(),
        };
        let (sender, connection) = builder
            // An upload still on its way when the connection ends is not
            // reset away (see `h2_io`).
            .handshake(TokioIo::new(h2_io(io)))
            .await
            .map_err(|source| TunnelError::Http2 { peer, source })?;
        let (tx, ended) = watch::channel(None);
        let span = info_span!("tunnel_out", %peer, local = %key.local, serial = %serial);
        tokio::spawn(
            async move {
                let end = match connection.await {
                    Ok(()) => Ended {
                        message: "connection closed".into(),
                    },
                    Err(e) => {
                        debug!(error = %e, "tunnel connection failed");
                        Ended {
                            message: e.to_string(),
                        }
                    }
                };
                let _ = tx.send(Some(end));
            }
            .instrument(span),
        );
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Conn {
            sender,
            serial,
            active: Arc::default(),
            going_away: Arc::default(),
            ended,
            tls_failure,
        })
    }

    /// In TLS 1.3 the client's handshake is done before the server has
    /// checked the client certificate; its verdict is an alert, or its
    /// HTTP/2 SETTINGS (the server speaks first). Reading up to that first
    /// record here turns a refusal into a typed error for this connect. Its
    /// alert would otherwise race our first writes: a write that meets the
    /// server's close fails with a reset, and the alert is never read.
    pub(super) async fn server_verdict<T: AsyncRead + Unpin>(
        &self,
        peer: SocketAddr,
        mut tls: T,
    ) -> Result<(T, Bytes), TunnelError> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::with_capacity(16 * 1024);
        let read = tokio::time::timeout(self.config.handshake_timeout, tls.read_buf(&mut buf))
            .await
            .map_err(|_| TunnelError::Timeout {
                peer,
                what: "the peer agent's first HTTP/2 frame",
            })?;
        match read {
            Ok(0) => Err(TunnelError::Tls {
                peer,
                failure: TlsFailure::Protocol,
                detail: "the peer agent closed the connection after the handshake".into(),
            }),
            Ok(_) => Ok((tls, Bytes::from(buf))),
            Err(e) => Err(TunnelError::Tls {
                peer,
                failure: TlsFailure::find(&e).unwrap_or(TlsFailure::Protocol),
                detail: e.to_string(),
            }),
        }
    }

    pub(super) fn tls_config(
        &self,
        local: &SpiffeId,
        expected: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, TunnelError> {
        let mut cache = self.tls_configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&(local.clone(), expected.clone())) {
            return Ok(c.clone());
        }
        let bundle = self
            .bundle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let c = with_client_key_log(
            client_config(
                self.store.clone(),
                local.clone(),
                &bundle,
                Some(expected.clone()),
            )?,
            self.config.key_log.as_ref(),
        );
        cache.insert((local.clone(), expected.clone()), c.clone());
        Ok(c)
    }
}

/// A request failed: if its connection died of a TLS failure (the server's
/// alert arrives after the client's side of a TLS 1.3 handshake is done),
/// report that, so "unknown CA" or "expired" reaches the caller.
/// Whether the stream never reached the peer or the peer refused it
/// without processing it: hyper cancelled it because its connection was
/// closing before the request was sent, a GOAWAY did not cover it (RFC
/// 9113 §6.8: such a stream may be retried), or `REFUSED_STREAM` (§8.7).
fn unprocessed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

async fn why_failed(peer: SocketAddr, e: hyper::Error, conn: &mut Conn) -> TunnelError {
    if let Some(failure) = TlsFailure::find(&e) {
        return TunnelError::Tls {
            peer,
            failure,
            detail: e.to_string(),
        };
    }
    let waited =
        tokio::time::timeout(Duration::from_secs(2), conn.ended.wait_for(Option::is_some)).await;
    if let (Ok(Ok(end)), Some(failure)) = (waited, conn.tls_failure.get()) {
        let detail = end.as_ref().map(|e| e.message.clone()).unwrap_or_default();
        return TunnelError::Tls {
            peer,
            failure: *failure,
            detail,
        };
    }
    TunnelError::Http2 { peer, source: e }
}

/// The TLS stream under h2, recording the first TLS failure it carries.
struct Observed<T> {
    inner: T,
    /// What was read before h2 took over (see `server_verdict`).
    first: Bytes,
    failure: Arc<OnceLock<TlsFailure>>,
}

impl<T> Observed<T> {
    fn note<R>(&self, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if let Poll::Ready(Err(e)) = &r
            && let Some(f) = TlsFailure::find(e)
        {
            let _ = self.failure.set(f);
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Observed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Observed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }
}
