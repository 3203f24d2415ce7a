//! What a tap stream carries: one JSON object a line, `req`, `rsp` and
//! `end` per request and `dropped` when the consumer fell behind, and the
//! text form `waymark tap` prints (Linkerd's `tap` layout).
//!
//! The agent serializes and the CLI parses the same types, so the two can
//! only disagree across versions.

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// What `tls=` says while the data path is plaintext (Linkerd's wording).
pub const TLS_NONE: &str = "no_identity";
/// What `tls=` says for a request that came through the mTLS tunnel.
pub const TLS_TRUE: &str = "true";

/// `proxy=` of a request the agent proxies for one of its pods.
pub const OUTBOUND: &str = super::filter::Direction::Out.as_str();
/// `proxy=` of a request that came through the tunnel for one of its pods.
pub const INBOUND: &str = super::filter::Direction::In.as_str();

/// Request headers kept in a `req` event; more are counted, not shown.
pub const MAX_HEADERS: usize = 32;
/// Longest header value shown, in bytes; longer ones are cut.
pub const MAX_VALUE: usize = 256;
/// What a credential-like header's value is replaced with.
pub use crate::telemetry::policy::REDACTED;

/// The client side of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Src {
    /// Outbound: the pod's address and the client's port. Inbound: the
    /// calling pod's address as the sending agent named it (`forwarded:
    /// for=` of the tunnel stream).
    pub addr: SocketAddr,
    /// The source pod (outbound: always a pod of this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Inbound: the source workload's SPIFFE ID, verified in the tunnel's
    /// client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Where a request went: the endpoint (or, before one was picked, the
/// address the client dialled), the service dialled and the backend
/// service the route chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dst {
    pub addr: SocketAddr,
    pub dialled: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Inbound: the pod of this node the request was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Fields every event of a request repeats, so each line stands alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub id: u64,
    /// The direction, as Linkerd names it: [`OUTBOUND`] (`out`, for a pod
    /// of this node) or [`INBOUND`] (`in`, through the tunnel to one).
    pub proxy: String,
    pub src: Src,
    pub dst: Dst,
    pub tls: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// The kernel's counters of one upstream TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFlow {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub drops: u64,
    pub retransmits: u64,
}

/// One line of a tap stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The request, when the agent sends it to its endpoint (or answers it
    /// itself).
    Req {
        #[serde(flatten)]
        meta: Meta,
        method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority: Option<String>,
        /// Path and query.
        path: String,
        /// Up to [`MAX_HEADERS`], credential-like values redacted.
        headers: Vec<Header>,
        /// Headers beyond [`MAX_HEADERS`], not shown.
        #[serde(default, skip_serializing_if = "is_zero")]
        headers_omitted: usize,
    },
    /// The response head reached the agent (or the agent made its own).
    Rsp {
        #[serde(flatten)]
        meta: Meta,
        status: u16,
        /// From the request's arrival to the response head, µs.
        latency_us: u64,
        /// Where the status came from: `app` or `proxy` (absent from
        /// agents that did not say).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        /// The proxy's reason when `source` is `proxy`: `timeout`,
        /// `no_endpoints`, `connect_failure`, `upstream_reset`,
        /// `bad_request`, `authz`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Attempts after the first this response took.
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        retries: u32,
        /// One more attempt was wanted, but the service's retry budget
        /// refused it: this is the failed attempt's answer.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retry_budget_exhausted: bool,
    },
    /// The response body ended, broke off or was abandoned.
    End {
        #[serde(flatten)]
        meta: Meta,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grpc_status: Option<u32>,
        /// From the request's arrival to the end of the response, µs.
        duration_us: u64,
        response_bytes: u64,
        /// Why the proxy failed the request (its own error response), or
        /// how the response body ended badly.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// What this node's kernel counted on the upstream connection of
        /// the last attempt (when the kernel diagnostics run).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kernel: Option<KernelFlow>,
        /// As in `rsp`: where the status came from, and the proxy's reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An opaque TCP connection (not HTTP, or a port kept opaque) ended.
    Tcp {
        #[serde(flatten)]
        meta: Meta,
        /// Bytes from the client to the destination, and back.
        bytes_out: u64,
        bytes_in: u64,
        duration_us: u64,
        /// How it closed: `eof`, `connect_refused`, `upstream_error`,
        /// `refused` (a connection limit), `idle_timeout`, …
        close: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// `proxy` when the proxy ended it, with its reason as in `rsp`
        /// (`limit`, `no_endpoints`, `connect_failure`, `authz`); absent
        /// when the connection ended on its own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The consumer did not keep up: this many events were dropped (since
    /// the previous `dropped` line) instead of being buffered.
    Dropped { count: u64 },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

impl Event {
    /// The JSON line sent on the wire (with its newline).
    pub fn to_line(&self) -> bytes::Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!("{{\"type\":\"error\",\"message\":\"cannot encode a tap event: {e}\"}}")
                .into_bytes()
        });
        v.push(b'\n');
        v.into()
    }

    /// The line `waymark tap` prints: Linkerd's layout, with `wide` adding
    /// the source pod and the destination service.
    pub fn render(&self, wide: bool) -> String {
        let mut s = String::new();
        match self {
            Event::Req {
                meta,
                method,
                authority,
                path,
                ..
            } => {
                head(&mut s, "req", meta);
                let _ = write!(
                    s,
                    " :method={method} :authority={} :path={path}",
                    authority.as_deref().unwrap_or("")
                );
                tail(&mut s, meta, wide);
            }
            Event::Rsp {
                meta,
                status,
                latency_us,
                source,
                reason,
                retries,
                retry_budget_exhausted,
            } => {
                head(&mut s, "rsp", meta);
                let _ = write!(s, " :status={status}");
                status_source(&mut s, source, reason);
                if *retries > 0 {
                    let _ = write!(s, " retries={retries}");
                }
                if *retry_budget_exhausted {
                    s.push_str(" retry_budget=exhausted");
                }
                let _ = write!(s, " latency={latency_us}µs");
                tail(&mut s, meta, wide);
            }
            Event::End {
                meta,
                grpc_status,
                duration_us,
                response_bytes,
                error,
                kernel,
                source,
                reason,
            } => {
                head(&mut s, "end", meta);
                if let Some(g) = grpc_status {
                    let _ = write!(s, " grpc-status={}", grpc_status_name(*g));
                }
                let _ = write!(
                    s,
                    " duration={duration_us}µs response-length={response_bytes}B"
                );
                status_source(&mut s, source, reason);
                if let Some(e) = error {
                    let _ = write!(s, " error={e:?}");
                }
                if let Some(k) = kernel {
                    let _ = write!(
                        s,
                        " kernel-drops={} kernel-retransmits={} upstream={}->{}",
                        k.drops, k.retransmits, k.local, k.peer
                    );
                }
                tail(&mut s, meta, wide);
            }
            Event::Tcp {
                meta,
                bytes_out,
                bytes_in,
                duration_us,
                close,
                error,
                source,
                reason,
            } => {
                head(&mut s, "tcp", meta);
                let _ = write!(
                    s,
                    " bytes-out={bytes_out}B bytes-in={bytes_in}B duration={duration_us}µs close={close}"
                );
                status_source(&mut s, source, reason);
                if let Some(e) = error {
                    let _ = write!(s, " error={e:?}");
                }
                tail(&mut s, meta, wide);
            }
            Event::Dropped { count } => {
                let _ = write!(
                    s,
                    "dropped {count} events (this tap fell behind; the agent drops events rather than buffer them)"
                );
            }
        }
        s
    }
}

/// ` source=app`, or ` source=proxy reason=timeout`.
fn status_source(s: &mut String, source: &Option<String>, reason: &Option<String>) {
    if let Some(src) = source {
        let _ = write!(s, " source={src}");
    }
    if let Some(r) = reason {
        let _ = write!(s, " reason={r}");
    }
}

fn head(s: &mut String, kind: &str, m: &Meta) {
    let _ = write!(
        s,
        "{kind} id={} proxy={} src={} dst={} tls={}",
        m.id, m.proxy, m.src.addr, m.dst.addr, m.tls
    );
}

fn tail(s: &mut String, m: &Meta, wide: bool) {
    if wide {
        let _ = write!(
            s,
            " src_pod={} dst_service={}",
            m.src.pod.as_deref().unwrap_or("-"),
            m.dst
                .backend
                .as_deref()
                .or(m.dst.service.as_deref())
                .unwrap_or("-")
        );
        // Inbound only: who the certificate says called, which pod answered.
        if let Some(id) = &m.src.identity {
            let _ = write!(s, " src_identity={id}");
        }
        if let Some(pod) = &m.dst.pod {
            let _ = write!(s, " dst_pod={pod}");
        }
    }
}

/// gRPC status codes by name, as `linkerd tap` prints them.
pub fn grpc_status_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| code.to_string(), |n| (*n).to_string())
}

/// Whether a header's value is a credential (or as good as one) and must
/// never leave the agent: `authorization`, `cookie` and their kin, and any
/// name that says token, secret, password, session, API key or signature.
pub fn is_sensitive(name: &str) -> bool {
    const EXACT: [&str; 6] = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "www-authenticate",
        "proxy-authenticate",
    ];
    const PARTS: [&str; 10] = [
        "authorization",
        "token",
        "secret",
        "password",
        "passwd",
        "session",
        "api-key",
        "apikey",
        "credential",
        "signature",
    ];
    let n = name.to_ascii_lowercase();
    EXACT.contains(&n.as_str()) || PARTS.iter().any(|p| n.contains(p))
}

/// The value a header is shown with: redacted when [`is_sensitive`] (an
/// `Authorization` scheme such as `Bearer` is kept: it is no secret and
/// tells which kind of credential was sent), else as text cut at
/// [`MAX_VALUE`] bytes.
pub fn shown_value(name: &str, value: &[u8]) -> String {
    if is_sensitive(name) {
        let n = name.to_ascii_lowercase();
        if n.ends_with("authorization")
            && let Some((scheme, _)) = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().split_once(' '))
            && !scheme.is_empty()
            && scheme.len() <= 32
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return format!("{scheme} {REDACTED}");
        }
        return REDACTED.to_string();
    }
    if value.len() <= MAX_VALUE {
        return String::from_utf8_lossy(value).into_owned();
    }
    let mut cut = MAX_VALUE;
    // Cut on a character boundary of the lossy text.
    while cut > 0 && (value[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    format!(
        "{}…(+{} bytes)",
        String::from_utf8_lossy(&value[..cut]),
        value.len() - cut
    )
}

/// The headers a `req` event shows, and how many were left out.
pub fn shown_headers(headers: &http::HeaderMap) -> (Vec<Header>, usize) {
    let shown: Vec<Header> = headers
        .iter()
        .take(MAX_HEADERS)
        .map(|(n, v)| Header {
            name: n.as_str().to_string(),
            value: shown_value(n.as_str(), v.as_bytes()),
        })
        .collect();
    let omitted = headers.len().saturating_sub(shown.len());
    (shown, omitted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            id: 3,
            proxy: "out".into(),
            src: Src {
                addr: "10.1.0.2:40142".parse().unwrap(),
                pod: Some("default/web-1".into()),
                identity: None,
            },
            dst: Dst {
                addr: "10.2.0.2:8080".parse().unwrap(),
                dialled: "10.96.0.10:80".parse().unwrap(),
                service: Some("hello".into()),
                backend: Some("hello-v1".into()),
                pod: None,
            },
            tls: TLS_NONE.into(),
        }
    }

    #[test]
    fn lines_read_like_linkerd_tap() {
        let req = Event::Req {
            meta: meta(),
            method: "GET".into(),
            authority: Some("hello".into()),
            path: "/hello".into(),
            headers: vec![],
            headers_omitted: 0,
        };
        assert_eq!(
            req.render(false),
            "req id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity :method=GET :authority=hello :path=/hello"
        );
        let rsp = Event::Rsp {
            meta: meta(),
            status: 200,
            latency_us: 1234,
            source: Some("app".into()),
            reason: None,
            retries: 0,
            retry_budget_exhausted: false,
        };
        assert_eq!(
            rsp.render(false),
            "rsp id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity :status=200 source=app latency=1234µs"
        );
        let proxied = Event::Rsp {
            meta: meta(),
            status: 503,
            latency_us: 12,
            source: Some("proxy".into()),
            reason: Some("no_endpoints".into()),
            retries: 0,
            retry_budget_exhausted: false,
        };
        assert_eq!(
            proxied.render(false),
            "rsp id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity :status=503 source=proxy reason=no_endpoints latency=12µs"
        );
        let refused = Event::Rsp {
            meta: meta(),
            status: 500,
            latency_us: 40,
            source: Some("app".into()),
            reason: None,
            retries: 1,
            retry_budget_exhausted: true,
        };
        assert_eq!(
            refused.render(false),
            "rsp id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity :status=500 source=app retries=1 retry_budget=exhausted latency=40µs"
        );
        let v: serde_json::Value = serde_json::from_slice(&refused.to_line()).unwrap();
        assert_eq!(
            (&v["retries"], &v["retry_budget_exhausted"]),
            (&serde_json::json!(1), &serde_json::json!(true))
        );
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), refused);
        let v: serde_json::Value = serde_json::from_slice(&proxied.to_line()).unwrap();
        assert_eq!(
            (&v["source"], &v["reason"]),
            (
                &serde_json::json!("proxy"),
                &serde_json::json!("no_endpoints")
            )
        );
        let end = Event::End {
            meta: meta(),
            grpc_status: Some(14),
            duration_us: 20,
            response_bytes: 5,
            error: Some("no endpoints available".into()),
            kernel: None,
            source: Some("proxy".into()),
            reason: Some("no_endpoints".into()),
        };
        assert_eq!(
            end.render(true),
            "end id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity grpc-status=Unavailable duration=20µs response-length=5B source=proxy reason=no_endpoints error=\"no endpoints available\" src_pod=default/web-1 dst_service=hello-v1"
        );
        assert!(
            Event::Dropped { count: 7 }
                .render(false)
                .starts_with("dropped 7 events")
        );
        let tcp = Event::Tcp {
            meta: meta(),
            bytes_out: 100,
            bytes_in: 200,
            duration_us: 30,
            close: "eof".into(),
            error: None,
            source: None,
            reason: None,
        };
        assert_eq!(
            tcp.render(false),
            "tcp id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity bytes-out=100B bytes-in=200B duration=30µs close=eof"
        );
        let refused = Event::Tcp {
            meta: meta(),
            bytes_out: 0,
            bytes_in: 0,
            duration_us: 0,
            close: "refused".into(),
            error: Some("outbound.max_connections_per_pod (2) reached".into()),
            source: Some("proxy".into()),
            reason: Some("limit".into()),
        };
        assert_eq!(
            refused.render(false),
            "tcp id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity bytes-out=0B bytes-in=0B duration=0µs close=refused source=proxy reason=limit error=\"outbound.max_connections_per_pod (2) reached\""
        );
    }

    #[test]
    fn events_round_trip_through_json_lines() {
        let (headers, omitted) = shown_headers(&{
            let mut h = http::HeaderMap::new();
            h.insert("x-app", "1".parse().unwrap());
            h
        });
        let events = [
            Event::Req {
                meta: meta(),
                method: "POST".into(),
                authority: None,
                path: "/a?b=c".into(),
                headers,
                headers_omitted: omitted,
            },
            Event::End {
                meta: meta(),
                grpc_status: None,
                duration_us: 1,
                response_bytes: 0,
                error: None,
                kernel: Some(KernelFlow {
                    local: "10.0.0.1:40512".parse().unwrap(),
                    peer: "10.2.0.2:8080".parse().unwrap(),
                    drops: 1,
                    retransmits: 3,
                }),
                source: Some("app".into()),
                reason: None,
            },
            Event::Dropped { count: 2 },
        ];
        for e in events {
            let line = e.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            let text = std::str::from_utf8(&line).unwrap();
            assert_eq!(text.matches('\n').count(), 1, "{text}");
            let back: Event = serde_json::from_str(text).unwrap();
            assert_eq!(back, e);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&Event::Dropped { count: 2 }.to_line()).unwrap();
        assert_eq!(v, serde_json::json!({"type": "dropped", "count": 2}));
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            shown_value("Authorization", b"Bearer s3cr3t"),
            "Bearer <redacted>"
        );
        assert_eq!(
            shown_value("proxy-authorization", b"Basic dXNlcjpwYXNz"),
            "Basic <redacted>"
        );
        assert_eq!(shown_value("authorization", b"s3cr3t"), REDACTED);
        assert_eq!(shown_value("authorization", b"we!rd s3cr3t"), REDACTED);
        for name in [
            "cookie",
            "Set-Cookie",
            "x-api-key",
            "X-Auth-Token",
            "x-csrf-token",
            "x-amz-security-token",
            "x-client-secret",
            "x-session-id",
            "x-db-password",
            "x-forwarded-authorization",
            "x-hub-signature-256",
        ] {
            assert!(is_sensitive(name), "{name}");
            assert_eq!(
                shown_value(name, b"session=abc; s3cr3t"),
                REDACTED,
                "{name}"
            );
        }
        for name in [
            "x-request-id",
            "user-agent",
            "accept",
            "host",
            "content-type",
        ] {
            assert!(!is_sensitive(name), "{name}");
        }
        assert_eq!(shown_value("x-request-id", b"abc"), "abc");
    }

    #[test]
    fn long_values_and_many_headers_are_cut() {
        let long = "é".repeat(200); // 400 bytes
        let shown = shown_value("x-long", long.as_bytes());
        assert!(shown.starts_with("éé"));
        assert!(shown.ends_with("…(+144 bytes)"), "{shown}");
        assert!(
            !shown.contains('\u{FFFD}'),
            "cut inside a character: {shown}"
        );
        let mut h = http::HeaderMap::new();
        for i in 0..40 {
            h.insert(
                http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                "v".parse().unwrap(),
            );
        }
        h.insert("authorization", "Bearer s3cr3t".parse().unwrap());
        let (shown, omitted) = shown_headers(&h);
        assert_eq!(shown.len(), MAX_HEADERS);
        assert_eq!(omitted, 41 - MAX_HEADERS);
        let json = serde_json::to_string(&shown).unwrap();
        assert!(!json.contains("s3cr3t"));
    }

    #[test]
    fn inbound_lines_say_in_and_name_the_peer_and_the_pod() {
        let meta = Meta {
            id: 9,
            proxy: INBOUND.into(),
            src: Src {
                addr: "10.1.0.2:40142".parse().unwrap(),
                pod: None,
                identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
            },
            dst: Dst {
                addr: "10.2.0.2:8080".parse().unwrap(),
                dialled: "10.2.0.2:8080".parse().unwrap(),
                service: Some("hello".into()),
                backend: None,
                pod: Some("default/hello-1".into()),
            },
            tls: TLS_TRUE.into(),
        };
        let rsp = Event::Rsp {
            meta,
            status: 500,
            latency_us: 77,
            source: Some("app".into()),
            reason: None,
            retries: 0,
            retry_budget_exhausted: false,
        };
        assert_eq!(
            rsp.render(false),
            "rsp id=9 proxy=in src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=true :status=500 source=app latency=77µs"
        );
        assert_eq!(
            rsp.render(true),
            "rsp id=9 proxy=in src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=true :status=500 source=app latency=77µs src_pod=- dst_service=hello src_identity=spiffe://cluster.local/ns/default/sa/web dst_pod=default/hello-1"
        );
        let v: serde_json::Value = serde_json::from_slice(&rsp.to_line()).unwrap();
        assert_eq!(v["proxy"], "in");
        assert_eq!(
            v["src"]["identity"],
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(v["dst"]["pod"], "default/hello-1");
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), rsp);
    }

    #[test]
    fn grpc_status_names() {
        assert_eq!(grpc_status_name(0), "OK");
        assert_eq!(grpc_status_name(14), "Unavailable");
        assert_eq!(grpc_status_name(99), "99");
    }
}
