//! Outbound: connections a pod dialled, redirected by the kernel to the
//! pod's listener, forwarded to where the pod meant to go.

pub mod accept_rate;
pub mod forward;
pub mod http_server;
pub mod kernel_refusals;

use std::net::SocketAddr;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, warn};

use prometheus_client::metrics::gauge::Gauge;

use crate::config::services::ProtocolHint;
use crate::diagnostics::tap::TcpClosed;
use crate::discovery::Discovery;
use crate::drain::Drain;
use crate::http::errors::ProxyError;
use crate::http::pool::Version;
use crate::identity::SpiffeId;
use crate::proxy::descriptors::{Descriptors, Held};
use crate::proxy::detect::{self, Protocol};
use crate::proxy::outbound::accept_rate::{AcceptBucket, AcceptRate};
use crate::proxy::outbound::forward::{ConnCtx, HttpProxy};
use crate::proxy::{OriginalDst, ReplyPath};
use crate::telemetry::conns::{ConnGuard, ConnProtocol, ConnTable, NewConn};
use crate::telemetry::metrics::{
    Direction, NoTlsReason, PodLabels, RefusedLabels, ReplyPathLabels, TcpCloseLabels, TcpLabels,
    TcpMetrics, TlsLabel,
};
use crate::transport::copy::{self, Counters, Side};
use crate::transport::delayed_acks;
use crate::transport::idle::{ReplyBudget, ShortcutExit};
use crate::transport::netns::PodNetns;
use crate::transport::tunnel::{ConnectHeaders, TunnelError};
use crate::transport::upstream::{Path, UpstreamError, UpstreamIo, Upstreams, new_request_id};
use crate::wake_gate::Gated;

/// One pod as the proxy knows it.
#[derive(Debug)]
pub struct PodInfo {
    pub name: String,
    pub netns_cookie: u64,
    pub ips: Vec<std::net::IpAddr>,
    /// Its workload identity when mTLS is on.
    pub identity: Option<SpiffeId>,
    /// Its network namespace, where its direct upstream connections are
    /// made; `None` dials from the node's (`outbound.dial_from = "node"`).
    pub netns: Option<PodNetns>,
    /// Its connections through the agent now (`outbound.max_connections_per_pod`).
    pub open: AtomicUsize,
    /// How fast it may open more (`outbound.accept_rate_per_pod`).
    pub accept_bucket: AcceptBucket,
    /// When a wait for its accept rate was last logged (a pod opening
    /// thousands of connections is logged once a minute, not each time).
    pub accept_rate_logged: std::sync::Mutex<Option<Instant>>,
}

/// How many connections the agent takes at once, per pod and in all.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// 0: no limit.
    pub per_pod: usize,
    pub total: usize,
    /// How fast each pod may open connections.
    pub accept_rate: AcceptRate,
}

/// Descriptors a proxied connection holds: the pod's side and the
/// upstream.
const FDS_PER_CONNECTION: usize = 2;

/// A pod's share of the agent's connections when
/// `outbound.max_connections_per_pod` is unset: half, so that the others
/// always keep the rest.
const POD_SHARE_DIVISOR: usize = 2;

/// The per-pod bound when `outbound.max_connections_per_pod` is unset and
/// the agent's own is larger: far above any pooled client.
const PER_POD_DEFAULT_MAX: usize = 16_384;

impl ConnLimits {
    /// From the config; a `max_connections` of 0 is derived from the
    /// open-files limit in force, and an unset per-pod limit from that.
    pub fn new(per_pod: Option<usize>, total: usize, accept_rate: AcceptRate) -> Self {
        let total = if total > 0 {
            total
        } else {
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| Self::total_for_open_files(soft))
                .unwrap_or(8192)
        };
        Self {
            per_pod: per_pod.unwrap_or_else(|| Self::per_pod_for_total(total)),
            total,
            accept_rate,
        }
    }

    /// Connections of all pods that fit `open_files` descriptors: two per
    /// connection, past the reserve (the whole [`Descriptors`] budget, which
    /// the tunnel's inbound streams share: it, not this, is what holds
    /// when both are busy).
    fn total_for_open_files(open_files: u64) -> usize {
        Descriptors::budget_for_open_files(open_files) / FDS_PER_CONNECTION
    }

    /// One pod's default share of `total`.
    fn per_pod_for_total(total: usize) -> usize {
        (total / POD_SHARE_DIVISOR).clamp(1, PER_POD_DEFAULT_MAX)
    }
}

/// What a refused connection's tap event says of the limit it met
/// (`pod_connections`, `agent_connections` or `descriptors`).
pub fn limit_message(limit: &str) -> &'static str {
    match limit {
        "pod_connections" => "the pod's connections reached outbound.max_connections_per_pod",
        "descriptors" => {
            "the agent's connections and tunnel streams hold every descriptor its open-files limit leaves"
        }
        _ => "the agent's connections reached outbound.max_connections",
    }
}

/// One admitted connection: counted in its pod and in the total until
/// dropped.
struct Admission {
    pod: Arc<PodInfo>,
    total: Arc<AtomicUsize>,
    /// Its descriptors in the agent's budget (`None` until counted).
    _fds: Option<Held>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.pod.open.fetch_sub(1, Ordering::Relaxed);
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything an outbound connection needs, shared by all of them.
pub struct Outbound {
    pub original_dst: Arc<dyn OriginalDst>,
    /// Services by the addresses pods dial.
    pub discovery: Arc<Discovery>,
    pub http: Arc<HttpProxy>,
    pub detect_timeout: Duration,
    /// Destination ports never inspected.
    pub opaque_ports: Vec<u16>,
    pub metrics: Arc<TcpMetrics>,
    /// Direct or through the tunnel, per endpoint.
    pub upstreams: Arc<Upstreams>,
    /// The agent's drain: connections are tracked in it, HTTP winds down
    /// when it starts, what is left is closed when it is forced.
    pub drain: Drain,
    pub limits: ConnLimits,
    /// An opaque connection with no byte either way for this long is
    /// closed (`limits.idle_timeout`).
    pub idle_timeout: Duration,
    /// Connections of all pods now.
    pub open_total: Arc<AtomicUsize>,
    /// The agent's descriptors, shared with the tunnel's inbound streams.
    pub descriptors: Arc<Descriptors>,
    /// Every open connection, for `waymark conns`.
    pub conns: Arc<ConnTable>,
    /// Takes connections off the reply shortcut (see [`ReplyBudget`]).
    pub shortcut_exit: Arc<dyn ShortcutExit>,
}

/// Takes a connection off the reply shortcut through the kernel maps, and
/// counts it.
pub struct ShortcutLeaver {
    pub original_dst: Arc<dyn OriginalDst>,
    pub metrics: Arc<TcpMetrics>,
}

impl ShortcutExit for ShortcutLeaver {
    fn leave(&self, netns_cookie: u64, client: SocketAddr) {
        self.metrics.reply_shortcut_left_total.inc();
        // Runs where the connection's bytes move, inside its span.
        match self.original_dst.leave_shortcut(netns_cookie, client) {
            Ok(()) => debug!(
                "client not keeping up (redirect.reply_shortcut_max_unanswered bytes unanswered, or as many unread in its socket): its replies leave the shortcut for loopback TCP"
            ),
            Err(e) => {
                warn!(src = %client, error = %e, "cannot take the connection off the reply shortcut; its replies keep skipping TCP's flow control")
            }
        }
    }

    fn unread(&self, netns: &PodNetns, client: SocketAddr, server: SocketAddr) -> Option<u64> {
        let asked = netns.sock_diag().and_then(|nl| {
            crate::transport::sock_diag::receive_memory(
                std::os::fd::AsFd::as_fd(&nl),
                client,
                server,
            )
        });
        match asked {
            Ok(unread) => unread.map(u64::from),
            Err(e) => {
                debug!(src = %client, error = %e, "cannot ask the kernel about the client's socket");
                None
            }
        }
    }

    fn consumed(&self, netns_cookie: u64, client: SocketAddr, total: u64) {
        if let Err(e) = self
            .original_dst
            .request_consumed(netns_cookie, client, total)
        {
            // The kernel then bounds the connection's requests tighter (it
            // counts them unread), never looser.
            debug!(src = %client, error = %e, "cannot tell the kernel what was read");
        }
    }

    fn forget(&self, netns_cookie: u64, client: SocketAddr) {
        self.original_dst.forget_request(netns_cookie, client);
    }
}

/// How a connection ended, for logs and the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Eof,
    ConnectRefused,
    ConnectTimeout,
    ConnectFailed,
    ClientError,
    UpstreamError,
    NoEndpoints,
    Drain,
    /// The destination's agent refused the stream (authorization).
    TunnelDenied,
    /// mTLS with the destination's agent failed (certificate, identity).
    TunnelTls,
    /// The tunnel to the destination's agent failed otherwise.
    TunnelFailed,
    /// No byte either way for `limits.idle_timeout`.
    IdleTimeout,
}

impl Close {
    fn reason(self) -> &'static str {
        match self {
            Close::Eof => "eof",
            Close::ConnectRefused => "connect_refused",
            Close::ConnectTimeout => "connect_timeout",
            Close::ConnectFailed => "connect_failed",
            Close::ClientError => "client_error",
            Close::UpstreamError => "upstream_error",
            Close::NoEndpoints => "no_endpoints",
            Close::Drain => "drain",
            Close::TunnelDenied => "tunnel_denied",
            Close::TunnelTls => "tunnel_tls_failed",
            Close::TunnelFailed => "tunnel_failed",
            Close::IdleTimeout => "idle_timeout",
        }
    }

    /// The proxy's reason when the proxy ended the connection (tap's
    /// `source=proxy reason=…`, the words of a proxy's HTTP answer); `None`
    /// when it ended on either side's own account.
    fn proxy_error(self) -> Option<ProxyError> {
        match self {
            Close::NoEndpoints => Some(ProxyError::NoEndpoints),
            Close::ConnectRefused
            | Close::ConnectTimeout
            | Close::ConnectFailed
            | Close::TunnelTls
            | Close::TunnelFailed => Some(ProxyError::ConnectFailed),
            Close::TunnelDenied => Some(ProxyError::Forbidden),
            Close::IdleTimeout => Some(ProxyError::Limit),
            Close::Eof | Close::Drain | Close::ClientError | Close::UpstreamError => None,
        }
    }

    /// Failed before a byte reached the destination.
    fn is_failure_before_data(self) -> bool {
        matches!(
            self,
            Close::ConnectRefused
                | Close::ConnectTimeout
                | Close::ConnectFailed
                | Close::TunnelDenied
                | Close::TunnelTls
                | Close::TunnelFailed
        )
    }

    fn from_upstream(e: &UpstreamError) -> Self {
        match e {
            UpstreamError::Refused(_) => Close::ConnectRefused,
            UpstreamError::Timeout { .. } => Close::ConnectTimeout,
            UpstreamError::Io { .. } => Close::ConnectFailed,
            UpstreamError::Tunnel(t) => match t {
                TunnelError::Denied { .. } => Close::TunnelDenied,
                TunnelError::Tls { .. } | TunnelError::NoCertificate(_) => Close::TunnelTls,
                // The peer agent reached the pod's address and was refused.
                TunnelError::Refused { status, .. }
                    if *status == http::StatusCode::SERVICE_UNAVAILABLE =>
                {
                    Close::ConnectRefused
                }
                TunnelError::Refused { status, .. }
                    if *status == http::StatusCode::GATEWAY_TIMEOUT =>
                {
                    Close::ConnectTimeout
                }
                _ => Close::TunnelFailed,
            },
        }
    }

    fn classification(self) -> &'static str {
        match self {
            Close::Eof | Close::Drain => "success",
            _ => "failure",
        }
    }
}

/// The TCP series of a connection once its path is known: counted open
/// then, closed by `proxy` whatever happens after.
struct Opened {
    labels: TcpLabels,
    gauge: Gauge,
    /// The connection's place in the sliding windows of `waymark edges`.
    _edge: crate::telemetry::stats::OpenConnection,
}

/// The shortest a pod's accept loop sleeps for its accept rate (see
/// `Outbound::serve`).
const ACCEPT_WAIT_MIN: Duration = Duration::from_millis(5);

impl Outbound {
    /// Accepts connections on one pod listener until `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        pod: Arc<PodInfo>,
        listener: TcpListener,
        stop: CancellationToken,
    ) {
        let local = listener.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((client, peer)) => {
                    if let Some(wait) = pod
                        .accept_bucket
                        .take(self.limits.accept_rate, Instant::now())
                    {
                        self.delay(&pod, wait);
                        // Never shorter than ACCEPT_WAIT_MIN: the tokens
                        // that come meanwhile let the next few connections
                        // through without a wake each. At 1,000/s a sleep
                        // per connection (a timer, a park and a wake of the
                        // worker) made taking one cost 143 µs of CPU
                        // against 56 µs unlimited (`cargo xtask
                        // bench-noisy`). The rate stays what it is.
                        let wait = wait.max(ACCEPT_WAIT_MIN);
                        // The connections behind this one stay in the
                        // kernel's accept queue of this pod's listener.
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    let admission = match self.admit(&pod) {
                        Ok(a) => a,
                        Err(limit) => {
                            self.refuse(&pod, client, peer, limit);
                            continue;
                        }
                    };
                    let this = self.clone();
                    let pod = pod.clone();
                    // A debug span: at the default level it is never created.
                    // Enabled, it is ~400 bytes for as long as the
                    // connection lives (measured on 10,000 idle keep-alive
                    // connections) and work on every poll; the few events
                    // an operator sees at info and above name the pod and
                    // the source themselves.
                    let span = debug_span!("outbound", pod = %pod.name, src = %peer, dst = tracing::field::Empty);
                    self.drain.outbound().spawn(
                        this.proxy(pod, client, peer, local, admission)
                            .instrument(span),
                    );
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends: keep serving the connections
                    // we have; back off so we do not spin on the error.
                    warn!(pod = %pod.name, listener = ?local, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        debug!(pod = %pod.name, listener = ?local, "stopped accepting");
    }

    /// Counts a connection `pod` opened faster than its accept rate, and
    /// says so in the log at most once a minute per pod.
    fn delay(&self, pod: &PodInfo, wait: Duration) {
        self.metrics
            .limit_delayed_total
            .get_or_create(&RefusedLabels {
                pod: pod.name.clone(),
                limit: "accept_rate",
            })
            .inc();
        let now = Instant::now();
        let mut logged = pod
            .accept_rate_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if logged.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60)) {
            *logged = Some(now);
            let rate = self.limits.accept_rate;
            info!(
                pod = %pod.name,
                per_second = rate.per_second,
                burst = rate.burst,
                wait_ms = wait.as_secs_f64() * 1000.0,
                "the pod opens connections faster than outbound.accept_rate_per_pod: new ones wait in its listener's queue"
            );
        }
    }

    /// Counts a new connection of `pod` against the limits, or says which
    /// one it would exceed.
    fn admit(&self, pod: &Arc<PodInfo>) -> Result<Admission, &'static str> {
        let total = self.open_total.fetch_add(1, Ordering::Relaxed);
        let mine = pod.open.fetch_add(1, Ordering::Relaxed);
        let mut admission = Admission {
            pod: pod.clone(),
            total: self.open_total.clone(),
            _fds: None,
        };
        if self.limits.per_pod > 0 && mine >= self.limits.per_pod {
            return Err("pod_connections");
        }
        if self.limits.total > 0 && total >= self.limits.total {
            return Err("agent_connections");
        }
        admission._fds = Some(
            self.descriptors
                .take(FDS_PER_CONNECTION)
                .ok_or("descriptors")?,
        );
        Ok(admission)
    }

    /// Resets a connection over a limit (after taking its original
    /// destination, so the kernel's map keeps no entry for it) and counts
    /// it; an open tap sees it as a `tcp` event with `source=proxy
    /// reason=limit`. Logged at debug only: a pod hammering its limit must
    /// not flood the log; the metric has every one.
    fn refuse(&self, pod: &PodInfo, client: TcpStream, peer: SocketAddr, limit: &'static str) {
        if let Ok(Some(dst)) = self.original_dst.take(pod.netns_cookie, peer) {
            self.http.tap.tcp_closed(|| TcpClosed {
                pod: &pod.name,
                src: peer,
                dst,
                duration: Duration::ZERO,
                bytes_out: 0,
                bytes_in: 0,
                close: "refused",
                error: Some(limit_message(limit)),
                proxy: Some(ProxyError::Limit),
            });
        }
        self.metrics
            .refused_total
            .get_or_create(&RefusedLabels {
                pod: pod.name.clone(),
                limit,
            })
            .inc();
        debug!(pod = %pod.name, src = %peer, limit, per_pod = self.limits.per_pod, total = self.limits.total, "connection refused: limit reached");
        reset(client);
    }

    /// `listener`: the address the pod's listener is bound to (the
    /// accepted socket's local address, without asking the kernel).
    ///
    /// A plain function returning an `async move` block rather than an
    /// `async fn`: an `async fn` keeps its arguments twice in its state
    /// (as captured and as locals), and this state is what every open
    /// connection's task holds for its whole life.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn proxy(
        self: Arc<Self>,
        pod: Arc<PodInfo>,
        client: TcpStream,
        peer: SocketAddr,
        listener: Option<SocketAddr>,
        admission: Admission,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        async move {
            // What is only needed to set the connection up lives in
            // `set_up`'s frame, not here: a task's state keeps room for every
            // local whose scope spans an await, and this state is what every
            // open connection holds for its whole life.
            let Some((dst, live)) = self.set_up(&pod, &client, peer, listener) else {
                reset(client);
                return;
            };
            let mut opened = None;
            let conn = Conn {
                pod: &pod,
                peer: &peer,
                dst: &dst,
                live: &live,
            };
            // The forced drain is gated: polled when it comes, not on every
            // wake of the connection (see `crate::wake_gate`).
            let (close, detail) = tokio::select! {
                biased;
                _ = Gated::new(self.drain.forced().cancelled()) => (Close::Drain, None),
                r = self.dispatch(&conn, client, &mut opened) => r,
            };
            // A connection that ended before its path was known (the client
            // left during detection, no endpoints) is counted all the same.
            let Opened { labels, gauge, .. } = match opened {
                Some(o) => o,
                None => self.open(&conn, TlsLabel::NoIdentity(NoTlsReason::NoConnection)),
            };
            gauge.dec();
            // Since the connection table's entry was made (`set_up`, the
            // task's first step).
            let elapsed = live.activity().age();
            self.metrics.record_duration(&labels, elapsed);
            self.metrics
                .close_total
                .get_or_create(&TcpCloseLabels::new(
                    &labels,
                    close.classification(),
                    close.reason(),
                ))
                .inc();
            // The connection's own count, HTTP included (the opaque copy's
            // `transferred` sees only what it moved).
            let (bytes_out, bytes_in) = live.activity().bytes();
            let duration_ms = elapsed.as_secs_f64() * 1000.0;
            let tls = labels.tls.value();
            match close {
                Close::Eof | Close::Drain => debug!(
                    bytes_out,
                    bytes_in,
                    duration_ms,
                    tls,
                    reason = close.reason(),
                    "connection closed"
                ),
                _ => info!(
                    pod = %pod.name,
                    src = %peer,
                    %dst,
                    bytes_out,
                    bytes_in,
                    duration_ms,
                    tls,
                    reason = close.reason(),
                    error = detail.as_deref().unwrap_or(""),
                    "connection failed"
                ),
            }
            // Held until here: the pod's and the agent's connection counts.
            drop(admission);
        }
    }

    /// What a redirected connection needs before it is carried: its
    /// original destination, the reply shortcut, and its entry in the
    /// connection table. `None` (counted and logged) when the kernel
    /// recorded no destination for it: the caller resets it.
    fn set_up(
        &self,
        pod: &Arc<PodInfo>,
        client: &TcpStream,
        peer: SocketAddr,
        listener: Option<SocketAddr>,
    ) -> Option<(SocketAddr, Arc<ConnGuard>)> {
        let lookup = self.original_dst.take(pod.netns_cookie, peer);
        let dst = match lookup {
            Ok(Some(dst)) => dst,
            Ok(None) | Err(_) => {
                self.metrics
                    .no_original_dst_total
                    .get_or_create(&PodLabels {
                        pod: pod.name.clone(),
                    })
                    .inc();
                match lookup {
                    Err(e) => {
                        warn!(pod = %pod.name, src = %peer, error = %e, "original destination lookup failed; resetting the connection")
                    }
                    _ => {
                        warn!(pod = %pod.name, src = %peer, "no original destination recorded for this connection; resetting it")
                    }
                }
                return None;
            }
        };
        tracing::Span::current().record("dst", tracing::field::display(dst));
        let reply_path = match self.original_dst.shortcut_replies(
            pod.netns_cookie,
            peer,
            client.as_fd(),
        ) {
            Ok(path) => path,
            // Nothing was written yet and nothing is lost: the replies
            // take loopback TCP.
            Err(e) => {
                debug!(pod = %pod.name, src = %peer, error = %e, "reply shortcut not set up; replies take loopback");
                ReplyPath::Loopback
            }
        };
        // Fewer bare ACKs, only where the kernel also bounds the socket's
        // delayed-ACK timer to a few ms (`wm_agent_sock_ops`): a client
        // with Nagle's algorithm on holds each small request until the one
        // before is acknowledged, and would otherwise wait for the default
        // 40 ms timer once per connection
        // (`reply_shortcut::a_client_with_nagle_on_is_not_held_by_delayed_acks`).
        let acks_delayed = matches!(
            reply_path,
            ReplyPath::Sockmap {
                delay_acks: true,
                ..
            }
        ) && delayed_acks::delay(client.as_fd())
            .inspect_err(|e| {
                debug!(error = %e, "TCP_QUICKACK off refused; the socket acknowledges each request");
            })
            .is_ok();
        if reply_path != ReplyPath::Off {
            self.metrics
                .reply_path_total
                .get_or_create(&ReplyPathLabels {
                    path: match reply_path {
                        ReplyPath::Sockmap { .. } => "sockmap",
                        _ => "loopback",
                    },
                })
                .inc();
        }
        let _ = client.set_nodelay(true);
        let live = Arc::new(self.conns.open(NewConn {
            direction: crate::telemetry::conns::filter::Direction::Out,
            pod: Some(pod.name.clone()),
            src: Some(source_addr(pod, peer, dst).unwrap_or(peer)),
            dst,
            client_flow: listener.map(|l| (l, peer)),
            protocol: ConnProtocol::Detecting,
        }));
        if let ReplyPath::Sockmap {
            max_unanswered,
            requests,
            ..
        } = reply_path
        {
            let budget = ReplyBudget::new(
                max_unanswered,
                requests,
                pod.netns_cookie,
                peer,
                pod.netns.clone().zip(listener),
                self.shortcut_exit.clone(),
            );
            live.activity().bound_replies(if acks_delayed {
                budget.keeping_acks_delayed(client.as_raw_fd())
            } else {
                budget
            });
        }
        Some((dst, live))
    }

    /// Counts the connection open under its path's `tls` label.
    fn open(&self, conn: &Conn<'_>, tls: TlsLabel) -> Opened {
        let labels = TcpLabels {
            direction: Direction::Outbound,
            peer: "dst",
            pod: conn.pod.name.clone(),
            target_addr: self.metrics.target_label(*conn.dst),
            tls,
        };
        self.metrics.open_total.get_or_create(&labels).inc();
        let gauge = self.metrics.open_connections.get_or_create(&labels).clone();
        gauge.inc();
        let _edge = self.metrics.open_edge(&labels, &self.discovery, *conn.dst);
        Opened {
            labels,
            gauge,
            _edge,
        }
    }

    /// Chooses how to carry the connection: destinations that are no
    /// service go, opaque, where they were dialled; a service's connections
    /// are inspected (unless opaque) and HTTP is routed per request, other
    /// bytes go to an endpoint the balancer picks.
    async fn dispatch(
        &self,
        conn: &Conn<'_>,
        client: TcpStream,
        opened: &mut Option<Opened>,
    ) -> (Close, Option<String>) {
        let table = self.discovery.current();
        let Some(service) = table.by_addr(conn.dst).cloned() else {
            // Not a service: a meshed pod dialled by address still goes
            // through its node's tunnel (and its authorization).
            // Boxed (here and below), with the path moved in, in a scope
            // of its own: a connection's task is sized for the largest
            // state it may be in, and an HTTP connection, which lives far
            // longer, should not carry room for the copy's or its path.
            let copy = {
                let node = table.workload(&conn.dst.ip()).map(|w| &*w.node);
                let path = self.upstreams.path(conn.pod.identity.as_ref(), node);
                conn.live.set_protocol(ConnProtocol::Opaque);
                let o = opened.insert(self.open(conn, path.tls()));
                Box::pin(self.opaque(client, conn, path, *conn.dst, &o.labels))
            };
            // Not held while the connection is carried (see below).
            drop(table);
            return copy.await;
        };
        conn.live.set_service(&service.name);
        let protocol = if service.protocol == ProtocolHint::Opaque
            || self.opaque_ports.contains(&conn.dst.port())
        {
            Protocol::Opaque
        } else {
            // Boxed: detection is over in a moment, the connection's task
            // lives on without room for its timer.
            let (p, outcome) = Box::pin(detect::detect(&client, self.detect_timeout)).await;
            if outcome == detect::Outcome::Closed {
                return (Close::Eof, None);
            }
            debug!(protocol = p.as_str(), ?outcome, service = %service.name, "protocol detected");
            p
        };
        conn.live.set_protocol(protocol.into());
        let version = match protocol {
            Protocol::Http1 => Version::Http1,
            Protocol::Http2 => Version::Http2,
            Protocol::Tls | Protocol::Opaque => {
                let Some(pick) = service.balancer.pick(Instant::now()) else {
                    reset(client);
                    return (
                        Close::NoEndpoints,
                        Some(format!("service {} has no endpoints", service.name)),
                    );
                };
                // The pick stays alive for the connection (in the box, as
                // the path): in-flight is the number of open connections
                // for opaque traffic.
                let copy = {
                    let endpoint = pick.endpoint();
                    let path = self
                        .upstreams
                        .path(conn.pod.identity.as_ref(), endpoint.node.as_deref());
                    let o = opened.insert(self.open(conn, path.tls()));
                    let target = endpoint.addr;
                    Box::pin(async move {
                        let _pick = pick;
                        self.opaque(client, conn, path, target, &o.labels).await
                    })
                };
                // The pick borrows the service for the connection's life;
                // the table is let go (see below).
                drop(table);
                return copy.await;
            }
        };
        opened.get_or_insert_with(|| self.open(conn, TlsLabel::PerRequest));
        // The service table and the service are let go before the
        // connection is carried: held, every connection would keep the
        // table of its time (every service, balancer and endpoint then
        // known) alive for as long as it stays open, long after discovery
        // replaced it. Requests route on the table current when they come.
        drop((service, table));
        let ctx = Arc::new(ConnCtx {
            pod_info: conn.pod.clone(),
            client: *conn.peer,
            source_addr: conn.source_addr(),
            dst: *conn.dst,
            version,
            live: conn.live.clone(),
        });
        // Boxed, like the connect below: the connection's task is sized for
        // the largest future it may ever hold, and hyper's connection state
        // is large; an opaque connection should not carry room for it.
        Box::pin(http_server::serve(
            self.http.clone(),
            ctx,
            client,
            self.drain.started().clone(),
        ))
        .await;
        (Close::Eof, None)
    }

    /// Opaque TCP to `target`: connect along `path`, then copy until both
    /// sides are done.
    async fn opaque(
        &self,
        mut client: TcpStream,
        conn: &Conn<'_>,
        path: Path,
        target: SocketAddr,
        labels: &TcpLabels,
    ) -> (Close, Option<String>) {
        let start = Instant::now();
        let mut transferred = copy::Transferred::default();
        conn.live
            .set_upstream(None, target, path.peer_identity(), None);
        let (close, detail) = self
            .forward(&mut client, conn, &path, target, labels, &mut transferred)
            .await;
        self.http.tap.tcp_closed(|| TcpClosed {
            pod: &labels.pod,
            src: *conn.peer,
            dst: target,
            duration: start.elapsed(),
            bytes_out: transferred.client_to_upstream,
            bytes_in: transferred.upstream_to_client,
            close: close.reason(),
            error: detail.as_deref(),
            proxy: close.proxy_error(),
        });
        if close.is_failure_before_data() || close == Close::UpstreamError {
            // The client must learn promptly that its peer is gone (or
            // refused it): an RST, as it would get from the destination.
            reset(client);
        } else {
            drop(client);
        }
        (close, detail)
    }

    /// Connects to `target` and copies until both sides are done.
    async fn forward(
        &self,
        client: &mut TcpStream,
        conn: &Conn<'_>,
        path: &Path,
        target: SocketAddr,
        labels: &TcpLabels,
        transferred: &mut copy::Transferred,
    ) -> (Close, Option<String>) {
        let headers = ConnectHeaders {
            source_workload: conn.pod.identity.clone(),
            source_addr: conn.source_addr(),
            request_id: Some(new_request_id()),
        };
        // Boxed: establishing a tunnel connection (TLS and HTTP/2
        // handshakes) is a large future, needed only until the connection
        // is up. Inline, it and hyper's connection state made every
        // connection's task 8.5 KiB; boxed, the task is 2.4 KiB.
        let connect = Box::pin(self.upstreams.connect(
            path,
            target,
            headers.clone(),
            conn.pod.netns.as_ref(),
        ));
        let upstream = match connect.await {
            Ok(u) => u,
            Err(e) => {
                let close = Close::from_upstream(&e);
                if e.is_denied() {
                    warn!(
                        pod = %conn.pod.name,
                        src = %conn.peer,
                        source = %conn.pod.identity.as_ref().map(ToString::to_string).unwrap_or_default(),
                        peer_identity = %path.peer_identity().map(ToString::to_string).unwrap_or_default(),
                        %target,
                        error = %e,
                        "the destination's agent denied the connection"
                    );
                }
                return (close, Some(e.to_string()));
            }
        };
        if let (Some(id), Some(rid)) = (path.peer_identity(), &headers.request_id) {
            debug!(peer_identity = %id, request_id = %rid, %target, "connected through the tunnel");
        } else {
            debug!(%target, "connected");
        }
        if let UpstreamIo::Tcp(tcp) = &upstream
            && self.conns.flows_wanted()
        {
            // The kernel's per-flow counters are keyed by this socket's
            // addresses: one getsockname, only while they are counted.
            let flow = tcp.local_addr().ok().map(|l| (l, target));
            conn.live.set_upstream(None, target, None, flow);
        }
        let activity = conn.live.activity().clone();
        let counters = Counters {
            client_to_upstream: self.metrics.write_bytes_total.get_or_create(labels).clone(),
            upstream_to_client: self.metrics.read_bytes_total.get_or_create(labels).clone(),
            activity: Some(activity.clone()),
        };
        let copied = async {
            match upstream {
                UpstreamIo::Tcp(mut tcp) => {
                    let r = copy::bidirectional(client, &mut tcp, &counters, transferred).await;
                    if matches!(&r, Err(e) if e.side == Side::Client) {
                        // Tell the destination the client went away abruptly.
                        reset(tcp);
                    }
                    r
                }
                // Dropping a tunnel stream resets it, which the peer agent
                // passes on to the destination.
                UpstreamIo::Tunnel(t) => {
                    copy::bidirectional_io(client, t, &counters, transferred).await
                }
            }
        };
        let result = tokio::select! {
            r = copied => r.map_err(Some),
            () = Gated::new(crate::transport::idle::expired(&activity, self.idle_timeout)) => {
                self.metrics
                    .limit_closed_total
                    .get_or_create(&RefusedLabels {
                        pod: conn.pod.name.clone(),
                        limit: "idle_timeout",
                    })
                    .inc();
                debug!(pod = %conn.pod.name, %target, timeout = ?self.idle_timeout, "idle connection closed");
                Err(None)
            }
        };
        match result {
            Ok(()) => (Close::Eof, None),
            Err(None) => (
                Close::IdleTimeout,
                Some(format!(
                    "no byte either way for {} (limits.idle_timeout)",
                    humantime::format_duration(self.idle_timeout)
                )),
            ),
            Err(Some(e)) => {
                let detail = Some(e.to_string());
                match e.side {
                    Side::Upstream => (Close::UpstreamError, detail),
                    Side::Client => (Close::ClientError, detail),
                }
            }
        }
    }
}

/// The connection being proxied.
struct Conn<'a> {
    pod: &'a Arc<PodInfo>,
    // By reference: the connection's task holds the addresses already.
    peer: &'a SocketAddr,
    dst: &'a SocketAddr,
    /// Its entry in the connection table.
    live: &'a Arc<ConnGuard>,
}

impl Conn<'_> {
    fn source_addr(&self) -> Option<SocketAddr> {
        source_addr(self.pod, *self.peer, *self.dst)
    }
}

/// The client as the network knows it: the pod's address (of the dialled
/// family when it has one) and the client's port; the accepted peer is the
/// pod's loopback.
fn source_addr(pod: &PodInfo, peer: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
    let ips = &pod.ips;
    ips.iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or(ips.first())
        .map(|ip| SocketAddr::new(*ip, peer.port()))
}

/// Closes with RST (SO_LINGER 0) instead of FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::ConnLimits;

    #[test]
    fn the_derived_total_counts_two_descriptors_per_connection() {
        // These machines' limit: 20,000 descriptors, 1,024 kept back.
        assert_eq!(ConnLimits::total_for_open_files(20_000), 9_488);
        assert_eq!(ConnLimits::total_for_open_files(1_048_576), 523_776);
        // A limit below the reserve still takes a few connections.
        assert_eq!(ConnLimits::total_for_open_files(1_024), 64);
        // RLIM_INFINITY neither overflows nor wraps.
        assert_eq!(
            ConnLimits::total_for_open_files(u64::MAX),
            (usize::MAX - 1024) / 2
        );
    }

    #[test]
    fn an_unset_per_pod_limit_is_half_the_total_at_most_16384() {
        assert_eq!(ConnLimits::per_pod_for_total(9_488), 4_744);
        assert_eq!(ConnLimits::per_pod_for_total(523_776), 16_384);
        assert_eq!(ConnLimits::per_pod_for_total(1), 1);
        let rate = super::AcceptRate {
            per_second: 0,
            burst: 0,
        };
        // Set, it is kept as it is, 0 (no limit) included.
        assert_eq!(ConnLimits::new(Some(0), 10, rate).per_pod, 0);
        assert_eq!(ConnLimits::new(Some(7), 10, rate).per_pod, 7);
        assert_eq!(ConnLimits::new(None, 10, rate).per_pod, 5);
    }
}
