//! Installs what waymark needs on a fresh machine of this kind (Debian, root,
//! Rust stable via rustup): the distribution's tools the tests and demo run,
//! `rust-src` for `-Z build-std=core`, and `bpf-linker` built against the
//! LLVM that ships inside rustc (Debian's LLVM is too old to read rustc's
//! bitcode). Everything is checked first and only what is missing is
//! installed, so a second run costs nothing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// What building the agent needs beyond Rust: libpcap's headers (the
/// `pcap` crate, packet-capture filters). Every command that builds the
/// agent ensures it.
pub const LIBPCAP_DEV: (&str, &str) = ("/usr/include/pcap/pcap.h", "libpcap-dev");

/// Installs what building the agent needs (for commands that build it
/// without the rest of `ensure_all`).
pub fn ensure_build_deps() -> Result<()> {
    ensure_tools(&[LIBPCAP_DEV]).map(drop)
}

/// Commands the test world, tests and demo run, and the Debian package that
/// provides each.
pub const BASE_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("python3", "python3"),
    // Packet capture: the agent links libpcap to compile tcpdump filters
    // (the `pcap` crate needs its headers and pkg-config file to build; the
    // binary then needs libpcap0.8, which libpcap-dev pulls in); the capture
    // tests read the files with tshark; tcpdump is there for people.
    LIBPCAP_DEV,
    ("tshark", "tshark"),
    ("tcpdump", "tcpdump"),
    // The kernel drop tests drop packets with nftables rules inside the
    // world's namespaces (tests/tests/kernel_drops.rs).
    ("nft", "nftables"),
    // The L7 end-to-end tests' peers (tests/tests/http_*.rs).
    ("h2load", "nghttp2-client"),
    ("openssl", "openssl"),
    // `waymark check`'s test detaches a program through its link.
    ("bpftool", "bpftool"),
    // Python modules have no binary: an absolute path names a file the
    // package installs.
    (
        "/usr/lib/python3/dist-packages/grpc/__init__.py",
        "python3-grpcio",
    ),
    (
        "/usr/lib/python3/dist-packages/h2/__init__.py",
        "python3-h2",
    ),
    // The mTLS end-to-end tests (tests/tests/mtls.rs): captures on the
    // fabric, reading them, and forged certificates.
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    (
        "/usr/lib/python3/dist-packages/cryptography/__init__.py",
        "python3-cryptography",
    ),
];

/// Everything `cargo xtask test` and `cargo xtask demo` need.
pub fn ensure_all() -> Result<()> {
    ensure_tools(BASE_TOOLS)?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Removes the temporary policy-rc.d again, also on error.
struct PolicyGuard(bool);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

/// Installs the packages of the tools that are missing (a command on PATH,
/// or an absolute path of a file the package installs) and returns the
/// packages it installed. No package may start its system service while
/// installing: a server such as haproxy or nginx would otherwise come up
/// in the root network namespace, listening on :80.
pub fn ensure_tools<'a>(tools: &[(&str, &'a str)]) -> Result<Vec<&'a str>> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(what, _)| !present(what))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(missing);
    }
    ensure!(
        nix_is_root(),
        "missing tools from packages {missing:?}; install them (apt-get install {}) or run as root",
        missing.join(" ")
    );
    // Debian's invoke-rc.d asks policy-rc.d whether a package may start its
    // service; 101 means "no".
    let guard = if std::path::Path::new(POLICY_RC_D).exists() {
        eprintln!("setup: {POLICY_RC_D} exists already; leaving it as it is");
        PolicyGuard(false)
    } else {
        std::fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask setup: no service starts during install\nexit 101\n",
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))?;
        PolicyGuard(true)
    };
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("RUNLEVEL", "1"))?;
    drop(guard);
    for (what, pkg) in tools {
        ensure!(
            present(what),
            "{what} is still missing after installing {pkg}"
        );
    }
    Ok(missing)
}

fn ensure_rust_src() -> Result<()> {
    let sysroot = sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    eprintln!("setup: rustup component add rust-src");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn ensure_bpf_linker() -> Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    // Link bpf-linker against rustc's own LLVM (TOOLCHAIN.md): the dylib is
    // named after the exact rustc version.
    let sysroot = sysroot()?;
    let version = String::from_utf8(Command::new("rustc").arg("--version").output()?.stdout)?;
    let version = version
        .split_whitespace()
        .nth(1)
        .context("cannot parse `rustc --version`")?
        .to_string();
    let llvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.contains(&version))
        .context("no libLLVM in rustc's sysroot; cannot build bpf-linker")?;
    let lib = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    let major = lib
        .strip_prefix("LLVM-")
        .and_then(|s| s.split(['-', '.']).next())
        .context("cannot read the LLVM major version")?
        .to_string();
    let rustflags = format!(
        "-L {sys}/lib -l dylib={lib} -C link-arg=-Wl,-rpath,{sys}/lib",
        sys = sysroot.display()
    );
    eprintln!("setup: building bpf-linker against rustc's {lib} (about a minute)");
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--no-default-features"])
        .arg("--features")
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags))
}

fn sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    ensure!(out.status.success(), "rustc --print sysroot failed");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A command on PATH, or, for an absolute path, that file.
fn present(what: &str) -> bool {
    let path = std::path::Path::new(what);
    if path.is_absolute() {
        path.exists()
    } else {
        on_path(what)
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(bin).is_file())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
