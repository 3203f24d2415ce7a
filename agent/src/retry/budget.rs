//! The retry budget (Linkerd's `retryBudget`): retries may add at most a
//! fixed ratio on top of the original requests seen over a sliding window,
//! plus a small steady allowance so quiet services can still retry. It is
//! what keeps a brown-out from turning into a retry storm.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::RetryError;

/// The window is kept as this many slots, so requests expire a slot at a
/// time: a finer split costs more per call, a coarser one lets old traffic
/// linger for up to a tenth of the ttl longer.
const SLOTS: usize = 10;

/// Budget units one retry costs. An original request deposits
/// `floor(ratio × UNIT)`, so ratios are honoured to one millionth and the
/// flooring can only make the budget stricter, never looser.
const UNIT: i64 = 1_000_000;

/// Counts original requests ("deposits") and retries ("withdrawals") over
/// the last `ttl`, allowing a retry only while
/// `retries ≤ ratio × requests + min_per_second × ttl` over that window.
///
/// Shared by every request of a service; one short critical section per call.
#[derive(Debug)]
pub struct RetryBudget {
    /// Units per original request.
    deposit: i64,
    /// Units that are always there: `min_per_second × ttl` retries' worth.
    reserve: i64,
    slot_len: Duration,
    start: Instant,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// Net units (deposits minus withdrawals) per slot, as a ring.
    slots: [i64; SLOTS],
    /// Slots elapsed since `start` at the latest call; `epoch % SLOTS` is
    /// the slot that takes new deposits and withdrawals.
    epoch: u64,
}

impl RetryBudget {
    /// `ratio` in `[0, 1000]` (0.2 = retries may add 20%), `ttl` from 1 s to
    /// 60 s, as Linkerd and tower accept.
    pub fn new(
        ratio: f64,
        min_per_second: u32,
        ttl: Duration,
        now: Instant,
    ) -> Result<Self, RetryError> {
        // Written so that NaN fails too.
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(RetryError::RatioOutOfRange(ratio));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(RetryError::TtlOutOfRange(ttl));
        }
        // In range, so the products below fit: ≤ 1e9 per deposit, and the
        // reserve ≤ u32::MAX × 60 × 1e6 ≈ 2.6e17 < i64::MAX.
        let deposit = (ratio * UNIT as f64).floor() as i64;
        let reserve = u128::from(min_per_second) * ttl.as_nanos() * UNIT as u128 / 1_000_000_000;
        Ok(Self {
            deposit,
            reserve: reserve as i64,
            slot_len: ttl / SLOTS as u32,
            start: now,
            window: Mutex::new(Window {
                slots: [0; SLOTS],
                epoch: 0,
            }),
        })
    }

    /// Records one original request (not a retry).
    pub fn deposit(&self, now: Instant) {
        let mut window = self.window_at(now);
        let slot = window.current();
        *slot = slot.saturating_add(self.deposit);
    }

    /// Takes one retry from the budget; `false` means it is spent and the
    /// failure should go to the client as it is.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut window = self.window_at(now);
        if window.balance(self.reserve) < UNIT {
            return false;
        }
        *window.current() -= UNIT;
        true
    }

    /// How many retries the budget would allow right now (for diagnostics).
    pub fn available(&self, now: Instant) -> u64 {
        let balance = self.window_at(now).balance(self.reserve);
        u64::try_from(balance / UNIT).unwrap_or(0)
    }

    /// The window, with slots older than `ttl` emptied.
    fn window_at(&self, now: Instant) -> std::sync::MutexGuard<'_, Window> {
        // The window holds only counters, each update a single store, so a
        // panic elsewhere cannot leave it inconsistent: keep using it.
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(self.start);
        let epoch = (elapsed.as_nanos() / self.slot_len.as_nanos()) as u64;
        // Tasks read the clock before taking the lock, so `now` can arrive
        // slightly out of order; an older instant counts in the current slot
        // rather than rewinding the ring.
        if epoch > window.epoch {
            let stale = (epoch - window.epoch).min(SLOTS as u64);
            for i in 1..=stale {
                let index = ((window.epoch + i) % SLOTS as u64) as usize;
                window.slots[index] = 0;
            }
            window.epoch = epoch;
        }
        window
    }
}

impl Window {
    fn current(&mut self) -> &mut i64 {
        &mut self.slots[(self.epoch % SLOTS as u64) as usize]
    }

    fn balance(&self, reserve: i64) -> i64 {
        self.slots
            .iter()
            .fold(reserve, |sum, slot| sum.saturating_add(*slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Duration = Duration::from_secs(1);

    fn withdraw_all(budget: &RetryBudget, now: Instant) -> u64 {
        let mut n = 0;
        while budget.try_withdraw(now) {
            n += 1;
        }
        n
    }

    #[test]
    fn rejects_out_of_range_ratio_and_ttl() {
        let now = Instant::now();
        for ratio in [-0.1, 1000.5, f64::NAN, f64::INFINITY] {
            let err = RetryBudget::new(ratio, 10, 10 * SEC, now).unwrap_err();
            assert!(matches!(err, RetryError::RatioOutOfRange(_)), "{ratio}");
        }
        for ttl in [Duration::ZERO, SEC / 2, 61 * SEC] {
            let err = RetryBudget::new(0.2, 10, ttl, now).unwrap_err();
            assert!(err.to_string().contains(&format!("{ttl:?}")), "{err}");
        }
        for (ratio, ttl) in [(0.0, SEC), (1000.0, 60 * SEC)] {
            assert!(RetryBudget::new(ratio, 0, ttl, now).is_ok());
        }
    }

    #[test]
    fn min_per_second_allows_retries_without_traffic() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 10, 10 * SEC, t0).unwrap();
        assert_eq!(budget.available(t0), 100);
        assert_eq!(withdraw_all(&budget, t0), 100);
        // Those retries stay counted for the whole ttl, then expire.
        assert_eq!(withdraw_all(&budget, t0 + 9 * SEC), 0);
        assert_eq!(withdraw_all(&budget, t0 + 10 * SEC), 100);
    }

    #[test]
    fn ratio_of_recent_requests_adds_to_the_reserve() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.2, 0, 10 * SEC, t0).unwrap();
        assert!(!budget.try_withdraw(t0));
        for _ in 0..100 {
            budget.deposit(t0);
        }
        assert_eq!(withdraw_all(&budget, t0 + 5 * SEC), 20);
        for _ in 0..10 {
            budget.deposit(t0 + 5 * SEC);
        }
        assert_eq!(withdraw_all(&budget, t0 + 5 * SEC), 2);
    }

    #[test]
    fn old_requests_expire_a_slot_at_a_time() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(1.0, 0, 10 * SEC, t0).unwrap();
        for i in 0..10 {
            budget.deposit(t0 + i * SEC);
        }
        assert_eq!(budget.available(t0 + 9 * SEC), 10);
        // Each further second drops the oldest slot's deposit.
        assert_eq!(budget.available(t0 + 10 * SEC), 9);
        assert_eq!(budget.available(t0 + 15 * SEC), 4);
        assert_eq!(budget.available(t0 + 19 * SEC), 0);
        // Long idle gaps empty everything, however long.
        budget.deposit(t0 + 20 * SEC);
        assert_eq!(budget.available(t0 + 1000 * SEC), 0);
    }

    #[test]
    fn late_instants_count_in_the_current_slot() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(1.0, 0, 10 * SEC, t0).unwrap();
        budget.deposit(t0 + 30 * SEC);
        // A task that read the clock earlier must not rewind the window.
        budget.deposit(t0 + 5 * SEC);
        assert_eq!(budget.available(t0 + 30 * SEC), 2);
        assert_eq!(budget.available(t0), 2);
    }

    #[test]
    fn zero_ratio_and_zero_minimum_never_retry() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.0, 0, SEC, t0).unwrap();
        for _ in 0..1000 {
            budget.deposit(t0);
        }
        assert!(!budget.try_withdraw(t0));
    }

    #[test]
    fn shared_across_threads() {
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<RetryBudget>();
        let t0 = Instant::now();
        let budget = RetryBudget::new(0.5, 1, 10 * SEC, t0).unwrap();
        let granted: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .map(|_| {
                                budget.deposit(t0);
                                u64::from(budget.try_withdraw(t0))
                            })
                            .sum::<u64>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        // 4000 requests × 0.5 + 1/s × 10 s, whatever the interleaving.
        assert!(granted <= 2010, "{granted}");
        assert!(granted >= 2000, "{granted}");
    }

    proptest! {
        /// Within one window nothing expires, so the budget can never grant
        /// more than `ratio × N + min_per_second × ttl` retries, whatever the
        /// order of requests and retries. Units are floored when the budget
        /// is built, so no slack is needed beyond 1e-9 for evaluating the
        /// bound itself in floating point.
        #[test]
        fn never_grants_more_than_ratio_times_requests_plus_minimum(
            ratio in prop_oneof![0.0f64..2.0, Just(0.2), Just(0.1), Just(1.0 / 3.0)],
            min_per_second in 0u32..20,
            ttl_ms in 1_000u64..=60_000,
            ops in proptest::collection::vec((any::<bool>(), 0.0f64..1.0), 0..400),
        ) {
            let t0 = Instant::now();
            let ttl = Duration::from_millis(ttl_ms);
            let budget = RetryBudget::new(ratio, min_per_second, ttl, t0).unwrap();
            let mut offsets: Vec<f64> = ops.iter().map(|(_, at)| *at).collect();
            offsets.sort_by(f64::total_cmp);
            let (mut requests, mut retries) = (0u64, 0u64);
            for ((deposit, _), at) in ops.iter().zip(offsets) {
                let now = t0 + ttl.mul_f64(at);
                if *deposit {
                    budget.deposit(now);
                    requests += 1;
                } else if budget.try_withdraw(now) {
                    retries += 1;
                }
            }
            // Unlimited further attempts at the window's last instant.
            let end = t0 + ttl - Duration::from_nanos(1);
            retries += withdraw_all(&budget, end);
            let bound = ratio * requests as f64 + f64::from(min_per_second) * ttl.as_secs_f64();
            prop_assert!(retries as f64 <= bound + 1e-9, "{} > {}", retries, bound);
            // And it is not stricter than the flooring explains: at most one
            // retry less than the exact bound.
            prop_assert!(retries as f64 >= bound.floor() - 1.0, "{} << {}", retries, bound);
        }

        /// Without requests, any ttl-long run of slots holds at most
        /// `min_per_second × ttl` retries, however far time runs.
        #[test]
        fn reserve_alone_caps_every_window(
            min_per_second in 0u32..5,
            gaps_ms in proptest::collection::vec(0u64..3_000, 1..300),
        ) {
            let t0 = Instant::now();
            let ttl = 2 * SEC;
            let budget = RetryBudget::new(0.2, min_per_second, ttl, t0).unwrap();
            let slot_ms = (ttl / SLOTS as u32).as_millis() as u64;
            let mut per_slot = std::collections::BTreeMap::<u64, u64>::new();
            let mut at_ms = 0;
            for gap in gaps_ms {
                at_ms += gap;
                if budget.try_withdraw(t0 + Duration::from_millis(at_ms)) {
                    *per_slot.entry(at_ms / slot_ms).or_default() += 1;
                }
            }
            let cap = u64::from(min_per_second) * 2;
            for &first in per_slot.keys() {
                let in_window: u64 = per_slot.range(first..first + SLOTS as u64).map(|(_, n)| n).sum();
                prop_assert!(in_window <= cap, "{} retries in slots {}.. > {}", in_window, first, cap);
            }
        }
    }
}
