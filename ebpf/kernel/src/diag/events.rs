//! The event ring, behind a per-CPU token bucket.
//!
//! Each CPU may emit `events_per_sec` events per second on average and
//! `events_burst` at once. Past that, events are only counted as
//! suppressed: a drop storm then costs one map lookup and a few arithmetic
//! operations per packet, and never fills the ring faster than the agent
//! empties it. Per CPU, so no CPU waits for another's bucket.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use waymark_common::diag::{DiagConfig, Event};

use crate::maps::{EVENT_BUDGET, EVENTS};

/// A thousandth of an event: the bucket's unit, so a low rate still
/// refills a little on every call.
const MILLI: u64 = 1000;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Puts `event` in the ring if the budget allows. The caller builds the
/// event lazily: [`admit`] first, then [`emit`].
#[inline(always)]
pub fn admit(config: &DiagConfig) -> bool {
    if config.events_per_sec == 0 {
        return false;
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own slot of a per-CPU array; programs on one CPU
    // do not run concurrently with each other (the worst case, a nested
    // program from an interrupt, loses a refill).
    let budget = unsafe { &mut *budget };
    // SAFETY: no arguments, no memory access.
    let now = unsafe { bpf_ktime_get_ns() };
    let cap = u64::from(config.events_burst.max(1)) * MILLI;
    let elapsed = now.saturating_sub(budget.last_ns);
    // Below one second the product fits in 64 bits for any u32 rate.
    let refill = if elapsed >= NS_PER_SEC {
        cap
    } else {
        elapsed * u64::from(config.events_per_sec) / (NS_PER_SEC / MILLI)
    };
    budget.last_ns = now;
    budget.tokens_milli = (budget.tokens_milli + refill).min(cap);
    if budget.tokens_milli < MILLI {
        budget.suppressed += 1;
        return false;
    }
    budget.tokens_milli -= MILLI;
    true
}

/// Writes an admitted event; a full ring is counted as lost.
#[inline(always)]
pub fn emit(event: &Event) {
    if EVENTS.output::<Event>(event, 0).is_err()
        && let Some(budget) = EVENT_BUDGET.get_ptr_mut(0)
    {
        // SAFETY: as in `admit`.
        unsafe { (*budget).lost += 1 };
    }
}

/// The monotonic clock events are stamped with.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no memory access.
    unsafe { bpf_ktime_get_ns() }
}
