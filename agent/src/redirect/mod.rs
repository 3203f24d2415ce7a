//! Kernel-side redirection of pods' outbound TCP to the agent.
//!
//! The eBPF programs (crate `waymark-ebpf`, embedded at build time) attach to
//! the cgroup v2 directory that holds the node's pods:
//!
//! 1. `connect4`/`connect6` rewrite an enrolled pod's TCP `connect()` (the
//!    pod's netns cookie is in the `ENROLLED` map, see [`Redirect::enroll`];
//!    every other netns under the cgroup is left alone) to the agent's
//!    listener bound *inside the pod's netns* on `127.0.0.1:PORT` /
//!    `[::1]:PORT` and record the destination the pod asked for, keyed by
//!    socket cookie. Loopback (`127.0.0.0/8`, `::1`, v4-mapped loopback),
//!    unspecified (`0.0.0.0`, `::`, which `connect()` treats as this host)
//!    and excluded destinations, and UDP, are left alone; any internal error
//!    leaves the connection unredirected.
//! 2. `sock_ops` copies that record, once the handshake completes, to a map
//!    keyed by what the agent can see on the socket it accepted: the netns
//!    cookie ([`netns_cookie`] of its listener) and the client address.
//!    [`Redirect::take_original_dst`] reads and removes it. When the client
//!    socket closes, its cookie entry goes; its flow entry goes too unless
//!    the client closed gracefully, since the connection may then still
//!    wait in the agent's accept queue (see `ebpf/kernel/src/sock_ops.rs`).
//! 3. `getpeername4`/`getpeername6` make the application see the address it
//!    dialled.
//! 4. `sock_release` deletes a socket's cookie entry when the socket is
//!    released, so a `connect()` that failed before its SYN left (which
//!    `sock_ops` never hears of) leaves nothing behind.
//!
//! The agent's own sockets are never redirected: cgroup hooks act on the
//! cgroup of the process that created the socket, and the agent is not in
//! the pods' cgroup.
//!
//! Lifetime: loaded with [`Pins`] ([`Redirect::load_pinned`]), the maps
//! and links live in bpffs and outlive the agent (see [`pin`]): with
//! `redirect.on_agent_down = "closed"` the links stay pinned, so while no
//! agent runs, pods' connections are still redirected to the loopback port
//! where nothing listens and are refused at once; with `"open"` the pins of
//! the links are removed right after attaching, so the programs detach when
//! the agent exits and pods' connections go direct. Without pins (the
//! module's own tests) everything is the process's and goes with it. A pod
//! is enrolled only once its listener is bound, so an enrolled pod's
//! connects never wait on a listener that is not there while an agent runs.

mod error;
pub mod kernel_version;
mod maps;
pub mod pin;
pub mod query;
#[cfg(test)]
mod tests;

use std::{
    fs::File,
    io,
    mem::size_of,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::RwLock,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, LpmTrie, MapData, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program,
        SockOps, cgroup_skb::CgroupSkbLinkId, cgroup_sock::CgroupSockLinkId,
        cgroup_sock_addr::CgroupSockAddrLinkId, links::FdLink, sock_ops::SockOpsLinkId,
    },
};
use waymark_common::{
    ConnectLimits, ExcludePorts, FlowKey, MAX_ORIGINAL_DST_BY_COOKIE, MAX_ORIGINAL_DST_BY_FLOW,
    PodSockets, RedirectSettings, SockAddr,
};

pub use error::RedirectError;
pub use pin::Pins;

/// The object `agent/build.rs` built from `ebpf/kernel` (empty when built
/// with `WAYMARK_EBPF_STUB=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/waymark"));

const SOCK_OPS: &str = "wm_sock_ops";
/// `cgroup_skb` ingress: strict inbound (refuses nothing unless pods are
/// put under it with [`Redirect::set_strict`]).
const INBOUND: &str = "wm_inbound";
/// `cgroup/sock_release`: cleanup of the cookie map (in
/// `query::EXPECTED`, so `waymark check` says when it is gone).
const SOCK_RELEASE: &str = "wm_sock_release";
/// `sk_msg` on the agent's accepted sockets: the reply shortcut.
const REPLY_SHORTCUT: &str = "wm_reply_shortcut";
/// `sk_msg` on pods' redirected sockets: the request shortcut.
const REQUEST_SHORTCUT: &str = "wm_request_shortcut";
/// `sock_ops` on the agent's own cgroup: files its accepted sockets as the
/// request shortcut's targets.
const AGENT_SOCK_OPS: &str = "wm_agent_sock_ops";
const PEERNAME4: &str = "wm_peername4";
const PEERNAME6: &str = "wm_peername6";
const CONNECT4: &str = "wm_connect4";
const CONNECT6: &str = "wm_connect6";
/// Attach order. The connect hooks come last so that no connection is
/// redirected before the programs that make it recoverable (sock_ops) and
/// transparent (getpeername) are in place; detaching runs in reverse.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [PEERNAME4, PEERNAME6, CONNECT4, CONNECT6];

const MAP_BY_COOKIE: &str = "ORIGINAL_DST_BY_COOKIE";
const MAP_BY_FLOW: &str = "ORIGINAL_DST_BY_FLOW";
const MAP_EXCLUDE_V4: &str = "EXCLUDE_V4";
const MAP_EXCLUDE_V6: &str = "EXCLUDE_V6";
const MAP_SETTINGS: &str = "SETTINGS";
const MAP_STRICT_PODS: &str = "STRICT_PODS";
const MAP_ENROLLED: &str = "ENROLLED";
const MAP_ALLOW_V4: &str = "INBOUND_ALLOW_V4";
const MAP_ALLOW_V6: &str = "INBOUND_ALLOW_V6";
const MAP_SHORTCUT_READY: &str = "SHORTCUT_READY";
const MAP_SHORTCUT_AGENT: &str = "SHORTCUT_AGENT";
const MAP_SHORTCUT_BYTES: &str = "SHORTCUT_BYTES";
const MAP_SHORTCUT_CLIENTS: &str = "SHORTCUT_CLIENTS";
const MAP_REPLIES_LEFT: &str = "REPLIES_LEFT";
const MAP_SHORTCUT_BYTES_OUT: &str = "SHORTCUT_BYTES_OUT";
const MAP_REQUEST_CONSUMED: &str = "REQUEST_CONSUMED";
const MAP_REQUEST_HELD: &str = "REQUEST_HELD";
const MAP_CONNECT_LIMITS: &str = "CONNECT_LIMITS";
const MAP_POD_SOCKETS: &str = "POD_SOCKETS";
const MAP_CONNECT_REFUSED: &str = "CONNECT_REFUSED";

/// A destination the kernel never redirects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclude {
    /// Destination network. Host bits are ignored; a v4-mapped IPv6 network
    /// (`::ffff:a.b.c.d/n`, n >= 96) is the IPv4 network it denotes.
    pub net: ipnet::IpNet,
    /// Destination ports excluded under `net`; empty means all ports. At
    /// most [`waymark_common::MAX_EXCLUDE_PORTS`] per network (entries for
    /// the same network are merged first).
    pub ports: Vec<u16>,
}

/// How many entries the two original-destination maps hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapOccupancy {
    /// Redirected sockets not yet closed (bounded by
    /// [`MAX_ORIGINAL_DST_BY_COOKIE`]).
    pub by_cookie: usize,
    /// Established redirected connections the agent has not taken yet
    /// (bounded by [`MAX_ORIGINAL_DST_BY_FLOW`]).
    pub by_flow: usize,
}

/// A `connect()` the kernel refused at a connection limit (see
/// [`Redirect::set_connect_limits`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRefused {
    pub netns_cookie: u64,
    /// Where the pod meant to go.
    pub dst: SocketAddr,
    /// `pod_connections` or `agent_connections`, as the agent's own
    /// refusals are labelled.
    pub limit: &'static str,
    /// Who called `connect()`, where the kernel tells (Linux 6.1 and later).
    pub process: Option<Caller>,
}

/// The process behind a refused `connect()`, as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// In the node's pid namespace.
    pub pid: u32,
    /// The calling thread's name (`comm`).
    pub thread: String,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}, thread {}", self.pid, self.thread)
    }
}

/// What the kernel helpers the programs may call depend on.
#[derive(Debug, Clone, Copy)]
struct Helpers {
    /// The connect hooks choose the error of a refused `connect()`
    /// (`ECONNREFUSED`; otherwise the kernel's `EPERM`).
    set_retval: bool,
    /// The connect hooks report the calling process of a refusal.
    process_info: bool,
}

/// Takes every refusal waiting in the ring from
/// [`Redirect::take_refusals`], oldest first.
pub fn drain_refusals(
    ring: &mut aya::maps::RingBuf<MapData>,
    mut each: impl FnMut(ConnectRefused),
) {
    while let Some(item) = ring.next() {
        if item.len() < size_of::<waymark_common::ConnectRefusal>() {
            continue;
        }
        // SAFETY: the kernel wrote a `ConnectRefusal` (length checked);
        // read unaligned, the ring only promises 8-byte alignment.
        let r = unsafe {
            std::ptr::read_unaligned(item.as_ptr().cast::<waymark_common::ConnectRefusal>())
        };
        let Some(dst) = maps::socket_addr(&r.dst) else {
            continue;
        };
        let limit = match r.limit {
            waymark_common::REFUSED_TOTAL => "agent_connections",
            _ => "pod_connections",
        };
        let process = (r.pid != 0).then(|| {
            let name = r.comm.split(|b| *b == 0).next().unwrap_or_default();
            Caller {
                pid: r.pid,
                thread: String::from_utf8_lossy(name).into_owned(),
            }
        });
        each(ConnectRefused {
            netns_cookie: r.netns_cookie,
            dst,
            limit,
            process,
        });
    }
}

/// The loaded redirect programs and their maps. Dropping it detaches and
/// unloads everything, except what is pinned: links kept pinned
/// (`on_agent_down = "closed"`) stay attached and pinned maps keep their
/// entries for the next agent.
pub struct Redirect {
    ebpf: Ebpf,
    by_cookie: HashMap<MapData, u64, SockAddr>,
    by_flow: HashMap<MapData, FlowKey, SockAddr>,
    /// With the reply shortcut on ([`Redirect::enable_reply_shortcut`]):
    /// the markers `sock_ops` leaves, and the map the agent's accepted
    /// sockets go into.
    shortcut: Option<ShortcutMaps>,
    attached: Option<Attachment>,
    /// Where the maps and links are pinned, and whether the links stay
    /// pinned when the agent exits (`on_agent_down = "closed"`).
    pins: Option<(Pins, bool)>,
}

struct ShortcutMaps {
    ready: MapData,
    agent: MapData,
    /// Connections taken off for good (`REPLIES_LEFT`).
    left: MapData,
    /// Reply bytes redirected, per pod netns cookie and CPU.
    bytes: PerCpuHashMap<MapData, u64, u64>,
    /// Pods (by netns cookie) whose replies stay on packets for now, with
    /// how many holds each has ([`Redirect::hold_replies_on_packets`]).
    /// Read-locked across an accept's check and insert, so a hold never
    /// misses a connection being put on the shortcut.
    held: RwLock<std::collections::BTreeMap<u64, usize>>,
    /// Keeps `wm_reply_shortcut` attached to the agent map while held.
    _link: aya::programs::sk_msg::SkMsgLinkId,
    /// `wm_agent_sock_ops` attached to the agent's own cgroup, which bounds
    /// the delayed-ACK timer of its accepted sockets
    /// ([`Redirect::acks_bounded`]); `None`: it could not be attached.
    agent_sock_ops: Option<SockOpsLinkId>,
    /// With the request shortcut on as well.
    requests: Option<RequestMaps>,
}

impl ShortcutMaps {
    /// Takes one connection's replies off the shortcut for good: filed in
    /// `REPLIES_LEFT` first (the program checks it on every reply; leaving
    /// the agent map alone does not remove the program from a socket that
    /// is also a request target), then out of the agent map. `Ok(false)`:
    /// it was not in the agent map (any more).
    fn take_off(&self, key: &FlowKey) -> Result<bool, RedirectError> {
        maps::update(&self.left, key, &1u8).map_err(|source| RedirectError::MapSyscall {
            name: MAP_REPLIES_LEFT,
            op: "insert",
            source,
        })?;
        maps::delete(&self.agent, key).map_err(|source| RedirectError::MapSyscall {
            name: MAP_SHORTCUT_AGENT,
            op: "delete",
            source,
        })
    }
}

/// The request shortcut's side of the maps (see
/// `ebpf/kernel/src/request.rs`).
struct RequestMaps {
    /// What the agent has read, per connection, as the kernel's bound.
    consumed: MapData,
    /// Pods whose requests stay on packets (a capture runs).
    held: MapData,
    /// Request bytes redirected, per pod netns cookie and CPU.
    bytes: PerCpuHashMap<MapData, u64, u64>,
    /// Keep `wm_request_shortcut` attached to the clients' map and
    /// `wm_agent_sock_ops` to the agent's cgroup while held (`None`: the
    /// reply shortcut had attached it already).
    _sk_msg: aya::programs::sk_msg::SkMsgLinkId,
    _sock_ops: Option<SockOpsLinkId>,
}

struct Attachment {
    cgroup: PathBuf,
    sock_ops: Option<SockOpsLinkId>,
    inbound: Option<CgroupSkbLinkId>,
    release: Option<CgroupSockLinkId>,
    /// In attach order.
    sock_addr: Vec<(&'static str, CgroupSockAddrLinkId)>,
    /// With pins: the links by program, in attach order. Closing one
    /// detaches its program only if no pin holds it.
    links: Vec<(&'static str, OwnedFd)>,
}

impl Redirect {
    /// Loads all programs (verifier runs here) and writes settings +
    /// exclusions into maps. Does not attach.
    ///
    /// `outbound_port` is the port of the listener the agent binds in every
    /// pod on `127.0.0.1` and `::1`.
    pub fn load(outbound_port: u16, excludes: &[Exclude]) -> Result<Self, RedirectError> {
        Self::load_with(outbound_port, excludes, None)
    }

    /// [`Redirect::load`] as on a 5.15 kernel, without `bpf_set_retval`
    /// and the current-process helpers for cgroup programs: refusals at a
    /// connection limit fail with `EPERM` and name no process.
    #[cfg(test)]
    fn load_without_set_retval(outbound_port: u16) -> Result<Self, RedirectError> {
        let helpers = Helpers {
            set_retval: false,
            process_info: false,
        };
        Self::load_as(outbound_port, &[], None, helpers)
    }

    /// [`Redirect::load`] against the maps pinned in `pins` (created and
    /// pinned when missing), so their entries are shared with any other
    /// agent using them and survive this one. `keep_links`: the links
    /// [`Redirect::attach`] makes (or adopts) stay pinned after this
    /// process exits (`on_agent_down = "closed"`).
    pub fn load_pinned(
        outbound_port: u16,
        excludes: &[Exclude],
        pins: Pins,
        keep_links: bool,
    ) -> Result<Self, RedirectError> {
        Self::load_with(outbound_port, excludes, Some((pins, keep_links)))
    }

    fn load_with(
        outbound_port: u16,
        excludes: &[Exclude],
        pins: Option<(Pins, bool)>,
    ) -> Result<Self, RedirectError> {
        let helpers = Helpers {
            set_retval: kernel_version::at_least(kernel_version::SET_RETVAL_SINCE),
            process_info: kernel_version::at_least(kernel_version::PROCESS_INFO_SINCE),
        };
        Self::load_as(outbound_port, excludes, pins, helpers)
    }

    /// `helpers`: what the running kernel lets the programs call.
    fn load_as(
        outbound_port: u16,
        excludes: &[Exclude],
        pins: Option<(Pins, bool)>,
        helpers: Helpers,
    ) -> Result<Self, RedirectError> {
        if OBJECT.is_empty() {
            return Err(RedirectError::StubObject);
        }
        if outbound_port == 0 {
            return Err(RedirectError::InvalidOutboundPort);
        }
        // Validate the configuration before touching the kernel.
        let tables = maps::exclude_tables(excludes)?;

        let map_paths = match &pins {
            Some((p, _)) => p.map_paths(OBJECT)?,
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        let set_retval = u8::from(helpers.set_retval);
        loader.override_global("SET_RETVAL", &set_retval, true);
        let process_info = u8::from(helpers.process_info);
        loader.override_global("PROCESS_INFO", &process_info, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| RedirectError::Load(Box::new(e)))?;
        for name in SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(program_error(name))?;
        }
        sock_ops_program(&mut ebpf, SOCK_OPS)?
            .load()
            .map_err(program_error(SOCK_OPS))?;
        inbound_program(&mut ebpf)?
            .load()
            .map_err(program_error(INBOUND))?;
        release_program(&mut ebpf)?
            .load()
            .map_err(program_error(SOCK_RELEASE))?;

        let settings = RedirectSettings {
            outbound_port,
            ..Default::default()
        };
        Array::<_, RedirectSettings>::try_from(map_mut(&mut ebpf, MAP_SETTINGS)?)
            .and_then(|mut array| array.set(0, settings, 0))
            .map_err(map_error(MAP_SETTINGS, "write"))?;
        let mut v4 = LpmTrie::<_, u32, ExcludePorts>::try_from(map_mut(&mut ebpf, MAP_EXCLUDE_V4)?)
            .map_err(map_error(MAP_EXCLUDE_V4, "open"))?;
        for (key, ports) in &tables.v4 {
            v4.insert(key, ports, 0)
                .map_err(map_error(MAP_EXCLUDE_V4, "insert"))?;
        }
        // Adopted maps may hold an earlier configuration's exclusions.
        let stale: Vec<_> = v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !tables.v4.iter().any(|(t, _)| same_key(t, k)))
            .collect();
        for key in &stale {
            v4.remove(key)
                .map_err(map_error(MAP_EXCLUDE_V4, "remove"))?;
        }
        let mut v6 =
            LpmTrie::<_, [u32; 4], ExcludePorts>::try_from(map_mut(&mut ebpf, MAP_EXCLUDE_V6)?)
                .map_err(map_error(MAP_EXCLUDE_V6, "open"))?;
        for (key, ports) in &tables.v6 {
            v6.insert(key, ports, 0)
                .map_err(map_error(MAP_EXCLUDE_V6, "insert"))?;
        }
        let stale: Vec<_> = v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !tables.v6.iter().any(|(t, _)| same_key(t, k)))
            .collect();
        for key in &stale {
            v6.remove(key)
                .map_err(map_error(MAP_EXCLUDE_V6, "remove"))?;
        }

        let by_cookie = HashMap::try_from(take_map(&mut ebpf, MAP_BY_COOKIE)?)
            .map_err(map_error(MAP_BY_COOKIE, "open"))?;
        let by_flow = HashMap::try_from(take_map(&mut ebpf, MAP_BY_FLOW)?)
            .map_err(map_error(MAP_BY_FLOW, "open"))?;
        tracing::debug!(
            outbound_port,
            excludes_v4 = tables.v4.len(),
            excludes_v6 = tables.v6.len(),
            pinned_maps = map_paths.len(),
            "redirect programs loaded"
        );
        Ok(Self {
            ebpf,
            by_cookie,
            by_flow,
            shortcut: None,
            attached: None,
            pins,
        })
    }

    /// Turns the reply shortcut on (see `ebpf/kernel/src/shortcut.rs`): the
    /// agent's replies to a pod's application go from socket to socket
    /// instead of through the pod's loopback TCP. From now on `sock_ops`
    /// files new redirected client sockets for it, and
    /// [`Redirect::shortcut_replies`] puts an accepted socket on it. Call
    /// before [`Redirect::attach`] so that every connection has the choice.
    ///
    /// `agent_cgroup`: the cgroup v2 directory of this process, where
    /// `wm_agent_sock_ops` is attached to bound the delayed ACKs of the
    /// agent's accepted sockets (`ebpf/kernel/src/shortcut.rs`,
    /// `bound_delayed_acks`). Without it (`None`, or the attach refused)
    /// the shortcut still runs, and [`Redirect::acks_bounded`] says false.
    pub fn enable_reply_shortcut(
        &mut self,
        agent_cgroup: Option<&Path>,
    ) -> Result<(), RedirectError> {
        if self.shortcut.is_some() {
            return Ok(());
        }
        sk_msg_program(&mut self.ebpf, REPLY_SHORTCUT)?
            .load()
            .map_err(program_error(REPLY_SHORTCUT))?;
        let agent = take_map(&mut self.ebpf, MAP_SHORTCUT_AGENT)?;
        let map_fd = aya::maps::SockHash::<_, FlowKey>::try_from(&agent)
            .map_err(map_error(MAP_SHORTCUT_AGENT, "open"))?
            .fd()
            .try_clone()
            .map_err(|source| RedirectError::MapSyscall {
                name: MAP_SHORTCUT_AGENT,
                op: "dup",
                source,
            })?;
        let link = sk_msg_program(&mut self.ebpf, REPLY_SHORTCUT)?
            .attach(&map_fd)
            .map_err(program_error(REPLY_SHORTCUT))?;
        let aya::maps::Map::SockHash(agent) = agent else {
            return Err(RedirectError::Missing {
                kind: "socket hash map",
                name: MAP_SHORTCUT_AGENT,
            });
        };
        let aya::maps::Map::LruHashMap(ready) = take_map(&mut self.ebpf, MAP_SHORTCUT_READY)?
        else {
            return Err(RedirectError::Missing {
                kind: "LRU hash map",
                name: MAP_SHORTCUT_READY,
            });
        };
        let bytes = PerCpuHashMap::try_from(take_map(&mut self.ebpf, MAP_SHORTCUT_BYTES)?)
            .map_err(map_error(MAP_SHORTCUT_BYTES, "open"))?;
        let left = map_data(&mut self.ebpf, MAP_REPLIES_LEFT)?;
        update_settings(&mut self.ebpf, |current| {
            current.flags |= waymark_common::SETTING_REPLY_SHORTCUT;
        })?;
        let agent_sock_ops = agent_cgroup.and_then(|cgroup| {
            self.attach_agent_sock_ops(cgroup)
                .inspect_err(|e| tracing::warn!(error = %e, "the agent's accepted sockets keep the kernel's delayed-ACK timer; requests are acknowledged as they are read"))
                .ok()
        });
        self.shortcut = Some(ShortcutMaps {
            ready,
            agent,
            left,
            bytes,
            held: RwLock::default(),
            _link: link,
            agent_sock_ops,
            requests: None,
        });
        tracing::info!("reply shortcut on: replies to pods go socket to socket (sockmap)");
        Ok(())
    }

    /// Attaches `wm_agent_sock_ops` to the agent's own cgroup (its accepted
    /// sockets belong to it: a socket takes the cgroup of its listener's
    /// creator).
    fn attach_agent_sock_ops(
        &mut self,
        agent_cgroup: &Path,
    ) -> Result<SockOpsLinkId, RedirectError> {
        let program = sock_ops_program(&mut self.ebpf, AGENT_SOCK_OPS)?;
        if program.fd().is_err() {
            program.load().map_err(program_error(AGENT_SOCK_OPS))?;
        }
        let dir = File::open(agent_cgroup).map_err(|source| RedirectError::Cgroup {
            cgroup: agent_cgroup.to_path_buf(),
            source,
        })?;
        sock_ops_program(&mut self.ebpf, AGENT_SOCK_OPS)?
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|source| RedirectError::Attach {
                program: AGENT_SOCK_OPS,
                cgroup: agent_cgroup.to_path_buf(),
                source: Box::new(source),
            })
    }

    /// Whether the agent's accepted sockets get a short delayed-ACK bound
    /// when their handshake completes, so that putting them in the kernel's
    /// interactive mode (fewer bare ACKs) cannot hold a client that uses
    /// Nagle's algorithm for the default 40 ms.
    pub fn acks_bounded(&self) -> bool {
        self.shortcut
            .as_ref()
            .is_some_and(|s| s.agent_sock_ops.is_some())
    }

    /// Turns the request shortcut on (see `ebpf/kernel/src/request.rs`):
    /// pods' requests go socket to socket into the agent's accepted
    /// sockets. Needs the reply shortcut on (its map holds the pods'
    /// sockets the program runs on). `agent_cgroup` is the cgroup v2
    /// directory of this process: its accepted sockets belong to it, and
    /// `wm_agent_sock_ops` attached there files them as targets the moment
    /// their handshake completes. `max_unread`: bytes the kernel may queue
    /// in an accepted socket beyond what [`Redirect::request_consumed`]
    /// said was read, before the connection's requests take TCP.
    pub fn enable_request_shortcut(
        &mut self,
        max_unread: u64,
        agent_cgroup: &Path,
    ) -> Result<(), RedirectError> {
        let Some(shortcut) = &self.shortcut else {
            return Err(RedirectError::RequestShortcutWithoutReplies);
        };
        if shortcut.requests.is_some() {
            return Ok(());
        }
        let agent_sock_ops_attached = shortcut.agent_sock_ops.is_some();
        sk_msg_program(&mut self.ebpf, REQUEST_SHORTCUT)?
            .load()
            .map_err(program_error(REQUEST_SHORTCUT))?;
        let clients_fd = {
            let clients = map_mut(&mut self.ebpf, MAP_SHORTCUT_CLIENTS)?;
            aya::maps::SockHash::<_, FlowKey>::try_from(&*clients)
                .map_err(map_error(MAP_SHORTCUT_CLIENTS, "open"))?
                .fd()
                .try_clone()
                .map_err(|source| RedirectError::MapSyscall {
                    name: MAP_SHORTCUT_CLIENTS,
                    op: "dup",
                    source,
                })?
        };
        // The sock_ops program first: with the sk_msg program attached and
        // no targets filed yet, connections only take TCP.
        let sock_ops = if agent_sock_ops_attached {
            None
        } else {
            Some(self.attach_agent_sock_ops(agent_cgroup)?)
        };
        let sk_msg = sk_msg_program(&mut self.ebpf, REQUEST_SHORTCUT)?
            .attach(&clients_fd)
            .map_err(program_error(REQUEST_SHORTCUT))?;
        let consumed = map_data(&mut self.ebpf, MAP_REQUEST_CONSUMED)?;
        let held = map_data(&mut self.ebpf, MAP_REQUEST_HELD)?;
        let bytes = PerCpuHashMap::try_from(take_map(&mut self.ebpf, MAP_SHORTCUT_BYTES_OUT)?)
            .map_err(map_error(MAP_SHORTCUT_BYTES_OUT, "open"))?;
        update_settings(&mut self.ebpf, |current| {
            current.flags |= waymark_common::SETTING_REQUEST_SHORTCUT;
            current.request_max_unread_kib =
                u32::try_from(max_unread.div_ceil(1024)).unwrap_or(u32::MAX);
        })?;
        // Pods a capture held before this (none at start) need no catching
        // up: holds are written as they come (`hold_replies_on_packets`).
        if let Some(shortcut) = &mut self.shortcut {
            shortcut.requests = Some(RequestMaps {
                consumed,
                held,
                bytes,
                _sk_msg: sk_msg,
                _sock_ops: sock_ops,
            });
        }
        tracing::info!(agent_cgroup = %agent_cgroup.display(), max_unread, "request shortcut on: pods' requests go socket to socket (sockmap)");
        Ok(())
    }

    /// Tells the kernel the agent has read `total` request bytes of the
    /// connection of `client` in the pod `netns_cookie` (the request
    /// shortcut's bound). A no-op with the request shortcut off.
    pub fn request_consumed(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        total: u64,
    ) -> Result<(), RedirectError> {
        let Some(requests) = self.requests() else {
            return Ok(());
        };
        let key = maps::flow_key(netns_cookie, client);
        maps::update(&requests.consumed, &key, &total).map_err(|source| RedirectError::MapSyscall {
            name: MAP_REQUEST_CONSUMED,
            op: "update",
            source,
        })
    }

    /// Forgets what [`Redirect::request_consumed`] wrote for a connection
    /// that has ended.
    pub fn forget_request(&self, netns_cookie: u64, client: SocketAddr) {
        if let Some(requests) = self.requests() {
            let key = maps::flow_key(netns_cookie, client);
            let _ = maps::delete(&requests.consumed, &key);
        }
    }

    /// Request bytes the shortcut has delivered, per pod netns cookie (as
    /// [`Redirect::shortcut_reply_bytes`]). Empty with it off.
    pub fn shortcut_request_bytes(&self) -> Result<Vec<(u64, u64)>, RedirectError> {
        let Some(requests) = self.requests() else {
            return Ok(Vec::new());
        };
        per_pod_totals(&requests.bytes, MAP_SHORTCUT_BYTES_OUT)
    }

    /// Whether [`Redirect::enable_request_shortcut`] succeeded.
    pub fn request_shortcut_on(&self) -> bool {
        self.requests().is_some()
    }

    fn requests(&self) -> Option<&RequestMaps> {
        self.shortcut.as_ref()?.requests.as_ref()
    }

    /// Puts the agent's accepted socket `socket`, the one serving the client
    /// at `client` in the pod whose netns cookie is `netns_cookie`, on the
    /// reply shortcut, if the client's socket is on it (`sock_ops` says so
    /// in `SHORTCUT_READY`, which this takes). Call right after accepting,
    /// before the first write. `Ok(Some(false))`: replies take loopback
    /// TCP; `Ok(None)`: the shortcut is off.
    pub fn shortcut_replies(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        socket: BorrowedFd<'_>,
    ) -> Result<Option<bool>, RedirectError> {
        let Some(shortcut) = &self.shortcut else {
            return Ok(None);
        };
        let key = maps::flow_key(netns_cookie, client);
        let ready: Option<u8> =
            maps::lookup_and_delete(&shortcut.ready, &key).map_err(|source| {
                RedirectError::MapSyscall {
                    name: MAP_SHORTCUT_READY,
                    op: "lookup-and-delete",
                    source,
                }
            })?;
        if ready.is_none() {
            return Ok(Some(false));
        }
        let held = shortcut.held.read().unwrap_or_else(|e| e.into_inner());
        if held.contains_key(&netns_cookie) {
            return Ok(Some(false));
        }
        match maps::update_socket(&shortcut.agent, &key, socket) {
            Ok(()) => Ok(Some(true)),
            // A socket map takes only established sockets: the client
            // already shut down its side (or reset) before the accept. Its
            // replies take TCP, as the program would send them anyway.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(Some(false)),
            Err(source) => Err(RedirectError::MapSyscall {
                name: MAP_SHORTCUT_AGENT,
                op: "insert",
                source,
            }),
        }
    }

    /// Takes one connection's accepted socket off the reply shortcut: its
    /// later replies take loopback TCP, queued behind what was delivered
    /// socket to socket. `Ok(false)`: it was not on it (any more).
    pub fn leave_shortcut(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Result<bool, RedirectError> {
        let Some(shortcut) = &self.shortcut else {
            return Ok(false);
        };
        let key = maps::flow_key(netns_cookie, client);
        shortcut.take_off(&key)
    }

    /// Reply bytes the shortcut has delivered, per pod netns cookie, since
    /// the map was created (it is pinned: every agent of the node adds to
    /// it). Empty with the shortcut off.
    pub fn shortcut_reply_bytes(&self) -> Result<Vec<(u64, u64)>, RedirectError> {
        let Some(shortcut) = &self.shortcut else {
            return Ok(Vec::new());
        };
        per_pod_totals(&shortcut.bytes, MAP_SHORTCUT_BYTES)
    }

    /// Keeps the replies to one pod (its netns cookie) on packets until as
    /// many [`Redirect::release_replies`] as holds: what a packet capture of
    /// the pod needs to see them. The pod's connections on the shortcut
    /// are taken off it now (their next replies take loopback TCP, queued
    /// behind what was already delivered socket to socket, so the
    /// application reads them in order), and no new one is put on it.
    /// Returns how many connections were taken off (of every agent sharing
    /// the pinned maps). A no-op with the shortcut off.
    pub fn hold_replies_on_packets(&self, netns_cookie: u64) -> Result<usize, RedirectError> {
        let Some(shortcut) = &self.shortcut else {
            return Ok(0);
        };
        let mut held = shortcut.held.write().unwrap_or_else(|e| e.into_inner());
        *held.entry(netns_cookie).or_default() += 1;
        if let Some(requests) = &shortcut.requests {
            // The pod's next sends take TCP, for good, on every connection.
            maps::update(&requests.held, &netns_cookie, &1u8).map_err(|source| {
                RedirectError::MapSyscall {
                    name: MAP_REQUEST_HELD,
                    op: "update",
                    source,
                }
            })?;
        }
        let syscall = |op| {
            move |source| RedirectError::MapSyscall {
                name: MAP_SHORTCUT_AGENT,
                op,
                source,
            }
        };
        let keys: Vec<FlowKey> = maps::keys(&shortcut.agent).map_err(syscall("walk"))?;
        let mut taken = 0;
        for key in keys.iter().filter(|k| k.netns_cookie == netns_cookie) {
            if shortcut.take_off(key)? {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Ends one [`Redirect::hold_replies_on_packets`] of the pod: once none
    /// is left, its new connections take the shortcut again (those taken
    /// off stay on loopback).
    pub fn release_replies(&self, netns_cookie: u64) {
        let Some(shortcut) = &self.shortcut else {
            return;
        };
        let mut held = shortcut.held.write().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&netns_cookie) {
            *n -= 1;
            if *n == 0 {
                held.remove(&netns_cookie);
                if let Some(requests) = &shortcut.requests {
                    let _ = maps::delete(&requests.held, &netns_cookie);
                }
            }
        }
    }

    /// Attaches connect4/6, getpeername4/6 and sock_ops to the cgroup v2
    /// directory at `cgroup` (a path).
    ///
    /// Programs are attached as BPF links, which the kernel always attaches
    /// in multi mode (`BPF_F_ALLOW_MULTI` semantics): other programs on the
    /// same cgroup or on its ancestors, such as a CNI's socket load balancer
    /// on the root cgroup, keep running, and ours cannot be replaced by
    /// someone else's. The kernel runs a cgroup's own programs before its
    /// ancestors', so those see the already rewritten loopback destination
    /// and leave it alone.
    ///
    /// Hence `CgroupAttachMode::Single` below: aya passes the mode as the
    /// link's flags, and `BPF_LINK_CREATE` on a cgroup rejects any flag
    /// (`AllowMultiple` fails with EINVAL). aya only falls back to the
    /// exclusive legacy `BPF_PROG_ATTACH` on kernels before 5.7, where
    /// these programs do not load anyway (`bpf_get_netns_cookie` in
    /// sock_ops needs 5.15).
    ///
    /// All or nothing: if one program fails to attach, those already
    /// attached are detached again.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), RedirectError> {
        if let Some(attached) = &self.attached {
            return Err(RedirectError::AlreadyAttached {
                cgroup: attached.cgroup.clone(),
            });
        }
        let dir = File::open(cgroup).map_err(|source| RedirectError::CgroupOpen {
            path: cgroup.to_owned(),
            source,
        })?;
        let is_cgroup2 = nix::sys::statfs::fstatfs(&dir)
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            .map_err(|errno| RedirectError::CgroupOpen {
                path: cgroup.to_owned(),
                source: errno.into(),
            })?;
        if !is_cgroup2 {
            return Err(RedirectError::NotCgroup2 {
                path: cgroup.to_owned(),
            });
        }

        // Recorded as we go so that a failure part-way can be rolled back
        // by `detach`.
        if let Some((pins, keep)) = &self.pins {
            let links_dir = pins.links_dir(&dir, cgroup)?;
            let keep = *keep;
            let links = self.attach_pinned(&dir, cgroup, &links_dir, keep)?;
            self.attached = Some(Attachment {
                cgroup: cgroup.to_owned(),
                sock_ops: None,
                inbound: None,
                release: None,
                sock_addr: Vec::new(),
                links,
            });
            tracing::info!(cgroup = %cgroup.display(), links = %links_dir.display(), kept_after_exit = keep, "redirect programs attached through pinned links");
            return Ok(());
        }
        self.attached = Some(Attachment {
            cgroup: cgroup.to_owned(),
            sock_ops: None,
            inbound: None,
            release: None,
            sock_addr: Vec::with_capacity(SOCK_ADDR_PROGRAMS.len()),
            links: Vec::new(),
        });
        if let Err(err) = self.attach_all(&dir) {
            self.detach();
            return Err(err);
        }
        tracing::info!(cgroup = %cgroup.display(), "redirect programs attached");
        Ok(())
    }

    fn attach_all(&mut self, dir: &File) -> Result<(), RedirectError> {
        let Self { ebpf, attached, .. } = self;
        let attached = attached.as_mut().expect("set by attach");
        let attach_error = |program: &'static str| {
            let cgroup = attached.cgroup.clone();
            move |source| RedirectError::Attach {
                cgroup,
                program,
                source: Box::new(source),
            }
        };
        let id = sock_ops_program(ebpf, SOCK_OPS)?
            .attach(dir, CgroupAttachMode::Single)
            .map_err(attach_error(SOCK_OPS))?;
        attached.sock_ops = Some(id);
        let id = inbound_program(ebpf)?
            .attach(dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(attach_error(INBOUND))?;
        attached.inbound = Some(id);
        // Before the connect hooks: every entry they record has its cleanup.
        let id = release_program(ebpf)?
            .attach(dir, CgroupAttachMode::Single)
            .map_err(attach_error(SOCK_RELEASE))?;
        attached.release = Some(id);
        for name in SOCK_ADDR_PROGRAMS {
            let id = sock_addr_program(ebpf, name)?
                .attach(dir, CgroupAttachMode::Single)
                .map_err(attach_error(name))?;
            attached.sock_addr.push((name, id));
        }
        Ok(())
    }

    /// Attaches every program through a link pinned in `links_dir`: a link
    /// already pinned there (left by an earlier agent) is adopted and gets
    /// this agent's program in one atomic `BPF_LINK_UPDATE`, so the cgroup
    /// is never without its program; a missing one is created and pinned.
    /// `keep`: false removes the pins once the fds are held (the links then
    /// go with this process). Same order as [`Redirect::attach_all`].
    fn attach_pinned(
        &mut self,
        dir: &File,
        cgroup: &Path,
        links_dir: &Path,
        keep: bool,
    ) -> Result<Vec<(&'static str, OwnedFd)>, RedirectError> {
        // Before the connect hooks: every entry they record has its cleanup.
        let order = [SOCK_OPS, INBOUND, SOCK_RELEASE]
            .into_iter()
            .chain(SOCK_ADDR_PROGRAMS)
            .collect::<Vec<_>>();
        let mut links = Vec::with_capacity(order.len());
        let mut created = Vec::new();
        let result = (|| {
            for name in order {
                let path = links_dir.join(name);
                let pin_error = |source| RedirectError::Pin {
                    path: path.clone(),
                    source,
                };
                let fd = if path.exists() {
                    let fd = pin::obj_get(&path).map_err(pin_error)?;
                    let prog = program(&mut self.ebpf, name)?
                        .fd()
                        .map_err(program_error(name))?;
                    pin::link_update(fd.as_fd(), prog.as_fd()).map_err(pin_error)?;
                    tracing::info!(program = name, link = %path.display(), "adopted a pinned link; this agent's program now runs in it");
                    fd
                } else {
                    let link = self.attach_link(dir, cgroup, name)?;
                    link.pin(&path).map_err(|e| RedirectError::Pin {
                        path: path.clone(),
                        source: io::Error::other(e.to_string()),
                    })?;
                    created.push(path.clone());
                    pin::obj_get(&path).map_err(pin_error)?
                };
                if !keep {
                    std::fs::remove_file(&path).map_err(pin_error)?;
                }
                links.push((name, fd));
            }
            Ok(())
        })();
        if let Err(err) = result {
            // Links this call pinned go; adopted ones stay as they were.
            for path in created {
                let _ = std::fs::remove_file(path);
            }
            return Err(err);
        }
        Ok(links)
    }

    /// Attaches one program to the cgroup and returns its link.
    fn attach_link(
        &mut self,
        dir: &File,
        cgroup: &Path,
        name: &'static str,
    ) -> Result<FdLink, RedirectError> {
        let attach_error = |source| RedirectError::Attach {
            cgroup: cgroup.to_owned(),
            program: name,
            source: Box::new(source),
        };
        let fd_link = |e: aya::programs::links::LinkError| RedirectError::Pin {
            path: cgroup.to_owned(),
            source: io::Error::other(e.to_string()),
        };
        match name {
            SOCK_OPS => {
                let p = sock_ops_program(&mut self.ebpf, SOCK_OPS)?;
                let id = p
                    .attach(dir, CgroupAttachMode::Single)
                    .map_err(attach_error)?;
                let link = p.take_link(id).map_err(program_error(name))?;
                FdLink::try_from(link).map_err(fd_link)
            }
            INBOUND => {
                let p = inbound_program(&mut self.ebpf)?;
                let id = p
                    .attach(dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
                    .map_err(attach_error)?;
                let link = p.take_link(id).map_err(program_error(name))?;
                FdLink::try_from(link).map_err(fd_link)
            }
            SOCK_RELEASE => {
                let p = release_program(&mut self.ebpf)?;
                let id = p
                    .attach(dir, CgroupAttachMode::Single)
                    .map_err(attach_error)?;
                let link = p.take_link(id).map_err(program_error(name))?;
                FdLink::try_from(link).map_err(fd_link)
            }
            _ => {
                let p = sock_addr_program(&mut self.ebpf, name)?;
                let id = p
                    .attach(dir, CgroupAttachMode::Single)
                    .map_err(attach_error)?;
                let link = p.take_link(id).map_err(program_error(name))?;
                FdLink::try_from(link).map_err(fd_link)
            }
        }
    }

    /// Whether the links stay attached after this process exits (pinned,
    /// `on_agent_down = "closed"`).
    pub fn links_outlive_agent(&self) -> bool {
        matches!(&self.pins, Some((_, true))) && self.attached.is_some()
    }

    /// Detaches everything (idempotent). Also done on Drop.
    ///
    /// The connect hooks go first, so no new connection is redirected
    /// without sock_ops and getpeername in place. Original destinations
    /// already recorded stay in the maps until taken or closed.
    pub fn detach(&mut self) {
        let Some(mut attached) = self.attached.take() else {
            return;
        };
        if !attached.links.is_empty() {
            // Closing a link's last fd detaches it; a pinned one stays.
            let kept = self.links_kept();
            while let Some((name, fd)) = attached.links.pop() {
                drop(fd);
                tracing::debug!(program = name, kept, "link closed");
            }
            if kept {
                tracing::info!(cgroup = %attached.cgroup.display(), "redirect programs stay attached (pinned links)");
            } else {
                tracing::info!(cgroup = %attached.cgroup.display(), "redirect programs detached");
            }
            return;
        }
        for (name, id) in attached.sock_addr.into_iter().rev() {
            let result = sock_addr_program(&mut self.ebpf, name)
                .and_then(|p| p.detach(id).map_err(program_error(name)));
            if let Err(err) = result {
                tracing::warn!(program = name, error = %err, "detaching redirect program");
            }
        }
        if let Some(id) = attached.release {
            let result = release_program(&mut self.ebpf)
                .and_then(|p| p.detach(id).map_err(program_error(SOCK_RELEASE)));
            if let Err(err) = result {
                tracing::warn!(program = SOCK_RELEASE, error = %err, "detaching redirect program");
            }
        }
        if let Some(id) = attached.inbound {
            let result = inbound_program(&mut self.ebpf)
                .and_then(|p| p.detach(id).map_err(program_error(INBOUND)));
            if let Err(err) = result {
                tracing::warn!(program = INBOUND, error = %err, "detaching redirect program");
            }
        }
        if let Some(id) = attached.sock_ops {
            let result = sock_ops_program(&mut self.ebpf, SOCK_OPS)
                .and_then(|p| p.detach(id).map_err(program_error(SOCK_OPS)));
            if let Err(err) = result {
                tracing::warn!(program = SOCK_OPS, error = %err, "detaching redirect program");
            }
        }
        tracing::info!(cgroup = %attached.cgroup.display(), "redirect programs detached");
    }

    fn links_kept(&self) -> bool {
        matches!(&self.pins, Some((_, true)))
    }

    /// Whether the programs are attached to a cgroup.
    #[allow(
        dead_code,
        reason = "part of the module's API; only tests use it so far"
    )]
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// Looks up and REMOVES the original destination of a connection the
    /// agent accepted in the pod netns with this cookie, `client` being the
    /// accepted socket's peer address.
    ///
    /// `netns_cookie` is [`netns_cookie`] of the listener (or the accepted
    /// socket; they share the netns). A v4-mapped original destination is
    /// returned as plain IPv4. `Ok(None)` means there is nothing to route
    /// to: the connection was not redirected (e.g. a pod dialled the
    /// listener itself; proxying it would loop), was already taken, or was
    /// reset by the client before the agent accepted it.
    ///
    /// One syscall, atomic and lock-free (safe to call from any number of
    /// threads at once).
    pub fn take_original_dst(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Result<Option<SocketAddr>, RedirectError> {
        let key = maps::flow_key(netns_cookie, client);
        let original: Option<SockAddr> = maps::lookup_and_delete(self.by_flow.map(), &key)
            .map_err(|source| RedirectError::MapSyscall {
                name: MAP_BY_FLOW,
                op: "lookup-and-delete",
                source,
            })?;
        Ok(original.as_ref().and_then(maps::socket_addr))
    }

    /// Puts a flow entry in place as an earlier connection would have left
    /// it (tests of stale entries).
    #[cfg(test)]
    fn plant_flow(&mut self, netns_cookie: u64, client: SocketAddr, original: SocketAddr) {
        let key = maps::flow_key(netns_cookie, client);
        self.by_flow
            .insert(key, maps::sock_addr(original), 0)
            .expect("insert a flow entry");
    }

    /// Enrolls a pod: from now on the kernel redirects the outbound TCP of
    /// sockets in the network namespace with this cookie. Only enrolled
    /// netns are redirected, so a cgroup that also holds hostNetwork pods,
    /// the agent's own pod or pods not yet set up can be attached whole.
    /// Enroll a pod only once its listener is bound, or its connections
    /// are refused.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        let mut map = HashMap::<_, u64, u8>::try_from(map_mut(&mut self.ebpf, MAP_ENROLLED)?)
            .map_err(map_error(MAP_ENROLLED, "open"))?;
        map.insert(netns_cookie, 1, 0)
            .map_err(map_error(MAP_ENROLLED, "insert"))
    }

    /// Stops redirecting a pod's new connections (it was deleted, or left
    /// the mesh); connections already redirected carry on. Its socket count
    /// for the connect limits goes too (the releases of its sockets still
    /// open then find nothing to take back). Unknown cookies are not an
    /// error.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        self.remove_pod::<u8>(MAP_ENROLLED, netns_cookie)?;
        self.remove_pod::<PodSockets>(MAP_POD_SOCKETS, netns_cookie)
    }

    /// Has the connect hooks refuse a pod's `connect()` with
    /// `ECONNREFUSED` once it has `per_pod` redirected sockets open, or all
    /// pods `total` (0: no limit), before a SYN leaves (see
    /// `ebpf/kernel/src/limits.rs`). Values above `u32::MAX` are no limit
    /// the kernel could reach anyway.
    pub fn set_connect_limits(
        &mut self,
        per_pod: usize,
        total: usize,
    ) -> Result<(), RedirectError> {
        let limits = ConnectLimits {
            per_pod: u32::try_from(per_pod).unwrap_or(0),
            total: u32::try_from(total).unwrap_or(0),
        };
        Array::<_, ConnectLimits>::try_from(map_mut(&mut self.ebpf, MAP_CONNECT_LIMITS)?)
            .and_then(|mut array| array.set(0, limits, 0))
            .map_err(map_error(MAP_CONNECT_LIMITS, "write"))
    }

    /// Each pod's redirected sockets and the `connect()`s the kernel
    /// refused at a limit, by netns cookie.
    pub fn pod_sockets(&self) -> Vec<(u64, PodSockets)> {
        self.entries(MAP_POD_SOCKETS)
    }

    /// Every entry of the netns-cookie-keyed hash map `name` (none when
    /// it cannot be read: these feed metrics and listings, not decisions).
    fn entries<V: aya::Pod>(&self, name: &str) -> Vec<(u64, V)> {
        let Some(map) = self.ebpf.map(name) else {
            return Vec::new();
        };
        let Ok(map) = HashMap::<_, u64, V>::try_from(map) else {
            return Vec::new();
        };
        map.iter().filter_map(Result::ok).collect()
    }

    /// Removes `key` from the netns-cookie-keyed hash map `name`; a key
    /// that is not there is no error.
    fn remove_pod<V: aya::Pod>(
        &mut self,
        name: &'static str,
        key: u64,
    ) -> Result<(), RedirectError> {
        let mut map = HashMap::<_, u64, V>::try_from(map_mut(&mut self.ebpf, name)?)
            .map_err(map_error(name, "open"))?;
        match map.remove(&key) {
            Err(e) if !is_not_found(&e) => Err(map_error(name, "remove")(e)),
            _ => Ok(()),
        }
    }

    /// The ring the connect hooks report refusals on (one reader: the
    /// first call takes it).
    pub fn take_refusals(&mut self) -> Result<aya::maps::RingBuf<MapData>, RedirectError> {
        aya::maps::RingBuf::try_from(take_map(&mut self.ebpf, MAP_CONNECT_REFUSED)?)
            .map_err(map_error(MAP_CONNECT_REFUSED, "open"))
    }

    /// The netns cookies of the enrolled pods, as the kernel holds them.
    pub fn enrolled(&self) -> Vec<u64> {
        self.entries::<u8>(MAP_ENROLLED)
            .into_iter()
            .map(|(cookie, _)| cookie)
            .collect()
    }

    /// Puts pods under strict inbound (`inbound.mode = "strict"`): a new
    /// TCP connection to a pod whose netns cookie is in `pods` is let in
    /// only from `allow` (this node's addresses and pods, loopback); from
    /// anywhere else the kernel drops it (see `ebpf/kernel/src/inbound.rs`).
    pub fn set_strict(
        &mut self,
        pods: &[u64],
        allow: &[ipnet::IpNet],
    ) -> Result<(), RedirectError> {
        let (mut v4_keys, mut v6_keys) = (Vec::new(), Vec::new());
        for net in allow {
            match maps::lpm_key(*net) {
                maps::LpmKey::V4(key) => v4_keys.push(key),
                maps::LpmKey::V6(key) => v6_keys.push(key),
            }
        }
        let mut v4 = LpmTrie::<_, u32, u8>::try_from(map_mut(&mut self.ebpf, MAP_ALLOW_V4)?)
            .map_err(map_error(MAP_ALLOW_V4, "open"))?;
        for key in &v4_keys {
            v4.insert(key, 1, 0)
                .map_err(map_error(MAP_ALLOW_V4, "insert"))?;
        }
        let mut v6 = LpmTrie::<_, [u32; 4], u8>::try_from(map_mut(&mut self.ebpf, MAP_ALLOW_V6)?)
            .map_err(map_error(MAP_ALLOW_V6, "open"))?;
        for key in &v6_keys {
            v6.insert(key, 1, 0)
                .map_err(map_error(MAP_ALLOW_V6, "insert"))?;
        }
        let mut strict =
            HashMap::<_, u64, u64>::try_from(map_mut(&mut self.ebpf, MAP_STRICT_PODS)?)
                .map_err(map_error(MAP_STRICT_PODS, "open"))?;
        for cookie in pods {
            strict
                .insert(cookie, 0, 0)
                .map_err(map_error(MAP_STRICT_PODS, "insert"))?;
        }
        tracing::debug!(
            pods = pods.len(),
            allowed_sources = allow.len(),
            "strict inbound: pods accept new connections only from this node and through the tunnel"
        );
        Ok(())
    }

    /// Takes a pod out of strict inbound (it was removed). Unknown cookies
    /// are not an error.
    pub fn unset_strict(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        self.remove_pod::<u64>(MAP_STRICT_PODS, netns_cookie)
    }

    /// Connection attempts refused by strict inbound, by pod netns cookie.
    pub fn strict_refused(&self) -> Vec<(u64, u64)> {
        self.entries(MAP_STRICT_PODS)
    }

    /// Counts entries in both original-destination maps (for metrics and
    /// leak tests).
    ///
    /// This walks the keys, so it costs a syscall per entry; under heavy
    /// churn the kernel may restart a walk whose current key was deleted,
    /// so the count is approximate then (capped at the map size).
    pub fn occupancy(&self) -> Result<MapOccupancy, RedirectError> {
        Ok(MapOccupancy {
            by_cookie: count(&self.by_cookie, MAP_BY_COOKIE, MAX_ORIGINAL_DST_BY_COOKIE)?,
            by_flow: count(&self.by_flow, MAP_BY_FLOW, MAX_ORIGINAL_DST_BY_FLOW)?,
        })
    }
}

// `take_original_dst` and `occupancy` take `&self`: the agent can share one
// `Redirect` between threads without a lock on the accept path.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Redirect>();
};

impl Drop for Redirect {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The network namespace cookie of a socket (`SO_NETNS_COOKIE`, Linux 5.14+):
/// the value the `sock_ops` program keys flows by. Call it on the listener
/// the agent bound inside a pod's netns.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_NETNS_COOKIE returned {len} bytes"),
        ));
    }
    Ok(cookie)
}

/// Whether two LPM keys name the same prefix.
fn same_key<K: aya::Pod + PartialEq>(
    a: &aya::maps::lpm_trie::Key<K>,
    b: &aya::maps::lpm_trie::Key<K>,
) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

fn count<K: aya::Pod>(
    map: &HashMap<MapData, K, SockAddr>,
    name: &'static str,
    max: u32,
) -> Result<usize, RedirectError> {
    map.keys()
        .take(max as usize)
        .try_fold(0, |n, key| key.map(|_| n + 1))
        .map_err(map_error(name, "iterate"))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, RedirectError> {
    ebpf.program_mut(name).ok_or(RedirectError::Missing {
        kind: "program",
        name,
    })
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, RedirectError> {
    program(ebpf, name)?.try_into().map_err(program_error(name))
}

fn inbound_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, RedirectError> {
    program(ebpf, INBOUND)?
        .try_into()
        .map_err(program_error(INBOUND))
}

fn release_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSock, RedirectError> {
    program(ebpf, SOCK_RELEASE)?
        .try_into()
        .map_err(program_error(SOCK_RELEASE))
}

fn sk_msg_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::SkMsg, RedirectError> {
    program(ebpf, name)?.try_into().map_err(program_error(name))
}

fn sock_ops_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SockOps, RedirectError> {
    program(ebpf, name)?.try_into().map_err(program_error(name))
}

/// A delete of a key the map does not hold (`ENOENT`).
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, RedirectError> {
    ebpf.map_mut(name)
        .ok_or(RedirectError::Missing { kind: "map", name })
}

/// Changes the one `SETTINGS` slot in place (read, change, write back):
/// each shortcut sets its own flag and fields in it.
fn update_settings(
    ebpf: &mut Ebpf,
    change: impl FnOnce(&mut RedirectSettings),
) -> Result<(), RedirectError> {
    let mut settings = Array::<_, RedirectSettings>::try_from(map_mut(ebpf, MAP_SETTINGS)?)
        .map_err(map_error(MAP_SETTINGS, "open"))?;
    let mut current = settings
        .get(&0, 0)
        .map_err(map_error(MAP_SETTINGS, "read"))?;
    change(&mut current);
    settings
        .set(0, current, 0)
        .map_err(map_error(MAP_SETTINGS, "write"))
}

/// A per-CPU byte count per pod netns cookie (the shortcuts' counts),
/// summed over the CPUs.
fn per_pod_totals(
    map: &PerCpuHashMap<MapData, u64, u64>,
    name: &'static str,
) -> Result<Vec<(u64, u64)>, RedirectError> {
    map.iter()
        .map(|entry| {
            entry
                .map(|(cookie, per_cpu)| (cookie, per_cpu.iter().sum()))
                .map_err(map_error(name, "read"))
        })
        .collect()
}

/// A map taken out of the object for the raw syscalls in [`maps`].
fn map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, RedirectError> {
    match take_map(ebpf, name)? {
        aya::maps::Map::HashMap(m) | aya::maps::Map::LruHashMap(m) => Ok(m),
        _ => Err(RedirectError::Missing {
            kind: "hash map",
            name,
        }),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, RedirectError> {
    ebpf.take_map(name)
        .ok_or(RedirectError::Missing { kind: "map", name })
}

fn program_error(
    program: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    move |source| RedirectError::Program {
        program,
        source: Box::new(source),
    }
}

fn map_error(
    name: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |source| RedirectError::Map {
        name,
        op,
        source: Box::new(source),
    }
}
