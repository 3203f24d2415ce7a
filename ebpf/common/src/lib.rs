//! Types shared by waymark's kernel programs and the agent.
//!
//! Every type here is `#[repr(C)]`, has no padding the verifier could
//! complain about, and is read by both sides from the same BPF maps, so a
//! change here is a change to the map layout.
#![no_std]

pub mod diag;

/// Port of the outbound listener the agent binds inside every pod's network
/// namespace (on `127.0.0.1` and `::1`). Redirected connections land there.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Address family tags stored in [`SockAddr::family`].
pub const FAMILY_V4: u16 = 2; // AF_INET
pub const FAMILY_V6: u16 = 10; // AF_INET6

/// An IPv4 or IPv6 socket address in the kernel's byte order conventions:
/// `addr` holds the address in network byte order (IPv4 in `addr[0]`), `port`
/// is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

/// Key of the map that joins the connection the agent accepted to the
/// destination the pod dialled: the client's own socket address as the agent
/// sees it (its peer) plus the network namespace it lives in. Every pod
/// connects from its own loopback, so the address alone is not unique across
/// pods; the netns cookie makes it so.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub client: SockAddr,
    /// Always zero. `client` is 20 bytes, so without this field the struct
    /// would end in 4 bytes of implicit padding; a hash map compares keys
    /// byte for byte, and padding the two sides fill differently would make
    /// equal keys miss.
    pub _pad: u32,
}

/// One configured exclusion: destinations under a CIDR (the key of an LPM
/// trie) are not redirected, on every port (`len == 0`) or only on the listed
/// ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExcludePorts {
    pub len: u32,
    pub ports: [u16; MAX_EXCLUDE_PORTS],
}

/// How many ports one exclusion entry can list.
pub const MAX_EXCLUDE_PORTS: usize = 16;

/// Redirection settings the agent writes into a one-slot array map before it
/// attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectSettings {
    /// Outbound listener port inside each pod (host byte order).
    pub outbound_port: u16,
    /// `SETTING_*` bits. Taken from what was padding, so the map's value
    /// keeps its size and a pinned map stays usable across versions.
    pub flags: u16,
    /// With [`SETTING_REQUEST_SHORTCUT`]: how many KiB the request
    /// shortcut may queue in the agent's socket beyond what the agent has
    /// said it read (`REQUEST_CONSUMED`); past it the connection's
    /// requests take TCP for good. Taken from what was padding, as `flags`.
    pub request_max_unread_kib: u32,
}

/// [`RedirectSettings::flags`]: the agent's replies to a pod's application
/// go socket to socket (sockmap) instead of through the pod's loopback.
pub const SETTING_REPLY_SHORTCUT: u16 = 1;

/// [`RedirectSettings::flags`]: a pod application's requests go socket to
/// socket into the agent's accepted socket too (needs
/// [`SETTING_REPLY_SHORTCUT`]: the program runs on the sockets that one
/// files).
pub const SETTING_REQUEST_SHORTCUT: u16 = 2;

/// One redirected connection's request path, decided by the kernel on the
/// application's first `sendmsg` and then only ever moved to TCP (bytes
/// redirected after TCP bytes would be read before them; TCP bytes after
/// redirected ones are read after them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestFlow {
    /// `REQUEST_*`.
    pub state: u32,
    /// 1 once the agent's accepted socket is in `REQUEST_TARGETS` (written
    /// by the agent-side `sock_ops` when the handshake completes there).
    pub target: u32,
    /// Bytes redirected so far.
    pub redirected: u64,
}

/// [`RequestFlow::state`]: filed at the handshake, no byte sent yet.
pub const REQUEST_PENDING: u32 = 0;
/// Requests go socket to socket.
pub const REQUEST_REDIRECT: u32 = 1;
/// Requests take TCP, for the rest of the connection.
pub const REQUEST_TCP: u32 = 2;

/// Pods' client sockets (and the agent's accepted sockets) in the reply
/// shortcut's socket maps: one per open redirected connection.
pub const MAX_SHORTCUT_SOCKETS: u32 = 65536;

/// Pods under strict inbound (`inbound.mode = "strict"`), by netns cookie.
pub const MAX_STRICT_PODS: u32 = 4096;
/// Pods whose outbound TCP the kernel redirects, by netns cookie (the
/// enrolled pods of one node).
pub const MAX_ENROLLED_PODS: u32 = 4096;
/// Source networks a strict pod accepts new TCP connections from (this
/// node's addresses and pods, loopback), per address family.
pub const MAX_INBOUND_ALLOW: u32 = 1024;

/// The connection limits the connect hooks enforce (`CONNECT_LIMITS`, one
/// slot, written by the agent): a pod whose redirected sockets number
/// `per_pod`, or a node whose pods' redirected sockets number `total`, has
/// its next `connect()` fail at once with `ECONNREFUSED`, before a SYN
/// leaves. 0: no limit. The agent's own bounds at accept stay in force
/// behind these (sockets of a pod that connect on two CPUs at once can
/// pass together).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectLimits {
    pub per_pod: u32,
    pub total: u32,
}

/// One pod's redirected sockets as the connect and release hooks count
/// them (`POD_SOCKETS`, by netns cookie). Written by the kernel only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSockets {
    /// Sockets redirected and not yet released, whatever their state (in
    /// the handshake, in the agent's accept queue, held). Signed: an entry
    /// made again while older sockets were still open counts their
    /// releases below zero, which only ever loosens the bound.
    pub open: i64,
    /// `connect()`s refused at [`ConnectLimits::per_pod`].
    pub refused_pod: u64,
    /// `connect()`s refused at [`ConnectLimits::total`].
    pub refused_total: u64,
}

/// A `connect()` the kernel refused at a limit, as the agent reads it from
/// the `CONNECT_REFUSED` ring (for tap and the log; the counts in
/// [`PodSockets`] are exact, the ring may drop).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub netns_cookie: u64,
    /// The destination the pod asked for.
    pub dst: SockAddr,
    /// [`REFUSED_PER_POD`] or [`REFUSED_TOTAL`].
    pub limit: u32,
    /// The process that called `connect()`: its id in the node's pid
    /// namespace (what `ps` on the node shows), 0 where the kernel does not
    /// tell cgroup programs (before 6.1).
    pub pid: u32,
    /// The name of the calling thread (`comm`, as `ps -L` shows it),
    /// NUL-padded; all zero where `pid` is 0.
    pub comm: [u8; 16],
    pub _pad: u32,
}

/// [`ConnectRefusal::limit`]: the pod's own bound.
pub const REFUSED_PER_POD: u32 = 1;
/// [`ConnectRefusal::limit`]: the node-wide bound.
pub const REFUSED_TOTAL: u32 = 2;

/// Redirected sockets the connect hooks count at once, node-wide (one
/// entry each in `COUNTED_SOCKETS`); past it a socket is not counted and
/// only the agent's own bounds apply to it.
pub const MAX_COUNTED_SOCKETS: u32 = 65536;

/// Bytes of the `CONNECT_REFUSED` ring.
pub const CONNECT_REFUSED_RING_BYTES: u32 = 64 * 1024;

/// Upper bounds of the maps; both sides need them (the agent reports
/// occupancy against them).
pub const MAX_ORIGINAL_DST_BY_COOKIE: u32 = 65536;
pub const MAX_ORIGINAL_DST_BY_FLOW: u32 = 65536;
pub const MAX_EXCLUDES: u32 = 256;

// The map layouts, pinned down: a field added without thinking about
// padding fails the build here instead of failing lookups at run time.
const _: () = {
    assert!(core::mem::size_of::<SockAddr>() == 20);
    assert!(core::mem::size_of::<FlowKey>() == 32);
    assert!(core::mem::size_of::<ExcludePorts>() == 4 + 2 * MAX_EXCLUDE_PORTS);
    assert!(core::mem::size_of::<RedirectSettings>() == 8);
    assert!(core::mem::size_of::<RequestFlow>() == 16);
    assert!(core::mem::size_of::<ConnectLimits>() == 8);
    assert!(core::mem::size_of::<PodSockets>() == 24);
    assert!(core::mem::size_of::<ConnectRefusal>() == 56);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, `Copy`, and valid for any bit pattern.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::ExcludePorts {}
    unsafe impl aya::Pod for super::RedirectSettings {}
    unsafe impl aya::Pod for super::RequestFlow {}
    unsafe impl aya::Pod for super::ConnectLimits {}
    unsafe impl aya::Pod for super::PodSockets {}
    unsafe impl aya::Pod for super::ConnectRefusal {}
}
