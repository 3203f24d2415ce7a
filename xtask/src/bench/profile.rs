//! `--perf DIR`: a CPU profile of the proxy processes during each
//! saturation run (waymark's agents, and the peer proxies: their kernel
//! frames are named even without their debug symbols, which is what a
//! comparison of where the system calls' time goes needs), for the flame
//! graphs in `bench/results/`.
//!
//! `perf record` samples the proxy processes on the `cpu-clock` software
//! event (these VMs expose no hardware counters) with DWARF call graphs:
//! a release build has no frame pointers, and `debug = "line-tables-only"`
//! in the release profile gives perf what it needs to unwind and name
//! frames. The recording perturbs the run (perf's own CPU, and the copying
//! of stack samples), so a profiled run's figures are not results: use
//! `--no-results` and measure separately.
//!
//! When `inferno-collapse-perf` and `inferno-flamegraph` are installed
//! (`cargo install inferno`), the recording is folded and drawn at once:
//! `<path>-rep<N>.folded` and `.svg` beside the `.data` file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// Sampling rate: a prime, so the sampling does not lock step with timers.
const FREQ: &str = "997";
/// Bytes of stack copied per sample for DWARF unwinding: deep enough for a
/// request's path through tokio, hyper and the proxy.
const STACK: &str = "dwarf,16384";

/// One recording in progress.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

/// Starts recording `pids` (and their threads) into `dir/<name>.data`.
pub fn start(dir: &Path, name: &str, pids: &[i32]) -> Result<Recording> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = dir.join(format!("{name}.data"));
    let pids: Vec<String> = pids.iter().map(i32::to_string).collect();
    let child = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            FREQ,
            "--call-graph",
            STACK,
        ])
        .arg("-o")
        .arg(&data)
        .args(["-p", &pids.join(",")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record (Debian's linux-perf)")?;
    Ok(Recording { child, data })
}

impl Recording {
    /// Stops the recording (perf writes its file on SIGINT) and folds it
    /// into a flame graph when inferno is installed.
    pub fn finish(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).context("stopping perf")?;
        self.child.wait().context("waiting for perf")?;
        if !has("inferno-collapse-perf") || !has("inferno-flamegraph") {
            eprintln!(
                "bench: profile in {} (install inferno to fold it: cargo install inferno)",
                self.data.display()
            );
            return Ok(());
        }
        let folded = self.data.with_extension("folded");
        let svg = self.data.with_extension("svg");
        let script = Command::new("perf")
            .args(["script", "-i"])
            .arg(&self.data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("perf script")?;
        let out = std::fs::File::create(&folded)?;
        Command::new("inferno-collapse-perf")
            .stdin(script.stdout.context("perf script's output")?)
            .stdout(out)
            .status()
            .context("inferno-collapse-perf")?;
        let title = self
            .data
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Command::new("inferno-flamegraph")
            .args(["--title", &title])
            .stdin(std::fs::File::open(&folded)?)
            .stdout(std::fs::File::create(&svg)?)
            .status()
            .context("inferno-flamegraph")?;
        eprintln!("bench: flame graph {}", svg.display());
        Ok(())
    }
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
