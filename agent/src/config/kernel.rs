//! `[kernel]`: the kernel diagnostics (drop, retransmit and reset counters,
//! per-pod traffic, the event stream behind `waymark drops --follow`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Events each CPU may send to the agent per second, on average.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 200;
/// Events each CPU may send at once after a quiet spell.
pub const DEFAULT_EVENTS_BURST: u32 = 400;
/// How often the agent keeps a snapshot of the counters for `/drops?window=`.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
/// How far back `/drops?window=` can look.
pub const DEFAULT_HISTORY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// Load and attach the diagnostics programs. If the kernel refuses them
    /// the agent logs why and runs without them; proxying never depends on
    /// them.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Per-CPU rate of drop/reset events to the agent; past it events are
    /// only counted (`waymark_kernel_events_suppressed_total`). 0 turns
    /// events off; counters are kept either way.
    #[serde(default = "default_events_per_sec")]
    pub events_per_sec: u32,
    /// Per-CPU burst of events.
    #[serde(default = "default_events_burst")]
    pub events_burst: u32,
    /// Also count drops whose reason is `NOT_SPECIFIED`. Off by default:
    /// most of them are the normal end of a packet in code the kernel has
    /// not yet annotated with reasons.
    #[serde(default)]
    pub count_unspecified: bool,
    #[serde(default = "default_snapshot_interval", with = "humantime_serde")]
    pub snapshot_interval: Duration,
    #[serde(default = "default_history", with = "humantime_serde")]
    pub history: Duration,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            events_per_sec: DEFAULT_EVENTS_PER_SEC,
            events_burst: DEFAULT_EVENTS_BURST,
            count_unspecified: false,
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
            history: DEFAULT_HISTORY,
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_events_per_sec() -> u32 {
    DEFAULT_EVENTS_PER_SEC
}
fn default_events_burst() -> u32 {
    DEFAULT_EVENTS_BURST
}
fn default_snapshot_interval() -> Duration {
    DEFAULT_SNAPSHOT_INTERVAL
}
fn default_history() -> Duration {
    DEFAULT_HISTORY
}

impl KernelConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if self.snapshot_interval < Duration::from_secs(1) {
            problems.push("kernel.snapshot_interval: must be at least 1s".into());
        }
        if self.history < self.snapshot_interval {
            problems.push("kernel.history: must be at least kernel.snapshot_interval".into());
        } else if self.history.as_secs() / self.snapshot_interval.as_secs().max(1) > 100_000 {
            problems.push(
                "kernel.history: more than 100000 snapshots; raise kernel.snapshot_interval".into(),
            );
        }
        if self.events_per_sec > 0 && self.events_burst == 0 {
            problems.push("kernel.events_burst: must be at least 1 when events are on".into());
        }
    }
}
