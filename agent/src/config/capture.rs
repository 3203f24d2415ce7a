//! `[capture]`: packet capture on demand through the admin API
//! (`waymark capture`), and its bounds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default bound on captures running at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 2;
/// Default longest capture.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(300);
/// Default largest capture (pcapng bytes).
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// Whether `POST /capture` is served at all.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Captures running at once; more are refused with 429.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// The longest capture a request may ask for.
    #[serde(default = "default_max_duration", with = "humantime_serde")]
    pub max_duration: Duration,
    /// The most pcapng bytes one capture may write.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Whether a node capture may embed the tunnel's TLS session secrets
    /// (`keylog=1`). Off by default: anyone who can reach the admin API
    /// could then read the tunnel's traffic.
    #[serde(default)]
    pub keylog: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_duration: DEFAULT_MAX_DURATION,
            max_bytes: DEFAULT_MAX_BYTES,
            keylog: false,
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}
fn default_max_duration() -> Duration {
    DEFAULT_MAX_DURATION
}
fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

/// Range checks, appended to the config's problem list.
pub fn validate(c: &CaptureConfig, problems: &mut Vec<String>) {
    if c.max_concurrent == 0 || c.max_concurrent > 16 {
        problems.push(format!(
            "capture.max_concurrent: {} is out of range; use 1 to 16 (or capture.enabled = false)",
            c.max_concurrent
        ));
    }
    if c.max_duration.is_zero() || c.max_duration > Duration::from_secs(3600) {
        problems.push(format!(
            "capture.max_duration: {} is out of range; use more than 0 and at most 1h",
            humantime::format_duration(c.max_duration)
        ));
    }
    if c.max_bytes < 4096 || c.max_bytes > 4 << 30 {
        problems.push(format!(
            "capture.max_bytes: {} is out of range; use 4096 to 4 GiB",
            c.max_bytes
        ));
    }
}
