//! `skb:kfree_skb`: packets the kernel dropped, by its own drop reason.
//!
//! Counted: every reason the agent set in `counted_reasons`; the agent
//! leaves out `SKB_NOT_DROPPED_YET`, `SKB_CONSUMED` (a packet that was
//! delivered, not dropped) and `SKB_DROP_REASON_NOT_SPECIFIED` (plain
//! `kfree_skb()` calls, most of them the normal end of a packet's life in
//! code not yet annotated with reasons: counting them would bury real drops
//! in noise). Subsystem reasons (256 and up) are counted.
//!
//! Attribution: the socket the drop happened on (`rx_sk`, the socket the
//! receive path had found, else `skb->sk`), else the packet's device; see
//! the crate doc for how a netns becomes a pod.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::raw_tracepoint, programs::RawTracePointContext};
use waymark_common::diag::{
    DropKey, EVENT_DROP, Event, FLAG_KFREE_SKB_RX_SK, FlowTuple, KernelOffsets,
};

use crate::{
    config, events,
    flow::{self, FlowCounter, IPPROTO_TCP},
    kmem::{self, is_kernel_ptr},
    maps::DROPS,
};

/// TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason,
/// struct sock *rx_sk); `rx_sk` since 6.11 (the agent checks the prototype
/// in BTF and sets `FLAG_KFREE_SKB_RX_SK`).
const ARG_SKB: usize = 0;
const ARG_REASON: usize = 2;
const ARG_RX_SK: usize = 3;

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn wm_kfree_skb(ctx: RawTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

fn try_kfree_skb(ctx: &RawTracePointContext) -> Option<()> {
    let config = config::get()?;
    let raw_reason: u64 = ctx.arg(ARG_REASON);
    if !config::counts_reason(config, raw_reason) {
        return None;
    }
    let reason = raw_reason as u32;
    let o = &config.offsets;
    let skb: u64 = ctx.arg(ARG_SKB);
    let rx_sk: u64 = if config.flags & FLAG_KFREE_SKB_RX_SK != 0 {
        ctx.arg(ARG_RX_SK)
    } else {
        0
    };
    let sk = if is_kernel_ptr(rx_sk) {
        Some(rx_sk)
    } else {
        kmem::skb_sock(o, skb)
    };
    let cookie = sk
        .and_then(|sk| kmem::sock_netns_cookie(o, sk))
        .or_else(|| kmem::dev_netns_cookie(o, skb))?;
    let slot = config::slot_of(cookie)?;
    count(slot, reason);

    let state = sk.map_or(0, |sk| kmem::sock_state(o, sk));
    let full_sock = sk.filter(|_| kmem::is_full_sock_state(state));
    let mut flow = FlowTuple::default();
    let has_flow = match sk {
        Some(sk) => {
            let proto = full_sock.map_or(IPPROTO_TCP, |sk| protocol(o, sk));
            flow::from_sock(o, sk, full_sock.is_some(), proto, &mut flow)
        }
        None => flow::from_skb(o, skb, &mut flow),
    };
    if has_flow.is_some() {
        flow::count(&flow, slot, FlowCounter::Drop);
    } else {
        flow = FlowTuple::default();
    }
    if events::admit(config) {
        let event = Event {
            ts_ns: events::now_ns(),
            netns_cookie: cookie,
            cgroup_id: full_sock
                .and_then(|sk| kmem::sock_cgroup_id(o, sk))
                .unwrap_or(0),
            flow,
            kind: EVENT_DROP,
            state,
            reason,
            slot,
            _pad: 0,
        };
        events::emit(&event);
    }
    Some(())
}

/// `sk->sk_protocol` of a full socket (mini-sockets are all TCP).
#[inline(always)]
fn protocol(o: &KernelOffsets, sk: u64) -> u8 {
    kmem::read::<u16>(sk, o.sk_protocol).map_or(IPPROTO_TCP, |p| p as u8)
}

#[inline(always)]
fn count(slot: u32, reason: u32) {
    let key = DropKey { slot, reason };
    if let Some(n) = DROPS.get_ptr_mut(key) {
        // SAFETY: this CPU's own value of a per-CPU map.
        unsafe { *n += 1 };
        return;
    }
    // NOEXIST: if the entry appeared since the lookup (created from another
    // CPU), this CPU's value must not be reset; add to it instead.
    if DROPS.insert(key, 1, u64::from(BPF_NOEXIST)).is_err()
        && let Some(n) = DROPS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe { *n += 1 };
    }
}
