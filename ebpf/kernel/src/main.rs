//! waymark's kernel programs: transparent redirection of pods' outbound TCP.
//!
//! Everything here is attached to the cgroup v2 directory that holds the
//! node's pods, and the agent's own sockets live outside it and are never
//! redirected; one program, `wm_agent_sock_ops`, is attached to the agent's
//! own cgroup and only files its accepted sockets for the request shortcut.
//!
//! * [`connect`]: `cgroup/connect4` and `cgroup/connect6` rewrite a pod's TCP
//!   `connect()` to the agent's in-pod listener (`127.0.0.1:PORT` /
//!   `[::1]:PORT` in the pod's own netns) and record the destination the pod
//!   asked for, keyed by socket cookie.
//! * [`sock_ops`]: re-keys that record by the connection as the agent sees it
//!   (netns cookie + client address) once the handshake completes, and cleans
//!   up when the socket closes.
//! * [`release`]: `cgroup/sock_release` forgets a socket's recorded
//!   destination when it is released, also when its `connect()` failed
//!   before `sock_ops` saw it (a pod churning failing connects cannot fill
//!   the node-wide cookie map).
//! * [`limits`]: a pod at its connection limit (or a node at the agent's)
//!   has its `connect()` refused with `ECONNREFUSED` before a SYN leaves;
//!   the release hook gives a socket back.
//! * [`peername`]: `cgroup/getpeername4` and `cgroup/getpeername6` hand the
//!   application the address it dialled, not the proxy's.
//! * [`shortcut`] and [`request`]: `sk_msg` programs moving a redirected
//!   connection's replies and requests socket to socket, and the
//!   `sock_ops` program on the agent's own cgroup that files the agent's
//!   accepted sockets for the requests.
//! * [`inbound`]: `cgroup_skb` ingress keeps plaintext from other nodes out
//!   of pods under strict inbound.
//!
//! Every program fails open: on any internal error the connection proceeds
//! unredirected rather than being refused.
#![no_std]
#![no_main]
// Atomic adds for the strict-inbound counters (see `inbound`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod connect;
mod inbound;
mod limits;
mod maps;
mod peername;
mod release;
mod request;
mod shortcut;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here (no unchecked indexing, no
    // unwrap); BPF has no way to unwind anyway.
    loop {}
}

/// The crate's licence (`MIT OR GPL-2.0-only`), as the kernel spells it.
/// None of the helpers used here is GPL-only; the diagnostics object,
/// which needs them, declares the same, so both objects and their sources
/// say one thing.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
