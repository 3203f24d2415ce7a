//! Network namespaces and links, set up with iproute2's `ip`.
//!
//! Every link is created inside a namespace the world owns (`ip -n NS link add
//! … peer name … netns OTHER`), so nothing ever appears in the root network
//! namespace, not even for a moment.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where `ip netns add` puts the namespaces' bind mounts.
pub const NETNS_DIR: &str = "/var/run/netns";

/// The path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip ARGS…`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2); is it installed?")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n NETNS ARGS…`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Creates a named network namespace with loopback up.
pub fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])
}

/// Deletes a named network namespace if it exists (its links go with it once
/// no process holds it any more).
pub fn del_netns(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    match ip(&["netns", "del", name]) {
        Ok(()) => Ok(()),
        Err(_) if !netns_path(name).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The names of the named network namespaces that start with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// The inode that identifies a network namespace, from its bind mount.
pub fn netns_inode(path: &Path) -> Option<u64> {
    // stat() of the bind mount reports the nsfs inode, the number that
    // /proc/PID/ns/net shows as `net:[INODE]`.
    fs::metadata(path).ok().map(|md| md.ino())
}

/// The inode of the network namespace process `pid` is in (None if it is
/// gone or a zombie).
pub fn process_netns_inode(pid: i32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Every process (by pid) that lives in one of the given network namespaces.
pub fn pids_in_netns(inodes: &HashSet<u64>) -> Vec<i32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| process_netns_inode(pid).is_some_and(|i| inodes.contains(&i)))
        .collect()
}

/// Runs `f` on a short-lived thread that has entered the network namespace at
/// `netns` (`setns(CLONE_NEWNET)` affects only the calling thread). Sockets
/// created there stay in that namespace when handed back.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = fs::File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: plain syscall on an fd we own; affects this thread only.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", netns.display()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside {} panicked", netns.display()))?
    })
}

/// Sets a `net.*` sysctl inside a network namespace (they are per namespace).
/// `key` is written with slashes or dots, e.g. `net.ipv4.ip_forward`.
pub fn sysctl_in(netns: &Path, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(netns, || fs::write(&path, value))?
        .with_context(|| format!("setting {key}={value} in {}", netns.display()))
}

/// Reads a `net.*` sysctl inside a network namespace.
pub fn read_sysctl_in(netns: &Path, key: &str) -> Result<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    Ok(in_netns(netns, || fs::read_to_string(&path))?
        .with_context(|| format!("reading {key} in {}", netns.display()))?
        .trim()
        .to_string())
}

/// The names of the interfaces in the calling thread's network namespace
/// (through netlink, unlike /sys/class/net, which shows the namespace sysfs
/// was mounted in).
pub fn interfaces_here() -> Vec<String> {
    let mut v = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zeroed entry,
    // freed with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return v;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            v.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    v.sort();
    v
}

/// The interfaces of the network namespace at `netns`.
pub fn interfaces_in(netns: &Path) -> Result<Vec<String>> {
    in_netns(netns, interfaces_here)
}
