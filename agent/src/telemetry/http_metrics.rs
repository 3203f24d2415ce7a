//! HTTP golden metrics with the names Linkerd users already chart:
//! `request_total`, `response_total` (with `classification`, `status_code`
//! and, for gRPC, `grpc_status`), `response_latency_ms`, plus per-route
//! `route_*` series and retry outcomes.
//!
//! A response is classified when its body ends, not when its head arrives:
//! a gRPC call's status usually comes in the trailers, and a response whose
//! body breaks off mid-stream is a failure even though it started as a 200.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::metrics::{BoundedLabel, Direction, NoTlsReason, TlsLabel};
use super::stats::{Edge, Outcome, Stats};
use crate::http::body::{BoxError, ProxyBody};

#[path = "http_series.rs"]
mod series;
use series::{Lookup, OutcomeKey, OutcomeSeries, Series, SeriesCache};

/// Latency buckets (ms), Linkerd's: 1 ms to 50 s.
const LATENCY_BUCKETS_MS: [f64; 19] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1_000.0, 5_000.0, 10_000.0, 50_000.0,
];

/// Who asked for what: the labels every request series carries.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RequestLabels {
    pub direction: Direction,
    /// Outbound: the calling pod; inbound: the pod called.
    pub pod: String,
    /// The `Host`/`:authority` the client used, bounded in cardinality.
    pub authority: String,
    pub service: String,
    pub route: String,
    /// Inbound only: the client's verified identity (Linkerd's
    /// `client_id`), bounded in cardinality.
    pub client_id: Option<String>,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("direction", self.direction.as_str()).encode(encoder.encode_label())?;
        ("pod", self.pod.as_str()).encode(encoder.encode_label())?;
        ("authority", self.authority.as_str()).encode(encoder.encode_label())?;
        ("service", self.service.as_str()).encode(encoder.encode_label())?;
        ("route", self.route.as_str()).encode(encoder.encode_label())?;
        if let Some(id) = &self.client_id {
            ("client_id", id.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A request's labels plus how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ResponseLabels {
    pub request: RequestLabels,
    /// The HTTP status, or 0 when no response head was sent.
    pub status_code: u16,
    pub classification: &'static str,
    /// Only on gRPC responses.
    pub grpc_status: Option<u32>,
    /// How the (last) attempt reached the endpoint.
    pub tls: TlsLabel,
}

impl EncodeLabelSet for ResponseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.request.encode(encoder)?;
        ("status_code", self.status_code).encode(encoder.encode_label())?;
        ("classification", self.classification).encode(encoder.encode_label())?;
        if let Some(g) = self.grpc_status {
            ("grpc_status", g).encode(encoder.encode_label())?;
        }
        self.tls.encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    pub route: String,
    /// `retried`, `recovered` (succeeded after retrying),
    /// `budget_exhausted`, `attempts_exhausted`.
    pub result: &'static str,
}

pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<ResponseLabels, Histogram>,
    retries: Family<RetryLabels, Counter>,
    authorities: BoundedLabel,
    client_ids: BoundedLabel,
    /// The sliding windows of `waymark stat`, fed by the same classification.
    stats: Arc<Stats>,
    /// The families' series, resolved once per label set.
    series: SeriesCache,
}

/// A request being counted: its series and its edge in the windows.
pub struct Counted {
    series: Arc<Series>,
    /// Outbound requests feed `waymark stat`'s windows; inbound ones do not
    /// (the calling agent counts the same request there already).
    edge: Option<Arc<Edge>>,
}

/// Attempts after the first that a response took, and whether one more
/// was wanted but the service's retry budget refused it, carried in its
/// extensions from the retry loop to where the response is counted.
#[derive(Clone, Copy, Debug, Default)]
pub struct Retries {
    pub retries: u32,
    pub budget_exhausted: bool,
}

/// Marks a response as the outcome of `retries` retries, and of a retry
/// the budget refused (no-op for neither).
pub fn retried<B>(
    mut resp: http::Response<B>,
    retries: u32,
    budget_exhausted: bool,
) -> http::Response<B> {
    if retries > 0 || budget_exhausted {
        resp.extensions_mut().insert(Retries {
            retries,
            budget_exhausted,
        });
    }
    resp
}

/// The backend edge ([`Stats::backend_edge`]) a response is also counted
/// on, carried in its extensions from the router to where it is counted.
#[derive(Clone)]
pub struct BackendEdge(pub Arc<Edge>);

impl HttpMetrics {
    /// The edge a request to `service` on `route` sent to `backend` is
    /// counted on too ([`BackendEdge`]).
    pub fn backend_edge(&self, service: &str, route: &str, backend: &str) -> BackendEdge {
        BackendEdge(self.stats.backend_edge(service, route, backend))
    }

    pub fn new(registry: &mut Registry, max_authorities: usize, stats: Arc<Stats>) -> Self {
        let m = HttpMetrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS_MS)),
            retries: Family::default(),
            authorities: BoundedLabel::new(max_authorities),
            client_ids: BoundedLabel::new(max_authorities),
            stats,
            series: SeriesCache::default(),
        };
        registry.register("request", "Total HTTP requests", m.requests.clone());
        registry.register(
            "response",
            "Total HTTP responses, by status and classification (at end of stream)",
            m.responses.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from request to response head, in milliseconds",
            m.latency.clone(),
        );
        registry.register(
            "route_retry",
            "Retry decisions per route: retried, recovered, budget_exhausted, attempts_exhausted",
            m.retries.clone(),
        );
        m
    }

    /// Counts a request; what it returns goes to [`observe`] with the
    /// response.
    pub fn request(
        &self,
        pod: &str,
        authority: Option<&str>,
        service: &str,
        route: &str,
    ) -> Counted {
        let series = self.series_of(Lookup {
            direction: Direction::Outbound,
            pod,
            authority,
            service,
            route,
            client_id: None,
        });
        series.requests.inc();
        let edge = self.edge_of(&series);
        Counted {
            series,
            edge: Some(edge),
        }
    }

    /// Counts a request that arrived through the tunnel for local `pod`
    /// from the verified `client_id`.
    pub fn inbound_request(
        &self,
        pod: &str,
        authority: Option<&str>,
        service: &str,
        client_id: &str,
    ) -> Counted {
        let series = self.series_of(Lookup {
            direction: Direction::Inbound,
            pod,
            authority,
            service,
            route: crate::discovery::DEFAULT_ROUTE,
            client_id: Some(client_id),
        });
        series.requests.inc();
        Counted { series, edge: None }
    }

    /// The series of a request: found by the values it brought when those
    /// are its label values, else resolved through the bounded labels (which
    /// admit a new authority or client id, or name it `overflow`).
    fn series_of(&self, lookup: Lookup<'_>) -> Arc<Series> {
        if let Some(s) = self.series.get(&lookup) {
            return s;
        }
        let labels = RequestLabels {
            direction: lookup.direction,
            pod: lookup.pod.to_string(),
            authority: lookup
                .authority
                .map_or_else(|| "unknown".to_string(), |a| self.authorities.get(a)),
            service: lookup.service.to_string(),
            route: lookup.route.to_string(),
            client_id: lookup.client_id.map(|c| self.client_ids.get(c)),
        };
        self.series
            .get_or_insert(labels, lookup.authority.is_some(), |labels| {
                let requests = self.requests.get_or_create(&labels).clone();
                Series::new(labels, requests)
            })
    }

    /// The series' edge in the windows: the cached one while the windows
    /// still hold it, else looked up (and cached unless it is the overflow
    /// edge, which is looked up per request so overflows are counted).
    fn edge_of(&self, series: &Series) -> Arc<Edge> {
        let mut cached = series.edge();
        if let Some(edge) = self.stats.revive(&cached) {
            return edge;
        }
        let l = &series.labels;
        let edge = self.stats.request_edge(&l.pod, &l.service, &l.route);
        if !self.stats.is_other(&edge) {
            *cached = Arc::downgrade(&edge);
        }
        edge
    }

    pub fn retry(&self, service: &str, route: &str, result: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                service: service.to_string(),
                route: route.to_string(),
                result,
            })
            .inc();
    }

    fn record(&self, series: &Series, outcome: OutcomeKey, latency: Duration) {
        let s = series.outcome(outcome, || {
            let labels = ResponseLabels {
                request: series.labels.clone(),
                status_code: outcome.status_code,
                classification: outcome.classification,
                grpc_status: outcome.grpc_status,
                tls: outcome.tls,
            };
            OutcomeSeries {
                responses: self.responses.get_or_create(&labels).clone(),
                latency: self.latency.get_or_create(&labels).clone(),
            }
        });
        s.responses.inc();
        s.latency.observe(latency.as_secs_f64() * 1000.0);
    }
}

/// Wraps a response on its way to the client so it is counted when its body
/// ends (or is abandoned), classified by status and `grpc-status`.
pub fn observe(
    metrics: Arc<HttpMetrics>,
    request: Counted,
    start: Instant,
    mut resp: http::Response<ProxyBody>,
    grpc: bool,
) -> http::Response<ProxyBody> {
    let status = resp.status().as_u16();
    let head_grpc = grpc_status(resp.headers());
    // Set by the forwarder from the path of the last attempt; none means
    // no upstream connection was tried.
    let tls = resp
        .extensions()
        .get::<TlsLabel>()
        .copied()
        .unwrap_or(TlsLabel::NoIdentity(NoTlsReason::NoConnection));
    let latency = start.elapsed();
    let retries = resp
        .extensions_mut()
        .remove::<Retries>()
        .unwrap_or_default();
    let backend = resp.extensions_mut().remove::<BackendEdge>();
    let (parts, body) = resp.into_parts();
    let observed = Observed {
        inner: body,
        end: Some(End {
            metrics,
            request,
            status,
            grpc,
            grpc_status: head_grpc,
            latency,
            retries,
            backend,
            tls,
        }),
    };
    http::Response::from_parts(parts, observed.boxed())
}

struct End {
    metrics: Arc<HttpMetrics>,
    request: Counted,
    status: u16,
    grpc: bool,
    grpc_status: Option<u32>,
    latency: Duration,
    retries: Retries,
    backend: Option<BackendEdge>,
    tls: TlsLabel,
}

impl End {
    fn finish(self, stream_error: bool) {
        let grpc_status = if self.grpc {
            // A gRPC response without any grpc-status is itself an error
            // (the gRPC spec): report it as UNKNOWN (2).
            Some(self.grpc_status.unwrap_or(2))
        } else {
            None
        };
        let failed = stream_error
            || self.status >= 500
            || self.status == 0
            || grpc_status.is_some_and(|g| g != 0);
        let outcome = OutcomeKey {
            status_code: self.status,
            classification: if failed { "failure" } else { "success" },
            grpc_status,
            tls: self.tls,
        };
        self.metrics
            .record(&self.request.series, outcome, self.latency);
        let counted = Outcome {
            success: !failed,
            latency: self.latency,
            retries: self.retries.retries,
            budget_exhausted: self.retries.budget_exhausted,
            tls: matches!(self.tls, TlsLabel::True),
        };
        if let Some(edge) = &self.request.edge {
            self.metrics.stats.record(edge, counted);
        }
        if let Some(BackendEdge(edge)) = &self.backend {
            self.metrics.stats.record(edge, counted);
        }
    }
}

struct Observed {
    inner: ProxyBody,
    end: Option<End>,
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(end)) = (frame.trailers_ref(), self.end.as_mut())
                    && let Some(g) = grpc_status(trailers)
                {
                    end.grpc_status = Some(g);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(end) = self.end.take() {
                    end.finish(true);
                }
            }
            Poll::Ready(None) => {
                if let Some(end) = self.end.take() {
                    end.finish(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // The client went away before the end of the body: a failure, unless
        // there was nothing left to send.
        if let Some(end) = self.end.take() {
            let complete = self.inner.is_end_stream();
            end.finish(!complete);
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::full;
    use http_body_util::BodyExt;
    use prometheus_client::encoding::text::encode;
    use std::collections::VecDeque;

    fn metrics() -> (Registry, Arc<HttpMetrics>) {
        let mut r = Registry::default();
        let m = Arc::new(HttpMetrics::new(&mut r, 8, Arc::new(Stats::new(8))));
        (r, m)
    }

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        encode(&mut s, r).unwrap();
        s
    }

    #[tokio::test]
    async fn http_response_counted_at_end_of_body() {
        let (r, m) = metrics();
        let labels = m.request("default/a", Some("hello:80"), "hello", "[DEFAULT]");
        let resp = http::Response::builder()
            .status(200)
            .body(full("hi"))
            .unwrap();
        let resp = observe(m.clone(), labels, Instant::now(), resp, false);
        assert!(
            !text(&r).contains("response_total{"),
            "counted before the body ended"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hi");
        let t = text(&r);
        assert!(t.contains(r#"request_total{direction="outbound",pod="default/a",authority="hello:80",service="hello",route="[DEFAULT]"} 1"#), "{t}");
        assert!(
            t.contains(r#"route="[DEFAULT]",status_code="200",classification="success",tls="no_identity",no_tls_reason="no_connection"} 1"#),
            "{t}"
        );
        assert!(!t.contains("grpc_status"), "{t}");
    }

    #[tokio::test]
    async fn grpc_status_in_trailers_classifies_the_call() {
        let (r, m) = metrics();
        let labels = m.request("p", None, "greeter", "[DEFAULT]");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = Frames(frames.into()).boxed();
        let resp = http::Response::builder().status(200).body(body).unwrap();
        let resp = observe(m.clone(), labels, Instant::now(), resp, true);
        let _ = resp.into_body().collect().await.unwrap();
        let t = text(&r);
        assert!(t.contains(r#"authority="unknown""#), "{t}");
        assert!(
            t.contains(
                r#"status_code="200",classification="failure",grpc_status="14",tls="no_identity""#
            ),
            "{t}"
        );
    }

    #[tokio::test]
    async fn abandoned_body_is_a_failure() {
        let (r, m) = metrics();
        let labels = m.request("p", Some("a"), "s", "r");
        let mut resp = http::Response::builder()
            .status(200)
            .body(full("unread"))
            .unwrap();
        resp.extensions_mut().insert(TlsLabel::True);
        drop(observe(m.clone(), labels, Instant::now(), resp, false));
        assert!(text(&r).contains(r#"status_code="200",classification="failure",tls="true"} 1"#));
    }

    #[tokio::test]
    async fn inbound_requests_carry_direction_and_client_id() {
        let (r, m) = metrics();
        let client = "spiffe://cluster.local/ns/default/sa/web";
        let labels = m.inbound_request("default/api", Some("api:80"), "api", client);
        let mut resp = http::Response::builder()
            .status(200)
            .body(full("ok"))
            .unwrap();
        resp.extensions_mut().insert(TlsLabel::True);
        let resp = observe(m.clone(), labels, Instant::now(), resp, false);
        let _ = resp.into_body().collect().await.unwrap();
        let t = text(&r);
        assert!(
            t.contains(&format!(r#"request_total{{direction="inbound",pod="default/api",authority="api:80",service="api",route="[DEFAULT]",client_id="{client}"}} 1"#)),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                r#"client_id="{client}",status_code="200",classification="success",tls="true"}} 1"#
            )),
            "{t}"
        );
        // Not in `waymark stat`'s windows: the calling agent counts it there.
        let window = m.stats.window(Duration::from_secs(10), Instant::now());
        assert!(
            window.edges.iter().all(|(k, _)| k.pod != "default/api"),
            "inbound request fed the windows"
        );
    }

    async fn count(m: &Arc<HttpMetrics>, authority: Option<&str>) {
        let labels = m.request("p", authority, "s", "r");
        let resp = http::Response::new(full("ok"));
        let resp = observe(m.clone(), labels, Instant::now(), resp, false);
        let _ = resp.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn authorities_beyond_the_cap_stay_overflow_on_every_request() {
        let (r, m) = metrics();
        // Eight admitted (the cap), two more beyond it, each asked twice.
        for round in 0..2 {
            for i in 0..10 {
                count(&m, Some(&format!("a{i}:80"))).await;
            }
            count(&m, None).await;
            if round == 1 {
                // Given, but beyond the cap: not the missing authority's
                // `unknown`.
                count(&m, Some("unknown")).await;
            }
        }
        let t = text(&r);
        for i in 0..8 {
            assert!(
                t.contains(&format!(r#"authority="a{i}:80",service="s",route="r"}} 2"#)),
                "{t}"
            );
        }
        assert!(!t.contains(r#"authority="a8:80""#), "{t}");
        assert!(
            t.contains(r#"request_total{direction="outbound",pod="p",authority="overflow",service="s",route="r"} 5"#),
            "{t}"
        );
        assert!(
            t.contains(r#"request_total{direction="outbound",pod="p",authority="unknown",service="s",route="r"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"authority="overflow",service="s",route="r",status_code="200",classification="success",tls="no_identity",no_tls_reason="no_connection"} 5"#),
            "{t}"
        );
        let window = m.stats.window(Duration::from_secs(10), Instant::now());
        let requests: u64 = window.edges.iter().map(|(_, s)| s.counts.requests).sum();
        assert_eq!(requests, 23);
    }

    /// A body that yields the given frames in order.
    struct Frames(VecDeque<Result<Frame<Bytes>, BoxError>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front())
        }
    }
}
