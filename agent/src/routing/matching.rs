//! The conditions of one route match — path, method, headers, gRPC service
//! and method — and how each is tested against a request's head.

use http::header::{CONTENT_TYPE, COOKIE};
use http::{HeaderMap, HeaderName, Method, request::Parts};
use regex::Regex;

use super::RoutingError;

/// How a request path must look. Matching sees the path only, never the query.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// The whole path, byte for byte (a trailing slash matters).
    Exact(String),
    /// Whole leading path segments: `/foo` matches `/foo`, `/foo/` and
    /// `/foo/bar`, not `/foobar`. A trailing slash in the prefix is ignored.
    Prefix(String),
    /// A regular expression that must match the whole path. Build it with
    /// [`PathMatch::regex`], which anchors it.
    Regex(Regex),
}

impl PathMatch {
    pub fn exact(path: &str) -> Result<Self, RoutingError> {
        validate_path(path)?;
        Ok(Self::Exact(path.to_owned()))
    }

    pub fn prefix(path: &str) -> Result<Self, RoutingError> {
        validate_path(path)?;
        Ok(Self::Prefix(path.to_owned()))
    }

    pub fn regex(pattern: &str) -> Result<Self, RoutingError> {
        full_match_regex(pattern).map(Self::Regex)
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => prefix_matches(prefix, path),
            Self::Regex(re) => re.is_match(path),
        }
    }
}

/// The prefix as it is compared: without trailing slashes, so `/foo/` and
/// `/foo` are the same prefix (and `/` becomes the empty prefix that matches
/// every absolute path).
pub(super) fn normalized_prefix(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = normalized_prefix(prefix);
    match path.strip_prefix(prefix) {
        // Gateway API prefixes match whole segments: what follows the prefix
        // must be nothing or a new segment, so `/foo` never matches `/foobar`.
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn validate_path(path: &str) -> Result<(), RoutingError> {
    if !path.starts_with('/') {
        return Err(RoutingError::PathNotAbsolute {
            path: path.to_owned(),
        });
    }
    if let Some(found) = path
        .chars()
        .find(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(RoutingError::PathInvalidChar {
            path: path.to_owned(),
            found,
        });
    }
    Ok(())
}

/// Compiles `pattern` so that it must match the whole input, as Envoy and
/// Istio do for route regexes: a partial-match default would let `/api`
/// silently match `/v2/api/x`, which is rarely what an operator meant.
fn full_match_regex(pattern: &str) -> Result<Regex, RoutingError> {
    let invalid = |reason| RoutingError::InvalidRegex {
        pattern: pattern.to_owned(),
        reason,
    };
    // Compiling the bare pattern first both reports errors in the user's own
    // terms and guarantees the wrapped form below cannot change its meaning
    // (an unbalanced `)` could otherwise escape the group).
    Regex::new(pattern).map_err(invalid)?;
    Regex::new(&format!("^(?:{pattern})$")).map_err(invalid)
}

/// How a header value must look.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// Byte-for-byte equal (header values are case-sensitive).
    Exact(String),
    /// A regular expression that must match the whole value. Build it with
    /// [`ValueMatch::regex`], which anchors it.
    Regex(Regex),
}

impl ValueMatch {
    pub fn exact(value: &str) -> Self {
        Self::Exact(value.to_owned())
    }

    pub fn regex(pattern: &str) -> Result<Self, RoutingError> {
        full_match_regex(pattern).map(Self::Regex)
    }

    pub fn matches(&self, value: &[u8]) -> bool {
        match self {
            Self::Exact(exact) => value == exact.as_bytes(),
            // Values that are not UTF-8 (obs-text) cannot match a regex.
            Self::Regex(re) => std::str::from_utf8(value).is_ok_and(|v| re.is_match(v)),
        }
    }
}

/// One header condition. Header names compare case-insensitively because
/// [`HeaderName`] is always lowercase.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

impl HeaderMatch {
    pub fn new(name: &str, value: ValueMatch) -> Result<Self, RoutingError> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            RoutingError::InvalidHeaderName {
                name: name.to_owned(),
            }
        })?;
        Ok(Self { name, value })
    }

    /// A header sent more than once is matched as one value, its field values
    /// joined with "," (RFC 9110 §5.3) — or "; " for `cookie`, which HTTP/2
    /// may split into one field per cookie (RFC 9113 §8.2.3). A missing
    /// header never matches.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let Some(first) = values.next() else {
            return false;
        };
        let Some(second) = values.next() else {
            return self.value.matches(first.as_bytes());
        };
        let separator: &[u8] = if self.name == COOKIE { b"; " } else { b"," };
        let mut joined = first.as_bytes().to_vec();
        for value in std::iter::once(second).chain(values) {
            joined.extend_from_slice(separator);
            joined.extend_from_slice(value.as_bytes());
        }
        self.value.matches(&joined)
    }
}

/// A GRPCRoute-style method match: the request must be gRPC and its path
/// `/<service>/<method>` must name these (exact, case-sensitive). `None`
/// matches any; both `None` matches any gRPC request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcMatch {
    pub service: Option<String>,
    pub method: Option<String>,
}

impl GrpcMatch {
    pub fn new(service: Option<&str>, method: Option<&str>) -> Result<Self, RoutingError> {
        let check = |what, value: Option<&str>| match value {
            Some(v) if v.is_empty() || v.contains('/') => Err(RoutingError::InvalidGrpcName {
                what,
                value: v.to_owned(),
            }),
            _ => Ok(value.map(str::to_owned)),
        };
        Ok(Self {
            service: check("service", service)?,
            method: check("method", method)?,
        })
    }

    fn matches(&self, request: Option<&GrpcRequest<'_>>) -> bool {
        let Some(request) = request else {
            return false;
        };
        self.service.as_deref().is_none_or(|s| s == request.service)
            && self.method.as_deref().is_none_or(|m| m == request.method)
    }
}

/// The gRPC identity of a request, read once per request and shared by every
/// match that asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GrpcRequest<'a> {
    pub service: &'a str,
    pub method: &'a str,
}

impl<'a> GrpcRequest<'a> {
    /// `None` unless the content type is `application/grpc` or one of its
    /// `+proto`/`+json`/`-web` variants and the path is `/<service>/<method>`.
    pub fn from_parts(parts: &'a Parts) -> Option<Self> {
        let content_type = parts.headers.get(CONTENT_TYPE)?.as_bytes();
        let grpc = b"application/grpc";
        // Media types compare case-insensitively (RFC 9110 §8.3.1).
        if content_type.len() < grpc.len() || !content_type[..grpc.len()].eq_ignore_ascii_case(grpc)
        {
            return None;
        }
        let (service, method) = parts.uri.path().strip_prefix('/')?.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        Some(Self { service, method })
    }
}

/// One way a request can select a route: every condition present must hold;
/// a match with no conditions matches every request.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    pub headers: Vec<HeaderMatch>,
    pub grpc: Option<GrpcMatch>,
}

impl RouteMatch {
    #[cfg(test)]
    pub fn matches(&self, parts: &Parts) -> bool {
        self.matches_with(parts, GrpcRequest::from_parts(parts).as_ref())
    }

    pub(super) fn matches_with(&self, parts: &Parts, grpc: Option<&GrpcRequest<'_>>) -> bool {
        self.method.as_ref().is_none_or(|m| *m == parts.method)
            && self
                .path
                .as_ref()
                .is_none_or(|p| p.matches(parts.uri.path()))
            && self.grpc.as_ref().is_none_or(|g| g.matches(grpc))
            && self.headers.iter().all(|h| h.matches(&parts.headers))
    }

    /// Gateway API: "if multiple entries specify equivalent header names,
    /// only the first entry with an equivalent name MUST be considered".
    pub(super) fn drop_repeated_headers(&mut self) {
        let mut seen: Vec<HeaderName> = Vec::with_capacity(self.headers.len());
        self.headers.retain(|h| {
            if seen.contains(&h.name) {
                false
            } else {
                seen.push(h.name.clone());
                true
            }
        });
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::Request;

    /// Request head for tests: `headers` are (name, value) pairs, repeats allowed.
    pub fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn exact_path_is_literal() {
        let m = PathMatch::exact("/foo").unwrap();
        assert!(m.matches("/foo"));
        assert!(!m.matches("/foo/"));
        assert!(!m.matches("/Foo"));
        assert!(!m.matches("/foo/bar"));
    }

    #[test]
    fn prefix_matches_whole_segments() {
        for prefix in ["/foo", "/foo/"] {
            let m = PathMatch::prefix(prefix).unwrap();
            assert!(m.matches("/foo"), "{prefix}");
            assert!(m.matches("/foo/"), "{prefix}");
            assert!(m.matches("/foo/bar"), "{prefix}");
            assert!(!m.matches("/foobar"), "{prefix}");
            assert!(!m.matches("/fo"), "{prefix}");
            assert!(!m.matches("/bar/foo"), "{prefix}");
        }
    }

    #[test]
    fn root_prefix_matches_every_path() {
        let m = PathMatch::prefix("/").unwrap();
        for path in ["/", "/a", "/a/b/c", "//x"] {
            assert!(m.matches(path), "{path}");
        }
    }

    #[test]
    fn path_matching_ignores_the_query() {
        let m = RouteMatch {
            path: Some(PathMatch::exact("/search").unwrap()),
            ..Default::default()
        };
        assert!(m.matches(&parts("GET", "/search?q=a/b", &[])));
        let m = RouteMatch {
            path: Some(PathMatch::regex("/search").unwrap()),
            ..Default::default()
        };
        assert!(m.matches(&parts("GET", "http://svc/search?x=1", &[])));
    }

    #[test]
    fn regex_must_match_the_whole_path() {
        let m = PathMatch::regex("/api/v[0-9]+").unwrap();
        assert!(m.matches("/api/v2"));
        assert!(!m.matches("/api/v2/users"));
        assert!(!m.matches("/x/api/v2"));
        // Alternation stays inside the anchors.
        let m = PathMatch::regex("/a|/b").unwrap();
        assert!(m.matches("/a") && m.matches("/b"));
        assert!(!m.matches("/a/x") && !m.matches("/x/b"));
    }

    #[test]
    fn bad_paths_and_regexes_are_named_in_errors() {
        let err = PathMatch::exact("foo").unwrap_err();
        assert!(matches!(&err, RoutingError::PathNotAbsolute { path } if path == "foo"));
        assert!(err.to_string().contains("\"foo\""));
        let err = PathMatch::prefix("/a?b").unwrap_err();
        assert!(matches!(
            err,
            RoutingError::PathInvalidChar { found: '?', .. }
        ));
        assert!(PathMatch::prefix("/a b").is_err());
        let err = PathMatch::regex("/(unclosed").unwrap_err();
        assert!(err.to_string().contains("\"/(unclosed\""), "{err}");
        // A pattern that only compiles once wrapped must still be refused.
        assert!(PathMatch::regex("a)|(b").is_err());
        assert!(ValueMatch::regex("[").is_err());
    }

    #[test]
    fn header_exact_and_regex() {
        let exact = HeaderMatch::new("X-Canary", ValueMatch::exact("yes")).unwrap();
        let regex = HeaderMatch::new("x-user", ValueMatch::regex("[0-9]+").unwrap()).unwrap();
        assert!(exact.matches(&parts("GET", "/", &[("x-canary", "yes")]).headers));
        assert!(!exact.matches(&parts("GET", "/", &[("x-canary", "Yes")]).headers));
        assert!(!exact.matches(&parts("GET", "/", &[]).headers));
        assert!(regex.matches(&parts("GET", "/", &[("x-user", "42")]).headers));
        assert!(!regex.matches(&parts("GET", "/", &[("x-user", "42a")]).headers));
        assert!(HeaderMatch::new("bad header", ValueMatch::exact("x")).is_err());
    }

    #[test]
    fn repeated_headers_match_as_one_joined_value() {
        let h = parts("GET", "/", &[("x-a", "1"), ("x-a", "2")]).headers;
        assert!(
            HeaderMatch::new("x-a", ValueMatch::exact("1,2"))
                .unwrap()
                .matches(&h)
        );
        assert!(
            !HeaderMatch::new("x-a", ValueMatch::exact("1"))
                .unwrap()
                .matches(&h)
        );
        let c = parts("GET", "/", &[("cookie", "a=1"), ("cookie", "b=2")]).headers;
        let m = HeaderMatch::new("cookie", ValueMatch::regex(".*b=2.*").unwrap()).unwrap();
        assert!(m.matches(&c));
        assert!(
            HeaderMatch::new("cookie", ValueMatch::exact("a=1; b=2"))
                .unwrap()
                .matches(&c)
        );
    }

    #[test]
    fn grpc_request_needs_grpc_content_type_and_two_segments() {
        let ok = parts(
            "POST",
            "/pkg.Greeter/SayHello",
            &[("content-type", "application/grpc+proto")],
        );
        let got = GrpcRequest::from_parts(&ok).unwrap();
        assert_eq!((got.service, got.method), ("pkg.Greeter", "SayHello"));
        let upper = parts("POST", "/s/m", &[("content-type", "Application/GRPC")]);
        assert!(GrpcRequest::from_parts(&upper).is_some());
        for (path, ct) in [
            ("/pkg.Greeter/SayHello", "application/json"),
            ("/pkg.Greeter", "application/grpc"),
            ("/pkg.Greeter/Say/Hello", "application/grpc"),
            ("//SayHello", "application/grpc"),
        ] {
            assert!(
                GrpcRequest::from_parts(&parts("POST", path, &[("content-type", ct)])).is_none()
            );
        }
        assert!(GrpcRequest::from_parts(&parts("POST", "/s/m", &[])).is_none());
    }

    #[test]
    fn grpc_match_on_service_and_method() {
        let req = parts(
            "POST",
            "/pkg.Svc/Get",
            &[("content-type", "application/grpc")],
        );
        let both = GrpcMatch::new(Some("pkg.Svc"), Some("Get")).unwrap();
        let service = GrpcMatch::new(Some("pkg.Svc"), None).unwrap();
        let method = GrpcMatch::new(None, Some("Get")).unwrap();
        let other = GrpcMatch::new(Some("pkg.Svc"), Some("Put")).unwrap();
        let any = GrpcMatch::default();
        let as_route = |g: &GrpcMatch| RouteMatch {
            grpc: Some(g.clone()),
            ..Default::default()
        };
        for g in [&both, &service, &method, &any] {
            assert!(as_route(g).matches(&req), "{g:?}");
        }
        assert!(!as_route(&other).matches(&req));
        // The same path without a gRPC content type is not a gRPC request.
        assert!(!as_route(&both).matches(&parts("POST", "/pkg.Svc/Get", &[])));
        assert!(GrpcMatch::new(Some("a/b"), None).is_err());
        assert!(GrpcMatch::new(None, Some("")).is_err());
    }

    #[test]
    fn all_conditions_must_hold() {
        let m = RouteMatch {
            path: Some(PathMatch::prefix("/api").unwrap()),
            method: Some(Method::POST),
            headers: vec![HeaderMatch::new("x-env", ValueMatch::exact("prod")).unwrap()],
            grpc: None,
        };
        assert!(m.matches(&parts("POST", "/api/x", &[("x-env", "prod")])));
        assert!(!m.matches(&parts("GET", "/api/x", &[("x-env", "prod")])));
        assert!(!m.matches(&parts("POST", "/other", &[("x-env", "prod")])));
        assert!(!m.matches(&parts("POST", "/api/x", &[("x-env", "dev")])));
        assert!(RouteMatch::default().matches(&parts("DELETE", "/anything", &[])));
    }

    #[test]
    fn only_the_first_of_repeated_header_names_counts() {
        let mut m = RouteMatch {
            headers: vec![
                HeaderMatch::new("x-a", ValueMatch::exact("1")).unwrap(),
                HeaderMatch::new("X-A", ValueMatch::exact("2")).unwrap(),
                HeaderMatch::new("x-b", ValueMatch::exact("3")).unwrap(),
            ],
            ..Default::default()
        };
        m.drop_repeated_headers();
        assert_eq!(m.headers.len(), 2);
        assert!(m.matches(&parts("GET", "/", &[("x-a", "1"), ("x-b", "3")])));
    }
}
