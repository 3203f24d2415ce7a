//! What an endpoint's recent past looks like to an operator (`waymark
//! endpoints`, `waymark check`): requests that succeeded and failed in the
//! last [`WINDOW`], the last error and when it happened, and why the
//! endpoint was last ejected. The balancer's decisions never read it.
//!
//! Counts are kept in [`BUCKETS`] buckets of `WINDOW / BUCKETS`, so "the
//! last minute" is exact to one bucket: a ring of fixed slots, no
//! allocation per request.

use std::time::{Duration, Instant, SystemTime};

/// How far back "recent" reaches.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Slots the window is counted in.
const BUCKETS: usize = 6;
const BUCKET: Duration = Duration::from_secs(WINDOW.as_secs() / BUCKETS as u64);

/// Longest error text kept (a connect error with its OS detail fits).
const MAX_ERROR: usize = 256;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket of time since `born` this slot holds now.
    index: u64,
    successes: u64,
    failures: u64,
}

#[derive(Debug)]
pub(super) struct History {
    born: Instant,
    buckets: [Bucket; BUCKETS],
    last_error: Option<(SystemTime, String)>,
    ejection_reason: Option<String>,
}

/// Outcomes in the last [`WINDOW`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    pub successes: u64,
    pub failures: u64,
}

impl History {
    pub(super) fn new(now: Instant) -> Self {
        History {
            born: now,
            buckets: [Bucket::default(); BUCKETS],
            last_error: None,
            ejection_reason: None,
        }
    }

    fn index(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.born).as_nanos() / BUCKET.as_nanos()) as u64
    }

    pub(super) fn record(&mut self, now: Instant, success: bool) {
        let index = self.index(now);
        let slot = &mut self.buckets[(index % BUCKETS as u64) as usize];
        if slot.index != index {
            *slot = Bucket {
                index,
                ..Bucket::default()
            };
        }
        if success {
            slot.successes += 1;
        } else {
            slot.failures += 1;
        }
    }

    pub(super) fn recent(&self, now: Instant) -> Recent {
        let newest = self.index(now);
        let oldest = newest.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=newest).contains(&b.index))
            .fold(Recent::default(), |r, b| Recent {
                successes: r.successes + b.successes,
                failures: r.failures + b.failures,
            })
    }

    pub(super) fn error(&mut self, at: SystemTime, error: &str) {
        let mut text = error.to_string();
        if text.len() > MAX_ERROR {
            let mut cut = MAX_ERROR;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        self.last_error = Some((at, text));
    }

    pub(super) fn last_error(&self) -> Option<&(SystemTime, String)> {
        self.last_error.as_ref()
    }

    pub(super) fn ejected(&mut self, reason: String) {
        self.ejection_reason = Some(reason);
    }

    pub(super) fn ejection_reason(&self) -> Option<&str> {
        self.ejection_reason.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_counts_cover_the_last_window_only() {
        let t0 = Instant::now();
        let mut h = History::new(t0);
        h.record(t0, true);
        h.record(t0 + Duration::from_secs(5), false);
        h.record(t0 + Duration::from_secs(25), false);
        assert_eq!(
            h.recent(t0 + Duration::from_secs(30)),
            Recent {
                successes: 1,
                failures: 2
            }
        );
        // A minute on, the first bucket (0–10s) has left the window.
        assert_eq!(
            h.recent(t0 + Duration::from_secs(65)),
            Recent {
                successes: 0,
                failures: 1
            }
        );
        // A slot reused for a later bucket starts from zero.
        h.record(t0 + Duration::from_secs(61), true);
        assert_eq!(
            h.recent(t0 + Duration::from_secs(65)),
            Recent {
                successes: 1,
                failures: 1
            }
        );
        assert_eq!(h.recent(t0 + Duration::from_secs(600)), Recent::default());
    }

    #[test]
    fn errors_are_kept_short_and_whole() {
        let mut h = History::new(Instant::now());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        h.error(at, &"é".repeat(200));
        let (when, text) = h.last_error().unwrap();
        assert_eq!(*when, at);
        assert!(text.len() <= MAX_ERROR + '…'.len_utf8(), "{}", text.len());
        assert!(text.ends_with('…'));
        h.error(at, "connection refused");
        assert_eq!(h.last_error().unwrap().1, "connection refused");
        assert_eq!(h.ejection_reason(), None);
        h.ejected("5 consecutive failures".into());
        assert_eq!(h.ejection_reason(), Some("5 consecutive failures"));
    }
}
