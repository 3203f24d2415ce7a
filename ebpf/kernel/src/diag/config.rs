//! The agent's settings and the slot of a network namespace.

use waymark_common::diag::{DiagConfig, NO_FIELD};

use crate::maps::{DIAG_CONFIG, POD_SLOTS};

/// The settings, once the agent has written them.
#[inline(always)]
pub fn get() -> Option<&'static DiagConfig> {
    let config = DIAG_CONFIG.get(0)?;
    (config.offsets_ready != 0).then_some(config)
}

/// Whether drops with this reason are counted (see `DiagConfig`).
///
/// Takes the raw 64-bit tracepoint argument and bounds-checks *it*: the
/// bitmap index is computed from the register the check was made on, so
/// the verifier can see the index is in range (a check on a truncated
/// copy would not bound the original).
#[inline(always)]
pub fn counts_reason(config: &DiagConfig, reason: u64) -> bool {
    if reason >= 256 {
        return reason <= u64::from(u32::MAX) && reason != u64::from(NO_FIELD);
    }
    let word = config.counted_reasons[(reason >> 6) as usize & 3];
    word & (1u64 << (reason & 63)) != 0
}

/// The slot of a network namespace, `None` if it is neither a configured
/// pod's nor the node's.
#[inline(always)]
pub fn slot_of(netns_cookie: u64) -> Option<u32> {
    // SAFETY: plain `u32` read of a value the agent wrote.
    unsafe { POD_SLOTS.get(netns_cookie).copied() }
}
