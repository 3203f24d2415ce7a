//! `sock_ops`: makes the original destination findable from the agent's
//! side of the connection, and cleans up after the socket.
//!
//! The connect hooks key the original destination by the *client* socket's
//! cookie, which the agent cannot see: the socket it accepts is a different
//! socket with a different cookie. What both sides share is the client's
//! address and port, and the network namespace. So once the handshake has
//! completed (`ACTIVE_ESTABLISHED`, which runs before the client's final ACK
//! is sent, hence before the agent can `accept()`), this program copies the
//! entry to [`ORIGINAL_DST_BY_FLOW`] under `(netns cookie, client address)`,
//! where the agent takes it (reads and deletes it) when it accepts.
//!
//! Why not a `cgroup/getsockopt` program answering `SO_ORIGINAL_DST`, as
//! Merbridge does: the getsockopt call is made by the *agent*, so that
//! program would have to be attached to the agent's cgroup, outside the
//! pods' cgroup these programs are confined to; and with the in-pod listener
//! every pod dials from the same loopback addresses, so a 4-tuple alone is
//! ambiguous across pods. The netns cookie disambiguates, and the agent
//! learns its listener's netns cookie with `getsockopt(SO_NETNS_COOKIE)`.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSING,
        BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, bpf_sock_ops,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::{addr_of, read_volatile};
use waymark_common::{FlowKey, REQUEST_PENDING, RequestFlow};

use crate::{
    addr::{
        AF_INET, AF_INET6, LOOPBACK_V4, LOOPBACK_V6, context_remote_port, flow_addr, is_v4_mapped,
        outbound_port, reply_shortcut_on, request_shortcut_limit,
    },
    maps::{
        ORIGINAL_DST_BY_COOKIE, ORIGINAL_DST_BY_FLOW, REPLIES_LEFT, REQUEST_CONSUMED,
        REQUEST_FLOWS, SHORTCUT_CLIENTS, SHORTCUT_READY, original_dst,
    },
};

/// sock_ops programs return 1; the answer to the kernel, where an op asks
/// for one, goes in `reply`, which none of ours do.
const OK: u32 = 1;

/// Errors are negative errnos from helpers, or this for "the socket has no
/// address family we key by".
const UNKNOWN_FAMILY: i64 = -1;

#[sock_ops]
pub fn wm_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(()) | Err(_) => OK,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(ctx),
        _ => Ok(()),
    }
}

/// The SYN is about to leave. State-change callbacks are off by default
/// (they cost a call on every transition), so turn them on for redirected
/// sockets only: we need to see their close.
fn on_connect(ctx: &SockOpsContext) -> Result<(), i64> {
    if original_dst(socket_cookie(ctx)).is_none() {
        return Ok(());
    }
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    ctx.set_cb_flags(flags as i32).map_err(i64::from)
}

fn on_established(ctx: &SockOpsContext) -> Result<(), i64> {
    let Some(original) = original_dst(socket_cookie(ctx)) else {
        // A connection to the agent's listener with no original
        // destination (the pod dialled the listener itself, or its cookie
        // entry was evicted): a flow entry under its key can only be an
        // earlier connection's, left behind. Delete it, so the agent finds
        // nothing and refuses the connection instead of sending it to where
        // that earlier one was going. Only for connections to the listener:
        // another connection may share the client port towards another
        // destination while a redirected one waits to be accepted.
        if dials_the_listener(ctx) {
            let _ = ORIGINAL_DST_BY_FLOW.remove(flow_key(ctx)?);
        }
        return Ok(());
    };
    let key = flow_key(ctx)?;
    // BPF_ANY: a stale entry left by an earlier connection from the same
    // netns and port is overwritten, never read by the new one.
    ORIGINAL_DST_BY_FLOW
        .insert(key, original, u64::from(BPF_ANY))
        .map_err(i64::from)?;
    // An earlier connection's "left" must not keep this one off.
    let _ = REPLIES_LEFT.remove(key);
    if reply_shortcut_on() {
        let filed = offer_reply_shortcut(ctx, key);
        offer_request_shortcut(ctx, key, filed);
    } else {
        // A marker an earlier connection under this key left (one the
        // agent refused, or accepted after the shortcut was turned off)
        // must not make an agent that still has it on shortcut towards
        // this client, which is not in the map: its replies would be lost.
        let _ = SHORTCUT_READY.remove(key);
    }
    Ok(())
}

/// Puts the client socket in the reply shortcut's map and tells the agent
/// whether that worked (see `shortcut.rs`). Now is the moment: the handshake
/// has completed but `connect()` has not returned, so the agent cannot have
/// accepted, let alone replied; every reply of the connection takes the same
/// path. A failure (the map full) only means this connection's replies go
/// through loopback as before. Returns whether the socket is in the map.
fn offer_reply_shortcut(ctx: &SockOpsContext, mut key: FlowKey) -> bool {
    // SAFETY: the context pointer is the kernel's `bpf_sock_ops`, which is
    // what the helper behind `update` takes.
    let ops = unsafe { &mut *ctx.ops };
    match SHORTCUT_CLIENTS.update(&mut key, ops, u64::from(BPF_ANY)) {
        Ok(()) => {
            let _ = SHORTCUT_READY.insert(key, 1, u64::from(BPF_ANY));
            true
        }
        Err(_) => {
            // An earlier connection's marker under this key must not make
            // the agent shortcut towards a socket that is not in the map.
            let _ = SHORTCUT_READY.remove(key);
            false
        }
    }
}

/// Files the connection for the request shortcut (see `request.rs`) when
/// the agent asked for it, the client socket is in [`SHORTCUT_CLIENTS`]
/// (where `wm_request_shortcut` runs on its sends) and it has sent no byte
/// yet. A TCP Fast Open client's data left with its SYN and may still be
/// on its way to the agent's socket: redirected bytes would overtake it,
/// so such a connection (`snd_nxt` past `snd_una` now) is not filed.
/// Without an entry every request takes TCP; an entry an earlier
/// connection under this key left must not speak for this one.
fn offer_request_shortcut(ctx: &SockOpsContext, key: FlowKey, filed: bool) {
    // SAFETY: context field reads, checked by the verifier.
    let (snd_nxt, snd_una) = unsafe { ((*ctx.ops).snd_nxt, (*ctx.ops).snd_una) };
    if filed && request_shortcut_limit().is_some() && snd_nxt == snd_una {
        let flow = RequestFlow {
            state: REQUEST_PENDING,
            target: 0,
            redirected: 0,
        };
        if REQUEST_FLOWS.insert(key, flow, u64::from(BPF_ANY)).is_ok() {
            return;
        }
    }
    let _ = REQUEST_FLOWS.remove(key);
}

/// The socket is closing for good.
///
/// The cookie entry always goes: nothing asks for it after the close.
///
/// The flow entry goes only if the connection ended without the client
/// closing it gracefully first: it was refused or reset (old state
/// `SYN_SENT`, `ESTABLISHED`, `CLOSE_WAIT`), or the agent had already closed
/// its side, which it does only after taking the entry (`LAST_ACK`). After a
/// graceful close by the client (old state `FIN_WAIT1`, `FIN_WAIT2`,
/// `CLOSING`) the connection, possibly with request bytes, can still be
/// waiting in the agent's accept queue: the client's socket reaches
/// `TCP_CLOSE` as soon as its FIN is acknowledged, which the kernel does
/// without the agent. Deleting then would leave the agent a connection it
/// cannot route. Such an entry is removed when the agent takes it; if the
/// agent never accepts the connection (its listener closed with a backlog)
/// it stays until the LRU evicts it or a later connection from the same
/// netns and port overwrites it (see `on_established`).
fn on_state_change(ctx: &SockOpsContext) -> Result<(), i64> {
    // args[0] is the old state, args[1] the new one.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return Ok(());
    }
    // Either entry may already be gone (taken by the agent, or evicted):
    // not an error.
    let _ = ORIGINAL_DST_BY_COOKIE.remove(socket_cookie(ctx));
    // The request shortcut's entries serve this socket's sends only.
    if let Ok(key) = flow_key(ctx) {
        let _ = REQUEST_FLOWS.remove(key);
        let _ = REQUEST_CONSUMED.remove(key);
        let _ = REPLIES_LEFT.remove(key);
    }
    if matches!(
        ctx.arg(0),
        BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 | BPF_TCP_CLOSING
    ) {
        return Ok(());
    }
    // Runs before the kernel releases the local port, so the flow key can
    // still be rebuilt from the socket.
    let _ = ORIGINAL_DST_BY_FLOW.remove(flow_key(ctx)?);
    Ok(())
}

/// Whether the socket is connected to the agent's listener in its pod:
/// `127.0.0.1` or `::1` (or v4-mapped loopback) on the outbound port.
fn dials_the_listener(ctx: &SockOpsContext) -> bool {
    let Some(listener_port) = outbound_port() else {
        return false;
    };
    let port = context_remote_port(ctx.remote_port());
    if port != listener_port {
        return false;
    }
    match ctx.family() {
        AF_INET => ctx.remote_ip4() == LOOPBACK_V4,
        AF_INET6 => {
            let ip = read_remote_ip6(ctx.ops);
            ip == LOOPBACK_V6 || (is_v4_mapped(&ip) && ip[3] == LOOPBACK_V4)
        }
        _ => false,
    }
}

pub(crate) fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper only reads the socket behind the context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The key the agent will rebuild from its accepted socket: the pod's netns
/// cookie and the client socket's own address, which is the accepted
/// socket's peer. A v4-mapped client (a dual-stack socket that dialled an
/// IPv4 address) reaches the agent's IPv4 listener, which sees a plain IPv4
/// peer, so it is keyed as IPv4.
fn flow_key(ctx: &SockOpsContext) -> Result<FlowKey, i64> {
    // local_port, unlike remote_port, is in host byte order.
    let client = flow_addr(
        ctx.family(),
        || ctx.local_ip4(),
        || read_local_ip6(ctx.ops),
        ctx.local_port() as u16,
    )
    .ok_or(UNKNOWN_FAMILY)?;
    Ok(FlowKey {
        // SAFETY: the helper only reads the socket behind the context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client,
        _pad: 0,
    })
}

/// As [`read_local_ip6`], for `remote_ip6`.
pub(crate) fn read_remote_ip6(ops: *mut bpf_sock_ops) -> [u32; 4] {
    // SAFETY: in-bounds context field reads, checked by the verifier.
    unsafe {
        [
            read_volatile(addr_of!((*ops).remote_ip6[0])),
            read_volatile(addr_of!((*ops).remote_ip6[1])),
            read_volatile(addr_of!((*ops).remote_ip6[2])),
            read_volatile(addr_of!((*ops).remote_ip6[3])),
        ]
    }
}

/// One 32-bit load per word: sock_ops only allows 4-byte context reads of
/// `local_ip6`, and a plain array copy may be compiled into 8-byte loads.
fn read_local_ip6(ops: *mut bpf_sock_ops) -> [u32; 4] {
    // SAFETY: in-bounds context field reads, checked by the verifier.
    unsafe {
        [
            read_volatile(addr_of!((*ops).local_ip6[0])),
            read_volatile(addr_of!((*ops).local_ip6[1])),
            read_volatile(addr_of!((*ops).local_ip6[2])),
            read_volatile(addr_of!((*ops).local_ip6[3])),
        ]
    }
}
