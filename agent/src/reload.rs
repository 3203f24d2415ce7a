//! Config reload: on SIGHUP, and when the config file changes on disk.
//!
//! A new config must parse and validate, and its service table must build,
//! before it replaces anything; otherwise the old one stays in force and the
//! failure is logged and counted. The services, balancer, nodes and
//! authorization sections and the pods take effect without a restart; other changes are
//! reported as needing one (the identity *files* are reloaded by
//! `identity::manager` when they change). Open
//! connections are untouched: HTTP requests pick up the new routes on
//! their next request.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::discovery::{Discovery, ServiceTable};
use crate::enrollment::Enrollment;
use crate::http::pool::Pool;
use crate::proxy::inbound::authz::InboundAuthz;
use crate::transport::upstream::Upstreams;

/// How often the file's modification time is checked.
const POLL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub struct ReloadMetrics {
    reloads: Family<ResultLabels, Counter>,
    last_success: Gauge,
}

impl ReloadMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = ReloadMetrics {
            reloads: Family::default(),
            last_success: Gauge::default(),
        };
        registry.register(
            "waymark_config_reloads",
            "Config reload attempts by result (success, failure)",
            m.reloads.clone(),
        );
        registry.register(
            "waymark_config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (Unix time)",
            m.last_success.clone(),
        );
        m.last_success.set(unix_now());
        m
    }
}

/// The config in force, readable by the admin API.
pub type SharedConfig = Arc<RwLock<Arc<Config>>>;

pub struct Reloader {
    /// The config file; `None` runs on the embedded default (no reload).
    pub path: Option<PathBuf>,
    /// The last good config of the file (or the embedded default): what
    /// the cluster's picture is added to.
    pub base: std::sync::Mutex<Config>,
    /// The cluster's latest picture (Kubernetes discovery on).
    pub cluster: std::sync::Mutex<Option<Arc<crate::kube::Update>>>,
    pub config: SharedConfig,
    pub discovery: Arc<Discovery>,
    pub pool: Arc<Pool>,
    /// The node table of the tunnel client.
    pub upstreams: Arc<Upstreams>,
    /// The inbound authorization rules (mTLS on).
    pub authz: Option<Arc<InboundAuthz>>,
    /// This node's pods, enrolled and removed to match the config.
    pub enrollment: Arc<Enrollment>,
    /// Told when the cluster's first picture is in force.
    pub on_cluster_synced: Box<dyn Fn() + Send + Sync>,
    pub metrics: ReloadMetrics,
    /// Whether the tunnel's TLS secrets were wired to the capture key log at
    /// start (`capture.enabled` and `capture.keylog` then): only a restart
    /// can wire them, so a reload cannot turn key-log captures on.
    pub keylog_wired: bool,
}

impl Reloader {
    /// Runs until `stop`: reloads on SIGHUP or a change of the file, and
    /// applies every new picture of the cluster.
    pub async fn run(
        self,
        mut cluster: Option<watch::Receiver<Option<Arc<crate::kube::Update>>>>,
        stop: CancellationToken,
    ) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot handle SIGHUP; config reload on signal is off");
                None
            }
        };
        let mut seen = self.path.as_deref().and_then(modified);
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                Some(_) = async { hup.as_mut()?.recv().await } => {
                    let Some(path) = &self.path else { continue };
                    info!(path = %path.display(), "SIGHUP: reloading config");
                    seen = modified(path);
                    self.reload();
                }
                _ = tick.tick() => {
                    let Some(path) = &self.path else { continue };
                    let now = modified(path);
                    if now != seen {
                        seen = now;
                        info!(path = %path.display(), "config file changed: reloading");
                        self.reload();
                    }
                }
                Some(update) = async {
                    let rx = cluster.as_mut()?;
                    rx.changed().await.ok()?;
                    let u = rx.borrow_and_update().clone();
                    Some(u)
                } => {
                    let Some(update) = update else { continue };
                    let first = self.cluster.lock().unwrap_or_else(|e| e.into_inner()).replace(update).is_none();
                    if self.apply("kubernetes") && first {
                        (self.on_cluster_synced)();
                    }
                }
            }
        }
    }

    /// The `[capture]` a reload puts in force: every limit is read per
    /// capture request, so the new section applies to the next request
    /// (a running capture keeps the bounds it started with); only turning
    /// key-log captures on needs a restart.
    fn capture_section(&self, new: &Config) -> crate::config::capture::CaptureConfig {
        let mut capture = new.capture.clone();
        if capture.enabled && capture.keylog && !self.keylog_wired {
            warn!(
                section = "capture.keylog",
                "config change needs a restart to take effect; key-log captures stay off"
            );
            capture.keylog = false;
        }
        capture
    }

    /// Reads the file again and applies it; returns whether the new config
    /// is in force.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        match Config::from_file(path) {
            Ok(new) => {
                *self.base.lock().unwrap_or_else(|e| e.into_inner()) = new;
                self.apply("file")
            }
            Err(e) => {
                self.failed(&format!("{}: {e}", path.display()));
                false
            }
        }
    }

    /// The file's config with the cluster's picture added: its services,
    /// nodes and pods come after the file's (a name the file already uses
    /// keeps the file's entry), and its workload table.
    fn effective(&self) -> Config {
        let mut c = self.base.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cluster = self
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(u) = cluster else {
            return c;
        };
        // The file's names, not a scan of the services pushed so far
        // (quadratic in a cluster's thousands).
        let file: std::collections::HashSet<String> =
            c.services.iter().map(|f| f.name.clone()).collect();
        c.services.reserve(u.view.services.len());
        for s in &u.view.services {
            if !file.contains(&s.name) {
                c.services.push(s.clone());
            }
        }
        // Other nodes' tunnels matter only with mTLS (without it there is
        // no tunnel, and validation refuses `[[nodes]]`).
        if c.identity.is_some() {
            for n in &u.view.nodes {
                if !c.nodes.iter().any(|f| f.name == n.name) {
                    c.nodes.push(n.clone());
                }
            }
        }
        for p in &u.pods {
            if !c.pods.iter().any(|f| f.name == p.name) {
                c.pods.push(crate::config::PodConfig {
                    name: p.name.clone(),
                    netns: p.netns.clone(),
                    ips: p.ips.clone(),
                    identity: c.identity.as_ref().and(p.identity.clone()),
                });
            }
        }
        c.authorization
            .rules
            .extend(u.view.authz_rules.iter().cloned());
        c.workloads = u.view.workloads.clone();
        c
    }

    /// Puts the effective config in force (`source` says what changed);
    /// returns whether it is.
    fn apply(&self, source: &str) -> bool {
        let new = self.effective();
        let result = new
            .validate(source)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let old = self.discovery.current();
                let mut table = ServiceTable::build(
                    &new.services_with_local_pods(),
                    new.balancer.to_balance(),
                    Some(&old),
                    Instant::now(),
                )
                .map_err(|e| e.to_string())?;
                table.add_workloads(new.workloads.iter().cloned());
                table.forget_remote_endpoints(&new.node.name);
                Ok(table)
            });
        let table = match result {
            Ok(t) => t,
            Err(e) => {
                self.failed(&format!("{source}: {e}"));
                return false;
            }
        };
        let old = self
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for section in restart_needed(&old, &new) {
            warn!(
                section,
                "config change needs a restart to take effect; the running value stays"
            );
        }
        let services = table.len();
        let workloads = table.workload_count();
        self.discovery.replace(table);
        let current = self.discovery.current();
        let keep: std::collections::HashSet<_> = current.endpoint_addrs().collect();
        self.pool.retain(|a| keep.contains(a));
        let mut merged = (*old).clone();
        merged.capture = self.capture_section(&new);
        merged.diagnostics = new.diagnostics;
        crate::telemetry::policy::apply(&merged.diagnostics);
        merged.services = new.services;
        merged.balancer = new.balancer;
        merged.nodes = new.nodes;
        merged.authorization = new.authorization;
        merged.pods = new.pods;
        merged.workloads = new.workloads;
        self.upstreams.reload(&merged);
        if let Some(a) = &self.authz {
            a.reload(&merged);
        }
        let not_enrolled = self.enrollment.sync(&merged.pod_specs()).len();
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(merged);
        self.metrics
            .reloads
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        self.metrics.last_success.set(unix_now());
        info!(source, services, workloads, not_enrolled, "config reloaded");
        true
    }

    fn failed(&self, e: &str) {
        self.metrics
            .reloads
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
        error!("config reload rejected; the previous config stays in force: {e}");
    }
}

/// Sections whose changes only a restart applies.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.node != new.node {
        v.push("node");
    }
    if old.admin != new.admin {
        v.push("admin");
    }
    if old.outbound != new.outbound {
        v.push("outbound");
    }
    if old.redirect != new.redirect {
        v.push("redirect");
    }
    if old.runtime != new.runtime {
        v.push("runtime");
    }
    if old.shutdown != new.shutdown {
        v.push("shutdown");
    }
    if old.proxy != new.proxy {
        v.push("proxy");
    }
    if old.limits != new.limits {
        v.push("limits");
    }
    if old.metrics != new.metrics {
        v.push("metrics");
    }
    if old.kernel != new.kernel {
        v.push("kernel");
    }
    if old.identity != new.identity {
        v.push("identity");
    }
    if old.inbound != new.inbound {
        v.push("inbound");
    }
    v
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
