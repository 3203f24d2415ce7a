//! Address classification and the kernel's byte orders.
//!
//! The context structs do not agree with each other, so every conversion
//! lives here:
//!
//! | field                                   | byte order              |
//! |-----------------------------------------|-------------------------|
//! | `bpf_sock_addr.user_ip4`, `user_ip6[i]` | network                 |
//! | `bpf_sock_addr.user_port`               | network, low 16 bits    |
//! | `bpf_sock_ops.local_ip4`, `local_ip6[i]`| network                 |
//! | `bpf_sock_ops.local_port`               | **host**                |
//!
//! [`SockAddr`] keeps addresses in network order (so they go straight
//! between context and map) and ports in host order (so the agent and the
//! exclusion lists can compare them as numbers).

use aya_ebpf::{bindings::bpf_sock_addr, maps::lpm_trie::Key};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use waymark_common::{
    ExcludePorts, FAMILY_V4, FAMILY_V6, MAX_EXCLUDE_PORTS, SETTING_REPLY_SHORTCUT,
    SETTING_REQUEST_SHORTCUT, SockAddr,
};

use crate::maps::{EXCLUDE_V4, EXCLUDE_V6, SETTINGS};

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const SOCK_STREAM: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;

/// An IPv4 address as the kernel stores it: the bytes in wire order.
const fn ip4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_ne_bytes([a, b, c, d])
}

/// `127.0.0.1`, the agent's IPv4 listener inside every pod.
pub const LOOPBACK_V4: u32 = ip4(127, 0, 0, 1);
/// `::1`, the agent's IPv6 listener inside every pod.
pub const LOOPBACK_V6: [u32; 4] = [0, 0, 0, ip4(0, 0, 0, 1)];
/// Third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`).
pub const V4_MAPPED_PREFIX: u32 = ip4(0, 0, 0xff, 0xff);

/// `user_port` carries a `__be16` zero-extended to 32 bits.
pub fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

pub fn port_to_user(port: u16) -> u32 {
    u32::from(port.to_be())
}

pub fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX
}

/// A socket's address as the flow maps key it: a v4-mapped IPv6 address
/// (a dual-stack socket that dialled an IPv4 address, whose peer sees a
/// plain IPv4 address) is keyed as the IPv4 address it carries. The address
/// readers run only for the family that has one. `None`: neither family.
pub fn flow_addr(
    family: u32,
    ip4: impl FnOnce() -> u32,
    ip6: impl FnOnce() -> [u32; 4],
    port: u16,
) -> Option<SockAddr> {
    let (addr, family) = match family {
        AF_INET => ([ip4(), 0, 0, 0], FAMILY_V4),
        AF_INET6 => {
            let ip = ip6();
            if is_v4_mapped(&ip) {
                ([ip[3], 0, 0, 0], FAMILY_V4)
            } else {
                (ip, FAMILY_V6)
            }
        }
        _ => return None,
    };
    Some(SockAddr { addr, port, family })
}

/// The remote port as `sock_ops` and `sk_msg` contexts hold it: network
/// order, in the upper 16 bits on little-endian machines (the kernel shifts
/// it there), in host order.
pub fn context_remote_port(raw: u32) -> u16 {
    if cfg!(target_endian = "little") {
        u16::from_be((raw >> 16) as u16)
    } else {
        raw as u16
    }
}

/// `127.0.0.0/8` belongs to the pod itself (and is where the agent listens);
/// `0.0.0.0` means "this host" to `connect()`. Neither is ever proxied.
pub fn is_local_v4(ip: u32) -> bool {
    ip == 0 || ip.to_ne_bytes()[0] == 127
}

/// `::1` and `::` (see [`is_local_v4`]).
pub fn is_local_v6(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == LOOPBACK_V6[3])
}

pub fn is_excluded_v4(ip: u32, port: u16) -> bool {
    match EXCLUDE_V4.get(Key::new(32, ip)) {
        Some(ports) => ports_match(ports, port),
        None => false,
    }
}

pub fn is_excluded_v6(ip: &[u32; 4], port: u16) -> bool {
    match EXCLUDE_V6.get(Key::new(128, *ip)) {
        Some(ports) => ports_match(ports, port),
        None => false,
    }
}

fn ports_match(excluded: &ExcludePorts, port: u16) -> bool {
    if excluded.len == 0 {
        return true;
    }
    // Constant bound: the verifier sees a loop of at most 16 iterations.
    for i in 0..MAX_EXCLUDE_PORTS {
        if i as u32 >= excluded.len {
            break;
        }
        if excluded.ports[i] == port {
            return true;
        }
    }
    false
}

/// The outbound listener port, or `None` when the agent has not configured
/// one yet (the array slot starts zeroed).
pub fn outbound_port() -> Option<u16> {
    match SETTINGS.get(0) {
        Some(settings) if settings.outbound_port != 0 => Some(settings.outbound_port),
        _ => None,
    }
}

/// Whether the agent asked for the reply shortcut (`SETTING_REPLY_SHORTCUT`).
pub fn reply_shortcut_on() -> bool {
    matches!(SETTINGS.get(0), Some(s) if s.flags & SETTING_REPLY_SHORTCUT != 0)
}

/// The request shortcut's bound in bytes when the agent asked for it
/// (`SETTING_REQUEST_SHORTCUT`), else `None`.
pub fn request_shortcut_limit() -> Option<u64> {
    match SETTINGS.get(0) {
        Some(s) if s.flags & SETTING_REQUEST_SHORTCUT != 0 => {
            Some(u64::from(s.request_max_unread_kib) << 10)
        }
        _ => None,
    }
}

/// Only TCP goes through the proxy; UDP (DNS above all) is left alone.
pub fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: context field reads, checked by the verifier.
    unsafe { (*sa).type_ == SOCK_STREAM && (*sa).protocol == IPPROTO_TCP }
}

// `user_ip6` is read and written one 32-bit word at a time with volatile
// accesses so the compiler cannot merge them into wider or unaligned
// accesses of the context, which the verifier may reject.

pub fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: in-bounds context field reads, checked by the verifier.
    unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    }
}

pub fn write_user_ip6(sa: *mut bpf_sock_addr, ip: &[u32; 4]) {
    // SAFETY: in-bounds context field writes, allowed in connect6 and
    // getpeername6.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip[3]);
    }
}
