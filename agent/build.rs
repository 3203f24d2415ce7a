//! Builds waymark's eBPF object (crate `waymark-ebpf`) for the agent to
//! embed with `include_bytes_aligned!(concat!(env!("OUT_DIR"), "/waymark"))`.
//!
//! * `WAYMARK_EBPF_STUB=1` writes an empty object instead, so `cargo check`,
//!   clippy and editors work without `bpf-linker`; an agent built that way
//!   refuses to load its programs (`RedirectError::StubObject`).
//! * The object is built on the stable toolchain with `-Z build-std=core`,
//!   which needs `RUSTC_BOOTSTRAP=1` in the environment of the nested cargo
//!   that `aya-build` spawns (aya-build reads it to decide on build-std). A
//!   build script cannot give a child an extra variable through aya-build,
//!   and `std::env::set_var` is `unsafe` under edition 2024, so when the
//!   variable is unset this script runs itself again with it set. Any
//!   value you set yourself is respected as is.
//! * aya-build relays every line the nested cargo prints as a
//!   `cargo:warning`, about forty per rebuild, which buries real warnings.
//!   So the build always runs in that child, and this script passes its
//!   directives through but holds the relayed lines back: they are written
//!   to `OUT_DIR/ebpf-build.log` and printed only when the eBPF build fails.

use std::{
    env, fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, anyhow};

const STUB_VAR: &str = "WAYMARK_EBPF_STUB";
const BOOTSTRAP_VAR: &str = "RUSTC_BOOTSTRAP";
/// Set in the child that runs aya-build (see the module doc).
const CHILD_VAR: &str = "WAYMARK_EBPF_BUILD_CHILD";
const KERNEL_PACKAGE: &str = "waymark-ebpf";
/// The kernel crate's binaries (the redirection programs and the kernel
/// diagnostics); aya-build copies each to `OUT_DIR/<bin name>`.
const OBJECT_NAMES: [&str; 2] = ["waymark", "waymark-diag"];

fn main() -> anyhow::Result<ExitCode> {
    println!("cargo:rerun-if-env-changed={STUB_VAR}");
    println!("cargo:rerun-if-env-changed={BOOTSTRAP_VAR}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);

    if env::var_os(STUB_VAR).is_some_and(|v| v == "1") {
        println!("cargo:warning={STUB_VAR}=1: embedding empty eBPF objects");
        for name in OBJECT_NAMES {
            fs::write(out_dir.join(name), [])
                .with_context(|| format!("writing stub object to {}", out_dir.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }

    if env::var_os(CHILD_VAR).is_none() {
        return build_in_child(&out_dir);
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir.join("..").join("ebpf");
    let kernel_dir = canonical(&ebpf_dir.join("kernel"))?;
    // aya-build watches the kernel crate; the shared types change the
    // object too.
    println!(
        "cargo:rerun-if-changed={}",
        canonical(&ebpf_dir.join("common"))?.display()
    );
    let root_dir = kernel_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", kernel_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: KERNEL_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
    .context("building the eBPF object (set WAYMARK_EBPF_STUB=1 to skip)")?;
    Ok(ExitCode::SUCCESS)
}

/// Runs this build script again as the child that builds the object
/// (with `RUSTC_BOOTSTRAP=1` unless set), passing its `cargo:` directives
/// to cargo and holding back the warnings aya-build relays; see the module
/// doc.
fn build_in_child(out_dir: &Path) -> anyhow::Result<ExitCode> {
    let me = env::current_exe().context("locating the build script")?;
    let mut cmd = Command::new(&me);
    cmd.env(CHILD_VAR, "1").stdout(Stdio::piped());
    if env::var_os(BOOTSTRAP_VAR).is_none() {
        cmd.env(BOOTSTRAP_VAR, "1");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {} as the eBPF build", me.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("no stdout from the eBPF build")?;
    let mut relayed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the eBPF build's output")?;
        match line
            .strip_prefix("cargo:warning=")
            .or_else(|| line.strip_prefix("cargo::warning="))
        {
            Some(text) => relayed.push(text.to_string()),
            None => println!("{line}"),
        }
    }
    let status = child.wait().context("waiting for the eBPF build")?;
    let log = out_dir.join("ebpf-build.log");
    // The log is for a person who wants to see the build; not having it is
    // no reason to fail the build.
    let _ = fs::write(&log, relayed.join("\n"));
    if status.success() {
        return Ok(ExitCode::SUCCESS);
    }
    for line in &relayed {
        eprintln!("{line}");
    }
    eprintln!(
        "the eBPF build failed; its output is above and in {}",
        log.display()
    );
    Ok(ExitCode::FAILURE)
}

fn canonical(path: &Path) -> anyhow::Result<PathBuf> {
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}
