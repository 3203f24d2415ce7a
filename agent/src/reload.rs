//! Config reload: on SIGHUP, and when the config file changes on disk.
//!
//! A new config must parse and validate, and its service table must build,
//! before it replaces anything; otherwise the old one stays in force and the
//! failure is logged and counted. The services, balancer, nodes and
//! authorization sections take effect without a restart; other changes are
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
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::discovery::{Discovery, ServiceTable};
use crate::proxy::inbound::authz::InboundAuthz;
use crate::transport::http_pool::Pool;
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
    pub path: PathBuf,
    pub config: SharedConfig,
    pub discovery: Arc<Discovery>,
    pub pool: Arc<Pool>,
    /// The node table of the tunnel client.
    pub upstreams: Arc<Upstreams>,
    /// The inbound authorization rules (mTLS on).
    pub authz: Option<Arc<InboundAuthz>>,
    pub metrics: ReloadMetrics,
    /// Whether the tunnel's TLS secrets were wired to the capture key log at
    /// start (`capture.enabled` and `capture.keylog` then): only a restart
    /// can wire them, so a reload cannot turn key-log captures on.
    pub keylog_wired: bool,
}

impl Reloader {
    /// Runs until `stop`: reloads on SIGHUP or a change of the file.
    pub async fn run(self, stop: CancellationToken) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot handle SIGHUP; config reload on signal is off");
                return;
            }
        };
        let mut seen = modified(&self.path);
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = hup.recv() => {
                    info!(path = %self.path.display(), "SIGHUP: reloading config");
                    seen = modified(&self.path);
                    self.reload();
                }
                _ = tick.tick() => {
                    let now = modified(&self.path);
                    if now != seen {
                        seen = now;
                        info!(path = %self.path.display(), "config file changed: reloading");
                        self.reload();
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

    /// One reload attempt; returns whether the new config is in force.
    pub fn reload(&self) -> bool {
        let result = Config::from_file(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                let old = self.discovery.current();
                let table = ServiceTable::build(
                    &new.services_with_local_pods(),
                    new.balancer.to_balance(),
                    Some(&old),
                    Instant::now(),
                )
                .map_err(|e| e.to_string())?;
                Ok((new, table))
            });
        match result {
            Ok((new, table)) => {
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
                self.discovery.replace(table);
                let current = self.discovery.current();
                let keep: std::collections::HashSet<_> = current.endpoint_addrs().collect();
                self.pool.retain(|a| keep.contains(a));
                let mut merged = (*old).clone();
                merged.capture = self.capture_section(&new);
                merged.diagnostics = new.diagnostics;
                crate::diagnostics::policy::apply(&merged.diagnostics);
                merged.services = new.services;
                merged.balancer = new.balancer;
                merged.nodes = new.nodes;
                merged.authorization = new.authorization;
                self.upstreams.reload(&merged);
                if let Some(a) = &self.authz {
                    a.reload(&merged);
                }
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(merged);
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                self.metrics.last_success.set(unix_now());
                info!(services, "config reloaded");
                true
            }
            Err(e) => {
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabels { result: "failure" })
                    .inc();
                error!(path = %self.path.display(), "config reload rejected; the previous config stays in force: {e}");
                false
            }
        }
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
    if old.pods != new.pods {
        v.push("pods");
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
