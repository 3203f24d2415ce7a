//! Binding the outbound listener inside a pod's network namespace.
//!
//! The redirect programs rewrite a pod's `connect()` to `127.0.0.1:PORT`
//! (`[::1]:PORT` for IPv6) — the pod's *own* loopback. So the agent, which
//! lives in the node's namespace, enters each pod's namespace on a
//! short-lived thread, binds there and leaves; a socket keeps the namespace
//! it was created in. This works with any CNI (nothing depends on pod
//! routing to the node), puts the pod→agent hop on loopback, and tells the
//! agent the source pod by which listener accepted.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog of each pod listener: a burst of connects from one pod
/// must not be refused while the agent is busy.
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    EnterNetns { path: PathBuf, source: nix::Error },
    #[error("cannot bind {addr} in network namespace {path}: {source}")]
    Bind {
        addr: SocketAddr,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot read the netns cookie of the listener in {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
    #[error("the thread binding in {path} panicked")]
    Thread { path: PathBuf },
}

/// The listeners of one pod with the namespace's cookie (the key the kernel
/// uses for the pod's connections).
pub struct PodSockets {
    pub listeners: Vec<std::net::TcpListener>,
    pub netns_cookie: u64,
    /// IPv6 could not be bound (no `::1` in the pod); IPv4 works.
    pub ipv6_unavailable: Option<io::Error>,
}

/// Binds `127.0.0.1:port` and `[::1]:port` inside the namespace at `netns`.
/// IPv4 is required; IPv6 is best effort (a pod with IPv6 disabled has no
/// `::1`, and then its IPv6 connects are not redirected to anything).
pub fn bind_in_netns(netns: &Path, port: u16) -> Result<PodSockets, ListenerError> {
    let path = netns.to_path_buf();
    let file = std::fs::File::open(netns).map_err(|source| ListenerError::OpenNetns {
        path: path.clone(),
        source,
    })?;
    let thread_path = path.clone();
    let handle = std::thread::Builder::new()
        .name("waymark-netns-bind".into())
        .spawn(move || -> Result<PodSockets, ListenerError> {
            // setns(CLONE_NEWNET) changes only this thread, which ends here.
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                ListenerError::EnterNetns {
                    path: thread_path.clone(),
                    source,
                }
            })?;
            migrate_on_close();
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let v4l = bind(v4).map_err(|source| ListenerError::Bind {
                addr: v4,
                path: thread_path.clone(),
                source,
            })?;
            let netns_cookie = crate::redirect::netns_cookie(v4l.as_fd()).map_err(|source| {
                ListenerError::Cookie {
                    path: thread_path.clone(),
                    source,
                }
            })?;
            let mut listeners = vec![v4l];
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            let ipv6_unavailable = match bind(v6) {
                Ok(l) => {
                    listeners.push(l);
                    None
                }
                Err(e) => Some(e),
            };
            Ok(PodSockets {
                listeners,
                netns_cookie,
                ipv6_unavailable,
            })
        })
        .map_err(|_| ListenerError::Thread { path: path.clone() })?;
    handle.join().map_err(|_| ListenerError::Thread { path })?
}

/// Sets `net.ipv4.tcp_migrate_req` in the calling thread's network
/// namespace: when a listener of a `SO_REUSEPORT` group closes, the kernel
/// moves the connections waiting in its accept queue (and its half-open
/// ones) to another listener of the group instead of resetting them
/// (Linux 5.14). That is what makes a handover lossless: the old agent
/// closes its listeners while pods keep connecting, and whatever the
/// kernel had already queued for it is accepted by the new agent. Best
/// effort: without it a handover may reset the few connections queued at
/// that instant.
pub fn migrate_on_close() {
    // /proc/sys/net resolves to the namespace of the thread that opens it.
    const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    if let Err(e) = std::fs::write(SYSCTL, "1") {
        tracing::warn!(sysctl = SYSCTL, error = %e, "cannot enable accept-queue migration; a handover may reset connections queued when the old agent closes its listeners");
    }
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // A restarting agent binds beside the old one before the old one closes.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Whether a socket listens on `127.0.0.1:port` and on `[::1]:port` inside
/// the network namespace at `netns`, as the kernel's socket table there
/// says (for `waymark check`: the pod's redirected connects land there).
pub fn listening_in_netns(netns: &Path, port: u16) -> io::Result<(bool, bool)> {
    let file = std::fs::File::open(netns)?;
    std::thread::Builder::new()
        .name("waymark-netns-check".into())
        .spawn(move || -> io::Result<(bool, bool)> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            // /proc/thread-self/net is this thread's namespace, not the
            // process's.
            let v4 = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
            let v6 = std::fs::read_to_string("/proc/thread-self/net/tcp6").unwrap_or_default();
            Ok((
                listens(&v4, Ipv4Addr::LOCALHOST.into(), port),
                listens(&v6, Ipv6Addr::LOCALHOST.into(), port),
            ))
        })?
        .join()
        .map_err(|_| io::Error::other("the netns check thread panicked"))?
}

/// Whether `/proc/net/tcp{,6}` text lists a LISTEN socket on `ip:port`.
/// Addresses are printed as 32-bit words in host byte order.
fn listens(table: &str, ip: std::net::IpAddr, port: u16) -> bool {
    const LISTEN: &str = "0A";
    let want: Vec<u8> = match ip {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let (Some(local), Some(_remote), Some(state)) = (f.nth(1), f.next(), f.next()) else {
            return false;
        };
        let Some((addr, p)) = local.split_once(':') else {
            return false;
        };
        let bytes: Option<Vec<u8>> = (0..addr.len() / 8)
            .map(|i| {
                u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16)
                    .ok()
                    .map(u32::to_ne_bytes)
            })
            .collect::<Option<Vec<_>>>()
            .map(|words| words.concat());
        state == LISTEN && u16::from_str_radix(p, 16) == Ok(port) && bytes == Some(want.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_the_kernel_table() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:3A98 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        if cfg!(target_endian = "little") {
            assert!(listens(v4, Ipv4Addr::LOCALHOST.into(), 15001));
            assert!(
                !listens(v4, Ipv4Addr::LOCALHOST.into(), 15000),
                "established, not listening"
            );
            let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 0\n";
            assert!(listens(v6, Ipv6Addr::LOCALHOST.into(), 15001));
            assert!(!listens(v6, Ipv6Addr::UNSPECIFIED.into(), 15001));
        }
    }

    #[test]
    fn a_listener_bound_here_is_seen() {
        // In this process's own namespace: bind on loopback, then look.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (v4, _) = match listening_in_netns(Path::new("/proc/self/ns/net"), port) {
            Ok(r) => r,
            // setns needs CAP_SYS_ADMIN, even into one's own namespace.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return,
            Err(e) => panic!("{e}"),
        };
        assert!(v4);
        drop(l);
        let (v4, _) = listening_in_netns(Path::new("/proc/self/ns/net"), port).unwrap();
        assert!(!v4);
    }
}
