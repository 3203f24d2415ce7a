//! Finding a pod's network namespace without the operator: the pod's
//! processes sit in a cgroup whose path carries the pod's UID (kubelet's
//! `…pod<uid>…` with either cgroup driver), so `/proc/<pid>/cgroup` names
//! the pod and `/proc/<pid>/ns/net` is its namespace. Before that namespace
//! is trusted it must hold the pod's IP, as ztunnel's CNI agent checks: a
//! process that happens to match (or a recycled pid) must not make the
//! agent bind a pod's listener somewhere else.

use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Why a pod's namespace was not found (yet).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetnsError {
    #[error("no process of the pod is running yet (no cgroup names pod {uid})")]
    NoProcess { uid: String },
    #[error(
        "the processes of pod {uid} ({pids:?}) are in network namespaces that do not hold its addresses {ips:?}"
    )]
    AddressMismatch {
        uid: String,
        pids: Vec<u32>,
        ips: Vec<IpAddr>,
    },
    #[error("cannot read {path}: {error}")]
    Proc { path: PathBuf, error: String },
}

/// The network namespace of the pod with `uid` whose addresses include one
/// of `ips`, as a `/proc/<pid>/ns/net` path.
pub fn find(proc: &Path, uid: &str, ips: &[IpAddr]) -> Result<PathBuf, NetnsError> {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    let entries = std::fs::read_dir(proc).map_err(|e| NetnsError::Proc {
        path: proc.to_path_buf(),
        error: e.to_string(),
    })?;
    let mut candidates = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we read; a vanished one is skipped.
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if cgroup
            .lines()
            .any(|l| l.contains(&dashed) || l.contains(&underscored))
        {
            candidates.push(pid);
        }
    }
    if candidates.is_empty() {
        return Err(NetnsError::NoProcess { uid: uid.into() });
    }
    candidates.sort_unstable();
    for pid in &candidates {
        let path = proc.join(pid.to_string()).join("ns/net");
        if holds_any(&path, ips) {
            return Ok(path);
        }
    }
    Err(NetnsError::AddressMismatch {
        uid: uid.into(),
        pids: candidates,
        ips: ips.to_vec(),
    })
}

/// Whether the namespace at `path` has one of `ips` on an interface.
fn holds_any(path: &Path, ips: &[IpAddr]) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let ips = ips.to_vec();
    // setns changes only the calling thread; this one ends right after.
    std::thread::Builder::new()
        .name("waymark-netns-check".into())
        .spawn(move || {
            if setns(file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                return false;
            }
            let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
                return false;
            };
            addrs.filter_map(|a| a.address).any(|a| {
                let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                    (Some(v4), _) => IpAddr::V4(v4.ip()),
                    (_, Some(v6)) => IpAddr::V6(v6.ip()),
                    _ => return false,
                };
                ips.contains(&ip)
            })
        })
        .ok()
        .and_then(|h| h.join().ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's own process is "the pod": its cgroup line carries a
    /// made-up UID only in a fake /proc, so the scan and the address check
    /// are exercised against real namespace files.
    #[test]
    fn finds_the_namespace_that_holds_the_address_and_refuses_others() {
        let dir = std::env::temp_dir().join(format!("wm-netns-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let me = std::process::id();
        let fake = dir.join(me.to_string());
        std::fs::create_dir_all(fake.join("ns")).unwrap();
        std::fs::write(
            fake.join("cgroup"),
            "0::/kubepods.slice/kubepods-besteffort-pod1234_abcd.slice/cri-x.scope\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/proc/self/ns/net", fake.join("ns/net")).unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            find(&dir, "1234-abcd", &[lo]).unwrap(),
            fake.join("ns/net"),
            "the systemd driver's underscored UID matches"
        );
        let elsewhere: IpAddr = "192.0.2.77".parse().unwrap();
        assert!(matches!(
            find(&dir, "1234-abcd", &[elsewhere]),
            Err(NetnsError::AddressMismatch { .. })
        ));
        assert_eq!(
            find(&dir, "ffff", &[lo]),
            Err(NetnsError::NoProcess { uid: "ffff".into() })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
