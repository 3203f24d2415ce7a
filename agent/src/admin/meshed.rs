//! The MESHED column of `waymark stat`: like Linkerd's "meshed/total
//! pods", how many of a row's pods have their traffic proxied by waymark.
//!
//! - A pod of this node counts when the agent's programs are all attached
//!   to `redirect.cgroup` (the kernel's word, asked now: a detached
//!   program means its connections bypass the proxy) and the pod's
//!   listener is bound in its network namespace (the kernel's socket table
//!   there). A pod row shows `1/1` or `0/1`.
//! - A service row counts its endpoints: one on this node counts as its
//!   pod does (matched by address; an address that is no configured pod is
//!   not meshed); one on another node counts when that node is in
//!   `[[nodes]]` with mTLS on, i.e. an agent there terminates the tunnel
//!   (whether it answers right now is `waymark check`'s peers group); one
//!   with no node and no local pod address is not meshed.
//!
//! Rows whose name is in no config (traffic to a bare address, a source
//! that is no pod) keep `-`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::AdminState;
use crate::config::Config;
use crate::diagnostics::stats_view::{By, StatRow};
use crate::discovery::Endpoint;
use crate::proxy::listener::listening_in_netns;

/// What the column is computed from, gathered once per request.
#[derive(Debug, Default)]
pub struct MeshView {
    node: String,
    /// Local pods by name: meshed or not.
    pods: HashMap<String, bool>,
    /// Local pods' addresses: meshed or not.
    by_ip: HashMap<IpAddr, bool>,
    /// Other nodes whose agent terminates the tunnel.
    peers: HashSet<String>,
}

impl MeshView {
    /// `programs_attached`: every redirect program is on the cgroup;
    /// `listening(pod)`: the pod's listener is bound.
    pub fn new(
        config: &Config,
        programs_attached: bool,
        listening: impl Fn(&crate::config::PodConfig) -> bool,
    ) -> Self {
        let mut view = MeshView {
            node: config.node.name.clone(),
            ..Default::default()
        };
        for p in &config.pods {
            let meshed = programs_attached && listening(p);
            view.pods.insert(p.name.clone(), meshed);
            for ip in &p.ips {
                view.by_ip.insert(*ip, meshed);
            }
        }
        if config.identity.is_some() {
            view.peers = config
                .nodes
                .iter()
                .filter(|n| n.name != config.node.name)
                .map(|n| n.name.clone())
                .collect();
        }
        view
    }

    fn pod(&self, name: &str) -> Option<String> {
        self.pods.get(name).map(|m| format!("{}/1", u8::from(*m)))
    }

    fn endpoint(&self, e: &Endpoint) -> bool {
        match e.node.as_deref() {
            Some(n) if n != self.node => self.peers.contains(n),
            _ => self.by_ip.get(&e.addr.ip()).copied().unwrap_or(false),
        }
    }

    fn service<'a>(&self, endpoints: impl Iterator<Item = &'a Endpoint>) -> String {
        let (mut meshed, mut total) = (0, 0);
        for e in endpoints {
            total += 1;
            meshed += usize::from(self.endpoint(e));
        }
        format!("{meshed}/{total}")
    }
}

/// Fills `meshed` in `rows` (see the module doc).
pub fn fill(state: &AdminState, by: By, rows: &mut [StatRow]) {
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let redirect = (state.redirect_state)();
    let attached = redirect.cgroup.is_some()
        && !redirect.programs.is_empty()
        && redirect.programs.iter().all(|p| p.attached);
    let port = config.outbound.port;
    let view = MeshView::new(&config, attached, |p| {
        listening_in_netns(&p.netns, port).is_ok_and(|(v4, _)| v4)
    });
    let table = state.discovery.current();
    for row in rows {
        row.meshed = match by {
            By::Pod => view.pod(&row.name),
            By::Service => table
                .by_name(&row.name)
                .map(|s| view.service(s.balancer.endpoints())),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mtls: bool) -> Config {
        let mut text = String::from(
            r#"
[node]
name = "node0"

[[pods]]
name = "default/a"
netns = "/run/netns/a"
ips = ["10.0.0.1"]

[[pods]]
name = "default/b"
netns = "/run/netns/b"
ips = ["10.0.0.2"]
"#,
        );
        if mtls {
            text.push_str(
                r#"
[identity]
trust_bundle = "/x/ca.crt"
issuer_cert = "/x/issuer.crt"
issuer_key = "/x/issuer.key"

[[nodes]]
name = "node0"
tunnel = "10.1.0.1:15008"

[[nodes]]
name = "node1"
tunnel = "10.1.0.2:15008"
"#,
            );
        }
        toml::from_str(&text).unwrap()
    }

    fn ep(addr: &str, node: Option<&str>) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            node: node.map(Into::into),
            weight: 1,
            zone: None,
            identity: None,
            pod: None,
        }
    }

    #[test]
    fn a_pod_counts_when_the_programs_are_attached_and_it_listens() {
        let c = config(false);
        let v = MeshView::new(&c, true, |p| p.name == "default/a");
        assert_eq!(v.pod("default/a").as_deref(), Some("1/1"));
        assert_eq!(v.pod("default/b").as_deref(), Some("0/1"));
        assert_eq!(v.pod("default/elsewhere"), None);
        let detached = MeshView::new(&c, false, |_| true);
        assert_eq!(detached.pod("default/a").as_deref(), Some("0/1"));
    }

    #[test]
    fn a_service_counts_local_pods_and_endpoints_on_peer_nodes() {
        let eps = [
            ep("10.0.0.1:80", None),          // local pod a, meshed
            ep("10.0.0.2:80", Some("node0")), // local pod b, not listening
            ep("10.0.2.9:80", Some("node1")), // a peer's pod
            ep("10.0.3.9:80", Some("node7")), // a node without an agent we know
            ep("192.0.2.1:80", None),         // no pod at all
        ];
        let v = MeshView::new(&config(true), true, |p| p.name == "default/a");
        assert_eq!(v.service(eps.iter()), "2/5");
        // Without mTLS no remote agent terminates a tunnel.
        let plain = MeshView::new(&config(false), true, |p| p.name == "default/a");
        assert_eq!(plain.service(eps.iter()), "1/5");
        assert_eq!(v.service([].iter()), "0/0");
    }
}
