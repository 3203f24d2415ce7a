//! A packet socket (`AF_PACKET`, `SOCK_RAW`, `ETH_P_ALL`, no interface
//! bound) in the calling thread's network namespace: it sees every
//! interface of that namespace, in both directions, with the kernel
//! running the capture's filter before anything is copied.
//!
//! The socket is created with protocol 0 (it receives nothing), gets its
//! filter, and only then is bound to `ETH_P_ALL`, so no unfiltered packet
//! slips in between. Each packet comes with the receiving interface's index
//! and ARPHRD type, the packet type (outgoing or not), a nanosecond kernel
//! timestamp (`SO_TIMESTAMPNS`) and its length before the snap length cut
//! (`PACKET_AUXDATA`).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::filter::KernelFilter;

/// Receive buffer asked of the kernel: room for bursts while the capture
/// thread is writing.
const RCVBUF: libc::c_int = 8 << 20;

/// One packet as received.
pub struct Packet<'a> {
    pub data: &'a [u8],
    /// Length on the wire (before the snap length).
    pub original_len: u32,
    pub ifindex: i32,
    pub hatype: u16,
    /// `PACKET_HOST`, `PACKET_OUTGOING`, ….
    pub pkttype: u8,
    /// Kernel timestamp since the Unix epoch.
    pub timestamp: Duration,
}

pub struct PacketSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl std::os::fd::AsFd for PacketSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl PacketSocket {
    /// Opens the socket in the current thread's network namespace.
    pub fn open(filter: &KernelFilter, snaplen: u32) -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned right after.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let prog = libc::sock_fprog {
            len: filter.program.len() as u16,
            filter: filter.program.as_ptr().cast_mut(),
        };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)?;
        setsockopt(
            &fd,
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            &1 as &libc::c_int,
        )?;
        setsockopt(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &1 as &libc::c_int,
        )?;
        // FORCE needs CAP_NET_ADMIN (the agent has it); else the capped size.
        if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &RCVBUF);
        }
        // SAFETY: zeroed sockaddr_ll is valid; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = 0; // every interface
        // SAFETY: `addr` is a sockaddr_ll of the size passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(PacketSocket {
            fd,
            buf: vec![0; snaplen.max(64) as usize],
        })
    }

    /// Waits up to `timeout` for a packet; true if one is ready.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(pfd.revents & libc::POLLIN != 0),
        }
    }

    /// The next packet, or `None` when none is queued.
    pub fn recv(&mut self) -> io::Result<Option<Packet<'_>>> {
        // SAFETY: all-zero is a valid value for these C structs.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; 32];
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 32]>();
        // SAFETY: every pointer in `msg` refers to a live buffer of the
        // length given; MSG_TRUNC makes the kernel return the full length.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let received = n as usize;
        let mut original_len = received as u32;
        let mut timestamp = None;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel
        // filled, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let h = &*c;
                if h.cmsg_level == libc::SOL_PACKET && h.cmsg_type == libc::PACKET_AUXDATA {
                    let aux: libc::tpacket_auxdata =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    original_len = aux.tp_len;
                } else if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    timestamp = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let timestamp = timestamp.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
        });
        let captured = received.min(self.buf.len());
        Ok(Some(Packet {
            data: &self.buf[..captured],
            original_len: original_len.max(captured as u32),
            ifindex: from.sll_ifindex,
            hatype: from.sll_hatype,
            pkttype: from.sll_pkttype,
            timestamp,
        }))
    }

    /// Packets the kernel dropped for this socket since the last call (its
    /// receive buffer was full).
    pub fn drops(&self) -> u64 {
        // SAFETY: all-zero tpacket_stats is valid; the kernel fills it.
        let mut stats: libc::tpacket_stats = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` is writable for `len` bytes.
        let ret = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut stats as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if ret < 0 {
            0
        } else {
            u64::from(stats.tp_drops)
        }
    }
}

/// The name of interface `ifindex` in the current thread's namespace.
pub fn interface_name(ifindex: i32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex as libc::c_uint, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}
