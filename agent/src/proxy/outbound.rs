//! Outbound: connections a pod dialled, redirected by the kernel to the
//! pod's listener, forwarded to where the pod meant to go.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::OriginalDst;
use super::copy::{self, Counters, Side};
use super::detect::{self, Protocol};
use crate::config::services::ProtocolHint;
use crate::diagnostics::metrics::{Direction, PodLabels, TcpCloseLabels, TcpLabels, TcpMetrics};
use crate::diagnostics::tap::TcpClosed;
use crate::discovery::Discovery;
use crate::http::forward::{ConnCtx, HttpProxy};
use crate::http::pool::Version;
use crate::http::server as http_server;

/// One pod as the proxy knows it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub name: String,
    pub netns_cookie: u64,
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
    pub connect_timeout: Duration,
    /// Connections in flight; the drain waits on it.
    pub tracker: TaskTracker,
    /// Cancelled when the drain grace period is over: connections still open
    /// are closed.
    pub force_close: CancellationToken,
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
        }
    }

    fn classification(self) -> &'static str {
        match self {
            Close::Eof | Close::Drain => "success",
            _ => "failure",
        }
    }
}

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
                    let this = self.clone();
                    let pod = pod.clone();
                    let span = info_span!("outbound", pod = %pod.name, src = %peer, dst = tracing::field::Empty);
                    self.tracker
                        .spawn(async move { this.proxy(pod, client, peer).await }.instrument(span));
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

    async fn proxy(&self, pod: Arc<PodInfo>, client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
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
                        warn!(error = %e, "original destination lookup failed; resetting the connection")
                    }
                    _ => {
                        warn!("no original destination recorded for this connection; resetting it")
                    }
                }
                reset(client);
                return;
            }
        };
        tracing::Span::current().record("dst", tracing::field::display(dst));
        let labels = TcpLabels {
            direction: Direction::Outbound,
            peer: "dst",
            pod: pod.name.clone(),
            target_addr: self.metrics.target_label(dst),
        };
        self.metrics.open_total.get_or_create(&labels).inc();
        let open = self.metrics.open_connections.get_or_create(&labels).clone();
        open.inc();
        let _edge = self.metrics.open_edge(&labels, &self.discovery, dst);
        let _ = client.set_nodelay(true);

        let mut transferred = copy::Transferred::default();
        let (close, detail) = tokio::select! {
            biased;
            _ = self.force_close.cancelled() => (Close::Drain, None),
            r = self.dispatch(&pod, client, peer, dst, &labels, &mut transferred) => r,
        };
        open.dec();
        let elapsed = start.elapsed();
        self.metrics.record_duration(&labels, elapsed);
        self.metrics
            .close_total
            .get_or_create(&TcpCloseLabels::new(
                &labels,
                close.classification(),
                close.reason(),
            ))
            .inc();
        let (bytes_out, bytes_in, duration_ms) = (
            transferred.client_to_upstream,
            transferred.upstream_to_client,
            elapsed.as_secs_f64() * 1000.0,
        );
        match close {
            Close::Eof | Close::Drain => debug!(
                bytes_out,
                bytes_in,
                duration_ms,
                reason = close.reason(),
                "connection closed"
            ),
            _ => info!(
                bytes_out,
                bytes_in,
                duration_ms,
                reason = close.reason(),
                error = detail.as_deref().unwrap_or(""),
                "connection failed"
            ),
        }
    }

    /// Chooses how to carry the connection: destinations that are no
    /// service go, opaque, where they were dialled; a service's connections
    /// are inspected (unless opaque) and HTTP is routed per request, other
    /// bytes go to an endpoint the balancer picks.
    async fn dispatch(
        &self,
        pod: &PodInfo,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        labels: &TcpLabels,
        transferred: &mut copy::Transferred,
    ) -> (Close, Option<String>) {
        let table = self.discovery.current();
        let Some(service) = table.by_addr(&dst).cloned() else {
            return self.opaque(client, peer, dst, labels, transferred).await;
        };
        let protocol = if service.protocol == ProtocolHint::Opaque
            || self.opaque_ports.contains(&dst.port())
        {
            Protocol::Opaque
        } else {
            let (p, outcome) = detect::detect(&client, self.detect_timeout).await;
            if outcome == detect::Outcome::Closed {
                return (Close::Eof, None);
            }
            debug!(protocol = p.as_str(), ?outcome, service = %service.name, "protocol detected");
            p
        };
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
                let target = pick.endpoint().addr;
                // The pick stays alive for the connection: in-flight is the
                // number of open connections for opaque traffic.
                return self.opaque(client, peer, target, labels, transferred).await;
            }
        };
        let ctx = Arc::new(ConnCtx {
            pod: pod.name.clone(),
            client: peer,
            dst,
            version,
        });
        http_server::serve(self.http.clone(), ctx, client).await;
        (Close::Eof, None)
    }

    /// Opaque TCP to `target`: connect, then copy until both sides are done.
    async fn opaque(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        labels: &TcpLabels,
        transferred: &mut copy::Transferred,
    ) -> (Close, Option<String>) {
        let start = Instant::now();
        let (close, detail) = self.forward(&mut client, target, labels, transferred).await;
        self.http.tap.tcp_closed(|| TcpClosed {
            pod: &labels.pod,
            src: peer,
            dst: target,
            duration: start.elapsed(),
            bytes_out: transferred.client_to_upstream,
            bytes_in: transferred.upstream_to_client,
            close: close.reason(),
            error: detail.as_deref(),
        });
        match close {
            // The client must learn promptly that its peer is gone: an RST,
            // as it would get from the destination itself.
            Close::ConnectRefused
            | Close::ConnectTimeout
            | Close::ConnectFailed
            | Close::UpstreamError => reset(client),
            _ => drop(client),
        }
        (close, detail)
    }

    /// Connects to `dst` and copies until both sides are done.
    async fn forward(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        labels: &TcpLabels,
        transferred: &mut copy::Transferred,
    ) -> (Close, Option<String>) {
        let connect = tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)).await;
        let mut upstream = match connect {
            Err(_) => {
                return (
                    Close::ConnectTimeout,
                    Some(format!(
                        "no answer from {dst} within {:?}",
                        self.connect_timeout
                    )),
                );
            }
            Ok(Err(e)) => {
                let close = if e.kind() == io::ErrorKind::ConnectionRefused {
                    Close::ConnectRefused
                } else {
                    Close::ConnectFailed
                };
                return (close, Some(e.to_string()));
            }
            Ok(Ok(s)) => s,
        };
        let _ = upstream.set_nodelay(true);
        debug!(upstream_local = ?upstream.local_addr().ok(), "connected");
        let counters = Counters {
            client_to_upstream: self.metrics.write_bytes_total.get_or_create(labels).clone(),
            upstream_to_client: self.metrics.read_bytes_total.get_or_create(labels).clone(),
        };
        match copy::bidirectional(client, &mut upstream, &counters, transferred).await {
            Ok(()) => (Close::Eof, None),
            Err(e) => {
                let detail = Some(e.to_string());
                match e.side {
                    Side::Upstream => (Close::UpstreamError, detail),
                    Side::Client => {
                        // Tell the destination the client went away abruptly.
                        reset(upstream);
                        (Close::ClientError, detail)
                    }
                }
            }
        }
    }
}

/// Closes with RST (SO_LINGER 0) instead of FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
