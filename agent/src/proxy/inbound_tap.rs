//! The inbound side's two calls into the live tap
//! (`diagnostics::tap::inbound`): when a request arrives on a tunnel
//! stream, and when the pod's response head is ready. Kept here so the
//! request handler stays one line per hook.

use std::sync::Arc;

use http::{Request, Response};

use super::inbound_http::InboundHttp;
use super::inbound_request::{PodConn, StreamCtx};
use crate::diagnostics::tap::{self, InboundArrival, TapRequest};
use crate::http::body::ProxyBody;

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
            service: ctx.service.as_deref(),
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
}
