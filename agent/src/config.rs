//! The agent's configuration: typed, with defaults that run on a plain Linux
//! host, parsed from TOML and then validated as a whole.
//!
//! Validation reports every problem at once (an operator fixing a config file
//! should not have to play whack-a-mole), and each message names the field
//! path and what is wrong with it. A config that fails validation is never
//! applied.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub mod admin;
pub mod capture;
pub mod kernel;
pub mod kubernetes;
pub mod limits;
pub mod mesh;
pub mod services;
pub use admin::{AdminConfig, DEFAULT_ADMIN_LISTEN, DEFAULT_ADMIN_SOCKET};
pub use capture::CaptureConfig;
pub use kernel::KernelConfig;
pub use limits::LimitsConfig;
pub use mesh::{AuthorizationConfig, IdentityConfig, InboundConfig, NodeEntry};
use serde::{Deserialize, Serialize};
pub use services::{BalancerConfig, ProxyConfig, ServiceConfig};

/// The configuration the agent runs with when no `--config` is given: admin
/// on loopback, programs loaded (so the kernel's support is checked) but not
/// attached to any cgroup, no pods.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// Default connect timeout towards the original destination.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default drain grace period after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Default cap on distinct destination label values in metrics.
pub const DEFAULT_MAX_METRIC_DESTINATIONS: usize = 1024;
/// Default cap on the edges `waymark stat` keeps windows for.
pub const DEFAULT_MAX_STAT_EDGES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin} is not valid TOML for waymark: {message}")]
    Parse { origin: String, message: String },
    #[error("config {origin} has {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub redirect: RedirectConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// L7 proxy settings (protocol detection, retry buffering).
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Streams, idle connections and handshakes one pod or peer may hold.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Per-request load balancing and failure accrual.
    #[serde(default)]
    pub balancer: BalancerConfig,
    /// Packet capture on demand (admin API `POST /capture`).
    #[serde(default)]
    pub capture: CaptureConfig,
    /// Kernel diagnostics: drops, retransmits, resets, traffic per pod.
    #[serde(default)]
    pub kernel: KernelConfig,
    /// What the data path's diagnostics may show or add.
    #[serde(default)]
    pub diagnostics: DiagnosticsConfig,
    /// Services the agent routes to; destinations that are no service's
    /// address are forwarded as plain TCP to where they were dialled.
    /// Each behind an `Arc`: discovery's picture, the config in force and
    /// a reload's candidate share the entries of a cluster's thousands of
    /// services instead of copying them.
    #[serde(default, with = "services::shared::vec")]
    pub services: Vec<Arc<ServiceConfig>>,
    /// The pods on this node whose connections the agent proxies.
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    /// Node-to-node mTLS: trust bundle, issuer and leaf lifetime. mTLS is
    /// off without this section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// The inbound tunnel listener (used when `[identity]` is set).
    #[serde(default)]
    pub inbound: InboundConfig,
    /// The other nodes' agents: tunnel address and identity, by node name
    /// (the `node` of service endpoints).
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    /// Which source identities may reach this node's pods.
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Discovery from the Kubernetes API server: pods, services, nodes.
    #[serde(default)]
    pub kubernetes: kubernetes::KubernetesConfig,
    /// Meshed pods of the cluster by address (from discovery, never from
    /// the file), shared with discovery's picture.
    #[serde(skip)]
    pub workloads: Arc<[(std::net::IpAddr, Arc<crate::discovery::Workload>)]>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node as shown in logs, metrics and diagnostics, and the
    /// `spec.nodeName` Kubernetes discovery looks for; defaults to
    /// `$NODE_NAME` (a DaemonSet sets it from the downward API: the node
    /// name need not be the host name), else the host name.
    #[serde(default = "default_node_name")]
    pub name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: default_node_name(),
        }
    }
}

fn default_node_name() -> String {
    if let Some(n) = std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
    {
        return n;
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Port of the listener the agent binds on `127.0.0.1` and `::1` inside
    /// every pod's network namespace; redirected connections land there.
    #[serde(default = "default_outbound_port")]
    pub port: u16,
    /// How long to wait for the original destination to accept before the
    /// client's connection is reset.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Which network namespace a pod's direct upstream connections are
    /// made in: the pod's own (the default), so the kernel, the CNI and
    /// NetworkPolicy see the pod and the agent never reaches what the pod
    /// could not; or the node's, as before (`transport::netns`).
    #[serde(default)]
    pub dial_from: DialFrom,
    /// Connections one pod may have through the agent at once; more are
    /// reset at accept (`waymark_outbound_refused_total`), so one pod
    /// cannot take the node's proxy from the others. 0: no limit. Unset:
    /// half of `max_connections`, at most 16,384, so that one pod can
    /// never hold what the others need.
    #[serde(default)]
    pub max_connections_per_pod: Option<usize>,
    /// Connections of all pods at once. 0 (the default): half of the
    /// agent's open-files limit less 1,024 kept for listeners, the tunnel
    /// and the admin API, read at start. Half, because a proxied
    /// connection holds two descriptors (the pod's side and the upstream):
    /// a bound counted in connections but paid in descriptors would let
    /// the agent run out of descriptors first, and then every pod's new
    /// connections wait, not only the greedy pod's.
    #[serde(default)]
    pub max_connections: usize,
    /// Connections one pod may open per second through the agent in the
    /// long run (a token bucket per pod; `proxy::outbound::accept_rate`).
    /// Beyond it the pod's accept loop waits, so its new connections queue
    /// in the kernel's accept queue of its own listener and are accepted
    /// later, delayed, not refused; other pods do not notice. Counted in
    /// `waymark_limit_delayed_total{pod,limit="accept_rate"}`. 0: no limit.
    #[serde(default = "default_accept_rate_per_pod")]
    pub accept_rate_per_pod: u32,
    /// Connections a pod may open at once, beyond the rate, after a quiet
    /// while: the bucket's size.
    #[serde(default = "default_accept_burst_per_pod")]
    pub accept_burst_per_pod: u32,
}

fn default_accept_rate_per_pod() -> u32 {
    DEFAULT_ACCEPT_RATE_PER_POD
}

fn default_accept_burst_per_pod() -> u32 {
    DEFAULT_ACCEPT_BURST_PER_POD
}

/// New connections per second and pod: far above what a pooled client
/// opens, and what a pod without connection reuse doing 1,000 requests per
/// second needs. Taking one connection costs the agent 90–140 µs of CPU
/// (`cargo xtask bench-noisy`, release: the original destination, a task,
/// an upstream connect made in the pod's namespace), so one pod at the rate
/// takes at most about an eighth of a core from the others.
pub const DEFAULT_ACCEPT_RATE_PER_POD: u32 = 1_000;
/// A pod starting up (a pool warming, a fan-out) opens this many at once
/// without waiting: about 25 ms of the agent's CPU.
pub const DEFAULT_ACCEPT_BURST_PER_POD: u32 = 200;

/// What the diagnostics on the data path may show or add; applied at start
/// and on every reload (`telemetry::policy`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// `waymark tap` shows query strings with their values replaced by
    /// `<redacted>` (keys kept): query values carry tokens and personal data
    /// as often as headers do. `false` shows them as sent.
    #[serde(default = "yes")]
    pub tap_redact_query: bool,
    /// Whether a request's `l5d-add-context: true` (or TRACE) gets the
    /// agent's routing context appended: `allow` (Linkerd's behaviour, the
    /// default) or `deny`, where such requests are forwarded like any other.
    #[serde(default)]
    pub trace_context: TraceContext,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        Self {
            tap_redact_query: true,
            trace_context: TraceContext::default(),
        }
    }
}

fn yes() -> bool {
    true
}

/// See [`DiagnosticsConfig::trace_context`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TraceContext {
    #[default]
    Allow,
    Deny,
}

/// See [`OutboundConfig::dial_from`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DialFrom {
    #[default]
    Pod,
    Node,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            port: default_outbound_port(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            dial_from: DialFrom::default(),
            max_connections_per_pod: None,
            max_connections: 0,
            accept_rate_per_pod: DEFAULT_ACCEPT_RATE_PER_POD,
            accept_burst_per_pod: DEFAULT_ACCEPT_BURST_PER_POD,
        }
    }
}

fn default_outbound_port() -> u16 {
    waymark_common::DEFAULT_OUTBOUND_PORT
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The cgroup v2 directory holding this node's pods. The redirection
    /// programs are attached there and act on every process below it. When
    /// unset the programs are loaded (checking the kernel) but not attached.
    /// A relative path is taken relative to the cgroup2 mount point.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Destinations that are never redirected. Loopback is always excluded.
    #[serde(default)]
    pub exclude: Vec<ExcludeConfig>,
    /// Link-local destinations (`169.254.0.0/16`, `fe80::/10`: the cloud
    /// metadata service, node-local caches) are not redirected unless this
    /// is set: the pod reaches them as itself, or not at all, and the agent
    /// never dials them on its behalf.
    #[serde(default)]
    pub proxy_link_local: bool,
    /// The bpffs directory where the redirect's maps and links are pinned,
    /// so they outlive the agent: a new agent adopts them (a restart or a
    /// rollout never detaches the kernel side, and both agents share the
    /// original-destination maps). Each agent on a machine needs its own.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// What enrolled pods' connections do while no agent runs.
    #[serde(default)]
    pub on_agent_down: OnAgentDown,
    /// The agent's replies to a pod's application go from the agent's
    /// socket straight into the application's (a sockmap, as in Cilium's
    /// and Merbridge's socket acceleration) instead of down and up the
    /// pod's loopback TCP stack. The bytes and what the application sees of
    /// its socket are the same, and the agent spends ~2.5 µs less per
    /// request on one hop (bench/README.md, "The reply shortcut"). The
    /// replies are then not packets: the kernel diagnostics count them in
    /// the pod's bytes in all the same (`waymark_kernel_sockmap_bytes`), and
    /// a pod capture takes the pod's connections off the shortcut while it
    /// runs, so it sees every reply. Off: every reply is a loopback packet.
    #[serde(default = "default_true")]
    pub reply_shortcut: bool,
    /// Bytes the agent may send a client on the reply shortcut without the
    /// client sending any; past it the connection's replies take loopback
    /// TCP for good. Socket to socket there is no flow control: a client
    /// that stops reading would otherwise have a whole download queued in
    /// its socket. In request/response traffic the client sends between
    /// replies, so only a reply (or a run of replies) larger than this
    /// leaves the shortcut. Comparable to what TCP would buffer (a receive
    /// window plus a send buffer).
    #[serde(default = "default_reply_shortcut_max_unanswered")]
    pub reply_shortcut_max_unanswered: u64,
    /// A pod application's requests go socket to socket into the agent's
    /// accepted socket too, so the pod's loopback leg carries no TCP at
    /// all. Needs `reply_shortcut` and an agent in a cgroup of its own (not
    /// the root cgroup): a `sock_ops` program attached to the agent's
    /// cgroup files its accepted sockets the moment their handshake
    /// completes. Where that is not so the agent says why and the requests
    /// take loopback TCP. A pod capture puts the pod's requests back on
    /// packets too; the kernel diagnostics count them in bytes out.
    #[serde(default)]
    pub request_shortcut: bool,
    /// Request bytes the kernel may queue in the agent's socket beyond what
    /// the agent has read; past it the connection's requests take loopback
    /// TCP (and its window) for good. What TCP would have held back: a
    /// pod sending faster than its upstream takes is held at this.
    #[serde(default = "default_reply_shortcut_max_unanswered")]
    pub request_shortcut_max_unread: u64,
}

/// 4 MiB.
pub const DEFAULT_REPLY_SHORTCUT_MAX_UNANSWERED: u64 = 4 << 20;

fn default_reply_shortcut_max_unanswered() -> u64 {
    DEFAULT_REPLY_SHORTCUT_MAX_UNANSWERED
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            exclude: Vec::new(),
            proxy_link_local: false,
            pin_path: default_pin_path(),
            on_agent_down: OnAgentDown::default(),
            reply_shortcut: true,
            reply_shortcut_max_unanswered: DEFAULT_REPLY_SHORTCUT_MAX_UNANSWERED,
            request_shortcut: false,
            request_shortcut_max_unread: DEFAULT_REPLY_SHORTCUT_MAX_UNANSWERED,
        }
    }
}

/// Where the redirect's kernel state is pinned unless configured.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/waymark";

fn default_true() -> bool {
    true
}

fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}

/// `redirect.on_agent_down`: what happens to enrolled pods' connections
/// while no agent serves the node (it crashed, or was stopped without a
/// successor).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnAgentDown {
    /// The programs stay attached (their links are pinned), so connections
    /// are still redirected to the agent's loopback port, where nothing
    /// listens: they are refused at once (ECONNREFUSED). Nothing leaves a
    /// pod in plaintext or unauthorized (Istio's stance, istio#60882).
    #[default]
    Closed,
    /// The programs are detached when the agent exits (their links are the
    /// agent's own), so connections go direct, bypassing the mesh (no mTLS,
    /// no authorization, no metrics) until an agent is back.
    Open,
}

impl OnAgentDown {
    pub fn as_str(self) -> &'static str {
        match self {
            OnAgentDown::Closed => "closed",
            OnAgentDown::Open => "open",
        }
    }
}

/// The link-local networks left to the pods themselves by default.
pub const LINK_LOCAL: [&str; 2] = ["169.254.0.0/16", "fe80::/10"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExcludeConfig {
    /// A CIDR, e.g. `10.0.0.0/24` or `fd00::/64`.
    pub net: IpNet,
    /// Only these destination ports; empty means every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long established connections may keep
    /// running before they are closed.
    #[serde(default = "default_drain_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_grace: DEFAULT_DRAIN_GRACE,
        }
    }
}

fn default_drain_grace() -> Duration {
    DEFAULT_DRAIN_GRACE
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Distinct destination addresses that get their own label value; the
    /// rest are counted under `target_addr="overflow"` so a scan cannot blow
    /// up the metrics' cardinality.
    #[serde(default = "default_max_destinations")]
    pub max_destinations: usize,
    /// Edges (source pod, destination, route) with sliding windows for
    /// `waymark stat`/`routes`/`edges`; traffic of further edges is counted
    /// under `[other]`. Each busy edge costs a few KiB.
    #[serde(default = "default_max_stat_edges")]
    pub max_stat_edges: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_destinations: DEFAULT_MAX_METRIC_DESTINATIONS,
            max_stat_edges: DEFAULT_MAX_STAT_EDGES,
        }
    }
}

fn default_max_destinations() -> usize {
    DEFAULT_MAX_METRIC_DESTINATIONS
}

fn default_max_stat_edges() -> usize {
    DEFAULT_MAX_STAT_EDGES
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the data-path runtime. The admin API always runs on
    /// its own single thread so scrapes never queue behind traffic.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            workers: default_workers(),
        }
    }
}

/// Two workers, like ztunnel: a node proxy shares the node with its pods.
fn default_workers() -> usize {
    DEFAULT_WORKERS
}

/// Default data-path worker threads.
pub const DEFAULT_WORKERS: usize = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    /// `namespace/name`, as Kubernetes would name it.
    pub name: String,
    /// Path of the pod's network namespace (e.g. `/var/run/netns/…`); the
    /// agent binds the pod's outbound listener inside it.
    pub netns: PathBuf,
    /// The pod's addresses, used to name the source of connections.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The pod's workload identity (`spiffe://<td>/ns/<ns>/sa/<sa>`); its
    /// connections to other nodes go through the mTLS tunnel with a leaf
    /// for it. Without one they stay plaintext.
    #[serde(default)]
    pub identity: Option<String>,
}

impl Config {
    /// Parses and validates a config from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The embedded default.
    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_CONFIG, "(embedded default)").expect("embedded default is valid")
    }

    /// Cross-field rules that serde cannot express. Collects every problem.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.node.name.trim().is_empty() {
            problems.push("node.name: must not be empty".to_string());
        }
        admin::validate(&self.admin, &mut problems);
        limits::validate(&self.limits, &mut problems);
        self.kubernetes.validate(&mut problems);
        if self.outbound.port == 0 {
            problems.push("outbound.port: must not be 0".to_string());
        }
        if self.outbound.connect_timeout.is_zero() {
            problems.push("outbound.connect_timeout: must be greater than 0".to_string());
        }
        if self.runtime.workers == 0 || self.runtime.workers > 64 {
            problems.push(format!(
                "runtime.workers: {} is out of range; use 1 to 64",
                self.runtime.workers
            ));
        }
        if self.metrics.max_destinations == 0 {
            problems.push("metrics.max_destinations: must be at least 1".to_string());
        }
        if self.metrics.max_stat_edges == 0 {
            problems.push("metrics.max_stat_edges: must be at least 1".to_string());
        }
        if self.redirect.reply_shortcut_max_unanswered < 64 << 10 {
            problems.push(format!(
                "redirect.reply_shortcut_max_unanswered: {} bytes is less than a TCP window (65536); \
                 to keep replies off the shortcut, set redirect.reply_shortcut = false",
                self.redirect.reply_shortcut_max_unanswered
            ));
        }
        if self.redirect.request_shortcut && !self.redirect.reply_shortcut {
            problems.push(
                "redirect.request_shortcut needs redirect.reply_shortcut = true (the request \
                 shortcut runs on the sockets the reply shortcut files)"
                    .to_string(),
            );
        }
        if self.redirect.request_shortcut_max_unread < 64 << 10 {
            problems.push(format!(
                "redirect.request_shortcut_max_unread: {} bytes is less than a TCP window (65536); \
                 to keep requests off the shortcut, set redirect.request_shortcut = false",
                self.redirect.request_shortcut_max_unread
            ));
        }
        if self.redirect.exclude.len() > waymark_common::MAX_EXCLUDES as usize {
            problems.push(format!(
                "redirect.exclude: {} entries, at most {} are supported",
                self.redirect.exclude.len(),
                waymark_common::MAX_EXCLUDES
            ));
        }
        for (i, ex) in self.redirect.exclude.iter().enumerate() {
            if ex.ports.len() > waymark_common::MAX_EXCLUDE_PORTS {
                problems.push(format!(
                    "redirect.exclude[{i}].ports: {} ports, at most {} per entry are supported (split the entry)",
                    ex.ports.len(),
                    waymark_common::MAX_EXCLUDE_PORTS
                ));
            }
            if ex.ports.contains(&0) {
                problems.push(format!(
                    "redirect.exclude[{i}].ports: port 0 is not a port; leave the list empty to exclude every port"
                ));
            }
            if ex.net != ex.net.trunc() {
                problems.push(format!(
                    "redirect.exclude[{i}].net: {} has host bits set; did you mean {}?",
                    ex.net,
                    ex.net.trunc()
                ));
            }
        }
        for (i, ex) in self.redirect.exclude.iter().enumerate() {
            if self.redirect.exclude[..i].iter().any(|e| e.net == ex.net) {
                problems.push(format!(
                    "redirect.exclude[{i}].net: {} is listed twice; merge the port lists",
                    ex.net
                ));
            }
        }
        if !self.pods.is_empty() && self.redirect.cgroup.is_none() {
            problems.push(
                "redirect.cgroup: pods are declared but no cgroup is set, so their connections would never reach the agent"
                    .to_string(),
            );
        }
        for (i, pod) in self.pods.iter().enumerate() {
            if pod.name.trim().is_empty() {
                problems.push(format!("pods[{i}].name: must not be empty"));
            } else if self.pods[..i].iter().any(|p| p.name == pod.name) {
                problems.push(format!("pods[{i}].name: {:?} is declared twice", pod.name));
            }
            if !pod.netns.is_absolute() {
                problems.push(format!(
                    "pods[{i}].netns: {} must be an absolute path",
                    pod.netns.display()
                ));
            }
            for ip in &pod.ips {
                if let Some((j, other)) = self.pods[..i]
                    .iter()
                    .enumerate()
                    .find(|(_, p)| p.ips.contains(ip))
                {
                    problems.push(format!(
                        "pods[{i}].ips: {ip} is already the address of pods[{j}] ({})",
                        other.name
                    ));
                }
            }
        }
        if self.proxy.detect_timeout.is_zero() {
            problems.push("proxy.detect_timeout: must be greater than 0".to_string());
        }
        if let Err(e) = self.balancer.to_balance().validate() {
            problems.push(format!("balancer: {e}"));
        }
        services::validate(&self.services, &mut problems);
        capture::validate(&self.capture, &mut problems);
        self.kernel.validate(&mut problems);
        mesh::validate(self, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                problems,
            })
        }
    }

    /// Excluded destinations as the redirect programs take them. Loopback is
    /// not listed: the programs never redirect it.
    /// The services with each endpoint that is a pod of this node named by
    /// that pod (from `[[pods]]`), unless the endpoint names one itself, so
    /// tap, traces and `waymark endpoints` say which pod answered.
    ///
    /// Only a service with such an endpoint is copied (copy on write): the
    /// others stay shared with the config.
    pub fn services_with_local_pods(&self) -> Vec<Arc<services::ServiceConfig>> {
        let by_ip: std::collections::HashMap<std::net::IpAddr, Arc<str>> = self
            .pods
            .iter()
            .flat_map(|p| {
                let name: Arc<str> = p.name.as_str().into();
                p.ips.iter().map(move |ip| (*ip, name.clone()))
            })
            .collect();
        let mut out = self.services.clone();
        if by_ip.is_empty() {
            return out;
        }
        for svc in &mut out {
            let unnamed =
                |e: &services::EndpointConfig| e.pod.is_none() && by_ip.contains_key(&e.addr.ip());
            if !svc.endpoints.iter().any(unnamed) {
                continue;
            }
            for endpoint in Arc::make_mut(svc).endpoints.iter_mut() {
                if endpoint.pod.is_none() {
                    endpoint.pod = by_ip.get(&endpoint.addr.ip()).cloned();
                }
            }
        }
        out
    }

    /// The `[[pods]]` as the agent enrolls them (identities were validated
    /// when the config was read).
    pub fn pod_specs(&self) -> Vec<crate::enrollment::PodSpec> {
        self.pods
            .iter()
            .map(|p| crate::enrollment::PodSpec {
                name: p.name.clone(),
                netns: p.netns.clone(),
                ips: p.ips.clone(),
                identity: p.identity.as_deref().and_then(|s| s.parse().ok()),
            })
            .collect()
    }

    /// What the redirect programs leave alone: `redirect.exclude`, and the
    /// link-local networks unless `redirect.proxy_link_local`.
    pub fn excludes(&self) -> Vec<crate::redirect::Exclude> {
        let mut out: Vec<_> = self
            .redirect
            .exclude
            .iter()
            .map(|e| crate::redirect::Exclude {
                net: e.net,
                ports: e.ports.clone(),
            })
            .collect();
        if !self.redirect.proxy_link_local {
            out.extend(LINK_LOCAL.iter().map(|net| crate::redirect::Exclude {
                net: net.parse().expect("constant CIDR"),
                ports: Vec::new(),
            }));
        }
        out
    }
}

#[cfg(test)]
mod tests;
