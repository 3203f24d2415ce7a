//! Names, ids and the state a world records under `/run/waymark-world/<name>/`
//! so that `cargo xtask world down` can find it after a crash.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Where worlds record their state and logs (env `WAYMARK_WORLD_ROOT`
/// overrides it).
pub fn state_root() -> PathBuf {
    std::env::var_os("WAYMARK_WORLD_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/waymark-world"))
}

/// The directory of the world named `name`: its state, configs and logs.
pub fn world_dir(name: &str) -> PathBuf {
    state_root().join(name)
}

/// Where the agents of the world named `name` pin their kernel state
/// (`redirect.pin_path` of node i is `node<i>` below it): a bpffs instance
/// of the world's own, mounted in its directory (each `mount -t bpf` is a
/// new, empty instance), so worlds never see each other's pins or the
/// host's, and unmounting it removes every pin.
pub fn pin_root(name: &str) -> PathBuf {
    world_dir(name).join("bpf")
}

/// Mounts the world's bpffs at [`pin_root`].
pub fn mount_pin_root(name: &str) -> Result<PathBuf> {
    let dir = pin_root(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    nix::mount::mount(
        Some("bpf"),
        &dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting a bpffs at {}", dir.display()))?;
    Ok(dir)
}

/// Unmounts the world's bpffs (if mounted), which unpins everything the
/// agents pinned there: their links detach from the world's cgroups and
/// their maps are freed. Returns whether there was one.
pub fn unmount_pin_root(name: &str) -> Result<bool> {
    let pins = pin_root(name);
    if !is_bpffs(&pins) {
        return Ok(false);
    }
    nix::mount::umount2(&pins, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", pins.display()))?;
    Ok(true)
}

/// Whether `dir` is a bpffs mount (BPF_FS_MAGIC).
pub fn is_bpffs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|fs| fs.filesystem_type().0 as u64 == 0xcafe_4a11)
        .unwrap_or(false)
}

/// A world's name becomes part of paths (state dir, cgroup): 1 to 64 of
/// `A-Z a-z 0-9 _ - .`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with(['.', '-']) {
        bail!(
            "bad world name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ - . (not starting with . or -)"
        );
    }
    Ok(())
}

/// `name` shortened to the 64 characters a world name may have: names that
/// fit are kept as they are; longer ones keep their first 57 characters and
/// end in `-` and the world id of the whole name.
pub fn fit_name(name: &str) -> String {
    const MAX: usize = 64;
    if name.len() <= MAX {
        return name.to_string();
    }
    let id = world_id(name);
    let mut keep = MAX - 1 - id.len();
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}-{id}", &name[..keep])
}

/// The short id of a world: the first 6 hex digits of the FNV-1a hash of its
/// name (24 bits: a few hundred worlds alive at once rarely share one). Stable across runs and builds, so `down` can recompute it.
pub fn world_id(name: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h >> 8)
}

/// The prefix of every network namespace of the world with id `id`.
pub fn netns_prefix(id: &str) -> String {
    format!("wm{id}-")
}

/// What a world records about itself in `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorldState {
    pub name: String,
    pub id: String,
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    pub fabric_netns: String,
    pub nodes: Vec<NodeState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub netns_path: PathBuf,
    /// The node's pods cgroup, which its agent attaches to.
    pub cgroup: PathBuf,
    pub fabric_ip: String,
    pub fabric_ip6: String,
    pub pod_cidr: String,
    pub pod_cidr6: String,
    pub admin: String,
    /// The agent's admin socket (every endpoint; the TCP `admin` serves
    /// `/live`, `/ready` and `/metrics` only).
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    pub agent: bool,
    pub config: PathBuf,
    pub log: PathBuf,
    pub pods: Vec<PodState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub ip: String,
    pub ip6: String,
}

impl WorldState {
    pub(crate) fn write(&self) -> Result<()> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Reads the recorded state of the world named `name`, if there is one.
pub fn read_state(name: &str) -> Result<Option<WorldState>> {
    let path = world_dir(name).join("state.json");
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The names of the worlds that have a directory under [`state_root`].
pub fn list_worlds() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state_root()) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_name(n).is_ok())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_stable_and_spread() {
        assert_eq!(world_id("dev"), world_id("dev"));
        assert_eq!(world_id("dev").len(), 6);
        assert_ne!(
            world_id("pods_reach_across_nodes"),
            world_id("pods_reach_across_nodes6")
        );
        // The longest netns name stays short enough to read in `ip netns`.
        assert!(format!("{}n49p199", netns_prefix(&world_id("x"))).len() <= 16);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("pods_reach_across_nodes").is_ok());
        assert!(validate_name("a.b-c_1").is_ok());
        for bad in ["", "a/b", "..", "-x", "a b", "tests::x", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_names_are_fitted_and_stay_apart() {
        assert_eq!(fit_name("short"), "short");
        let exact = "x".repeat(64);
        assert_eq!(fit_name(&exact), exact);
        let a = fit_name("tunnel_handshakes_beyond_the_cap_are_reset_and_the_data_path_flows");
        let b = fit_name("tunnel_handshakes_beyond_the_cap_are_reset_and_the_data_path_flows-ci");
        for n in [&a, &b] {
            assert!(validate_name(n).is_ok(), "{n:?}");
            assert!(n.starts_with("tunnel_handshakes_beyond"), "{n:?}");
        }
        assert_ne!(a, b);
    }
}
