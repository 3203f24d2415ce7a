//! Connections the kernel refused at a connection limit, made visible.
//!
//! A pod at `outbound.max_connections_per_pod` (or a node at
//! `outbound.max_connections`) has its next `connect()` refused by the
//! connect hook with `ECONNREFUSED` before a SYN leaves
//! (`ebpf/kernel/src/limits.rs`), so the agent never sees the attempt. The
//! operator must still see it where the agent's own refusals show: counted
//! in `waymark_outbound_refused_total{pod,limit}`, as a tap event
//! `close=refused source=proxy reason=limit`, and in the log once a minute
//! per pod. The kernel keeps exact counts per pod and puts each refusal on
//! a ring without waking anyone; this task drains the ring and folds the
//! counts into the metric on a timer, so a pod hammering its limit costs
//! the agent a few wake-ups a second, not one per attempt.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use tokio_util::sync::CancellationToken;
use tracing::info;
use waymark_common::PodSockets;

use crate::diagnostics::tap::{TapHub, TcpClosed};
use crate::http::errors::ProxyError;
use crate::redirect::{Caller, ConnectRefused, Redirect, drain_refusals};
use crate::telemetry::metrics::{RefusedLabels, TcpMetrics};

/// How often the ring is drained (the tap events' delay at most).
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// How often the counts are read when the ring was empty: a refusal the
/// full ring dropped still reaches the metric within this.
const COUNT_EVERY: Duration = Duration::from_secs(1);
/// A pod at its limit is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The kernel's per-pod refusal counts, folded into
/// `waymark_outbound_refused_total` as they grow: on the drain task's
/// timer, and before every scrape so that a scrape sees them all.
pub struct RefusalCounts {
    pub redirect: Arc<RwLock<Redirect>>,
    /// The enrolled pods' names by netns cookie (kept by `enrollment`).
    pub names: Arc<RwLock<HashMap<u64, String>>>,
    pub metrics: Arc<TcpMetrics>,
    folded: Mutex<Folded>,
    /// The process of each pod's latest refusal on the ring, for the log.
    callers: Mutex<HashMap<u64, Caller>>,
}

impl RefusalCounts {
    pub fn new(
        redirect: Arc<RwLock<Redirect>>,
        names: Arc<RwLock<HashMap<u64, String>>>,
        metrics: Arc<TcpMetrics>,
    ) -> Self {
        Self {
            redirect,
            names,
            metrics,
            folded: Mutex::default(),
            callers: Mutex::default(),
        }
    }

    /// The kernel's per-pod counts by netns cookie, and the names to read
    /// them by (read after the counts: a pod enrolled in between has no
    /// count yet).
    fn counts(&self) -> (Vec<(u64, PodSockets)>, Names<'_>) {
        let counts = self
            .redirect
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .pod_sockets();
        (counts, self.names.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Each enrolled pod's redirected sockets as the kernel counts them,
    /// by name (for `/conns`).
    pub fn pod_sockets(&self) -> Vec<(String, i64)> {
        let (counts, names) = self.counts();
        counts
            .into_iter()
            .filter_map(|(cookie, c)| Some((names.get(&cookie)?.clone(), c.open.max(0))))
            .collect()
    }

    /// Adds what the kernel refused since the last call to the metric.
    pub fn sync(&self) {
        let (counts, names) = self.counts();
        let mut folded = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        for (pod, limit, new) in folded.fold(&counts) {
            let Some(name) = names.get(&pod) else {
                continue;
            };
            self.metrics
                .refused_total
                .get_or_create(&RefusedLabels {
                    pod: name.clone(),
                    limit,
                })
                .inc_by(new);
            if folded.log_due(pod) {
                let callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
                info!(
                    pod = %name,
                    limit,
                    refused = new,
                    process = callers.get(&pod).map(tracing::field::display),
                    "the pod is at its connection limit: the kernel refuses its new connect()s with ECONNREFUSED"
                );
            }
        }
    }
}

/// The enrolled pods' names by netns cookie, read-locked.
type Names<'a> = std::sync::RwLockReadGuard<'a, HashMap<u64, String>>;

/// The task that drains the kernel's refusal ring into tap and keeps the
/// counts folded.
pub struct KernelRefusals {
    pub counts: Arc<RefusalCounts>,
    pub ring: RingBuf<MapData>,
    pub tap: Arc<TapHub>,
}

impl KernelRefusals {
    /// Runs until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut counted_at = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut refused = Vec::new();
            drain_refusals(&mut self.ring, |r| refused.push(r));
            if refused.is_empty() && counted_at.elapsed() < COUNT_EVERY {
                continue;
            }
            counted_at = Instant::now();
            if !refused.is_empty() {
                let names = self.counts.names.read().unwrap_or_else(|e| e.into_inner());
                for r in &refused {
                    self.tap_event(&names, r);
                }
                let mut callers = self
                    .counts
                    .callers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                callers.retain(|pod, _| names.contains_key(pod));
                for r in refused {
                    if let Some(p) = r.process {
                        callers.insert(r.netns_cookie, p);
                    }
                }
            }
            self.counts.sync();
        }
    }

    fn tap_event(&self, names: &HashMap<u64, String>, r: &ConnectRefused) {
        let Some(pod) = names.get(&r.netns_cookie) else {
            return;
        };
        // The socket never got an address of its own: the pod's loopback,
        // which tap shows as the pod's address.
        let src = SocketAddr::new(
            if r.dst.is_ipv4() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            },
            0,
        );
        let error = refusal_message(r);
        self.tap.tcp_closed(|| TcpClosed {
            pod,
            src,
            dst: r.dst,
            duration: Duration::ZERO,
            bytes_out: 0,
            bytes_in: 0,
            close: "refused",
            error: Some(&error),
            proxy: Some(ProxyError::Limit),
        });
    }
}

/// What tap says of a refusal: the limit, and who in the pod hit it
/// where the kernel tells.
fn refusal_message(r: &ConnectRefused) -> String {
    let limit = super::limit_message(r.limit);
    match &r.process {
        Some(p) => format!("{limit} (connect() by {p})"),
        None => limit.to_string(),
    }
}

/// The kernel's refusal counts already added to the metric, per pod.
#[derive(Default)]
struct Folded {
    seen: HashMap<u64, (u64, u64)>,
    logged: HashMap<u64, Instant>,
}

impl Folded {
    /// The refusals new since the last call, per pod and limit. A count
    /// below the one seen means the pod's entry was made again: all of it
    /// is new.
    fn fold(&mut self, counts: &[(u64, PodSockets)]) -> Vec<(u64, &'static str, u64)> {
        let mut new = Vec::new();
        let mut seen = HashMap::with_capacity(counts.len());
        for (pod, c) in counts {
            let (pod_before, total_before) = self.seen.get(pod).copied().unwrap_or_default();
            let since = |now: u64, before: u64| if now >= before { now - before } else { now };
            for (limit, n) in [
                ("pod_connections", since(c.refused_pod, pod_before)),
                ("agent_connections", since(c.refused_total, total_before)),
            ] {
                if n > 0 {
                    new.push((*pod, limit, n));
                }
            }
            seen.insert(*pod, (c.refused_pod, c.refused_total));
        }
        self.seen = seen;
        self.logged.retain(|pod, _| self.seen.contains_key(pod));
        new
    }

    /// Whether the pod's refusals are to be logged now.
    fn log_due(&mut self, pod: u64) -> bool {
        let now = Instant::now();
        match self.logged.get(&pod) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                self.logged.insert(pod, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pod: u64, refused_pod: u64, refused_total: u64) -> (u64, PodSockets) {
        (
            pod,
            PodSockets {
                open: 0,
                refused_pod,
                refused_total,
            },
        )
    }

    #[test]
    fn only_what_is_new_is_added_and_a_remade_entry_counts_whole() {
        let mut f = Folded::default();
        assert_eq!(
            f.fold(&[counts(7, 5, 0), counts(8, 0, 0)]),
            vec![(7, "pod_connections", 5)]
        );
        assert_eq!(f.fold(&[counts(7, 5, 0), counts(8, 0, 0)]), vec![]);
        assert_eq!(
            f.fold(&[counts(7, 9, 2)]),
            vec![(7, "pod_connections", 4), (7, "agent_connections", 2)]
        );
        // The pod left and came back: its entry starts again from zero.
        assert_eq!(f.fold(&[counts(7, 3, 2)]), vec![(7, "pod_connections", 3)]);
    }

    #[test]
    fn a_refusal_names_its_process_when_the_kernel_tells() {
        let mut r = ConnectRefused {
            netns_cookie: 7,
            dst: "10.0.0.1:80".parse().unwrap(),
            limit: "pod_connections",
            process: None,
        };
        assert_eq!(
            refusal_message(&r),
            "the pod's connections reached outbound.max_connections_per_pod"
        );
        r.process = Some(Caller {
            pid: 4242,
            thread: "java".into(),
        });
        assert_eq!(
            refusal_message(&r),
            "the pod's connections reached outbound.max_connections_per_pod (connect() by pid 4242, thread java)"
        );
    }

    #[test]
    fn a_pod_is_logged_once_a_minute() {
        let mut f = Folded::default();
        f.fold(&[counts(7, 1, 0)]);
        assert!(f.log_due(7));
        assert!(!f.log_due(7));
        assert!(f.log_due(8));
    }
}
