//! Attempt: one try against one endpoint, on a pooled upstream connection
//! or a new one. A pooled connection that turns out to have been closed
//! under the request (keep-alive's own race) is not a failure of the
//! endpoint: the request goes once more on a new connection when the
//! endpoint cannot have seen it.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use tracing::debug;

use super::{ConnCtx, HttpProxy};
use crate::http::body::ProxyBody;
use crate::http::errors::ProxyError;
use crate::http::pool::{ConnectError, Key, SendError, Version};
use crate::retry::Outcome;
use crate::transport::tunnel::{ConnectHeaders, REQUEST_ID};
use crate::transport::upstream::new_request_id;

/// How one attempt ended.
pub(super) enum Attempt {
    Response(Response<ProxyBody>),
    Failed {
        error: ProxyError,
        detail: String,
        observed: Outcome,
    },
}

/// What an attempt learned about the upstream connection it used.
#[derive(Default)]
pub(super) struct Used {
    /// Its local address (none through the tunnel), for the kernel's
    /// per-flow counters.
    pub local: Option<SocketAddr>,
    /// How long making it took, when it was made for this attempt.
    pub connect: Option<Duration>,
}

impl HttpProxy {
    /// One try against one endpoint, along `key.path`; `used` learns about
    /// the connection it used, also when the try is cut short by a timeout.
    ///
    /// A plain function returning an `async move` block, not an `async fn`
    /// (which keeps its arguments twice in its state): this state is part of
    /// every request's future, which is moved into its box per request.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub(super) fn attempt<'a>(
        &'a self,
        ctx: &'a ConnCtx,
        key: &'a Key,
        version: Version,
        req: Request<ProxyBody>,
        used: &'a mut Used,
    ) -> impl std::future::Future<Output = Attempt> + Send + 'a {
        async move {
            let addr = key.addr;
            let request_id = req
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let headers = || ConnectHeaders {
                source_workload: ctx.identity().cloned(),
                source_addr: ctx.source_addr,
                request_id: Some(request_id.clone().unwrap_or_else(new_request_id)),
            };
            let conn = match self.pool.checkout(key, version, headers).await {
                Ok((c, connect)) => {
                    used.local = c.local();
                    used.connect = connect;
                    c
                }
                Err(e) => return connect_failed(e),
            };
            let e = match self.pool.send(key, conn, req).await {
                Ok(resp) => return Attempt::Response(resp),
                Err(e) => e,
            };
            // A bodiless idempotent request on a reused HTTP/1 connection can be
            // made again if the endpoint closed the connection under it before
            // answering: keep-alive's own race, which a draining peer agent
            // (closing its idle connections) makes common. RFC 9112 §9.3.1 lets
            // a client retry such a request; browsers do. The client hands it
            // back for that (no copy is made of every request in case).
            let e = match e {
                SendError {
                    unsent: None,
                    resendable: Some(again),
                    error,
                } if used.connect.is_none()
                    && crate::retry::is_idempotent(again.method())
                    && error.is_incomplete_message() =>
                {
                    SendError {
                        error,
                        unsent: Some(again),
                        resendable: None,
                    }
                }
                e => e,
            };
            // A pooled connection that closed before the request was written
            // (the endpoint, or a draining peer agent, closing an idle
            // keep-alive connection just as this request went out): the
            // endpoint never saw it, so it goes once more on a new connection,
            // as hyper's own pooled client does, whatever its method and
            // outside the route's retry budget. The same for the bodiless
            // idempotent request handed back above.
            let e = match e {
                SendError {
                    unsent: Some(again),
                    error,
                    ..
                } if used.connect.is_none() => {
                    debug!(%addr, %error, "the pooled connection closed before the request was written; sending it on a new one");
                    let conn = match Box::pin(self.pool.connect_new(key, version, headers())).await
                    {
                        Ok((c, took)) => {
                            used.local = c.local();
                            used.connect = Some(took);
                            c
                        }
                        Err(e) => return connect_failed(e),
                    };
                    match self.pool.send(key, conn, again).await {
                        Ok(resp) => return Attempt::Response(resp),
                        Err(e) => e,
                    }
                }
                e => e,
            };
            Attempt::Failed {
                error: ProxyError::UpstreamReset,
                detail: format!("{addr}: {e}"),
                observed: Outcome::Reset,
            }
        }
    }
}

/// The failed attempt for a connection that could not be made.
fn connect_failed(e: ConnectError) -> Attempt {
    let (error, observed) = match &e {
        ConnectError::Handshake { .. } => (ProxyError::ConnectFailed, Outcome::Reset),
        // Policy answers the same way every time: never retried.
        ConnectError::Upstream(u) if u.is_denied() => (ProxyError::Forbidden, Outcome::Status(403)),
        ConnectError::Upstream(_) => (ProxyError::ConnectFailed, Outcome::ConnectFailure),
    };
    Attempt::Failed {
        error,
        detail: e.to_string(),
        observed,
    }
}
