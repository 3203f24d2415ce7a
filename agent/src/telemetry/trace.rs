//! Diagnostic tracing, the way Linkerd 1 users know it: a request with
//! method `TRACE` and `l5d-add-context: true` (or `waymark-add-context:
//! true`) is routed like any other, and every agent it crosses appends a
//! block to the response body saying what it did — so the innermost hop's
//! block comes first and the outermost last. For other methods the same
//! facts come back as one `l5d-context` response header per hop.
//!
//! Every fact is recorded from the live decision as it is made (the route
//! that matched, the endpoint the balancer picked with its estimate at that
//! moment, each attempt's result), never recomputed afterwards.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::HeaderMap;

use crate::http::errors::StatusSource;

mod respond;

pub use respond::{add_context, forwardable, reflect};

/// Headers that ask for context.
pub const ADD_CONTEXT_HEADERS: [&str; 2] = ["l5d-add-context", "waymark-add-context"];
/// The response header carrying one hop's context for non-TRACE requests.
pub const CONTEXT_HEADER: &str = "l5d-context";

/// How much context the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `TRACE` with the header: a block appended to the body.
    Body,
    /// Another method with the header: a response header.
    Header,
}

/// Whether the request asks for context, and how.
/// `None` too when `diagnostics.trace_context = "deny"`: the request is
/// then forwarded like any other.
pub fn mode(method: &http::Method, headers: &HeaderMap) -> Option<Mode> {
    if !super::policy::trace_context_allowed() {
        return None;
    }
    let asked = ADD_CONTEXT_HEADERS.iter().any(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    });
    match (asked, method == http::Method::TRACE) {
        (false, _) => None,
        (true, true) => Some(Mode::Body),
        (true, false) => Some(Mode::Header),
    }
}

/// A traced request's [`Context`] while it is routed, carried in the
/// request's extensions: each stage of the request path records what it
/// decided with [`record`], which does nothing for the (nearly all)
/// requests that carry none, instead of every stage taking an
/// `Option<&mut Context>` and branching on it.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Context>>);

impl Recorder {
    pub fn new(context: Context) -> Self {
        Recorder(Arc::new(Mutex::new(context)))
    }

    /// The context as recorded so far.
    pub fn take(&self) -> Context {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Records into the trace context of the request whose extensions these
/// are, if it is traced.
pub fn record(extensions: &http::Extensions, f: impl FnOnce(&mut Context)) {
    if let Some(r) = extensions.get::<Recorder>() {
        f(&mut r.0.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// One try of the request.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub endpoint: SocketAddr,
    /// `503`, `200`, or an error such as `connection refused`.
    pub result: String,
}

/// The endpoint the balancer chose, as it looked at that moment.
#[derive(Debug, Clone)]
pub struct Selected {
    pub addr: SocketAddr,
    /// The pod behind the address, when the endpoint names it.
    pub pod: Option<String>,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The endpoint's declared workload identity.
    pub identity: Option<String>,
    /// Shown only when it is not the default 1.
    pub weight: u32,
    pub ewma: Duration,
    pub in_flight: usize,
}

/// Everything one hop records about one request.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub node: String,
    pub direction: &'static str,
    pub dialled: Option<SocketAddr>,
    pub service: Option<String>,
    pub route: Option<String>,
    /// How the route matched, e.g. `path prefix /hello`.
    pub route_match: Option<String>,
    /// `(backend service, weight)` of the route.
    pub backends: Vec<(String, u32)>,
    pub chosen_backend: Option<String>,
    pub endpoints: Vec<SocketAddr>,
    pub selected: Option<Selected>,
    pub attempts: Vec<AttemptRecord>,
    pub duration: Duration,
    /// The identity of the peer agent the request went to through the mTLS
    /// tunnel (verified in the handshake); `None` for plaintext.
    pub peer_identity: Option<String>,
    /// The upstream connection of the last attempt: (local, peer).
    pub upstream: Option<(SocketAddr, SocketAddr)>,
    /// What this node's kernel counted on that connection.
    pub kernel: Option<KernelFlow>,
    /// The status sent back and where it came from.
    pub result: Option<(u16, StatusSource)>,
}

/// The `result:` of a hop: the status and its source, `source=app` or
/// `source=proxy` with the proxy's reason (`503 source=proxy
/// reason=no_endpoints (no endpoints available)`).
pub fn result_text(status: u16, source: StatusSource) -> String {
    match source {
        StatusSource::App => format!("{status} source=app"),
        StatusSource::Proxy(e) => {
            format!("{status} source=proxy reason={} ({})", e.code(), e.reason())
        }
    }
}

/// The same for the one-line header: `; status=503; source=proxy;
/// reason=no_endpoints`.
pub(crate) fn result_fields(h: &mut String, status: u16, source: StatusSource) {
    let _ = write!(h, "; status={status}; source={}", source.label());
    if let Some(r) = source.reason_code() {
        let _ = write!(h, "; reason={r}");
    }
}

/// The kernel's counters of one upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFlow {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub drops: u64,
    pub retransmits: u64,
}

impl Context {
    /// The block appended to a TRACE response body.
    pub fn render_block(&self) -> String {
        let mut b = String::new();
        let _ = writeln!(b, "--- waymark {} {} ---", self.node, self.direction);
        let _ = writeln!(b, "request duration: {}", ms(self.duration));
        match (&self.service, self.dialled) {
            (Some(s), Some(d)) => {
                let _ = writeln!(b, "service name: {s} (dialled {d})");
            }
            (None, Some(d)) => {
                let _ = writeln!(b, "service name: none (dialled {d}, forwarded as dialled)");
            }
            (Some(s), None) => {
                let _ = writeln!(b, "service name: {s}");
            }
            (None, None) => {}
        }
        if let Some(route) = &self.route {
            match &self.route_match {
                Some(m) => {
                    let _ = writeln!(b, "route: {route} ({m})");
                }
                None => {
                    let _ = writeln!(b, "route: {route}");
                }
            }
        }
        let _ = writeln!(b, "resolution:");
        if let (Some(d), Some(s)) = (self.dialled, &self.service) {
            let _ = writeln!(b, "  {d} -> service {s}");
        }
        if let (Some(route), Some(chosen)) = (&self.route, &self.chosen_backend) {
            let backends: Vec<String> = self
                .backends
                .iter()
                .map(|(name, w)| format!("{name} ({w})"))
                .collect();
            let _ = writeln!(
                b,
                "  route {route} -> backends {} -> {chosen}",
                backends.join(", ")
            );
        }
        if let Some(chosen) = &self.chosen_backend {
            let eps: Vec<String> = self.endpoints.iter().map(|e| e.to_string()).collect();
            let _ = writeln!(b, "  {chosen} endpoints: [{}]", eps.join(", "));
        }
        match &self.selected {
            Some(s) => {
                let pod = s
                    .pod
                    .as_deref()
                    .map(|p| format!("pod {p}, "))
                    .unwrap_or_default();
                let node = s.node.as_deref().unwrap_or("node unknown");
                let zone = s
                    .zone
                    .as_deref()
                    .map(|z| format!(", zone {z}"))
                    .unwrap_or_default();
                let identity = s
                    .identity
                    .as_deref()
                    .map(|i| format!(", identity {i}"))
                    .unwrap_or_default();
                let weight = if s.weight == 1 {
                    String::new()
                } else {
                    format!(", weight {}", s.weight)
                };
                let _ = writeln!(
                    b,
                    "selected address: {} ({pod}{node}{zone}{identity}{weight}, ewma {}, {} in flight)",
                    s.addr,
                    ms(s.ewma),
                    s.in_flight
                );
            }
            None => {
                let _ = writeln!(b, "selected address: none");
            }
        }
        let retries = self.attempts.len().saturating_sub(1);
        if retries == 0 {
            let _ = writeln!(b, "retries: 0");
        } else {
            let earlier: Vec<String> = self.attempts[..retries]
                .iter()
                .enumerate()
                .map(|(i, a)| format!("try {}: {} from {}", i + 1, a.result, a.endpoint))
                .collect();
            let _ = writeln!(b, "retries: {retries} ({})", earlier.join("; "));
        }
        if let Some((status, source)) = self.result {
            let _ = writeln!(b, "result: {}", result_text(status, source));
        }
        let _ = writeln!(
            b,
            "peer identity: {}",
            self.peer_identity.as_deref().unwrap_or("none (plaintext)")
        );
        if let Some(k) = &self.kernel {
            let _ = writeln!(
                b,
                "kernel: {} drops, {} retransmits on {}\u{2192}{}",
                k.drops, k.retransmits, k.local, k.peer
            );
        }
        b
    }

    /// The one-line form for the `l5d-context` header.
    pub fn render_header(&self) -> String {
        let mut h = format!(
            "node={}; direction={}; duration_ms={:.3}",
            self.node,
            self.direction,
            self.duration.as_secs_f64() * 1000.0
        );
        if let Some(s) = &self.service {
            let _ = write!(h, "; service={s}");
        }
        if let Some(r) = &self.route {
            let _ = write!(h, "; route={r}");
        }
        if let Some(c) = &self.chosen_backend {
            let _ = write!(h, "; backend={c}");
        }
        if let Some(s) = &self.selected {
            let _ = write!(h, "; endpoint={}", s.addr);
        }
        let _ = write!(h, "; retries={}", self.attempts.len().saturating_sub(1));
        if let Some((status, source)) = self.result {
            result_fields(&mut h, status, source);
        }
        if let Some(id) = &self.peer_identity {
            let _ = write!(h, "; peer_identity={id}");
        }
        if let Some(k) = &self.kernel {
            let _ = write!(
                h,
                "; kernel_drops={}; kernel_retransmits={}",
                k.drops, k.retransmits
            );
        }
        h
    }
}

/// One hop's context, however that hop renders it: the outbound
/// [`Context`] or the inbound side's (`diagnostics::inbound_trace`).
pub trait Hop {
    /// The block appended to a TRACE response body.
    fn block(&self) -> String;
    /// The one-line `l5d-context` header value.
    fn header(&self) -> String;
}

impl Hop for Context {
    fn block(&self) -> String {
        self.render_block()
    }
    fn header(&self) -> String {
        self.render_header()
    }
}

pub(crate) fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Context {
        Context {
            node: "node-a".into(),
            direction: "outbound",
            dialled: Some("10.96.0.10:80".parse().unwrap()),
            service: Some("hello".into()),
            route: Some("get-hello".into()),
            route_match: Some("path prefix /hello".into()),
            backends: vec![("hello-v1".into(), 90), ("hello-v2".into(), 10)],
            chosen_backend: Some("hello-v1".into()),
            endpoints: vec![
                "10.1.2.5:8080".parse().unwrap(),
                "10.1.3.7:8080".parse().unwrap(),
            ],
            selected: Some(Selected {
                addr: "10.1.3.7:8080".parse().unwrap(),
                pod: None,
                node: Some("node-b".into()),
                zone: None,
                identity: None,
                weight: 1,
                ewma: Duration::from_micros(1200),
                in_flight: 0,
            }),
            attempts: vec![
                AttemptRecord {
                    endpoint: "10.1.2.5:8080".parse().unwrap(),
                    result: "503".into(),
                },
                AttemptRecord {
                    endpoint: "10.1.3.7:8080".parse().unwrap(),
                    result: "200".into(),
                },
            ],
            duration: Duration::from_millis(3),
            peer_identity: None,
            upstream: None,
            kernel: None,
            result: None,
        }
    }

    #[test]
    fn the_result_says_where_the_status_came_from() {
        use crate::http::errors::ProxyError;
        let mut c = sample();
        c.result = Some((500, StatusSource::App));
        let block = c.render_block();
        assert!(
            block.contains("retries: 1 (try 1: 503 from 10.1.2.5:8080)\nresult: 500 source=app\n"),
            "{block}"
        );
        assert!(
            c.render_header()
                .ends_with("; retries=1; status=500; source=app"),
            "{}",
            c.render_header()
        );
        c.result = Some((503, StatusSource::Proxy(ProxyError::NoEndpoints)));
        assert!(
            c.render_block().contains(
                "result: 503 source=proxy reason=no_endpoints (no endpoints available)\n"
            ),
            "{}",
            c.render_block()
        );
        assert!(
            c.render_header()
                .ends_with("; status=503; source=proxy; reason=no_endpoints")
        );
    }

    #[test]
    fn the_kernel_line_names_the_upstream_flow() {
        let mut c = sample();
        c.kernel = Some(KernelFlow {
            local: "10.1.0.1:43122".parse().unwrap(),
            peer: "10.2.0.2:8080".parse().unwrap(),
            drops: 0,
            retransmits: 3,
        });
        let block = c.render_block();
        assert!(
            block.ends_with(
                "peer identity: none (plaintext)\nkernel: 0 drops, 3 retransmits on 10.1.0.1:43122\u{2192}10.2.0.2:8080\n"
            ),
            "{block}"
        );
        assert!(
            c.render_header()
                .ends_with("; kernel_drops=0; kernel_retransmits=3")
        );
    }

    #[test]
    fn block_has_every_fact() {
        let block = sample().render_block();
        assert_eq!(
            block,
            "--- waymark node-a outbound ---\n\
             request duration: 3.00 ms\n\
             service name: hello (dialled 10.96.0.10:80)\n\
             route: get-hello (path prefix /hello)\n\
             resolution:\n\
             \x20 10.96.0.10:80 -> service hello\n\
             \x20 route get-hello -> backends hello-v1 (90), hello-v2 (10) -> hello-v1\n\
             \x20 hello-v1 endpoints: [10.1.2.5:8080, 10.1.3.7:8080]\n\
             selected address: 10.1.3.7:8080 (node-b, ewma 1.20 ms, 0 in flight)\n\
             retries: 1 (try 1: 503 from 10.1.2.5:8080)\n\
             peer identity: none (plaintext)\n"
        );
    }

    #[test]
    fn zone_and_weight_show_when_set() {
        let mut c = sample();
        if let Some(s) = c.selected.as_mut() {
            s.zone = Some("zone-b".into());
            s.pod = Some("default/hello-7".into());
            s.identity = Some("spiffe://cluster.local/ns/default/sa/hello".into());
            s.weight = 3;
        }
        assert!(c.render_block().contains(
            "selected address: 10.1.3.7:8080 (pod default/hello-7, node-b, zone zone-b, identity spiffe://cluster.local/ns/default/sa/hello, weight 3, ewma 1.20 ms, 0 in flight)\n"
        ));
    }

    #[test]
    fn header_is_one_line() {
        let h = sample().render_header();
        assert_eq!(
            h,
            "node=node-a; direction=outbound; duration_ms=3.000; service=hello; route=get-hello; backend=hello-v1; endpoint=10.1.3.7:8080; retries=1"
        );
        assert!(http::HeaderValue::from_str(&h).is_ok());
        let tunnelled = Context {
            peer_identity: Some("spiffe://cluster.local/ns/waymark-system/sa/node-b".into()),
            ..sample()
        };
        assert!(
            tunnelled
                .render_header()
                .ends_with("; peer_identity=spiffe://cluster.local/ns/waymark-system/sa/node-b")
        );
        assert!(
            tunnelled
                .render_block()
                .ends_with("peer identity: spiffe://cluster.local/ns/waymark-system/sa/node-b\n")
        );
    }

    #[test]
    fn mode_needs_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(mode(&http::Method::TRACE, &h), None);
        h.insert("l5d-add-context", "true".parse().unwrap());
        assert_eq!(mode(&http::Method::TRACE, &h), Some(Mode::Body));
        assert_eq!(mode(&http::Method::GET, &h), Some(Mode::Header));
        let mut h = HeaderMap::new();
        h.insert("waymark-add-context", "TRUE".parse().unwrap());
        assert_eq!(mode(&http::Method::GET, &h), Some(Mode::Header));
        h.insert("waymark-add-context", "false".parse().unwrap());
        assert_eq!(mode(&http::Method::GET, &h), None);
    }
}
