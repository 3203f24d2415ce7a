//! Upstream connections, kept per endpoint and reused across requests and
//! across the pods' downstream connections.
//!
//! HTTP/2 endpoints get one multiplexed connection (re-established when it
//! closes), driven by hyper; HTTP/1.1 endpoints get a set of connections,
//! one request at a time each, with up to [`MAX_IDLE_H1`] kept between
//! requests, spoken to by the proxy's own client ([`crate::http::h1::client`]):
//! a connection is out of the set while a request uses it and goes back
//! when its response has ended (with the response head, when the body came
//! with it), so a busy connection is never handed out.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use crate::fast_map::FastMap;
use crate::http::body::{ProxyBody, incoming};
use crate::http::h1::client::{self, ClientConn, ClientError};
use crate::transport::coalesce::Coalesce;
use crate::transport::netns::PodNetns;
use crate::transport::tunnel::ConnectHeaders;
use crate::transport::upstream::{Path, UpstreamError, UpstreamIo, Upstreams};

/// Idle HTTP/1.1 connections kept per endpoint.
pub const MAX_IDLE_H1: usize = 64;

/// Which protocol to speak to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// Why no upstream connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// What failed a request on its connection.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    #[error(transparent)]
    H1(ClientError),
    #[error(transparent)]
    H2(hyper::Error),
}

impl SendFailure {
    /// The connection ended before the response did.
    pub fn is_incomplete_message(&self) -> bool {
        match self {
            SendFailure::H1(e) => e.is_incomplete_message(),
            SendFailure::H2(e) => e.is_incomplete_message(),
        }
    }
}

/// A request that failed on its connection.
#[derive(Debug)]
pub struct SendError {
    pub error: SendFailure,
    /// The request itself when the connection failed before any of it was
    /// written: the endpoint cannot have seen it, so it may be sent again on
    /// another connection whatever its method.
    pub unsent: Option<Request<ProxyBody>>,
    /// A bodiless request the endpoint closed the connection under before
    /// answering (see [`client::Failed::resendable`]).
    pub resendable: Option<Request<ProxyBody>>,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// A checked-out upstream connection, with its local address (the kernel
/// diagnostics look its flow up by it).
pub enum Conn {
    /// With the set it goes back to.
    H1(ClientConn<UpstreamIo>, Option<SocketAddr>, Arc<H1Idle>),
    H2(http2::SendRequest<ProxyBody>, Option<SocketAddr>),
}

impl Conn {
    /// The local address of the upstream socket.
    pub fn local(&self) -> Option<SocketAddr> {
        match self {
            Conn::H1(_, local, _) | Conn::H2(_, local) => *local,
        }
    }
}

/// The idle HTTP/1.1 connections to one key: shared with the responses in
/// flight, whose connections come back here when they end (no lookup of
/// the key, which for a tunnel path holds two SPIFFE IDs).
#[derive(Default)]
pub struct H1Idle(Mutex<Vec<(ClientConn<UpstreamIo>, Option<SocketAddr>)>>);

impl H1Idle {
    fn put(&self, conn: ClientConn<UpstreamIo>, local: Option<SocketAddr>) {
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_H1 {
            idle.push((conn, local));
        }
    }

    fn take(&self) -> Option<(ClientConn<UpstreamIo>, Option<SocketAddr>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[derive(Default)]
struct Idle {
    h1: Arc<H1Idle>,
    h2: Option<(http2::SendRequest<ProxyBody>, Option<SocketAddr>)>,
}

/// Connections are shared only by requests that take the same path to the
/// same endpoint: a tunnelled connection carries its source workload's
/// certificate, so two workloads never share one; a connection made in a
/// pod's network namespace (direct, or the tunnel connection under it)
/// carries that pod's address, so two pods never share one either.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub addr: SocketAddr,
    pub path: Path,
    /// The source pod's namespace, where the connection is made.
    source: Option<PodNetns>,
}

impl Key {
    pub fn new(addr: SocketAddr, path: Path, source: Option<&PodNetns>) -> Self {
        Self {
            addr,
            path,
            source: source.cloned(),
        }
    }
}

pub struct Pool {
    idle: Mutex<FastMap<Key, Idle>>,
    upstreams: Arc<Upstreams>,
}

impl Pool {
    pub fn new(upstreams: Arc<Upstreams>) -> Arc<Self> {
        Arc::new(Pool {
            idle: Mutex::new(FastMap::default()),
            upstreams,
        })
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// A connection to `key`: an idle one if there is one, else a new one.
    /// `headers` go with the tunnel `CONNECT` when a new one is opened.
    /// With the connection comes how long making it took, when it had to
    /// be made (TCP connect; through the tunnel, the `CONNECT` exchange and
    /// a TLS handshake if no tunnel connection was open; the HTTP
    /// handshake): the balancer keeps that apart from response latency,
    /// which it would otherwise make look like a slow endpoint.
    pub async fn checkout(
        &self,
        key: &Key,
        version: Version,
        headers: impl FnOnce() -> ConnectHeaders,
    ) -> Result<(Conn, Option<Duration>), ConnectError> {
        if let Some(conn) = self.take_idle(key, version) {
            return Ok((conn, None));
        }
        // Boxed: making a connection (a tunnel's TLS handshake among
        // others) is a large future, and every request's future would
        // otherwise be sized for it (moved and allocated per request).
        let (conn, took) = Box::pin(self.connect_new(key, version, headers())).await?;
        Ok((conn, Some(took)))
    }

    fn take_idle(&self, key: &Key, version: Version) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let entry = idle.get_mut(key)?;
        match version {
            // A connection the endpoint closed while idle is found by the
            // client before it writes (the request then goes on a new one).
            Version::Http1 => {
                let set = entry.h1.clone();
                drop(idle);
                let (conn, local) = set.take()?;
                Some(Conn::H1(conn, local, set))
            }
            Version::Http2 => {
                let (tx, local) = entry.h2.as_ref()?;
                if tx.is_closed() {
                    entry.h2 = None;
                    return None;
                }
                Some(Conn::H2(tx.clone(), *local))
            }
        }
    }

    /// The idle set of `key`'s HTTP/1.1 connections (made on first use).
    fn h1_set(&self, key: &Key) -> Arc<H1Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        match idle.get(key) {
            Some(entry) => entry.h1.clone(),
            None => idle.entry(key.clone()).or_default().h1.clone(),
        }
    }

    /// A new connection, never an idle one: for a request the pooled
    /// connection it was given closed under (see [`SendError::unsent`]).
    pub async fn connect_new(
        &self,
        key: &Key,
        version: Version,
        headers: ConnectHeaders,
    ) -> Result<(Conn, Duration), ConnectError> {
        let start = Instant::now();
        let conn = self.connect(key, version, headers).await?;
        Ok((conn, start.elapsed()))
    }

    async fn connect(
        &self,
        key: &Key,
        version: Version,
        headers: ConnectHeaders,
    ) -> Result<Conn, ConnectError> {
        let addr = key.addr;
        let stream = self
            .upstreams
            .connect(&key.path, addr, headers, key.source.as_ref())
            .await?;
        // The kernel's per-flow counters are keyed by the TCP connection;
        // a tunnel stream shares its connection with others (and goes to
        // the peer agent), so it has none of its own.
        let local = match &stream {
            UpstreamIo::Tcp(s) => s.local_addr().ok(),
            UpstreamIo::Tunnel(_) => None,
        };
        match version {
            Version::Http1 => Ok(Conn::H1(ClientConn::new(stream), local, self.h1_set(key))),
            Version::Http2 => {
                // Many streams' frames leave in one write (see `Coalesce`).
                let io = TokioIo::new(Coalesce::new(stream));
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(|source| ConnectError::Handshake { addr, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%addr, error = %e, "upstream HTTP/2 connection ended with an error");
                    }
                });
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let entry = idle.entry(key.clone()).or_default();
                // Another request may have connected meanwhile; keep one.
                match &entry.h2 {
                    Some((existing, existing_local)) if !existing.is_closed() => {
                        Ok(Conn::H2(existing.clone(), *existing_local))
                    }
                    _ => {
                        entry.h2 = Some((tx.clone(), local));
                        Ok(Conn::H2(tx, local))
                    }
                }
            }
        }
    }

    /// Sends a request and returns the connection to the pool once the
    /// response head has arrived.
    ///
    /// A plain function returning an `async move` block, not an `async fn`
    /// (which keeps its arguments twice in its state): this state is part of
    /// every request's future, which is moved into its box per request.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn send<'a>(
        &'a self,
        key: &'a Key,
        conn: Conn,
        req: Request<ProxyBody>,
    ) -> impl std::future::Future<Output = Result<Response<ProxyBody>, SendError>> + Send + 'a {
        async move {
            // A connection that closes while the request waits for it, or
            // before hyper writes it, hands the request back.
            fn failed(mut e: hyper::client::conn::TrySendError<Request<ProxyBody>>) -> SendError {
                SendError {
                    unsent: e.take_message(),
                    error: SendFailure::H2(e.into_error()),
                    resendable: None,
                }
            }
            let _ = key;
            match conn {
                Conn::H2(mut tx, _) => {
                    if let Err(error) = tx.ready().await {
                        return Err(SendError {
                            error: SendFailure::H2(error),
                            unsent: Some(req),
                            resendable: None,
                        });
                    }
                    let resp = tx.try_send_request(req).await.map_err(failed)?;
                    Ok(resp.map(incoming))
                }
                Conn::H1(conn, local, set) => {
                    // An upgraded connection belongs to the upgrade, and one the
                    // endpoint said it closes after this response is not
                    // handed back: the client only recycles a connection that
                    // can carry another request.
                    let recycle = move |conn| set.put(conn, local);
                    client::send(conn, req, recycle)
                        .await
                        .map_err(|f| SendError {
                            error: SendFailure::H1(f.error),
                            unsent: f.unsent,
                            resendable: f.resendable,
                        })
                }
            }
        }
    }

    /// Drops idle connections to endpoints no longer in `keep`.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| keep(&key.addr));
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use hyper::body::Incoming;

    use super::*;
    use crate::http::body::empty;
    use crate::transport::tls_label::NoTlsReason;

    /// An h2c server on loopback answering every request 200.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("ok"))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_checkout_says_how_long_a_new_connection_took_and_a_reused_one_nothing() {
        let addr = server().await;
        let pool = Pool::new(Arc::new(Upstreams::direct("node0", Duration::from_secs(2))));
        let key = Key::new(addr, Path::Direct(NoTlsReason::Disabled), None);
        let (conn, took) = pool
            .checkout(&key, Version::Http2, ConnectHeaders::default)
            .await
            .unwrap();
        assert!(took.is_some_and(|t| t > Duration::ZERO), "{took:?}");
        let req = Request::builder()
            .uri(format!("http://{addr}/"))
            .body(empty())
            .unwrap();
        let resp = pool.send(&key, conn, req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let (_, took) = pool
            .checkout(&key, Version::Http2, ConnectHeaders::default)
            .await
            .unwrap();
        assert_eq!(took, None, "the pooled connection was reused");
    }

    /// An HTTP/1.1 server on loopback: `/last` answers with
    /// `Connection: close`, anything else keeps the connection.
    async fn h1_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let mut resp = Response::new(Full::new(bytes::Bytes::from("ok")));
                        if req.uri().path() == "/last" {
                            resp.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_h1_connection_the_endpoint_closes_is_not_pooled() {
        let addr = h1_server().await;
        let pool = Pool::new(Arc::new(Upstreams::direct("node0", Duration::from_secs(2))));
        let key = Key::new(addr, Path::Direct(NoTlsReason::Disabled), None);
        let get = |path: &str| {
            Request::builder()
                .uri(format!("http://{addr}{path}"))
                .body(empty())
                .unwrap()
        };
        let (conn, _) = pool
            .checkout(&key, Version::Http1, ConnectHeaders::default)
            .await
            .unwrap();
        let resp = pool.send(&key, conn, get("/")).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        let (conn, took) = pool
            .checkout(&key, Version::Http1, ConnectHeaders::default)
            .await
            .unwrap();
        assert_eq!(took, None, "a keep-alive connection is reused");
        let resp = pool.send(&key, conn, get("/last")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let pooled = |pool: &Pool| {
            pool.idle
                .lock()
                .unwrap()
                .get(&key)
                .map_or(0, |e| e.h1.len())
        };
        assert_eq!(
            pooled(&pool),
            0,
            "a connection answered with Connection: close went back to the pool"
        );
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        let (_, took) = pool
            .checkout(&key, Version::Http1, ConnectHeaders::default)
            .await
            .unwrap();
        assert!(
            took.is_some(),
            "a connection answered with Connection: close was handed out again"
        );
    }

    #[tokio::test]
    async fn a_request_on_a_connection_closed_before_it_was_written_comes_back() {
        // A server that accepts and closes at once, as a peer closing an
        // idle keep-alive connection does.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let pool = Pool::new(Arc::new(Upstreams::direct("node0", Duration::from_secs(2))));
        let key = Key::new(addr, Path::Direct(NoTlsReason::Disabled), None);
        let (conn, _) = pool
            .checkout(&key, Version::Http1, ConnectHeaders::default)
            .await
            .unwrap();
        // Let hyper's connection task see the close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let req = Request::builder()
            .uri(format!("http://{addr}/again"))
            .body(empty())
            .unwrap();
        let err = pool.send(&key, conn, req).await.unwrap_err();
        let unsent = err.unsent.expect("the unwritten request is handed back");
        assert_eq!(unsent.uri().path(), "/again");
    }
}
