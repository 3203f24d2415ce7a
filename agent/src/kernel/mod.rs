//! Kernel diagnostics: what the kernel did to pods' packets, from the
//! `waymark-diag` eBPF object (`ebpf/kernel/src/diag`).
//!
//! * Drops by the kernel's own reason (`skb:kfree_skb`), retransmits
//!   (`tcp:tcp_retransmit_skb`, SYNs apart) and resets sent and received
//!   (`tcp:tcp_send_reset`, `tcp:tcp_receive_reset`), per pod and per flow.
//! * Bytes and packets in and out per pod (`cgroup_skb` on the pods'
//!   cgroup, the redirect programs' attach point). The reply shortcut's
//!   replies are not packets: the redirect object counts them per pod and
//!   [`KernelDiag::count_sockmap_replies`] adds them to the bytes in.
//! * Drop and reset events through a rate-limited ring buffer.
//!
//! The agent gives each configured pod a slot (its position in the config
//! plus one; slot 0 is the node) and tells the kernel which network
//! namespace is which slot; metric labels therefore only ever name
//! configured pods, `node`, and the reasons of the running kernel.
//!
//! Everything here is optional: if the kernel refuses a program, the agent
//! logs why, reports it in `/drops`, and proxies as before. It is the
//! agent's second eBPF loader, beside `crate::redirect` (the one the data
//! path depends on); `diagnostics` and the admin API read what it counts.

mod btf;
mod events;
mod metrics;
mod offsets;
mod snapshot;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, Program, RawTracePoint},
};
use tokio::sync::broadcast;
use waymark_common::diag::{
    DiagConfig, DropKey, EventBudget, FlowStats, FlowTuple, MAX_POD_SLOTS, NODE_SLOT, PodStats,
};

pub use events::DropEvent;
pub use metrics::register as register_metrics;
pub use snapshot::{DropsReport, FlowCounters};
#[cfg(test)]
pub use snapshot::{PodReport, ReasonCount};

use crate::config::KernelConfig;
use offsets::KernelInfo;
use snapshot::History;

/// The object `agent/build.rs` built from `ebpf/kernel/src/diag` (empty
/// when built with `WAYMARK_EBPF_STUB=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/waymark-diag"));

/// The label of what is not a configured pod.
pub const NODE_LABEL: &str = "node";

/// (program, tracepoint) pairs.
const TRACEPOINTS: [(&str, &str); 4] = [
    ("wm_kfree_skb", "kfree_skb"),
    ("wm_tcp_retransmit", "tcp_retransmit_skb"),
    ("wm_tcp_send_reset", "tcp_send_reset"),
    ("wm_tcp_receive_reset", "tcp_receive_reset"),
];
const TRAFFIC: [(&str, CgroupSkbAttachType); 2] = [
    ("wm_traffic_in", CgroupSkbAttachType::Ingress),
    ("wm_traffic_out", CgroupSkbAttachType::Egress),
];

#[derive(Debug, thiserror::Error)]
pub enum KernelDiagError {
    #[error(
        "this agent was built without eBPF programs (WAYMARK_EBPF_STUB=1); rebuild it with bpf-linker installed"
    )]
    StubObject,
    #[error("cannot read the kernel's BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("cannot load the kernel diagnostics object: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("the kernel diagnostics object has no {kind} {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("cannot {op} map {name}: {source}")]
    Map {
        name: &'static str,
        op: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("{count} pods are configured; the kernel diagnostics count at most {max}")]
    TooManyPods { count: usize, max: u32 },
    #[error("cannot read the agent's own network namespace cookie: {0}")]
    NodeNetns(std::io::Error),
}

/// A pod as the diagnostics know it.
#[derive(Clone, Debug)]
pub struct PodNetns {
    pub name: String,
    pub netns_cookie: u64,
}

/// Whether each program runs, for `/drops` and the log.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProgramState {
    pub program: String,
    /// Tracepoint or cgroup hook.
    pub hook: String,
    /// `attached`, `loaded`, or why not.
    pub state: String,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct KernelDiag {
    ebpf: Mutex<Ebpf>,
    info: KernelInfo,
    config: KernelConfig,
    /// Slot -> label: `node`, then the pods in config order.
    labels: RwLock<Vec<String>>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    pod_stats: PerCpuArray<MapData, PodStats>,
    flows: HashMap<MapData, FlowTuple, FlowStats>,
    budget: PerCpuArray<MapData, EventBudget>,
    pod_slots: Mutex<HashMap<MapData, u64, u32>>,
    ring: Mutex<Option<RingBuf<MapData>>>,
    programs: Mutex<Vec<ProgramState>>,
    links: Mutex<Vec<Link>>,
    history: Mutex<History>,
    events: broadcast::Sender<Arc<DropEvent>>,
    clock: events::Clock,
    /// The reply shortcut's bytes (in) and the request shortcut's (out).
    sockmap: Mutex<Option<SockmapReplies>>,
    sockmap_out: Mutex<Option<SockmapReplies>>,
}

/// Reads the reply bytes the reply shortcut delivered, per netns cookie:
/// the redirect object's running totals (shared by every agent on the
/// node through its pinned map).
pub type SockmapSource = Box<dyn Fn() -> Result<Vec<(u64, u64)>, String> + Send + Sync>;

/// What this agent attributed of the redirect object's reply byte totals.
struct SockmapReplies {
    read: SockmapSource,
    /// Each netns cookie's total when last read.
    last: std::collections::HashMap<u64, u64>,
    /// Bytes attributed to each slot since the source was set.
    by_slot: Vec<u64>,
    /// Whether `last` holds a first reading.
    primed: bool,
}

impl SockmapReplies {
    /// Reads the totals and adds what each pod's grew by since the last
    /// read to its slot. Totals belong to the node, not to this agent: the
    /// first read only sets where this agent starts counting. A total that
    /// went down (its LRU entry was evicted and re-created) counts whole.
    fn update(&mut self, slot_of: impl Fn(u64) -> Option<u32>) -> Result<(), String> {
        let totals = (self.read)()?;
        let first = !self.primed;
        let mut seen = std::collections::HashMap::with_capacity(totals.len());
        for (cookie, total) in totals {
            let before = self.last.get(&cookie).copied();
            seen.insert(cookie, total);
            let grown = match before {
                _ if first => 0,
                Some(b) if total >= b => total - b,
                _ => total,
            };
            if grown == 0 {
                continue;
            }
            if let Some(slot) = slot_of(cookie) {
                let slot = slot as usize;
                if self.by_slot.len() <= slot {
                    self.by_slot.resize(slot + 1, 0);
                }
                self.by_slot[slot] += grown;
            }
        }
        self.last = seen;
        self.primed = true;
        Ok(())
    }
}

enum Link {
    Tracepoint(
        &'static str,
        aya::programs::raw_trace_point::RawTracePointLinkId,
    ),
    Cgroup(&'static str, aya::programs::cgroup_skb::CgroupSkbLinkId),
}

impl KernelDiag {
    /// Reads the kernel's BTF, loads the programs (the verifier runs here)
    /// and writes the offsets. Attaches nothing. A program the kernel
    /// refuses is reported, not fatal; only a kernel without what every
    /// program needs (BTF, network namespace cookies) is an error.
    pub fn load(config: &KernelConfig) -> Result<Self, KernelDiagError> {
        if OBJECT.is_empty() {
            return Err(KernelDiagError::StubObject);
        }
        let info = KernelInfo::resolve(&btf::Btf::vmlinux()?, config.count_unspecified)?;
        if !info.missing_fields.is_empty() {
            tracing::warn!(fields = ?info.missing_fields, "kernel structs lack fields the diagnostics read; some attribution is unavailable");
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| KernelDiagError::Load(Box::new(e)))?;
        let mut programs = Vec::new();
        for (name, tracepoint) in TRACEPOINTS {
            let state = match info.unusable.iter().find(|(tp, _)| *tp == tracepoint) {
                Some((_, why)) => format!("not used: {why}"),
                None => match tracepoint_program(&mut ebpf, name)
                    .and_then(|p| p.load().map_err(|e| refused(name, &e)))
                {
                    Ok(()) => "loaded".into(),
                    Err(e) => e,
                },
            };
            programs.push(ProgramState {
                program: name.into(),
                hook: format!("tracepoint {tracepoint}"),
                state,
            });
        }
        for (name, attach) in TRAFFIC {
            let state = match cgroup_program(&mut ebpf, name)
                .and_then(|p| p.load().map_err(|e| refused(name, &e)))
            {
                Ok(()) => "loaded".into(),
                Err(e) => e,
            };
            programs.push(ProgramState {
                program: name.into(),
                hook: format!("cgroup_skb {}", direction(attach)),
                state,
            });
        }
        for p in programs.iter().filter(|p| p.state != "loaded") {
            tracing::warn!(program = %p.program, hook = %p.hook, "kernel diagnostics program unavailable: {}", p.state);
        }

        let settings = DiagConfig {
            offsets: info.offsets,
            counted_reasons: info.counted,
            events_per_sec: config.events_per_sec,
            events_burst: config.events_burst,
            flags: info.flags,
            offsets_ready: 1,
        };
        Array::<_, DiagConfig>::try_from(map_mut(&mut ebpf, "DIAG_CONFIG")?)
            .and_then(|mut a| a.set(0, settings, 0))
            .map_err(map_error("DIAG_CONFIG", "write"))?;

        let drops = PerCpuHashMap::try_from(take_map(&mut ebpf, "DROPS")?)
            .map_err(map_error("DROPS", "open"))?;
        let pod_stats = PerCpuArray::try_from(take_map(&mut ebpf, "POD_STATS")?)
            .map_err(map_error("POD_STATS", "open"))?;
        let flows =
            HashMap::try_from(take_map(&mut ebpf, "FLOWS")?).map_err(map_error("FLOWS", "open"))?;
        let budget = PerCpuArray::try_from(take_map(&mut ebpf, "EVENT_BUDGET")?)
            .map_err(map_error("EVENT_BUDGET", "open"))?;
        let pod_slots = HashMap::try_from(take_map(&mut ebpf, "POD_SLOTS")?)
            .map_err(map_error("POD_SLOTS", "open"))?;
        let ring = RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)
            .map_err(map_error("EVENTS", "open"))?;
        let (events, _) = broadcast::channel(1024);
        Ok(KernelDiag {
            ebpf: Mutex::new(ebpf),
            info,
            config: config.clone(),
            labels: RwLock::new(vec![NODE_LABEL.into()]),
            drops,
            pod_stats,
            flows,
            budget,
            pod_slots: Mutex::new(pod_slots),
            ring: Mutex::new(Some(ring)),
            programs: Mutex::new(programs),
            links: Mutex::new(Vec::new()),
            history: Mutex::new(History::new(config.history)),
            events,
            clock: events::Clock::now(),
            sockmap: Mutex::new(None),
            sockmap_out: Mutex::new(None),
        })
    }

    /// Tells the kernel which network namespace is which pod: the agent's
    /// own is the node, the pods get slots in config order.
    pub fn set_pods(&self, pods: &[PodNetns]) -> Result<(), KernelDiagError> {
        if pods.len() >= MAX_POD_SLOTS as usize {
            return Err(KernelDiagError::TooManyPods {
                count: pods.len(),
                max: MAX_POD_SLOTS - 1,
            });
        }
        let node_cookie = own_netns_cookie().map_err(KernelDiagError::NodeNetns)?;
        let mut map = self.pod_slots.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(node_cookie, NODE_SLOT, 0)
            .map_err(map_error("POD_SLOTS", "insert"))?;
        let mut labels = vec![NODE_LABEL.to_string()];
        for (i, pod) in pods.iter().enumerate() {
            let slot = i as u32 + 1;
            map.insert(pod.netns_cookie, slot, 0)
                .map_err(map_error("POD_SLOTS", "insert"))?;
            labels.push(pod.name.clone());
        }
        *self.labels.write().unwrap_or_else(|e| e.into_inner()) = labels;
        Ok(())
    }

    /// Names one more pod's network namespace (a pod enrolled while the
    /// agent runs). A pod that had a slot before (same name: re-created, or
    /// its netns found again) keeps it, so its series continue; otherwise it
    /// gets the next free slot.
    pub fn add_pod(&self, pod: &PodNetns) -> Result<(), KernelDiagError> {
        let mut labels = self.labels.write().unwrap_or_else(|e| e.into_inner());
        let slot = match labels.iter().skip(1).position(|l| *l == pod.name) {
            Some(i) => i as u32 + 1,
            None if labels.len() >= MAX_POD_SLOTS as usize => {
                return Err(KernelDiagError::TooManyPods {
                    count: labels.len(),
                    max: MAX_POD_SLOTS - 1,
                });
            }
            None => {
                labels.push(pod.name.clone());
                labels.len() as u32 - 1
            }
        };
        self.pod_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.netns_cookie, slot, 0)
            .map_err(map_error("POD_SLOTS", "insert"))
    }

    /// Forgets a pod's network namespace (the pod is gone): what the kernel
    /// counts there from now on is not attributed to it. Its slot and label
    /// stay, so its counters read the same until the agent restarts.
    pub fn remove_pod(&self, netns_cookie: u64) {
        let _ = self
            .pod_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&netns_cookie);
    }

    /// Attaches the tracepoints, and the traffic counters to `cgroup` (the
    /// pods' cgroup) when there is one. What fails to attach is logged and
    /// reported; the rest runs.
    pub fn attach(&self, cgroup: Option<&Path>) {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut programs = self.programs.lock().unwrap_or_else(|e| e.into_inner());
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (name, tracepoint) in TRACEPOINTS {
            let Some(state) = programs.iter_mut().find(|p| p.program == name) else {
                continue;
            };
            if state.state != "loaded" {
                continue;
            }
            match tracepoint_program(&mut ebpf, name)
                .and_then(|p| p.attach(tracepoint).map_err(|e| e.to_string()))
            {
                Ok(id) => {
                    links.push(Link::Tracepoint(name, id));
                    state.state = "attached".into();
                }
                Err(e) => {
                    tracing::warn!(program = name, tracepoint, error = %e, "cannot attach kernel diagnostics program");
                    state.state = format!("attach failed: {e}");
                }
            }
        }
        let dir = cgroup.map(|c| (c, File::open(c)));
        for (name, attach) in TRAFFIC {
            let Some(state) = programs.iter_mut().find(|p| p.program == name) else {
                continue;
            };
            if state.state != "loaded" {
                continue;
            }
            let result = match &dir {
                None => Err("no redirect.cgroup to attach to".to_string()),
                Some((path, Err(e))) => Err(format!("cannot open {}: {e}", path.display())),
                Some((path, Ok(file))) => cgroup_program(&mut ebpf, name).and_then(|p| {
                    p.attach(file, attach, CgroupAttachMode::Single)
                        .map_err(|e| format!("{}: {e}", path.display()))
                }),
            };
            match result {
                Ok(id) => {
                    links.push(Link::Cgroup(name, id));
                    state.state = "attached".into();
                }
                Err(e) => {
                    tracing::warn!(program = name, error = %e, "cannot attach kernel traffic counter");
                    state.state = format!("not attached: {e}");
                }
            }
        }
        let attached = programs.iter().filter(|p| p.state == "attached").count();
        tracing::info!(
            attached,
            of = programs.len(),
            "kernel diagnostics programs attached"
        );
        drop((programs, links, ebpf));
        self.record_snapshot();
    }

    /// Detaches everything (idempotent; also done on drop).
    pub fn detach(&self) {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for link in links.drain(..).rev() {
            let result = match link {
                Link::Tracepoint(name, id) => tracepoint_program(&mut ebpf, name)
                    .and_then(|p| p.detach(id).map_err(|e| e.to_string())),
                Link::Cgroup(name, id) => cgroup_program(&mut ebpf, name)
                    .and_then(|p| p.detach(id).map_err(|e| e.to_string())),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "detaching a kernel diagnostics program");
            }
        }
        let mut programs = self.programs.lock().unwrap_or_else(|e| e.into_inner());
        for p in programs.iter_mut().filter(|p| p.state == "attached") {
            p.state = "loaded".into();
        }
    }

    /// Whether each program runs.
    pub fn programs(&self) -> Vec<ProgramState> {
        self.programs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The label of a slot.
    fn label(&self, slot: u32) -> String {
        self.labels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot as usize)
            .cloned()
            .unwrap_or_else(|| NODE_LABEL.into())
    }

    fn slot_count(&self) -> u32 {
        self.labels.read().unwrap_or_else(|e| e.into_inner()).len() as u32
    }

    /// What the kernel counted on one TCP connection, seen from either end:
    /// `local` and `peer` as the caller's socket has them. `None` when the
    /// kernel saw nothing notable on it (no entry in the flow map).
    pub fn flow_counters(&self, local: SocketAddr, peer: SocketAddr) -> Option<FlowCounters> {
        let forward = snapshot::flow_key(local, peer);
        let backward = snapshot::flow_key(peer, local);
        let mut total: Option<FlowCounters> = None;
        for key in [forward, backward] {
            if let Ok(stats) = self.flows.get(&key, 0) {
                let t = total.get_or_insert_with(FlowCounters::default);
                t.drops += stats.drops;
                t.retransmits += stats.retransmits;
                t.resets_sent += stats.resets_sent;
                t.resets_received += stats.resets_received;
            }
        }
        total
    }

    /// Subscribes to drop and reset events as the kernel reports them.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DropEvent>> {
        self.events.subscribe()
    }

    /// Keeps a snapshot of the counters for windowed reports.
    pub fn record_snapshot(&self) {
        match self.read_counters() {
            Ok(s) => self
                .history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s),
            Err(e) => tracing::warn!(error = %e, "cannot read the kernel diagnostics counters"),
        }
    }

    /// Every `snapshot_interval`, a snapshot, until `stop`.
    pub async fn keep_history(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.config.snapshot_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.record_snapshot(),
            }
        }
    }

    /// Counters over the last `window` (or as far back as the agent has
    /// snapshots), per pod; `pod` keeps one.
    pub fn report(
        &self,
        node: &str,
        window: std::time::Duration,
        pod: Option<&str>,
    ) -> Result<DropsReport, KernelDiagError> {
        let now = self.read_counters()?;
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let base = history.at_or_before(now.taken, window);
        let mut report = snapshot::report(
            &now,
            base,
            |slot| self.label(slot),
            |r| self.info.drop_reasons.name(r),
        );
        drop(history);
        report.node = node.to_string();
        report.requested_window_secs = window.as_secs_f64();
        if let Some(pod) = pod {
            report.pods.retain(|p| p.pod == pod);
        }
        report.programs = self.programs();
        Ok(report)
    }

    /// Reads every counter now.
    fn read_counters(&self) -> Result<snapshot::Snapshot, KernelDiagError> {
        let slots = self.slot_count();
        let mut drops: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for entry in self.drops.iter() {
            let (key, values) = entry.map_err(map_error("DROPS", "iterate"))?;
            *drops.entry((key.slot, key.reason)).or_default() += values.iter().sum::<u64>();
        }
        let mut stats = Vec::with_capacity(slots as usize);
        for slot in 0..slots {
            let values = self
                .pod_stats
                .get(&slot, 0)
                .map_err(map_error("POD_STATS", "read"))?;
            stats.push(snapshot::sum_stats(values.iter()));
        }
        let budget = self
            .budget
            .get(&0, 0)
            .map_err(map_error("EVENT_BUDGET", "read"))?;
        Ok(snapshot::Snapshot {
            taken: Instant::now(),
            drops,
            stats,
            sockmap_in: self.sockmap_slots(&self.sockmap),
            sockmap_out: self.sockmap_slots(&self.sockmap_out),
            suppressed: budget.iter().map(|b| b.suppressed).sum(),
            lost: budget.iter().map(|b| b.lost).sum(),
        })
    }

    /// Counts the reply shortcut's replies in the pods' bytes in from now
    /// on: `read` gives the redirect object's per-pod totals.
    pub fn count_sockmap_replies(&self, read: SockmapSource) {
        Self::count_sockmap(&self.sockmap, read);
    }

    /// As [`KernelDiag::count_sockmap_replies`], for the request shortcut's
    /// requests in the pods' bytes out.
    pub fn count_sockmap_requests(&self, read: SockmapSource) {
        Self::count_sockmap(&self.sockmap_out, read);
    }

    fn count_sockmap(into: &Mutex<Option<SockmapReplies>>, read: SockmapSource) {
        let mut counts = SockmapReplies {
            read,
            last: Default::default(),
            by_slot: Vec::new(),
            primed: false,
        };
        if let Err(e) = counts.update(|_| None) {
            tracing::warn!(error = %e, "cannot read the socket shortcut's byte counts");
        }
        *into.lock().unwrap_or_else(|e| e.into_inner()) = Some(counts);
    }

    /// One shortcut's bytes per slot, brought up to date.
    fn sockmap_slots(&self, counts: &Mutex<Option<SockmapReplies>>) -> Vec<u64> {
        let mut guard = counts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(counts) = guard.as_mut() else {
            return Vec::new();
        };
        let slots = self.pod_slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = counts.update(|cookie| slots.get(&cookie, 0).ok()) {
            tracing::debug!(error = %e, "cannot read the socket shortcut's byte counts");
        }
        counts.by_slot.clone()
    }

    /// Reads the event ring until `stop`, handing events to subscribers.
    /// Runs once: the ring has one reader.
    pub async fn follow_events(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(ring) = self.ring.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        events::pump(ring, &self, stop).await;
    }
}

impl Drop for KernelDiag {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Why the kernel refused a program, short enough for `/drops`: the
/// verifier's last words. The whole log goes to the debug log.
fn refused(program: &str, e: &aya::programs::ProgramError) -> String {
    let full = e.to_string();
    tracing::debug!(program, "kernel refused the program:\n{full}");
    match full.split_once("Verifier output:") {
        Some((head, log)) => {
            let lines: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take_while(|l| !l.starts_with("verification time"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(2)..];
            format!("refused: {} ... {}", head.trim(), tail.join(" / "))
        }
        None => format!("refused: {full}"),
    }
}

fn direction(attach: CgroupSkbAttachType) -> &'static str {
    match attach {
        CgroupSkbAttachType::Ingress => "ingress",
        CgroupSkbAttachType::Egress => "egress",
    }
}

/// The network namespace cookie of the agent's own netns (the node's).
fn own_netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    crate::redirect::netns_cookie(std::os::fd::AsFd::as_fd(&socket))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the object has no program {name}"))
}

fn tracepoint_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut RawTracePoint, String> {
    program(ebpf, name)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

fn cgroup_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut CgroupSkb, String> {
    program(ebpf, name)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, KernelDiagError> {
    ebpf.map_mut(name)
        .ok_or(KernelDiagError::Missing { kind: "map", name })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelDiagError> {
    ebpf.take_map(name)
        .ok_or(KernelDiagError::Missing { kind: "map", name })
}

fn map_error(
    name: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> KernelDiagError {
    move |source| KernelDiagError::Map {
        name,
        op,
        source: Box::new(source),
    }
}

/// Loads the diagnostics if the config wants them; a kernel that refuses
/// them is logged and the agent runs without (`None`).
pub fn load_if_enabled(config: &KernelConfig) -> Option<Arc<KernelDiag>> {
    if !config.enabled {
        tracing::info!("kernel diagnostics disabled (kernel.enabled = false)");
        return None;
    }
    match KernelDiag::load(config) {
        Ok(diag) => Some(Arc::new(diag)),
        Err(e) => {
            tracing::warn!(error = %e, "kernel diagnostics unavailable; proxying without them");
            None
        }
    }
}

impl KernelDiag {
    /// Names the pods' network namespaces, attaches, and starts the event
    /// reader and the snapshot history (both end with `stop`).
    pub fn start(
        self: &Arc<Self>,
        pods: &[PodNetns],
        cgroup: Option<&Path>,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        if let Err(e) = self.set_pods(pods) {
            tracing::warn!(error = %e, "kernel diagnostics not attached");
            return;
        }
        self.attach(cgroup);
        tokio::spawn(self.clone().follow_events(stop.clone()));
        tokio::spawn(self.clone().keep_history(stop.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Reading = Result<Vec<(u64, u64)>, String>;

    /// A source that reads the totals it is given, in turn.
    fn replies(readings: Vec<Reading>) -> SockmapReplies {
        let readings = Mutex::new(readings.into_iter());
        SockmapReplies {
            read: Box::new(move || readings.lock().unwrap().next().expect("no more readings")),
            last: Default::default(),
            by_slot: Vec::new(),
            primed: false,
        }
    }

    #[test]
    fn sockmap_replies_count_what_grew_since_the_agent_started() {
        // Cookie 7 is pod slot 2, cookie 9 is nobody's.
        let slot_of = |c: u64| (c == 7).then_some(2);
        let mut r = replies(vec![
            Ok(vec![(7, 1000), (9, 50)]),
            Ok(vec![(7, 1500), (9, 80)]),
            // The entry was evicted and re-created: all of it is new.
            Ok(vec![(7, 200)]),
            Ok(vec![(7, 200), (8, 10)]),
            Err("map gone".into()),
        ]);
        r.update(|_| None).unwrap();
        assert!(
            r.by_slot.iter().all(|&b| b == 0),
            "an earlier agent's totals are not this one's"
        );
        r.update(slot_of).unwrap();
        assert_eq!(r.by_slot, vec![0, 0, 500]);
        r.update(slot_of).unwrap();
        assert_eq!(r.by_slot, vec![0, 0, 700]);
        r.update(slot_of).unwrap();
        assert_eq!(r.by_slot, vec![0, 0, 700], "unchanged totals add nothing");
        assert!(r.update(slot_of).is_err(), "a failing read is an error");
        assert_eq!(r.by_slot, vec![0, 0, 700], "and keeps what was counted");
    }
}
