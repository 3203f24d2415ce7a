//! `sk_msg`: the agent's replies to a pod's application, socket to socket.
//!
//! A redirected connection runs over the pod's loopback: the application's
//! socket and the socket the agent accepted in the pod's netns. Each reply
//! the agent writes would go down its TCP stack, through `lo`, and back up
//! the application's, and the application's TCP would acknowledge it, all
//! on the agent's CPU (loopback delivery runs in the sender's context). This
//! program runs on every `sendmsg` of an accepted socket the agent put in
//! `SHORTCUT_AGENT` and moves the bytes straight to the application
//! socket's receive queue (`BPF_F_INGRESS`), as Cilium's and Merbridge's
//! socket acceleration do. The application reads them with the same
//! `read()`/`recv()`, and `epoll` wakes it the same way.
//!
//! The reply direction: the application's socket is put in the map by
//! `sock_ops` before `connect()` returns, so every reply of the connection
//! can take the shortcut. The agent's socket is put in this map only after
//! `accept()`, before its first write. Requests have a shortcut of their
//! own (`request.rs`), which must decide before the application's first
//! byte.
//!
//! The agent takes a connection off for good by filing it in
//! `REPLIES_LEFT` (and taking its socket out of the map, which alone does
//! not remove this program from a socket that is in another socket map,
//! as the request shortcut's targets are); its later replies take TCP.
//!
//! Once the agent's socket has left `ESTABLISHED` (the application shut
//! down its side, or reset), replies take TCP again: bytes already
//! redirected are queued ahead and are read first, so the order holds, and
//! a closed application socket gets what TCP gives it, a reset. This also
//! keeps a late reply away from a newer connection that reuses the
//! application's port: that port is free only once the old connection is
//! no longer established.
//!
//! Each redirected reply is counted in `SHORTCUT_BYTES` for the pod, where
//! the agent reads it into the kernel diagnostics' bytes in: a reply that
//! is not a packet is still a byte the pod received.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, BPF_NOEXIST, BPF_TCP_ESTABLISHED, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_setsockopt},
    macros::sk_msg,
    maps::LruPerCpuHashMap,
    programs::{SkMsgContext, SockOpsContext},
};
use core::ptr::{addr_of, read_volatile};
use waymark_common::FlowKey;

use crate::{
    addr::{context_remote_port, flow_addr, outbound_port, reply_shortcut_on},
    maps::{REPLIES_LEFT, SHORTCUT_BYTES, SHORTCUT_CLIENTS},
};

#[sk_msg]
pub fn wm_reply_shortcut(ctx: SkMsgContext) -> u32 {
    let Some(mut key) = app_key(&ctx, AppEnd::Peer) else {
        return SK_PASS;
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { REPLIES_LEFT.get(key).is_some() } {
        return SK_PASS;
    }
    // SK_PASS when the client socket is there and the bytes went to it;
    // SK_DROP (the write fails) when it is not, which happens only once
    // the application has closed it: TCP would have answered a reset.
    let verdict = SHORTCUT_CLIENTS.redirect_msg(&ctx, &mut key, u64::from(BPF_F_INGRESS)) as u32;
    if verdict == SK_PASS {
        count(&SHORTCUT_BYTES, key.netns_cookie, u64::from(ctx.size()));
    }
    verdict
}

/// Adds `bytes` to the pod's entry in `map` (bytes each way) on this CPU.
#[inline(always)]
pub(crate) fn count(map: &LruPerCpuHashMap<u64, u64>, netns_cookie: u64, bytes: u64) {
    if let Some(total) = map.get_ptr_mut(netns_cookie) {
        // SAFETY: this CPU's own value; programs on one CPU do not
        // interleave.
        unsafe { *total += bytes };
        return;
    }
    // The pod's first reply since the entry was created (or evicted). If
    // another CPU created it meanwhile, add to this CPU's value in it.
    if map
        .insert(netns_cookie, bytes, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(total) = map.get_ptr_mut(netns_cookie)
    {
        // SAFETY: as above.
        unsafe { *total += bytes };
    }
}

/// Which end of a sending socket is the application's socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppEnd {
    /// The sender is the agent's accepted socket: its peer.
    Peer,
    /// The sender is the application's socket itself.
    Own,
}

/// The key `sock_ops` filed the application's socket under: the pod's
/// netns cookie and the application socket's address, read from the
/// sending socket's `end`. `None` for a sender that is not established:
/// take the usual path (see the module docs and `request.rs`).
#[inline(always)]
pub(crate) fn app_key(ctx: &SkMsgContext, end: AppEnd) -> Option<FlowKey> {
    let md = ctx.msg;
    // SAFETY: context reads, checked by the verifier; `sk` is always set
    // for sk_msg programs.
    let state = unsafe {
        let sk = (*md).__bindgen_anon_3.sk;
        if sk.is_null() {
            return None;
        }
        (*sk).state
    };
    if state != BPF_TCP_ESTABLISHED {
        return None;
    }
    // SAFETY: context field reads, checked by the verifier. `local_port`
    // is in host byte order, `remote_port` as `context_remote_port` says.
    let (family, port) = unsafe {
        match end {
            AppEnd::Peer => ((*md).family, context_remote_port((*md).remote_port)),
            AppEnd::Own => ((*md).family, (*md).local_port as u16),
        }
    };
    let client = flow_addr(
        family,
        // SAFETY: as above.
        || unsafe {
            match end {
                AppEnd::Peer => (*md).remote_ip4,
                AppEnd::Own => (*md).local_ip4,
            }
        },
        || read_ip6(md, end),
        port,
    )?;
    Some(FlowKey {
        // SAFETY: the helper only reads the socket behind the context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client,
        _pad: 0,
    })
}

/// One 32-bit load per word (see `sock_ops::read_local_ip6`); `end` is a
/// constant at every call, so each load has a fixed context offset.
#[inline(always)]
fn read_ip6(md: *mut aya_ebpf::bindings::sk_msg_md, end: AppEnd) -> [u32; 4] {
    // SAFETY: in-bounds context field reads, checked by the verifier.
    unsafe {
        match end {
            AppEnd::Peer => [
                read_volatile(addr_of!((*md).remote_ip6[0])),
                read_volatile(addr_of!((*md).remote_ip6[1])),
                read_volatile(addr_of!((*md).remote_ip6[2])),
                read_volatile(addr_of!((*md).remote_ip6[3])),
            ],
            AppEnd::Own => [
                read_volatile(addr_of!((*md).local_ip6[0])),
                read_volatile(addr_of!((*md).local_ip6[1])),
                read_volatile(addr_of!((*md).local_ip6[2])),
                read_volatile(addr_of!((*md).local_ip6[3])),
            ],
        }
    }
}

/// `setsockopt` level and option of `bpf_setsockopt`'s own TCP setting for
/// the delayed-ACK timer's upper bound, in µs (`TCP_BPF_DELACK_MAX`, uapi
/// `bpf.h`; Linux 5.10).
const SOL_TCP: i32 = 6;
const TCP_BPF_DELACK_MAX: i32 = 1004;

/// Bounds the delayed-ACK timer of an accepted socket whose replies will
/// take the shortcut (`wm_agent_sock_ops`, when its handshake completes).
///
/// Why: such a socket sends no TCP data for its acknowledgements to ride
/// on, and the agent puts it in the kernel's interactive mode so that a
/// read acknowledges only every second request (a request's ACK waits for
/// the next request, or for the delayed-ACK timer). An application that
/// leaves Nagle's algorithm on holds each
/// small request until the one before is acknowledged, so it waits for
/// that timer once per connection: 40 ms by default (`TCP_ATO_MIN`). The
/// kernel takes its smallest bound, two ticks: 2 ms at `HZ=1000`, 8 ms at
/// 250, 20 ms at 100; what it refuses is tried at the next size. The agent
/// enters the interactive mode only where this program runs.
pub fn bound_delayed_acks(ctx: &SockOpsContext) {
    let Some(listener_port) = outbound_port() else {
        return;
    };
    if !reply_shortcut_on() || ctx.local_port() != u32::from(listener_port) {
        return;
    }
    for usecs in [2_000u32, 4_000, 8_000, 10_000, 20_000] {
        let mut value = usecs as i32;
        // SAFETY: the context is the kernel's `bpf_sock_ops` of a full,
        // locked socket (a passive-established callback); `value` is a
        // live int of the length given.
        let ret = unsafe {
            bpf_setsockopt(
                ctx.as_ptr(),
                SOL_TCP,
                TCP_BPF_DELACK_MAX,
                (&mut value as *mut i32).cast(),
                core::mem::size_of::<i32>() as i32,
            )
        };
        if ret == 0 {
            return;
        }
    }
}
