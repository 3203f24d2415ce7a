//! The inbound side's calls into the live tap (`diagnostics::tap::inbound`):
//! when a request arrives on a tunnel stream, when the pod's response head
//! is ready, and when an opaque stream closes. Kept here so the handlers
//! stay one line per hook.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use tokio::net::TcpStream;

use crate::diagnostics::tap::{self, InboundArrival, InboundTcp, TapRequest};
use crate::http::body::ProxyBody;
use crate::identity::CertInfo;
use crate::proxy::inbound::http_stream::InboundHttp;
use crate::proxy::inbound::request::{PodConn, StreamCtx};
use crate::proxy::inbound::server::splice_counted;

/// The calling pod's address the sending agent put in the `CONNECT`'s
/// `forwarded: for="ip:port"` (RFC 7239), quotes taken off.
pub(super) fn forwarded_for(connect: &HeaderMap) -> Option<&str> {
    connect
        .get(http::header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("for="))
        .map(|v| v.trim_matches('"'))
}

impl InboundHttp {
    /// The request's tap, when a tap is open and may want it (one relaxed
    /// load otherwise; nothing before the tap hub is set).
    pub(super) fn tap_request<B>(
        &self,
        ctx: &StreamCtx,
        req: &mut Request<B>,
    ) -> Option<Arc<TapRequest>> {
        let hub = self.tap.get()?;
        let arrival = InboundArrival {
            peer: &ctx.peer.id,
            client: ctx.client.as_deref(),
            target: ctx.target,
            pod: ctx.pod.as_deref(),
            services: &ctx.services,
        };
        hub.inbound_request(&arrival, req)
    }

    /// The response head is ready: the tap gets `rsp` now and `end` when
    /// the body ends, with what the kernel counted on the connection to the
    /// pod (when the kernel diagnostics run).
    pub(super) fn tap_response(
        &self,
        tapped: Option<Arc<TapRequest>>,
        ctx: &StreamCtx,
        conn: &PodConn,
        resp: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        if let Some(t) = &tapped
            && let (Some(kernel), Some(local)) = (self.kernel.get(), conn.local_addr())
        {
            t.upstream(local, ctx.target, kernel);
        }
        tap::response(tapped, resp)
    }

    /// Splices an opaque stream to the pod; a tap open when it closes gets
    /// one `tcp` event. Returns whether the copy ended in an error (the
    /// stream's `tcp_close_total` classification).
    pub(super) async fn splice<T>(
        &self,
        peer: &CertInfo,
        connect: &HeaderMap,
        target: SocketAddr,
        services: &[String],
        tunnel: T,
        upstream: TcpStream,
    ) -> bool
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let start = Instant::now();
        // The copy runs until both sides are done, or until a reload of the
        // authorization rules denies the stream: then both are closed.
        let mut rules = self.authz.subscribe();
        let copy = splice_counted(tunnel, upstream);
        tokio::pin!(copy);
        let copied = loop {
            tokio::select! {
                done = &mut copy => break done,
                changed = rules.changed() => {
                    if changed.is_err() {
                        break (&mut copy).await;
                    }
                    if let Some(d) = self.authz.recheck(&peer.id, target) {
                        break Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("closed: {}", d.reason),
                        ));
                    }
                }
            }
        };
        let failed = copied.is_err();
        let Some(hub) = self.tap.get() else {
            return failed;
        };
        let error = copied.as_ref().err().map(|e| e.to_string());
        hub.inbound_tcp_closed(|| {
            let (bytes_out, bytes_in) = *copied.as_ref().unwrap_or(&(0, 0));
            InboundTcp {
                arrival: InboundArrival {
                    peer: &peer.id,
                    client: forwarded_for(connect),
                    target,
                    pod: self.pods.get(&target.ip()).map(String::as_str),
                    services,
                },
                duration: start.elapsed(),
                bytes_out,
                bytes_in,
                close: if copied.is_ok() { "eof" } else { "error" },
                error: error.as_deref(),
            }
        });
        failed
    }
}
