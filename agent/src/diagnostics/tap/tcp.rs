//! Opaque TCP connections in the tap: one `tcp` event when a connection
//! closes, with its bytes both ways and how it closed. Only `from`, `to`
//! and `direction` filters can match them (a filter with an HTTP key takes
//! none); each counts as one request against `max`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::event::{self, Dst, Event, Meta, Src, TLS_NONE};
use super::filter::{Direction, DstView, SrcView};
use super::{Sink, TapHub, micros};

/// An opaque TCP connection that ended, as `proxy/outbound.rs` knows it.
pub struct TcpClosed<'a> {
    pub pod: &'a str,
    /// The client's address.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub duration: Duration,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub close: &'static str,
    pub error: Option<&'a str>,
    /// When the proxy ended it (refused it at a limit, found no endpoint,
    /// could not connect): its reason, shown as `source=proxy reason=…`.
    pub proxy: Option<crate::http::errors::ProxyError>,
}

impl TapHub {
    /// An opaque TCP connection closed; `conn` is only called while a tap
    /// is open.
    #[inline]
    pub fn tcp_closed<'a>(&self, conn: impl FnOnce() -> TcpClosed<'a>) {
        if self.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.tapped_tcp(conn());
    }

    #[cold]
    fn tapped_tcp(&self, c: TcpClosed<'_>) {
        let src = self.shown_source(c.pod, c.src);
        let view = DstView {
            addr: c.dst,
            dialled: c.dst,
            service: None,
            backend: None,
            pod: None,
            services: &[],
        };
        self.send_tcp(Direction::Out, &SrcView::pod(c.pod, src), &view, |id| {
            Event::Tcp {
                meta: Meta {
                    id,
                    proxy: event::OUTBOUND.into(),
                    src: Src {
                        addr: src,
                        pod: Some(c.pod.to_string()),
                        identity: None,
                    },
                    dst: Dst {
                        addr: c.dst,
                        dialled: c.dst,
                        service: None,
                        backend: None,
                        pod: None,
                    },
                    tls: TLS_NONE.into(),
                },
                bytes_out: c.bytes_out,
                bytes_in: c.bytes_in,
                duration_us: micros(c.duration),
                close: c.close.to_string(),
                error: c.error.map(str::to_string),
                source: c.proxy.map(|_| "proxy".to_string()),
                reason: c.proxy.map(|p| p.code().to_string()),
            }
        });
    }

    /// Sends the `tcp` event (`event`, given its id) of a closed connection
    /// to the taps that match it: encoded once, and not at all when none
    /// has room.
    pub(super) fn send_tcp(
        &self,
        direction: Direction,
        src: &SrcView<'_>,
        dst: &DstView<'_>,
        event: impl FnOnce(u64) -> Event,
    ) {
        let sinks: Vec<Arc<Sink>> = self
            .sinks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s.accepting() && s.filter.matches_tcp(direction, src, dst))
            .filter(|s| s.admit())
            .cloned()
            .collect();
        let ready: Vec<&Arc<Sink>> = sinks.iter().filter(|s| s.has_room()).collect();
        if !ready.is_empty() {
            let line = event(self.next_request.fetch_add(1, Ordering::Relaxed)).to_line();
            for s in ready {
                s.send(&line);
            }
        }
        for s in &sinks {
            s.request_ended();
        }
    }
}
