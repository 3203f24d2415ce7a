//! What the agent keeps of the cluster, and how it becomes waymark's own
//! services, nodes, pods and workload table.
//!
//! Only the fields the data path uses are kept (a few hundred bytes a
//! pod), not the API objects: at 20,000 pods whole `Pod` objects would cost
//! hundreds of MiB. Names that repeat across objects (nodes, zones, service
//! accounts) are held once ([`Interner`]), and what the view hands on
//! (pod names, identities, whole services) is behind `Arc`s that the config
//! in force and the service table share rather than copy. The conversion
//! is a pure function of this state, so it is tested without an API
//! server.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::mesh::AuthzRuleConfig;
use crate::config::mesh::NodeEntry;
use crate::config::services::{EndpointConfig, ProtocolHint, ServiceConfig};
use crate::discovery::Workload;
use crate::kube::policy::PolicyEntry;
use crate::kube::routes::{RouteEntry, backend};

/// Annotation and label value that enroll; `disabled` opts a pod out.
pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";

/// A pod, reduced to what waymark uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    /// Kept for this node's pods only (their network namespace is found by
    /// it); empty for the others.
    pub uid: String,
    pub node: Option<Arc<str>>,
    pub ips: Vec<IpAddr>,
    pub service_account: Arc<str>,
    pub host_network: bool,
    pub running: bool,
    /// The pod's own `<mesh label>` annotation, if any.
    pub mesh: Option<String>,
    /// Its labels, kept for this node's pods only (authorization policies
    /// select among them; other nodes' pods need none).
    pub labels: Option<BTreeMap<String, String>>,
}

/// A Service, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// `None` for a headless service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub app_protocol: Option<String>,
}

/// An EndpointSlice, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEntry {
    pub service: String,
    /// Port name → port number on the endpoints.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ips: Vec<IpAddr>,
    pub ready: bool,
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `namespace/name` of the pod behind it.
    pub pod: Option<Arc<str>>,
}

/// One shared copy of each name that many objects repeat: 20,000 pods on
/// 200 nodes name 200 nodes, not 20,000.
#[derive(Debug, Default, Clone)]
pub struct Interner(HashSet<Arc<str>>);

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.0.insert(a.clone());
        a
    }

    /// Forgets the names nothing else holds any more.
    pub fn prune(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
        self.0.shrink_to_fit();
    }
}

/// Everything the watches have seen, by `namespace/name` (nodes and
/// namespaces by name).
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    /// By `namespace/name`, the key shared with the views' endpoints and
    /// workload entries of the pod.
    pub pods: HashMap<Arc<str>, PodEntry>,
    pub services: HashMap<String, ServiceEntry>,
    pub slices: HashMap<String, SliceEntry>,
    /// Node name → InternalIP.
    pub nodes: HashMap<String, Option<IpAddr>>,
    /// Namespace → its `<mesh label>` label value.
    pub namespaces: HashMap<String, Option<String>>,
    /// Gateway API routes with a Service parent, by `namespace/name`.
    pub http_routes: HashMap<String, RouteEntry>,
    pub grpc_routes: HashMap<String, RouteEntry>,
    /// `AuthorizationPolicy` objects by `namespace/name`.
    pub policies: HashMap<String, PolicyEntry>,
    /// Node, zone and service account names of the entries above.
    pub names: Interner,
}

/// What the cluster says, in waymark's terms.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClusterView {
    pub services: Vec<Arc<ServiceConfig>>,
    pub nodes: Vec<NodeEntry>,
    /// This node's meshed pods, by name, with their UID (to find their
    /// network namespace), addresses and identity.
    pub local_pods: Vec<LocalPod>,
    pub workloads: Arc<[(IpAddr, Arc<Workload>)]>,
    /// Authorization rules from `AuthorizationPolicy` objects, for this
    /// node's pods (after the file's own rules).
    pub authz_rules: Vec<AuthzRuleConfig>,
    /// Objects skipped, each with why (logged, counted, shown by check).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub name: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// `service`, `endpointslice`, `node`, `pod`.
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

pub fn key(ns: Option<&str>, name: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("{ns}/{}", name.unwrap_or_default()),
        None => name.unwrap_or_default().to_string(),
    }
}

/// `node`: this node's name (its pods keep their labels and UID).
pub fn pod_entry(p: &Pod, mesh_label: &str, node: &str, names: &mut Interner) -> PodEntry {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()?.parse().ok())
    {
        ips.push(ip);
    }
    ips.shrink_to_fit();
    let local = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
    PodEntry {
        uid: if local {
            p.metadata.uid.clone().unwrap_or_default()
        } else {
            String::new()
        },
        node: spec
            .and_then(|s| s.node_name.as_deref())
            .map(|n| names.get(n)),
        ips,
        service_account: names.get(
            spec.and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default"),
        ),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        running: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
        mesh: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(mesh_label).cloned()),
        labels: local.then(|| p.metadata.labels.clone().unwrap_or_default()),
    }
}

pub fn service_entry(s: &Service) -> Result<ServiceEntry, String> {
    let spec = s.spec.as_ref().ok_or("no spec")?;
    if let Some(t) = spec.type_.as_deref()
        && t == "ExternalName"
    {
        return Err("type ExternalName is not proxied (DNS only)".into());
    }
    let cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter(|ip| ip.as_str() != "None" && !ip.is_empty())
        .map(|ip| {
            ip.parse()
                .map_err(|_| format!("clusterIP {ip:?} is not an address"))
        })
        .collect::<Result<_, _>>()?;
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {} is out of range", p.port))?;
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            app_protocol: p.app_protocol.clone(),
        });
    }
    Ok(ServiceEntry { cluster_ips, ports })
}

pub fn slice_entry(s: &EndpointSlice, names: &mut Interner) -> Result<SliceEntry, String> {
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .ok_or("no kubernetes.io/service-name label")?
        .clone();
    if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
        return Err(format!("addressType {} is not proxied", s.address_type));
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|pr| pr == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port?).ok().filter(|p| *p > 0)?;
            Some((p.name.clone().unwrap_or_default(), port))
        })
        .collect();
    let ns = s.metadata.namespace.as_deref();
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for e in &s.endpoints {
        let ips = e
            .addresses
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| format!("endpoint address {a:?} is not an address"))
            })
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .map(|r| key(r.namespace.as_deref().or(ns), r.name.as_deref()).into());
        endpoints.push(SliceEndpoint {
            ips,
            // Kubernetes: an unset `ready` is to be read as ready.
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            node: e.node_name.as_deref().map(|n| names.get(n)),
            zone: e.zone.as_deref().map(|z| names.get(z)),
            pod,
        });
    }
    Ok(SliceEntry {
        service,
        ports,
        endpoints,
    })
}

pub fn node_ip(n: &Node) -> Option<IpAddr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()
}

pub fn namespace_mesh(n: &Namespace, mesh_label: &str) -> Option<String> {
    n.metadata.labels.as_ref()?.get(mesh_label).cloned()
}

impl ClusterState {
    /// Whether a pod is in the mesh: its own annotation decides, else its
    /// namespace's label; hostNetwork pods never are (they share the node's
    /// network namespace, the agent's own included).
    pub fn is_meshed(&self, key: &str, pod: &PodEntry) -> bool {
        if pod.host_network {
            return false;
        }
        match pod.mesh.as_deref() {
            Some(ENABLED) => true,
            Some(DISABLED) => false,
            _ => {
                let ns = key.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
                self.namespaces.get(ns).and_then(|v| v.as_deref()) == Some(ENABLED)
            }
        }
    }

    /// The view for node `node` in trust domain `td` (`None`: no mTLS, no
    /// identities), with node tunnels on `tunnel_port`. Services and
    /// workloads equal to ones of `previous` are those (the same `Arc`s):
    /// a change to one service leaves the others' entries, and what the
    /// config in force and the service table hold of them, as they were.
    pub fn view(
        &self,
        node: &str,
        td: Option<&str>,
        tunnel_port: u16,
        previous: Option<&ClusterView>,
    ) -> ClusterView {
        let mut view = ClusterView::default();
        let mut ids = Identities {
            td,
            ids: HashMap::new(),
        };
        let mut identity = |ns, sa| ids.get(ns, sa);
        let mut nodes: BTreeMap<&str, IpAddr> = BTreeMap::new();
        for (name, ip) in &self.nodes {
            match ip {
                Some(ip) => {
                    nodes.insert(name, *ip);
                }
                None => view.skipped.push(Skipped {
                    kind: "node",
                    name: name.clone(),
                    reason: "no InternalIP address: its pods are reached directly".into(),
                }),
            }
        }
        view.nodes = nodes
            .iter()
            .map(|(name, ip)| NodeEntry {
                name: name.to_string(),
                tunnel: SocketAddr::new(*ip, tunnel_port),
                identity: None,
            })
            .collect();
        // Meshed pods: the workload table, and this node's pods.
        let mut meshed: HashMap<&str, (&Arc<str>, &PodEntry)> = HashMap::new();
        let mut workloads: Vec<(IpAddr, Arc<Workload>)> = Vec::new();
        for (key, pod) in &self.pods {
            if !self.is_meshed(key, pod) || pod.ips.is_empty() {
                continue;
            }
            let (ns, _) = key.split_once('/').unwrap_or_default();
            let Some(pod_node) = pod.node.as_ref() else {
                continue;
            };
            meshed.insert(key, (key, pod));
            if &**pod_node == node {
                if pod.running {
                    view.local_pods.push(LocalPod {
                        name: key.to_string(),
                        uid: pod.uid.clone(),
                        ips: pod.ips.clone(),
                        identity: identity(ns, &pod.service_account).map(|i| i.to_string()),
                    });
                }
            } else if !nodes.contains_key(&**pod_node) {
                view.skipped.push(Skipped {
                    kind: "pod",
                    name: key.to_string(),
                    reason: format!("on unknown node {pod_node}: reached directly"),
                });
                continue;
            }
            let w = Workload {
                node: pod_node.clone(),
                pod: Some(key.clone()),
                identity: identity(ns, &pod.service_account),
            };
            let w = previous
                .and_then(|p| {
                    let old = &p.workloads;
                    let i = old.binary_search_by_key(&pod.ips[0], |(ip, _)| *ip).ok()?;
                    (*old[i].1 == w).then(|| old[i].1.clone())
                })
                .unwrap_or_else(|| Arc::new(w));
            workloads.extend(pod.ips.iter().map(|ip| (*ip, w.clone())));
        }
        view.local_pods.sort_by(|a, b| a.name.cmp(&b.name));
        // Services: one waymark service per ClusterIP port.
        let mut slices_of: HashMap<&str, Vec<&SliceEntry>> = HashMap::new();
        for (key, slice) in &self.slices {
            let ns = key.split_once('/').map(|(ns, _)| ns).unwrap_or_default();
            slices_of
                .entry(
                    self.services
                        .get_key_value(&format!("{ns}/{}", slice.service))
                        .map_or("", |(k, _)| k.as_str()),
                )
                .or_default()
                .push(slice);
        }
        let mut keys: Vec<&String> = self.services.keys().collect();
        keys.sort();
        let mut services: Vec<ServiceConfig> = Vec::new();
        for key in keys {
            let svc = &self.services[key];
            if svc.cluster_ips.is_empty() {
                // Headless: clients dial the pods' own addresses, which
                // the workload table covers.
                continue;
            }
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let slices = slices_of
                .get(key.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for port in &svc.ports {
                let mut endpoints = Vec::new();
                for slice in slices {
                    let Some(target) = slice
                        .ports
                        .iter()
                        .find(|(n, _)| *n == port.name)
                        .map(|(_, p)| *p)
                    else {
                        continue;
                    };
                    for e in slice.endpoints.iter().filter(|e| e.ready) {
                        let pod = e.pod.as_deref().and_then(|p| meshed.get(p).copied());
                        let node = match (&e.node, pod) {
                            // A meshed pod on a known node: through its
                            // node's tunnel (or local).
                            (Some(n), Some(_)) if &**n == node || nodes.contains_key(&**n) => {
                                Some(n.clone())
                            }
                            (Some(n), Some(_)) => {
                                view.skipped.push(Skipped {
                                    kind: "endpointslice",
                                    name: format!("{ns}/{name}"),
                                    reason: format!(
                                        "endpoint {} is on unknown node {n}: reached directly",
                                        e.ips.first().map(ToString::to_string).unwrap_or_default()
                                    ),
                                });
                                None
                            }
                            _ => None,
                        };
                        let identity = pod.and_then(|(p, entry)| {
                            let (pns, _) = p.split_once('/')?;
                            identity(pns, &entry.service_account)
                        });
                        // The pod's name as the workload table holds it
                        // (one string for both).
                        let pod_name = pod.map(|(p, _)| p.clone()).or_else(|| e.pod.clone());
                        for ip in &e.ips {
                            endpoints.push(EndpointConfig {
                                addr: SocketAddr::new(*ip, target),
                                node: node.clone(),
                                weight: 1,
                                zone: e.zone.clone(),
                                identity: identity.clone(),
                                pod: pod_name.clone(),
                            });
                        }
                    }
                }
                endpoints.sort_by_key(|e| e.addr);
                endpoints.dedup_by_key(|e| e.addr);
                // Built once, held until the next change: no spare room.
                endpoints.shrink_to_fit();
                services.push(ServiceConfig {
                    name: format!("{name}.{ns}:{}", port.port),
                    addresses: svc
                        .cluster_ips
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, port.port))
                        .collect(),
                    protocol: protocol(port.app_protocol.as_deref()),
                    endpoints,
                    routes: Vec::new(),
                    retry_budget: Default::default(),
                });
            }
        }
        self.attach_routes(&mut services, &mut view.skipped);
        let old: HashMap<&str, &Arc<ServiceConfig>> = previous
            .map(|p| p.services.iter().map(|s| (s.name.as_str(), s)).collect())
            .unwrap_or_default();
        view.services = services
            .into_iter()
            .map(|s| match old.get(s.name.as_str()) {
                Some(o) if ***o == s => Arc::clone(o),
                _ => Arc::new(s),
            })
            .collect();
        if let Some(td) = td {
            let local: Vec<(&str, &BTreeMap<String, String>)> = view
                .local_pods
                .iter()
                .filter_map(|p| {
                    Some((
                        p.name.as_str(),
                        self.pods.get(p.name.as_str())?.labels.as_ref()?,
                    ))
                })
                .collect();
            let policies: Vec<(&String, &PolicyEntry)> = self.policies.iter().collect();
            view.authz_rules = crate::kube::policy::rules(&policies, &local, td);
        }
        workloads.sort_by_key(|(ip, _)| *ip);
        view.workloads = workloads.into();
        view.skipped.sort();
        view
    }

    /// Puts each route's rules on the waymark services of its parent
    /// Services (the parent's port, or all its ports). A route whose parent
    /// or backend is missing, or whose rules do not build, is skipped
    /// whole with the reason: routing part of what it says would be worse
    /// than routing none of it.
    fn attach_routes(&self, services: &mut [ServiceConfig], skipped: &mut Vec<Skipped>) {
        let index: HashMap<String, usize> = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let mut all: Vec<(&str, &String, &RouteEntry)> = self
            .http_routes
            .iter()
            .map(|(k, r)| ("httproute", k, r))
            .chain(self.grpc_routes.iter().map(|(k, r)| ("grpcroute", k, r)))
            .collect();
        all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        for (kind, key, route) in all {
            let mut attach: Vec<(usize, crate::config::services::RouteConfig)> = Vec::new();
            let problem = (|| -> Result<(), String> {
                for (parent, port) in &route.parents {
                    let svc = self
                        .services
                        .get(parent)
                        .ok_or_else(|| format!("parent Service {parent} not found"))?;
                    let (ns, name) = parent.split_once('/').unwrap_or_default();
                    let ports: Vec<u16> = svc
                        .ports
                        .iter()
                        .map(|p| p.port)
                        .filter(|p| port.is_none_or(|want| want == *p))
                        .collect();
                    if ports.is_empty() {
                        return Err(format!("parent Service {parent} has no port {port:?}"));
                    }
                    for p in ports {
                        let target = format!("{name}.{ns}:{p}");
                        let i = *index.get(&target).ok_or_else(|| {
                            format!("parent Service {parent} has no cluster IP (headless)")
                        })?;
                        for rule in &route.rules {
                            let mut r = rule.route.clone();
                            r.backends = rule
                                .backends
                                .iter()
                                .map(|(b, bp, w)| backend(b, *bp, p, *w))
                                .collect();
                            if let Some(b) =
                                r.backends.iter().find(|b| !index.contains_key(&b.service))
                            {
                                return Err(format!(
                                    "backend {} is not a Service with a cluster IP",
                                    b.service
                                ));
                            }
                            crate::discovery::check_route(&services[i], &r)?;
                            attach.push((i, r));
                        }
                    }
                }
                Ok(())
            })();
            match problem {
                Ok(()) => {
                    for (i, r) in attach {
                        services[i].routes.push(r);
                    }
                }
                Err(reason) => skipped.push(Skipped {
                    kind: if kind == "httproute" {
                        "httproute"
                    } else {
                        "grpcroute"
                    },
                    name: key.clone(),
                    reason,
                }),
            }
        }
    }
}

/// One identity string per service account, shared by its pods' workload
/// entries and endpoints (`None` without a trust domain).
struct Identities<'a> {
    td: Option<&'a str>,
    ids: HashMap<(&'a str, &'a str), Option<Arc<str>>>,
}

impl<'a> Identities<'a> {
    fn get(&mut self, ns: &'a str, sa: &'a str) -> Option<Arc<str>> {
        let td = self.td?;
        self.ids
            .entry((ns, sa))
            .or_insert_with(|| Some(format!("spiffe://{td}/ns/{ns}/sa/{sa}").into()))
            .clone()
    }
}

/// `appProtocol` as Kubernetes defines it (`kubernetes.io/h2c`, IANA
/// names); anything else is detected.
fn protocol(app: Option<&str>) -> ProtocolHint {
    match app {
        Some("kubernetes.io/h2c") | Some("h2c") => ProtocolHint::Http2,
        Some("grpc") => ProtocolHint::Grpc,
        Some("http") => ProtocolHint::Http1,
        Some("tcp") | Some("kubernetes.io/tcp") => ProtocolHint::Opaque,
        _ => ProtocolHint::Auto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, ip: &str, sa: &str) -> PodEntry {
        PodEntry {
            uid: format!("uid-{ip}"),
            node: Some(node.into()),
            ips: vec![ip.parse().unwrap()],
            service_account: sa.into(),
            host_network: false,
            running: true,
            mesh: None,
            labels: None,
        }
    }

    fn world() -> ClusterState {
        let mut s = ClusterState::default();
        s.namespaces.insert("shop".into(), Some(ENABLED.into()));
        s.namespaces.insert("plain".into(), None);
        s.nodes
            .insert("node0".into(), Some("10.0.0.1".parse().unwrap()));
        s.nodes
            .insert("node1".into(), Some("10.0.0.2".parse().unwrap()));
        s.pods
            .insert("shop/web-a".into(), pod("node0", "10.1.0.2", "web"));
        s.pods
            .insert("shop/web-b".into(), pod("node1", "10.2.0.2", "web"));
        s.pods
            .insert("plain/db".into(), pod("node1", "10.2.0.3", "db"));
        s.services.insert(
            "shop/web".into(),
            ServiceEntry {
                cluster_ips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    app_protocol: None,
                }],
            },
        );
        s.slices.insert(
            "shop/web-abc".into(),
            SliceEntry {
                service: "web".into(),
                ports: vec![("http".into(), 8080)],
                endpoints: vec![
                    SliceEndpoint {
                        ips: vec!["10.1.0.2".parse().unwrap()],
                        ready: true,
                        node: Some("node0".into()),
                        zone: Some("a".into()),
                        pod: Some("shop/web-a".into()),
                    },
                    SliceEndpoint {
                        ips: vec!["10.2.0.2".parse().unwrap()],
                        ready: true,
                        node: Some("node1".into()),
                        zone: Some("b".into()),
                        pod: Some("shop/web-b".into()),
                    },
                    SliceEndpoint {
                        ips: vec!["10.2.0.9".parse().unwrap()],
                        ready: false,
                        node: Some("node1".into()),
                        zone: None,
                        pod: None,
                    },
                ],
            },
        );
        s
    }

    #[test]
    fn services_become_one_per_cluster_ip_port_with_ready_endpoints() {
        let v = world().view("node0", Some("td"), 15008, None);
        assert_eq!(v.services.len(), 1);
        let s = &v.services[0];
        assert_eq!(s.name, "web.shop:80");
        assert_eq!(s.addresses, vec!["10.96.0.10:80".parse().unwrap()]);
        let eps: Vec<String> = s.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(
            eps,
            ["10.1.0.2:8080", "10.2.0.2:8080"],
            "the unready one is left out"
        );
        assert_eq!(s.endpoints[1].node.as_deref(), Some("node1"));
        assert_eq!(s.endpoints[1].zone.as_deref(), Some("b"));
        assert_eq!(
            s.endpoints[1].identity.as_deref(),
            Some("spiffe://td/ns/shop/sa/web")
        );
        assert_eq!(s.endpoints[1].pod.as_deref(), Some("shop/web-b"));
    }

    #[test]
    fn workloads_and_local_pods_follow_the_mesh_label() {
        let mut st = world();
        let v = st.view("node0", Some("td"), 15008, None);
        let ips: Vec<String> = v.workloads.iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(ips, ["10.1.0.2", "10.2.0.2"], "plain/db is not meshed");
        assert_eq!(v.local_pods.len(), 1);
        assert_eq!(v.local_pods[0].name, "shop/web-a");
        assert_eq!(
            v.local_pods[0].identity.as_deref(),
            Some("spiffe://td/ns/shop/sa/web")
        );
        assert_eq!(v.nodes.len(), 2);
        assert_eq!(v.nodes[1].tunnel, "10.0.0.2:15008".parse().unwrap());
        // A pod's own annotation wins over its namespace.
        st.pods.get_mut("plain/db").unwrap().mesh = Some(ENABLED.into());
        st.pods.get_mut("shop/web-a").unwrap().mesh = Some(DISABLED.into());
        let v = st.view("node0", Some("td"), 15008, None);
        let ips: Vec<String> = v.workloads.iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(ips, ["10.2.0.2", "10.2.0.3"]);
        assert!(v.local_pods.is_empty());
        // hostNetwork pods never are.
        st.pods.get_mut("plain/db").unwrap().host_network = true;
        let v = st.view("node0", Some("td"), 15008, None);
        assert_eq!(v.workloads.len(), 1);
    }

    #[test]
    fn unknown_nodes_and_headless_services_are_handled() {
        let mut st = world();
        st.nodes.remove("node1");
        st.services.insert(
            "shop/headless".into(),
            ServiceEntry {
                cluster_ips: vec![],
                ports: vec![],
            },
        );
        let v = st.view("node0", Some("td"), 15008, None);
        assert_eq!(
            v.services.len(),
            1,
            "headless services are not proxied by address"
        );
        let remote = &v.services[0].endpoints[1];
        assert_eq!(
            remote.node, None,
            "no tunnel to a node the cluster does not list"
        );
        assert!(
            v.skipped
                .iter()
                .any(|s| s.kind == "endpointslice" && s.reason.contains("unknown node node1")),
            "{:?}",
            v.skipped
        );
        assert!(
            v.skipped
                .iter()
                .any(|s| s.kind == "pod" && s.name == "shop/web-b")
        );
    }

    #[test]
    fn views_share_names_and_keep_the_previous_entries_that_did_not_change() {
        let mut st = world();
        // Pods stored through the interner share their node's name.
        let mut names = Interner::default();
        let a = names.get("node1");
        let b = names.get("node1");
        assert!(Arc::ptr_eq(&a, &b));
        let first = st.view("node0", Some("td"), 15008, None);
        let web = &first.services[0];
        let remote = &web.endpoints[1];
        let (_, w) = first
            .workloads
            .iter()
            .find(|(ip, _)| *ip == remote.addr.ip())
            .unwrap();
        // The endpoint and the workload entry of a pod hold one name and
        // one identity.
        assert!(Arc::ptr_eq(
            remote.pod.as_ref().unwrap(),
            w.pod.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            remote.identity.as_ref().unwrap(),
            w.identity.as_ref().unwrap()
        ));
        // Nothing changed: the same entries. A new service: only it is new.
        let again = st.view("node0", Some("td"), 15008, Some(&first));
        assert!(Arc::ptr_eq(&again.services[0], web));
        assert!(Arc::ptr_eq(&again.workloads[0].1, &first.workloads[0].1));
        st.services.insert(
            "shop/api".into(),
            ServiceEntry {
                cluster_ips: vec!["10.96.0.12".parse().unwrap()],
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    app_protocol: None,
                }],
            },
        );
        let changed = st.view("node0", Some("td"), 15008, Some(&again));
        assert_eq!(changed.services.len(), 2);
        let web2 = changed
            .services
            .iter()
            .find(|s| s.name == "web.shop:80")
            .unwrap();
        assert!(Arc::ptr_eq(web2, web));
        // A changed service is a new entry.
        st.slices.get_mut("shop/web-abc").unwrap().endpoints[0].ready = false;
        let fewer = st.view("node0", Some("td"), 15008, Some(&changed));
        let web3 = fewer
            .services
            .iter()
            .find(|s| s.name == "web.shop:80")
            .unwrap();
        assert!(!Arc::ptr_eq(web3, web));
        assert_eq!(web3.endpoints.len(), 1);
    }

    #[test]
    fn routes_attach_to_their_parent_services_or_are_skipped_whole() {
        let mut st = world();
        st.services.insert(
            "shop/web-v2".into(),
            ServiceEntry {
                cluster_ips: vec!["10.96.0.11".parse().unwrap()],
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    app_protocol: None,
                }],
            },
        );
        let spec = serde_json::json!({
            "parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
            "rules": [{"backendRefs": [{"name": "web", "port": 80, "weight": 90},
                                       {"name": "web-v2", "port": 80, "weight": 10}]}]
        });
        let split = crate::kube::routes::route_entry("shop", "split", &spec, None, false).unwrap();
        st.http_routes.insert("shop/split".into(), split);
        let missing = serde_json::json!({
            "parentRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [{"name": "gone", "port": 80}]}]
        });
        let missing =
            crate::kube::routes::route_entry("shop", "missing", &missing, None, false).unwrap();
        st.http_routes.insert("shop/missing".into(), missing);
        let v = st.view("node0", Some("td"), 15008, None);
        let web = v.services.iter().find(|s| s.name == "web.shop:80").unwrap();
        assert_eq!(web.routes.len(), 1, "{:?}", web.routes);
        let backends: Vec<(String, u32)> = web.routes[0]
            .backends
            .iter()
            .map(|b| (b.service.clone(), b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                ("web.shop:80".to_string(), 90),
                ("web-v2.shop:80".to_string(), 10)
            ]
        );
        assert!(
            v.skipped.iter().any(|s| s.kind == "httproute"
                && s.name == "shop/missing"
                && s.reason.contains("gone.shop:80")),
            "{:?}",
            v.skipped
        );
    }

    #[test]
    fn bad_objects_are_refused_with_a_reason() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "a"},
            "spec": {"clusterIP": "not-an-ip", "ports": [{"port": 80}]}
        }))
        .unwrap();
        assert!(service_entry(&svc).unwrap_err().contains("not-an-ip"));
        let ext: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "a"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }))
        .unwrap();
        assert!(service_entry(&ext).unwrap_err().contains("ExternalName"));
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x-1", "namespace": "a"},
            "addressType": "IPv4",
            "endpoints": []
        }))
        .unwrap();
        assert!(
            slice_entry(&slice, &mut Interner::default())
                .unwrap_err()
                .contains("service-name")
        );
    }
}
