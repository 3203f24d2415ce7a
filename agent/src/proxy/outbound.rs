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
use crate::diagnostics::metrics::{Direction, PodLabels, TcpCloseLabels, TcpLabels, TcpMetrics};

/// One pod as the proxy knows it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub name: String,
    pub netns_cookie: u64,
}

/// Everything an outbound connection needs, shared by all of them.
pub struct Outbound {
    pub original_dst: Arc<dyn OriginalDst>,
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

    async fn proxy(&self, pod: Arc<PodInfo>, mut client: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let dst = match self.original_dst.take(pod.netns_cookie, peer) {
            Ok(Some(dst)) => dst,
            Ok(None) => {
                self.metrics
                    .no_original_dst_total
                    .get_or_create(&PodLabels {
                        pod: pod.name.clone(),
                    })
                    .inc();
                warn!("no original destination recorded for this connection; resetting it");
                reset(client);
                return;
            }
            Err(e) => {
                self.metrics
                    .no_original_dst_total
                    .get_or_create(&PodLabels {
                        pod: pod.name.clone(),
                    })
                    .inc();
                warn!(error = %e, "original destination lookup failed; resetting the connection");
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
        let _ = client.set_nodelay(true);

        let (close, transferred, detail) = self.forward(&mut client, dst, &labels).await;
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
        let fields = (
            transferred.client_to_upstream,
            transferred.upstream_to_client,
            elapsed.as_secs_f64() * 1000.0,
        );
        match close {
            Close::Eof | Close::Drain => debug!(
                bytes_out = fields.0,
                bytes_in = fields.1,
                duration_ms = fields.2,
                reason = close.reason(),
                "connection closed"
            ),
            _ => info!(
                bytes_out = fields.0,
                bytes_in = fields.1,
                duration_ms = fields.2,
                reason = close.reason(),
                error = detail.as_deref().unwrap_or(""),
                "connection failed"
            ),
        }
        match close {
            // The client must learn promptly that its peer is gone: an RST,
            // as it would get from the destination itself.
            Close::ConnectRefused
            | Close::ConnectTimeout
            | Close::ConnectFailed
            | Close::UpstreamError => reset(client),
            _ => drop(client),
        }
    }

    /// Connects to `dst` and copies until both sides are done.
    async fn forward(
        &self,
        client: &mut TcpStream,
        dst: SocketAddr,
        labels: &TcpLabels,
    ) -> (Close, copy::Transferred, Option<String>) {
        let none = copy::Transferred::default();
        let connect = tokio::select! {
            biased;
            _ = self.force_close.cancelled() => return (Close::Drain, none, None),
            c = tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst)) => c,
        };
        let mut upstream = match connect {
            Err(_) => {
                return (
                    Close::ConnectTimeout,
                    none,
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
                return (close, none, Some(e.to_string()));
            }
            Ok(Ok(s)) => s,
        };
        let _ = upstream.set_nodelay(true);
        debug!(upstream_local = ?upstream.local_addr().ok(), "connected");
        let counters = Counters {
            client_to_upstream: self.metrics.write_bytes_total.get_or_create(labels).clone(),
            upstream_to_client: self.metrics.read_bytes_total.get_or_create(labels).clone(),
        };
        let copied = tokio::select! {
            biased;
            _ = self.force_close.cancelled() => None,
            r = copy::bidirectional(client, &mut upstream, &counters) => Some(r),
        };
        match copied {
            None => (Close::Drain, none, None),
            Some((t, Ok(()))) => (Close::Eof, t, None),
            Some((t, Err(e))) => {
                let detail = Some(e.to_string());
                match e.side {
                    Side::Upstream => (Close::UpstreamError, t, detail),
                    Side::Client => {
                        // Tell the destination the client went away abruptly.
                        reset(upstream);
                        (Close::ClientError, t, detail)
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
