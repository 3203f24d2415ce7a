//! Removing a world by name: what `cargo xtask world down` does, and what a
//! new world does first to clear the leftovers of a crashed run.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, bail};

use super::cgroup;
use super::net::{self, netns_inode, netns_path, pids_in_netns};
use super::process::{reap, signal, sweep_netns};
use super::state::{
    list_worlds, netns_prefix, pin_root, read_state, unmount_pin_root, validate_name, world_dir,
    world_id,
};
use super::wait::wait_until;

/// Removes everything of the world named `name`: its processes (SIGTERM,
/// up to `grace`, then SIGKILL), network namespaces, cgroups and state
/// directory. Idempotent. Returns a line per thing it removed.
pub fn remove_world(name: &str, grace: Duration) -> Result<Vec<String>> {
    validate_name(name)?;
    let id = world_id(name);
    let mut done = Vec::new();

    // Another world whose name hashes to the same id owns `wm<id>-*` unless
    // this name has state of its own; then leave those namespaces alone.
    let same_id_others: Vec<String> = list_worlds()
        .into_iter()
        .filter(|n| n != name && world_id(n) == id)
        .collect();
    let ours = world_dir(name).exists();
    let netns = if !same_id_others.is_empty() && !ours {
        eprintln!(
            "waymark world {name}: namespaces wm{id}-* belong to world {:?} (same id); not touching them",
            same_id_others
        );
        Vec::new()
    } else {
        net::list_netns(&netns_prefix(&id))
    };
    let inodes: HashSet<u64> = netns
        .iter()
        .filter_map(|n| netns_inode(&netns_path(n)))
        .collect();

    // Processes in the namespaces: politely first.
    let pids = pids_in_netns(&inodes);
    if !pids.is_empty() {
        for &pid in &pids {
            signal(pid, libc::SIGTERM);
        }
        wait_until(grace, || {
            pids.iter().for_each(|&p| reap(p));
            pids_in_netns(&inodes).is_empty()
        });
        if !sweep_netns(&inodes) {
            bail!(
                "processes still in {netns:?} after SIGKILL: {:?}",
                pids_in_netns(&inodes)
            );
        }
        done.push(format!("stopped {} process(es)", pids.len()));
    }

    // Processes in the cgroups (pods whose netns went away, …).
    let mount = cgroup::cgroup2_mount()?;
    let cg_root = cgroup::world_root(&mount, name);
    if cg_root.exists() {
        let left = cgroup::procs_recursive(&cg_root);
        if !cgroup::kill_tree(&cg_root, Duration::from_secs(5)) {
            bail!(
                "processes still in {} after SIGKILL: {:?}",
                cg_root.display(),
                cgroup::procs_recursive(&cg_root)
            );
        }
        if !left.is_empty() {
            done.push(format!(
                "killed {} process(es) in {}",
                left.len(),
                cg_root.display()
            ));
        }
    }

    // The agents' pinned links and maps: unpinning the last reference
    // detaches the programs from the world's cgroups and frees the maps.
    if unmount_pin_root(name)? {
        done.push(format!(
            "unmounted the pinned eBPF objects {}",
            pin_root(name).display()
        ));
    }
    for n in netns.iter().rev() {
        net::del_netns(n)?;
        done.push(format!("deleted netns {n}"));
    }
    if cg_root.exists() {
        cgroup::remove_tree(&cg_root)?;
        done.push(format!("removed cgroup {}", cg_root.display()));
    }
    let dir = world_dir(name);
    if dir.exists() {
        // Only what a world writes there: state, configs, logs, pid files.
        if read_state(name).is_err() {
            eprintln!(
                "waymark world {name}: unreadable state in {}; removing it anyway",
                dir.display()
            );
        }
        std::fs::remove_dir_all(&dir)?;
        done.push(format!("removed {}", dir.display()));
    }
    Ok(done)
}

/// Every world that has a state directory or a cgroup, by name.
pub fn known_worlds() -> Vec<String> {
    let mut names: Vec<String> = list_worlds();
    if let Ok(mount) = cgroup::cgroup2_mount()
        && let Ok(rd) = std::fs::read_dir(&mount)
    {
        for e in rd.flatten() {
            if let Some(n) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("waymark-"))
                && validate_name(n).is_ok()
                && !names.iter().any(|x| x == n)
            {
                names.push(n.to_string());
            }
        }
    }
    names.sort();
    names
}

/// Network namespaces that look like a world's (`wmXXXX-…`) but belong to no
/// known world: leftovers whose state directory is gone.
pub fn orphan_netns() -> Vec<String> {
    let known: HashSet<String> = known_worlds().iter().map(|n| world_id(n)).collect();
    net::list_netns("wm")
        .into_iter()
        .filter(|n| {
            let b = n.as_bytes();
            b.len() > 7
                && b[2..6].iter().all(|c| c.is_ascii_hexdigit())
                && b[6] == b'-'
                && !known.contains(&n[2..6])
        })
        .collect()
}

/// Removes namespaces from [`orphan_netns`] and the processes in them.
pub fn remove_orphan_netns() -> Result<Vec<String>> {
    let netns = orphan_netns();
    let inodes: HashSet<u64> = netns
        .iter()
        .filter_map(|n| netns_inode(&netns_path(n)))
        .collect();
    sweep_netns(&inodes);
    let mut done = Vec::new();
    for n in netns {
        net::del_netns(&n)?;
        done.push(format!("deleted orphaned netns {n}"));
    }
    Ok(done)
}
