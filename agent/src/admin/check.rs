//! `GET /check`: the facts `waymark check` judges, as the agent sees them
//! at the moment of the request: readiness, its programs as the kernel
//! lists them on the cgroup, each pod's listeners in the kernel's socket
//! table of the pod's namespace, services and their endpoints, its
//! certificates and its clock. The CLI decides what passes.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::AdminState;
use crate::proxy::listener::listening_in_netns;
use crate::redirect::query::RedirectState;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentFacts {
    pub node: String,
    pub version: String,
    pub pid: u32,
    /// The agent's CLOCK_REALTIME, seconds since the Unix epoch.
    pub now_unix: f64,
    /// Unmet readiness conditions; empty when ready.
    pub pending: Vec<String>,
    /// `redirect.cgroup` as configured (relative to the cgroup2 mount when
    /// not absolute); `None` when the programs are attached nowhere.
    pub cgroup_configured: Option<PathBuf>,
    pub redirect: RedirectState,
    /// `redirect.on_agent_down` (empty from an agent that predates it).
    #[serde(default)]
    pub on_agent_down: String,
    /// `redirect.pin_path`, where the links stay pinned.
    #[serde(default)]
    pub pin_path: Option<PathBuf>,
    pub pods: Vec<PodFacts>,
    /// The file the agent was started with; `None` for the embedded default.
    pub config_path: Option<PathBuf>,
    pub services: Vec<ServiceFacts>,
    /// Empty when no workload identities are configured.
    pub certificates: Vec<CertFacts>,
    /// Kubernetes discovery: its watches, what it skipped, pods waiting
    /// for their sandbox (`None`: discovery is off).
    #[serde(default)]
    pub kubernetes: Option<crate::kube::Report>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodFacts {
    pub name: String,
    pub netns: PathBuf,
    pub port: u16,
    pub ipv4_listening: bool,
    pub ipv6_listening: bool,
    /// Why the pod's namespace could not be looked at.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceFacts {
    pub name: String,
    pub endpoints: usize,
    /// Endpoints failure accrual has not ejected.
    pub available: usize,
}

/// One certificate's validity, as `waymark check` judges it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertFacts {
    /// The SPIFFE ID (a leaf) or the subject (an issuer or trust anchor).
    pub identity: String,
    pub kind: CertKind,
    pub not_before_unix: Option<i64>,
    pub not_after_unix: i64,
    /// For leaves: when the store should have rotated it.
    pub rotate_after_unix: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertKind {
    /// A workload's short-lived certificate, rotated at half-life: it must
    /// be valid and its rotation not overdue.
    Leaf,
    /// The agent's issuer (the CA it signs leaves with): it must stay
    /// valid for `--expiry-days` more days.
    Issuer,
    /// A root of the trust bundle: the same rule as the issuer.
    TrustAnchor,
}

impl CertKind {
    /// Issuers and anchors live for months and are replaced by an
    /// operator; leaves live for hours and are rotated by the agent.
    pub fn is_authority(self) -> bool {
        matches!(self, CertKind::Issuer | CertKind::TrustAnchor)
    }
}

impl From<&crate::identity::authority::Authority> for CertFacts {
    fn from(a: &crate::identity::authority::Authority) -> Self {
        use crate::identity::authority::AuthorityKind;
        let secs = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        CertFacts {
            identity: a.subject.clone(),
            kind: match a.kind {
                AuthorityKind::Issuer => CertKind::Issuer,
                AuthorityKind::TrustAnchor => CertKind::TrustAnchor,
            },
            not_before_unix: Some(secs(a.not_before)),
            not_after_unix: secs(a.not_after),
            rotate_after_unix: None,
        }
    }
}

/// Every certificate the node's mTLS depends on: the workload leaves it
/// holds, its issuer and the trust anchors.
pub fn certificates(identity: &crate::identity::manager::IdentityManager) -> Vec<CertFacts> {
    let leaves = identity.store().expiries();
    let mut all: Vec<CertFacts> = leaves.iter().map(CertFacts::from).collect();
    all.extend(identity.authorities().iter().map(CertFacts::from));
    all
}

impl From<&crate::identity::store::Expiry> for CertFacts {
    fn from(e: &crate::identity::store::Expiry) -> Self {
        let secs = |t: SystemTime| unix(t) as i64;
        CertFacts {
            identity: e.id.to_string(),
            kind: CertKind::Leaf,
            not_before_unix: None,
            not_after_unix: secs(e.not_after),
            rotate_after_unix: Some(secs(e.rotate_after)),
        }
    }
}

pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn facts(state: &AdminState) -> AgentFacts {
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let pods = config
        .pods
        .iter()
        .map(|p| {
            let (v4, v6, error) = match listening_in_netns(&p.netns, config.outbound.port) {
                Ok((v4, v6)) => (v4, v6, None),
                Err(e) => (false, false, Some(e.to_string())),
            };
            PodFacts {
                name: p.name.clone(),
                netns: p.netns.clone(),
                port: config.outbound.port,
                ipv4_listening: v4,
                ipv6_listening: v6,
                error,
            }
        })
        .collect();
    let now = std::time::Instant::now();
    let mut services: Vec<ServiceFacts> = state
        .discovery
        .current()
        .services()
        .map(|s| ServiceFacts {
            name: s.name.clone(),
            endpoints: s.balancer.len(),
            available: s.balancer.available(now),
        })
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    AgentFacts {
        node: config.node.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        now_unix: unix(SystemTime::now()),
        pending: state
            .readiness
            .pending()
            .into_iter()
            .map(str::to_string)
            .collect(),
        cgroup_configured: config.redirect.cgroup.clone(),
        redirect: (state.redirect_state)(),
        on_agent_down: config.redirect.on_agent_down.as_str().to_string(),
        pin_path: Some(config.redirect.pin_path.clone()),
        pods,
        // Absolute, so the CLI finds the file whatever its own directory.
        config_path: state
            .config_path
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        services,
        certificates: (state.certificates)(),
        kubernetes: (state.kubernetes)(),
    }
}
