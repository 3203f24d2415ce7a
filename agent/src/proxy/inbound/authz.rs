//! Inbound authorization: may this verified source identity open a tunnel
//! stream to this target on our node?
//!
//! Two checks, in order:
//! 1. the target must be an address of a pod on this node — the tunnel is
//!    not an open proxy into the node's network;
//! 2. the `[authorization]` rules, tried in order; the first whose sources,
//!    services and ports all match decides, and `default` decides when none
//!    does. A rule's `services` match when the target is an endpoint of one
//!    of them (the inbound agent sees the endpoint, not the address the
//!    client dialled).
//!
//! The source is the identity in the client certificate, verified by the
//! TLS layer; nothing the client sends in headers is trusted for it.
//!
//! A stream is decided when it opens, and again whenever the rules change
//! while it is open: each reload bumps a generation, the next request on a
//! pooled HTTP stream is decided anew (one atomic load per request while
//! nothing changed), and an opaque stream the new rules deny is closed. A
//! deny rule added by a reload so reaches connections already open.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use crate::config::Config;
use crate::config::mesh::{Action, SourcePattern};
use crate::discovery::Discovery;
use crate::identity::SpiffeId;
use crate::proxy::inbound::server::AuthorizeFuture;
use crate::proxy::inbound::{Authorize, ConnectInfo, DenyReason};
use crate::telemetry::metrics::BoundedLabel;

/// Label value of decisions made by `default`, and of targets that are no
/// service's endpoint.
const DEFAULT_RULE: &str = "default";
const NO_SERVICE: &str = "none";
/// The rule of a decision whose target is no pod of this node.
const NOT_A_LOCAL_POD: &str = "not_a_local_pod";

struct Rule {
    label: String,
    action: Action,
    sources: Vec<SourcePattern>,
    services: Vec<String>,
    ports: Vec<u16>,
    pods: Vec<String>,
}

impl Rule {
    fn matches(&self, source: &SpiffeId, services: &[String], port: u16, pod: &str) -> bool {
        self.sources.iter().any(|p| p.matches(source))
            && (self.pods.is_empty() || self.pods.iter().any(|p| p == pod))
            && (self.services.is_empty() || self.services.iter().any(|s| services.contains(s)))
            && (self.ports.is_empty() || self.ports.contains(&port))
    }
}

/// A local pod as a tunnel target.
#[derive(Debug, Clone)]
struct LocalPod {
    name: String,
    identity: Option<SpiffeId>,
}

/// The compiled policy and this node's pods; swapped whole on reload.
struct Policy {
    default: Action,
    rules: Vec<Rule>,
    pods: HashMap<IpAddr, LocalPod>,
}

impl Policy {
    /// From a validated config (patterns that do not parse are skipped:
    /// validation has refused them already).
    fn from_config(c: &Config) -> Self {
        let rules = c
            .authorization
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                label: r.name.clone().unwrap_or_else(|| format!("rules[{i}]")),
                action: r.action,
                sources: r
                    .sources
                    .iter()
                    .filter_map(|s| SourcePattern::parse(s).ok())
                    .collect(),
                services: r.services.clone(),
                ports: r.ports.clone(),
                pods: r.pods.clone(),
            })
            .collect();
        let pods = c
            .pods
            .iter()
            .flat_map(|p| {
                let pod = LocalPod {
                    name: p.name.clone(),
                    identity: p.identity.as_deref().and_then(|s| s.parse().ok()),
                };
                p.ips.iter().map(move |ip| (*ip, pod.clone()))
            })
            .collect();
        Self {
            default: c.authorization.default,
            rules,
            pods,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    source_identity: String,
    service: String,
    rule: String,
}

/// What the inbound side decided, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub rule: String,
    pub service: String,
    pub reason: String,
}

pub struct InboundAuthz {
    node: String,
    policy: RwLock<Arc<Policy>>,
    /// Bumped on every reload of the rules; streams admitted under an
    /// earlier generation are decided again. Requests read the atomic (one
    /// load each); opaque streams wait on the channel.
    generation: AtomicU64,
    changed: tokio::sync::watch::Sender<()>,
    discovery: Arc<Discovery>,
    decisions: Family<DecisionLabels, Counter>,
    sources: BoundedLabel,
}

impl InboundAuthz {
    pub fn new(config: &Config, discovery: Arc<Discovery>, registry: &mut Registry) -> Arc<Self> {
        let decisions = Family::default();
        registry.register(
            "waymark_inbound_authz_decisions",
            "Inbound tunnel streams allowed or denied, by source identity, destination service and deciding rule",
            decisions.clone(),
        );
        Arc::new(Self {
            node: config.node.name.clone(),
            policy: RwLock::new(Arc::new(Policy::from_config(config))),
            generation: AtomicU64::new(0),
            changed: tokio::sync::watch::Sender::new(()),
            discovery,
            decisions,
            sources: BoundedLabel::new(config.metrics.max_destinations),
        })
    }

    /// Takes the rules and this node's pods of a reloaded config (pods
    /// come and go with discovery).
    pub fn reload(&self, config: &Config) {
        let next = Policy::from_config(config);
        let mut cur = self.policy.write().unwrap_or_else(|e| e.into_inner());
        *cur = Arc::new(next);
        drop(cur);
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.send_replace(());
    }

    /// The generation of the rules in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Wakes when the rules change (not for changes before the call).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Decides an open stream again after a reload: `None` while it is
    /// still allowed, the denial (logged and counted) once it is not.
    ///
    /// A target that is no longer a pod of this node does not end a stream
    /// admitted to it: its pod leaving is not a change of the rules, and the
    /// stream's connection reaches only the process it was admitted to,
    /// which ends it itself when it exits. Ending it here would fail the
    /// requests in flight on a pod being deleted (and, on a pooled stream,
    /// answer the next request 403 as if the rules had denied it), in the
    /// instant between this node dropping the pod and the sending node
    /// dropping the endpoint.
    pub fn recheck(&self, source: &SpiffeId, target: SocketAddr) -> Option<Decision> {
        let d = self.decide(source, target);
        if d.allow {
            return None;
        }
        if d.rule == NOT_A_LOCAL_POD {
            debug!(source_identity = %source, %target, "the stream's pod left this node; the stream keeps its connection");
            return None;
        }
        warn!(
            source_identity = %source,
            %target,
            service = %d.service,
            rule = %d.rule,
            "authorization denied an open stream after a reload: {}",
            d.reason
        );
        Some(d)
    }

    /// This agent's answer to a request the rules deny: 403 (gRPC
    /// PERMISSION_DENIED) with `l5d-proxy-error`, naming the rule.
    pub fn denied_response(
        &self,
        d: &Decision,
        grpc: bool,
    ) -> http::Response<crate::http::body::ProxyBody> {
        crate::http::errors::response(
            crate::http::errors::ProxyError::Forbidden,
            &self.node,
            &d.service,
            Some(&d.reason),
            grpc,
        )
    }

    /// Decides one stream (and counts the decision).
    pub fn decide(&self, source: &SpiffeId, target: SocketAddr) -> Decision {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let decision = self.evaluate(&policy, source, target);
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: if decision.allow { "allow" } else { "deny" },
                source_identity: self.sources.get(&source.to_string()),
                service: decision.service.clone(),
                rule: decision.rule.clone(),
            })
            .inc();
        decision
    }

    /// The decision the current policy makes for `source` and `target`,
    /// not counted: for the diagnostic trace of a stream admitted already.
    pub fn explain(&self, source: &SpiffeId, target: SocketAddr) -> Decision {
        let policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.evaluate(&policy, source, target)
    }

    fn evaluate(&self, policy: &Policy, source: &SpiffeId, target: SocketAddr) -> Decision {
        let Some(pod) = policy.pods.get(&target.ip()) else {
            return Decision {
                allow: false,
                rule: NOT_A_LOCAL_POD.into(),
                service: NO_SERVICE.into(),
                reason: format!(
                    "{source} may not reach {target}: it is not a pod on node {}",
                    self.node
                ),
            };
        };
        let table = self.discovery.current();
        let services = table.services_of_endpoint(&target);
        let service = services.first().map_or(NO_SERVICE, String::as_str);
        let destination = match &pod.identity {
            Some(id) => format!("{id} ({}, {target})", pod.name),
            None => format!("{} ({target})", pod.name),
        };
        let (action, rule) = policy
            .rules
            .iter()
            .find(|r| r.matches(source, services, target.port(), &pod.name))
            .map_or((policy.default, DEFAULT_RULE), |r| {
                (r.action, r.label.as_str())
            });
        let allow = action == Action::Allow;
        let reason = if allow {
            format!("{source} may reach {destination}: rule {rule}")
        } else if rule == DEFAULT_RULE {
            format!(
                "{source} may not reach {destination}: no rule allows it and the default is deny"
            )
        } else {
            format!("{source} may not reach {destination}: denied by rule {rule}")
        };
        Decision {
            allow,
            rule: rule.to_string(),
            service: service.to_string(),
            reason,
        }
    }
}

impl Authorize for InboundAuthz {
    fn authorize<'a>(&'a self, req: ConnectInfo<'a>) -> AuthorizeFuture<'a> {
        let d = self.decide(&req.peer.id, req.target);
        let result = if d.allow {
            debug!(reason = %d.reason, "tunnel stream allowed");
            Ok(())
        } else {
            let request_id = req
                .headers
                .get(crate::transport::tunnel::REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            warn!(
                source_identity = %req.peer.id,
                target = %req.target,
                service = %d.service,
                rule = %d.rule,
                request_id,
                "authorization denied: {}",
                d.reason
            );
            Err(DenyReason(format!("waymark {}: {}", self.node, d.reason)))
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::ServiceTable;

    fn authz(extra: &str) -> Arc<InboundAuthz> {
        let text = format!(
            r#"
[node]
name = "node1"
[[pods]]
name = "default/api"
netns = "/x"
ips = ["10.2.0.2"]
identity = "spiffe://cluster.local/ns/default/sa/api"
[[services]]
name = "api"
addresses = ["10.96.0.1:80"]
endpoints = [ {{ addr = "10.2.0.2:8080", node = "node1" }} ]
{extra}
"#
        );
        let c: Config = toml::from_str(&text).unwrap();
        let table = ServiceTable::build(
            &c.services,
            Default::default(),
            None,
            std::time::Instant::now(),
        )
        .unwrap();
        InboundAuthz::new(
            &c,
            Arc::new(Discovery::new(table)),
            &mut Registry::default(),
        )
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    const API: &str = "10.2.0.2:8080";

    #[test]
    fn first_matching_rule_decides_then_default() {
        let a = authz(
            r#"
[authorization]
default = "deny"
[[authorization.rules]]
name = "no-batch"
action = "deny"
sources = ["spiffe://cluster.local/ns/default/sa/batch"]
[[authorization.rules]]
action = "allow"
sources = ["spiffe://cluster.local/ns/default/sa/*"]
services = ["api"]
ports = [8080]
"#,
        );
        let d = a.decide(&id("batch"), API.parse().unwrap());
        assert!(!d.allow);
        assert_eq!(d.rule, "no-batch");
        assert!(d.reason.contains("denied by rule no-batch"), "{}", d.reason);
        assert!(
            d.reason
                .contains("spiffe://cluster.local/ns/default/sa/api (default/api"),
            "{}",
            d.reason
        );
        let d = a.decide(&id("web"), API.parse().unwrap());
        assert!(d.allow, "{d:?}");
        assert_eq!((d.rule.as_str(), d.service.as_str()), ("rules[1]", "api"));
        // Another port of the same pod: no rule matches, default deny.
        let d = a.decide(&id("web"), "10.2.0.2:9000".parse().unwrap());
        assert!(!d.allow);
        assert_eq!(d.rule, "default");
        let other_ns = SpiffeId::new("cluster.local", "prod", "web").unwrap();
        assert!(!a.decide(&other_ns, API.parse().unwrap()).allow);
    }

    #[test]
    fn only_local_pods_are_targets() {
        let a = authz("");
        assert!(a.decide(&id("web"), API.parse().unwrap()).allow);
        let d = a.decide(&id("web"), "10.0.0.1:4191".parse().unwrap());
        assert!(!d.allow);
        assert!(d.reason.contains("not a pod on node node1"), "{}", d.reason);
        // A stream admitted to a pod that has left is not ended for it;
        // a rule that denies it is.
        assert!(
            a.recheck(&id("web"), "10.0.0.1:4191".parse().unwrap())
                .is_none()
        );
        let a = authz(
            r#"
[[authorization.rules]]
name = "no-batch"
action = "deny"
sources = ["spiffe://cluster.local/ns/default/sa/batch"]
"#,
        );
        assert!(a.recheck(&id("batch"), API.parse().unwrap()).is_some());
    }
}
