//! Packet capture on demand: `POST /capture` on the admin API opens a
//! packet socket inside a pod's network namespace (or the node's), runs a
//! tcpdump-syntax filter in the kernel, and streams pcapng back until the
//! duration, packet or byte limit is reached or the client goes away.
//!
//! Each capture runs on its own thread (never on the data-path runtime):
//! the thread enters the target namespace with `setns` (as the pod
//! listeners are bound, see `proxy::listener`), opens the socket there, and
//! writes pcapng into a bounded channel that the admin API streams out. A
//! slow reader slows the thread, the socket's buffer fills and the kernel
//! drops (and counts) packets: memory stays bounded.
//!
//! Bounds: at most `capture.max_concurrent` captures at once (more get
//! 429), `capture.max_duration` and `capture.max_bytes` per capture, and the
//! snap length at most 256 KiB. Every capture is logged with who asked (the
//! admin peer and the client's user agent), the target, the filter and the
//! limits, and again when it ends with its counts and why it stopped.
//!
//! Not handled: VLAN tags the NIC stripped (offload) are not re-inserted, and
//! a filter that names a host makes libpcap resolve it on the node.

pub mod filter;
pub mod keylog;
pub mod pcapng;
mod socket;

use std::convert::Infallible;
use std::fmt;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nix::sched::{CloneFlags, setns};
use pcap_file::DataLink;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{CaptureConfig, Config};
use filter::KernelFilter;
use keylog::{KeyLogSink, KeyLogSubscription};
use pcapng::{Direction, PcapNg, STOP_COMMENT_PREFIX};
use socket::PacketSocket;

/// Capture length when the request names none, and the most it may name.
pub const MAX_SNAPLEN: u32 = 262_144;
/// How long a capture runs when the request says nothing (capped by
/// `capture.max_duration`).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
/// pcapng bytes a capture writes when the request says nothing (capped by
/// `capture.max_bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// How often the capture thread looks at its deadline and whether the
/// client is still there when no packet arrives.
const TICK: Duration = Duration::from_millis(100);
/// Packets read before the buffered pcapng is sent on.
const BATCH: usize = 256;
/// Chunks of pcapng in flight between the capture thread and the client.
const CHANNEL: usize = 16;
/// Buffered pcapng that is sent on even in the middle of a batch.
const FLUSH_BYTES: usize = 256 * 1024;

/// In a key-log capture, how long packets wait before they are written.
/// A secret is logged when rustls derives it, which for the peer's first
/// encrypted records (in the same segment as its ServerHello) is *after*
/// the packet reached this socket; holding packets briefly puts every
/// secret in the file before the records it decrypts, as a one-pass reader
/// (`waymark capture -w - | tshark -r -`) needs.
const KEYLOG_HOLD: Duration = Duration::from_millis(200);
/// At most this many bytes of packets are held; beyond it they go out at
/// once (a bulk transfer's records need no new secrets anyway).
const KEYLOG_HOLD_BYTES: usize = 4 << 20;

/// A packet waiting for the secrets that may still come for it.
struct Held {
    at: Instant,
    iface: u32,
    timestamp: Duration,
    data: Vec<u8>,
    original_len: u32,
    direction: Direction,
}

/// Writes the held packets that arrived before `until`, after the secrets
/// logged so far; returns how many bytes of packets it released.
fn release_held(
    out: &mut PcapNg,
    held: &mut std::collections::VecDeque<Held>,
    secrets: &KeyLogSubscription,
    until: Instant,
) -> Result<usize, String> {
    out.tls_secrets(&secrets.drain())
        .map_err(|e| e.to_string())?;
    let mut released = 0;
    while held.front().is_some_and(|h| h.at <= until) {
        if let Some(h) = held.pop_front() {
            out.packet(h.iface, h.timestamp, &h.data, h.original_len, h.direction)
                .map_err(|e| e.to_string())?;
            released += h.data.len();
        }
    }
    Ok(released)
}

/// Where a capture looks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A pod's network namespace.
    Pod { name: String, netns: PathBuf },
    /// The agent's own (the node's) network namespace.
    Node { name: String },
}

impl Target {
    fn scope(&self) -> &'static str {
        match self {
            Target::Pod { .. } => "pod",
            Target::Node { .. } => "node",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pod { name, netns } => write!(f, "pod {name} (netns {})", netns.display()),
            Target::Node { name } => write!(f, "node {name}"),
        }
    }
}

/// A capture request, validated against the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureParams {
    pub target: Target,
    /// tcpdump syntax; empty captures everything.
    pub filter: String,
    pub duration: Duration,
    pub max_packets: Option<u64>,
    pub max_bytes: u64,
    pub snaplen: u32,
    /// Embed TLS secrets (node scope only).
    pub keylog: bool,
    /// Traffic left out whatever the filter says, in tcpdump syntax: on the
    /// node, the admin API's own connections, which carry this capture's
    /// stream (and any other's) to its reader; captured, each packet
    /// streamed would be captured again, and an unfiltered capture would
    /// fill with itself in milliseconds.
    pub excluded: Option<String>,
}

/// Why a request was refused before any capture started.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestError {
    /// 400 for a bad request, 403 for a capture the config forbids.
    pub forbidden: bool,
    pub message: String,
}

fn bad(message: impl Into<String>) -> RequestError {
    RequestError {
        forbidden: false,
        message: message.into(),
    }
}

impl CaptureParams {
    /// Parses the query string of `POST /capture`:
    /// `pod=NS/NAME | node=1`, `filter`, `duration` (e.g. `30s`),
    /// `max_packets`, `max_bytes`, `snaplen`, `keylog=1`.
    pub fn from_query(query: &str, config: &Config) -> Result<Self, RequestError> {
        let limits = &config.capture;
        if !limits.enabled {
            return Err(RequestError {
                forbidden: true,
                message: "packet capture is disabled on this agent (capture.enabled = false)"
                    .into(),
            });
        }
        let (mut pod, mut node, mut filter, mut duration) = (None, false, String::new(), None);
        let (mut max_packets, mut max_bytes, mut snaplen, mut keylog) = (None, None, None, false);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                crate::http::query::decode(value).map_err(|e| bad(format!("{key}: {e}")))?;
            match key {
                "pod" => pod = Some(value),
                "node" => node = flag(key, &value)?,
                "filter" => filter = value,
                "duration" => {
                    duration = Some(humantime::parse_duration(&value).map_err(|e| {
                        bad(format!("duration {value:?}: {e} (write e.g. 30s, 2m)"))
                    })?)
                }
                "max_packets" => max_packets = Some(number(key, &value)?),
                "max_bytes" => max_bytes = Some(number(key, &value)?),
                "snaplen" => snaplen = Some(number(key, &value)?),
                "keylog" => keylog = flag(key, &value)?,
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?}; known: pod, node, filter, duration, max_packets, max_bytes, snaplen, keylog"
                    )));
                }
            }
        }
        let target = match (pod, node) {
            (Some(_), true) => return Err(bad("give pod=NAME or node=1, not both")),
            (None, false) => {
                return Err(bad(
                    "say where to capture: pod=NAMESPACE/NAME (a pod of this node) or node=1 (the node's own network namespace)",
                ));
            }
            (Some(name), false) => match config.pods.iter().find(|p| p.name == name) {
                Some(p) => Target::Pod {
                    name,
                    netns: p.netns.clone(),
                },
                None => {
                    let known: Vec<&str> = config.pods.iter().map(|p| p.name.as_str()).collect();
                    return Err(bad(format!(
                        "unknown pod {name:?}: it is not on node {} (pods here: {})",
                        config.node.name,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )));
                }
            },
            (None, true) => Target::Node {
                name: config.node.name.clone(),
            },
        };
        let duration = duration.unwrap_or(DEFAULT_DURATION.min(limits.max_duration));
        if duration.is_zero() || duration > limits.max_duration {
            return Err(bad(format!(
                "duration {} is out of range: more than 0 and at most {} (capture.max_duration)",
                humantime::format_duration(duration),
                humantime::format_duration(limits.max_duration)
            )));
        }
        let max_bytes = max_bytes.unwrap_or(DEFAULT_MAX_BYTES.min(limits.max_bytes));
        if max_bytes == 0 || max_bytes > limits.max_bytes {
            return Err(bad(format!(
                "max_bytes {max_bytes} is out of range: 1 to {} (capture.max_bytes)",
                limits.max_bytes
            )));
        }
        if max_packets == Some(0) {
            return Err(bad("max_packets must be at least 1"));
        }
        let snaplen = snaplen.unwrap_or(u64::from(MAX_SNAPLEN));
        if snaplen == 0 || snaplen > u64::from(MAX_SNAPLEN) {
            return Err(bad(format!(
                "snaplen {snaplen} is out of range: 1 to {MAX_SNAPLEN}"
            )));
        }
        if keylog {
            if !matches!(target, Target::Node { .. }) {
                return Err(bad(
                    "keylog=1 needs node=1: TLS secrets are those of the node-to-node tunnel, which runs in the node's network namespace",
                ));
            }
            if !limits.keylog {
                return Err(RequestError {
                    forbidden: true,
                    message: "keylog captures are disabled on this agent (set capture.keylog = true to allow TLS secrets in captures)".into(),
                });
            }
        }
        let excluded = match target {
            // The admin API listens in the node's namespace only; a pod's
            // namespace never carries it.
            Target::Node { .. } => Some(admin_exclusion(config.admin.listen)),
            Target::Pod { .. } => None,
        };
        Ok(CaptureParams {
            target,
            filter,
            duration,
            max_packets,
            max_bytes,
            snaplen: snaplen as u32,
            keylog,
            excluded,
        })
    }

    /// The expression the kernel runs: the user's filter with the
    /// exclusion added.
    pub fn kernel_expression(&self) -> String {
        match (&self.excluded, self.filter.trim()) {
            (None, _) => self.filter.clone(),
            (Some(excluded), "") => format!("not ({excluded})"),
            (Some(excluded), filter) => format!("({filter}) and not ({excluded})"),
        }
    }
}

/// The admin API's connections in tcpdump syntax.
fn admin_exclusion(admin: std::net::SocketAddr) -> String {
    format!("tcp and host {} and port {}", admin.ip(), admin.port())
}

fn flag(key: &str, value: &str) -> Result<bool, RequestError> {
    match value {
        "1" | "true" | "" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(bad(format!("{key}: {value:?} is not 1 or 0"))),
    }
}

fn number(key: &str, value: &str) -> Result<u64, RequestError> {
    value
        .parse()
        .map_err(|_| bad(format!("{key}: {value:?} is not a whole number")))
}

/// Who asked for a capture, for the log.
#[derive(Clone, Debug)]
pub struct Requester {
    /// The caller: a TCP address or the admin socket's peer credentials.
    pub peer: String,
    pub user_agent: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "{max} captures are already running on this agent (capture.max_concurrent); wait for one to finish"
    )]
    Busy { max: usize },
    #[error("cannot open the network namespace of {target}: {source}")]
    Netns {
        target: String,
        source: std::io::Error,
    },
    #[error("cannot open a packet socket in {target}: {source}")]
    Socket {
        target: String,
        source: std::io::Error,
    },
    #[error("cannot start the capture thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// What keeps a pod's traffic on packets while a capture looks at it: with
/// the reply shortcut (`redirect.reply_shortcut`) the agent's replies to a
/// pod's application move socket to socket and never cross the pod's `lo`,
/// where a capture would see them.
pub trait PacketHold: Send + Sync {
    /// Keeps the traffic of the pod whose netns cookie is `netns_cookie` on
    /// packets until the returned guard is dropped. Never fails a capture:
    /// what cannot be held is logged by the implementation.
    fn hold(&self, netns_cookie: u64) -> Box<dyn Send>;
}

/// The agent's captures: the concurrency bound, the metrics and the TLS
/// key log sink.
pub struct Captures {
    active: AtomicUsize,
    next_id: AtomicU64,
    stopping: Arc<AtomicBool>,
    key_log: Arc<KeyLogSink>,
    started: Family<ScopeLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    active_gauge: Gauge,
    /// Serialises slot reservation with the gauge update.
    reserve: Mutex<()>,
    /// Set once the redirect is loaded (captures start after that).
    packet_hold: std::sync::OnceLock<Arc<dyn PacketHold>>,
}

/// A reserved place among the concurrent captures, released on drop.
struct Slot(Arc<Captures>);

impl Drop for Slot {
    fn drop(&mut self) {
        let _g = self.0.reserve.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.0.active.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.active_gauge.set(n as i64);
    }
}

impl Captures {
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let c = Captures {
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stopping: Arc::new(AtomicBool::new(false)),
            key_log: KeyLogSink::new(),
            started: Family::default(),
            refused: Family::default(),
            active_gauge: Gauge::default(),
            reserve: Mutex::new(()),
            packet_hold: std::sync::OnceLock::new(),
        };
        registry.register(
            "waymark_captures_started",
            "Packet captures started, by scope (pod or node)",
            c.started.clone(),
        );
        registry.register(
            "waymark_captures_refused",
            "Packet capture requests refused, by reason (busy, invalid, forbidden, error)",
            c.refused.clone(),
        );
        registry.register(
            "waymark_captures_active",
            "Packet captures running now",
            c.active_gauge.clone(),
        );
        Arc::new(c)
    }

    /// The TLS key log the tunnel's rustls configs take (see [`keylog`]).
    #[allow(
        dead_code,
        reason = "the tunnel's TLS configs take it once they are wired"
    )]
    pub fn key_log(&self) -> Arc<KeyLogSink> {
        self.key_log.clone()
    }

    /// Gives pod captures what keeps the pod's traffic on packets while
    /// they run (see [`PacketHold`]). Set once; later calls are ignored.
    pub fn set_packet_hold(&self, hold: Arc<dyn PacketHold>) {
        let _ = self.packet_hold.set(hold);
    }

    /// Counts a refused request (`invalid`, `forbidden`, `busy`, `error`).
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Ends every running capture (agent shutdown).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn reserve(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let _g = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.active.load(Ordering::Acquire);
        if n >= max {
            return None;
        }
        self.active.store(n + 1, Ordering::Release);
        self.active_gauge.set((n + 1) as i64);
        Some(Slot(self.clone()))
    }

    /// Starts a capture: reserves a slot, enters the target namespace on a
    /// new thread and opens the socket there. Returns once the socket is
    /// open (so an error is the response, not an empty stream).
    pub async fn start(
        self: &Arc<Self>,
        params: CaptureParams,
        filter: KernelFilter,
        limits: &CaptureConfig,
        who: Requester,
    ) -> Result<CaptureBody, CaptureError> {
        let Some(slot) = self.reserve(limits.max_concurrent) else {
            self.refused("busy");
            warn!(peer = %who.peer, user_agent = %who.user_agent, target = %params.target, filter = ?params.filter,
                max = limits.max_concurrent, "packet capture refused: too many running");
            return Err(CaptureError::Busy {
                max: limits.max_concurrent,
            });
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let netns = match &params.target {
            Target::Pod { netns, .. } => match std::fs::File::open(netns) {
                Ok(f) => Some(f),
                Err(source) => {
                    let e = CaptureError::Netns {
                        target: params.target.to_string(),
                        source,
                    };
                    self.refused("error");
                    warn!(capture = id, peer = %who.peer, error = %e, "packet capture failed to start");
                    return Err(e);
                }
            },
            Target::Node { .. } => None,
        };
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (ready_tx, ready_rx) = oneshot::channel();
        let key_log = params.keylog.then(|| self.key_log.clone());
        let stopping = self.stopping.clone();
        let packet_hold = self.packet_hold.get().cloned();
        let thread_params = params.clone();
        std::thread::Builder::new()
            .name(format!("waymark-capture-{id}"))
            .spawn(move || {
                let _slot = slot;
                let params = thread_params;
                let target = params.target.to_string();
                if let Some(ns) = &netns
                    && let Err(e) = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                {
                    let _ = ready_tx.send(Err(CaptureError::Netns {
                        target,
                        source: e.into(),
                    }));
                    return;
                }
                let socket = match PacketSocket::open(&filter, params.snaplen) {
                    Ok(s) => s,
                    Err(source) => {
                        let _ = ready_tx.send(Err(CaptureError::Socket { target, source }));
                        return;
                    }
                };
                // A pod's replies back on packets before "ready", so the
                // capture sees every exchange from its first packet on.
                let _held = netns.as_ref().zip(packet_hold).and_then(|(_, hold)| {
                    match crate::redirect::netns_cookie(socket.as_fd()) {
                        Ok(cookie) => Some(hold.hold(cookie)),
                        Err(e) => {
                            warn!(capture = id, target = %target, error = %e, "cannot read the pod's netns cookie; replies on the reply shortcut are not captured");
                            None
                        }
                    }
                });
                // Subscribe before saying "ready", so no secret of a
                // handshake that starts afterwards is missed.
                let secrets = key_log.map(|k| k.subscribe());
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                let outcome = run(socket, &params, tx, secrets, &stopping);
                info!(
                    capture = id,
                    target = %target,
                    packets = outcome.packets,
                    bytes = outcome.bytes,
                    kernel_drops = outcome.kernel_drops,
                    tls_secrets_dropped = outcome.secrets_dropped,
                    elapsed = ?outcome.elapsed,
                    reason = %outcome.reason,
                    "packet capture ended"
                );
            })
            .map_err(CaptureError::Thread)?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.refused("error");
                warn!(capture = id, peer = %who.peer, error = %e, "packet capture failed to start");
                return Err(e);
            }
            Err(_) => {
                self.refused("error");
                return Err(CaptureError::Thread(std::io::Error::other(
                    "the capture thread ended before opening its socket",
                )));
            }
        }
        self.started
            .get_or_create(&ScopeLabels {
                scope: params.target.scope(),
            })
            .inc();
        let max_packets = params
            .max_packets
            .map_or_else(|| "none".to_string(), |n| n.to_string());
        if params.keylog {
            warn!(capture = id, peer = %who.peer, user_agent = %who.user_agent,
                "packet capture with TLS secrets: the stream holds the tunnel's session keys");
        }
        info!(
            capture = id,
            peer = %who.peer,
            user_agent = %who.user_agent,
            target = %params.target,
            filter = ?params.filter,
            duration = %humantime::format_duration(params.duration),
            max_packets = %max_packets,
            max_bytes = params.max_bytes,
            snaplen = params.snaplen,
            keylog = params.keylog,
            "packet capture started"
        );
        Ok(CaptureBody { rx })
    }
}

/// Why a capture stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Duration,
    MaxPackets,
    MaxBytes,
    ClientGone,
    AgentShutdown,
    Error(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Duration => f.write_str("duration"),
            StopReason::MaxPackets => f.write_str("max_packets"),
            StopReason::MaxBytes => f.write_str("max_bytes"),
            StopReason::ClientGone => f.write_str("client_disconnected"),
            StopReason::AgentShutdown => f.write_str("agent_shutdown"),
            StopReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

struct Outcome {
    packets: u64,
    /// Key log lines lost because the capture fell behind (all captures).
    secrets_dropped: u64,
    bytes: u64,
    kernel_drops: u64,
    elapsed: Duration,
    reason: StopReason,
}

fn now_since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Link type of a packet socket's packets on a device of ARPHRD `hatype`.
fn linktype(hatype: u16) -> Option<DataLink> {
    if filter::ETHERNET_HATYPES.contains(&hatype) {
        Some(DataLink::ETHERNET)
    } else if filter::RAW_IP_HATYPES.contains(&hatype) {
        Some(DataLink::RAW)
    } else {
        None
    }
}

/// Sends a chunk, waiting while the client is slow, until the deadline.
fn send(
    tx: &mpsc::Sender<Bytes>,
    chunk: Vec<u8>,
    deadline: Instant,
    stopping: &AtomicBool,
) -> Result<(), StopReason> {
    if chunk.is_empty() {
        return Ok(());
    }
    let mut chunk = Bytes::from(chunk);
    loop {
        match tx.try_send(chunk) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(StopReason::ClientGone),
            Err(TrySendError::Full(c)) => {
                if Instant::now() >= deadline {
                    return Err(StopReason::Duration);
                }
                if stopping.load(Ordering::Acquire) {
                    return Err(StopReason::AgentShutdown);
                }
                chunk = c;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The capture loop, on the capture thread inside the target namespace.
fn run(
    mut socket: PacketSocket,
    params: &CaptureParams,
    tx: mpsc::Sender<Bytes>,
    secrets: Option<KeyLogSubscription>,
    stopping: &AtomicBool,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + params.duration;
    let description = match &params.excluded {
        None => format!(
            "waymark capture of {}, filter {:?}",
            params.target, params.filter
        ),
        Some(excluded) => format!(
            "waymark capture of {}, filter {:?}, excluding the agent's admin API connections ({excluded}): they carry the captures",
            params.target, params.filter
        ),
    };
    let mut out = match PcapNg::new(params.snaplen, &description) {
        Ok(o) => o,
        Err(e) => {
            return Outcome {
                packets: 0,
                secrets_dropped: 0,
                bytes: 0,
                kernel_drops: 0,
                elapsed: start.elapsed(),
                reason: StopReason::Error(e.to_string()),
            };
        }
    };
    // ifindex → interface id in the file (None: a link type not captured).
    let mut interfaces: std::collections::HashMap<i32, Option<u32>> = Default::default();
    let mut packets = 0u64;
    let mut kernel_drops = 0u64;
    let mut held = std::collections::VecDeque::new();
    let mut held_bytes = 0usize;
    let reason = 'capture: loop {
        // The header goes out at once, so the client sees a capture start.
        if let Err(r) = send(&tx, out.take(), deadline, stopping) {
            break r;
        }
        let now = Instant::now();
        if now >= deadline {
            break StopReason::Duration;
        }
        if stopping.load(Ordering::Acquire) {
            break StopReason::AgentShutdown;
        }
        if tx.is_closed() {
            break StopReason::ClientGone;
        }
        if let Some(s) = &secrets {
            match release_held(
                &mut out,
                &mut held,
                s,
                now.checked_sub(KEYLOG_HOLD).unwrap_or(now),
            ) {
                Ok(released) => held_bytes -= released,
                Err(e) => break StopReason::Error(e),
            }
        }
        let tick = if held.is_empty() {
            TICK
        } else {
            KEYLOG_HOLD / 4
        };
        match socket.wait(tick.min(deadline - now)) {
            Ok(_) => {}
            Err(e) => break StopReason::Error(format!("poll: {e}")),
        }
        kernel_drops += socket.drops();
        for _ in 0..BATCH {
            let p = match socket.recv() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => break 'capture StopReason::Error(format!("receive: {e}")),
            };
            // Loopback shows every packet twice (sent, then received).
            if p.hatype == libc::ARPHRD_LOOPBACK && p.pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let iface = match interfaces.get(&p.ifindex) {
                Some(i) => *i,
                None => {
                    let id = match linktype(p.hatype) {
                        Some(lt) => {
                            match out.add_interface(&socket::interface_name(p.ifindex), lt) {
                                Ok(id) => Some(id),
                                Err(e) => break 'capture StopReason::Error(e.to_string()),
                            }
                        }
                        None => None,
                    };
                    interfaces.insert(p.ifindex, id);
                    id
                }
            };
            let Some(iface) = iface else { continue };
            let direction = if p.pkttype == libc::PACKET_OUTGOING {
                Direction::Outbound
            } else {
                Direction::Inbound
            };
            if let Some(s) = &secrets {
                held_bytes += p.data.len();
                held.push_back(Held {
                    at: Instant::now(),
                    iface,
                    timestamp: p.timestamp,
                    data: p.data.to_vec(),
                    original_len: p.original_len,
                    direction,
                });
                if held_bytes > KEYLOG_HOLD_BYTES {
                    match release_held(&mut out, &mut held, s, Instant::now()) {
                        Ok(released) => held_bytes -= released,
                        Err(e) => break 'capture StopReason::Error(e),
                    }
                }
            } else if let Err(e) = out.packet(iface, p.timestamp, p.data, p.original_len, direction)
            {
                break 'capture StopReason::Error(e.to_string());
            }
            packets += 1;
            if params.max_packets.is_some_and(|m| packets >= m) {
                break 'capture StopReason::MaxPackets;
            }
            if out.written() >= params.max_bytes {
                break 'capture StopReason::MaxBytes;
            }
            if out.pending() >= FLUSH_BYTES
                && let Err(r) = send(&tx, out.take(), deadline, stopping)
            {
                break 'capture r;
            }
        }
    };
    kernel_drops += socket.drops();
    let elapsed = start.elapsed();
    let bytes_before_trailer = out.written();
    if reason != StopReason::ClientGone {
        if let Some(s) = &secrets {
            // The last secrets have had their chance: everything goes out.
            std::thread::sleep(KEYLOG_HOLD.min(Duration::from_millis(50)));
            let _ = release_held(&mut out, &mut held, s, Instant::now());
        }
        let comment = format!(
            "{STOP_COMMENT_PREFIX}{reason} ({packets} packets, {bytes_before_trailer} bytes, {kernel_drops} dropped by the kernel, {:.1}s)",
            elapsed.as_secs_f64()
        );
        if out
            .finish(now_since_epoch(), kernel_drops, &comment)
            .is_ok()
        {
            // The trailer may go out a little after the deadline.
            let _ = send(
                &tx,
                out.take(),
                Instant::now() + Duration::from_secs(2),
                stopping,
            );
        }
    }
    Outcome {
        packets,
        secrets_dropped: secrets.as_ref().map_or(0, |s| s.dropped()),
        bytes: out.written(),
        kernel_drops,
        elapsed,
        reason,
    }
}

/// The response body of a capture: pcapng chunks as the thread sends them;
/// dropping it (the client went away) stops the capture.
pub struct CaptureBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for CaptureBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
