//! `cgroup/sock_release`: forgets a socket's original destination when the
//! socket is released, whatever state it reached.
//!
//! `sock_ops` sees the close of a redirected socket only once the SYN has
//! left (state callbacks are turned on at `TCP_CONNECT_CB`). A `connect()`
//! the connect hook rewrote can still fail before that — no ephemeral port
//! left, the 4-tuple already taken, no route — and the socket is then
//! closed without `sock_ops` ever hearing of it. Its entry in
//! [`ORIGINAL_DST_BY_COOKIE`] would stay until the LRU evicted it, so a pod
//! churning such connects would push every other pod's live entries out of
//! the node-wide map (their `getpeername` and, in the window before the
//! handshake completes, their routing). Releasing the socket deletes the
//! entry instead: the map holds only sockets that are still open.
//!
//! Releasing is also when a socket stops counting against its pod's
//! connection limit ([`crate::limits`]).

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext,
};

use crate::{limits, maps::ORIGINAL_DST_BY_COOKIE};

/// cgroup/sock_release programs return 1 (the return value is ignored for
/// this hook, but 0 would mean "deny" elsewhere).
const OK: i32 = 1;

#[cgroup_sock(sock_release)]
pub fn wm_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Most released sockets were never redirected: not an error.
    let _ = ORIGINAL_DST_BY_COOKIE.remove(cookie);
    limits::release(cookie);
    OK
}
