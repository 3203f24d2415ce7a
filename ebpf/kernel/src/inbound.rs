//! `cgroup_skb` ingress on the pods' cgroup: strict inbound.
//!
//! With `inbound.mode = "strict"` a meshed pod accepts TCP connections from
//! other nodes only through the mTLS tunnel. The receiving agent connects
//! to the pod from this node (its own address), and pods on this node reach
//! it through this node's agent, dialling as themselves; so a new connection
//! (a SYN without ACK) to a strict pod is let in only from this node's own
//! addresses, this node's pods and loopback (`INBOUND_ALLOW_V4/V6`), and
//! dropped otherwise: plaintext from another node never reaches the pod.
//! The kernel counts the drop (reason `SOCKET_FILTER`, with the flow) in
//! `waymark drops`, and `STRICT_PODS` counts it per pod.
//!
//! Only SYNs are judged: packets of connections already open pass, and a
//! pod that is not strict (no entry in `STRICT_PODS`) is never touched.
//! Everything else fails open, like the redirect programs: a packet this
//! program cannot read is let through.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_netns_cookie, macros::cgroup_skb, maps::lpm_trie::Key,
    programs::SkBuffContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::maps::{INBOUND_ALLOW_V4, INBOUND_ALLOW_V6, STRICT_PODS};

/// cgroup_skb verdicts.
const ALLOW: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS: usize = 13;

#[cgroup_skb(ingress)]
pub fn wm_inbound(ctx: SkBuffContext) -> i32 {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(refused) = STRICT_PODS.get_ptr_mut(cookie) else {
        return ALLOW;
    };
    if admitted(&ctx).unwrap_or(true) {
        return ALLOW;
    }
    // An atomic add whose result is unused is BPF's `lock xadd` (see the
    // diagnostics' flow counters).
    // SAFETY: the pointer comes from a successful lookup of a preallocated
    // hash map entry, valid and 8-byte aligned for the program's run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(refused, 1) };
    DROP
}

/// Whether the packet may enter a strict pod: anything but a new TCP
/// connection, or one from an allowed source. `None`: unreadable (let in).
fn admitted(ctx: &SkBuffContext) -> Option<bool> {
    // SAFETY: a context field read, checked by the verifier.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    match protocol {
        ETH_P_IP => {
            let first: u8 = ctx.load(0).ok()?;
            if ctx.load::<u8>(9).ok()? != IPPROTO_TCP {
                return Some(true);
            }
            let header = usize::from(first & 0x0f) * 4;
            let flags: u8 = ctx.load(header + TCP_FLAGS).ok()?;
            if !is_new_connection(flags) {
                return Some(true);
            }
            let source: u32 = ctx.load(12).ok()?;
            Some(INBOUND_ALLOW_V4.get(Key::new(32, source)).is_some())
        }
        ETH_P_IPV6 => {
            // A TCP header right after the fixed header; extension headers
            // are not followed (such a packet is let in).
            if ctx.load::<u8>(6).ok()? != IPPROTO_TCP {
                return Some(true);
            }
            let flags: u8 = ctx.load(40 + TCP_FLAGS).ok()?;
            if !is_new_connection(flags) {
                return Some(true);
            }
            let source: [u32; 4] = ctx.load(8).ok()?;
            Some(INBOUND_ALLOW_V6.get(Key::new(128, source)).is_some())
        }
        _ => Some(true),
    }
}

fn is_new_connection(flags: u8) -> bool {
    flags & TCP_SYN != 0 && flags & TCP_ACK == 0
}
