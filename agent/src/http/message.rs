//! What a proxy does to a message between its two connections, the same in
//! both directions: the upstream copy of a request (hop-by-hop headers
//! gone, URI and authority in the form the upstream protocol wants), the
//! response on its way back, and the few facts read off a request that
//! routing and metrics need (its authority, whether it is gRPC).

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};

use crate::http::body::ProxyBody;
use crate::http::headers::strip_hop_by_hop;
use crate::http::pool::Version;

/// The authority the client addressed: `:authority` (HTTP/2, absolute
/// URIs) or `Host`.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Whether the request is a gRPC call (`content-type: application/grpc…`):
/// its errors are answered as gRPC statuses.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The upstream copy of a request: hop-by-hop headers removed, the URI and
/// `Host`/`:authority` put in the form the upstream protocol wants, the
/// authority the client used preserved either way. `parts` stays as it is,
/// for another attempt.
pub fn upstream_request(
    parts: &http::request::Parts,
    body: ProxyBody,
    version: Version,
) -> Request<ProxyBody> {
    build(parts, parts.headers.clone(), body, version)
}

/// The same, moving the headers out of `parts` instead of copying them:
/// for the last attempt a request can have (no retry policy, or a body
/// that cannot be replayed), where copying every header map was the
/// largest allocation of a proxied request. `parts` keeps its method, URI
/// and extensions.
pub fn take_upstream_request(
    parts: &mut http::request::Parts,
    body: ProxyBody,
    version: Version,
) -> Request<ProxyBody> {
    let headers = std::mem::take(&mut parts.headers);
    build(parts, headers, body, version)
}

fn build(
    parts: &http::request::Parts,
    mut headers: http::HeaderMap,
    body: ProxyBody,
    version: Version,
) -> Request<ProxyBody> {
    strip_hop_by_hop(&mut headers, false);
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    match version {
        Version::Http1 => {
            *req.version_mut() = http::Version::HTTP_11;
            *req.uri_mut() = origin_form(&parts.uri);
            // An HTTP/2 client's `:authority` becomes `Host`; an HTTP/1
            // request keeps the `Host` it came with.
            if !headers.contains_key(header::HOST)
                && let Some(a) = parts.uri.authority()
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                headers.insert(header::HOST, v);
            }
            *req.headers_mut() = headers;
        }
        Version::Http2 => {
            let authority = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    headers
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                });
            *req.headers_mut() = headers;
            *req.version_mut() = http::Version::HTTP_2;
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let authority = authority.unwrap_or_else(|| "localhost".to_string());
            *req.uri_mut() = Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
                .unwrap_or_else(|_| parts.uri.clone());
            // HTTP/2 carries the authority in `:authority`.
            req.headers_mut().remove(header::HOST);
        }
    }
    req
}

/// The path and query of a URI (`/` when it has none): what an HTTP/1.1
/// request line carries to an origin server.
pub fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|p| Uri::from(p.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

/// The endpoint's response, on its way to the client.
pub fn finish(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::empty;

    #[test]
    fn upstream_request_keeps_authority_and_strips_hop_by_hop() {
        let req = Request::builder()
            .method("GET")
            .uri("/a?b=1")
            .header("host", "hello.default:80")
            .header("connection", "keep-alive")
            .header("x-app", "1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let h1 = upstream_request(&parts, empty(), Version::Http1);
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers()["host"], "hello.default:80");
        assert!(h1.headers().get("connection").is_none());
        let h2 = upstream_request(&parts, empty(), Version::Http2);
        assert_eq!(h2.uri(), "http://hello.default:80/a?b=1");
        assert!(h2.headers().get("host").is_none());
        assert_eq!(h2.headers()["x-app"], "1");
    }

    #[test]
    fn taking_the_headers_gives_the_same_request_and_keeps_the_rest() {
        let req = Request::builder()
            .method("PUT")
            .uri("/a?b=1")
            .header("host", "hello.default:80")
            .header("te", "trailers")
            .header("x-app", "1")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        parts.extensions.insert(7u8);
        for version in [Version::Http1, Version::Http2] {
            let copied = upstream_request(&parts, empty(), version);
            let mut again = parts.clone();
            let taken = take_upstream_request(&mut again, empty(), version);
            assert_eq!(copied.uri(), taken.uri());
            assert_eq!(copied.method(), taken.method());
            assert_eq!(copied.headers(), taken.headers());
            assert!(again.headers.is_empty());
            assert_eq!(again.extensions.get::<u8>(), Some(&7));
            assert_eq!(again.method, "PUT");
        }
    }

    #[test]
    fn authority_and_grpc_are_read_off_the_request() {
        let req = Request::builder()
            .uri("/svc.Echo/Say")
            .header("host", "echo:50051")
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        assert_eq!(authority(&req), Some("echo:50051"));
        assert!(is_grpc(&req));
        let req = Request::builder()
            .uri("http://other:80/")
            .header("host", "ignored")
            .body(())
            .unwrap();
        assert_eq!(authority(&req), Some("other:80"));
        assert!(!is_grpc(&req));
    }
}
