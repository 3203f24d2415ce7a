//! The world's addresses and the `ip` commands that wire it up.
//!
//! ```text
//!  fabric netns (bridge br0)
//!    ├─ veth n<i> ── eth0 in node i: 10.0.0.(i+1)/24, fd00::(i+1)/64
//!    │                 bridge `pods`: 10.(i+1).0.1/24, fd00:(i+1)::1/64
//!    │                   └─ veth p<j> ── eth0 in pod j: 10.(i+1).0.(j+2)/24, fd00:(i+1)::(j+2)/64
//! ```
//! Nodes forward (v4 and v6, set inside each node netns) and route the other
//! nodes' pod networks via those nodes' fabric addresses. Pods route
//! everything via their node's bridge address. Nothing routes out of the
//! machine: no namespace has a link to the root namespace.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::net::sysctl_in;

pub const FABRIC_NET: &str = "10.0.0.0/24";
pub const FABRIC_NET6: &str = "fd00::/64";

pub fn node_fabric_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, (i + 1) as u8)
}

pub fn node_fabric_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, (i + 1) as u16)
}

pub fn node_bridge_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (i + 1) as u8, 0, 1)
}

pub fn node_bridge_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, (i + 1) as u16, 0, 0, 0, 0, 0, 1)
}

pub fn pod_cidr(i: usize) -> String {
    format!("10.{}.0.0/24", i + 1)
}

pub fn pod_cidr6(i: usize) -> String {
    format!("fd00:{:x}::/64", i + 1)
}

pub fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (i + 1) as u8, 0, (j + 2) as u8)
}

pub fn pod_ip6(i: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, (i + 1) as u16, 0, 0, 0, 0, 0, (j + 2) as u16)
}

/// The largest world the address plan allows.
pub const MAX_NODES: usize = 100;
pub const MAX_PODS: usize = 200;

/// Runs a batch of `ip` commands, inside `netns` if given.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("running `ip` (iproute2); is it installed?")?;
    let script = lines.join("\n") + "\n";
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed ({}): {}\nscript:\n{script}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sysctls every world namespace gets before links exist: no IPv6 duplicate
/// address detection, so addresses (link-local ones too) work at once.
pub fn base_sysctls(netns: &Path) -> Result<()> {
    sysctl_in(netns, "net.ipv6.conf.all.accept_dad", "0")?;
    sysctl_in(netns, "net.ipv6.conf.default.accept_dad", "0")?;
    Ok(())
}

/// A node forwards between its pods and the fabric. Its agent opens one
/// upstream connection per proxied connection from the node's address, so
/// like any node that runs a proxy it gets the full ephemeral port range and
/// reuse of TIME_WAIT ports for new outgoing connections; without them a
/// burst of short connections to one destination runs out of source ports
/// (EADDRNOTAVAIL) after ~28k connections in a minute.
///
/// The ports agents bind in the node's namespace while connections come
/// and go — the admin API (4191), the tunnel (15008) and successors' admin
/// ports during a rollout (19100–19199) — are kept out of that range: an
/// outgoing connection that drew one as its source port made a successor's
/// bind fail with EADDRINUSE (seen once in CI, rollout test).
pub fn node_sysctls(netns: &Path) -> Result<()> {
    sysctl_in(netns, "net.ipv4.ip_forward", "1")?;
    sysctl_in(netns, "net.ipv6.conf.all.forwarding", "1")?;
    sysctl_in(
        netns,
        "net.ipv4.ip_local_reserved_ports",
        "4191,15000-15099,19100-19199",
    )?;
    sysctl_in(netns, "net.ipv4.ip_local_port_range", "1024 65535")?;
    sysctl_in(netns, "net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

/// The fabric: a bridge, and one veth per node (peer `eth0` in the node).
pub fn fabric_script(node_netns: &[String]) -> Vec<String> {
    let mut l = vec![
        "link set lo up".to_string(),
        "link add br0 type bridge mcast_snooping 0".to_string(),
        "link set br0 up".to_string(),
    ];
    for (i, ns) in node_netns.iter().enumerate() {
        l.push(format!("link add n{i} type veth peer name eth0 netns {ns}"));
        l.push(format!("link set n{i} master br0"));
        l.push(format!("link set n{i} up"));
    }
    l
}

/// Node `i`: its fabric address, the `pods` bridge, one veth per pod (peer
/// `eth0` in the pod), routes to the other nodes' pods.
pub fn node_script(i: usize, nodes: usize, pod_netns: &[String]) -> Vec<String> {
    let mut l = vec![
        "link set lo up".to_string(),
        format!("addr add {}/24 dev eth0", node_fabric_ip(i)),
        format!("addr add {}/64 dev eth0 nodad", node_fabric_ip6(i)),
        "link set eth0 up".to_string(),
        "link add pods type bridge mcast_snooping 0".to_string(),
        format!("addr add {}/24 dev pods", node_bridge_ip(i)),
        format!("addr add {}/64 dev pods nodad", node_bridge_ip6(i)),
        "link set pods up".to_string(),
    ];
    for (j, ns) in pod_netns.iter().enumerate() {
        l.push(format!("link add p{j} type veth peer name eth0 netns {ns}"));
        l.push(format!("link set p{j} master pods"));
        l.push(format!("link set p{j} up"));
    }
    for k in (0..nodes).filter(|&k| k != i) {
        l.push(format!(
            "route add {} via {}",
            pod_cidr(k),
            node_fabric_ip(k)
        ));
        l.push(format!(
            "route add {} via {}",
            pod_cidr6(k),
            node_fabric_ip6(k)
        ));
    }
    l
}

/// Pod `j` of node `i`: addresses on `eth0`, default routes via the node.
pub fn pod_script(i: usize, j: usize) -> Vec<String> {
    vec![
        "link set lo up".to_string(),
        format!("addr add {}/24 dev eth0", pod_ip(i, j)),
        format!("addr add {}/64 dev eth0 nodad", pod_ip6(i, j)),
        "link set eth0 up".to_string(),
        format!("route add default via {}", node_bridge_ip(i)),
        format!("route add ::/0 via {}", node_bridge_ip6(i)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan() {
        assert_eq!(node_fabric_ip(0).to_string(), "10.0.0.1");
        assert_eq!(node_fabric_ip6(1).to_string(), "fd00::2");
        assert_eq!(pod_ip(1, 0).to_string(), "10.2.0.2");
        assert_eq!(pod_ip6(0, 1).to_string(), "fd00:1::3");
        assert_eq!(node_bridge_ip6(0).to_string(), "fd00:1::1");
        assert_eq!(pod_cidr6(9), "fd00:a::/64");
        assert_eq!(pod_ip6(9, 0).to_string(), "fd00:a::2");
    }
}
