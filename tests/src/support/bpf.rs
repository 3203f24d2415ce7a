//! The kernel's own view of waymark's programs, through bpftool: what is
//! attached to a node's cgroup, and detaching a link behind the agent's back
//! (what `waymark check` and MESHED must notice).

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::world::{Node, in_ci};

/// Whether bpftool is missing, so the calling test should skip (outside CI)
/// after saying why; in CI a missing bpftool fails the test instead.
pub fn bpftool_missing(test: &str) -> bool {
    if Command::new("bpftool").arg("version").output().is_ok() {
        return false;
    }
    if in_ci() {
        panic!("bpftool is not installed (cargo xtask setup installs it)");
    }
    eprintln!("SKIPPED {test}: no bpftool");
    true
}

/// The ids and attach types of the BPF links on `node`'s cgroup, as
/// `bpftool link show` lists them (cgroup id = the directory's inode).
pub fn cgroup_links(node: &Node) -> Result<Vec<(u64, String)>> {
    let cgroup_id = std::fs::metadata(node.cgroup_path())?.ino();
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool link show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(links
        .as_array()
        .context("bpftool's JSON")?
        .iter()
        .filter(|l| l["cgroup_id"].as_u64() == Some(cgroup_id))
        .map(|l| {
            (
                l["id"].as_u64().unwrap_or_default(),
                l["attach_type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// Detaches the link of `attach_type` (e.g. `cgroup_inet4_connect`) from
/// `node`'s cgroup. The agent attaches with BPF links, which `bpftool cgroup
/// detach` cannot remove: the kernel detaches a link-attached program only
/// through its link.
pub fn detach_link(node: &Node, attach_type: &str) -> Result<()> {
    let links = cgroup_links(node)?;
    let (id, _) = links
        .iter()
        .find(|(_, t)| t == attach_type)
        .with_context(|| format!("no {attach_type} link: {links:?}"))?;
    let out = Command::new("bpftool")
        .args(["link", "detach", "id", &id.to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool link detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
