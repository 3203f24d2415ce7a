//! HTTP/1.1 `Upgrade` (WebSocket): forwarded with its upgrade headers; on
//! `101 Switching Protocols` both connections are handed over to a byte
//! copy. One attempt, no retry: an upgrade is not replayable.

use std::time::Instant;

use http::{Request, Response, StatusCode};
use tracing::{Instrument, debug};

use super::attempt::{Attempt, Used};
use super::{ConnCtx, HttpProxy};
use crate::discovery::{Endpoint, Service};
use crate::http::body::{ProxyBody, empty};
use crate::http::errors::ProxyError;
use crate::http::headers::strip_hop_by_hop;
use crate::http::message::{finish, origin_form};
use crate::http::pool::{Key, Version};

impl HttpProxy {
    pub(super) async fn upgrade(
        &self,
        ctx: &ConnCtx,
        backend: &Service,
        split: Option<&str>,
        mut req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let Some(pick) = backend.balancer.pick(Instant::now()) else {
            return self.error(ProxyError::NoEndpoints, &backend.name, None, false);
        };
        let Endpoint { addr, node, .. } = pick.endpoint().clone();
        drop(pick);
        let key = Key::new(
            addr,
            self.pool.upstreams().path(ctx.identity(), node.as_deref()),
            ctx.netns(),
        );
        ctx.live
            .set_upstream(split, addr, key.path.peer_identity(), None);
        let live = ctx.live.clone();
        let downstream = crate::http::h1::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let mut upstream = Request::from_parts(parts.clone(), body);
        *upstream.uri_mut() = origin_form(&parts.uri);
        strip_hop_by_hop(upstream.headers_mut(), true);
        let mut resp = match self
            .attempt(ctx, &key, Version::Http1, upstream, &mut Used::default())
            .await
        {
            Attempt::Response(r) => r,
            Attempt::Failed { error, detail, .. } => {
                let mut resp = self.error(error, &backend.name, Some(&detail), false);
                resp.extensions_mut().insert(key.path.tls());
                return resp;
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let mut resp = finish(resp);
            resp.extensions_mut().insert(key.path.tls());
            return resp;
        }
        let upstream_upgrade = crate::http::h1::upgrade::on_response(&mut resp);
        tokio::spawn(
            async move {
                // Listed in `waymark conns` until the copy ends.
                let _live = live;
                match tokio::try_join!(downstream, upstream_upgrade) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (d, u);
                        match tokio::io::copy_bidirectional(&mut d, &mut u).await {
                            Ok((up, down)) => debug!(
                                bytes_out = up,
                                bytes_in = down,
                                "upgraded connection closed"
                            ),
                            Err(e) => debug!(error = %e, "upgraded connection failed"),
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade did not complete"),
                }
            }
            .instrument(tracing::Span::current()),
        );
        let (parts, _) = resp.into_parts();
        let mut resp = Response::from_parts(parts, empty());
        resp.extensions_mut().insert(key.path.tls());
        resp
    }
}
