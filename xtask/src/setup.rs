//! Installs what waymark needs on a fresh machine of this kind (Debian, root,
//! Rust stable via rustup): the distribution's tools the tests and demo run,
//! `rust-src` for `-Z build-std=core`, and `bpf-linker` built against the
//! LLVM that ships inside rustc (Debian's LLVM is too old to read rustc's
//! bitcode). Everything is checked first and only what is missing is
//! installed, so a second run costs nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};

/// What building the agent needs beyond Rust: libpcap's headers (the
/// `pcap` crate, packet-capture filters). Every command that builds the
/// agent ensures it.
pub const LIBPCAP_DEV: (&str, &str) = ("/usr/include/pcap/pcap.h", "libpcap-dev");

/// The agent's allocator, jemalloc, is built from its C sources by
/// `tikv-jemalloc-sys` with `configure` and `make` (the C compiler is on
/// these machines already).
pub const MAKE: (&str, &str) = ("make", "make");

/// Installs what building the agent needs (for commands that build it
/// without the rest of `ensure_all`).
pub fn ensure_build_deps() -> Result<()> {
    ensure_tools(&[LIBPCAP_DEV, MAKE]).map(drop)
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
    MAKE,
    ("tshark", "tshark"),
    ("tcpdump", "tcpdump"),
    // The kernel drop tests drop packets with nftables rules inside the
    // world's namespaces (tests/tests/kernel_drops.rs).
    ("nft", "nftables"),
    // The L7 end-to-end tests' peers (tests/tests/http_*.rs).
    ("h2load", "nghttp2-client"),
    ("openssl", "openssl"),
    // The rollout test's HTTP/1.1 keep-alive load (tests/tests/rollout.rs).
    ("wrk", "wrk"),
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
    // The stand-in API server's client tests (tests/apiserver): kubectl
    // 1.33 from the image's kubectl package, and venv for the Python
    // kubernetes client from PyPI (Debian's python is externally managed).
    ("/usr/lib/google-cloud-sdk/bin/kubectl.1.33", "kubectl"),
    ("/usr/share/doc/python3-venv", "python3-venv"),
];

/// The venv with the Python `kubernetes` client and `kubernetes-validate`;
/// tests/apiserver/tests/clients/mod.rs looks for it here (or at
/// `$WAYMARK_KUBE_PYTHON`).
pub const KUBE_VENV: &str = "/var/cache/waymark/kube-venv";

/// Pinned: the client generation and the schemas of Kubernetes 1.33, the
/// kubectl version the tests drive.
const KUBE_PY_PACKAGES: &[&str] = &["kubernetes==33.1.0", "kubernetes-validate==1.33.1"];

/// Everything `cargo xtask test` and `cargo xtask demo` need.
pub fn ensure_all() -> Result<()> {
    ensure_tools(BASE_TOOLS)?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_kube_venv()?;
    ensure_cargo_deny()?;
    Ok(())
}

/// cargo-deny, pinned, for `.ci/run`'s `cargo deny check` (licences,
/// bans, sources; `deny.toml`).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Installs cargo-deny from crates.io unless the pinned version runs.
fn ensure_cargo_deny() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["deny", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed.is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_DENY_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deny {CARGO_DENY_VERSION} from crates.io (a few minutes)");
    run(Command::new("cargo").args([
        "install",
        "cargo-deny",
        "--locked",
        "--version",
        CARGO_DENY_VERSION,
    ]))
    .context(
        "installing cargo-deny failed; `cargo install cargo-deny --locked` by hand, then rerun",
    )
}

/// Creates the venv of [`KUBE_VENV`] and installs the pinned packages from
/// PyPI, unless a marker file says exactly these are there and they import.
fn ensure_kube_venv() -> Result<()> {
    let venv = Path::new(KUBE_VENV);
    let python = venv.join("bin/python");
    let marker = venv.join("waymark-packages.txt");
    let wanted = KUBE_PY_PACKAGES.join("\n");
    let imports = || {
        Command::new(&python)
            .args(["-c", "import kubernetes, kubernetes_validate"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) && imports() {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} into {KUBE_VENV}",
        KUBE_PY_PACKAGES.join(" ")
    );
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Debian's python3 (python3-venv), not whatever python3 is first on PATH.
    run(Command::new("/usr/bin/python3").args(["-m", "venv", KUBE_VENV]))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(KUBE_PY_PACKAGES))?;
    ensure!(
        imports(),
        "{KUBE_VENV}: kubernetes and kubernetes_validate do not import after pip install"
    );
    std::fs::write(&marker, wanted).with_context(|| format!("writing {}", marker.display()))?;
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
    let mut seen = std::collections::HashSet::new();
    missing.retain(|pkg| seen.insert(*pkg));
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
    if bpf_linker_works(None) {
        return Ok(());
    }
    install_bpf_linker(None)
}

/// Whether `bpf-linker` runs: the one on PATH, or the one installed under
/// `root` (`ROOT/bin/bpf-linker`).
fn bpf_linker_works(root: Option<&Path>) -> bool {
    let bin = match root {
        Some(root) => root.join("bin/bpf-linker"),
        None => PathBuf::from("bpf-linker"),
    };
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds and installs bpf-linker linked against rustc's own LLVM
/// (TOOLCHAIN.md), into cargo's bin directory or, with `root`, into
/// `ROOT/bin` (what `setup --from-scratch` uses to prove the step).
fn install_bpf_linker(root: Option<&Path>) -> Result<()> {
    let sysroot = sysroot()?;
    let rustc = RustcInfo::query()?;
    let libdir = sysroot.join("lib");
    let files: Vec<String> = std::fs::read_dir(&libdir)
        .with_context(|| format!("cannot list rustc's libraries in {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let lib =
        choose_llvm_lib(&files, &rustc).map_err(|e| anyhow!("{e} (in {})", libdir.display()))?;
    let rustflags = format!(
        "-L {sys}/lib -l {link} -C link-arg=-Wl,-rpath,{sys}/lib",
        sys = sysroot.display(),
        link = lib.link_arg
    );
    eprintln!(
        "setup: building bpf-linker against rustc's {} (LLVM {}; about a minute)",
        lib.file, rustc.llvm_major
    );
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "bpf-linker", "--locked", "--no-default-features"])
        .arg("--features")
        .arg(format!("llvm-{},no-llvm-linking", rustc.llvm_major))
        .env("RUSTFLAGS", rustflags);
    if let Some(root) = root {
        cmd.arg("--root").arg(root);
    }
    run(&mut cmd).context("building bpf-linker failed; TOOLCHAIN.md has the recipe to run by hand")
}

/// What `rustc -vV` says about the toolchain that builds the eBPF object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RustcInfo {
    /// `release:` — `1.95.0`, or `1.96.0-nightly`/`-beta.3` off stable.
    release: String,
    /// The major version of `LLVM version: 22.1.2`.
    llvm_major: u32,
}

impl RustcInfo {
    fn query() -> Result<Self> {
        let out = Command::new("rustc")
            .arg("-vV")
            .output()
            .context("cannot run `rustc -vV`; is Rust installed (rustup)?")?;
        ensure!(out.status.success(), "`rustc -vV` failed");
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    fn parse(text: &str) -> Result<Self> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("`rustc -vV` has no `{name}` line"))
        };
        let release = field("release:")?.to_string();
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("cannot read the LLVM major version from `{llvm}`"))?;
        Ok(Self {
            release,
            llvm_major,
        })
    }

    /// The suffix rustup's LLVM files carry: `1.95.0-stable`, or the
    /// release as is when it names its channel (`1.96.0-nightly`).
    fn lib_suffix(&self) -> String {
        if self.release.contains('-') {
            self.release.clone()
        } else {
            format!("{}-stable", self.release)
        }
    }
}

/// The LLVM library bpf-linker is linked against, and how to name it to
/// the linker.
#[derive(Debug, PartialEq, Eq)]
struct LlvmLib {
    file: String,
    /// What follows `-l` in RUSTFLAGS.
    link_arg: String,
}

/// Picks rustc's LLVM shared library by its exact expected name. The
/// sysroot holds two names for it (`libLLVM-22-rust-1.95.0-stable.so` and
/// `libLLVM.so.22.1-rust-1.95.0-stable`); the first is linkable by its short
/// name, the second only verbatim. Directory order must not matter, so the
/// choice is by name, never by whichever comes first.
fn choose_llvm_lib(files: &[String], rustc: &RustcInfo) -> Result<LlvmLib> {
    let suffix = rustc.lib_suffix();
    let short = format!("LLVM-{}-rust-{suffix}", rustc.llvm_major);
    let short_file = format!("lib{short}.so");
    if files.contains(&short_file) {
        return Ok(LlvmLib {
            file: short_file,
            link_arg: format!("dylib={short}"),
        });
    }
    let versioned_prefix = format!("libLLVM.so.{}.", rustc.llvm_major);
    let versioned_suffix = format!("-rust-{suffix}");
    if let Some(file) = files
        .iter()
        .find(|f| f.starts_with(&versioned_prefix) && f.ends_with(&versioned_suffix))
    {
        return Ok(LlvmLib {
            file: file.clone(),
            link_arg: format!("dylib:+verbatim={file}"),
        });
    }
    let mut present: Vec<&str> = files
        .iter()
        .filter(|f| f.contains("LLVM"))
        .map(String::as_str)
        .collect();
    present.sort_unstable();
    bail!(
        "cannot build bpf-linker: rustc {} (LLVM {}) ships no {short_file} nor {versioned_prefix}*{versioned_suffix}; LLVM libraries present: {}",
        rustc.release,
        rustc.llvm_major,
        if present.is_empty() {
            "none".to_string()
        } else {
            present.join(", ")
        }
    )
}

/// `cargo xtask setup --from-scratch`: proves the bpf-linker install step
/// on this machine as a new one would run it — built into an empty
/// temporary root, whatever is already installed, then run from there.
pub fn bpf_linker_from_scratch() -> Result<()> {
    let root = std::env::temp_dir().join(format!("waymark-setup-{}", std::process::id()));
    let _cleanup = RemoveDir(root.clone());
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let start = std::time::Instant::now();
    install_bpf_linker(Some(&root))?;
    ensure!(
        bpf_linker_works(Some(&root)),
        "bpf-linker installed under {} does not run",
        root.display()
    );
    eprintln!(
        "setup: bpf-linker built from scratch under {} and runs ({:.0?})",
        root.display(),
        start.elapsed()
    );
    Ok(())
}

/// Removes a directory when dropped, also on error.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: &str = "libLLVM-22-rust-1.95.0-stable.so";
    const VERSIONED: &str = "libLLVM.so.22.1-rust-1.95.0-stable";

    fn rustc() -> RustcInfo {
        RustcInfo::parse(
            "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n",
        )
        .unwrap()
    }

    fn files(names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "librustc_driver-6108105cd7e839cf.so".into(),
            "rustlib".into(),
        ];
        v.extend(names.iter().map(|s| s.to_string()));
        v
    }

    #[test]
    fn rustc_info_reads_release_and_llvm_major() {
        assert_eq!(
            rustc(),
            RustcInfo {
                release: "1.95.0".into(),
                llvm_major: 22
            }
        );
        assert!(RustcInfo::parse("release: 1.95.0\n").is_err());
        assert!(RustcInfo::parse("release: 1.95.0\nLLVM version: x.1\n").is_err());
    }

    #[test]
    fn the_short_name_wins_in_either_order() {
        for order in [[SHORT, VERSIONED], [VERSIONED, SHORT]] {
            let lib = choose_llvm_lib(&files(&order), &rustc()).unwrap();
            assert_eq!(lib.file, SHORT, "order {order:?}");
            assert_eq!(lib.link_arg, "dylib=LLVM-22-rust-1.95.0-stable");
        }
    }

    #[test]
    fn only_the_short_name() {
        let lib = choose_llvm_lib(&files(&[SHORT]), &rustc()).unwrap();
        assert_eq!(lib.link_arg, "dylib=LLVM-22-rust-1.95.0-stable");
    }

    #[test]
    fn only_the_versioned_name_links_verbatim() {
        let lib = choose_llvm_lib(&files(&[VERSIONED]), &rustc()).unwrap();
        assert_eq!(lib.file, VERSIONED);
        assert_eq!(lib.link_arg, format!("dylib:+verbatim={VERSIONED}"));
    }

    #[test]
    fn another_version_is_not_taken_and_the_error_names_both() {
        let other = "libLLVM-21-rust-1.94.0-stable.so";
        let err = choose_llvm_lib(&files(&[other]), &rustc())
            .unwrap_err()
            .to_string();
        assert!(err.contains(SHORT), "{err}");
        assert!(err.contains("libLLVM.so.22.*-rust-1.95.0-stable"), "{err}");
        assert!(err.contains(other), "{err}");
        let err = choose_llvm_lib(&files(&[]), &rustc())
            .unwrap_err()
            .to_string();
        assert!(err.contains("present: none"), "{err}");
    }

    #[test]
    fn a_nightly_names_its_channel() {
        let nightly = RustcInfo {
            release: "1.96.0-nightly".into(),
            llvm_major: 22,
        };
        let lib =
            choose_llvm_lib(&["libLLVM-22-rust-1.96.0-nightly.so".to_string()], &nightly).unwrap();
        assert_eq!(lib.link_arg, "dylib=LLVM-22-rust-1.96.0-nightly");
    }
}
