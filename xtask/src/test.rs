//! `cargo xtask test`: the whole test suite, as CI runs it.
//!
//! Installs what is missing, checks formatting, lints and doc links,
//! builds the agent (the end-to-end tests run the real binary), then runs
//! every test in the workspace: unit tests next to the code and the
//! network-namespace world tests, which need root and eBPF and fail rather
//! than skip under `CI`.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::setup;

/// The eBPF crate: built for `bpfel-unknown-none` by the agent's build
/// script, not for the host.
const KERNEL_CRATE: &str = "waymark-ebpf";

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(args: TestArgs) -> Result<()> {
    let start = Instant::now();
    setup::ensure_all()?;
    if !args.no_lint {
        step(
            "cargo fmt --check",
            cargo(&["fmt", "--all", "--", "--check"]),
        )?;
        step(
            "cargo clippy",
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                KERNEL_CRATE,
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
        // The kernel crate only builds for the BPF target; lint it there.
        let mut kernel = cargo(&[
            "clippy",
            "--release",
            "--package",
            KERNEL_CRATE,
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
        kernel.env("RUSTC_BOOTSTRAP", "1");
        step("cargo clippy (kernel programs, BPF target)", kernel)?;
        // The docs are the developers' map of the code: a link that no
        // longer resolves (an item renamed or moved) fails here, as a
        // lint would, instead of rotting unnoticed.
        let mut doc = cargo(&[
            "doc",
            "--workspace",
            "--exclude",
            KERNEL_CRATE,
            "--no-deps",
            "--document-private-items",
        ]);
        doc.env("RUSTDOCFLAGS", "-D warnings");
        step("cargo doc (broken links, private items included)", doc)?;
    }
    step(
        "build the agent and test peers",
        cargo(&[
            "build",
            "-p",
            "waymark-agent",
            "-p",
            "waymark-tests",
            "--bins",
        ]),
    )?;
    let mut test = vec!["test", "--workspace", "--exclude", KERNEL_CRATE];
    if !args.cargo_test_args.is_empty() {
        test.push("--");
        test.extend(args.cargo_test_args.iter().map(String::as_str));
    }
    step("cargo test", cargo(&test))?;
    eprintln!("xtask test: all green in {:.0?}", start.elapsed());
    Ok(())
}

fn step(name: &str, cmd: Command) -> Result<()> {
    let start = Instant::now();
    eprintln!("==> {name}");
    let mut cmd = cmd;
    setup::run(&mut cmd)?;
    eprintln!("==> {name}: ok ({:.1?})", start.elapsed());
    Ok(())
}

pub fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args(args);
    c
}
