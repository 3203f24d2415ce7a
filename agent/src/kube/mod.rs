//! Discovery from the Kubernetes API server: pods, services,
//! EndpointSlices, nodes and namespaces, watched with kube-rs and turned
//! into the same services, nodes and pods the config file describes (see
//! [`state`]), plus the cluster's workload table.
//!
//! Nothing is published before every watch has listed once: the agent
//! never routes on half a picture. After that a watch that ends, a 410
//! Gone or an API server that is down keeps the last good state while the
//! watcher relists with backoff; every restart is counted and the age of
//! each resource's last sync is a metric, so `waymark check` and alerts can
//! say the picture is getting old.

pub mod netns;
pub mod policy;
pub mod routes;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::kubernetes::KubernetesConfig;
pub use state::{ClusterState, ClusterView, Skipped};

/// The watched resources, in the order `waymark check` lists them. The
/// Gateway API route kinds are optional: a cluster without their CRDs
/// counts as having none (and is asked again with backoff).
pub const RESOURCES: [&str; 8] = [
    "namespaces",
    "nodes",
    "pods",
    "services",
    "endpointslices",
    "httproutes",
    "grpcroutes",
    "authorizationpolicies",
];

/// Changes arriving within this window are applied together: an
/// EndpointSlice scale-up is many events, and one table rebuild is enough.
const SETTLE: Duration = Duration::from_millis(50);

/// A local pod with its network namespace found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPod {
    pub name: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    pub identity: Option<String>,
}

/// What discovery publishes: the cluster view and this node's pods whose
/// namespaces were found.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub view: ClusterView,
    pub pods: Vec<ResolvedPod>,
    /// Local meshed pods not enrolled yet, and why.
    pub pending: Vec<(String, String)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// How each watch is doing, for metrics and `waymark check`.
#[derive(Default)]
pub struct Status {
    inner: Mutex<HashMap<&'static str, WatchStatus>>,
    last_sync: Family<ResourceLabels, Gauge>,
    restarts: Family<ResourceLabels, Counter>,
    skipped: Family<KindLabels, Gauge>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchStatus {
    /// Whether the first full list arrived.
    pub synced: bool,
    /// Unix time of the last list or event received.
    pub last_sync_unix: Option<u64>,
    /// Times the watch failed and was started again.
    pub restarts: u64,
    pub last_error: Option<String>,
    pub objects: usize,
}

/// For `waymark check`: the watches, what was skipped, pods waiting.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub watches: Vec<(String, WatchStatus)>,
    pub skipped: Vec<SkippedReport>,
    pub pending_pods: Vec<(String, String)>,
    pub services: usize,
    pub workloads: usize,
    pub nodes: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SkippedReport {
    pub kind: String,
    pub name: String,
    pub reason: String,
}

impl Status {
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let s = Self::default();
        registry.register(
            "waymark_discovery_last_sync_seconds",
            "Unix time of the last list or event received from the API server, by resource",
            s.last_sync.clone(),
        );
        registry.register(
            "waymark_discovery_watch_restarts",
            "Watches of the API server that failed and were started again, by resource",
            s.restarts.clone(),
        );
        registry.register(
            "waymark_discovery_skipped_objects",
            "Cluster objects skipped as unusable, by kind (see waymark check)",
            s.skipped.clone(),
        );
        Arc::new(s)
    }

    fn touch(&self, resource: &'static str, synced: bool, objects: usize) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        self.last_sync
            .get_or_create(&ResourceLabels { resource })
            .set(now as i64);
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let w = m.entry(resource).or_default();
        w.synced |= synced;
        w.last_sync_unix = Some(now);
        w.objects = objects;
    }

    fn failed(&self, resource: &'static str, error: String) {
        self.restarts
            .get_or_create(&ResourceLabels { resource })
            .inc();
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let w = m.entry(resource).or_default();
        w.restarts += 1;
        w.last_error = Some(error);
    }

    fn is_synced(&self, resource: &'static str) -> bool {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.get(resource).is_some_and(|w| w.synced)
    }

    fn all_synced(&self) -> bool {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        RESOURCES.iter().all(|r| m.get(r).is_some_and(|w| w.synced))
    }

    pub fn watches(&self) -> Vec<(String, WatchStatus)> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        RESOURCES
            .iter()
            .map(|r| (r.to_string(), m.get(r).cloned().unwrap_or_default()))
            .collect()
    }

    fn set_skipped(&self, skipped: &[Skipped]) {
        for kind in [
            "service",
            "endpointslice",
            "node",
            "pod",
            "namespace",
            "httproute",
            "grpcroute",
            "authorizationpolicy",
        ] {
            let n = skipped.iter().filter(|s| s.kind == kind).count();
            self.skipped
                .get_or_create(&KindLabels { kind })
                .set(n as i64);
        }
    }
}

/// What `waymark check` shows of discovery: the watches' state and the
/// latest published picture.
pub fn report(status: &Status, latest: Option<&Update>) -> Report {
    let mut r = Report {
        watches: status.watches(),
        ..Default::default()
    };
    if let Some(u) = latest {
        r.skipped = u
            .view
            .skipped
            .iter()
            .map(|s| SkippedReport {
                kind: s.kind.to_string(),
                name: s.name.clone(),
                reason: s.reason.clone(),
            })
            .collect();
        r.pending_pods = u.pending.clone();
        r.services = u.view.services.len();
        r.workloads = u.view.workloads.len();
        r.nodes = u.view.nodes.len();
    }
    r
}

/// Builds a client from `kubernetes.kubeconfig`, else in-cluster config.
pub async fn client(cfg: &KubernetesConfig) -> anyhow::Result<kube::Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("cannot use kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "no in-cluster credentials (KUBERNETES_SERVICE_HOST, the service account token); give --kubeconfig outside a cluster",
        )?,
    };
    kube::Client::try_from(config).context("cannot build the Kubernetes client")
}

/// A watched kind: how its objects go into and out of [`ClusterState`].
trait Kind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const RESOURCE: &'static str;
    /// A kind whose CRD may not be installed: a 404 on listing means "none".
    const OPTIONAL: bool = false;
    /// Stores the object (or says why it was skipped).
    fn store(&self, key: String, state: &mut ClusterState, ctx: &Ctx) -> Result<(), String>;
    fn forget(key: &str, state: &mut ClusterState);
    /// How many objects of this kind are held.
    fn count(state: &ClusterState) -> usize;
    /// Keeps the objects whose key `keep` accepts (a relist drops what
    /// vanished while the watch was down).
    fn retain(state: &mut ClusterState, keep: &dyn Fn(&str) -> bool);
}

impl Kind for Pod {
    const RESOURCE: &'static str = "pods";
    fn store(&self, key: String, s: &mut ClusterState, ctx: &Ctx) -> Result<(), String> {
        let entry = state::pod_entry(self, &ctx.mesh_label, &ctx.node, &mut s.names);
        s.pods.insert(key.into(), entry);
        Ok(())
    }
    fn forget(key: &str, s: &mut ClusterState) {
        s.pods.remove(key);
    }
    fn count(s: &ClusterState) -> usize {
        s.pods.len()
    }
    fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
        s.pods.retain(|k, _| keep(k))
    }
}

impl Kind for Service {
    const RESOURCE: &'static str = "services";
    fn store(&self, key: String, s: &mut ClusterState, _: &Ctx) -> Result<(), String> {
        match state::service_entry(self) {
            Ok(e) => {
                s.services.insert(key, e);
                Ok(())
            }
            Err(e) => {
                s.services.remove(&key);
                Err(e)
            }
        }
    }
    fn forget(key: &str, s: &mut ClusterState) {
        s.services.remove(key);
    }
    fn count(s: &ClusterState) -> usize {
        s.services.len()
    }
    fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
        s.services.retain(|k, _| keep(k))
    }
}

impl Kind for EndpointSlice {
    const RESOURCE: &'static str = "endpointslices";
    fn store(&self, key: String, s: &mut ClusterState, _: &Ctx) -> Result<(), String> {
        match state::slice_entry(self, &mut s.names) {
            Ok(e) => {
                s.slices.insert(key, e);
                Ok(())
            }
            Err(e) => {
                s.slices.remove(&key);
                Err(e)
            }
        }
    }
    fn forget(key: &str, s: &mut ClusterState) {
        s.slices.remove(key);
    }
    fn count(s: &ClusterState) -> usize {
        s.slices.len()
    }
    fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
        s.slices.retain(|k, _| keep(k))
    }
}

impl Kind for Node {
    const RESOURCE: &'static str = "nodes";
    fn store(&self, key: String, s: &mut ClusterState, _: &Ctx) -> Result<(), String> {
        s.nodes.insert(key, state::node_ip(self));
        Ok(())
    }
    fn forget(key: &str, s: &mut ClusterState) {
        s.nodes.remove(key);
    }
    fn count(s: &ClusterState) -> usize {
        s.nodes.len()
    }
    fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
        s.nodes.retain(|k, _| keep(k))
    }
}

impl Kind for Namespace {
    const RESOURCE: &'static str = "namespaces";
    fn store(&self, key: String, s: &mut ClusterState, ctx: &Ctx) -> Result<(), String> {
        s.namespaces
            .insert(key, state::namespace_mesh(self, &ctx.mesh_label));
        Ok(())
    }
    fn forget(key: &str, s: &mut ClusterState) {
        s.namespaces.remove(key);
    }
    fn count(s: &ClusterState) -> usize {
        s.namespaces.len()
    }
    fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
        s.namespaces.retain(|k, _| keep(k))
    }
}

macro_rules! route_kind {
    ($ty:ty, $resource:literal, $field:ident, $grpc:literal) => {
        impl Kind for $ty {
            const RESOURCE: &'static str = $resource;
            const OPTIONAL: bool = true;
            fn store(&self, key: String, s: &mut ClusterState, _: &Ctx) -> Result<(), String> {
                let ns = self.metadata.namespace.as_deref().unwrap_or("default");
                let name = self.metadata.name.as_deref().unwrap_or_default();
                match routes::route_entry(
                    ns,
                    name,
                    &self.spec,
                    self.metadata.annotations.as_ref(),
                    $grpc,
                ) {
                    Ok(e) => {
                        s.$field.insert(key, e);
                        Ok(())
                    }
                    Err(e) => {
                        s.$field.remove(&key);
                        Err(e)
                    }
                }
            }
            fn forget(key: &str, s: &mut ClusterState) {
                s.$field.remove(key);
            }
            fn count(s: &ClusterState) -> usize {
                s.$field.len()
            }
            fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
                s.$field.retain(|k, _| keep(k))
            }
        }
    };
}

route_kind!(routes::HttpRoute, "httproutes", http_routes, false);
route_kind!(routes::GrpcRoute, "grpcroutes", grpc_routes, true);

impl Kind for policy::AuthorizationPolicy {
    const RESOURCE: &'static str = "authorizationpolicies";
    const OPTIONAL: bool = true;
    fn store(&self, key: String, s: &mut ClusterState, _: &Ctx) -> Result<(), String> {
        let ns = self.metadata.namespace.as_deref().unwrap_or("default");
        match policy::policy_entry(ns, &self.spec) {
            Ok(e) => {
                s.policies.insert(key, e);
                Ok(())
            }
            Err(e) => {
                s.policies.remove(&key);
                Err(e)
            }
        }
    }
    fn forget(key: &str, s: &mut ClusterState) {
        s.policies.remove(key);
    }
    fn count(s: &ClusterState) -> usize {
        s.policies.len()
    }
    fn retain(s: &mut ClusterState, keep: &dyn Fn(&str) -> bool) {
        s.policies.retain(|k, _| keep(k))
    }
}

/// What storing an object needs to know of this agent.
pub struct Ctx {
    pub mesh_label: String,
    /// This node's name.
    pub node: String,
}

/// A list the API server answered 404: the resource is not served (its CRD
/// is not installed).
fn not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// The state the watches share, and the objects each skipped.
struct Shared {
    state: Mutex<ClusterState>,
    /// Objects refused at decoding (a malformed Service, an EndpointSlice
    /// without its service label), by resource and key.
    refused: Mutex<HashMap<(&'static str, String), String>>,
    changed: Notify,
    status: Arc<Status>,
    ctx: Ctx,
}

/// Runs discovery until `stop`; the receiver sees `None` until every watch
/// has listed once, then every settled change.
pub fn start(
    client: kube::Client,
    node: String,
    trust_domain: Option<String>,
    cfg: KubernetesConfig,
    status: Arc<Status>,
    stop: CancellationToken,
) -> watch::Receiver<Option<Arc<Update>>> {
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        refused: Mutex::default(),
        changed: Notify::new(),
        status,
        ctx: Ctx {
            mesh_label: cfg.mesh_label.clone(),
            node: node.clone(),
        },
    });
    let (tx, rx) = watch::channel(None);
    spawn_watch::<Namespace>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<Node>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<Pod>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<Service>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<EndpointSlice>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<routes::HttpRoute>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<routes::GrpcRoute>(Api::all(client.clone()), &shared, &stop);
    spawn_watch::<policy::AuthorizationPolicy>(Api::all(client), &shared, &stop);
    tokio::spawn(publish(shared, node, trust_domain, cfg, tx, stop));
    rx
}

fn spawn_watch<K: Kind>(api: Api<K>, shared: &Arc<Shared>, stop: &CancellationToken) {
    let shared = shared.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        // Keys seen since the last (re)list began: what a relist did not
        // return was deleted while the watch was down.
        let mut listing: Option<HashSet<String>> = None;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = stream.next() => e,
            };
            let Some(event) = event else {
                warn!(resource = K::RESOURCE, "watch stream ended");
                return;
            };
            match event {
                Ok(event) => apply::<K>(&shared, event, &mut listing),
                Err(e) if K::OPTIONAL && not_served(&e) => {
                    // Not installed: none of them (asked again with backoff).
                    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    let had = K::count(&st);
                    K::retain(&mut st, &|_| false);
                    drop(st);
                    if !shared.status.is_synced(K::RESOURCE) || had > 0 {
                        info!(
                            resource = K::RESOURCE,
                            "not served by the API server (CRD not installed): none in use"
                        );
                    }
                    shared.status.touch(K::RESOURCE, true, 0);
                    shared.changed.notify_one();
                }
                Err(e) => {
                    warn!(resource = K::RESOURCE, error = %e, "watch failed; keeping the last state and relisting");
                    shared.status.failed(K::RESOURCE, e.to_string());
                }
            }
        }
    });
}

fn apply<K: Kind>(
    shared: &Shared,
    event: watcher::Event<K>,
    listing: &mut Option<HashSet<String>>,
) {
    let key_of = |o: &K| state::key(o.meta().namespace.as_deref(), o.meta().name.as_deref());
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut refused = shared.refused.lock().unwrap_or_else(|e| e.into_inner());
    let mut store = |o: &K, st: &mut ClusterState| {
        let key = key_of(o);
        match o.store(key.clone(), st, &shared.ctx) {
            Ok(()) => {
                refused.remove(&(K::RESOURCE, key));
            }
            Err(reason) => {
                warn!(resource = K::RESOURCE, object = %key, %reason, "object skipped");
                refused.insert((K::RESOURCE, key), reason);
            }
        }
    };
    let synced = match event {
        watcher::Event::Init => {
            *listing = Some(HashSet::new());
            return;
        }
        watcher::Event::InitApply(o) => {
            if let Some(l) = listing.as_mut() {
                l.insert(key_of(&o));
            }
            store(&o, &mut st);
            return;
        }
        watcher::Event::InitDone => {
            if let Some(seen) = listing.take() {
                K::retain(&mut st, &|key| seen.contains(key));
                refused.retain(|(r, k), _| *r != K::RESOURCE || seen.contains(k));
            }
            st.names.prune();
            debug!(resource = K::RESOURCE, objects = K::count(&st), "listed");
            true
        }
        watcher::Event::Apply(o) => {
            store(&o, &mut st);
            false
        }
        watcher::Event::Delete(o) => {
            let key = key_of(&o);
            K::forget(&key, &mut st);
            refused.remove(&(K::RESOURCE, key));
            false
        }
    };
    let objects = K::count(&st);
    drop(refused);
    drop(st);
    shared.status.touch(K::RESOURCE, synced, objects);
    shared.changed.notify_one();
}

/// Publishes settled changes once every watch has listed, and retries
/// local pods whose network namespace is not found yet.
async fn publish(
    shared: Arc<Shared>,
    node: String,
    trust_domain: Option<String>,
    cfg: KubernetesConfig,
    tx: watch::Sender<Option<Arc<Update>>>,
    stop: CancellationToken,
) {
    // Found namespaces by pod UID, so a pod keeps the one it was enrolled
    // with (its path names a pid that may exit; the listener holds the
    // namespace itself).
    let mut found: HashMap<String, PathBuf> = HashMap::new();
    let mut retry = tokio::time::interval(cfg.netns_retry);
    let mut announced = false;
    // Local pods still without a network namespace: only then does the
    // retry tick rebuild the picture (a rebuild is O(cluster)).
    let mut waiting = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.changed.notified() => tokio::time::sleep(SETTLE).await,
            _ = retry.tick() => {
                if !waiting {
                    continue;
                }
            }
        }
        if !shared.status.all_synced() {
            continue;
        }
        let previous = tx.borrow().clone();
        let mut view = {
            let st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.view(
                &node,
                trust_domain.as_deref(),
                cfg.tunnel_port,
                previous.as_deref().map(|u| &u.view),
            )
        };
        drop(previous);
        for ((resource, key), reason) in shared
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            view.skipped.push(Skipped {
                kind: match *resource {
                    "httproutes" => "httproute",
                    "authorizationpolicies" => "authorizationpolicy",
                    "grpcroutes" => "grpcroute",
                    "services" => "service",
                    "endpointslices" => "endpointslice",
                    "nodes" => "node",
                    "namespaces" => "namespace",
                    _ => "pod",
                },
                name: key.clone(),
                reason: reason.clone(),
            });
        }
        view.skipped.sort();
        shared.status.set_skipped(&view.skipped);
        let uids: HashSet<&str> = view.local_pods.iter().map(|p| p.uid.as_str()).collect();
        found.retain(|uid, _| uids.contains(uid.as_str()));
        let mut pods = Vec::new();
        let mut pending = Vec::new();
        for p in &view.local_pods {
            let netns = match found.get(&p.uid) {
                Some(path) => path.clone(),
                None => {
                    let (proc, uid, ips) = (cfg.proc.clone(), p.uid.clone(), p.ips.clone());
                    let r = tokio::task::spawn_blocking(move || netns::find(&proc, &uid, &ips))
                        .await
                        .unwrap_or_else(|e| {
                            Err(netns::NetnsError::Proc {
                                path: cfg.proc.clone(),
                                error: e.to_string(),
                            })
                        });
                    match r {
                        Ok(path) => {
                            info!(pod = %p.name, uid = %p.uid, netns = %path.display(), "pod network namespace found");
                            found.insert(p.uid.clone(), path.clone());
                            path
                        }
                        Err(e) => {
                            debug!(pod = %p.name, error = %e, "pod not enrolled yet");
                            pending.push((p.name.clone(), e.to_string()));
                            continue;
                        }
                    }
                }
            };
            pods.push(ResolvedPod {
                name: p.name.clone(),
                netns,
                ips: p.ips.clone(),
                identity: p.identity.clone(),
            });
        }
        waiting = !pending.is_empty();
        let update = Update {
            view,
            pods,
            pending,
        };
        let changed = tx.borrow().as_deref() != Some(&update);
        if changed {
            if !announced {
                info!(
                    services = update.view.services.len(),
                    workloads = update.view.workloads.len(),
                    nodes = update.view.nodes.len(),
                    local_pods = update.pods.len(),
                    "first full picture of the cluster"
                );
                announced = true;
            }
            let _ = tx.send(Some(Arc::new(update)));
        }
    }
}
