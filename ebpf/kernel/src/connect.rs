//! `cgroup/connect4` and `cgroup/connect6`: send a pod's outbound TCP to the
//! agent's listener inside the pod's own network namespace.
//!
//! The destination is rewritten to loopback because the agent binds its
//! listener in every pod's netns: `127.0.0.1` there is the pod's own
//! loopback, reachable with any CNI, and which listener accepted tells the
//! agent which pod is calling. The original destination is recorded first,
//! keyed by socket cookie; if recording fails the connect goes ahead
//! unredirected (fail open) rather than reaching the proxy with no way to
//! know where it was going.
//!
//! A pod at its connection limit is refused here, before any of that (see
//! [`crate::limits`]).

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use waymark_common::{FAMILY_V4, FAMILY_V6, SockAddr};

use crate::{
    addr::*,
    limits,
    maps::{ENROLLED, ORIGINAL_DST_BY_COOKIE},
};

/// connect hooks: 1 lets the `connect()` proceed.
const ALLOW: i32 = 1;
/// Fails the `connect()`, with EPERM unless the program set another error
/// (`bpf_set_retval`).
const REFUSE: i32 = 0;

/// Not an errno; "this socket is left alone because no port is configured".
const NOT_CONFIGURED: i64 = -1;

#[cgroup_sock_addr(connect4)]
pub fn wm_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) => ret,
        Err(_) => ALLOW,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn wm_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(ret) => ret,
        Err(_) => ALLOW,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return Ok(ALLOW);
    }
    let Some(netns) = enrolled_netns(ctx) else {
        return Ok(ALLOW);
    };
    // SAFETY: `sa` is the context pointer the kernel passed in; the verifier
    // checks every field access against the context layout.
    let (ip, port) = unsafe { ((*sa).user_ip4, port_from_user((*sa).user_port)) };
    if is_local_v4(ip) || is_excluded_v4(ip, port) {
        return Ok(ALLOW);
    }
    let target = outbound_port().ok_or(NOT_CONFIGURED)?;
    let original = SockAddr {
        addr: [ip, 0, 0, 0],
        port,
        family: FAMILY_V4,
    };
    if !limits::admit(ctx, netns, &original) {
        return Ok(REFUSE);
    }
    record(ctx, &original)?;
    // SAFETY: as above; both fields are writable in connect4.
    unsafe {
        (*sa).user_ip4 = LOOPBACK_V4;
        (*sa).user_port = port_to_user(target);
    }
    Ok(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i64> {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return Ok(ALLOW);
    }
    let Some(netns) = enrolled_netns(ctx) else {
        return Ok(ALLOW);
    };
    let ip = read_user_ip6(sa);
    // SAFETY: context field read, checked by the verifier.
    let port = port_from_user(unsafe { (*sa).user_port });
    // A dual-stack socket dialling `::ffff:a.b.c.d` is IPv4 on the wire: it
    // follows the IPv4 rules and must land on the IPv4 listener, which only
    // the v4-mapped form of 127.0.0.1 reaches (`::1` would not).
    let target_ip = if is_v4_mapped(&ip) {
        if is_local_v4(ip[3]) || is_excluded_v4(ip[3], port) {
            return Ok(ALLOW);
        }
        [0, 0, V4_MAPPED_PREFIX, LOOPBACK_V4]
    } else {
        if is_local_v6(&ip) || is_excluded_v6(&ip, port) {
            return Ok(ALLOW);
        }
        LOOPBACK_V6
    };
    let target = outbound_port().ok_or(NOT_CONFIGURED)?;
    let original = SockAddr {
        addr: ip,
        port,
        family: FAMILY_V6,
    };
    if !limits::admit(ctx, netns, &original) {
        return Ok(REFUSE);
    }
    record(ctx, &original)?;
    write_user_ip6(sa, &target_ip);
    // SAFETY: context field write, allowed in connect6.
    unsafe { (*sa).user_port = port_to_user(target) };
    Ok(ALLOW)
}

/// The socket's network namespace cookie, if it belongs to an enrolled pod.
fn enrolled_netns(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: the helper only reads the netns of the socket behind the
    // context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence, never read.
    unsafe { ENROLLED.get(netns).is_some() }.then_some(netns)
}

fn record(ctx: &SockAddrContext, original: &SockAddr) -> Result<(), i64> {
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIGINAL_DST_BY_COOKIE
        .insert(cookie, original, u64::from(BPF_ANY))
        .map_err(i64::from)
}
