//! `POST /capture?pod=NS/NAME|node=1&filter=…&duration=30s&max_packets=N&max_bytes=N&snaplen=N&keylog=1`:
//! streams a pcapng capture (see `diagnostics::capture`).

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use tracing::warn;

use super::routes::{Body, text};
use super::{AdminState, Caller};
use crate::diagnostics::capture::{CaptureError, CaptureParams, Requester, filter};

/// The media type of the stream (pcapng has no registered one; this is
/// what Wireshark's own tools use).
pub const CONTENT_TYPE: &str = "application/x-pcapng";

/// Names the traffic the capture leaves out whatever its filter says (the
/// admin API's own connections, on the node), for the CLI's summary.
pub const EXCLUDED_HEADER: &str = "waymark-capture-excluded";

pub async fn handle(state: &AdminState, caller: &Caller, req: Request<Incoming>) -> Response<Body> {
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let who = Requester {
        peer: caller.to_string(),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string(),
    };
    let query = req.uri().query().unwrap_or("");
    let params = match CaptureParams::from_query(query, &config) {
        Ok(p) => p,
        Err(e) => {
            state
                .captures
                .refused(if e.forbidden { "forbidden" } else { "invalid" });
            warn!(peer = %who.peer, user_agent = %who.user_agent, query, reason = %e.message, "packet capture refused");
            let status = if e.forbidden {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_REQUEST
            };
            return text(status, format!("{}\n", e.message));
        }
    };
    // libpcap may resolve host names in the filter: off the admin thread.
    let (expression, snaplen) = (params.kernel_expression(), params.snaplen);
    let compiled = tokio::task::spawn_blocking(move || filter::compile(&expression, snaplen)).await;
    let filter = match compiled {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            state.captures.refused("invalid");
            warn!(peer = %who.peer, user_agent = %who.user_agent, target = %params.target, reason = %e, "packet capture refused");
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
        Err(e) => {
            state.captures.refused("error");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("filter compilation failed: {e}\n"),
            );
        }
    };
    let excluded = params.excluded.clone();
    match state
        .captures
        .start(params, filter, &config.capture, who)
        .await
    {
        Ok(body) => {
            let mut r = Response::new(body.boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            if let Some(v) = excluded.and_then(|e| header::HeaderValue::try_from(e).ok()) {
                r.headers_mut().insert(EXCLUDED_HEADER, v);
            }
            r
        }
        Err(e @ CaptureError::Busy { .. }) => text(StatusCode::TOO_MANY_REQUESTS, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
