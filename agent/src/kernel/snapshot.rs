//! Counter snapshots, the history `/drops?window=` is computed from, and
//! the report it returns (also what `waymark drops` reads).

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use waymark_common::{
    FAMILY_V4, FAMILY_V6,
    diag::{FlowTuple, PodStats},
};

use super::ProgramState;

/// Every counter at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub taken: Instant,
    /// (slot, reason) -> drops.
    pub drops: BTreeMap<(u32, u32), u64>,
    /// Index = slot.
    pub stats: Vec<PodStats>,
    /// Reply bytes a sockmap delivered to each slot's sockets (the reply
    /// shortcut), counted since the agent started; index = slot (shorter
    /// when there is no such source: zeros).
    pub sockmap_in: Vec<u64>,
    /// Request bytes a sockmap took from each slot's sockets (the request
    /// shortcut), the same way.
    pub sockmap_out: Vec<u64>,
    pub suppressed: u64,
    pub lost: u64,
}

/// Snapshots over the configured history, oldest first.
pub struct History {
    keep: Duration,
    snapshots: VecDeque<Snapshot>,
}

impl History {
    pub fn new(keep: Duration) -> Self {
        History {
            keep,
            snapshots: VecDeque::new(),
        }
    }

    pub fn push(&mut self, s: Snapshot) {
        let taken = s.taken;
        self.snapshots.push_back(s);
        // Keep one snapshot older than the horizon, so a window of exactly
        // `keep` still has its start.
        while self.snapshots.len() > 1 && taken.duration_since(self.snapshots[1].taken) >= self.keep
        {
            self.snapshots.pop_front();
        }
    }

    /// The newest snapshot at least `window` before `now`, else the oldest
    /// (the report then covers less than asked, and says so).
    pub fn at_or_before(&self, now: Instant, window: Duration) -> Option<&Snapshot> {
        let start = now.checked_sub(window);
        start
            .and_then(|start| self.snapshots.iter().rev().find(|s| s.taken <= start))
            .or_else(|| self.snapshots.front())
    }
}

/// Per-CPU values summed.
pub fn sum_stats<'a>(values: impl Iterator<Item = &'a PodStats>) -> PodStats {
    values.fold(PodStats::default(), |mut t, v| {
        t.retransmits += v.retransmits;
        t.syn_retransmits += v.syn_retransmits;
        t.resets_sent += v.resets_sent;
        t.resets_received += v.resets_received;
        t.bytes_in += v.bytes_in;
        t.bytes_out += v.bytes_out;
        t.packets_in += v.packets_in;
        t.packets_out += v.packets_out;
        t
    })
}

/// One drop reason's count.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonCount {
    pub reason: String,
    pub count: u64,
}

/// One pod's (or the node's) counters over the window.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodReport {
    pub pod: String,
    /// Most frequent first.
    pub drops: Vec<ReasonCount>,
    pub drops_total: u64,
    pub retransmits: u64,
    /// Retransmitted SYNs: connection attempts left unanswered.
    pub syn_retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// The part of `bytes_in` a sockmap moved straight into the pod's
    /// sockets (the reply shortcut): payload without packets.
    #[serde(default)]
    pub sockmap_bytes_in: u64,
    /// The part of `bytes_out` a sockmap moved straight from the pod's
    /// sockets to the agent's (the request shortcut).
    #[serde(default)]
    pub sockmap_bytes_out: u64,
}

/// The answer of `GET /drops`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DropsReport {
    pub node: String,
    /// The span the counts cover: the window asked for, or less when the
    /// agent has not been up (or kept history) that long.
    pub window_secs: f64,
    pub requested_window_secs: f64,
    /// The node first, then pods in config order.
    pub pods: Vec<PodReport>,
    /// Events the per-CPU rate limit held back, and those the ring had no
    /// room for, over the window.
    pub events_suppressed: u64,
    pub events_lost: u64,
    pub programs: Vec<ProgramState>,
}

/// `now - base` (or `now` alone without a base), per slot.
pub fn report(
    now: &Snapshot,
    base: Option<&Snapshot>,
    label: impl Fn(u32) -> String,
    reason_name: impl Fn(u32) -> String,
) -> DropsReport {
    let zero = PodStats::default();
    let mut pods = Vec::with_capacity(now.stats.len());
    for (slot, stats) in now.stats.iter().enumerate() {
        let slot = slot as u32;
        let then = base
            .and_then(|b| b.stats.get(slot as usize))
            .unwrap_or(&zero);
        let sockmap_of = |s: &Snapshot| s.sockmap_in.get(slot as usize).copied().unwrap_or(0);
        let sockmap_in = sockmap_of(now).saturating_sub(base.map_or(0, sockmap_of));
        let sockmap_out_of = |s: &Snapshot| s.sockmap_out.get(slot as usize).copied().unwrap_or(0);
        let sockmap_out = sockmap_out_of(now).saturating_sub(base.map_or(0, sockmap_out_of));
        let mut drops: Vec<ReasonCount> = now
            .drops
            .range((slot, 0)..=(slot, u32::MAX))
            .filter_map(|(&(_, reason), &n)| {
                let before = base
                    .and_then(|b| b.drops.get(&(slot, reason)))
                    .copied()
                    .unwrap_or(0);
                // An LRU eviction can make a counter go backwards: count
                // nothing rather than a wrapped number.
                let count = n.saturating_sub(before);
                (count > 0).then(|| ReasonCount {
                    reason: reason_name(reason),
                    count,
                })
            })
            .collect();
        drops.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(&b.reason)));
        pods.push(PodReport {
            pod: label(slot),
            drops_total: drops.iter().map(|d| d.count).sum(),
            drops,
            retransmits: stats.retransmits.saturating_sub(then.retransmits),
            syn_retransmits: stats.syn_retransmits.saturating_sub(then.syn_retransmits),
            resets_sent: stats.resets_sent.saturating_sub(then.resets_sent),
            resets_received: stats.resets_received.saturating_sub(then.resets_received),
            bytes_in: stats.bytes_in.saturating_sub(then.bytes_in) + sockmap_in,
            bytes_out: stats.bytes_out.saturating_sub(then.bytes_out) + sockmap_out,
            packets_in: stats.packets_in.saturating_sub(then.packets_in),
            packets_out: stats.packets_out.saturating_sub(then.packets_out),
            sockmap_bytes_in: sockmap_in,
            sockmap_bytes_out: sockmap_out,
        });
    }
    DropsReport {
        window_secs: base.map_or(0.0, |b| now.taken.duration_since(b.taken).as_secs_f64()),
        pods,
        events_suppressed: now
            .suppressed
            .saturating_sub(base.map_or(0, |b| b.suppressed)),
        events_lost: now.lost.saturating_sub(base.map_or(0, |b| b.lost)),
        ..DropsReport::default()
    }
}

/// What the kernel counted on one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlowCounters {
    pub drops: u64,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
}

/// The flow map's key of a TCP connection from `local` to `peer`.
pub fn flow_key(local: SocketAddr, peer: SocketAddr) -> FlowTuple {
    let (saddr, family) = words(local.ip());
    let (daddr, _) = words(peer.ip());
    FlowTuple {
        saddr,
        daddr,
        sport: local.port(),
        dport: peer.port(),
        family,
        proto: 6,
        _pad: 0,
    }
}

/// An address as the programs store it: network-order words, IPv4 (also
/// v4-mapped) in the first.
fn words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (
                [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]])),
                FAMILY_V6,
            )
        }
    }
}

/// The address of a flow end, back to std.
pub fn socket_addr(words: [u32; 4], port: u16, family: u16) -> Option<SocketAddr> {
    match family {
        FAMILY_V4 => Some(SocketAddr::new(IpAddr::from(words[0].to_ne_bytes()), port)),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (chunk, w) in o.chunks_exact_mut(4).zip(words) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            Some(SocketAddr::new(IpAddr::from(o), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(at: Instant, drops: &[((u32, u32), u64)], retrans: u64) -> Snapshot {
        Snapshot {
            taken: at,
            drops: drops.iter().copied().collect(),
            stats: vec![
                PodStats::default(),
                PodStats {
                    retransmits: retrans,
                    ..PodStats::default()
                },
            ],
            sockmap_in: vec![0, 10 * retrans],
            sockmap_out: vec![0, 5 * retrans],
            suppressed: 0,
            lost: 0,
        }
    }

    #[test]
    fn a_window_subtracts_the_snapshot_at_its_start() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(60));
        h.push(snap(t0, &[((1, 12), 5)], 1));
        h.push(snap(t0 + Duration::from_secs(30), &[((1, 12), 8)], 4));
        let now = snap(
            t0 + Duration::from_secs(61),
            &[((1, 12), 20), ((1, 3), 2)],
            10,
        );
        let base = h.at_or_before(now.taken, Duration::from_secs(31));
        let r = report(&now, base, |s| format!("pod{s}"), |r| format!("R{r}"));
        assert_eq!(r.window_secs, 31.0);
        let p = &r.pods[1];
        assert_eq!(p.pod, "pod1");
        assert_eq!(
            p.drops,
            vec![
                ReasonCount {
                    reason: "R12".into(),
                    count: 12
                },
                ReasonCount {
                    reason: "R3".into(),
                    count: 2
                }
            ]
        );
        assert_eq!(p.drops_total, 14);
        assert_eq!(p.retransmits, 6);
        // Sockmap bytes are bytes in too.
        assert_eq!((p.sockmap_bytes_in, p.bytes_in), (60, 60));
        assert_eq!((p.sockmap_bytes_out, p.bytes_out), (30, 30));
        // Longer than the history: the oldest snapshot.
        let base = h
            .at_or_before(now.taken, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(base.taken, t0);
    }

    #[test]
    fn history_is_bounded() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(10));
        for i in 0..100 {
            h.push(snap(t0 + Duration::from_secs(i), &[], 0));
        }
        assert!(h.snapshots.len() <= 12, "{}", h.snapshots.len());
    }

    #[test]
    fn flow_keys_match_the_kernel_layout() {
        let k = flow_key(
            "10.1.0.2:43122".parse().unwrap(),
            "[::ffff:10.2.0.2]:8080".parse().unwrap(),
        );
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.saddr[0].to_ne_bytes(), [10, 1, 0, 2]);
        assert_eq!(k.daddr[0].to_ne_bytes(), [10, 2, 0, 2]);
        assert_eq!((k.sport, k.dport), (43122, 8080));
        assert_eq!(
            socket_addr(k.daddr, k.dport, k.family),
            Some("10.2.0.2:8080".parse().unwrap())
        );
        let v6 = flow_key(
            "[fd00::1]:1".parse().unwrap(),
            "[fd00::2]:2".parse().unwrap(),
        );
        assert_eq!(v6.family, FAMILY_V6);
        assert_eq!(
            socket_addr(v6.saddr, 1, FAMILY_V6),
            Some("[fd00::1]:1".parse().unwrap())
        );
    }
}
