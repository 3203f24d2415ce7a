//! `[kubernetes]`: discovery from the API server (see `crate::kube`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Off by default: a plain host runs from the config file alone. On a
/// cluster the DaemonSet turns it on (in-cluster credentials), or
/// `waymark agent --kubeconfig FILE` does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    #[serde(default)]
    pub enabled: bool,
    /// A kubeconfig file; without it the in-cluster service account is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace label and pod annotation that enroll pods:
    /// `<mesh_label>: enabled` on a namespace enrolls its pods, on a pod
    /// enrolls that pod; `disabled` on a pod keeps it out.
    #[serde(default = "default_mesh_label")]
    pub mesh_label: String,
    /// The port of every node's tunnel listener (on its InternalIP).
    #[serde(default = "default_tunnel_port")]
    pub tunnel_port: u16,
    /// Where the host's `/proc` is (mounted read-only into the agent's pod,
    /// e.g. `/host/proc`): pods' network namespaces are found there.
    #[serde(default = "default_proc")]
    pub proc: PathBuf,
    /// How often a local pod whose sandbox is not found yet is looked for
    /// again.
    #[serde(default = "default_retry", with = "humantime_serde")]
    pub netns_retry: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: None,
            mesh_label: default_mesh_label(),
            tunnel_port: default_tunnel_port(),
            proc: default_proc(),
            netns_retry: default_retry(),
        }
    }
}

fn default_mesh_label() -> String {
    "waymark.dev/mesh".into()
}

fn default_tunnel_port() -> u16 {
    15008
}

fn default_proc() -> PathBuf {
    "/proc".into()
}

fn default_retry() -> Duration {
    Duration::from_secs(1)
}

impl KubernetesConfig {
    pub fn validate(&self, problems: &mut Vec<String>) {
        if self.mesh_label.trim().is_empty() {
            problems.push("kubernetes.mesh_label: must not be empty".into());
        }
        if self.tunnel_port == 0 {
            problems.push("kubernetes.tunnel_port: must not be 0".into());
        }
        if self.netns_retry.is_zero() {
            problems.push("kubernetes.netns_retry: must be greater than 0".into());
        }
    }
}
