//! One HTTP request that arrived through a tunnel stream, on its way to the
//! local pod: no routing or balancing again (the outbound agent chose the
//! endpoint; the target is the `CONNECT` authority), hop-by-hop headers
//! handled as on the outbound side, counted with `direction="inbound"`, and
//! this hop's trace block or header added when asked for.
//!
//! Each tunnel stream has its own connection to the pod ([`PodConn`]),
//! made when the stream was admitted: the outbound agent's pool decides how
//! long connections live, and the pod sees one connection per stream as it
//! did when the bytes were spliced. If the pod closes it between requests,
//! the next request connects again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span};

use crate::http::body::{ProxyBody, empty, incoming};
use crate::http::errors::{self, ProxyError, StatusSource};
use crate::http::h1::client::{self, ClientConn, ClientError};
use crate::http::headers::{strip_hop_by_hop, wants_upgrade};
use crate::http::message::{authority, finish, is_grpc, origin_form, take_upstream_request};
use crate::http::pool::Version;
use crate::identity::CertInfo;
use crate::proxy::inbound::http_stream::InboundHttp;
use crate::proxy::inbound::trace::{InboundContext, KernelLine};
use crate::telemetry::http_metrics::observe;
use crate::telemetry::metrics::TlsLabel;
use crate::telemetry::trace;
use crate::transport::coalesce::Coalesce;

/// What every request of one tunnel stream shares.
pub struct StreamCtx {
    pub peer: Arc<CertInfo>,
    pub target: SocketAddr,
    pub pod: Option<String>,
    /// The first service the target is an endpoint of (the metrics label).
    pub service: Option<String>,
    pub services: Vec<String>,
    /// The calling pod's address (`forwarded: for=`).
    pub client: Option<String>,
    pub version: Version,
    /// The authorization generation the stream was last allowed under;
    /// requests after a reload are decided again.
    pub authz_generation: std::sync::atomic::AtomicU64,
}

enum Sender {
    /// The proxy's own HTTP/1.1 client ([`crate::http::h1::client`]),
    /// which finds a connection the pod closed before writing on it.
    H1(ClientConn<TcpStream>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(_) => false,
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// Why the pod could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("connect to {target}: {source}")]
    Connect {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {target} timed out after {after:?}")]
    ConnectTimeout { target: SocketAddr, after: Duration },
    #[error("HTTP with {target} failed: {source}")]
    Http {
        target: SocketAddr,
        source: hyper::Error,
    },
    #[error("HTTP with {target} failed: {source}")]
    H1 {
        target: SocketAddr,
        source: ClientError,
    },
}

impl PodError {
    fn proxy_error(&self) -> ProxyError {
        match self {
            PodError::Connect { .. } => ProxyError::ConnectFailed,
            PodError::ConnectTimeout { .. } => ProxyError::Timeout,
            PodError::Http { .. } | PodError::H1 { .. } => ProxyError::UpstreamReset,
        }
    }
}

/// The stream's connection to the pod.
pub struct PodConn {
    target: SocketAddr,
    version: Version,
    connect_timeout: Duration,
    /// The connection made when the stream was admitted, until first used.
    first: Mutex<Option<TcpStream>>,
    /// Idle HTTP/1 connection, or the shared HTTP/2 sender (shared with
    /// the response in flight, whose connection comes back here).
    sender: Arc<Mutex<Option<Sender>>>,
    /// The agent's end of the current connection (for the kernel's view).
    local: Mutex<Option<SocketAddr>>,
}

impl PodConn {
    pub fn new(
        target: SocketAddr,
        version: Version,
        first: TcpStream,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            target,
            version,
            connect_timeout,
            local: Mutex::new(first.local_addr().ok()),
            first: Mutex::new(Some(first)),
            sender: Arc::new(Mutex::new(None)),
        }
    }

    pub(super) fn local_addr(&self) -> Option<SocketAddr> {
        *self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready sender: the idle one, else a new HTTP handshake (on the
    /// admitted connection first, then on new ones).
    async fn checkout(&self) -> Result<Sender, PodError> {
        let idle = {
            let mut slot = self.sender.lock().unwrap_or_else(|e| e.into_inner());
            match slot.take() {
                Some(s) if s.is_closed() => None,
                Some(Sender::H2(s)) => {
                    *slot = Some(Sender::H2(s.clone()));
                    Some(Sender::H2(s))
                }
                other => other,
            }
        };
        if let Some(s) = idle {
            return Ok(s);
        }
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stream = match first {
            Some(s) => s,
            None => self.connect().await?,
        };
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = stream.local_addr().ok();
        let target = self.target;
        let http = |source| PodError::Http { target, source };
        match self.version {
            Version::Http1 => Ok(Sender::H1(ClientConn::new(stream))),
            Version::Http2 => {
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(Coalesce::new(stream)))
                    .await
                    .map_err(http)?;
                tokio::spawn(
                    async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "pod HTTP/2 connection ended with an error");
                        }
                    }
                    .in_current_span(),
                );
                *self.sender.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Sender::H2(tx.clone()));
                Ok(Sender::H2(tx))
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, PodError> {
        let target = self.target;
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(source)) => Err(PodError::Connect { target, source }),
            Err(_) => Err(PodError::ConnectTimeout {
                target,
                after: self.connect_timeout,
            }),
        }
    }

    /// Sends one request; an HTTP/1 connection goes back for the next
    /// request once its response has ended, unless it was upgraded or the
    /// pod said it closes it. A connection the pod closed while idle is
    /// found before the request is written: it goes on a new one.
    async fn send(&self, mut req: Request<ProxyBody>) -> Result<Response<ProxyBody>, PodError> {
        let target = self.target;
        let http = |source| PodError::Http { target, source };
        let mut again = true;
        loop {
            match self.checkout().await? {
                Sender::H2(mut tx) => {
                    tx.ready().await.map_err(http)?;
                    let resp = tx.send_request(req).await.map_err(http)?;
                    return Ok(resp.map(incoming));
                }
                Sender::H1(conn) => {
                    let slot = self.sender.clone();
                    let recycle = move |conn: client::ClientConn<TcpStream>| {
                        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                        if slot.is_none() {
                            *slot = Some(Sender::H1(conn));
                        }
                    };
                    match client::send(conn, req, recycle).await {
                        Ok(resp) => return Ok(resp),
                        Err(client::Failed {
                            unsent: Some(r), ..
                        }) if again => {
                            again = false;
                            req = r;
                        }
                        // The pod closed the idle connection as a bodiless
                        // request went out (RFC 9112 §9.3.1).
                        Err(client::Failed {
                            resendable: Some(r),
                            ..
                        }) if again && crate::retry::is_idempotent(r.method()) => {
                            again = false;
                            req = r;
                        }
                        Err(f) => {
                            return Err(PodError::H1 {
                                target,
                                source: f.error,
                            });
                        }
                    }
                }
            }
        }
    }
}

impl InboundHttp {
    /// Handles one request from the tunnel. Never fails: problems become
    /// this agent's own error responses.
    pub(super) async fn request(
        &self,
        ctx: &StreamCtx,
        conn: &PodConn,
        mut req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let pod = ctx.pod.as_deref().unwrap_or("unknown");
        let service = ctx.service.as_deref().unwrap_or("unknown");
        let counted =
            self.metrics
                .inbound_request(pod, authority(&req), service, &ctx.peer.id_text);
        let span = debug_span!(
            "inbound_request",
            pod,
            target = %ctx.target,
            peer_id = %ctx.peer.id,
            method = %req.method(),
            path = req.uri().path(),
            status = tracing::field::Empty,
        );
        let mode = trace::mode(req.method(), req.headers());
        let tapped = self.tap_request(ctx, &mut req);
        let denied = self.still_allowed(ctx).err();
        // Recorded on a clone, not the current span (see the outbound side);
        // pinned where it is made, so instrumenting it moves a pointer.
        let recorded = span.clone();
        let request = std::pin::pin!(async {
            let (resp, result) = if let Some(d) = denied {
                (
                    self.authz.denied_response(&d, grpc),
                    format!("denied ({})", d.reason),
                )
            } else if mode == Some(trace::Mode::Body) && !trace::forwardable(&mut req) {
                // Max-Forwards reached 0 here: this hop answers.
                (
                    trace::reflect(&req),
                    "reflected (Max-Forwards: 0)".to_string(),
                )
            } else {
                let (resp, detail) =
                    if ctx.version == Version::Http1 && wants_upgrade(req.headers()) {
                        self.upgrade(conn, req, service).await
                    } else {
                        self.forward(ctx, conn, req, service, grpc).await
                    };
                // The result line is for a diagnostic trace only: not
                // formatted for every request.
                let result = if mode.is_some() {
                    let result =
                        trace::result_text(resp.status().as_u16(), StatusSource::of(&resp));
                    match detail {
                        Some(d) => format!("{result}: {d}"),
                        None => result,
                    }
                } else {
                    String::new()
                };
                (resp, result)
            };
            recorded.record("status", resp.status().as_u16());
            let mut resp = match mode {
                Some(mode) => {
                    let context = self.context(ctx, conn, start, result);
                    trace::add_context(resp, mode, &context, self.buffer_budget.account(pod)).await
                }
                None => resp,
            };
            resp.extensions_mut().insert(TlsLabel::True);
            let resp = self.tap_response(tapped, ctx, conn, resp);
            observe(self.metrics.clone(), counted, start, resp, grpc)
        });
        request.instrument(span).await
    }

    /// Whether the rules in force still allow the stream: decided again
    /// only when they changed since it was last allowed.
    fn still_allowed(&self, ctx: &StreamCtx) -> Result<(), crate::proxy::inbound::authz::Decision> {
        use std::sync::atomic::Ordering;
        let now = self.authz.generation();
        if ctx.authz_generation.load(Ordering::Relaxed) == now {
            return Ok(());
        }
        match self.authz.recheck(&ctx.peer.id, ctx.target) {
            Some(denied) => Err(denied),
            None => {
                ctx.authz_generation.store(now, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    async fn forward(
        &self,
        ctx: &StreamCtx,
        conn: &PodConn,
        req: Request<ProxyBody>,
        service: &str,
        grpc: bool,
    ) -> (Response<ProxyBody>, Option<String>) {
        let (mut parts, body) = req.into_parts();
        let upstream = take_upstream_request(&mut parts, body, ctx.version);
        match conn.send(upstream).await {
            Ok(resp) => (finish(resp), None),
            Err(e) => (self.error(&e, service, grpc), Some(e.to_string())),
        }
    }

    /// HTTP/1.1 `Upgrade` (WebSocket): forwarded with its upgrade headers;
    /// on `101` the tunnel stream and the pod connection are joined.
    async fn upgrade(
        &self,
        conn: &PodConn,
        mut req: Request<ProxyBody>,
        service: &str,
    ) -> (Response<ProxyBody>, Option<String>) {
        let downstream = crate::http::h1::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let mut upstream = Request::from_parts(parts.clone(), body);
        *upstream.uri_mut() = origin_form(&parts.uri);
        strip_hop_by_hop(upstream.headers_mut(), true);
        let mut resp = match conn.send(upstream).await {
            Ok(r) => r,
            Err(e) => return (self.error(&e, service, false), Some(e.to_string())),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return (finish(resp), None);
        }
        let pod_side = crate::http::h1::upgrade::on_response(&mut resp);
        tokio::spawn(
            async move {
                match tokio::try_join!(downstream, pod_side) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (d, u);
                        match tokio::io::copy_bidirectional(&mut d, &mut u).await {
                            Ok((up, down)) => {
                                debug!(
                                    bytes_to_pod = up,
                                    bytes_from_pod = down,
                                    "upgraded stream closed"
                                )
                            }
                            Err(e) => debug!(error = %e, "upgraded stream failed"),
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade did not complete"),
                }
            }
            .in_current_span(),
        );
        let (parts, _) = resp.into_parts();
        (Response::from_parts(parts, empty()), None)
    }

    fn error(&self, e: &PodError, service: &str, grpc: bool) -> Response<ProxyBody> {
        debug!(error = %e, "inbound request failed");
        errors::response(
            e.proxy_error(),
            &self.node,
            service,
            Some(&e.to_string()),
            grpc,
        )
    }

    /// This hop's trace context, from what the stream and the request did.
    fn context(
        &self,
        ctx: &StreamCtx,
        conn: &PodConn,
        start: Instant,
        result: String,
    ) -> InboundContext {
        let decision = self.authz.explain(&ctx.peer.id, ctx.target);
        let kernel = match (self.kernel.get(), conn.local_addr()) {
            (Some(k), Some(local)) => Some(KernelLine {
                local,
                pod: ctx.target,
                counters: k.flow_counters(local, ctx.target),
            }),
            _ => None,
        };
        InboundContext {
            node: self.node.clone(),
            duration: start.elapsed(),
            pod: ctx.pod.clone(),
            target: Some(ctx.target),
            services: ctx.services.clone(),
            client: ctx.client.clone(),
            peer_identity: Some(ctx.peer.id_text.clone()),
            decision: Some((if decision.allow { "allow" } else { "deny" }, decision.rule)),
            kernel,
            result: Some(result),
        }
    }
}
