//! Routing and sending one request: service → route → backend → endpoint,
//! with the route's timeouts and retries.
//!
//! Balancing is per request, not per connection: a gRPC client that keeps
//! one HTTP/2 connection open still has its calls spread over every
//! endpoint (istio #56864). Each attempt picks an endpoint anew, so a retry
//! goes to the endpoint the balancer now prefers, usually another one.
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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Body;
use tracing::{Instrument, debug, debug_span};

use crate::config::services::ProtocolHint;
use crate::diagnostics::http_metrics::{HttpMetrics, observe, retried};
use crate::diagnostics::{tap, trace};
use crate::discovery::{DEFAULT_ROUTE, Discovery, Endpoint, RoutePolicy, Service};
use crate::http::body::{ProxyBody, empty, full, prefixed};
use crate::http::errors::{self, ProxyError, StatusSource};
use crate::http::headers::{strip_hop_by_hop, wants_upgrade};
use crate::http::replay::ReplayBody;
use crate::identity::SpiffeId;
use crate::retry::{Outcome, is_idempotent};
use crate::transport::http_pool::{ConnectError, Key, Pool, SendError, Version};
use crate::transport::netns::PodNetns;
use crate::transport::tunnel::{ConnectHeaders, REQUEST_ID};
use crate::transport::upstream::new_request_id;

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
    pub live: Arc<crate::diagnostics::conns::ConnGuard>,
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
        crate::diagnostics::metrics::RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Counts what a limit refused a pod on an open connection (HTTP/2
    /// streams), per pod.
    pub limit_refused: prometheus_client::metrics::family::Family<
        crate::diagnostics::metrics::RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub tap: Arc<tap::TapHub>,
    /// What the kernel saw on upstream connections, for diagnostic traces.
    pub kernel: Option<Arc<crate::kernel::KernelDiag>>,
}

/// How one attempt ended.
enum Attempt {
    Response(Response<ProxyBody>),
    Failed {
        error: ProxyError,
        detail: String,
        observed: Outcome,
    },
}

/// What an attempt learned about the upstream connection it used.
#[derive(Default)]
struct Used {
    /// Its local address (none through the tunnel), for the kernel's
    /// per-flow counters.
    local: Option<SocketAddr>,
    /// How long making it took, when it was made for this attempt.
    connect: Option<Duration>,
}

/// Where a request goes: the service dialled, the route that matched and
/// the backend service it picked.
#[derive(Clone, Copy)]
struct Target<'a> {
    service: &'a Service,
    backend: &'a Service,
    route_name: &'a str,
    route: &'a RoutePolicy,
}

/// What happens after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// The response (or failure) goes to the client.
    Done,
    Retry,
    /// Retryable, but the service's retry budget is spent.
    BudgetExhausted,
    /// Retryable, but the route's attempts are used up.
    AttemptsExhausted,
}

/// The request body: streamed once, or replayable for retries.
enum RequestBody {
    Stream(Option<ProxyBody>),
    Replay(ReplayBody<ProxyBody>),
}

impl RequestBody {
    fn next(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Stream(b) => b.take(),
            RequestBody::Replay(b) => Some(b.replay().boxed()),
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            RequestBody::Stream(_) => false,
            RequestBody::Replay(b) => b.can_replay(),
        }
    }
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
        let mut context = trace_mode.map(|_| trace::Context {
            node: self.node.clone(),
            direction: "outbound",
            dialled: Some(ctx.dst),
            service: Some(service.name.clone()),
            route: Some(route_name.to_string()),
            route_match: route.match_descriptions.get(match_index).cloned(),
            backends: route.backends.iter().map(|(n, w)| (n.clone(), w)).collect(),
            ..Default::default()
        });
        async {
            let resp = if trace_mode == Some(trace::Mode::Body) && !forwardable_trace(&mut req) {
                // Max-Forwards reached 0: this hop is the final recipient
                // (RFC 9110 §7.6.2) and answers with the request it got.
                reflect(&req)
            } else {
                let backend_name = route.backends.pick_random();
                if let Some(c) = context.as_mut() {
                    c.chosen_backend = Some(backend_name.clone());
                }
                match table.by_name(backend_name).cloned() {
                    Some(backend) => {
                        let target = Target {
                            service: &service,
                            backend: &backend,
                            route_name,
                            route,
                        };
                        let mut resp = self.route(ctx, target, req, context.as_mut()).await;
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
            tracing::Span::current().record("status", resp.status().as_u16());
            let resp = match (trace_mode, context) {
                (Some(mode), Some(mut c)) => {
                    c.duration = start.elapsed();
                    c.kernel = self.kernel_line(c.upstream);
                    c.result = Some((resp.status().as_u16(), StatusSource::of(&resp)));
                    Box::pin(add_context(
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
        }
        .instrument(span)
        .await
    }

    async fn route(
        &self,
        ctx: &ConnCtx,
        target: Target<'_>,
        req: Request<ProxyBody>,
        mut trace: Option<&mut trace::Context>,
    ) -> Response<ProxyBody> {
        let Target {
            service,
            backend,
            route_name,
            route,
        } = target;
        let grpc = is_grpc(&req);
        tap::routed(req.extensions(), &backend.name);
        if let Some(t) = trace.as_deref_mut() {
            t.endpoints = backend.balancer.endpoints().map(|e| e.addr).collect();
        }
        let start = Instant::now();
        let deadline = route.timeout.map(|t| start + t);
        let version = upstream_version(backend.protocol, ctx.version);
        if ctx.version == Version::Http1 && wants_upgrade(req.headers()) {
            let split = (backend.name != service.name).then_some(backend.name.as_str());
            // Rare, and its future is large: boxed, so that every
            // request's future is not sized for it (the same below).
            return Box::pin(self.upgrade(ctx, backend, split, req)).await;
        }
        let (parts, body) = req.into_parts();
        let mut body = match &route.retry {
            Some(_) if may_fit(&body, self.retry_buffer) => RequestBody::Replay(ReplayBody::new(
                body,
                self.retry_buffer,
                self.buffer_budget.account(ctx.pod()),
            )),
            _ => RequestBody::Stream(Some(body)),
        };
        service.budget.deposit(start);
        let mut attempt = 0u32;
        let mut tried: Vec<SocketAddr> = Vec::new();

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
            let now = Instant::now();
            let Some(pick) = backend
                .balancer
                .pick_avoiding(now, |e| tried.contains(&e.addr))
            else {
                return self.error(ProxyError::NoEndpoints, &backend.name, None, grpc);
            };
            let addr = pick.endpoint().addr;
            let path = self
                .pool
                .upstreams()
                .path(ctx.identity(), pick.endpoint().node.as_deref());
            tap::dispatched(
                &parts.extensions,
                &backend.name,
                addr,
                pick.endpoint().pod.as_deref(),
                path.tls().value(),
            );
            tried.push(addr);
            if attempt == 1 {
                tracing::Span::current().record("endpoint", tracing::field::display(addr));
            }
            if let Some(t) = trace.as_deref_mut() {
                t.selected = Some(trace::Selected {
                    addr,
                    pod: pick.endpoint().pod.as_deref().map(String::from),
                    node: pick.endpoint().node.as_deref().map(String::from),
                    zone: pick.endpoint().zone.as_deref().map(String::from),
                    identity: pick.endpoint().identity.as_deref().map(String::from),
                    weight: pick.endpoint().weight,
                    ewma: pick.stats().ewma(now),
                    in_flight: pick.stats().in_flight().saturating_sub(1),
                });
            }
            if pick.is_panic() {
                debug!(%addr, "every endpoint is ejected; trying the one that recovers first");
            } else if pick.is_probe() {
                debug!(%addr, "probing an ejected endpoint");
            }
            let upstream = upstream_request(&parts, req_body, version);
            let remaining = deadline.map(|d| d.saturating_duration_since(now));
            let limit = match (route.per_try_timeout, remaining) {
                (Some(p), Some(r)) => Some(p.min(r)),
                (p, r) => p.or(r),
            };
            let key = Key::new(addr, path, ctx.netns());
            let mut used = Used::default();
            let outcome = match limit {
                Some(limit) => {
                    match tokio::time::timeout(
                        limit,
                        self.attempt(ctx, &key, version, upstream, &mut used),
                    )
                    .await
                    {
                        Ok(o) => o,
                        Err(_) => Attempt::Failed {
                            error: ProxyError::Timeout,
                            detail: timeout_detail(
                                addr,
                                route.per_try_timeout,
                                route.timeout,
                                remaining,
                            ),
                            observed: Outcome::Timeout,
                        },
                    }
                }
                None => self.attempt(ctx, &key, version, upstream, &mut used).await,
            };
            ctx.live.set_upstream(
                (backend.name != service.name).then_some(backend.name.as_str()),
                addr,
                key.path.peer_identity(),
                used.local.map(|l| (l, addr)),
            );
            if let Some(l) = used.local {
                tap::upstream_connection(&parts.extensions, l, addr, self.kernel.as_ref());
                if let Some(t) = trace.as_deref_mut() {
                    t.upstream = Some((l, addr));
                }
            }
            // The latency sample starts once a connection is had: setup is
            // recorded on its own (see `balance`, "New endpoints").
            let elapsed = match used.connect {
                Some(took) => {
                    pick.stats().record_connect(took);
                    now.elapsed().saturating_sub(took)
                }
                None => now.elapsed(),
            };
            let (observed, result) = match outcome {
                Attempt::Response(resp) => {
                    let observed = observed_in(&resp);
                    if let Some(t) = trace.as_deref_mut() {
                        t.attempts.push(trace::AttemptRecord {
                            endpoint: addr,
                            result: resp.status().as_u16().to_string(),
                        });
                    }
                    let failed = resp.status().is_server_error();
                    if failed {
                        let error = format!("the endpoint answered {}", resp.status().as_u16());
                        pick.stats().record_error(SystemTime::now(), &error);
                    }
                    pick.complete(Instant::now(), elapsed, !failed);
                    (observed, Ok(resp))
                }
                Attempt::Failed {
                    error,
                    detail,
                    observed,
                } => {
                    pick.stats().record_error(SystemTime::now(), &detail);
                    pick.complete(Instant::now(), elapsed, false);
                    if let Some(t) = trace.as_deref_mut() {
                        t.attempts.push(trace::AttemptRecord {
                            endpoint: addr,
                            result: detail.clone(),
                        });
                    }
                    (Some(observed), Err((error, detail)))
                }
            };
            let decision = match observed {
                None => Decision::Done,
                Some(o) => self.may_retry(route, attempt, &body, &parts.method, o, deadline),
            };
            let decision = match decision {
                Decision::Retry if !service.budget.try_withdraw(Instant::now()) => {
                    Decision::BudgetExhausted
                }
                d => d,
            };
            match decision {
                Decision::Retry => self.metrics.retry(&service.name, route_name, "retried"),
                Decision::BudgetExhausted => {
                    self.metrics
                        .retry(&service.name, route_name, "budget_exhausted")
                }
                Decision::AttemptsExhausted => {
                    self.metrics
                        .retry(&service.name, route_name, "attempts_exhausted")
                }
                Decision::Done if attempt > 1 && observed.is_none() => {
                    self.metrics.retry(&service.name, route_name, "recovered")
                }
                Decision::Done => {}
            }
            if decision == Decision::Retry {
                let policy = route.retry.as_ref().expect("may_retry checked the policy");
                let mut delay = policy.backoff.delay(attempt, rand::random::<f64>());
                if let Some(d) = deadline {
                    delay = delay.min(d.saturating_duration_since(Instant::now()));
                }
                debug!(attempt, ?observed, ?delay, %addr, "retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
            // How this last attempt was carried: the response's `tls`
            // label and the trace's peer identity.
            if let (Some(t), Some(id)) = (trace.as_deref_mut(), key.path.peer_identity()) {
                t.peer_identity = Some(id.to_string());
            }
            let mut resp = match result {
                Ok(resp) => {
                    let mut resp = finish(resp);
                    if key.path.peer_identity().is_some() {
                        errors::mark_peer_answer(&mut resp);
                    }
                    resp
                }
                Err((error, detail)) => {
                    // The whole-request deadline passing is a timeout even if
                    // the last attempt failed otherwise.
                    let error = if deadline.is_some_and(|d| Instant::now() >= d) {
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

    /// Whether a failed attempt is retried (before asking the budget).
    fn may_retry(
        &self,
        route: &RoutePolicy,
        attempt: u32,
        body: &RequestBody,
        method: &http::Method,
        observed: Outcome,
        deadline: Option<Instant>,
    ) -> Decision {
        let Some(policy) = &route.retry else {
            return Decision::Done;
        };
        // Every gRPC call is a POST; a gRPC status is the server's own
        // verdict, and a route that lists that code (e.g. `unavailable`)
        // declares the call safe to repeat, as Linkerd's and Envoy's gRPC
        // retry policies do.
        let safe = is_idempotent(method)
            || observed == Outcome::ConnectFailure
            || matches!(observed, Outcome::GrpcStatus(_));
        let retryable = body.can_replay()
            && safe
            && deadline.is_none_or(|d| Instant::now() < d)
            && policy.on.iter().any(|c| c.applies_to(observed));
        if !retryable {
            Decision::Done
        } else if attempt > policy.attempts {
            Decision::AttemptsExhausted
        } else {
            Decision::Retry
        }
    }

    /// What the kernel counted on the upstream connection (local, peer).
    fn kernel_line(&self, upstream: Option<(SocketAddr, SocketAddr)>) -> Option<trace::KernelFlow> {
        let (local, peer) = upstream?;
        let counters = self
            .kernel
            .as_ref()?
            .flow_counters(local, peer)
            .unwrap_or_default();
        Some(trace::KernelFlow {
            local,
            peer,
            drops: counters.drops,
            retransmits: counters.retransmits,
        })
    }

    /// One try against one endpoint, along `key.path`; `used` learns about
    /// the connection it used, also when the try is cut short by a timeout.
    async fn attempt(
        &self,
        ctx: &ConnCtx,
        key: &Key,
        version: Version,
        req: Request<ProxyBody>,
        used: &mut Used,
    ) -> Attempt {
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
                let conn = match Box::pin(self.pool.connect_new(key, version, headers())).await {
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

    /// A request to an address that is no longer a service: sent where it
    /// was dialled, once.
    async fn passthrough(&self, ctx: &ConnCtx, req: Request<ProxyBody>) -> Response<ProxyBody> {
        let grpc = is_grpc(&req);
        let labels = self
            .metrics
            .request(ctx.pod(), authority(&req), "unknown", DEFAULT_ROUTE);
        let start = Instant::now();
        let mut req = req;
        let tapped = self
            .tap
            .request(ctx.pod(), ctx.client, ctx.dst, None, &mut req);
        let (parts, body) = req.into_parts();
        let upstream = upstream_request(&parts, body, ctx.version);
        let key = Key::new(
            ctx.dst,
            self.pool.upstreams().path(ctx.identity(), None),
            ctx.netns(),
        );
        ctx.live
            .set_upstream(None, ctx.dst, key.path.peer_identity(), None);
        let mut resp = match self
            .attempt(ctx, &key, ctx.version, upstream, &mut Used::default())
            .await
        {
            Attempt::Response(resp) => finish(resp),
            Attempt::Failed { error, detail, .. } => {
                self.error(error, &ctx.dst.to_string(), Some(&detail), grpc)
            }
        };
        resp.extensions_mut().insert(key.path.tls());
        let resp = tap::response(tapped, resp);
        observe(self.metrics.clone(), labels, start, resp, grpc)
    }

    /// HTTP/1.1 `Upgrade` (WebSocket): forwarded with its upgrade headers;
    /// on `101 Switching Protocols` both connections are handed over to a
    /// byte copy.
    async fn upgrade(
        &self,
        ctx: &ConnCtx,
        backend: &Service,
        split: Option<&str>,
        mut req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let Some(pick) = backend.balancer.pick(Instant::now()) else {
            return self.error(ProxyError::NoEndpoints, &backend.name, None, false);
        };
        let Endpoint { addr, node, .. } = pick.endpoint().clone();
        drop(pick);
        let key = Key::new(
            addr,
            self.pool.upstreams().path(ctx.identity(), node.as_deref()),
            ctx.netns(),
        );
        ctx.live
            .set_upstream(split, addr, key.path.peer_identity(), None);
        let live = ctx.live.clone();
        let downstream = crate::http::h1::upgrade::on(&mut req);
        let (parts, body) = req.into_parts();
        let mut upstream = Request::from_parts(parts.clone(), body);
        *upstream.uri_mut() = origin_form(&parts.uri);
        strip_hop_by_hop(upstream.headers_mut(), true);
        let mut resp = match self
            .attempt(ctx, &key, Version::Http1, upstream, &mut Used::default())
            .await
        {
            Attempt::Response(r) => r,
            Attempt::Failed { error, detail, .. } => {
                let mut resp = self.error(error, &backend.name, Some(&detail), false);
                resp.extensions_mut().insert(key.path.tls());
                return resp;
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let mut resp = finish(resp);
            resp.extensions_mut().insert(key.path.tls());
            return resp;
        }
        let upstream_upgrade = crate::http::h1::upgrade::on_response(&mut resp);
        tokio::spawn(
            async move {
                // Listed in `waymark conns` until the copy ends.
                let _live = live;
                match tokio::try_join!(downstream, upstream_upgrade) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (d, u);
                        match tokio::io::copy_bidirectional(&mut d, &mut u).await {
                            Ok((up, down)) => debug!(
                                bytes_out = up,
                                bytes_in = down,
                                "upgraded connection closed"
                            ),
                            Err(e) => debug!(error = %e, "upgraded connection failed"),
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade did not complete"),
                }
            }
            .instrument(tracing::Span::current()),
        );
        let (parts, _) = resp.into_parts();
        let mut resp = Response::from_parts(parts, empty());
        resp.extensions_mut().insert(key.path.tls());
        resp
    }

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

/// Largest response body a TRACE block is appended to; a bigger one is
/// passed on untouched with the context in a header instead.
const MAX_TRACE_BODY: usize = 1024 * 1024;

/// Decrements `Max-Forwards` on a TRACE; false when it is already 0 and
/// the request must not be forwarded.
pub(crate) fn forwardable_trace<B>(req: &mut Request<B>) -> bool {
    let Some(n) = req
        .headers()
        .get(header::MAX_FORWARDS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return true;
    };
    if n == 0 {
        return false;
    }
    req.headers_mut()
        .insert(header::MAX_FORWARDS, HeaderValue::from(n - 1));
    true
}

/// The final recipient's answer to a TRACE: the request as received.
pub(crate) fn reflect<B>(req: &Request<B>) -> Response<ProxyBody> {
    let mut msg = format!("{} {} {:?}\r\n", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        msg.push_str(name.as_str());
        msg.push_str(": ");
        msg.push_str(&String::from_utf8_lossy(value.as_bytes()));
        msg.push_str("\r\n");
    }
    msg.push_str("\r\n");
    let mut resp = Response::new(full(msg));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/http"),
    );
    resp
}

/// Adds this hop's context to a response: appended to the body for TRACE
/// (Content-Length fixed up by rebuilding the body), a header otherwise,
/// and also when the body outgrows [`MAX_TRACE_BODY`] or `account` cannot
/// get its bytes from the node-wide budget.
pub(crate) async fn add_context(
    resp: Response<ProxyBody>,
    mode: trace::Mode,
    context: &(impl trace::Hop + Sync),
    mut account: crate::http::budget::Account,
) -> Response<ProxyBody> {
    let (mut parts, mut body) = resp.into_parts();
    // A body of unknown length (chunked, HTTP/2 without content-length)
    // is read up to the limit too.
    if mode == trace::Mode::Body
        && body
            .size_hint()
            .upper()
            .is_none_or(|n| n <= MAX_TRACE_BODY as u64)
    {
        // Read by hand rather than through `Limited`: its boxed error type
        // trips the compiler's Send inference inside hyper's h2 executor.
        // Trailers, which a TRACE response has no use for, are dropped.
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let mut over = false;
                    if let Ok(data) = frame.into_data() {
                        over = !account.grow(data.len());
                        bytes.extend_from_slice(&data);
                    }
                    if over || bytes.len() > MAX_TRACE_BODY {
                        // Too big after all, or the node's budget is
                        // spent: what was read goes on first, the rest as
                        // it comes, the context in a header.
                        if let Ok(v) = HeaderValue::from_str(&context.header()) {
                            parts.headers.append(trace::CONTEXT_HEADER, v);
                        }
                        return Response::from_parts(parts, prefixed(bytes.into(), body));
                    }
                }
                Err(e) => {
                    let note =
                        format!("waymark: the response body broke off while tracing it: {e}\n");
                    bytes.extend_from_slice(note.as_bytes());
                    break;
                }
            }
        }
        bytes.extend_from_slice(context.block().as_bytes());
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, full(bytes));
    }
    if let Ok(v) = HeaderValue::from_str(&context.header()) {
        parts.headers.append(trace::CONTEXT_HEADER, v);
    }
    Response::from_parts(parts, body)
}

/// The authority the client addressed: `:authority` (HTTP/2, absolute
/// URIs) or `Host`.
pub(crate) fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Whether a body may fit the replay buffer: not known to be larger.
fn may_fit(body: &ProxyBody, limit: usize) -> bool {
    body.is_end_stream() || body.size_hint().lower() <= limit as u64
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

/// The upstream copy of a request: hop-by-hop headers removed, the URI and
/// `Host`/`:authority` put in the form the upstream protocol wants, the
/// authority the client used preserved either way.
pub(crate) fn upstream_request(
    parts: &http::request::Parts,
    body: ProxyBody,
    version: Version,
) -> Request<ProxyBody> {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    strip_hop_by_hop(req.headers_mut(), false);
    match version {
        Version::Http1 => {
            *req.version_mut() = http::Version::HTTP_11;
            *req.uri_mut() = origin_form(&parts.uri);
            if let Some(a) = &authority
                && !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(a)
            {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        Version::Http2 => {
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

pub(crate) fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|p| Uri::from(p.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

/// Why an attempt timed out, naming the timeout as configured (`1s`), not
/// what was left of it when the attempt started: the per-try timeout when
/// it was the shorter, else the route's.
fn timeout_detail(
    addr: SocketAddr,
    per_try: Option<Duration>,
    total: Option<Duration>,
    remaining: Option<Duration>,
) -> String {
    let shown = |d: Duration| humantime::format_duration(d).to_string();
    match (per_try, total) {
        (Some(p), _) if remaining.is_none_or(|r| p <= r) => {
            format!(
                "no response from {addr} within the per-try timeout {}",
                shown(p)
            )
        }
        (_, Some(t)) => format!(
            "no response from {addr} within the route's timeout {}",
            shown(t)
        ),
        (Some(p), None) => {
            format!(
                "no response from {addr} within the per-try timeout {}",
                shown(p)
            )
        }
        (None, None) => format!("no response from {addr}"),
    }
}

/// What a response says for retry purposes; `None` is a success.
fn observed_in<B>(resp: &Response<B>) -> Option<Outcome> {
    if let Some(code) = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        && code != 0
    {
        return Some(Outcome::GrpcStatus(code));
    }
    resp.status()
        .is_server_error()
        .then(|| Outcome::Status(resp.status().as_u16()))
}

/// The endpoint's response, on its way to the client.
pub(crate) fn finish(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, body)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_trace_body_the_budget_cannot_hold_passes_with_the_context_in_a_header() {
        let budget =
            crate::http::budget::BufferBudget::new(65536, Default::default(), Default::default());
        let context = trace::Context {
            node: "node0".into(),
            direction: "outbound",
            ..Default::default()
        };
        let body = vec![b'x'; 1000];
        // With room: the block is appended to the body.
        let resp = Response::new(full(body.clone()));
        let resp = add_context(resp, trace::Mode::Body, &context, budget.account("p")).await;
        assert!(resp.headers().get(trace::CONTEXT_HEADER).is_none());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(bytes.len() > body.len() && bytes.starts_with(&body));
        assert_eq!(budget.in_use(), 0, "the buffered body is given back");
        // Without: the body passes untouched, the context in a header.
        let mut hog = budget.account("default/hog");
        assert!(hog.grow(65536 - 10));
        let resp = Response::new(full(body.clone()));
        let resp = add_context(resp, trace::Mode::Body, &context, budget.account("p")).await;
        assert!(resp.headers().get(trace::CONTEXT_HEADER).is_some());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], &body[..]);
    }

    #[test]
    fn timeouts_read_as_configured() {
        let addr: SocketAddr = "10.2.0.2:8080".parse().unwrap();
        let s = Duration::from_secs;
        // The route's 1s, with 999.990589ms of it left when the try began.
        let left = Some(Duration::from_nanos(999_990_589));
        assert_eq!(
            timeout_detail(addr, None, Some(s(1)), left),
            "no response from 10.2.0.2:8080 within the route's timeout 1s"
        );
        assert_eq!(
            timeout_detail(addr, Some(Duration::from_millis(250)), Some(s(1)), left),
            "no response from 10.2.0.2:8080 within the per-try timeout 250ms"
        );
        // A later try cut short by the route's deadline names the route's.
        assert_eq!(
            timeout_detail(
                addr,
                Some(Duration::from_millis(250)),
                Some(s(1)),
                Some(Duration::from_millis(100))
            ),
            "no response from 10.2.0.2:8080 within the route's timeout 1s"
        );
        assert_eq!(
            timeout_detail(addr, Some(Duration::from_millis(1500)), None, None),
            "no response from 10.2.0.2:8080 within the per-try timeout 1s 500ms"
        );
    }

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
}
