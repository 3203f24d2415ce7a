//! Installs the bench's tools from Debian's packages when they are missing,
//! without letting the packages start their system services in the root
//! network namespace.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};

use super::peers::NGINX_STREAM_MODULE;
use crate::setup;

/// What the bench runs (a command, or an absolute path of a file) and the
/// package that provides it.
const NEEDED: &[(&str, &str)] = &[
    ("haproxy", "haproxy"),
    ("nginx", "nginx"),
    (NGINX_STREAM_MODULE, "libnginx-mod-stream"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("curl", "curl"),
];

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Services packages may start on install, with their pid files.
const SERVICES: &[(&str, &str)] = &[("haproxy", "/run/haproxy.pid"), ("nginx", "/run/nginx.pid")];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        setup::on_path(what)
    }
}

/// Removes the temporary policy-rc.d again, also on error.
struct PolicyGuard(bool);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

pub fn ensure() -> Result<()> {
    let mut missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(what, _)| !present(what))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench needs packages {missing:?}: run as root, or apt-get install {}",
        missing.join(" ")
    );
    // Debian's invoke-rc.d asks policy-rc.d whether a package may start its
    // service; 101 means "no". Without this, installing haproxy or nginx
    // would start them in the root namespace, listening on :80.
    let guard = if Path::new(POLICY_RC_D).exists() {
        eprintln!("bench: {POLICY_RC_D} exists already; leaving it as it is");
        PolicyGuard(false)
    } else {
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask bench: no service starts during install\nexit 101\n",
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        PolicyGuard(true)
    };
    eprintln!("bench: installing {}", missing.join(" "));
    setup::run(Command::new("apt-get").args(["update", "-q"]))?;
    setup::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1"),
    )?;
    drop(guard);
    // Belt and braces: a service of a package installed just now that runs
    // anyway is stopped, by its pid file and only if it is that program.
    for (name, pidfile) in SERVICES {
        if !missing.contains(name) {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == *name {
            eprintln!("bench: stopping the {name} service the package started (pid {pid})");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for (what, pkg) in NEEDED {
        ensure!(
            present(what),
            "{what} is still missing after installing {pkg}"
        );
    }
    Ok(())
}
