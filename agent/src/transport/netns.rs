//! Sockets created in a pod's network namespace, so the agent dials a pod's
//! upstream *as the pod* (ztunnel's in-pod mode).
//!
//! Why: a socket belongs to the network namespace it was created in. Dialled
//! from the node's namespace, a pod's connection would leave with the node's
//! address, and the agent would be a confused deputy: it would reach what the
//! node can reach and the pod cannot (a node-local service, the kubelet, the
//! cloud metadata address), and the node's firewall, the CNI and
//! NetworkPolicy egress rules would judge the node, not the pod. Created in
//! the pod's namespace, the connection has the pod's own address and routes,
//! and everything on the way sees the pod.
//!
//! How: the calling thread enters the pod's namespace with `setns`, creates
//! the socket and returns to the namespace it was in; the socket keeps the
//! pod's namespace for its whole life, whichever thread then uses it. No
//! `.await` happens in between, so the runtime's other tasks never run in the
//! pod's namespace. Two `setns` calls per new upstream connection are the
//! price (measured in the bench as connection setup cost).

use std::cell::OnceCell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `addr` made in `from`, the source pod's namespace,
/// or in the node's when `None` (`outbound.dial_from = "node"`, or no pod).
pub async fn connect(from: Option<&PodNetns>, addr: SocketAddr) -> io::Result<TcpStream> {
    match from {
        None => TcpStream::connect(addr).await,
        Some(ns) => {
            let socket = ns.tcp_socket(addr)?;
            TcpSocket::from_std_stream(socket.into())
                .connect(addr)
                .await
        }
    }
}

/// A pod's network namespace, held open by the agent: `cookie` is the
/// kernel's id of it (what the redirect maps and kernel counters key on).
/// Equal and hashed by the cookie, so it can be part of a pool key.
#[derive(Clone)]
pub struct PodNetns {
    cookie: u64,
    fd: Arc<OwnedFd>,
}

impl PodNetns {
    /// Opens the namespace at `path` (`/var/run/netns/…`, `/proc/PID/ns/net`).
    pub fn open(path: &Path, cookie: u64) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        Ok(Self::from_fd(OwnedFd::from(file), cookie))
    }

    /// Takes an open namespace file.
    pub fn from_fd(fd: OwnedFd, cookie: u64) -> Self {
        Self {
            cookie,
            fd: Arc::new(fd),
        }
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// A non-blocking TCP socket for `addr`'s family, created in this
    /// namespace.
    pub fn tcp_socket(&self, addr: SocketAddr) -> io::Result<Socket> {
        let domain = Domain::for_address(addr);
        self.run_in(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))
    }

    /// Runs `f` (which must not block) with the calling thread in this
    /// namespace, then puts the thread back where it was.
    fn run_in<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        HOME.with(|home| {
            let home = match home.get() {
                Some(h) => h,
                None => {
                    let h = std::fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from)?;
                    home.get_or_init(|| h)
                }
            };
            setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let result = f();
            if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
                // This thread would go on in a pod's namespace: every
                // socket it made later, for any pod, would be that pod's.
                // There is no safe way to continue.
                eprintln!(
                    "waymark: cannot return a thread to the node's network namespace ({e}); aborting rather than dial in the wrong one"
                );
                std::process::abort();
            }
            result
        })
    }
}

thread_local! {
    /// The namespace each thread had when it first made a pod's socket: the
    /// node's, since the agent's threads all start there.
    static HOME: OnceCell<OwnedFd> = const { OnceCell::new() };
}

impl PartialEq for PodNetns {
    fn eq(&self, other: &Self) -> bool {
        self.cookie == other.cookie
    }
}

impl Eq for PodNetns {}

impl Hash for PodNetns {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.cookie.hash(state);
    }
}

impl fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns:{}", self.cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The namespace cookie of a socket's namespace.
    fn cookie_of(s: &Socket) -> u64 {
        crate::redirect::netns_cookie(s.as_fd()).unwrap()
    }

    #[test]
    fn a_socket_made_in_a_namespace_stays_there_and_the_thread_comes_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: creating a network namespace needs root");
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        // A fresh namespace, made on a thread of its own and held open by
        // its file after the thread is gone.
        let file = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            std::fs::File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        let probe = std::thread::spawn({
            let fd = file.try_clone().unwrap();
            move || {
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
                cookie_of(&Socket::new(Domain::IPV4, Type::STREAM, None).unwrap())
            }
        });
        let pod_cookie = probe.join().unwrap();
        let node_cookie = cookie_of(&Socket::new(Domain::IPV4, Type::STREAM, None).unwrap());
        assert_ne!(pod_cookie, node_cookie);

        let ns = PodNetns::from_fd(OwnedFd::from(file), pod_cookie);
        let s = ns.tcp_socket("10.9.9.9:80".parse().unwrap()).unwrap();
        assert_eq!(cookie_of(&s), pod_cookie, "the socket is the pod's");
        assert!(s.nonblocking().unwrap());
        let after = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert_eq!(cookie_of(&after), node_cookie, "the thread came back");
        // The new namespace has no route anywhere: connecting fails there
        // (it would succeed or time out from the node's namespace).
        let err = s
            .connect(&"10.9.9.9:80".parse::<SocketAddr>().unwrap().into())
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
    }

    #[test]
    fn equal_and_hashed_by_cookie() {
        let a = PodNetns::open(Path::new("/proc/self/ns/net"), 7).unwrap();
        let b = PodNetns::open(Path::new("/proc/self/ns/net"), 7).unwrap();
        let c = PodNetns::open(Path::new("/proc/self/ns/net"), 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let set: std::collections::HashSet<_> = [a, b, c].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert_eq!(
            format!("{:?}", set.iter().find(|n| n.cookie() == 8).unwrap()),
            "netns:8"
        );
    }
}
