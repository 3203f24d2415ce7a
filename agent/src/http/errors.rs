//! The proxy's own answers when it cannot deliver a request. They must never
//! be mistaken for the application's: each carries `l5d-proxy-error` (the
//! header Linkerd users already look for) and `waymark-proxy-error` naming
//! the reason, and a short body naming the agent, the service and the cause.
//! gRPC clients get a trailers-only response with the matching
//! `grpc-status`, since they ignore HTTP status codes.
//!
//! The decision itself travels with the response as an extension
//! ([`ProxyError`]), so tap, top, metrics and traces name the status's
//! source ([`StatusSource`]) from what the proxy did rather than from the
//! status code or a header an application could send too.

use http::{HeaderValue, Response, StatusCode, header};

use super::body::{ProxyBody, full};

/// Why the proxy answered instead of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The service has no endpoints (or none after routing).
    NoEndpoints,
    /// Connecting to the endpoint failed (refused, unreachable).
    ConnectFailed,
    /// The endpoint reset or closed the connection mid-request.
    UpstreamReset,
    /// The request timeout passed before the response started.
    Timeout,
    /// The request was malformed in a way the proxy cannot forward.
    BadRequest,
    /// The destination node's agent refused the source identity
    /// (authorization policy).
    Forbidden,
    /// A limit of the agent (`[limits]`, `outbound.max_connections*`)
    /// refused or closed it.
    Limit,
}

/// Every reason, for parsing a peer agent's header back.
const ALL: [ProxyError; 7] = [
    ProxyError::NoEndpoints,
    ProxyError::ConnectFailed,
    ProxyError::UpstreamReset,
    ProxyError::Timeout,
    ProxyError::BadRequest,
    ProxyError::Forbidden,
    ProxyError::Limit,
];

impl ProxyError {
    /// The short, stable name diagnostics show (`reason=no_endpoints`).
    pub fn code(self) -> &'static str {
        match self {
            ProxyError::NoEndpoints => "no_endpoints",
            ProxyError::ConnectFailed => "connect_failure",
            ProxyError::UpstreamReset => "upstream_reset",
            ProxyError::Timeout => "timeout",
            ProxyError::BadRequest => "bad_request",
            ProxyError::Forbidden => "authz",
            ProxyError::Limit => "limit",
        }
    }

    /// The reason a `waymark-proxy-error` header names (what [`reason`]
    /// wrote), or `None` for text no agent writes.
    ///
    /// [`reason`]: ProxyError::reason
    pub fn from_reason(text: &str) -> Option<Self> {
        ALL.into_iter().find(|e| e.reason() == text)
    }

    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::NoEndpoints => "no endpoints available",
            ProxyError::ConnectFailed => "connection to the endpoint failed",
            ProxyError::UpstreamReset => "the endpoint reset the connection",
            ProxyError::Timeout => "request timed out",
            ProxyError::BadRequest => "request cannot be forwarded",
            ProxyError::Forbidden => "forbidden by the destination's authorization policy",
            ProxyError::Limit => "refused by a limit of the agent",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::UpstreamReset => StatusCode::BAD_GATEWAY,
            ProxyError::NoEndpoints | ProxyError::ConnectFailed | ProxyError::Limit => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The gRPC status a gRPC client gets instead: DEADLINE_EXCEEDED (4)
    /// for a timeout, PERMISSION_DENIED (7) for a policy denial,
    /// RESOURCE_EXHAUSTED (8) for a limit, INTERNAL (13) for a bad
    /// request, UNAVAILABLE (14) otherwise.
    pub fn grpc_status(self) -> u32 {
        match self {
            ProxyError::Timeout => 4,
            ProxyError::Forbidden => 7,
            ProxyError::Limit => 8,
            ProxyError::BadRequest => 13,
            _ => 14,
        }
    }
}

/// Where a response's status came from: the application, or a proxy that
/// answered instead (this agent, or the peer agent across the tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusSource {
    App,
    Proxy(ProxyError),
}

impl StatusSource {
    /// The source of a response this agent is about to send: a proxy
    /// answer carries its [`ProxyError`] as an extension.
    pub fn of<B>(resp: &Response<B>) -> Self {
        resp.extensions()
            .get::<ProxyError>()
            .map_or(StatusSource::App, |e| StatusSource::Proxy(*e))
    }

    /// `app` or `proxy`.
    pub fn label(self) -> &'static str {
        match self {
            StatusSource::App => "app",
            StatusSource::Proxy(_) => "proxy",
        }
    }

    /// The proxy's reason code, for a proxy answer.
    pub fn reason_code(self) -> Option<&'static str> {
        match self {
            StatusSource::App => None,
            StatusSource::Proxy(e) => Some(e.code()),
        }
    }
}

/// Marks a response that came from a peer agent through the mTLS tunnel:
/// when that agent answered itself (its `waymark-proxy-error` header,
/// trusted only from an authenticated peer agent), the response carries
/// the peer's [`ProxyError`] so its source reads `proxy` here too.
pub fn mark_peer_answer<B>(resp: &mut Response<B>) {
    if let Some(e) = resp
        .headers()
        .get(WAYMARK_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ProxyError::from_reason)
    {
        resp.extensions_mut().insert(e);
    }
}

/// The header naming the reason of a waymark agent's own answer.
pub const WAYMARK_HEADER: &str = "waymark-proxy-error";

/// Renders the proxy's answer. `detail` adds specifics (the endpoint
/// address, the OS error) to the body.
pub fn response(
    err: ProxyError,
    node: &str,
    service: &str,
    detail: Option<&str>,
    grpc: bool,
) -> Response<ProxyBody> {
    let message = match detail {
        Some(d) => format!("waymark {node}: service {service}: {} ({d})", err.reason()),
        None => format!("waymark {node}: service {service}: {}", err.reason()),
    };
    let mut resp = if grpc {
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(err.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{message}\n")));
        *r.status_mut() = err.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let reason = HeaderValue::from_static(err.reason());
    resp.headers_mut().insert("l5d-proxy-error", reason.clone());
    resp.headers_mut().insert(WAYMARK_HEADER, reason);
    resp.extensions_mut().insert(err);
    resp
}

/// What `grpc-message` encodes (gRPC over HTTP/2: every byte outside
/// 0x20–0x7E, and `%` itself); UTF-8 beyond ASCII is always encoded.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, GRPC_MESSAGE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn http_error_names_agent_service_and_reason() {
        let r = response(
            ProxyError::Timeout,
            "node-a",
            "hello",
            Some("after 2s"),
            false,
        );
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()["l5d-proxy-error"], "request timed out");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            b"waymark node-a: service hello: request timed out (after 2s)\n"
        );
    }

    #[test]
    fn grpc_error_is_trailers_only_with_status() {
        let r = response(ProxyError::NoEndpoints, "n", "s", None, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = response(ProxyError::Timeout, "n", "s", None, true);
        assert_eq!(r.headers()["grpc-status"], "4");
    }

    #[test]
    fn the_answer_carries_its_decision_and_peers_are_read_back() {
        for e in ALL {
            let r = response(e, "n", "s", None, false);
            assert_eq!(StatusSource::of(&r), StatusSource::Proxy(e));
            assert_eq!(ProxyError::from_reason(e.reason()), Some(e));
            // What a peer agent sent, read back on this side.
            let mut peer = Response::new(());
            *peer.headers_mut() = r.headers().clone();
            assert_eq!(StatusSource::of(&peer), StatusSource::App);
            mark_peer_answer(&mut peer);
            assert_eq!(StatusSource::of(&peer), StatusSource::Proxy(e));
        }
        let codes: std::collections::HashSet<_> = ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), ALL.len());
        assert_eq!(ProxyError::NoEndpoints.code(), "no_endpoints");
        assert_eq!(ProxyError::Forbidden.code(), "authz");
    }

    #[test]
    fn an_application_status_is_the_apps_whatever_its_headers() {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut()
            .insert(WAYMARK_HEADER, HeaderValue::from_static("made up"));
        mark_peer_answer(&mut r);
        assert_eq!(StatusSource::of(&r), StatusSource::App);
        assert_eq!(StatusSource::App.label(), "app");
        assert_eq!(StatusSource::App.reason_code(), None);
        assert_eq!(
            StatusSource::Proxy(ProxyError::Timeout).reason_code(),
            Some("timeout")
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a%b\nc é"), "a%25b%0Ac %C3%A9");
    }
}
