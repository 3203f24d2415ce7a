//! The mTLS mesh between node agents, as the config file declares it:
//! where the identity material is (`[identity]`), where the inbound tunnel
//! listens (`[inbound]`), how to reach every other node's agent
//! (`[[nodes]]`) and who may reach what (`[authorization]`).
//!
//! mTLS is on when `[identity]` is present; without it the agent proxies in
//! plaintext as before, and `[[nodes]]`, `[authorization]` and pods'
//! `identity` are refused as meaningless.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::identity::init::DEFAULT_TRUST_DOMAIN;

/// Default leaf lifetime (the issuer's default).
pub const DEFAULT_LEAF_LIFETIME: Duration = crate::identity::issuer::DEFAULT_LEAF_LIFETIME;
/// Shortest leaf lifetime accepted: rotation runs at half-life and needs a
/// few ticks of room.
pub const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(5);
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// The namespace of node agents' own identities:
/// `spiffe://<trust domain>/ns/waymark-system/sa/<node name>`.
pub const NODE_IDENTITY_NAMESPACE: &str = "waymark-system";

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The trust domain of every identity (`spiffe://<trust_domain>/…`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// PEM file of the trust anchors (cert-manager's `ca.crt`).
    pub trust_bundle: PathBuf,
    /// PEM file of the issuer (intermediate CA) certificate (`tls.crt`).
    pub issuer_cert: PathBuf,
    /// PEM file of the issuer's private key (`tls.key`).
    pub issuer_key: PathBuf,
    /// Lifetime of the workload leaves this agent mints; they are renewed at
    /// half of it.
    #[serde(default = "default_leaf_lifetime", with = "humantime_serde")]
    pub leaf_lifetime: Duration,
    /// The identity this agent presents as a tunnel server. Default:
    /// `spiffe://<trust_domain>/ns/waymark-system/sa/<node.name>`.
    #[serde(default)]
    pub node_identity: Option<String>,
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_leaf_lifetime() -> Duration {
    DEFAULT_LEAF_LIFETIME
}

impl IdentityConfig {
    /// This agent's own identity (validated config assumed; falls back to
    /// the default rule if the configured one does not parse).
    pub fn node_identity(&self, node_name: &str) -> Option<SpiffeId> {
        match &self.node_identity {
            Some(s) => s.parse().ok(),
            None => default_node_identity(&self.trust_domain, node_name),
        }
    }
}

/// `spiffe://<td>/ns/waymark-system/sa/<node>`; `None` if the node name is
/// not a valid path segment.
pub fn default_node_identity(trust_domain: &str, node_name: &str) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, NODE_IDENTITY_NAMESPACE, node_name).ok()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Addresses of the inbound tunnel listener (mTLS + HTTP/2 CONNECT).
    /// Only bound when `[identity]` is set.
    #[serde(default = "default_inbound_listen")]
    pub listen: Vec<SocketAddr>,
    /// A client must finish its TLS handshake within this time.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// `strict`: a meshed pod (one with an identity) accepts new TCP
    /// connections from other nodes only through the tunnel; plaintext
    /// from another node is dropped by the kernel. `permissive` (the
    /// default, for migration) lets plaintext in too.
    #[serde(default)]
    pub mode: InboundMode,
}

/// See [`InboundConfig::mode`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    #[default]
    Permissive,
    Strict,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            listen: default_inbound_listen(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            mode: InboundMode::default(),
        }
    }
}

/// The inbound tunnel port, as in ztunnel's HBONE.
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;

/// Where the inbound tunnel listens unless told otherwise: ztunnel's HBONE
/// port on every IPv4 address of the node.
fn default_inbound_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from((
        std::net::Ipv4Addr::UNSPECIFIED,
        DEFAULT_TUNNEL_PORT,
    ))]
}

fn default_handshake_timeout() -> Duration {
    DEFAULT_HANDSHAKE_TIMEOUT
}

/// Another node's agent: where its tunnel listens and who it must be.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node name endpoints carry in their `node` field.
    pub name: String,
    /// The agent's inbound tunnel address (`ip:15008`).
    pub tunnel: SocketAddr,
    /// The identity its agent must present. Default: the node identity rule
    /// (`spiffe://<td>/ns/waymark-system/sa/<name>`).
    #[serde(default)]
    pub identity: Option<String>,
}

impl NodeEntry {
    pub fn identity(&self, trust_domain: &str) -> Option<SpiffeId> {
        match &self.identity {
            Some(s) => s.parse().ok(),
            None => default_node_identity(trust_domain, &self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Who may open tunnel streams to this node's pods. Rules are tried in
/// order; the first that matches decides; none matching means `default`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    #[serde(default)]
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<AuthzRuleConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthzRuleConfig {
    /// Shown in logs and in the denial reason.
    #[serde(default)]
    pub name: Option<String>,
    pub action: Action,
    /// Source identities: exact SPIFFE IDs, `spiffe://<td>/ns/<ns>/sa/*`
    /// for a whole namespace, or `*` for every authenticated source.
    pub sources: Vec<String>,
    /// Destination services (by name) the target endpoint belongs to;
    /// empty: any destination.
    #[serde(default)]
    pub services: Vec<String>,
    /// Destination (endpoint) ports; empty: any port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Destination pods of this node, by name (`namespace/name`); empty:
    /// any pod. (An `AuthorizationPolicy`'s selector becomes this list.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

/// A source pattern of an authorization rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourcePattern {
    Any,
    Namespace {
        trust_domain: String,
        namespace: String,
    },
    Exact(SpiffeId),
}

impl SourcePattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if let Some(prefix) = s.strip_suffix("/sa/*") {
            // Reuse the ID parser for the namespace part.
            let probe = format!("{prefix}/sa/x");
            let id: SpiffeId = probe.parse().map_err(|e| format!("{e}"))?;
            return Ok(Self::Namespace {
                trust_domain: id.trust_domain().to_string(),
                namespace: id.namespace().to_string(),
            });
        }
        s.parse()
            .map(Self::Exact)
            .map_err(|e: crate::identity::SpiffeIdError| {
                format!("{e}; use a SPIFFE ID, spiffe://<td>/ns/<ns>/sa/* or *")
            })
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == namespace,
            Self::Exact(want) => want == id,
        }
    }

    fn trust_domain(&self) -> Option<&str> {
        match self {
            Self::Any => None,
            Self::Namespace { trust_domain, .. } => Some(trust_domain),
            Self::Exact(id) => Some(id.trust_domain()),
        }
    }
}

/// Checks the mesh sections; pushes every problem found.
pub fn validate(c: &super::Config, problems: &mut Vec<String>) {
    let Some(id) = &c.identity else {
        if c.inbound.mode == InboundMode::Strict {
            problems.push(
                "inbound.mode: \"strict\" needs an [identity] section: without the mTLS tunnel nothing from another node could reach a pod"
                    .into(),
            );
        }
        if !c.nodes.is_empty() {
            problems.push(
                "nodes: declared but there is no [identity] section; node-to-node mTLS is off without it"
                    .into(),
            );
        }
        if c.authorization != AuthorizationConfig::default() {
            problems.push(
                "authorization: set but there is no [identity] section; without mTLS there is no verified source to authorize"
                    .into(),
            );
        }
        for (i, pod) in c.pods.iter().enumerate() {
            if pod.identity.is_some() {
                problems.push(format!(
                    "pods[{i}].identity: set but there is no [identity] section to issue its certificate"
                ));
            }
        }
        return;
    };
    let td = id.trust_domain.as_str();
    if let Err(e) = crate::identity::spiffe::validate_trust_domain(td) {
        problems.push(format!("identity.trust_domain: {e}"));
        return;
    }
    // `config check` loads the material as the agent would, so a wrong path,
    // a key that is not the certificate's or a foreign trust domain shows
    // before a rollout.
    if let Err(e) =
        crate::identity::Issuer::load(&id.trust_bundle, &id.issuer_cert, &id.issuer_key, td)
    {
        problems.push(format!("identity: {e}"));
    }
    if id.leaf_lifetime < MIN_LEAF_LIFETIME || id.leaf_lifetime > MAX_LEAF_LIFETIME {
        problems.push(format!(
            "identity.leaf_lifetime: {} is not within {}..={}",
            humantime::format_duration(id.leaf_lifetime),
            humantime::format_duration(MIN_LEAF_LIFETIME),
            humantime::format_duration(MAX_LEAF_LIFETIME),
        ));
    }
    match &id.node_identity {
        Some(s) => check_id("identity.node_identity", s, td, problems),
        None => {
            if default_node_identity(td, &c.node.name).is_none() {
                problems.push(format!(
                    "identity.node_identity: node.name {:?} cannot be a SPIFFE path segment; set node_identity",
                    c.node.name
                ));
            }
        }
    }
    if c.inbound.listen.is_empty() {
        problems.push(
            "inbound.listen: empty; peers could not reach this node's pods through the tunnel"
                .into(),
        );
    }
    for (i, a) in c.inbound.listen.iter().enumerate() {
        if a.port() == 0 {
            problems.push(format!("inbound.listen[{i}]: {a} has port 0"));
        }
        if c.inbound.listen[..i].contains(a) {
            problems.push(format!("inbound.listen[{i}]: {a} is listed twice"));
        }
    }
    if c.inbound.handshake_timeout.is_zero() {
        problems.push("inbound.handshake_timeout: must be greater than 0".into());
    }
    for (i, pod) in c.pods.iter().enumerate() {
        if let Some(s) = &pod.identity {
            check_id(&format!("pods[{i}].identity"), s, td, problems);
        }
    }
    for (i, n) in c.nodes.iter().enumerate() {
        if n.name.trim().is_empty() {
            problems.push(format!("nodes[{i}].name: must not be empty"));
        } else if c.nodes[..i].iter().any(|o| o.name == n.name) {
            problems.push(format!("nodes[{i}].name: {:?} is declared twice", n.name));
        }
        if n.tunnel.port() == 0 {
            problems.push(format!("nodes[{i}].tunnel: {} has port 0", n.tunnel));
        }
        if n.tunnel.ip().is_unspecified() {
            problems.push(format!(
                "nodes[{i}].tunnel: {} is not an address a peer can dial",
                n.tunnel
            ));
        }
        match &n.identity {
            Some(s) => check_id(&format!("nodes[{i}].identity"), s, td, problems),
            None if default_node_identity(td, &n.name).is_none() => problems.push(format!(
                "nodes[{i}].identity: node name {:?} cannot be a SPIFFE path segment; set identity",
                n.name
            )),
            None => {}
        }
    }
    // An endpoint on a node nobody told us how to reach would silently go
    // in plaintext: refuse that rather than leak. Sets, not scans: a
    // cluster's 50,000 endpoints on hundreds of nodes, checked on every
    // change discovery applies, share a few hundred names and identities.
    let known: std::collections::HashSet<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut good_ids: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, svc) in c.services.iter().enumerate() {
        for (j, ep) in svc.endpoints.iter().enumerate() {
            if let Some(node) = &ep.node
                && **node != *c.node.name
                && !known.contains(&**node)
            {
                problems.push(format!(
                    "services[{i}] ({}).endpoints[{j}].node: node {node:?} is not in [[nodes]], so its tunnel address is unknown",
                    svc.name
                ));
            }
            if let Some(id) = &ep.identity
                && !good_ids.contains(&**id)
                && let Ok(parsed) = id.parse::<SpiffeId>()
            {
                if parsed.trust_domain() == td {
                    good_ids.insert(id);
                } else {
                    let at = format!("services[{i}] ({}).endpoints[{j}].identity", svc.name);
                    check_id(&at, id, td, problems);
                }
            }
        }
    }
    for (i, r) in c.authorization.rules.iter().enumerate() {
        let at = match &r.name {
            Some(n) => format!("authorization.rules[{i}] ({n})"),
            None => format!("authorization.rules[{i}]"),
        };
        if r.sources.is_empty() {
            problems.push(format!(
                "{at}.sources: empty, so the rule never matches; use [\"*\"] for every source"
            ));
        }
        for (k, s) in r.sources.iter().enumerate() {
            match SourcePattern::parse(s) {
                Ok(p) => {
                    if let Some(other) = p.trust_domain().filter(|t| *t != td) {
                        problems.push(format!(
                            "{at}.sources[{k}]: {s:?} is in trust domain {other:?}, not {td:?}; it can never match"
                        ));
                    }
                }
                Err(e) => problems.push(format!("{at}.sources[{k}]: {e}")),
            }
        }
        for (k, name) in r.services.iter().enumerate() {
            if !c.services.iter().any(|s| &s.name == name) {
                problems.push(format!("{at}.services[{k}]: no service named {name:?}"));
            }
        }
        if r.ports.contains(&0) {
            problems.push(format!("{at}.ports: port 0 is not a port"));
        }
    }
}

fn check_id(at: &str, s: &str, trust_domain: &str, problems: &mut Vec<String>) {
    match s.parse::<SpiffeId>() {
        Ok(id) if id.trust_domain() != trust_domain => problems.push(format!(
            "{at}: {s} is outside the trust domain {trust_domain:?}"
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("{at}: {e}")),
    }
}
