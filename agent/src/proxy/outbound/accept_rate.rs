//! How fast one pod may open connections through the agent.
//!
//! `max_connections_per_pod` caps how many connections a pod holds, not how
//! fast it opens them. Every accepted connection costs the agent's shared
//! threads work before it costs anything else — the original destination,
//! a task, an upstream connect in the pod's namespace, detection — so a pod
//! opening thousands at once delays every other pod's requests for as long
//! as the burst lasts (measured by `cargo xtask bench-noisy`: another
//! pod's p99 went from tens of milliseconds to 1.8 s while one pod opened
//! 9,000 connections).
//!
//! Each pod has a token bucket, shared by its IPv4 and IPv6 listeners. A
//! connection beyond it is not refused: the pod's accept loop waits for the
//! next token, so the connections behind it stay in the kernel's accept
//! queue of *that pod's* listener (every pod has its own) and are accepted
//! later in order. The noisy pod is slowed down; nobody else notices; no
//! connection fails unless the pod keeps opening faster than the rate for
//! longer than its backlog lasts, and then the kernel drops its SYNs, which
//! its own TCP retransmits. Envoy's connection rate limit filter closes the
//! excess instead; delaying is kinder to bursty but honest clients.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The configured rate, the same for every pod.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptRate {
    /// Connections per second a pod may open in the long run; 0: no limit.
    pub per_second: u32,
    /// Connections a pod may open at once after being quiet.
    pub burst: u32,
}

impl AcceptRate {
    pub fn unlimited() -> Self {
        Self {
            per_second: 0,
            burst: 0,
        }
    }

    pub fn is_limited(&self) -> bool {
        self.per_second > 0
    }
}

/// One pod's bucket.
#[derive(Debug, Default)]
pub struct AcceptBucket {
    /// Tokens and when they were counted; `None` until the first
    /// connection, which finds the bucket full.
    state: Mutex<Option<(f64, Instant)>>,
}

impl AcceptBucket {
    /// Takes a token for a connection accepted at `now`: `None` when one
    /// was there, or how long the caller must wait before handling the
    /// connection (the token is taken all the same, so waiting callers
    /// queue up behind each other at the rate).
    pub fn take(&self, rate: AcceptRate, now: Instant) -> Option<Duration> {
        if !rate.is_limited() {
            return None;
        }
        let per_second = f64::from(rate.per_second);
        // A burst below one would never let a connection through.
        let burst = f64::from(rate.burst.max(1));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, since) = state.get_or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*since).as_secs_f64();
        *tokens = (*tokens + elapsed * per_second).min(burst);
        *since = now.max(*since);
        *tokens -= 1.0;
        if *tokens >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(-*tokens / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> AcceptRate {
        AcceptRate { per_second, burst }
    }

    #[test]
    fn no_limit_never_waits() {
        let b = AcceptBucket::default();
        let now = Instant::now();
        for _ in 0..100_000 {
            assert_eq!(b.take(AcceptRate::unlimited(), now), None);
        }
    }

    #[test]
    fn a_burst_goes_through_then_connections_wait_at_the_rate() {
        let b = AcceptBucket::default();
        let t0 = Instant::now();
        let r = rate(100, 10);
        for i in 0..10 {
            assert_eq!(b.take(r, t0), None, "connection {i} of the burst");
        }
        // The next ones, all at the same instant, queue 10 ms apart.
        for n in 1..=5u64 {
            let wait = b.take(r, t0).expect("over the burst");
            let expected = Duration::from_millis(10 * n);
            assert!(
                wait.abs_diff(expected) < Duration::from_micros(10),
                "connection {n} past the burst waits {wait:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn tokens_come_back_with_time_up_to_the_burst() {
        let b = AcceptBucket::default();
        let t0 = Instant::now();
        let r = rate(1000, 5);
        for _ in 0..5 {
            assert_eq!(b.take(r, t0), None);
        }
        assert!(b.take(r, t0).is_some());
        // After a long quiet time the bucket is full again, not fuller.
        let later = t0 + Duration::from_secs(60);
        for i in 0..5 {
            assert_eq!(
                b.take(r, later),
                None,
                "connection {i} after a quiet minute"
            );
        }
        assert!(b.take(r, later).is_some(), "the burst is a cap");
    }

    #[test]
    fn a_steady_pod_at_the_rate_never_waits() {
        let b = AcceptBucket::default();
        let t0 = Instant::now();
        let r = rate(200, 1);
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(5) * i;
            assert_eq!(b.take(r, now), None, "connection {i}");
        }
    }

    #[test]
    fn a_zero_burst_still_lets_connections_through_at_the_rate() {
        let b = AcceptBucket::default();
        let t0 = Instant::now();
        let r = rate(10, 0);
        assert_eq!(b.take(r, t0), None);
        let wait = b.take(r, t0).expect("second at once waits");
        assert!(wait.abs_diff(Duration::from_millis(100)) < Duration::from_micros(10));
    }

    #[test]
    fn an_instant_earlier_than_the_last_does_not_mint_tokens() {
        let b = AcceptBucket::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        let r = rate(10, 1);
        assert_eq!(b.take(r, t0), None);
        assert!(b.take(r, t0 - Duration::from_millis(500)).is_some());
    }
}
