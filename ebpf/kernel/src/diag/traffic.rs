//! `cgroup_skb` ingress and egress on the pods' cgroup: bytes and packets
//! per pod. Only pods' own sockets pass here (the agent's sockets, even
//! those it opens inside a pod's netns, belong to the agent's cgroup).
//!
//! Bytes are the packet's length from the IP header on (`skb->len` at this
//! hook); a GSO packet counts as the segments it will be cut into.
//! Both programs always return "allow": they count, they never filter.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_netns_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use waymark_common::diag::NODE_SLOT;

use crate::{config, tcp_events::with_stats};

/// cgroup_skb: 1 lets the packet through.
const ALLOW: i32 = 1;

#[cgroup_skb(ingress)]
pub fn wm_traffic_in(ctx: SkBuffContext) -> i32 {
    count(&ctx, true);
    ALLOW
}

#[cgroup_skb(egress)]
pub fn wm_traffic_out(ctx: SkBuffContext) -> i32 {
    count(&ctx, false);
    ALLOW
}

#[inline(always)]
fn count(ctx: &SkBuffContext, ingress: bool) {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Everything here is this node's: a netns that is no configured pod's
    // is counted for the node.
    let slot = config::slot_of(cookie).unwrap_or(NODE_SLOT);
    let bytes = u64::from(ctx.len());
    // SAFETY: context field read, checked by the verifier.
    let segs = u64::from(unsafe { (*ctx.skb.skb).gso_segs }.max(1));
    with_stats(slot, |s| {
        if ingress {
            s.bytes_in += bytes;
            s.packets_in += segs;
        } else {
            s.bytes_out += bytes;
            s.packets_out += segs;
        }
    });
}
