//! Installs the bench's tools from Debian's packages when they are missing
//! (through `setup`, which keeps packages from starting their services in
//! the root network namespace).

use anyhow::Result;

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
    ("h2load", "nghttp2-client"),
    // The gRPC rows' probe call.
    (
        "/usr/lib/python3/dist-packages/grpc/__init__.py",
        "python3-grpcio",
    ),
    ("openssl", "openssl"),
];

/// Services packages may start on install, with their pid files.
const SERVICES: &[(&str, &str)] = &[("haproxy", "/run/haproxy.pid"), ("nginx", "/run/nginx.pid")];

pub fn ensure() -> Result<()> {
    // `setup` keeps services from starting while it installs.
    let missing = setup::ensure_tools(NEEDED)?;
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
    Ok(())
}
