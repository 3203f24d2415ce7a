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
//! How: the agent's dialling thread ([`connect`]) enters the pod's
//! namespace with `setns`, creates the socket, starts its connect and
//! returns to the namespace it was in; the socket keeps the
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
use std::sync::{Arc, OnceLock};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

/// A TCP connection to `addr` made in `from`, the source pod's namespace,
/// or in the node's when `None` (`outbound.dial_from = "node"`, or no pod).
///
/// The socket is made and its connect started on the dialling thread (see
/// [`dialer`]); this task then waits for the handshake like any other.
pub async fn connect(from: Option<&PodNetns>, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match dialer() {
        Some(dial) => {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let gone = || io::Error::other("the agent's dialling thread has stopped");
            dial.send(Dial {
                from: from.cloned(),
                addr,
                reply,
            })
            .map_err(|_| gone())?;
            answer.await.map_err(|_| gone())??
        }
        None => start_connect(from, addr)?,
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // Writable once the handshake is done or has failed; a failure is
    // the socket's pending error (refused, unreachable, timed out).
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    Ok(stream)
}

/// A non-blocking socket for `addr`, made in `from`'s namespace, whose
/// connect has been started (the SYN is out).
fn start_connect(from: Option<&PodNetns>, addr: SocketAddr) -> io::Result<Socket> {
    let socket = match from {
        Some(ns) => ns.tcp_socket(addr)?,
        None => Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?,
    };
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

/// One connect for the dialling thread.
struct Dial {
    from: Option<PodNetns>,
    addr: SocketAddr,
    reply: tokio::sync::oneshot::Sender<io::Result<Socket>>,
}

/// The thread that makes upstream sockets and starts their connects.
///
/// Why a thread of its own: starting a connect is the most expensive
/// thing the agent does for a new connection. On these veth paths the SYN
/// is delivered, and the peer's SYN-ACK processed, inside the `connect`
/// call (a quarter of the agent's CPU while a pod opens a thousand
/// connections a second), and making the socket in a pod's namespace adds
/// two `setns`. Done on a data-path worker, that work delays every other
/// pod's requests queued on the same worker; on a thread of its own the
/// kernel's scheduler interleaves it with the workers instead. A
/// connection pays one hand-over each way (a channel and a wake).
/// `None`: the thread could not be started; connects start inline.
fn dialer() -> Option<&'static std::sync::mpsc::Sender<Dial>> {
    static DIALER: OnceLock<Option<std::sync::mpsc::Sender<Dial>>> = OnceLock::new();
    DIALER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Dial>();
            std::thread::Builder::new()
                .name("waymark-dial".into())
                // It only makes sockets: the default 2 MiB stack would be
                // reserved for nothing.
                .stack_size(128 * 1024)
                .spawn(move || {
                    for d in rx {
                        // A caller that gave up (a timeout) drops the socket.
                        let _ = d.reply.send(start_connect(d.from.as_ref(), d.addr));
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
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

    /// A `NETLINK_SOCK_DIAG` socket in this namespace (see
    /// [`crate::transport::sock_diag`]).
    pub fn sock_diag(&self) -> io::Result<OwnedFd> {
        self.run_in(crate::transport::sock_diag::open)
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

    #[tokio::test]
    async fn the_dialling_thread_connects_and_reports_refusals() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(None, addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
        assert_eq!(stream.peer_addr().unwrap(), addr);
        drop(listener);
        let err = connect(None, addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
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
