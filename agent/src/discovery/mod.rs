//! What the agent knows about services: which addresses belong to which
//! service, its endpoints, its routes and their policies. The config file
//! feeds it today; Kubernetes discovery will feed the same [`ServiceTable`].
//!
//! The table is immutable once built and swapped whole on reload, so a
//! request sees one consistent snapshot. Endpoint statistics (latency
//! estimate, in-flight count, ejection state) are carried over to the new
//! table for endpoints that stay, so a reload does not reset the balancer.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::balance::{BalanceConfig, Balancer, EndpointStats};
use crate::config::services::{
    HeaderMatchConfig, MatchConfig, PathMatchConfig, ProtocolHint, RouteConfig, ServiceConfig,
};
use crate::fast_map::FastMap;
use crate::retry::{Backoff, RetryBudget, RetryOn};
use crate::routing::{
    GrpcMatch, HeaderMatch, PathMatch, Route, RouteMatch, RouteTable, ValueMatch, Weighted,
};

/// Name of the route that takes requests no declared route matches (the
/// name `linkerd routes` users know).
pub const DEFAULT_ROUTE: &str = "[DEFAULT]";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("service {service}, route {route}: {message}")]
    Route {
        service: String,
        route: String,
        message: String,
    },
    #[error("service {service}: {message}")]
    Service { service: String, message: String },
}

/// An endpoint as the balancer carries it. Its strings are shared with
/// the [`EndpointConfig`](crate::config::services::EndpointConfig) it was
/// built from (and with discovery's picture of the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub node: Option<Arc<str>>,
    pub weight: u32,
    pub zone: Option<Arc<str>>,
    pub identity: Option<Arc<str>>,
    /// The pod behind the address, when the config names it.
    pub pod: Option<Arc<str>>,
}

/// Retries of one route.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub backoff: Backoff,
}

/// What a matched route does with a request.
pub struct RoutePolicy {
    /// How each match reads, by match index (for diagnostic traces).
    pub match_descriptions: Vec<String>,
    /// Names of the services that receive the traffic, weighted.
    pub backends: Weighted<String>,
    pub timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

pub struct Service {
    pub name: String,
    /// What it was built from: a rebuild given the very same entry (an
    /// unchanged service of a cluster of thousands) keeps this service.
    config: Arc<ServiceConfig>,
    pub protocol: ProtocolHint,
    pub routes: RouteTable<RoutePolicy>,
    /// Taken when no route matches: the service's own endpoints, no
    /// timeout, no retries.
    pub default_route: RoutePolicy,
    pub balancer: Balancer<Endpoint>,
    pub budget: RetryBudget,
}

/// One consistent snapshot of every service.
#[derive(Default)]
pub struct ServiceTable {
    by_addr: FastMap<SocketAddr, Arc<Service>>,
    by_name: FastMap<String, Arc<Service>>,
    /// Names of the services each endpoint address serves (inbound
    /// authorization asks which services a target belongs to).
    by_endpoint: FastMap<SocketAddr, Vec<String>>,
    /// Meshed workloads by address, whatever port is dialled: a pod that
    /// dials another meshed pod's IP directly (not through a service) goes
    /// through the tunnel to that pod's node like service traffic.
    workloads: FastMap<IpAddr, Arc<Workload>>,
}

/// A meshed pod as the data path needs it to dial it by address. Behind
/// an `Arc` from discovery to the table, its strings shared with the
/// endpoints that name the same pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub node: Arc<str>,
    /// `namespace/name`, when known.
    pub pod: Option<Arc<str>>,
    pub identity: Option<Arc<str>>,
}

impl ServiceTable {
    /// Builds the table from validated config, reusing endpoint statistics
    /// from `previous`.
    pub fn build(
        services: &[Arc<ServiceConfig>],
        balance: BalanceConfig,
        previous: Option<&ServiceTable>,
        now: Instant,
    ) -> Result<Self, DiscoveryError> {
        let mut table = ServiceTable::default();
        for svc in services {
            let service = match previous.and_then(|p| p.by_name(&svc.name)) {
                Some(old) if Arc::ptr_eq(&old.config, svc) && *old.balancer.config() == balance => {
                    old.clone()
                }
                _ => Arc::new(build_service(svc, balance, previous, now)?),
            };
            for addr in &svc.addresses {
                table.by_addr.insert(*addr, service.clone());
            }
            for ep in &svc.endpoints {
                if let Some(node) = &ep.node {
                    table.workloads.entry(ep.addr.ip()).or_insert_with(|| {
                        Arc::new(Workload {
                            node: node.clone(),
                            pod: ep.pod.clone(),
                            identity: ep.identity.clone(),
                        })
                    });
                }
                let names = table.by_endpoint.entry(ep.addr).or_default();
                if !names.contains(&svc.name) {
                    names.push(svc.name.clone());
                }
            }
            table.by_name.insert(svc.name.clone(), service);
        }
        Ok(table)
    }

    /// Forgets which services the endpoints on other nodes serve. Only
    /// inbound traffic asks ([`Self::services_of_endpoint`]), always for a
    /// pod of this node, while a cluster has tens of thousands of endpoints
    /// elsewhere, each an entry. Endpoints with no node stay: a config
    /// file's may be this node's pods.
    pub fn forget_remote_endpoints(&mut self, node: &str) {
        let remote: std::collections::HashSet<SocketAddr> = self
            .by_name
            .values()
            .flat_map(|s| s.balancer.endpoints())
            .filter(|e| e.node.as_deref().is_some_and(|n| n != node))
            .map(|e| e.addr)
            .collect();
        self.by_endpoint.retain(|a, _| !remote.contains(a));
        self.by_endpoint.shrink_to_fit();
    }

    /// The service whose address a pod dialled.
    pub fn by_addr(&self, addr: &SocketAddr) -> Option<&Arc<Service>> {
        self.by_addr.get(addr)
    }

    /// Adds workloads the services do not name (every meshed pod of a
    /// cluster); an address a service endpoint already names keeps that.
    /// An equal entry is replaced by the one given, so the table shares
    /// discovery's copy rather than keeping its own.
    pub fn add_workloads(&mut self, workloads: impl IntoIterator<Item = (IpAddr, Arc<Workload>)>) {
        for (ip, w) in workloads {
            match self.workloads.entry(ip) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if **e.get() == *w {
                        e.insert(w);
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(w);
                }
            }
        }
    }

    /// The meshed workload at `ip`, if any.
    pub fn workload(&self, ip: &IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(ip)
    }

    /// How many workload addresses the table knows.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(name)
    }

    /// The services `addr` is an endpoint of, in config order.
    pub fn services_of_endpoint(&self, addr: &SocketAddr) -> &[String] {
        self.by_endpoint.get(addr).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_name.values()
    }

    /// Every endpoint address of every service (to prune idle connections
    /// to endpoints that went away).
    pub fn endpoint_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.by_name
            .values()
            .flat_map(|s| s.balancer.endpoints().map(|e| e.addr))
    }
}

/// The table in force; swapped whole on reload.
#[derive(Default)]
pub struct Discovery {
    current: RwLock<Arc<ServiceTable>>,
}

impl Discovery {
    pub fn new(table: ServiceTable) -> Self {
        Discovery {
            current: RwLock::new(Arc::new(table)),
        }
    }

    /// The config file's services (with its pods as endpoints) as the
    /// agent starts with them, other nodes' endpoint details left to
    /// discovery.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, DiscoveryError> {
        let mut table = ServiceTable::build(
            &config.services_with_local_pods(),
            config.balancer.to_balance(),
            None,
            Instant::now(),
        )?;
        table.forget_remote_endpoints(&config.node.name);
        Ok(Self::new(table))
    }

    pub fn current(&self) -> Arc<ServiceTable> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace(&self, table: ServiceTable) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

fn build_service(
    svc: &Arc<ServiceConfig>,
    balance: BalanceConfig,
    previous: Option<&ServiceTable>,
    now: Instant,
) -> Result<Service, DiscoveryError> {
    let old = previous.and_then(|p| p.by_name(&svc.name));
    let endpoints: Vec<(Endpoint, Arc<EndpointStats>)> = svc
        .endpoints
        .iter()
        .map(|e| {
            let ep = Endpoint {
                addr: e.addr,
                node: e.node.clone(),
                weight: e.weight,
                zone: e.zone.clone(),
                identity: e.identity.clone(),
                pod: e.pod.clone(),
            };
            // Same address, same endpoint: its estimate and ejection
            // survive a change of weight, zone or node.
            let stats = old
                .and_then(|o| o.balancer.stats_where(|x| x.addr == ep.addr))
                .unwrap_or_else(|| Arc::new(EndpointStats::new(now, &balance)));
            (ep, stats)
        })
        .collect();
    let balancer = Balancer::with_stats(endpoints, balance).with_weights(|e| e.weight);
    let budget = RetryBudget::new(
        svc.retry_budget.ratio,
        svc.retry_budget.min_per_second,
        svc.retry_budget.ttl,
        now,
    )
    .map_err(|e| DiscoveryError::Service {
        service: svc.name.clone(),
        message: e.to_string(),
    })?;
    let self_backend = || Weighted::new(vec![(svc.name.clone(), 1)]);
    let default_route = RoutePolicy {
        match_descriptions: vec!["no route matched".to_string()],
        backends: self_backend().map_err(|e| DiscoveryError::Service {
            service: svc.name.clone(),
            message: e.to_string(),
        })?,
        timeout: None,
        per_try_timeout: None,
        retry: None,
    };
    let mut routes = Vec::new();
    for r in &svc.routes {
        routes.push(build_route(svc, r)?);
    }
    Ok(Service {
        name: svc.name.clone(),
        config: svc.clone(),
        protocol: svc.protocol,
        routes: RouteTable::new(routes),
        default_route,
        balancer,
        budget,
    })
}

/// Whether `r` builds on `svc` (matches compile, weights are usable): a
/// route from the cluster is checked alone, so one bad route is skipped
/// instead of failing the whole table.
pub fn check_route(svc: &ServiceConfig, r: &RouteConfig) -> Result<(), String> {
    build_route(svc, r).map(|_| ()).map_err(|e| e.to_string())
}

fn build_route(svc: &ServiceConfig, r: &RouteConfig) -> Result<Route<RoutePolicy>, DiscoveryError> {
    let err = |message: String| DiscoveryError::Route {
        service: svc.name.clone(),
        route: r.name.clone(),
        message,
    };
    let backends = if r.backends.is_empty() {
        vec![(svc.name.clone(), 1)]
    } else {
        r.backends
            .iter()
            .map(|b| (b.service.clone(), b.weight))
            .collect()
    };
    let backends = Weighted::new(backends).map_err(|e| err(e.to_string()))?;
    let matches = r
        .matches
        .iter()
        .map(build_match)
        .collect::<Result<Vec<_>, String>>()
        .map_err(err)?;
    let retry = match &r.retry {
        None => None,
        Some(rc) => Some(RetryPolicy {
            attempts: rc.attempts,
            on: rc
                .on
                .iter()
                .map(|s| s.parse::<RetryOn>().map_err(|e| err(e.to_string())))
                .collect::<Result<_, _>>()?,
            backoff: Backoff {
                base: rc.backoff_base,
                max: rc.backoff_max,
            },
        }),
    };
    Ok(Route {
        name: r.name.clone(),
        matches,
        value: RoutePolicy {
            match_descriptions: if r.matches.is_empty() {
                vec!["every request".to_string()]
            } else {
                r.matches.iter().map(describe_match).collect()
            },
            backends,
            timeout: r.timeout,
            per_try_timeout: r.per_try_timeout,
            retry,
        },
    })
}

/// A match as an operator would say it: `path prefix /hello, method GET`.
fn describe_match(m: &MatchConfig) -> String {
    let mut parts = Vec::new();
    match &m.path {
        Some(PathMatchConfig::Exact(p)) => parts.push(format!("path {p}")),
        Some(PathMatchConfig::Prefix(p)) => parts.push(format!("path prefix {p}")),
        Some(PathMatchConfig::Regex(p)) => parts.push(format!("path regex {p}")),
        None => {}
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    for h in &m.headers {
        match (&h.exact, &h.regex) {
            (Some(v), _) => parts.push(format!("header {}={v}", h.name)),
            (_, Some(r)) => parts.push(format!("header {}~{r}", h.name)),
            _ => {}
        }
    }
    if let Some(g) = &m.grpc {
        parts.push(format!(
            "grpc {}/{}",
            g.service.as_deref().unwrap_or("*"),
            g.method.as_deref().unwrap_or("*")
        ));
    }
    if parts.is_empty() {
        "every request".to_string()
    } else {
        parts.join(", ")
    }
}

fn build_match(m: &MatchConfig) -> Result<RouteMatch, String> {
    let path = match &m.path {
        None => None,
        Some(PathMatchConfig::Exact(p)) => Some(PathMatch::exact(p).map_err(|e| e.to_string())?),
        Some(PathMatchConfig::Prefix(p)) => Some(PathMatch::prefix(p).map_err(|e| e.to_string())?),
        Some(PathMatchConfig::Regex(p)) => Some(PathMatch::regex(p).map_err(|e| e.to_string())?),
    };
    let method = m
        .method
        .as_deref()
        .map(|s| http::Method::from_bytes(s.as_bytes()).map_err(|e| format!("method {s:?}: {e}")))
        .transpose()?;
    let headers = m
        .headers
        .iter()
        .map(build_header_match)
        .collect::<Result<Vec<_>, _>>()?;
    let grpc = m
        .grpc
        .as_ref()
        .map(|g| GrpcMatch::new(g.service.as_deref(), g.method.as_deref()))
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(RouteMatch {
        path,
        method,
        headers,
        grpc,
    })
}

fn build_header_match(h: &HeaderMatchConfig) -> Result<HeaderMatch, String> {
    let value = match (&h.exact, &h.regex) {
        (Some(v), None) => ValueMatch::exact(v),
        (None, Some(r)) => ValueMatch::regex(r).map_err(|e| e.to_string())?,
        _ => {
            return Err(format!(
                "header {:?}: set exactly one of exact and regex",
                h.name
            ));
        }
    };
    HeaderMatch::new(&h.name, value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(endpoints: &str, previous: Option<&ServiceTable>) -> ServiceTable {
        let c = Config::from_toml(
            &format!(
                "[[services]]\nname = \"s\"\naddresses = [\"10.96.0.1:80\"]\nendpoints = [{endpoints}]\n"
            ),
            "t",
        )
        .unwrap();
        ServiceTable::build(
            &c.services,
            BalanceConfig::default(),
            previous,
            Instant::now(),
        )
        .unwrap()
    }

    #[test]
    fn a_rebuild_keeps_the_services_whose_config_is_the_same_entry() {
        let c = Config::from_toml(
            r#"
[[services]]
name = "a"
addresses = ["10.96.0.1:80"]
endpoints = [{ addr = "10.1.0.2:80", node = "n1" }, { addr = "10.1.0.3:80" }]
[[services]]
name = "b"
addresses = ["10.96.0.2:80"]
endpoints = [{ addr = "10.1.0.4:80" }]
"#,
            "t",
        )
        .unwrap();
        let balance = BalanceConfig::default();
        let old = ServiceTable::build(&c.services, balance, None, Instant::now()).unwrap();
        let mut changed = c.services.clone();
        Arc::make_mut(&mut changed[1]).endpoints[0].weight = 2;
        let new = ServiceTable::build(&changed, balance, Some(&old), Instant::now()).unwrap();
        assert!(Arc::ptr_eq(
            new.by_name("a").unwrap(),
            old.by_name("a").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            new.by_name("b").unwrap(),
            old.by_name("b").unwrap()
        ));
        // Other balancer settings: everything is built again.
        let other = BalanceConfig {
            failure_threshold: 9,
            ..balance
        };
        let rebuilt = ServiceTable::build(&changed, other, Some(&new), Instant::now()).unwrap();
        assert!(!Arc::ptr_eq(
            rebuilt.by_name("a").unwrap(),
            new.by_name("a").unwrap()
        ));
        // Which services an endpoint serves is kept for this node's (and
        // unplaced) endpoints only.
        let mut t = rebuilt;
        t.forget_remote_endpoints("n0");
        assert!(
            t.services_of_endpoint(&"10.1.0.2:80".parse().unwrap())
                .is_empty()
        );
        assert_eq!(
            t.services_of_endpoint(&"10.1.0.3:80".parse().unwrap()),
            ["a".to_string()]
        );
    }

    #[test]
    fn an_endpoint_keeps_its_statistics_when_its_weight_or_zone_changes() {
        let old = table(
            r#"{ addr = "10.1.0.2:80" }, { addr = "10.1.0.3:80" }"#,
            None,
        );
        let new = table(
            r#"{ addr = "10.1.0.2:80", weight = 5, zone = "z" }, { addr = "10.1.0.4:80" }"#,
            Some(&old),
        );
        let stats = |t: &ServiceTable, addr: &str| {
            let addr: SocketAddr = addr.parse().unwrap();
            t.by_name("s")
                .unwrap()
                .balancer
                .stats_where(|e| e.addr == addr)
                .unwrap()
        };
        assert!(Arc::ptr_eq(
            &stats(&old, "10.1.0.2:80"),
            &stats(&new, "10.1.0.2:80")
        ));
        let ep = new
            .by_name("s")
            .unwrap()
            .balancer
            .endpoints()
            .next()
            .cloned();
        assert_eq!(
            ep.map(|e| (e.weight, e.zone.as_deref().map(String::from))),
            Some((5, Some("z".to_string())))
        );
    }
}
