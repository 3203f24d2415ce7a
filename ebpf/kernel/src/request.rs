//! The request shortcut: a pod application's requests go socket to socket
//! into the agent's accepted socket, so the pod's loopback leg of a
//! redirected connection carries no TCP at all (with the reply shortcut,
//! `shortcut.rs`, for the other direction).
//!
//! Two programs:
//!
//! * `wm_agent_sock_ops`, attached to the *agent's* own cgroup (an
//!   accepted socket belongs to the cgroup of its listener's creator)
//!   whenever the reply shortcut is on: when the handshake of a connection
//!   to the agent's pod listener completes on the agent's side, it bounds
//!   the socket's delayed ACKs (`shortcut::bound_delayed_acks`) and, with
//!   the request shortcut on, puts the accepted socket in
//!   [`REQUEST_TARGETS`] and marks the connection's [`REQUEST_FLOWS`] entry
//!   (filed by `sock_ops` on the client's side) as having a target. On
//!   loopback that happens before the application's `connect()` returns.
//! * `wm_request_shortcut`, an `sk_msg` program on [`SHORTCUT_CLIENTS`],
//!   runs on every `sendmsg` of a redirected application socket.
//!
//! The byte order is what everything here guards. The agent's socket reads
//! redirected bytes before anything in its TCP receive queue, so:
//!
//! * The path is decided once, at the application's first `sendmsg`
//!   (under its socket lock, so one decision per connection): redirect if
//!   the agent's socket is already a target, TCP otherwise. A connection
//!   that sent anything by TCP never redirects afterwards.
//! * From redirect the connection can move to TCP at any moment (held for
//!   a capture, over its bound, the agent's socket gone): bytes already
//!   redirected are read first, then the TCP ones, which is their order.
//!   Never back.
//! * When the redirect itself fails (the agent's socket closed since),
//!   the message takes TCP (`SK_PASS` without a target), never an error
//!   to the application: TCP answers a closed socket with a reset, as it
//!   would have anyway.
//!
//! Redirected bytes skip TCP's window, so the kernel would queue whatever
//! the application sends, whether or not the agent reads. The bound: the
//! agent writes how much it has read into [`REQUEST_CONSUMED`] every
//! 256 KiB; once more than `request_max_unread_kib` is redirected beyond
//! that, the connection takes TCP, whose window then holds the pod back.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS,
    },
    helpers::bpf_get_netns_cookie,
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use waymark_common::{FlowKey, REQUEST_PENDING, REQUEST_REDIRECT, REQUEST_TCP};

use crate::{
    addr::{context_remote_port, flow_addr, outbound_port, request_shortcut_limit},
    maps::{REQUEST_CONSUMED, REQUEST_FLOWS, REQUEST_HELD, REQUEST_TARGETS, SHORTCUT_BYTES_OUT},
    shortcut::{AppEnd, app_key, bound_delayed_acks, count},
    sock_ops::read_remote_ip6,
};

/// sock_ops programs return 1 (see `sock_ops.rs`).
const OK: u32 = 1;

#[sk_msg]
pub fn wm_request_shortcut(ctx: SkMsgContext) -> u32 {
    let Some(mut key) = app_key(&ctx, AppEnd::Own) else {
        return SK_PASS;
    };
    let Some(flow) = REQUEST_FLOWS.get_ptr_mut(key) else {
        return SK_PASS;
    };
    // SAFETY: this connection's own entry. Its other writers: this program
    // (serialised by the socket lock the kernel holds around it), the
    // entry's removal at the socket's close (also under that lock), and
    // `wm_agent_sock_ops` writing `target` only.
    let flow = unsafe { &mut *flow };
    if flow.state == REQUEST_TCP {
        return SK_PASS;
    }
    let Some(limit) = request_shortcut_limit() else {
        flow.state = REQUEST_TCP;
        return SK_PASS;
    };
    if flow.state == REQUEST_PENDING {
        if flow.target == 0 {
            flow.state = REQUEST_TCP;
            return SK_PASS;
        }
        flow.state = REQUEST_REDIRECT;
    }
    // SAFETY: the value is only tested for presence.
    let held = unsafe { REQUEST_HELD.get(key.netns_cookie).is_some() };
    // SAFETY: a copy of plain data; a concurrent update gives a newer one.
    let consumed = REQUEST_CONSUMED
        .get_ptr(key)
        .map(|p| unsafe { core::ptr::read(p) })
        .unwrap_or(0);
    let size = u64::from(ctx.size());
    if held || flow.redirected.saturating_sub(consumed) + size > limit {
        flow.state = REQUEST_TCP;
        return SK_PASS;
    }
    if REQUEST_TARGETS.redirect_msg(&ctx, &mut key, u64::from(BPF_F_INGRESS)) as u32 != SK_PASS {
        // The agent's socket is gone: no target, so SK_PASS sends this
        // message (and every later one) through TCP.
        flow.state = REQUEST_TCP;
        return SK_PASS;
    }
    flow.redirected += size;
    count(&SHORTCUT_BYTES_OUT, key.netns_cookie, size);
    SK_PASS
}

#[sock_ops]
pub fn wm_agent_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        bound_delayed_acks(&ctx);
        offer_target(&ctx);
    }
    OK
}

/// The agent's socket for a connection filed for the request shortcut
/// becomes its target. Anything else the agent accepts or dials is left
/// alone: only a socket on the pod listener's port whose peer has a
/// pending entry in its netns qualifies, and only the connection's own
/// accepted socket has that peer there.
fn offer_target(ctx: &SockOpsContext) {
    if request_shortcut_limit().is_none() {
        return;
    }
    let Some(listener_port) = outbound_port() else {
        return;
    };
    if ctx.local_port() != u32::from(listener_port) {
        return;
    }
    let Some(client) = flow_addr(
        ctx.family(),
        || ctx.remote_ip4(),
        || read_remote_ip6(ctx.ops),
        context_remote_port(ctx.remote_port()),
    ) else {
        return;
    };
    let mut key = FlowKey {
        // SAFETY: the helper only reads the socket behind the context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client,
        _pad: 0,
    };
    let Some(flow) = REQUEST_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a read of plain data (see the write below).
    if unsafe { (*flow).state } != REQUEST_PENDING {
        return;
    }
    // SAFETY: the context pointer is the kernel's `bpf_sock_ops`, which is
    // what the helper behind `update` takes.
    let ops = unsafe { &mut *ctx.ops };
    // BPF_NOEXIST: a second agent's program (during a handover both run)
    // finds the socket there and leaves the mark to the first.
    if REQUEST_TARGETS
        .update(&mut key, ops, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        // SAFETY: `target` is written only here. Should the entry have been
        // removed and reused meanwhile (the client closed at once), another
        // connection reads a target that is not its own key's: its
        // redirect finds no socket and takes TCP.
        unsafe { (*flow).target = 1 };
    }
}
