//! Serving a pod's HTTP connection (after detection said HTTP/1 or h2).
//!
//! HTTP/1.1 is served by the proxy's own codec ([`crate::http::h1`]: no
//! buffer held by an idle keep-alive connection), HTTP/2 by hyper. Either
//! enforces the protocol: malformed request lines, bad header names,
//! oversized heads, h2 flow-control and stream limits all end in a
//! protocol error for that connection, never in the proxy. Limits are set
//! explicitly here, with the reason for each value.

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::http::body::{ProxyBody, incoming};
use crate::http::drain::{self, Activity as Requests};
use crate::http::h1;
use crate::http::pool::Version;
use crate::proxy::outbound::forward::{ConnCtx, HttpProxy};
use crate::telemetry::metrics::RefusedLabels;
use crate::transport::h2_refused::{self, RefusedStreams};
use crate::transport::idle::{Activity, IdleIo, expired};
use crate::transport::linger::h2_io;

/// Largest HTTP/1 request head accepted: generous for real clients (64 KiB
/// cookies exist), small enough that a header flood cannot grow memory.
pub(crate) const MAX_H1_HEAD: usize = 96 * 1024;
/// HTTP/2 header list limit (decoded): a 64 KiB header block split over
/// CONTINUATION frames fits; a CONTINUATION flood does not.
pub(crate) const MAX_H2_HEADER_LIST: u32 = 128 * 1024;
/// Concurrent streams per HTTP/2 connection on the inbound side, where
/// the tunnel's own limit already bounds what a peer can open.
pub(crate) const MAX_H2_STREAMS: u32 = crate::config::limits::DEFAULT_H2_MAX_CONCURRENT_STREAMS;
/// How long a client may take to send its request head (slowloris).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How a served connection ended badly (for the debug log).
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    H1(h1::Error),
    #[error(transparent)]
    H2(hyper::Error),
}

/// Serves one downstream connection until it closes. Once `draining` is
/// cancelled, or the connection has been idle for `limits.idle_timeout`,
/// it winds down without failing a request (see [`crate::http::drain`]):
/// HTTP/1 marks its next response `Connection: close` and closes once idle,
/// HTTP/2 sends GOAWAY and lets the streams in flight end.
///
/// A plain function returning an `async move` block, not an `async fn`
/// (which keeps its arguments twice): every open connection holds this
/// state for its life.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    proxy: Arc<HttpProxy>,
    ctx: Arc<ConnCtx>,
    stream: TcpStream,
    draining: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        // The connection table's clock and byte counts, also the idle timeout's.
        let bytes: Arc<Activity> = ctx.live.activity().clone();
        let io = IdleIo::new(stream, bytes.clone());
        let version = ctx.version;
        let (idle_timeout, h2_streams) = (
            proxy.limits.idle_timeout,
            proxy.limits.h2_max_concurrent_streams,
        );
        // The connection's own reason to wind down: its idle timeout. It
        // names the pod from the connection's context when it fires, so an
        // idle connection holds no copy of the name.
        let (closed, idle_ctx) = (proxy.limit_closed.clone(), ctx.clone());
        let idle = move || async move {
            expired(&bytes, idle_timeout).await;
            let pod = idle_ctx.pod();
            closed
                .get_or_create(&RefusedLabels {
                    pod: pod.to_string(),
                    limit: "idle_timeout",
                })
                .inc();
            debug!(%pod, timeout = ?idle_timeout, "idle HTTP connection closing");
        };
        // Streams refused by h2_max_concurrent_streams (HTTP/2 only, so
        // that HTTP/1 pods get no series, and hold no counter, for them).
        let refused = (version == Version::Http2).then(|| {
            proxy
                .limit_refused
                .get_or_create(&RefusedLabels {
                    pod: ctx.pod().to_string(),
                    limit: h2_refused::LIMIT,
                })
                .clone()
        });
        // The agent's drain and the idle timeout, one per connection.
        let requests = Arc::new(Requests::new(draining));
        let svc_activity = requests.clone();
        // The request future is boxed: the connection's future is sized for
        // the largest state it may be in, and a request in flight is large
        // (13 KiB unboxed); boxed, an idle keep-alive connection holds no room
        // for it and the future exists only while a request is in flight.
        let handle = move |req: Request<ProxyBody>| {
            let proxy = proxy.clone();
            let ctx = ctx.clone();
            let in_flight = svc_activity.begin();
            ctx.live
                .request(version == Version::Http2 && crate::http::message::is_grpc(&req));
            // Its box is allocated before it is made (`in_box`).
            crate::in_box::in_box!(async move {
                let mut resp = proxy.handle(&ctx, req).await;
                drain::mark_last(ctx.version, in_flight.activity(), &mut resp);
                drop(in_flight);
                resp
            })
        };
        // Each protocol's connection is boxed on its own: the connection's
        // future would otherwise be sized for the larger of the two, and an
        // idle HTTP/1 connection would carry room for hyper's HTTP/2 state.
        let serve: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), ServeError>> + Send>,
        > = match version {
            Version::Http1 => Box::pin(async move {
                // The codec's graceful stop, which the drain asks for.
                let stop = h1::Stop::default();
                let config = h1::Config {
                    max_head: MAX_H1_HEAD,
                    header_read_timeout: HEADER_READ_TIMEOUT,
                };
                let conn = std::pin::pin!(h1::serve(io, config, &stop, handle));
                drain::until_drained(conn, version, &requests, idle, |_| stop.ask())
                    .await
                    .map_err(ServeError::H1)
            }),
            Version::Http2 => {
                let refused = refused.unwrap_or_default();
                Box::pin(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let resp = handle(req.map(incoming));
                        async move { Ok::<_, Infallible>(resp.await) }
                    });
                    let conn = std::pin::pin!(
                        http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .max_concurrent_streams(h2_streams)
                            .max_header_list_size(MAX_H2_HEADER_LIST)
                            // A download still on its way to the pod when
                            // the connection ends is not reset away (see
                            // `h2_io`).
                            .serve_connection(
                                TokioIo::new(h2_io(RefusedStreams::new(io, refused))),
                                svc,
                            )
                    );
                    drain::until_drained(conn, version, &requests, idle, |c| c.graceful_shutdown())
                        .await
                        .map_err(ServeError::H2)
                })
            }
        };
        let result = serve.await;
        if let Err(e) = result {
            debug!(error = %e, "HTTP connection ended with an error");
        }
    }
}
