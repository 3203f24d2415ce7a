//! Drop and reset events from the kernel's ring buffer, decoded for
//! `GET /drops/follow` and `waymark drops --follow`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use waymark_common::diag::{EVENT_DROP, EVENT_RESET_RECEIVED, EVENT_RESET_SENT, Event};

use super::{KernelDiag, snapshot::socket_addr};

/// One event, as the admin API streams it (one JSON object a line).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DropEvent {
    /// Wall-clock time, RFC 3339 with milliseconds.
    pub time: String,
    pub pod: String,
    /// `drop`, `reset_sent` or `reset_received`.
    pub kind: String,
    /// The kernel's drop reason (`NETFILTER_DROP`) or reset reason
    /// (`NO_SOCKET`); empty for a reset received.
    pub reason: String,
    /// `tcp`, `udp`, or the IP protocol number.
    pub proto: String,
    /// The flow: the socket's local and remote address when there was a
    /// socket, else the packet's source and destination. Absent when the
    /// packet had no IP header the program could read.
    pub src: Option<String>,
    pub dst: Option<String>,
    /// TCP state of the socket, if there was one.
    pub state: Option<String>,
    pub netns_cookie: u64,
    /// cgroup v2 id of the socket's cgroup; 0 without a socket.
    pub cgroup_id: u64,
}

/// Maps the kernel's monotonic clock (`bpf_ktime_get_ns`) to wall time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    boot: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        Clock {
            boot: SystemTime::now() - mono,
        }
    }

    fn wall(&self, ts_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(ts_ns)
    }
}

/// `include/net/tcp_states.h`; the same numbers are uapi as `BPF_TCP_*`.
fn tcp_state(state: u16) -> Option<&'static str> {
    Some(match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => return None,
    })
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

impl KernelDiag {
    fn decode(&self, e: &Event) -> DropEvent {
        let (kind, reason) = match e.kind {
            EVENT_DROP => ("drop", self.info.drop_reasons.name(e.reason)),
            EVENT_RESET_SENT => ("reset_sent", self.info.reset_reasons.name(e.reason)),
            EVENT_RESET_RECEIVED => ("reset_received", String::new()),
            _ => ("unknown", e.reason.to_string()),
        };
        let f = &e.flow;
        DropEvent {
            time: humantime::format_rfc3339_millis(self.clock.wall(e.ts_ns)).to_string(),
            pod: self.label(e.slot),
            kind: kind.into(),
            reason,
            proto: proto_name(f.proto),
            src: socket_addr(f.saddr, f.sport, f.family).map(|a| a.to_string()),
            dst: socket_addr(f.daddr, f.dport, f.family).map(|a| a.to_string()),
            state: tcp_state(e.state).map(str::to_string),
            netns_cookie: e.netns_cookie,
            cgroup_id: e.cgroup_id,
        }
    }
}

/// Drains the ring whenever it has data, until `stop`. Events nobody
/// follows are dropped here: the ring must keep room for new ones.
pub(super) async fn pump(ring: RingBuf<MapData>, diag: &KernelDiag, stop: CancellationToken) {
    // SAFETY: the ring owns its map fd and keeps it open, unreplaced, for
    // as long as the `AsyncFd` owns the ring.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the kernel event ring; no drop events");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            _ = stop.cancelled() => return,
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "polling the kernel event ring failed; no more drop events");
                    return;
                }
            },
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote an `Event` (checked length); read
            // unaligned since the ring only guarantees 8-byte alignment.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
            // No receiver is fine: nobody follows right now.
            let _ = diag.events.send(Arc::new(diag.decode(&event)));
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_protocols_have_names() {
        assert_eq!(tcp_state(1), Some("ESTABLISHED"));
        assert_eq!(tcp_state(0), None);
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(132), "132");
    }

    #[test]
    fn the_kernel_clock_maps_to_wall_time() {
        let c = Clock::now();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let skew = SystemTime::now()
            .duration_since(c.wall(mono))
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(1), "{skew:?}");
    }
}
