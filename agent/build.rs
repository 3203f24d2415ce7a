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
//!   variable is unset this script runs itself again with it set, passing
//!   stdout (cargo's directives) straight through. Setting it yourself
//!   (`export RUSTC_BOOTSTRAP=1`, as CI does) skips that step; any value
//!   you set is respected as is.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, anyhow};

const STUB_VAR: &str = "WAYMARK_EBPF_STUB";
const BOOTSTRAP_VAR: &str = "RUSTC_BOOTSTRAP";
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

    if env::var_os(BOOTSTRAP_VAR).is_none() {
        return rerun_with_bootstrap();
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

/// Runs this build script again with `RUSTC_BOOTSTRAP=1`; see the module
/// doc. The child inherits cargo's environment and our stdout, so its
/// `cargo:` directives reach cargo unchanged.
fn rerun_with_bootstrap() -> anyhow::Result<ExitCode> {
    let me = env::current_exe().context("locating the build script")?;
    let status = Command::new(&me)
        .env(BOOTSTRAP_VAR, "1")
        .status()
        .with_context(|| format!("re-running {} with {BOOTSTRAP_VAR}=1", me.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

fn canonical(path: &Path) -> anyhow::Result<PathBuf> {
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}
