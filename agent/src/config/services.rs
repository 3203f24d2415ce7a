//! Services, their endpoints and routes, as declared in the config file —
//! the shape Kubernetes discovery (Services, EndpointSlices, Gateway API
//! HTTPRoute/GRPCRoute) will fill in later. Field names follow Gateway API
//! where the meaning is the same, so a user can read one from the other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::balance::BalanceConfig;

/// Default protocol detection timeout: how long a client that says nothing
/// first waits before its connection is treated as opaque TCP.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Ports whose protocols speak first from the server side or are known not
/// to be HTTP; detection is skipped on them (Linkerd's default list: SMTP,
/// MySQL, Galera, PostgreSQL, Redis, Elasticsearch, Memcached).
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Largest request body buffered so a request can be retried.
pub const DEFAULT_RETRY_BUFFER_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long to wait for a client's first bytes before treating the
    /// connection as opaque TCP.
    #[serde(default = "default_detect_timeout", with = "humantime_serde")]
    pub detect_timeout: Duration,
    /// Destination ports never inspected (always opaque TCP).
    #[serde(default = "default_opaque_ports")]
    pub opaque_ports: Vec<u16>,
    /// On a retrying route, a copy of up to this many bytes of the request
    /// body is kept while it streams, so it can be sent again; a larger
    /// body streams on without a copy and is not retried.
    #[serde(default = "default_retry_buffer_bytes")]
    pub retry_buffer_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            opaque_ports: DEFAULT_OPAQUE_PORTS.to_vec(),
            retry_buffer_bytes: DEFAULT_RETRY_BUFFER_BYTES,
        }
    }
}

fn default_detect_timeout() -> Duration {
    DEFAULT_DETECT_TIMEOUT
}
fn default_opaque_ports() -> Vec<u16> {
    DEFAULT_OPAQUE_PORTS.to_vec()
}
fn default_retry_buffer_bytes() -> usize {
    DEFAULT_RETRY_BUFFER_BYTES
}

/// The per-request balancer's tunables, shared by every service. Defaults
/// are Linkerd's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    /// Time constant of the peak-EWMA latency estimate.
    #[serde(default = "default_decay", with = "humantime_serde")]
    pub decay: Duration,
    /// Latency assumed for an endpoint that has not answered yet while a
    /// request to it is out (see `balance`, "New endpoints").
    #[serde(default = "default_rtt", with = "humantime_serde")]
    pub default_rtt: Duration,
    /// Consecutive failures that eject an endpoint (0: never eject).
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// First ejection; each failed probe doubles it up to `eject_max`.
    #[serde(default = "default_eject_base", with = "humantime_serde")]
    pub eject_base: Duration,
    #[serde(default = "default_eject_max", with = "humantime_serde")]
    pub eject_max: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self::from(BalanceConfig::default())
    }
}

impl From<BalanceConfig> for BalancerConfig {
    fn from(b: BalanceConfig) -> Self {
        Self {
            decay: b.decay,
            default_rtt: b.default_rtt,
            failure_threshold: b.failure_threshold,
            eject_base: b.eject_base,
            eject_max: b.eject_max,
        }
    }
}

impl BalancerConfig {
    pub fn to_balance(&self) -> BalanceConfig {
        BalanceConfig {
            decay: self.decay,
            default_rtt: self.default_rtt,
            failure_threshold: self.failure_threshold,
            eject_base: self.eject_base,
            eject_max: self.eject_max,
        }
    }
}

fn default_decay() -> Duration {
    BalanceConfig::default().decay
}
fn default_rtt() -> Duration {
    BalanceConfig::default().default_rtt
}
fn default_failure_threshold() -> u32 {
    BalanceConfig::default().failure_threshold
}
fn default_eject_base() -> Duration {
    BalanceConfig::default().eject_base
}
fn default_eject_max() -> Duration {
    BalanceConfig::default().eject_max
}

/// How a service's traffic is handled.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolHint {
    /// Detect from the client's first bytes.
    #[default]
    Auto,
    Http1,
    Http2,
    Grpc,
    /// Never inspected: TCP to a chosen endpoint.
    Opaque,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name, e.g. `hello` or `default/hello`.
    pub name: String,
    /// Addresses clients dial (like a ClusterIP and port). A service with
    /// none is only reachable as a route backend.
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
    #[serde(default)]
    pub protocol: ProtocolHint,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Routes in the spirit of HTTPRoute/GRPCRoute. Requests no route
    /// matches go to this service's own endpoints (the `[DEFAULT]` route).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Caps retries across all routes of this service.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
}

/// Its strings are `Arc<str>`: a cluster's endpoints name the same nodes,
/// zones and identities thousands of times, and the same entry is held by
/// discovery's picture, the config in force and the balancer; cloning one
/// then costs reference counts, not allocations.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    /// The node the endpoint runs on (shown in diagnostics; decides
    /// same-node vs. tunnelled once mTLS lands).
    #[serde(default, with = "shared::opt_str")]
    pub node: Option<Arc<str>>,
    /// Relative capacity (as in Linkerd's weighted endpoints): the
    /// balancer's cost (latency estimate × requests in flight) is divided
    /// by it, so under concurrent load an endpoint of weight 2 carries about
    /// twice the in-flight requests of an equally fast one of weight 1.
    /// 0 drains the endpoint: it is used only when no other endpoint is
    /// available.
    #[serde(default = "default_endpoint_weight")]
    pub weight: u32,
    /// The endpoint's topology zone (`topology.kubernetes.io/zone`), shown
    /// in diagnostics and metrics.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shared::opt_str"
    )]
    pub zone: Option<Arc<str>>,
    /// The workload identity the endpoint serves as
    /// (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, what an EndpointSlice's
    /// pod's service account gives), shown in diagnostic traces next to the
    /// address the balancer chose.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shared::opt_str"
    )]
    pub identity: Option<Arc<str>>,
    /// The pod behind the address (`namespace/name`, an EndpointSlice's
    /// `targetRef`), named in tap, traces and `waymark endpoints`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "shared::opt_str"
    )]
    pub pod: Option<Arc<str>>,
}

fn default_endpoint_weight() -> u32 {
    1
}

/// Largest endpoint weight: weights are relative, and a bound keeps a typo
/// (an extra zero or three) from starving every other endpoint silently.
pub const MAX_ENDPOINT_WEIGHT: u32 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Any one of these selects the route; none means every request.
    #[serde(default)]
    pub matches: Vec<MatchConfig>,
    /// Weighted backends (traffic split); default: the service itself.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Whole-request deadline including retries; 504 when it passes.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Deadline of each attempt; a retry follows when the policy allows.
    #[serde(default, with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retry: Option<RetryConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    #[serde(default)]
    pub path: Option<PathMatchConfig>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchConfig>,
    #[serde(default)]
    pub grpc: Option<GrpcMatchConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum PathMatchConfig {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatchConfig {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name of a declared service whose endpoints receive the traffic.
    pub service: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`, and
    /// gRPC statuses such as `unavailable`, `deadline-exceeded`.
    pub on: Vec<String>,
    #[serde(default = "default_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}
fn default_backoff_max() -> Duration {
    Duration::from_millis(250)
}

/// Linkerd's `retryBudget`: retries may add at most `ratio` on top of
/// original requests over `ttl`, plus `min_per_second` always.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: default_ratio(),
            min_per_second: default_min_per_second(),
            ttl: default_ttl(),
        }
    }
}

fn default_ratio() -> f64 {
    0.2
}
fn default_min_per_second() -> u32 {
    10
}
fn default_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Checks the services section; pushes every problem found.
/// `services[i] (name)`, as problems name a service.
struct At<'a>(usize, &'a str);

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "services[{}] ({})", self.0, self.1)
    }
}

pub fn validate(services: &[Arc<ServiceConfig>], problems: &mut Vec<String>) {
    // Sets, not scans of the services before: a cluster has thousands of
    // services, and this runs on every change discovery applies.
    let names: std::collections::HashSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let mut seen_names = std::collections::HashSet::new();
    let mut owners: std::collections::HashMap<SocketAddr, &str> = Default::default();
    for (i, svc) in services.iter().enumerate() {
        // Written out only for a problem: thousands of services pass.
        let at = At(i, &svc.name);
        if svc.name.trim().is_empty() {
            problems.push(format!("services[{i}].name: must not be empty"));
        } else if !seen_names.insert(svc.name.as_str()) {
            problems.push(format!("{at}.name: declared twice"));
        }
        for addr in &svc.addresses {
            match owners.get(addr) {
                Some(other) if *other != svc.name => problems.push(format!(
                    "{at}.addresses: {addr} already belongs to service {other}"
                )),
                Some(_) => {}
                None => {
                    owners.insert(*addr, &svc.name);
                }
            }
        }
        for (j, ep) in svc.endpoints.iter().enumerate() {
            if svc.endpoints[..j].iter().any(|e| e.addr == ep.addr) {
                problems.push(format!("{at}.endpoints[{j}]: {} listed twice", ep.addr));
            }
            if ep.addr.port() == 0 {
                problems.push(format!("{at}.endpoints[{j}]: {} has port 0", ep.addr));
            }
            if ep.weight > MAX_ENDPOINT_WEIGHT {
                problems.push(format!(
                    "{at}.endpoints[{j}].weight: {} is above the maximum {MAX_ENDPOINT_WEIGHT}",
                    ep.weight
                ));
            }
            if let Some(id) = &ep.identity
                && let Err(e) = id.parse::<crate::identity::SpiffeId>()
            {
                problems.push(format!("{at}.endpoints[{j}].identity: {e}"));
            }
            if ep.zone.as_deref().is_some_and(|z| z.trim().is_empty()) {
                problems.push(format!(
                    "{at}.endpoints[{j}].zone: must not be empty (leave it out instead)"
                ));
            }
            if ep.pod.as_deref().is_some_and(|p| p.trim().is_empty()) {
                problems.push(format!(
                    "{at}.endpoints[{j}].pod: must not be empty (leave it out instead)"
                ));
            }
        }
        for (j, route) in svc.routes.iter().enumerate() {
            let rat = format!("{at}.routes[{j}] ({})", route.name);
            if route.name.trim().is_empty() {
                problems.push(format!("{at}.routes[{j}].name: must not be empty"));
            } else if svc.routes[..j].iter().any(|r| r.name == route.name) {
                problems.push(format!("{rat}.name: declared twice in this service"));
            }
            for (k, b) in route.backends.iter().enumerate() {
                if !names.contains(b.service.as_str()) {
                    problems.push(format!(
                        "{rat}.backends[{k}].service: no service named {:?}",
                        b.service
                    ));
                }
            }
            if !route.backends.is_empty() && route.backends.iter().all(|b| b.weight == 0) {
                problems.push(format!("{rat}.backends: every weight is 0"));
            }
            for (k, m) in route.matches.iter().enumerate() {
                if let Some(method) = &m.method
                    && http::Method::from_bytes(method.as_bytes()).is_err()
                {
                    problems.push(format!(
                        "{rat}.matches[{k}].method: {method:?} is not a method"
                    ));
                }
                for (h, hm) in m.headers.iter().enumerate() {
                    if hm.exact.is_some() == hm.regex.is_some() {
                        problems.push(format!(
                            "{rat}.matches[{k}].headers[{h}]: set exactly one of `exact` and `regex`"
                        ));
                    }
                    if http::HeaderName::from_bytes(hm.name.as_bytes()).is_err() {
                        problems.push(format!(
                            "{rat}.matches[{k}].headers[{h}].name: {:?} is not a header name",
                            hm.name
                        ));
                    }
                }
            }
            if let (Some(t), Some(p)) = (route.timeout, route.per_try_timeout)
                && p > t
            {
                problems.push(format!(
                    "{rat}.per_try_timeout: {p:?} is longer than the request timeout {t:?}"
                ));
            }
            if let Some(r) = &route.retry {
                if r.attempts > 10 {
                    problems.push(format!(
                        "{rat}.retry.attempts: {} is more than 10",
                        r.attempts
                    ));
                }
                if r.backoff_base > r.backoff_max {
                    problems.push(format!("{rat}.retry.backoff_base: longer than backoff_max"));
                }
            }
        }
        let b = &svc.retry_budget;
        if !(0.0..=1000.0).contains(&b.ratio) {
            problems.push(format!(
                "{at}.retry_budget.ratio: {} is not in 0..=1000",
                b.ratio
            ));
        }
        if b.ttl < Duration::from_secs(1) || b.ttl > Duration::from_secs(60) {
            problems.push(format!(
                "{at}.retry_budget.ttl: {:?} is not within 1s..=60s",
                b.ttl
            ));
        }
    }
}

/// Serde for the `Arc`s the config shares (serde's own impls need its `rc`
/// feature, which would rebuild every crate that uses serde for two
/// helpers): an `Arc` reads and writes as what it holds.
pub(crate) mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// `Option<Arc<str>>` as an optional string.
    pub mod opt_str {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
            v.as_deref().serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
            Ok(Option::<String>::deserialize(d)?.map(Into::into))
        }
    }

    /// `Vec<Arc<T>>` as a list of `T`.
    pub mod vec {
        use super::*;

        pub fn serialize<T: Serialize, S: Serializer>(
            v: &[Arc<T>],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|a| &**a))
        }

        pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<Arc<T>>, D::Error> {
            Ok(Vec::<T>::deserialize(d)?
                .into_iter()
                .map(Arc::new)
                .collect())
        }
    }
}
