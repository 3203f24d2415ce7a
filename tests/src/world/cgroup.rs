//! cgroup v2 directories for the world's nodes and pods.
//!
//! The world only ever creates, writes to and removes directories under
//! `<cgroup2 mount>/waymark-<world name>/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::wait::wait_until;

/// The mount point of the cgroup v2 hierarchy, read from
/// /proc/self/mountinfo (`/sys/fs/cgroup/unified` on a hybrid host,
/// `/sys/fs/cgroup` on most others).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_cgroup2_mount(&info).context("no cgroup2 file system is mounted (cgroup v2 is required)")
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.get(sep + 1) == Some(&"cgroup2") && fields.len() > 4 {
            return Some(PathBuf::from(unescape_mountinfo(fields[4])));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The world's cgroup root: `<mount>/waymark-<world name>`.
pub fn world_root(mount: &Path, world: &str) -> PathBuf {
    mount.join(format!("waymark-{world}"))
}

/// The pids in one cgroup directory (not its children).
pub fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// `dir` and every cgroup below it, parents before children.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if !d.is_dir() {
            continue;
        }
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out.sort_by_key(|p| p.components().count());
    out
}

/// The pids in `dir` and all cgroups below it.
pub fn procs_recursive(dir: &Path) -> Vec<i32> {
    tree(dir).iter().flat_map(|d| procs(d)).collect()
}

/// Kills every process in the cgroup tree at `dir` (through `cgroup.kill`
/// where the kernel has it, else by pid) and waits up to `patience` for them
/// to be gone.
pub fn kill_tree(dir: &Path, patience: Duration) -> bool {
    if !dir.is_dir() {
        return true;
    }
    let kill_file = dir.join("cgroup.kill");
    let used_kill_file = kill_file.exists() && fs::write(&kill_file, "1").is_ok();
    if !used_kill_file {
        for pid in procs_recursive(dir) {
            // SAFETY: plain kill(2); the pid was read from our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    wait_until(patience, || {
        let left = procs_recursive(dir);
        if !left.is_empty() && !used_kill_file {
            for pid in &left {
                // SAFETY: as above.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        left.is_empty()
    })
}

/// Removes the cgroup tree at `dir`, children first. Only directories whose
/// path contains a `waymark-` component below the cgroup2 mount are touched.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir
        .components()
        .any(|c| c.as_os_str().to_string_lossy().starts_with("waymark-"))
    {
        bail!(
            "refusing to remove cgroup {}: not a waymark world cgroup",
            dir.display()
        );
    }
    let mut dirs = tree(dir);
    dirs.reverse();
    for d in dirs {
        // A cgroup whose last process just exited can report EBUSY briefly.
        let mut last = None;
        let ok = wait_until(Duration::from_secs(5), || match fs::remove_dir(&d) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        });
        if !ok {
            bail!(
                "removing cgroup {}: {} (processes left: {:?})",
                d.display(),
                last.map(|e| e.to_string()).unwrap_or_default(),
                procs(&d)
            );
        }
    }
    Ok(())
}

/// The cgroup v2 path of a process, relative to the cgroup2 mount (the `0::`
/// line of /proc/PID/cgroup).
pub fn process_cgroup(pid: i32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "\
25 31 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let odd = "30 23 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(odd), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/x rw\n"),
            None
        );
    }
}
