//! `tcp:tcp_retransmit_skb`, `tcp:tcp_send_reset`, `tcp:tcp_receive_reset`:
//! retransmits and resets per pod and per flow.
//!
//! A retransmitted SYN (socket in `SYN_SENT`) is also counted on its own:
//! it is a connection attempt nobody answered yet, the kernel's view of a
//! connect timeout. Resets also go to the event ring.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use waymark_common::diag::{
    DiagConfig, EVENT_RESET_RECEIVED, EVENT_RESET_SENT, Event, FLAG_SEND_RESET_REASON, FlowTuple,
    PodStats,
};

use crate::{
    config, events,
    flow::{self, FlowCounter, IPPROTO_TCP},
    kmem::{self, is_kernel_ptr},
    maps::POD_STATS,
};

/// `TCP_SYN_SENT` of `include/net/tcp_states.h`.
const TCP_SYN_SENT: u16 = 2;

/// TP_PROTO(const struct sock *sk, const struct sk_buff *skb, int err).
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn wm_tcp_retransmit(ctx: RawTracePointContext) -> i32 {
    let _ = try_retransmit(&ctx);
    0
}

/// TP_PROTO(const struct sock *sk, const struct sk_buff *skb,
/// const enum sk_rst_reason reason). `sk` is NULL for a reset answering a
/// packet no socket wanted (a closed port); `skb` is then that packet.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn wm_tcp_send_reset(ctx: RawTracePointContext) -> i32 {
    let _ = try_send_reset(&ctx);
    0
}

/// TP_PROTO(struct sock *sk).
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn wm_tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    let _ = try_receive_reset(&ctx);
    0
}

fn try_retransmit(ctx: &RawTracePointContext) -> Option<()> {
    let config = config::get()?;
    let o = &config.offsets;
    let sk: u64 = ctx.arg(0);
    let slot = config::slot_of(kmem::sock_netns_cookie(o, sk)?)?;
    let syn = kmem::sock_state(o, sk) == TCP_SYN_SENT;
    with_stats(slot, |s| {
        s.retransmits += 1;
        if syn {
            s.syn_retransmits += 1;
        }
    });
    let mut flow = FlowTuple::default();
    if flow::from_sock(o, sk, true, IPPROTO_TCP, &mut flow).is_some() {
        flow::count(&flow, slot, FlowCounter::Retransmit);
    }
    Some(())
}

fn try_send_reset(ctx: &RawTracePointContext) -> Option<()> {
    let config = config::get()?;
    let o = &config.offsets;
    let sk: u64 = ctx.arg(0);
    let reason = if config.flags & FLAG_SEND_RESET_REASON != 0 {
        ctx.arg::<u64>(2) as u32
    } else {
        0
    };
    let mut flow = FlowTuple::default();
    let (cookie, has_flow, sock) = if is_kernel_ptr(sk) {
        let cookie = kmem::sock_netns_cookie(o, sk)?;
        let full = kmem::is_full_sock_state(kmem::sock_state(o, sk));
        let has_flow = flow::from_sock(o, sk, full, IPPROTO_TCP, &mut flow);
        (cookie, has_flow, Some(sk))
    } else {
        // No socket: the reset answers `skb`, so the flow seen from this
        // end runs from the packet's destination back to its source.
        let skb: u64 = ctx.arg(1);
        let cookie = kmem::dev_netns_cookie(o, skb)?;
        let has_flow = flow::from_skb(o, skb, &mut flow);
        flow::reverse(&mut flow);
        (cookie, has_flow, None)
    };
    let slot = config::slot_of(cookie)?;
    with_stats(slot, |s| s.resets_sent += 1);
    if has_flow.is_some() {
        flow::count(&flow, slot, FlowCounter::ResetSent);
    } else {
        flow = FlowTuple::default();
    }
    report(config, EVENT_RESET_SENT, reason, slot, cookie, &flow, sock);
    Some(())
}

fn try_receive_reset(ctx: &RawTracePointContext) -> Option<()> {
    let config = config::get()?;
    let o = &config.offsets;
    let sk: u64 = ctx.arg(0);
    let cookie = kmem::sock_netns_cookie(o, sk)?;
    let slot = config::slot_of(cookie)?;
    with_stats(slot, |s| s.resets_received += 1);
    let mut flow = FlowTuple::default();
    if flow::from_sock(o, sk, true, IPPROTO_TCP, &mut flow).is_some() {
        flow::count(&flow, slot, FlowCounter::ResetReceived);
    } else {
        flow = FlowTuple::default();
    }
    report(
        config,
        EVENT_RESET_RECEIVED,
        0,
        slot,
        cookie,
        &flow,
        Some(sk),
    );
    Some(())
}

#[inline(always)]
fn report(
    config: &DiagConfig,
    kind: u16,
    reason: u32,
    slot: u32,
    netns_cookie: u64,
    flow: &FlowTuple,
    sk: Option<u64>,
) {
    if !events::admit(config) {
        return;
    }
    let o = &config.offsets;
    let state = sk.map_or(0, |sk| kmem::sock_state(o, sk));
    let event = Event {
        ts_ns: events::now_ns(),
        netns_cookie,
        cgroup_id: sk
            .filter(|_| kmem::is_full_sock_state(state))
            .and_then(|sk| kmem::sock_cgroup_id(o, sk))
            .unwrap_or(0),
        flow: *flow,
        kind,
        state,
        reason,
        slot,
        _pad: 0,
    };
    events::emit(&event);
}

/// Runs `f` on this CPU's counters of `slot`.
#[inline(always)]
pub fn with_stats(slot: u32, f: impl FnOnce(&mut PodStats)) {
    if let Some(stats) = POD_STATS.get_ptr_mut(slot) {
        // SAFETY: this CPU's own value of a per-CPU array.
        f(unsafe { &mut *stats });
    }
}
