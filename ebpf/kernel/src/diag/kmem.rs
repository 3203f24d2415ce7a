//! Reads of kernel structs at the offsets the agent resolved from BTF.
//!
//! Every read goes through `bpf_probe_read_kernel`, which cannot fault: a
//! stale or bogus pointer yields an error, never a crash. Pointers are
//! plain `u64`s here because the programs never dereference them directly.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use waymark_common::diag::{KernelOffsets, NO_FIELD};

/// Whether `p` can be a kernel pointer. On the 64-bit architectures BPF
/// runs on, kernel addresses have the top bit set; this rejects NULL and
/// the small integers some unions put where a pointer usually is
/// (`skb->ip_defrag_offset` shares `skb->sk`).
#[inline(always)]
pub fn is_kernel_ptr(p: u64) -> bool {
    (p as i64) < 0
}

/// `*(T *)(base + off)`, or `None` if the field does not exist on this
/// kernel or the read fails.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Option<T> {
    if off == NO_FIELD || !is_kernel_ptr(base) {
        return None;
    }
    // SAFETY: the helper copies into a local and reports faults instead of
    // taking them.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.ok()
}

/// A pointer field, `None` unless it holds a kernel pointer.
#[inline(always)]
pub fn read_ptr(base: u64, off: u32) -> Option<u64> {
    read::<u64>(base, off).filter(|p| is_kernel_ptr(*p))
}

/// `net->net_cookie` of the netns a socket lives in.
#[inline(always)]
pub fn sock_netns_cookie(o: &KernelOffsets, sk: u64) -> Option<u64> {
    let net = read_ptr(sk, o.sk_net)?;
    read::<u64>(net, o.net_cookie)
}

/// `net->net_cookie` of the netns of the packet's device.
#[inline(always)]
pub fn dev_netns_cookie(o: &KernelOffsets, skb: u64) -> Option<u64> {
    let dev = read_ptr(skb, o.skb_dev)?;
    let net = read_ptr(dev, o.dev_nd_net)?;
    read::<u64>(net, o.net_cookie)
}

/// The socket an skb is charged to, if any.
#[inline(always)]
pub fn skb_sock(o: &KernelOffsets, skb: u64) -> Option<u64> {
    read_ptr(skb, o.skb_sk)
}

/// The cgroup v2 id of a full socket's cgroup (`sk_cgrp_data.cgroup->kn->id`).
#[inline(always)]
pub fn sock_cgroup_id(o: &KernelOffsets, sk: u64) -> Option<u64> {
    let cgroup = read_ptr(sk, o.sk_cgroup)?;
    let kn = read_ptr(cgroup, o.cgroup_kn)?;
    read::<u64>(kn, o.kn_id)
}

/// `sk->sk_state` (a `TCP_*` state for TCP sockets).
#[inline(always)]
pub fn sock_state(o: &KernelOffsets, sk: u64) -> u16 {
    read::<u8>(sk, o.sk_state).map_or(0, u16::from)
}

/// Whether a socket in this state is a full `struct sock`, not a time-wait
/// or request mini-socket that only shares `struct sock_common` (fields
/// past it, such as the cgroup, are not there).
#[inline(always)]
pub fn is_full_sock_state(state: u16) -> bool {
    // TCP_TIME_WAIT, TCP_NEW_SYN_RECV
    state != 6 && state != 12
}
