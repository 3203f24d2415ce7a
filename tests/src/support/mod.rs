//! Small helpers every end-to-end test file uses.

pub mod bpf;
pub mod capture;
pub mod curl;
pub mod open_files;
pub mod shortcut;
pub mod tap;

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::world::{Node, Pod, World, WorldBuilder, topology};
use crate::{DEFAULT_PATIENCE, eventually, metric_value};

/// Builds the world and runs `body`; an error fails the test while the world
/// still exists, so its agent logs are kept and shown.
pub fn with_world(builder: WorldBuilder, body: impl FnOnce(&World) -> Result<()>) {
    let world = builder
        .build()
        .unwrap_or_else(|e| panic!("building the world: {e:#}"));
    if let Err(e) = body(&world) {
        panic!("{e:#}");
    }
}

/// Debian's python3 where it is (grpcio, h2 and hpack come from Debian's
/// packages), else whatever `python3` is on PATH.
pub fn python() -> Command {
    let debian = std::path::Path::new("/usr/bin/python3");
    Command::new(if debian.exists() {
        debian.as_os_str()
    } else {
        "python3".as_ref()
    })
}

/// Pod `j` of node `i`'s address, known before the world exists (for configs).
pub fn pod_ip(i: usize, j: usize) -> String {
    topology::pod_ip(i, j).to_string()
}

/// A fast HTTP/1.1 server for load on `port` in `pod`: the test
/// application without its per-request lines.
pub fn fast_http(pod: &Pod, port: u16) -> Result<crate::Server> {
    http_app(pod, port, "app", &["--quiet"])
}

/// Starts the test application (`testpeer http`, see [`mod@crate::http_app`])
/// on `port` in `pod`, answering as `name`; `extra` are more of its flags
/// (`--fail alternate`, `--delay 50ms`).
pub fn http_app(pod: &Pod, port: u16, name: &str, extra: &[&str]) -> Result<crate::Server> {
    pod.serve(
        crate::testpeer([
            "http",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--name",
            name,
        ])
        .args(extra),
    )
}

/// The sum of the matching samples on `node`'s agent; 0 when there is none.
pub fn metric(node: &Node, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(metric_value(&node.metrics()?, name, labels).unwrap_or(0.0))
}

/// Waits until the metric is exactly `want`.
pub fn await_metric(node: &Node, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
    eventually(DEFAULT_PATIENCE, || {
        let v = metric(node, name, labels)?;
        ensure!(v == want, "{name}{labels:?} is {v}, expected {want}");
        Ok(())
    })
    .with_context(|| format!("on {}", node.name()))
}

/// `nft ARGS…` inside the pod's network namespace, never the host's.
pub fn nft_in(pod: &Pod, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", pod.netns_name(), "nft"])
        .args(args)
        .output()
        .context("running nft (install nftables: cargo xtask setup)")?;
    ensure!(
        out.status.success(),
        "nft {args:?} in {}: {}",
        pod.netns_name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
