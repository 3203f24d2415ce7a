//! A request to an address that is no longer a service (a reload removed
//! it while the connection was open): sent where it was dialled, once,
//! with no route, retry or balancing.

use std::time::Instant;

use http::{Request, Response};

use super::attempt::{Attempt, Used};
use super::{ConnCtx, HttpProxy};
use crate::diagnostics::tap;
use crate::discovery::DEFAULT_ROUTE;
use crate::http::body::ProxyBody;
use crate::http::message::{authority, finish, is_grpc, upstream_request};
use crate::http::pool::Key;
use crate::telemetry::http_metrics::observe;

impl HttpProxy {
    pub(super) async fn passthrough(
        &self,
        ctx: &ConnCtx,
        req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(&req);
        let labels = self
            .metrics
            .request(ctx.pod(), authority(&req), "unknown", DEFAULT_ROUTE);
        let start = Instant::now();
        let mut req = req;
        let tapped = self
            .tap
            .request(ctx.pod(), ctx.client, ctx.dst, None, &mut req);
        let (parts, body) = req.into_parts();
        let upstream = upstream_request(&parts, body, ctx.version);
        let key = Key::new(
            ctx.dst,
            self.pool.upstreams().path(ctx.identity(), None),
            ctx.netns(),
        );
        ctx.live
            .set_upstream(None, ctx.dst, key.path.peer_identity(), None);
        let mut resp = match self
            .attempt(ctx, &key, ctx.version, upstream, &mut Used::default())
            .await
        {
            Attempt::Response(resp) => finish(resp),
            Attempt::Failed { error, detail, .. } => {
                self.error(error, &ctx.dst.to_string(), Some(&detail), grpc)
            }
        };
        resp.extensions_mut().insert(key.path.tls());
        let resp = tap::response(tapped, resp);
        observe(self.metrics.clone(), labels, start, resp, grpc)
    }
}
