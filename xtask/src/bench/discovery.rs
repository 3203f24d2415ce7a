//! `cargo xtask bench-discovery`: the scale of Kubernetes discovery — a
//! stand-in API server with a large cluster and a release agent discovering
//! it (`tests/apiserver/src/bin/waymark-discovery-scale.rs` does the work).
//! Writes `bench/results/discovery.md` unless told not to.

use anyhow::{Context as _, Result};

use super::{repo_root, target_dir};
use crate::setup;
use crate::test::cargo;

#[derive(clap::Args)]
pub struct DiscoveryArgs {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 5)]
    endpoints_per_service: usize,
    #[arg(long, default_value_t = 20_000)]
    pods: usize,
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Do not write bench/results/discovery.md.
    #[arg(long)]
    no_results: bool,
}

pub fn run(a: DiscoveryArgs) -> Result<()> {
    setup::ensure_build_deps()?;
    let build = [
        "build",
        "--release",
        "-p",
        "waymark-agent",
        "--bin",
        "waymark",
        "-p",
        "waymark-apiserver",
        "--bin",
        "waymark-discovery-scale",
    ];
    eprintln!("bench-discovery: cargo {}", build.join(" "));
    setup::run(cargo(&build).current_dir(repo_root()))?;
    let dir = target_dir()?.join("release");
    let out = repo_root().join("bench/results/discovery.md");
    let mut cmd = std::process::Command::new(dir.join("waymark-discovery-scale"));
    cmd.arg("--waymark")
        .arg(dir.join("waymark"))
        .args(["--services", &a.services.to_string()])
        .args([
            "--endpoints-per-service",
            &a.endpoints_per_service.to_string(),
        ])
        .args(["--pods", &a.pods.to_string()])
        .args(["--nodes", &a.nodes.to_string()])
        .args(["--changes", &a.changes.to_string()]);
    if !a.no_results {
        cmd.arg("--out").arg(&out);
    }
    let st = cmd.status().context("running waymark-discovery-scale")?;
    anyhow::ensure!(st.success(), "waymark-discovery-scale failed: {st}");
    Ok(())
}
