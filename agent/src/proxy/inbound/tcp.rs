//! Linkerd's TCP series for the streams this node's pods receive through
//! the tunnel (`direction="inbound"`, `peer="src"`): opened, open now,
//! closed, bytes each way and duration, per destination pod and address.
//!
//! Each admitted CONNECT stream is one connection to a pod, whatever it
//! carries (HTTP served here, or bytes spliced); dashboards that chart
//! `tcp_open_connections` by direction see both sides of the node.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::telemetry::metrics::{Direction, TcpCloseLabels, TcpLabels, TcpMetrics, TlsLabel};
use crate::transport::idle::Activity;

/// One inbound stream's series; counts the close when dropped, so a
/// stream that ends any way (EOF, error, the task cancelled) is closed once.
pub(super) struct InboundConn {
    metrics: Arc<TcpMetrics>,
    labels: TcpLabels,
    open: Gauge,
    start: Instant,
    /// Why it ended, when the handler knows better than `eof`.
    reason: &'static str,
}

impl InboundConn {
    /// Counts a stream to `pod` (its `namespace/name`, or `unknown`) at
    /// `target` as opened.
    pub(super) fn open(metrics: Arc<TcpMetrics>, pod: Option<&str>, target: SocketAddr) -> Self {
        let labels = TcpLabels {
            direction: Direction::Inbound,
            peer: "src",
            pod: pod.unwrap_or("unknown").to_string(),
            // Bounded like the outbound side's: `overflow` past the limit.
            target_addr: metrics.target_label(target),
            tls: TlsLabel::True,
        };
        metrics.open_total.get_or_create(&labels).inc();
        let open = metrics.open_connections.get_or_create(&labels).clone();
        open.inc();
        Self {
            metrics,
            labels,
            open,
            start: Instant::now(),
            reason: "eof",
        }
    }

    /// The counters a [`Counted`] stream adds its bytes to: read from the
    /// client, written to it.
    pub(super) fn byte_counters(&self) -> (Counter, Counter) {
        (
            self.metrics
                .read_bytes_total
                .get_or_create(&self.labels)
                .clone(),
            self.metrics
                .write_bytes_total
                .get_or_create(&self.labels)
                .clone(),
        )
    }

    /// The stream ended with an error (`reset` and the like).
    pub(super) fn failed(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for InboundConn {
    fn drop(&mut self) {
        self.open.dec();
        self.metrics
            .record_duration(&self.labels, self.start.elapsed());
        let classification = if self.reason == "eof" {
            "success"
        } else {
            "failure"
        };
        self.metrics
            .close_total
            .get_or_create(&TcpCloseLabels::new(
                &self.labels,
                classification,
                self.reason,
            ))
            .inc();
    }
}

/// A stream that adds what passes through it to two counters, and to the
/// connection table's entry when it has one (read: out from the client).
pub(super) struct Counted<T> {
    inner: T,
    read: Counter,
    written: Counter,
    activity: Option<Arc<Activity>>,
}

impl<T> Counted<T> {
    pub(super) fn new(inner: T, (read, written): (Counter, Counter)) -> Self {
        Self {
            inner,
            read,
            written,
            activity: None,
        }
    }

    pub(super) fn with_activity(mut self, activity: Option<Arc<Activity>>) -> Self {
        self.activity = activity;
        self
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read.inc_by(n as u64);
            if let Some(a) = &self.activity {
                a.moved_out(n as u64);
            }
        }
        r
    }
}

impl<T> Counted<T> {
    fn wrote(&self, n: usize) {
        self.written.inc_by(n as u64);
        if let Some(a) = &self.activity
            && n > 0
        {
            a.moved_in(n as u64);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_stream_is_opened_counted_and_closed_once() {
        let m = crate::telemetry::metrics::Metrics::new(8, 8);
        let (metrics, registry) = (m.tcp.clone(), &m.registry);
        let (a, mut b) = tokio::io::duplex(1024);
        {
            let target = "10.0.0.5:80".parse().unwrap();
            let mut conn = InboundConn::open(metrics.clone(), Some("default/web"), target);
            let mut io = Counted::new(a, conn.byte_counters());
            b.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            io.read_exact(&mut got).await.unwrap();
            io.write_all(b"hi").await.unwrap();
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            assert!(text.contains(r#"tcp_open_connections{direction="inbound",peer="src",pod="default/web",target_addr="10.0.0.5:80",tls="true"} 1"#), "{text}");
            conn.failed("reset");
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        for want in [
            r#"tcp_open_total{direction="inbound",peer="src",pod="default/web",target_addr="10.0.0.5:80",tls="true"} 1"#,
            r#"tcp_open_connections{direction="inbound",peer="src",pod="default/web",target_addr="10.0.0.5:80",tls="true"} 0"#,
            r#"tcp_read_bytes_total{direction="inbound",peer="src",pod="default/web",target_addr="10.0.0.5:80",tls="true"} 5"#,
            r#"tcp_write_bytes_total{direction="inbound",peer="src",pod="default/web",target_addr="10.0.0.5:80",tls="true"} 2"#,
            r#"tcp_close_total{direction="inbound",peer="src",pod="default/web",target_addr="10.0.0.5:80",tls="true",classification="failure",reason="reset"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
