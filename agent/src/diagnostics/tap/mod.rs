//! Live tap, as `linkerd viz tap` has it: an operator streams the requests
//! the agent is proxying right now, in both directions, filtered, as
//! `req`/`rsp`/`end` events (see [`event`]), from the admin API's
//! `GET /tap` (`waymark tap`).
//!
//! Cost when nobody taps: the data path reads one atomic counter per
//! request ([`TapHub::request`]) with a relaxed load and goes on. Only while
//! a tap is open does a request build its view and test it against each
//! tap's [`Filter`].
//!
//! A tap never slows traffic and never grows memory without bound: each
//! has a bounded channel of encoded lines ([`CHANNEL_EVENTS`]) filled with
//! `try_send`; what does not fit is dropped and counted, and the stream
//! says `dropped N` the next time it is read
//! (`waymark_tap_dropped_events_total` counts them too). The stream ends
//! when the client goes away (hyper drops the body; the tap unregisters),
//! when `max` requests have ended, or when `duration` has passed.
//!
//! The data path calls in at three places, each one line in
//! `http/forward.rs`: [`TapHub::request`] when a request arrives,
//! [`dispatched`] when the balancer picks an endpoint, [`response`] when the
//! response head is ready (which wraps the body to see its end). The tap
//! of a request rides in the request's extensions between them. Opaque TCP
//! connections are one `tcp` event when they close
//! ([`TapHub::tcp_closed`], in `proxy/outbound.rs`); only `from`, `to` and
//! `direction` filters can match them.
//!
//! Those are `proxy=out` events. Requests that arrive through the mTLS
//! tunnel for a pod of this node are `proxy=in` ([`inbound`]: the peer's
//! verified identity as the source, the pod as the destination), tapped
//! from `proxy/inbound_tap.rs` with the same hooks.

pub mod event;
pub mod filter;
mod inbound;
mod stream;
mod tcp;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use inbound::{InboundArrival, InboundTcp};
pub use stream::TapStream;
pub use tcp::TcpClosed;

use self::event::{Dst, Event, Meta, Src, TLS_NONE};
use self::filter::{Direction, DstView, Filter, Pods, RequestView, SrcView};
use crate::http::body::{BoxError, ProxyBody};
use crate::http::errors::StatusSource;
use crate::telemetry::http_metrics::Retries;

/// Events a tap's channel holds before it drops. A `req` line with every
/// header shown is at most ~10 KiB, most lines are ~400 bytes, so a stuck
/// consumer pins a few MiB per tap at worst.
pub const CHANNEL_EVENTS: usize = 1024;
/// Taps open at once; one more is refused (each costs a channel and a
/// filter test per request).
pub const MAX_TAPS: usize = 16;

/// Every open tap of the agent.
pub struct TapHub {
    /// How many taps are open: the data path's only cost when it is 0.
    active: AtomicUsize,
    sinks: RwLock<Vec<Arc<Sink>>>,
    /// This node's pods, for filters that name them and for the source
    /// address shown.
    pods: RwLock<Pods>,
    next_request: AtomicU64,
    next_tap: AtomicU64,
    streams: Gauge,
    dropped: Counter,
}

/// One open tap: its filter and the sending half of its stream.
struct Sink {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    /// Events dropped since the stream last said so.
    dropped: AtomicU64,
    dropped_total: Counter,
    /// Requests shown so far, and how many of them have ended.
    admitted: AtomicU64,
    ended: AtomicU64,
    /// Cancelled when the tap has shown `max` requests to their end, or its
    /// stream went away: it takes no more requests.
    done: CancellationToken,
}

impl Sink {
    /// Whether the channel has room; when it has none the event is counted
    /// as dropped here, so a stuck consumer costs no encoding.
    fn has_room(&self) -> bool {
        if self.tx.capacity() > 0 {
            return true;
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.dropped_total.inc();
        false
    }

    fn send(&self, line: &Bytes) {
        match self.tx.try_send(line.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.done.cancel(),
        }
    }

    fn is_done(&self) -> bool {
        self.done.is_cancelled()
    }

    /// Whether the tap may still take a request (not done, `max` not
    /// reached).
    fn accepting(&self) -> bool {
        !self.is_done()
            && self
                .filter
                .max
                .is_none_or(|max| self.admitted.load(Ordering::Relaxed) < max)
    }

    /// Takes one more request unless `max` are already taken.
    fn admit(&self) -> bool {
        if self.is_done() {
            return false;
        }
        match self.filter.max {
            None => true,
            Some(max) => self.admitted.fetch_add(1, Ordering::Relaxed) < max,
        }
    }

    /// One admitted request has ended; the last of `max` ends the tap.
    fn request_ended(&self) {
        let n = self.ended.fetch_add(1, Ordering::AcqRel) + 1;
        if self.filter.max.is_some_and(|max| n >= max) {
            self.done.cancel();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{MAX_TAPS} taps are open on this agent already; close one first")]
pub struct TooManyTaps;

impl TapHub {
    pub fn new(registry: &mut Registry) -> Self {
        let hub = TapHub {
            active: AtomicUsize::new(0),
            sinks: RwLock::new(Vec::new()),
            pods: RwLock::new(Pods::default()),
            next_request: AtomicU64::new(0),
            next_tap: AtomicU64::new(0),
            streams: Gauge::default(),
            dropped: Counter::default(),
        };
        registry.register(
            "waymark_tap_streams",
            "Live tap streams open on the admin API",
            hub.streams.clone(),
        );
        registry.register(
            "waymark_tap_dropped_events",
            "Tap events dropped because a tap's consumer fell behind",
            hub.dropped.clone(),
        );
        hub
    }

    /// Tells the hub this node's pods and their addresses.
    pub fn set_pods(&self, pods: Pods) {
        *self.pods.write().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    /// This node's pods, to parse filters with.
    pub fn pods(&self) -> Pods {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens a tap: its stream is the body of a `/tap` response. Dropping
    /// the stream closes the tap.
    pub fn open(self: &Arc<Self>, filter: Filter) -> Result<TapStream, TooManyTaps> {
        let (tx, rx) = mpsc::channel(CHANNEL_EVENTS);
        let deadline = filter.duration;
        let sink = Arc::new(Sink {
            id: self.next_tap.fetch_add(1, Ordering::Relaxed),
            filter,
            tx,
            dropped: AtomicU64::new(0),
            dropped_total: self.dropped.clone(),
            admitted: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            done: CancellationToken::new(),
        });
        {
            let mut sinks = self.sinks.write().unwrap_or_else(|e| e.into_inner());
            if sinks.len() >= MAX_TAPS {
                return Err(TooManyTaps);
            }
            sinks.push(sink.clone());
            self.active.store(sinks.len(), Ordering::Relaxed);
        }
        self.streams.inc();
        Ok(TapStream::new(self.clone(), sink, rx, deadline))
    }

    fn close(&self, sink: &Sink) {
        sink.done.cancel();
        let mut sinks = self.sinks.write().unwrap_or_else(|e| e.into_inner());
        let before = sinks.len();
        sinks.retain(|s| s.id != sink.id);
        if sinks.len() < before {
            self.streams.dec();
        }
        self.active.store(sinks.len(), Ordering::Relaxed);
    }

    /// Open taps.
    #[cfg(test)]
    fn open_taps(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A request arrived from `pod`. Returns its tap (also put in the
    /// request's extensions for [`dispatched`]) when an open tap may want
    /// it; with no tap open this is one relaxed load.
    #[inline]
    pub fn request<B>(
        &self,
        pod: &str,
        src: SocketAddr,
        dialled: SocketAddr,
        service: Option<&str>,
        req: &mut http::Request<B>,
    ) -> Option<Arc<TapRequest>> {
        if self.active.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.tapped_request(pod, src, dialled, service, req)
    }

    #[cold]
    fn tapped_request<B>(
        &self,
        pod: &str,
        src: SocketAddr,
        dialled: SocketAddr,
        service: Option<&str>,
        req: &mut http::Request<B>,
    ) -> Option<Arc<TapRequest>> {
        let src = self.shown_source(pod, src);
        let meta = Meta {
            id: 0,
            proxy: event::OUTBOUND.into(),
            src: Src {
                addr: src,
                pod: Some(pod.to_string()),
                identity: None,
            },
            dst: Dst {
                addr: dialled,
                dialled,
                service: service.map(str::to_string),
                backend: None,
                pod: None,
            },
            tls: TLS_NONE.into(),
        };
        self.start(Direction::Out, SrcView::pod(pod, src), req, || meta)
    }

    /// Tests a request against the open taps and, when any may want it,
    /// tracks it: its tap goes in the request's extensions too.
    fn start<B>(
        &self,
        direction: Direction,
        src: SrcView<'_>,
        req: &mut http::Request<B>,
        meta: impl FnOnce() -> Meta,
    ) -> Option<Arc<TapRequest>> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok());
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path(), |p| p.as_str());
        let view = RequestView {
            direction,
            src,
            method: req.method(),
            authority,
            path: req.uri().path(),
        };
        let candidates: Vec<Candidate> = self
            .sinks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s.accepting() && s.filter.matches_request(&view))
            .map(|s| Candidate {
                sink: s.clone(),
                stage: Stage::Undecided,
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let (headers, headers_omitted) = event::shown_headers(req.headers());
        let mut meta = meta();
        meta.id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let tap = Arc::new(TapRequest {
            start: Instant::now(),
            upstream: Mutex::new(None),
            state: Mutex::new(State {
                meta,
                req: ReqLine {
                    method: req.method().to_string(),
                    authority: authority.map(str::to_string),
                    path: crate::telemetry::policy::shown_path(
                        path,
                        crate::telemetry::policy::tap_redacts_query(),
                    ),
                    headers,
                    headers_omitted,
                },
                services: Vec::new(),
                source: None,
                dispatched: false,
                candidates,
                ended: false,
            }),
        });
        req.extensions_mut().insert(tap.clone());
        Some(tap)
    }
}

impl TapHub {
    /// The source address shown: a redirected connection reaches the agent
    /// from a loopback address (the redirect points `connect()` at the
    /// pod's loopback listener), so the pod's own address of the same
    /// family is shown with the client's port, as it would be on the wire.
    fn shown_source(&self, pod: &str, src: SocketAddr) -> SocketAddr {
        if !src.ip().is_loopback() {
            return src;
        }
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        pods.ips(pod)
            .and_then(|ips| ips.iter().find(|ip| ip.is_ipv4() == src.is_ipv4()))
            .map_or(src, |ip| SocketAddr::new(*ip, src.port()))
    }
}

/// A tapped request: which taps may show it and what they have been sent.
pub struct TapRequest {
    start: Instant,
    state: Mutex<State>,
    /// The upstream connection of the last attempt and where to read what
    /// the kernel counted on it when the request ends.
    upstream: Mutex<Option<Upstream>>,
}

struct Upstream {
    local: SocketAddr,
    peer: SocketAddr,
    kernel: Arc<crate::kernel::KernelDiag>,
}

struct State {
    meta: Meta,
    req: ReqLine,
    /// Inbound: every service the destination pod is an endpoint of (for
    /// `to`; `meta.dst.service` shows the first).
    services: Vec<String>,
    /// Where the response's status came from, once it is known.
    source: Option<StatusSource>,
    dispatched: bool,
    candidates: Vec<Candidate>,
    ended: bool,
}

struct ReqLine {
    method: String,
    authority: Option<String>,
    path: String,
    headers: Vec<event::Header>,
    headers_omitted: usize,
}

struct Candidate {
    sink: Arc<Sink>,
    stage: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The request matched; the destination is not decided yet.
    Undecided,
    /// Matched so far; waits for the response head (status, latency).
    AwaitingResponse,
    /// Shown: its `req` line was sent.
    Admitted,
    Rejected,
}

/// Sent to every admitted tap with room, encoded once (and not at all when
/// none has room).
fn broadcast(candidates: &[Candidate], event: impl FnOnce() -> Event) {
    let ready: Vec<&Sink> = candidates
        .iter()
        .filter(|c| c.stage == Stage::Admitted && c.sink.has_room())
        .map(|c| &*c.sink)
        .collect();
    if ready.is_empty() {
        return;
    }
    let line = event().to_line();
    for sink in ready {
        sink.send(&line);
    }
}

impl State {
    fn req_event(&self) -> Event {
        let r = &self.req;
        Event::Req {
            meta: self.meta.clone(),
            method: r.method.clone(),
            authority: r.authority.clone(),
            path: r.path.clone(),
            headers: r.headers.clone(),
            headers_omitted: r.headers_omitted,
        }
    }

    /// Decides `to` for undecided taps against the destination as known now.
    fn decide_dst(&mut self) {
        let d = &self.meta.dst;
        let view = DstView {
            addr: d.addr,
            dialled: d.dialled,
            service: d.service.as_deref(),
            backend: d.backend.as_deref(),
            pod: d.pod.as_deref(),
            services: &self.services,
        };
        for c in &mut self.candidates {
            if c.stage == Stage::Undecided {
                c.stage = if !c.sink.filter.matches_dst(&view) {
                    Stage::Rejected
                } else if c.sink.filter.needs_response() {
                    Stage::AwaitingResponse
                } else {
                    Stage::Undecided // admitted below
                };
            }
        }
    }

    /// Admits the taps in `from` (taking a sample slot each) and sends them
    /// the `req` line.
    fn admit(&mut self, from: Stage, ok: impl Fn(&Filter) -> bool) {
        let mut newly = Vec::new();
        for (i, c) in self.candidates.iter_mut().enumerate() {
            if c.stage == from {
                if ok(&c.sink.filter) && c.sink.admit() {
                    c.stage = Stage::Admitted;
                    newly.push(i);
                } else {
                    c.stage = Stage::Rejected;
                }
            }
        }
        newly.retain(|i| self.candidates[*i].sink.has_room());
        if newly.is_empty() {
            return;
        }
        let line = self.req_event().to_line();
        for i in newly {
            self.candidates[i].sink.send(&line);
        }
    }

    fn lock_poisoned(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TapRequest {
    /// The destination is known on arrival (inbound: the pod the tunnel
    /// stream is for): the request is shown now, as outbound once its
    /// endpoint is picked.
    fn arrived(&self, services: &[String]) {
        let mut s = State::lock_poisoned(&self.state);
        s.services = services.to_vec();
        s.dispatched = true;
        s.decide_dst();
        s.admit(Stage::Undecided, |_| true);
    }

    /// The request's last attempt went over the TCP connection `local` →
    /// `peer`: its `end` reads what the kernel counted on it.
    pub fn upstream(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
        kernel: &Arc<crate::kernel::KernelDiag>,
    ) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(Upstream {
            local,
            peer,
            kernel: kernel.clone(),
        });
    }

    /// The balancer picked `addr` of `backend`, the endpoint of `pod` when
    /// known (again, on a retry: later events name the last endpoint tried).
    fn dispatched(&self, backend: &str, addr: SocketAddr, pod: Option<&str>, tls: &str) {
        let mut s = State::lock_poisoned(&self.state);
        s.meta.dst.addr = addr;
        if s.meta.dst.pod.as_deref() != pod {
            s.meta.dst.pod = pod.map(str::to_string);
        }
        if s.meta.tls != tls {
            s.meta.tls = tls.to_string();
        }
        if s.meta.dst.backend.as_deref() != Some(backend) {
            s.meta.dst.backend = Some(backend.to_string());
        }
        if s.dispatched {
            return;
        }
        s.dispatched = true;
        s.decide_dst();
        s.admit(Stage::Undecided, |_| true);
    }

    /// The response head is ready; its status came from `source`, after
    /// `retries` (and a retry the budget refused).
    fn responded(&self, status: u16, source: StatusSource, retries: Retries) {
        let latency = self.start.elapsed();
        let mut s = State::lock_poisoned(&self.state);
        s.source = Some(source);
        // Answered without an endpoint (no endpoints, a reflected TRACE, an
        // upgrade): the destination is what was dialled.
        s.decide_dst();
        s.admit(Stage::Undecided, |_| true);
        s.admit(Stage::AwaitingResponse, |f| {
            f.matches_response(status, latency)
        });
        broadcast(&s.candidates, || Event::Rsp {
            meta: s.meta.clone(),
            status,
            latency_us: micros(latency),
            source: Some(source.label().to_string()),
            reason: source.reason_code().map(str::to_string),
            retries: retries.retries,
            retry_budget_exhausted: retries.budget_exhausted,
        });
    }

    fn end(&self, grpc_status: Option<u32>, response_bytes: u64, error: Option<String>) {
        let mut s = State::lock_poisoned(&self.state);
        if s.ended {
            return;
        }
        s.ended = true;
        let upstream = &self.upstream;
        let source = s.source;
        broadcast(&s.candidates, || Event::End {
            meta: s.meta.clone(),
            source: source.map(|x| x.label().to_string()),
            reason: source.and_then(|x| x.reason_code()).map(str::to_string),
            grpc_status,
            duration_us: micros(self.start.elapsed()),
            response_bytes,
            error,
            kernel: upstream
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|u| {
                    let c = u.kernel.flow_counters(u.local, u.peer).unwrap_or_default();
                    event::KernelFlow {
                        local: u.local,
                        peer: u.peer,
                        drops: c.drops,
                        retransmits: c.retransmits,
                    }
                }),
        });
        for c in s.candidates.iter().filter(|c| c.stage == Stage::Admitted) {
            c.sink.request_ended();
        }
    }
}

impl Drop for TapRequest {
    /// A request dropped before its response ended (the client went away,
    /// or its stream was reset) still shows, and ends, in the taps that
    /// matched it.
    fn drop(&mut self) {
        {
            let mut s = State::lock_poisoned(&self.state);
            if s.ended {
                return;
            }
            if !s.dispatched {
                s.decide_dst();
                s.admit(Stage::Undecided, |_| true);
            }
        }
        self.end(None, 0, Some("cancelled before the response ended".into()));
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The route chose the backend service `backend` for the request whose
/// extensions these are: its events name it even when no endpoint is
/// picked (the backend has none). Nothing to do unless it is tapped.
pub fn routed(extensions: &http::Extensions, backend: &str) {
    if let Some(t) = extensions.get::<Arc<TapRequest>>() {
        let mut s = State::lock_poisoned(&t.state);
        if s.meta.dst.backend.as_deref() != Some(backend) {
            s.meta.dst.backend = Some(backend.to_string());
        }
    }
}

/// The balancer picked `addr` (of service `backend`, the pod `pod` when
/// the endpoint names it) for the request whose extensions these are, to
/// be reached over a path whose `tls=` is `tls` (`true` through the mTLS
/// tunnel). Nothing to do unless it is tapped.
pub fn dispatched(
    extensions: &http::Extensions,
    backend: &str,
    addr: SocketAddr,
    pod: Option<&str>,
    tls: &str,
) {
    if let Some(t) = extensions.get::<Arc<TapRequest>>() {
        t.dispatched(backend, addr, pod, tls);
    }
}

/// The attempt of a tapped request went over the TCP connection `local` →
/// `peer`: its `end` event reports what the kernel counted on it. Nothing
/// to do unless the request is tapped and the kernel diagnostics run.
pub fn upstream_connection(
    extensions: &http::Extensions,
    local: SocketAddr,
    peer: SocketAddr,
    kernel: Option<&Arc<crate::kernel::KernelDiag>>,
) {
    if let (Some(t), Some(kernel)) = (extensions.get::<Arc<TapRequest>>(), kernel) {
        t.upstream(local, peer, kernel);
    }
}

/// The response head of a tapped request is ready: sends `rsp`, and wraps
/// the body to send `end` when it ends. Untapped responses pass as they are.
pub fn response(
    tap: Option<Arc<TapRequest>>,
    resp: http::Response<ProxyBody>,
) -> http::Response<ProxyBody> {
    let Some(tap) = tap else {
        return resp;
    };
    // The proxy's own decision, carried by its answer (or by a peer
    // agent's, read back from the tunnel), never guessed from the status.
    let source = StatusSource::of(&resp);
    let retries = resp
        .extensions()
        .get::<Retries>()
        .copied()
        .unwrap_or_default();
    tap.responded(resp.status().as_u16(), source, retries);
    let error = match source {
        StatusSource::Proxy(e) => Some(e.reason().to_string()),
        StatusSource::App => None,
    };
    let grpc_status = grpc_status(resp.headers());
    let (parts, body) = resp.into_parts();
    let body = TapBody {
        inner: body,
        tap: Some(tap),
        bytes: 0,
        grpc_status,
        error,
    };
    http::Response::from_parts(parts, body.boxed())
}

fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// A tapped response body: counts bytes, reads `grpc-status` from the
/// trailers, and ends the request's taps when it ends (or is dropped).
struct TapBody {
    inner: ProxyBody,
    tap: Option<Arc<TapRequest>>,
    bytes: u64,
    grpc_status: Option<u32>,
    error: Option<String>,
}

impl TapBody {
    fn finish(&mut self, error: Option<String>) {
        if let Some(t) = self.tap.take() {
            t.end(self.grpc_status, self.bytes, error.or(self.error.take()));
        }
    }
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(g) = grpc_status(t)
                {
                    this.grpc_status = Some(g);
                }
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let e = format!("the response body broke off: {e}");
                this.finish(Some(e));
            }
            Poll::Ready(None) => this.finish(None),
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

impl Drop for TapBody {
    fn drop(&mut self) {
        if self.tap.is_some() {
            let e = if self.inner.is_end_stream() {
                None
            } else {
                Some("the client went away before the response ended".to_string())
            };
            self.finish(e);
        }
    }
}

#[cfg(test)]
mod tests;
