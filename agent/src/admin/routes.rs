//! Request handlers of the admin API.

use std::convert::Infallible;
use std::path::Path;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};

use super::stats::{self, Query};
use super::{AdminState, Caller};
use crate::diagnostics::tap::filter::Filter;

/// Whole answers and streams (a capture, `/drops/follow`) alike.
pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Every endpoint, for the 405 and 404 answers.
const ENDPOINTS: &[&str] = &[
    "/live",
    "/ready",
    "/metrics",
    "/config",
    "/log-level",
    "/capture",
    "/drops",
    "/drops/follow",
    "/stat",
    "/routes",
    "/edges",
    "/endpoints",
    "/conns",
    "/check",
    "/check/peers",
    "/tap",
];

/// What the loopback TCP listener serves: what probes and scrapers need.
/// Everything else reads traffic (tap, capture, drops, stats, endpoints),
/// reveals the agent's setup (config, check) or changes it (log level), and
/// anything in the node's network namespace could ask; it is served on the
/// Unix socket only, where the caller's credentials are checked.
pub(super) const TCP_ENDPOINTS: &[&str] = &["/live", "/ready", "/metrics"];

/// Largest request body the admin API reads (a log filter).
const MAX_BODY: usize = 4096;

pub async fn handle(
    state: &AdminState,
    socket: &Path,
    caller: &Caller,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if matches!(caller, Caller::Tcp(_))
        && ENDPOINTS.contains(&path.as_str())
        && !TCP_ENDPOINTS.contains(&path.as_str())
    {
        return Ok(text(
            StatusCode::FORBIDDEN,
            format!(
                "{path} is served only on the admin socket {} (it reads traffic or changes the agent, so the caller's user is checked there: root or admin.socket_group); on the node run `waymark` as such a user, or `curl --unix-socket {}`. This TCP port serves {} only.\n",
                socket.display(),
                socket.display(),
                TCP_ENDPOINTS.join(" ")
            ),
        ));
    }
    let response = match (req.method(), path.as_str()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n".into()),
        (&Method::GET, "/ready") => ready(state),
        (&Method::GET, "/metrics") => metrics(state),
        (&Method::GET, "/config") => match serde_json::to_string_pretty(
            &**state.config.read().unwrap_or_else(|e| e.into_inner()),
        ) {
            Ok(json) => with_type(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode config: {e}\n"),
            ),
        },
        (&Method::GET, "/log-level") => {
            text(StatusCode::OK, format!("{}\n", state.log_level.get()))
        }
        (&Method::PUT, "/log-level") | (&Method::POST, "/log-level") => {
            set_log_level(state, req).await
        }
        (&Method::GET, "/tap") => tap(state, req.uri().query().unwrap_or("")),
        (&Method::POST, "/capture") => super::capture::handle(state, caller, req).await,
        (&Method::GET, "/drops") => super::drops::report(state, req.uri().query()),
        (&Method::GET, "/drops/follow") => super::drops::follow(state, req.uri().query()),
        (&Method::GET, "/stat" | "/routes" | "/edges") => {
            let answer = Query::parse(req.uri().query()).and_then(|query| match path.as_str() {
                "/stat" => stats::stat(state, &query),
                "/routes" => stats::routes(state, &query),
                _ => stats::edges(state, &query),
            });
            match answer {
                Ok(body) => with_type(StatusCode::OK, "application/json", body),
                Err((status, msg)) => text(status, msg + "\n"),
            }
        }
        (&Method::GET, "/endpoints") => {
            match Query::parse(req.uri().query())
                .and_then(|query| super::endpoints::report(state, &query))
            {
                Ok(body) => with_type(StatusCode::OK, "application/json", body),
                Err((status, msg)) => text(status, msg + "\n"),
            }
        }
        (&Method::GET, "/conns") => match super::conns::report(state, req.uri().query()) {
            Ok(body) => with_type(StatusCode::OK, "application/json", body),
            Err((status, msg)) => text(status, msg + "\n"),
        },
        (&Method::GET, "/check") => match serde_json::to_string_pretty(&super::check::facts(state))
        {
            Ok(json) => with_type(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode check facts: {e}\n"),
            ),
        },
        (&Method::GET, "/check/peers") => check_peers(state, req.uri().query()).await,
        (_, p) if ENDPOINTS.contains(&p) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method not allowed on {path}\n"),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            format!(
                "no such admin endpoint: {path}\navailable: {}\n",
                ENDPOINTS.join(" ")
            ),
        ),
    };
    Ok(response)
}

fn ready(state: &AdminState) -> Response<Body> {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", pending.join(", ")),
        )
    }
}

fn metrics(state: &AdminState) -> Response<Body> {
    (state.before_scrape)();
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
        Ok(()) => with_type(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            out,
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn check_peers(state: &AdminState, query: Option<&str>) -> Response<Body> {
    let timeout = match super::peers::timeout_from_query(query) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, e + "\n"),
    };
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let facts = state.peer_probe.run(&config, timeout).await;
    match serde_json::to_string_pretty(&facts) {
        Ok(json) => with_type(StatusCode::OK, "application/json", json + "\n"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode peer facts: {e}\n"),
        ),
    }
}

async fn set_log_level(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("cannot read body: {e}\n")),
    };
    let Ok(filter) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "log filter must be UTF-8\n".into());
    };
    match state.log_level.set(filter.trim()) {
        Ok(()) => {
            tracing::info!(filter = filter.trim(), "log level changed");
            text(StatusCode::OK, format!("{}\n", state.log_level.get()))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid log filter {e}\n")),
    }
}

/// `GET /tap?filters`: streams the matching requests' events, one JSON
/// object a line, until the client goes away or the filter's `max` or
/// `duration` is reached.
fn tap(state: &AdminState, query: &str) -> Response<Body> {
    let filter = match Filter::from_query(query, &state.tap.pods()) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match state.tap.open(filter) {
        Ok(stream) => {
            let mut r = Response::new(stream.boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/x-ndjson"),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            r
        }
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

pub(super) fn text(status: StatusCode, body: String) -> Response<Body> {
    with_type(status, "text/plain; charset=utf-8", body)
}

pub(super) fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
