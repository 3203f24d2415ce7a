//! The wait before a retry: exponential growth with full jitter, so clients
//! that failed together do not retry together.

use std::time::Duration;

/// Exponential backoff with full jitter: before retry `attempt` (1 for the
/// first retry) the wait is uniform in `[0, min(max, base × 2^(attempt-1)))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// `r` is a uniform draw in `[0, 1)`; values outside are clamped, so a
    /// bad draw can shorten or cap the wait but never exceed `max`.
    /// `attempt` 0 is treated like 1.
    pub fn delay(&self, attempt: u32, r: f64) -> Duration {
        let doublings = attempt.saturating_sub(1);
        // An overflowing doubling is past any `max`, unless there is
        // nothing to double (a zero base backs off by nothing, however
        // many attempts).
        let ceiling = 2u32
            .checked_pow(doublings)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(
                if self.base.is_zero() {
                    Duration::ZERO
                } else {
                    self.max
                },
                |d| d.min(self.max),
            );
        // Full jitter (rather than ceiling/2 + jitter) spreads synchronized
        // failures the most, at the cost of sometimes retrying at once.
        let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
        ceiling.mul_f64(r).min(ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff() -> Backoff {
        Backoff {
            base: 25 * MS,
            max: 250 * MS,
        }
    }

    #[test]
    fn ceiling_doubles_per_attempt_then_caps() {
        let b = backoff();
        // r just below 1 shows the ceiling of each attempt.
        let ceilings: Vec<u128> = (1..=6)
            .map(|a| b.delay(a, 0.999_999).as_micros().div_ceil(1000))
            .collect();
        assert_eq!(ceilings, [25, 50, 100, 200, 250, 250]);
        assert_eq!(b.delay(0, 0.999_999), b.delay(1, 0.999_999));
        assert_eq!(b.delay(u32::MAX, 0.5), 125 * MS);
    }

    #[test]
    fn jitter_scales_linearly_and_bad_draws_are_clamped() {
        let b = backoff();
        assert_eq!(b.delay(2, 0.0), Duration::ZERO);
        assert_eq!(b.delay(2, 0.5), 25 * MS);
        assert_eq!(b.delay(2, -3.0), Duration::ZERO);
        assert_eq!(b.delay(2, 7.0), 50 * MS);
        assert_eq!(b.delay(2, f64::NAN), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn never_exceeds_max_nor_the_attempts_ceiling(
            base_ms in 0u64..10_000,
            max_ms in 0u64..100_000,
            attempt in any::<u32>(),
            r in 0.0f64..1.0,
        ) {
            let b = Backoff {
                base: Duration::from_millis(base_ms),
                max: Duration::from_millis(max_ms),
            };
            let d = b.delay(attempt, r);
            prop_assert!(d <= b.max);
            let exp = attempt.saturating_sub(1).min(40);
            prop_assert!(d.as_nanos() <= (base_ms as u128 * 1_000_000) << exp);
        }
    }
}
