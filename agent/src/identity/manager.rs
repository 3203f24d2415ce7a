//! Keeps this node's certificates current: mints a leaf for every local
//! identity at start, renews each at half-life, and reloads the trust
//! bundle and issuer when their files change (cert-manager rewrites them in
//! place when it renews the issuer).
//!
//! A failed renewal or reload is logged and counted and the current
//! material stays; the next tick tries again. Readiness reports missing or
//! expired leaves, so a node that cannot keep its certificates is taken out
//! of service instead of failing handshakes silently.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{CertStore, Issuer, IssuerError, SpiffeId, TrustBundle};
use crate::config::IdentityConfig;

/// Tick bounds: often enough for the seconds-long leaves of tests and to
/// notice a rewritten issuer file promptly, rarely enough to cost nothing.
const MIN_TICK: Duration = Duration::from_millis(250);
const MAX_TICK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

struct IdentityMetrics {
    rotations: Family<ResultLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    expiry: Family<IdentityLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

/// Modification time and length of the three files: a rewrite changes one.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// Called with the new trust bundle after a successful reload.
pub type BundleListener = Box<dyn Fn(&TrustBundle) + Send + Sync>;

pub struct IdentityManager {
    files: [PathBuf; 3],
    trust_domain: String,
    lifetime: Duration,
    issuer: RwLock<Arc<Issuer>>,
    store: Arc<CertStore>,
    /// The local identities whose leaves are kept fresh; grows as pods are
    /// enrolled.
    identities: RwLock<Vec<SpiffeId>>,
    stamp: Mutex<Stamp>,
    listeners: Mutex<Vec<BundleListener>>,
    metrics: IdentityMetrics,
}

impl IdentityManager {
    /// Loads the issuer and mints a leaf for every identity; fails if any
    /// of that fails (the agent should not start half-meshed).
    pub fn start(
        config: &IdentityConfig,
        identities: Vec<SpiffeId>,
        registry: &mut Registry,
    ) -> Result<Arc<Self>, super::StoreError> {
        let files = [
            config.trust_bundle.clone(),
            config.issuer_cert.clone(),
            config.issuer_key.clone(),
        ];
        let stamp = stamp(&files);
        let issuer = load(&files, &config.trust_domain, config.leaf_lifetime)?;
        let store = Arc::new(CertStore::new());
        for id in &identities {
            let leaf = store.rotate(&issuer, id)?;
            info!(identity = %id, serial = %leaf.leaf.serial, not_after = %humantime::format_rfc3339_seconds(leaf.leaf.not_after), "certificate issued");
        }
        let metrics = IdentityMetrics {
            rotations: Family::default(),
            reloads: Family::default(),
            expiry: Family::default(),
        };
        registry.register(
            "waymark_identity_cert_rotations",
            "Leaf certificate renewals by result (success, failure)",
            metrics.rotations.clone(),
        );
        registry.register(
            "waymark_identity_issuer_reloads",
            "Reloads of the trust bundle and issuer files by result (success, failure)",
            metrics.reloads.clone(),
        );
        registry.register(
            "waymark_identity_cert_expiry_seconds",
            "Seconds until the current leaf certificate of each local identity expires (negative: expired)",
            metrics.expiry.clone(),
        );
        Ok(Arc::new(Self {
            files,
            trust_domain: config.trust_domain.clone(),
            lifetime: config.leaf_lifetime,
            issuer: RwLock::new(Arc::new(issuer)),
            store,
            identities: RwLock::new(identities),
            stamp: Mutex::new(stamp),
            listeners: Mutex::default(),
            metrics,
        }))
    }

    /// Mints a leaf for `id` unless it has one, and keeps it fresh from
    /// then on: a pod enrolled while the agent runs gets its certificate
    /// before its first connection.
    pub fn ensure(&self, id: &SpiffeId) -> Result<(), super::StoreError> {
        if self
            .identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
        {
            return Ok(());
        }
        let leaf = self.store.rotate(&self.issuer(), id)?;
        info!(identity = %id, serial = %leaf.leaf.serial, not_after = %humantime::format_rfc3339_seconds(leaf.leaf.not_after), "certificate issued");
        let mut ids = self.identities.write().unwrap_or_else(|e| e.into_inner());
        if !ids.contains(id) {
            ids.push(id.clone());
        }
        Ok(())
    }

    pub fn store(&self) -> Arc<CertStore> {
        self.store.clone()
    }

    pub fn bundle(&self) -> TrustBundle {
        self.issuer().bundle().clone()
    }

    /// The current issuer's and trust anchors' validity (read when the
    /// files were last loaded).
    pub fn authorities(&self) -> Vec<super::authority::Authority> {
        self.issuer().authorities().to_vec()
    }

    /// Registers a component that must follow trust bundle changes.
    pub fn on_bundle_change(&self, f: BundleListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
    }

    fn issuer(&self) -> Arc<Issuer> {
        self.issuer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Identities whose leaf is missing or expired (the `/ready` check).
    pub fn unusable(&self, now: SystemTime) -> Vec<SpiffeId> {
        self.identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|id| {
                self.store
                    .current(id)
                    .is_none_or(|c| c.leaf.not_after <= now)
            })
            .cloned()
            .collect()
    }

    /// Refreshes the expiry gauges (called before each scrape).
    pub fn sample(&self, now: SystemTime) {
        self.metrics.expiry.clear();
        for e in self.store.expiries() {
            let secs = match e.not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            };
            self.metrics
                .expiry
                .get_or_create(&IdentityLabels {
                    identity: e.id.to_string(),
                })
                .set(secs);
        }
    }

    /// Renews leaves and watches the files until `stop`. `ready` is called
    /// after each tick with whether every identity has a usable leaf.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, ready: impl Fn(bool)) {
        let tick = (self.lifetime / 20).clamp(MIN_TICK, MAX_TICK);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            self.tick(SystemTime::now());
            let unusable = self.unusable(SystemTime::now());
            if !unusable.is_empty() {
                warn!(identities = ?unusable.iter().map(ToString::to_string).collect::<Vec<_>>(), "no valid certificate for these identities");
            }
            ready(unusable.is_empty());
        }
    }

    /// One round: reload changed files, then renew what is due (everything
    /// after an issuer change, so the new chain is in use at once).
    pub fn tick(&self, now: SystemTime) {
        let reloaded = self.reload_if_changed();
        let issuer = self.issuer();
        // Missing (a first mint failed) and due leaves; all of them after an
        // issuer change.
        let identities = self
            .identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for id in &identities {
            if !reloaded && !self.store.needs_rotation(id, now) {
                continue;
            }
            match self.store.rotate(&issuer, id) {
                Ok(c) => self.renewed(id, &c.leaf.serial),
                Err(e) => {
                    self.count(&self.metrics.rotations, "failure");
                    warn!(identity = %id, error = %e, "certificate renewal failed; the current one stays until it expires");
                }
            }
        }
    }

    fn renewed(&self, id: &SpiffeId, serial: &str) {
        self.count(&self.metrics.rotations, "success");
        debug!(identity = %id, serial, "certificate renewed");
    }

    fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        {
            let mut seen = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match load(&self.files, &self.trust_domain, self.lifetime) {
            Ok(issuer) => {
                let bundle = issuer.bundle().clone();
                *self.issuer.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(issuer);
                for l in self
                    .listeners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                {
                    l(&bundle);
                }
                self.count(&self.metrics.reloads, "success");
                info!(bundle = %self.files[0].display(), issuer = %self.files[1].display(), "trust bundle and issuer reloaded; renewing every certificate");
                true
            }
            Err(e) => {
                // A half-written set (cert-manager writes files one by
                // one) fails here and loads on the next change.
                self.count(&self.metrics.reloads, "failure");
                warn!(error = %e, "identity files changed but do not load; keeping the current issuer");
                false
            }
        }
    }

    fn count(&self, family: &Family<ResultLabels, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabels { result }).inc();
    }
}

fn load(files: &[PathBuf; 3], td: &str, lifetime: Duration) -> Result<Issuer, IssuerError> {
    Ok(Issuer::load(&files[0], &files[1], &files[2], td)?.with_lifetime(lifetime))
}

fn stamp(files: &[PathBuf]) -> Stamp {
    files.iter().map(|p| file_stamp(p)).collect()
}

fn file_stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let md = std::fs::metadata(p).ok()?;
    Some((md.modified().ok()?, md.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::init;

    fn config(dir: &Path, lifetime: Duration) -> IdentityConfig {
        IdentityConfig {
            trust_domain: "cluster.local".into(),
            trust_bundle: dir.join(init::CA_CERT_FILE),
            issuer_cert: dir.join(init::ISSUER_CERT_FILE),
            issuer_key: dir.join(init::ISSUER_KEY_FILE),
            leaf_lifetime: lifetime,
            node_identity: None,
        }
    }

    #[test]
    fn renews_when_due_and_after_the_issuer_changes() {
        let dir = std::env::temp_dir().join(format!(
            "waymark-manager-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        init::run(&dir, "cluster.local", false).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let mut reg = Registry::default();
        let m = IdentityManager::start(
            &config(&dir, Duration::from_secs(10)),
            vec![id.clone()],
            &mut reg,
        )
        .unwrap();
        let first = m.store().current(&id).unwrap().leaf.serial.clone();
        let now = SystemTime::now();
        assert!(m.unusable(now).is_empty());
        m.tick(now);
        assert_eq!(m.store().current(&id).unwrap().leaf.serial, first);
        m.tick(now + Duration::from_secs(6));
        let second = m.store().current(&id).unwrap().leaf.serial.clone();
        assert_ne!(second, first);
        assert_eq!(m.unusable(now + Duration::from_secs(60)), vec![id.clone()]);

        let seen = Arc::new(Mutex::new(0));
        let s = seen.clone();
        m.on_bundle_change(Box::new(move |_| *s.lock().unwrap() += 1));
        // Half-written: the key file of another CA does not match.
        let other = init::DevCa::generate("cluster.local").unwrap();
        std::fs::write(dir.join(init::ISSUER_KEY_FILE), &other.issuer_key).unwrap();
        m.tick(SystemTime::now());
        assert_eq!(*seen.lock().unwrap(), 0);
        assert_eq!(m.store().current(&id).unwrap().leaf.serial, second);
        // Complete: every file of the new CA.
        std::fs::write(dir.join(init::CA_CERT_FILE), &other.ca_cert).unwrap();
        std::fs::write(dir.join(init::ISSUER_CERT_FILE), &other.issuer_cert).unwrap();
        m.tick(SystemTime::now());
        assert_eq!(*seen.lock().unwrap(), 1);
        assert_ne!(m.store().current(&id).unwrap().leaf.serial, second);
        m.sample(SystemTime::now());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("waymark_identity_issuer_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("waymark_identity_cert_expiry_seconds{identity=\"spiffe://cluster.local/ns/a/sa/b\"}"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
