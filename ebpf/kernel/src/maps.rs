//! The maps shared with the agent. Names, key and value types must match
//! `agent/src/redirect`; the types come from `waymark-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, RingBuf, SockHash},
};
use waymark_common::{
    CONNECT_REFUSED_RING_BYTES, ConnectLimits, ExcludePorts, FlowKey, MAX_COUNTED_SOCKETS,
    MAX_ENROLLED_PODS, MAX_EXCLUDES, MAX_INBOUND_ALLOW, MAX_ORIGINAL_DST_BY_COOKIE,
    MAX_ORIGINAL_DST_BY_FLOW, MAX_SHORTCUT_SOCKETS, MAX_STRICT_PODS, PodSockets, RedirectSettings,
    RequestFlow, SockAddr,
};

/// The pods whose outbound TCP is redirected, by network-namespace cookie
/// (the value is unused). A socket in any other netns under the attached
/// cgroup (a hostNetwork pod, the agent's own pod, a pod not enrolled yet)
/// connects directly: attaching to a whole cgroup of pods must not send
/// everyone to a listener that exists only in enrolled pods.
#[map(name = "ENROLLED")]
pub static ENROLLED: HashMap<u64, u8> = HashMap::with_max_entries(MAX_ENROLLED_PODS, 0);

/// Pods under strict inbound, by network-namespace cookie; the value counts
/// the connection attempts refused there. Empty unless `inbound.mode =
/// "strict"`.
#[map(name = "STRICT_PODS")]
pub static STRICT_PODS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_STRICT_PODS, 0);

/// IPv4 sources a strict pod accepts new connections from (network byte
/// order, as the packet carries them).
#[map(name = "INBOUND_ALLOW_V4")]
pub static INBOUND_ALLOW_V4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_INBOUND_ALLOW, 0);

/// IPv6 sources a strict pod accepts new connections from.
#[map(name = "INBOUND_ALLOW_V6")]
pub static INBOUND_ALLOW_V6: LpmTrie<[u32; 4], u8> =
    LpmTrie::with_max_entries(MAX_INBOUND_ALLOW, 0);

/// Original destination of every redirected socket, by socket cookie.
/// Written at connect, read by sock_ops and getpeername, deleted at close.
/// Entries go when the socket is released (`release`), whether or not its
/// connect got as far as a SYN; LRU all the same, so the map can never
/// refuse a new connection's entry.
#[map(name = "ORIGINAL_DST_BY_COOKIE")]
pub static ORIGINAL_DST_BY_COOKIE: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(MAX_ORIGINAL_DST_BY_COOKIE, 0);

/// Original destination by the connection as the agent's accepted socket
/// sees it: the pod's netns cookie and the client's address. The agent
/// removes an entry when it accepts the connection; sock_ops removes it when
/// the connection dies before that (see `sock_ops::on_state_change`).
#[map(name = "ORIGINAL_DST_BY_FLOW")]
pub static ORIGINAL_DST_BY_FLOW: LruHashMap<FlowKey, SockAddr> =
    LruHashMap::with_max_entries(MAX_ORIGINAL_DST_BY_FLOW, 0);

/// The reply shortcut's targets: pods' redirected client sockets, by the
/// same key as [`ORIGINAL_DST_BY_FLOW`], put here by `sock_ops` when their
/// handshake completes. No program is attached to this map, so a pod's
/// socket only gains a queue that redirected replies land in; what it sends
/// takes the usual path. The kernel removes a socket when it is closed.
#[map(name = "SHORTCUT_CLIENTS")]
pub static SHORTCUT_CLIENTS: SockHash<FlowKey> =
    SockHash::with_max_entries(MAX_SHORTCUT_SOCKETS, 0);

/// "This connection's client socket is in [`SHORTCUT_CLIENTS`]": written
/// by `sock_ops` when the insert succeeded (deleted when it failed), taken
/// by the agent when it accepts, which only then puts its own socket in
/// [`SHORTCUT_AGENT`]. A socket map cannot be read from user space with
/// 4-byte values, and the agent must never shortcut towards a client that
/// is not there (its replies would be dropped).
#[map(name = "SHORTCUT_READY")]
pub static SHORTCUT_READY: LruHashMap<FlowKey, u8> =
    LruHashMap::with_max_entries(MAX_ORIGINAL_DST_BY_FLOW, 0);

/// The agent's accepted sockets whose replies take the shortcut, put here by
/// the agent (keyed like their client). `wm_reply_shortcut` is attached to
/// this map, so it runs on every `sendmsg` of these sockets.
#[map(name = "SHORTCUT_AGENT")]
pub static SHORTCUT_AGENT: SockHash<FlowKey> = SockHash::with_max_entries(MAX_SHORTCUT_SOCKETS, 0);

/// Reply bytes `wm_reply_shortcut` handed to a pod's socket, by the pod's
/// netns cookie (per CPU: a plain add). The replies are not packets, so the
/// kernel diagnostics' per-pod bytes in (`cgroup_skb`) do not see them;
/// the agent adds these to them. LRU: a netns cookie is never reused, and
/// a gone pod's entry can go (the agent keeps what it read).
#[map(name = "SHORTCUT_BYTES")]
pub static SHORTCUT_BYTES: LruPerCpuHashMap<u64, u64> =
    LruPerCpuHashMap::with_max_entries(MAX_ENROLLED_PODS, 0);

/// The request shortcut's state per redirected connection (see
/// `request.rs`), keyed like [`SHORTCUT_CLIENTS`]: filed by `sock_ops` at
/// the client's handshake, decided by `wm_request_shortcut` at its first
/// `sendmsg`, removed when the client socket closes. Not LRU: the program
/// writes the entry through a pointer, and an evicted entry's memory could
/// be another connection's by then; this way an entry goes only with its
/// socket (under the socket's lock). A full map files nothing: TCP.
#[map(name = "REQUEST_FLOWS")]
pub static REQUEST_FLOWS: HashMap<FlowKey, RequestFlow> =
    HashMap::with_max_entries(MAX_SHORTCUT_SOCKETS, 0);

/// Connections whose replies have left the reply shortcut for good (the
/// agent took them off: flow control, or a capture of the pod). Needed
/// because leaving [`SHORTCUT_AGENT`] does not take `wm_reply_shortcut`
/// off a socket that stays in another socket map ([`REQUEST_TARGETS`],
/// where it must stay until closed: a socket leaving its last map loses
/// the redirected bytes it has not read). Written by the agent, removed
/// when the client socket closes or a new connection takes the key. Not
/// LRU: a forgotten entry would put the replies back on the shortcut,
/// ahead of TCP bytes the application has not read.
#[map(name = "REPLIES_LEFT")]
pub static REPLIES_LEFT: HashMap<FlowKey, u8> = HashMap::with_max_entries(MAX_SHORTCUT_SOCKETS, 0);

/// The agent's accepted sockets that requests are redirected into, put
/// here by `wm_agent_sock_ops` when their handshake completes (before the
/// application's `connect()` returns, so before it can send). No program is
/// attached; the kernel removes a socket when it is closed.
#[map(name = "REQUEST_TARGETS")]
pub static REQUEST_TARGETS: SockHash<FlowKey> = SockHash::with_max_entries(MAX_SHORTCUT_SOCKETS, 0);

/// Request bytes the agent has read from its accepted socket, by flow,
/// written by the agent every 256 KiB it reads: what bounds how much a
/// pod can queue in the agent's socket (redirected bytes skip TCP's
/// window). LRU: a missing entry reads as nothing read, which only makes
/// the bound tighter.
#[map(name = "REQUEST_CONSUMED")]
pub static REQUEST_CONSUMED: LruHashMap<FlowKey, u64> =
    LruHashMap::with_max_entries(MAX_SHORTCUT_SOCKETS, 0);

/// Pods (by netns cookie) whose requests stay on packets: a packet capture
/// of the pod runs. Checked on every redirected `sendmsg`.
#[map(name = "REQUEST_HELD")]
pub static REQUEST_HELD: HashMap<u64, u8> = HashMap::with_max_entries(MAX_ENROLLED_PODS, 0);

/// Request bytes `wm_request_shortcut` handed to the agent's sockets, by
/// the pod's netns cookie (per CPU), for the kernel diagnostics' bytes out
/// (as [`SHORTCUT_BYTES`] for bytes in).
#[map(name = "SHORTCUT_BYTES_OUT")]
pub static SHORTCUT_BYTES_OUT: LruPerCpuHashMap<u64, u64> =
    LruPerCpuHashMap::with_max_entries(MAX_ENROLLED_PODS, 0);

/// IPv4 destinations that are never redirected; the key data is the address
/// in network byte order, as `user_ip4` holds it.
#[map(name = "EXCLUDE_V4")]
pub static EXCLUDE_V4: LpmTrie<u32, ExcludePorts> = LpmTrie::with_max_entries(MAX_EXCLUDES, 0);

/// IPv6 destinations that are never redirected (network byte order words).
#[map(name = "EXCLUDE_V6")]
pub static EXCLUDE_V6: LpmTrie<[u32; 4], ExcludePorts> = LpmTrie::with_max_entries(MAX_EXCLUDES, 0);

/// One slot: the outbound listener port. The agent writes it before it
/// attaches; a zero port means "not configured" and disables redirection.
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<RedirectSettings> = Array::with_max_entries(1, 0);

/// One slot: the connection limits the connect hooks enforce (see
/// `limits.rs`). All zero (no limit) until the agent writes it.
#[map(name = "CONNECT_LIMITS")]
pub static CONNECT_LIMITS: Array<ConnectLimits> = Array::with_max_entries(1, 0);

/// Each enrolled pod's redirected sockets, by netns cookie: made by the
/// connect hook at the pod's first counted socket, removed by the agent
/// when the pod leaves. Not LRU: an entry evicted and made again would
/// forget sockets still open.
#[map(name = "POD_SOCKETS")]
pub static POD_SOCKETS: HashMap<u64, PodSockets> = HashMap::with_max_entries(MAX_ENROLLED_PODS, 0);

/// One slot: the redirected sockets of all pods, against
/// [`ConnectLimits::total`].
#[map(name = "OPEN_SOCKETS")]
pub static OPEN_SOCKETS: Array<i64> = Array::with_max_entries(1, 0);

/// The sockets counted in [`POD_SOCKETS`], by socket cookie, with their
/// pod's netns cookie: what the release hook takes back, exactly once. A
/// socket enters when its `connect()` is redirected and leaves when it is
/// released, so the map holds only open sockets.
#[map(name = "COUNTED_SOCKETS")]
pub static COUNTED_SOCKETS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_COUNTED_SOCKETS, 0);

/// `connect()`s refused at a limit, for tap and the log (the agent drains
/// it on a timer: the programs never wake it, so a pod hammering its limit
/// costs no wake-up per refusal).
#[map(name = "CONNECT_REFUSED")]
pub static CONNECT_REFUSED: RingBuf = RingBuf::with_byte_size(CONNECT_REFUSED_RING_BYTES, 0);

/// A copy of the recorded original destination of the socket with this
/// cookie. Copied out at once: an LRU entry can be evicted and its memory
/// reused while a program still holds a pointer into it.
pub fn original_dst(cookie: u64) -> Option<SockAddr> {
    let ptr = ORIGINAL_DST_BY_COOKIE.get_ptr(cookie)?;
    // SAFETY: the pointer comes from a successful lookup and the value is
    // plain data; at worst a concurrent update makes us read a newer value.
    Some(unsafe { core::ptr::read(ptr) })
}
