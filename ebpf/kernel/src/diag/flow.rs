//! Flows: built from a socket (its local and remote address) or from a
//! packet's IP and TCP/UDP headers, and their per-flow counters.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use waymark_common::{
    FAMILY_V4, FAMILY_V6,
    diag::{FlowStats, FlowTuple, KernelOffsets},
};

use crate::{kmem::read, maps::FLOWS};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `skb->network_header` when no header was set (`(u16)~0U`).
const HEADER_UNSET: u16 = 0xffff;

/// Which per-flow counter an event increments.
#[derive(Clone, Copy)]
pub enum FlowCounter {
    Drop,
    Retransmit,
    ResetSent,
    ResetReceived,
}

// The builders fill a zeroed `FlowTuple` in place rather than returning
// `Option<FlowTuple>`: copying an `Option` whose `None` leaves its payload
// uninitialised makes LLVM read registers the verifier knows were never
// written (`R3 !read_ok`).

/// The socket's flow, local -> remote. `None` for a family other than
/// IPv4/IPv6 (a unix socket's drops have no flow). `full`: `sk` is a full
/// socket, not a time-wait or request mini-socket.
#[inline(always)]
pub fn from_sock(
    o: &KernelOffsets,
    sk: u64,
    full: bool,
    proto: u8,
    flow: &mut FlowTuple,
) -> Option<()> {
    let family: u16 = read(sk, o.sk_family)?;
    // `skc_num` is zeroed once a closing socket releases its port (a reset
    // sent at close would show port 0); a full socket's `inet_sport` stays.
    let sport = if full {
        read::<u16>(sk, o.inet_sport).map(u16::from_be)
    } else {
        None
    };
    flow.sport = match sport {
        Some(port) => port,
        None => read(sk, o.sk_num)?,
    };
    flow.dport = u16::from_be(read(sk, o.sk_dport)?);
    flow.proto = proto;
    match family {
        AF_INET => {
            flow.family = FAMILY_V4;
            flow.saddr[0] = read(sk, o.sk_rcv_saddr)?;
            flow.daddr[0] = read(sk, o.sk_daddr)?;
        }
        AF_INET6 => {
            let saddr: [u32; 4] = read(sk, o.sk_v6_rcv_saddr)?;
            let daddr: [u32; 4] = read(sk, o.sk_v6_daddr)?;
            // A dual-stack socket talking IPv4 is IPv4 on the wire.
            if is_v4_mapped(&daddr) {
                flow.family = FAMILY_V4;
                flow.saddr[0] = saddr[3];
                flow.daddr[0] = daddr[3];
            } else {
                flow.family = FAMILY_V6;
                flow.saddr = saddr;
                flow.daddr = daddr;
            }
        }
        _ => return None,
    }
    Some(())
}

/// The packet's flow, source -> destination, from its IP header and, for
/// TCP and UDP, its ports. IPv6 extension headers are not walked (their
/// packets get zero ports).
#[inline(always)]
pub fn from_skb(o: &KernelOffsets, skb: u64, flow: &mut FlowTuple) -> Option<()> {
    let protocol = u16::from_be(read(skb, o.skb_protocol)?);
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return None;
    }
    let head: u64 = read(skb, o.skb_head)?;
    let nh: u16 = read(skb, o.skb_network_header)?;
    if nh == HEADER_UNSET {
        return None;
    }
    let th: u16 = read(skb, o.skb_transport_header)?;
    let ip = head + u64::from(nh);
    let first: u8 = read(ip, 0)?;
    let l4_default = match first >> 4 {
        4 => {
            flow.family = FAMILY_V4;
            flow.proto = read(ip, 9)?;
            flow.saddr[0] = read(ip, 12)?;
            flow.daddr[0] = read(ip, 16)?;
            ip + u64::from(first & 0x0f) * 4
        }
        6 => {
            flow.family = FAMILY_V6;
            flow.proto = read(ip, 6)?;
            flow.saddr = read(ip, 8)?;
            flow.daddr = read(ip, 24)?;
            ip + 40
        }
        _ => return None,
    };
    if flow.proto == IPPROTO_TCP || flow.proto == IPPROTO_UDP {
        // The transport header is only trustworthy once IP has set it past
        // the network header.
        let l4 = if th != HEADER_UNSET && th > nh {
            head + u64::from(th)
        } else {
            l4_default
        };
        if let Some(ports) = read::<[u16; 2]>(l4, 0) {
            flow.sport = u16::from_be(ports[0]);
            flow.dport = u16::from_be(ports[1]);
        }
    }
    Some(())
}

/// Turns the flow around: the view from the other end.
#[inline(always)]
pub fn reverse(f: &mut FlowTuple) {
    core::mem::swap(&mut f.saddr, &mut f.daddr);
    core::mem::swap(&mut f.sport, &mut f.dport);
}

fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_be(0x0000_ffff)
}

/// Adds one to a counter of the flow, creating its entry if needed.
#[inline(always)]
pub fn count(flow: &FlowTuple, slot: u32, counter: FlowCounter) {
    if let Some(stats) = FLOWS.get_ptr_mut(flow) {
        bump(stats, counter);
        return;
    }
    let mut fresh = FlowStats {
        slot,
        ..FlowStats::default()
    };
    match counter {
        FlowCounter::Drop => fresh.drops = 1,
        FlowCounter::Retransmit => fresh.retransmits = 1,
        FlowCounter::ResetSent => fresh.resets_sent = 1,
        FlowCounter::ResetReceived => fresh.resets_received = 1,
    }
    // Another CPU may have created the entry since the lookup: then add to
    // its entry instead of overwriting it.
    if FLOWS.insert(flow, fresh, u64::from(BPF_NOEXIST)).is_err()
        && let Some(stats) = FLOWS.get_ptr_mut(flow)
    {
        bump(stats, counter);
    }
}

#[inline(always)]
fn bump(stats: *mut FlowStats, counter: FlowCounter) {
    // SAFETY: a pointer into a live map value; the field is 8-byte aligned
    // and only ever updated atomically. An LRU eviction racing with this add
    // loses at most this increment.
    let field = unsafe {
        match counter {
            FlowCounter::Drop => &raw mut (*stats).drops,
            FlowCounter::Retransmit => &raw mut (*stats).retransmits,
            FlowCounter::ResetSent => &raw mut (*stats).resets_sent,
            FlowCounter::ResetReceived => &raw mut (*stats).resets_received,
        }
    };
    // `AtomicU64::fetch_add` does not exist on the BPF target (no
    // compare-and-swap in its baseline), but an atomic add whose result is
    // unused is BPF's plain `lock xadd`, which every kernel supports.
    // SAFETY: as above.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, 1) };
}
