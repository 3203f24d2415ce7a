//! The host checks of `waymark check`: what the node must offer before an
//! agent can run on it. They look at this machine only and need no agent.

use std::path::Path;

use super::Check;
use crate::redirect::kernel_version as running_kernel;

/// The oldest kernel the programs load on: `sock_ops` calls
/// `bpf_get_netns_cookie` (5.15), the agent reads `SO_NETNS_COOKIE` (5.14)
/// and takes original destinations with `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
/// on hash maps (5.14).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

const BTF: &str = "/sys/kernel/btf/vmlinux";

/// Capabilities the agent uses when it does not run as full root:
/// loading programs and maps, attaching to cgroups, entering pods'
/// network namespaces.
const CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

pub fn checks() -> Vec<Check> {
    vec![
        kernel_version(&running_kernel::release()),
        btf(Path::new(BTF)),
        cgroup2(),
        bpffs(),
        programs_load(),
        privileges(&std::fs::read_to_string("/proc/self/status").unwrap_or_default()),
    ]
}

fn kernel_version(release: &str) -> Check {
    let (maj, min) = MIN_KERNEL;
    match running_kernel::parse(release) {
        Some(v) if v >= MIN_KERNEL => Check::pass(format!(
            "kernel {release} is {maj}.{min} or later (sock_ops needs bpf_get_netns_cookie)"
        )),
        Some(_) => Check::fail(
            format!("kernel {release} is older than {maj}.{min}"),
            format!(
                "waymark's sock_ops program calls bpf_get_netns_cookie, which needs Linux {maj}.{min}; upgrade the node's kernel"
            ),
        ),
        None => Check::fail(
            format!("cannot read the kernel version from {release:?}"),
            "check `uname -r`",
        ),
    }
}

fn btf(path: &Path) -> Check {
    if path.exists() {
        Check::pass(format!("kernel BTF at {}", path.display()))
    } else {
        Check::fail(
            format!("no kernel BTF ({} is missing)", path.display()),
            "the programs need a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's kernel since 2021)",
        )
    }
}

fn cgroup2() -> Check {
    match crate::app::cgroup2_mount() {
        Ok(p) => Check::pass(format!("cgroup v2 mounted at {}", p.display())),
        Err(e) => Check::fail(
            format!("no cgroup v2: {e:#}"),
            "the programs attach to a cgroup v2 directory: boot with systemd.unified_cgroup_hierarchy=1, or `mount -t cgroup2 none /sys/fs/cgroup/unified`",
        ),
    }
}

/// Mount points of filesystems of type `fstype`, from mountinfo text.
fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == fstype)
                .then(|| left.split_whitespace().nth(4).map(str::to_string))?
        })
        .collect()
}

fn bpffs() -> Check {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mounts_of(&info, "bpf");
    if let Some(at) = mounted.first() {
        return Check::pass(format!("bpffs mounted at {at}"));
    }
    let supported = std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("bpf"));
    if supported {
        Check::pass(
            "bpffs not mounted, but the kernel has it (`mount -t bpf bpf /sys/fs/bpf`); the agent pins nothing yet",
        )
    } else {
        Check::fail(
            "no bpffs: the kernel does not list `bpf` in /proc/filesystems",
            "use a kernel with CONFIG_BPF_SYSCALL=y",
        )
    }
}

/// Loads the agent's own programs (and creates their maps), so the
/// kernel's verifier judges exactly what the agent will load; nothing is
/// attached, and everything is unloaded again at once.
fn programs_load() -> Check {
    let names: Vec<&str> = crate::redirect::query::EXPECTED
        .iter()
        .map(|e| e.attach_type)
        .collect();
    match crate::redirect::Redirect::load(waymark_common::DEFAULT_OUTBOUND_PORT, &[]) {
        Ok(r) => {
            drop(r);
            Check::pass(format!(
                "the kernel's verifier accepts waymark's programs ({}) and their maps",
                names.join(", ")
            ))
        }
        Err(e) => {
            let chain = error_chain(&e);
            let hint = match &e {
                crate::redirect::RedirectError::StubObject => {
                    "this binary embeds no programs; build it without WAYMARK_EBPF_STUB"
                }
                _ if chain.contains("Operation not permitted") => {
                    "loading programs needs root, or CAP_BPF and CAP_NET_ADMIN: run the check as the agent would run"
                }
                _ => {
                    "the kernel refused waymark's programs: see the error above (a kernel older than 5.15, or built without cgroup BPF, CONFIG_CGROUP_BPF)"
                }
            };
            Check::fail("the kernel did not load waymark's programs", hint).with_detail([chain])
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// This process's effective capabilities from `/proc/self/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn privileges(status: &str) -> Check {
    let caps = effective_caps(status).unwrap_or(0);
    let missing: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let who = if root { "root" } else { "not root" };
    if missing.is_empty() {
        Check::pass(format!(
            "this process ({who}) has CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
        ))
    } else {
        Check::fail(
            format!("this process ({who}) lacks {}", missing.join(", ")),
            "the agent loads and attaches programs and enters pods' network namespaces: run it (and this check) as root, or add these capabilities (securityContext.capabilities.add)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert_eq!(running_kernel::parse("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(running_kernel::parse("5.15.0"), Some((5, 15)));
        assert_eq!(running_kernel::parse("garbage"), None);
        assert_eq!(
            kernel_version("5.15.0-91-generic").status,
            super::super::Status::Pass
        );
        assert_eq!(
            kernel_version("6.18.44-fc").status,
            super::super::Status::Pass
        );
        let old = kernel_version("5.10.0-28-amd64");
        assert_eq!(old.status, super::super::Status::Fail);
        assert!(old.hint.unwrap().contains("5.15"));
    }

    #[test]
    fn btf_is_a_file() {
        assert_eq!(
            btf(Path::new("/nonexistent/vmlinux")).status,
            super::super::Status::Fail
        );
    }

    #[test]
    fn mounts_are_found_by_type() {
        let info = "36 25 0:31 / /sys/fs/bpf rw,nosuid - bpf bpf rw\n\
                    30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(mounts_of(info, "bpf"), ["/sys/fs/bpf"]);
        assert_eq!(mounts_of(info, "cgroup2"), ["/sys/fs/cgroup/unified"]);
        assert!(mounts_of(info, "tmpfs").is_empty());
    }

    #[test]
    fn missing_capabilities_are_named() {
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(privileges(all).status, super::super::Status::Pass);
        // Everything but CAP_BPF (bit 39).
        let no_bpf = "CapEff:\t0000017fffffffff\n";
        let c = privileges(no_bpf);
        assert_eq!(c.status, super::super::Status::Fail);
        assert!(c.what.contains("CAP_BPF"), "{}", c.what);
        assert!(!c.what.contains("CAP_NET_ADMIN"), "{}", c.what);
    }
}
