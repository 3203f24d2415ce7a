//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected socket is
//! really connected to the agent's listener, but the application asked for
//! somewhere else; `getpeername()` answers with what it asked for, as it
//! would without a proxy (clients log it, TLS libraries use it, some compare
//! it with what they dialled).

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use waymark_common::{FAMILY_V4, FAMILY_V6};

use crate::{
    addr::{port_to_user, write_user_ip6},
    maps::original_dst,
};

/// getpeername hooks must return 1; the verifier rejects anything else.
const OK: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn wm_peername4(ctx: SockAddrContext) -> i32 {
    match try_peername(&ctx, FAMILY_V4) {
        Ok(()) | Err(()) => OK,
    }
}

#[cgroup_sock_addr(getpeername6)]
pub fn wm_peername6(ctx: SockAddrContext) -> i32 {
    match try_peername(&ctx, FAMILY_V6) {
        Ok(()) | Err(()) => OK,
    }
}

/// `family` is the hook's family; the recorded address was written by the
/// connect hook of the same family, so a mismatch means "not ours".
fn try_peername(ctx: &SockAddrContext, family: u16) -> Result<(), ()> {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = original_dst(cookie).ok_or(())?;
    if original.family != family {
        return Err(());
    }
    let sa = ctx.sock_addr;
    if family == FAMILY_V4 {
        // SAFETY: context field write, allowed in getpeername4.
        unsafe { (*sa).user_ip4 = original.addr[0] };
    } else {
        write_user_ip6(sa, &original.addr);
    }
    // SAFETY: context field write, allowed in both getpeername hooks.
    unsafe { (*sa).user_port = port_to_user(original.port) };
    Ok(())
}
