//! Serving a pod's HTTP connection (after detection said HTTP/1 or h2).
//!
//! hyper parses and enforces the protocol: malformed request lines, bad
//! header names, oversized heads, h2 flow-control and stream limits all
//! end in a protocol error for that connection, never in the proxy. Limits
//! are set explicitly here, with the reason for each value.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::http::drain::{self, Activity};
use crate::proxy::outbound::forward::{ConnCtx, HttpProxy};
use crate::transport::http_pool::Version;

/// Largest HTTP/1 request head accepted: generous for real clients (64 KiB
/// cookies exist), small enough that a header flood cannot grow memory.
pub(crate) const MAX_H1_HEAD: usize = 96 * 1024;
/// HTTP/2 header list limit (decoded): a 64 KiB header block split over
/// CONTINUATION frames fits; a CONTINUATION flood does not.
pub(crate) const MAX_H2_HEADER_LIST: u32 = 128 * 1024;
/// Concurrent streams per client connection (RFC 9113 recommends ≥ 100).
pub(crate) const MAX_H2_STREAMS: u32 = 256;
/// How long a client may take to send its request head (slowloris).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one downstream connection until it closes. Once `draining` is
/// cancelled the connection winds down without failing a request (see
/// [`crate::http::drain`]).
pub async fn serve(
    proxy: Arc<HttpProxy>,
    ctx: Arc<ConnCtx>,
    stream: TcpStream,
    draining: CancellationToken,
) {
    let io = TokioIo::new(stream);
    let version = ctx.version;
    let activity = Arc::new(Activity::default());
    let (svc_activity, svc_draining) = (activity.clone(), draining.clone());
    // The request future is boxed: hyper's HTTP/1 dispatcher keeps a slot
    // for the service's future for the whole life of the connection, sized
    // like the future (13 KiB unboxed); boxed, an idle keep-alive
    // connection holds a pointer and the future exists only while a request
    // is in flight.
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let ctx = ctx.clone();
        let in_flight = svc_activity.begin();
        let draining = svc_draining.clone();
        Box::pin(async move {
            let mut resp = proxy.handle(&ctx, req).await;
            drain::mark_last(ctx.version, &draining, &mut resp);
            drop(in_flight);
            Ok::<_, std::convert::Infallible>(resp)
        })
    });
    let result = match version {
        Version::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_H1_HEAD)
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            drain::until_drained(conn, version, &activity, &draining, |c| {
                c.graceful_shutdown()
            })
            .await
        }
        Version::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_H2_STREAMS)
                .max_header_list_size(MAX_H2_HEADER_LIST)
                .serve_connection(io, svc);
            drain::until_drained(conn, version, &activity, &draining, |c| {
                c.graceful_shutdown()
            })
            .await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}
