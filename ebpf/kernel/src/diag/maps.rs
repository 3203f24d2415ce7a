//! The maps shared with the agent (`agent/src/kernel`). Names,
//! key and value types must match there; the types come from
//! `waymark_common::diag`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use waymark_common::diag::{
    DiagConfig, DropKey, EVENT_RING_BYTES, EventBudget, FlowStats, FlowTuple, MAX_DROP_KEYS,
    MAX_FLOWS, MAX_POD_SLOTS, PodStats,
};

/// One slot: kernel offsets and settings, written by the agent before it
/// attaches anything.
#[map(name = "DIAG_CONFIG")]
pub static DIAG_CONFIG: Array<DiagConfig> = Array::with_max_entries(1, 0);

/// Network namespace cookie -> slot (`NODE_SLOT` for the agent's own).
#[map(name = "POD_SLOTS")]
pub static POD_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_POD_SLOTS, 0);

/// Drops by (slot, reason). Per CPU: an increment is a plain add with no
/// cache line bouncing between CPUs during a drop storm.
#[map(name = "DROPS")]
pub static DROPS: LruPerCpuHashMap<DropKey, u64> =
    LruPerCpuHashMap::with_max_entries(MAX_DROP_KEYS, 0);

/// Retransmits, resets, bytes and packets by slot.
#[map(name = "POD_STATS")]
pub static POD_STATS: PerCpuArray<PodStats> = PerCpuArray::with_max_entries(MAX_POD_SLOTS, 0);

/// Per-flow counters for the L7 layer's "what did the kernel see on this
/// connection". Shared between CPUs (a per-CPU copy of 16k flows would cost
/// memory per CPU), updated with atomic adds; LRU so flows age out.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowTuple, FlowStats> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Drop and reset events for `waymark drops --follow`.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// The per-CPU event rate limit.
#[map(name = "EVENT_BUDGET")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);
