//! Routing and sending one request: service → route → backend → endpoint,
//! with the route's timeouts and retries.
//!
//! Balancing is per request, not per connection: a gRPC client that keeps
//! one HTTP/2 connection open still has its calls spread over every
//! endpoint (istio #56864). Each attempt picks an endpoint anew, so a retry
//! goes to the endpoint the balancer now prefers, usually another one.
//!
//! The request path is a loop over stages, one concern per file:
//! [`pick`] chooses the endpoint and the way to it, [`timeout`] bounds each
//! attempt by the per-try timeout and the route's deadline, [`attempt`]
//! sends it once (on a pooled connection, or a new one), [`record`] writes
//! down what the attempt taught (the balancer's estimate, the endpoint's
//! last error, the connection table, tap, the trace), [`retry`] decides
//! whether to go again, [`budget`] whether the service may afford it.
//! What diagnostics a request carries (a tap subscription, a trace context)
//! rides in its extensions, so the stages record into it without knowing
//! whether anyone looks.
//!
//! Retries need the request body again. When the route has a retry policy,
//! the body streams to the first attempt while a copy of up to
//! `proxy.retry_buffer_bytes` is kept (`replay`), so chunked uploads and
//! gRPC calls (which carry no `content-length`) are retryable too; a body
//! known to be larger streams without a copy and is tried once.
//! Non-idempotent methods (POST, PATCH) are retried only after a failure to
//! connect, when the endpoint cannot have seen them, or on a gRPC status the
//! route lists (gRPC calls are all POSTs; the route's conditions are the
//! operator's statement that those failures are safe to repeat).

mod attempt;
mod budget;
mod passthrough;
mod pick;
mod record;
mod retry;
mod timeout;
mod upgrade;

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use tracing::{Instrument, debug, debug_span};

use crate::config::services::ProtocolHint;
use crate::diagnostics::tap;
use crate::discovery::{DEFAULT_ROUTE, Discovery, RoutePolicy, Service};
use crate::http::body::ProxyBody;
use crate::http::errors::{self, ProxyError, StatusSource};
use crate::http::headers::wants_upgrade;
use crate::http::message::{authority, finish, is_grpc, take_upstream_request, upstream_request};
use crate::http::pool::{Pool, Version};
use crate::identity::SpiffeId;
use crate::telemetry::http_metrics::{HttpMetrics, observe, retried};
use crate::telemetry::trace;
use crate::transport::netns::PodNetns;

use attempt::Used;
use retry::{Decision, RequestBody};
use timeout::Deadline;

/// Per downstream connection: who is calling and what they dialled.
pub struct ConnCtx {
    /// The calling pod: its name, its network namespace (where its direct
    /// upstream connections are made, `outbound.dial_from = "pod"`) and
    /// its workload identity (mTLS on and one declared). Shared, not
    /// copied: an idle connection's context is part of what it costs.
    pub pod_info: Arc<super::PodInfo>,
    pub client: SocketAddr,
    /// The pod's own address and the client's port (the `forwarded: for=`
    /// of tunnel streams), when the pod's address is known.
    pub source_addr: Option<SocketAddr>,
    pub dst: SocketAddr,
    pub version: Version,
    /// Its entry in the connection table (`waymark conns`): kept while a
    /// request of the connection, or a connection it was upgraded to, runs.
    pub live: Arc<crate::telemetry::conns::ConnGuard>,
}

impl ConnCtx {
    pub fn pod(&self) -> &str {
        &self.pod_info.name
    }

    pub fn netns(&self) -> Option<&PodNetns> {
        self.pod_info.netns.as_ref()
    }

    pub fn identity(&self) -> Option<&SpiffeId> {
        self.pod_info.identity.as_ref()
    }
}

/// Shared by every HTTP connection of the agent.
pub struct HttpProxy {
    pub node: String,
    pub metrics: Arc<HttpMetrics>,
    pub discovery: Arc<Discovery>,
    pub pool: Arc<Pool>,
    pub retry_buffer: usize,
    /// Node-wide bound on buffered bytes (retry copies, `TRACE` bodies).
    pub buffer_budget: Arc<crate::http::budget::BufferBudget>,
    /// Streams per HTTP/2 connection and the idle timeout of pods' HTTP
    /// connections.
    pub limits: crate::config::LimitsConfig,
    /// Counts connections closed by a limit, per pod.
    pub limit_closed: prometheus_client::metrics::family::Family<
        crate::telemetry::metrics::RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Counts what a limit refused a pod on an open connection (HTTP/2
    /// streams), per pod.
    pub limit_refused: prometheus_client::metrics::family::Family<
        crate::telemetry::metrics::RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub tap: Arc<tap::TapHub>,
    /// What the kernel saw on upstream connections, for diagnostic traces.
    pub kernel: Option<Arc<crate::kernel::KernelDiag>>,
}

/// Where a request goes: the service dialled, the route that matched and
/// the backend service it picked.
#[derive(Clone, Copy)]
struct Target<'a> {
    service: &'a Service,
    backend: &'a Service,
    route_name: &'a str,
    route: &'a RoutePolicy,
    /// The request's span, for fields known later (the endpoint): recorded
    /// on the handle, not looked up as the current span (a lookup in the
    /// subscriber's per-thread stack on every request, even when the span
    /// is disabled).
    span: &'a tracing::Span,
}

impl HttpProxy {
    /// Handles one request from a pod. Never fails: problems become the
    /// proxy's own error responses.
    pub async fn handle(&self, ctx: &ConnCtx, req: Request<ProxyBody>) -> Response<ProxyBody> {
        let table = self.discovery.current();
        let Some(service) = table.by_addr(&ctx.dst).cloned() else {
            // The service went away in a reload while this connection was
            // open; its requests still go where they were dialled.
            return Box::pin(self.passthrough(ctx, req)).await;
        };
        // Routes match on the request's head: split it off for the match
        // (a move, where a copy would clone every header per request).
        let (head, body) = req.into_parts();
        let (route_name, route, match_index) = match service.routes.select(&head) {
            Some((r, i)) => (r.name.as_str(), &r.value, i),
            None => (DEFAULT_ROUTE, &service.default_route, 0),
        };
        let req = Request::from_parts(head, body);
        // HTTP/2 streams run in tasks of their own, outside the connection's
        // span, so the request span names the caller itself. It is a debug
        // span: at the default level its fields are never formatted, which
        // the bench profile showed to cost ~3% of the L7 path.
        let span = debug_span!(
            "request",
            pod = %ctx.pod(),
            src = %ctx.client,
            dst = %ctx.dst,
            method = %req.method(),
            path = req.uri().path(),
            service = %service.name,
            route = route_name,
            endpoint = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let grpc = is_grpc(&req);
        let labels = self
            .metrics
            .request(ctx.pod(), authority(&req), &service.name, route_name);
        let start = Instant::now();
        let mut req = req;
        let tapped = self.tap.request(
            ctx.pod(),
            ctx.client,
            ctx.dst,
            Some(&service.name),
            &mut req,
        );
        let trace_mode = trace::mode(req.method(), req.headers());
        let recorder = trace_mode.map(|_| {
            trace::Recorder::new(trace::Context {
                node: self.node.clone(),
                direction: "outbound",
                dialled: Some(ctx.dst),
                service: Some(service.name.clone()),
                route: Some(route_name.to_string()),
                route_match: route.match_descriptions.get(match_index).cloned(),
                backends: route.backends.iter().map(|(n, w)| (n.clone(), w)).collect(),
                ..Default::default()
            })
        });
        if let Some(r) = &recorder {
            req.extensions_mut().insert(r.clone());
        }
        // Fields learnt later are recorded on this handle (a clone of the
        // span: nothing at all when it is disabled), not on the current
        // span, which is a lookup in the subscriber's per-thread stack.
        let recorded = span.clone();
        // Pinned where it is made, so that instrumenting it moves a pointer
        // rather than the request's whole future.
        let request = std::pin::pin!(async {
            let resp = if trace_mode == Some(trace::Mode::Body) && !trace::forwardable(&mut req) {
                // Max-Forwards reached 0: this hop is the final recipient
                // (RFC 9110 §7.6.2) and answers with the request it got.
                trace::reflect(&req)
            } else {
                let backend_name = route.backends.pick_random();
                trace::record(req.extensions(), |c| {
                    c.chosen_backend = Some(backend_name.clone())
                });
                match table.by_name(backend_name).cloned() {
                    Some(backend) => {
                        let target = Target {
                            service: &service,
                            backend: &backend,
                            route_name,
                            route,
                            span: &recorded,
                        };
                        let mut resp = self.route(ctx, target, req, grpc, start).await;
                        resp.extensions_mut().insert(self.metrics.backend_edge(
                            &service.name,
                            route_name,
                            &backend.name,
                        ));
                        resp
                    }
                    None => self.error(
                        ProxyError::NoEndpoints,
                        &service.name,
                        Some("route backend is not a service"),
                        grpc,
                    ),
                }
            };
            recorded.record("status", resp.status().as_u16());
            let resp = match (trace_mode, recorder) {
                (Some(mode), Some(recorder)) => {
                    let mut c = recorder.take();
                    c.duration = start.elapsed();
                    c.kernel = record::kernel_line(self.kernel.as_ref(), c.upstream);
                    c.result = Some((resp.status().as_u16(), StatusSource::of(&resp)));
                    Box::pin(trace::add_context(
                        resp,
                        mode,
                        &c,
                        self.buffer_budget.account(ctx.pod()),
                    ))
                    .await
                }
                _ => resp,
            };
            let resp = tap::response(tapped, resp);
            observe(self.metrics.clone(), labels, start, resp, grpc)
        });
        request.instrument(span).await
    }

    /// The request path proper: attempts on endpoints of `target.backend`
    /// until one answers for good, the route's deadline passes, or the
    /// retry policy or the service's budget says stop. `grpc`: the request
    /// is a gRPC call (its errors are answered as gRPC statuses), as
    /// `handle` read it; `start`: when the request arrived (one clock read
    /// serves the request's latency, the route's deadline and the first
    /// attempt's start).
    ///
    /// A plain function returning an `async move` block, not an `async fn`
    /// (which keeps its arguments twice in its state): this state is part of
    /// every request's future, which is moved into its box per request.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn route<'a>(
        &'a self,
        ctx: &'a ConnCtx,
        target: Target<'a>,
        req: Request<ProxyBody>,
        grpc: bool,
        start: Instant,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send + 'a {
        async move {
            let Target {
                service,
                backend,
                route,
                span,
                ..
            } = target;
            tap::routed(req.extensions(), &backend.name);
            trace::record(req.extensions(), |t| {
                t.endpoints = backend.balancer.endpoints().map(|e| e.addr).collect();
            });
            let deadline = Deadline::new(route, start);
            let version = upstream_version(backend.protocol, ctx.version);
            if ctx.version == Version::Http1 && wants_upgrade(req.headers()) {
                let split = (backend.name != service.name).then_some(backend.name.as_str());
                // Rare, and its future is large: boxed, so that every
                // request's future is not sized for it (the same below).
                return Box::pin(self.upgrade(ctx, backend, split, req)).await;
            }
            let (mut parts, body) = req.into_parts();
            let mut body = RequestBody::new(
                route,
                body,
                self.retry_buffer,
                &self.buffer_budget,
                ctx.pod(),
            );
            budget::deposit(service, start);
            let mut attempt = 0u32;
            // Endpoints already tried, to avoid on a retry. Each attempt's
            // endpoint joins them only when another attempt follows, so a
            // request answered at once allocates nothing for them.
            let mut tried: Vec<SocketAddr> = Vec::new();
            let mut last: Option<SocketAddr> = None;

            loop {
                attempt += 1;
                let Some(req_body) = body.next() else {
                    // Unreachable: a streamed body is never retried.
                    return self.error(
                        ProxyError::BadRequest,
                        &service.name,
                        Some("body already sent"),
                        grpc,
                    );
                };
                let now = if attempt == 1 { start } else { Instant::now() };
                tried.extend(last.take());
                let Some(picked) =
                    pick::endpoint(self, ctx, backend, &tried, now, &parts.extensions)
                else {
                    return self.error(ProxyError::NoEndpoints, &backend.name, None, grpc);
                };
                let pick::Picked { pick, key } = picked;
                let addr = key.addr;
                last = Some(addr);
                if attempt == 1 {
                    span.record("endpoint", tracing::field::display(addr));
                }
                let upstream = if body.is_single() {
                    take_upstream_request(&mut parts, req_body, version)
                } else {
                    upstream_request(&parts, req_body, version)
                };
                let mut used = Used::default();
                let outcome = {
                    let attempt = pin!(self.attempt(ctx, &key, version, upstream, &mut used));
                    deadline.bound(now, addr, attempt).await
                };
                let ended = Instant::now();
                let (observed, result) = record::attempt(
                    self,
                    ctx,
                    target,
                    pick,
                    &key,
                    &used,
                    (now, ended),
                    outcome,
                    &parts.extensions,
                );
                let decision =
                    retry::decide(route, attempt, &body, &parts.method, observed, &deadline);
                let decision = budget::allow(decision, service, ended);
                record::decision(&self.metrics, target, decision, attempt, observed);
                if decision == Decision::Retry {
                    retry::back_off(route, attempt, &deadline, observed, addr).await;
                    continue;
                }
                // How this last attempt was carried: the response's `tls`
                // label and the trace's peer identity.
                let peer_identity = key.path.peer_identity();
                if let Some(id) = peer_identity {
                    trace::record(&parts.extensions, |t| {
                        t.peer_identity = Some(id.to_string())
                    });
                }
                let mut resp = match result {
                    Ok(resp) => {
                        let mut resp = finish(resp);
                        if peer_identity.is_some() {
                            errors::mark_peer_answer(&mut resp);
                        }
                        resp
                    }
                    Err((error, detail)) => {
                        // The whole-request deadline passing is a timeout even if
                        // the last attempt failed otherwise.
                        let error = if deadline.passed(Instant::now()) {
                            ProxyError::Timeout
                        } else {
                            error
                        };
                        self.error(error, &backend.name, Some(&detail), grpc)
                    }
                };
                resp.extensions_mut().insert(key.path.tls());
                return retried(resp, attempt - 1, decision == Decision::BudgetExhausted);
            }
        }
    }

    /// The proxy's own answer, for the client of `service`.
    fn error(
        &self,
        err: ProxyError,
        service: &str,
        detail: Option<&str>,
        grpc: bool,
    ) -> Response<ProxyBody> {
        debug!(
            error = err.reason(),
            detail = detail.unwrap_or(""),
            "proxy error response"
        );
        errors::response(err, &self.node, service, detail, grpc)
    }
}

/// Which protocol to speak upstream: what the service says, else what the
/// client spoke.
fn upstream_version(hint: ProtocolHint, downstream: Version) -> Version {
    match hint {
        ProtocolHint::Http2 | ProtocolHint::Grpc => Version::Http2,
        ProtocolHint::Http1 => Version::Http1,
        ProtocolHint::Auto | ProtocolHint::Opaque => downstream,
    }
}
