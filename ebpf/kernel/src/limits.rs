//! The agent's connection limits, enforced at `connect()`.
//!
//! The agent bounds each pod's connections (and all pods' together) so
//! that one pod cannot take the node's proxy down. Enforced only at accept,
//! a pod past its bound still costs a handshake, a place in the listener's
//! queue, an accept and a reset per attempt, all on the node's cores: a
//! pod firing 20,000 connects keeps the agent busy refusing for as long as
//! it keeps trying. Counted here instead, a pod that already holds its
//! share of redirected sockets has its next `connect()` fail in the system
//! call with `ECONNREFUSED`, before a SYN leaves: the cost of a refusal is
//! the pod's own system call.
//!
//! What is counted is the pod's redirected sockets from `connect()` to
//! release, in any state, so a connection waiting in the agent's queue
//! counts as much as one the agent holds. The agent's own bounds at accept
//! stay behind these: two CPUs can each see room for one more socket and
//! both pass, and a socket past [`MAX_COUNTED_SOCKETS`] node-wide is not
//! counted at all (fail open, as every program here).
//!
//! [`MAX_COUNTED_SOCKETS`]: waymark_common::MAX_COUNTED_SOCKETS

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use waymark_common::{ConnectRefusal, PodSockets, REFUSED_PER_POD, REFUSED_TOTAL, SockAddr};

use crate::maps::{CONNECT_LIMITS, CONNECT_REFUSED, COUNTED_SOCKETS, OPEN_SOCKETS, POD_SOCKETS};

/// `ECONNREFUSED`, what a client would get from a destination that
/// refused it: the connection never existed, so retrying is safe.
const ECONNREFUSED: i32 = 111;

/// 1 when the kernel lets cgroup programs choose the error
/// (`bpf_set_retval`, Linux 5.18), set by the agent at load. With 0 the
/// call below is dead code the verifier removes, so the programs still
/// load on 5.15–5.17, where a refused `connect()` fails with `EPERM`.
#[unsafe(no_mangle)]
static SET_RETVAL: Global<u8> = Global::new(0);

/// 1 when the kernel lets cgroup programs ask who is calling
/// (`bpf_get_current_pid_tgid` and `bpf_get_current_comm`, Linux 6.1), set
/// by the agent at load; with 0 a refusal is reported without its process.
#[unsafe(no_mangle)]
static PROCESS_INFO: Global<u8> = Global::new(0);

/// Whether the socket behind `ctx`, about to be redirected for the pod
/// `netns`, may connect; counts it if so. A refused one is counted with the
/// pod and reported on the ring, and its `connect()` fails with
/// `ECONNREFUSED` once the hook returns 0.
#[inline(always)]
pub fn admit(ctx: &SockAddrContext, netns: u64, dst: &SockAddr) -> bool {
    let Some(limits) = CONNECT_LIMITS.get(0) else {
        return true;
    };
    if limits.per_pod == 0 && limits.total == 0 {
        return true;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A socket connecting again after a failed attempt is counted already.
    // SAFETY: the value is only tested for presence.
    if unsafe { COUNTED_SOCKETS.get(cookie).is_some() } {
        return true;
    }
    let Some(pod) = pod_entry(netns) else {
        return true;
    };
    let Some(all) = OPEN_SOCKETS.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: both pointers come from successful lookups of preallocated
    // entries, valid and 8-byte aligned for the program's run; a
    // concurrent add makes the read at worst one behind.
    let (mine, total) = unsafe { ((*pod).open, *all) };
    let refused = if limits.per_pod > 0 && mine >= i64::from(limits.per_pod) {
        // SAFETY: as above.
        Some((unsafe { &raw mut (*pod).refused_pod }, REFUSED_PER_POD))
    } else if limits.total > 0 && total >= i64::from(limits.total) {
        // SAFETY: as above.
        Some((unsafe { &raw mut (*pod).refused_total }, REFUSED_TOTAL))
    } else {
        None
    };
    if let Some((counter, limit)) = refused {
        // SAFETY: as above; an atomic add whose result is unused is BPF's
        // `lock xadd`.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
        report(netns, dst, limit);
        if SET_RETVAL.load() != 0 {
            // SAFETY: sets the error the refused `connect()` returns; no
            // memory access.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return false;
    }
    if COUNTED_SOCKETS
        .insert(cookie, netns, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        // SAFETY: as above.
        unsafe {
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*pod).open, 1);
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(all, 1);
        }
    }
    true
}

/// Takes a released socket back out of its pod's count, if it was in it.
#[inline(always)]
pub fn release(cookie: u64) {
    // SAFETY: the value is plain data, copied out at once.
    let Some(netns) = (unsafe { COUNTED_SOCKETS.get(cookie) }).copied() else {
        return;
    };
    // Only the caller that removes the entry gives the socket back.
    if COUNTED_SOCKETS.remove(cookie).is_err() {
        return;
    }
    if let Some(pod) = POD_SOCKETS.get_ptr_mut(netns) {
        // SAFETY: as in `admit`.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*pod).open, -1) };
    }
    if let Some(all) = OPEN_SOCKETS.get_ptr_mut(0) {
        // SAFETY: as in `admit`.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(all, -1) };
    }
}

/// The pod's entry, made at its first counted socket.
#[inline(always)]
fn pod_entry(netns: u64) -> Option<*mut PodSockets> {
    if let Some(pod) = POD_SOCKETS.get_ptr_mut(netns) {
        return Some(pod);
    }
    // Two first sockets at once: one insert wins, both find it after.
    let _ = POD_SOCKETS.insert(netns, PodSockets::default(), u64::from(BPF_NOEXIST));
    POD_SOCKETS.get_ptr_mut(netns)
}

/// Puts the refusal on the ring without waking the agent (it drains the
/// ring on a timer); a full ring drops it, the counts stay exact. The
/// calling process goes with it: which of a pod's processes is opening
/// thousands of connections is the operator's next question, and only the
/// kernel sees it (the connection never reaches the agent).
#[inline(always)]
fn report(netns: u64, dst: &SockAddr, limit: u32) {
    let mut event = ConnectRefusal {
        netns_cookie: netns,
        dst: *dst,
        limit,
        pid: 0,
        comm: [0; 16],
        _pad: 0,
    };
    if PROCESS_INFO.load() != 0 {
        // The upper half is the thread group: the process.
        event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        event.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    let _ = CONNECT_REFUSED.output::<ConnectRefusal>(&event, u64::from(BPF_RB_NO_WAKEUP));
}
