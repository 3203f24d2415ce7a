//! One TCP socket's memory, asked of the kernel through `sock_diag`
//! (`NETLINK_SOCK_DIAG`, what `ss -tm` reads): how many bytes sit unread in
//! a pod application's socket. The reply shortcut needs it (see
//! `idle::ReplyBudget`): bytes a sockmap delivered are counted there, while
//! nothing in TCP shows them.
//!
//! A netlink socket sees its own network namespace only: the caller makes
//! it in the pod's ([`crate::transport::netns::PodNetns::sock_diag`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

/// `SOCK_DIAG_BY_FAMILY` of `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR` of `linux/netlink.h`.
const NLMSG_ERROR: u16 = 2;
/// `INET_DIAG_SKMEMINFO` of `linux/inet_diag.h`: attribute with the
/// socket's `SK_MEMINFO_*` counters, `RMEM_ALLOC` first.
const INET_DIAG_SKMEMINFO: u16 = 7;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_msg`.
const INET_DIAG_MSG: usize = 72;

/// A `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace.
pub fn open() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(io::Error::from)
}

/// The bytes held in the receive memory of the TCP socket whose local
/// address is `local` and peer `peer`: `Ok(None)` when there is no such
/// socket (any more).
pub fn receive_memory(
    netlink: BorrowedFd<'_>,
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<Option<u32>> {
    let request = request(local, peer)?;
    // An unconnected netlink socket sends to the kernel.
    send(netlink.as_raw_fd(), &request, MsgFlags::empty()).map_err(io::Error::from)?;
    let mut answer = [0u8; 1024];
    let got = recv(netlink.as_raw_fd(), &mut answer, MsgFlags::empty()).map_err(io::Error::from)?;
    parse(&answer[..got])
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for exactly one socket, with its
/// memory counters.
fn request(local: SocketAddr, peer: SocketAddr) -> io::Result<Vec<u8>> {
    let family = match (local.ip(), peer.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "local and peer addresses of different families",
            ));
        }
    };
    let mut m = Vec::with_capacity(NLMSG_HDR + 56);
    m.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel's
    m.push(family as u8);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(1 << (INET_DIAG_SKMEMINFO - 1)); // ext
    m.push(0);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    // inet_diag_sockid: ports and addresses in network order.
    m.extend_from_slice(&local.port().to_be_bytes());
    m.extend_from_slice(&peer.port().to_be_bytes());
    for ip in [local.ip(), peer.ip()] {
        let mut words = [0u8; 16];
        match ip {
            IpAddr::V4(v4) => words[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => words.copy_from_slice(&v6.octets()),
        }
        m.extend_from_slice(&words);
    }
    m.extend_from_slice(&0u32.to_ne_bytes()); // interface
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    Ok(m)
}

/// The first message of the kernel's answer: the socket's `RMEM_ALLOC`,
/// `None` for "no such socket".
fn parse(answer: &[u8]) -> io::Result<Option<u32>> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sock_diag answer: {what}"),
        )
    };
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(answer.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(answer.get(at..at + 4)?.try_into().ok()?))
    };
    let len = u32_at(0).ok_or_else(|| bad("short header"))? as usize;
    let kind = u16_at(4).ok_or_else(|| bad("short header"))?;
    if len > answer.len() || len < NLMSG_HDR {
        return Err(bad("length out of range"));
    }
    if kind == NLMSG_ERROR {
        let errno = -(u32_at(NLMSG_HDR).ok_or_else(|| bad("short error"))? as i32);
        return match errno {
            0 | libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad("unexpected message type"));
    }
    let mut at = NLMSG_HDR + INET_DIAG_MSG;
    while at + 4 <= len {
        let attr_len = usize::from(u16_at(at).ok_or_else(|| bad("short attribute"))?);
        let attr_type = u16_at(at + 2).ok_or_else(|| bad("short attribute"))?;
        if attr_len < 4 || at + attr_len > len {
            return Err(bad("attribute length out of range"));
        }
        if attr_type == INET_DIAG_SKMEMINFO {
            return u32_at(at + 4)
                .map(Some)
                .ok_or_else(|| bad("short memory counters"));
        }
        at += attr_len.div_ceil(4) * 4;
    }
    Err(bad("no memory counters"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Unread bytes of a real socket are what the kernel says, and go once
    /// read; a socket that does not exist is `None`; garbage is an error,
    /// not a panic.
    #[test]
    fn reads_the_unread_bytes_of_a_socket() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(&[7u8; 5000]).unwrap();
        let nl = open().unwrap();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let mut seen = None;
        for _ in 0..100 {
            seen = receive_memory(nl.as_fd(), local, peer).unwrap();
            if seen.is_some_and(|r| r >= 5000) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(seen.is_some_and(|r| r >= 5000), "receive memory {seen:?}");
        let mut client = client;
        client.read_exact(&mut [0u8; 5000]).unwrap();
        let after = receive_memory(nl.as_fd(), local, peer).unwrap();
        assert_eq!(after, Some(0), "read, nothing is left");
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(receive_memory(nl.as_fd(), gone, peer).unwrap(), None);
        assert!(parse(&[1, 2, 3]).is_err());
        assert!(parse(&[0u8; 40]).is_err());
    }
}
