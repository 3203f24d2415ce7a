//! Pick: which endpoint of the backend this attempt goes to, and along
//! which path (direct from the pod's network namespace, or the mTLS tunnel
//! to the endpoint's node). Endpoints an earlier attempt of the same
//! request tried are avoided while another is left, so a retry goes
//! elsewhere.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::debug;

use super::{ConnCtx, HttpProxy};
use crate::balance::Pick;
use crate::diagnostics::tap;
use crate::discovery::{Endpoint, Service};
use crate::http::pool::Key;
use crate::telemetry::trace;

/// The balancer's choice for one attempt, and the pool key to reach it.
/// Holding the pick counts the attempt as in flight on the endpoint.
pub(super) struct Picked<'a> {
    pub pick: Pick<'a, Endpoint>,
    pub key: Key,
}

/// Picks an endpoint of `backend` not in `tried` (unless nothing else is
/// left), tells tap and the trace (through the request's `extensions`),
/// and works out the path to it. `None`: the backend has no endpoints.
pub(super) fn endpoint<'a>(
    proxy: &HttpProxy,
    ctx: &ConnCtx,
    backend: &'a Service,
    tried: &[SocketAddr],
    now: Instant,
    extensions: &http::Extensions,
) -> Option<Picked<'a>> {
    let pick = backend
        .balancer
        .pick_avoiding(now, |e| tried.contains(&e.addr))?;
    let endpoint = pick.endpoint();
    let addr = endpoint.addr;
    let path = proxy
        .pool
        .upstreams()
        .path(ctx.identity(), endpoint.node.as_deref());
    tap::dispatched(
        extensions,
        &backend.name,
        addr,
        endpoint.pod.as_deref(),
        path.tls().value(),
    );
    trace::record(extensions, |t| {
        t.selected = Some(trace::Selected {
            addr,
            pod: endpoint.pod.as_deref().map(String::from),
            node: endpoint.node.as_deref().map(String::from),
            zone: endpoint.zone.as_deref().map(String::from),
            identity: endpoint.identity.as_deref().map(String::from),
            weight: endpoint.weight,
            ewma: pick.stats().ewma(now),
            in_flight: pick.stats().in_flight().saturating_sub(1),
        });
    });
    if pick.is_panic() {
        debug!(%addr, "every endpoint is ejected; trying the one that recovers first");
    } else if pick.is_probe() {
        debug!(%addr, "probing an ejected endpoint");
    }
    let key = Key::new(addr, path, ctx.netns());
    Some(Picked { pick, key })
}
