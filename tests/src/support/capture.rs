//! A packet capture (tcpdump) of an interface of the world, and what it
//! caught: tests that must prove nothing crossed a link in plaintext.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A packet capture (tcpdump) running until [`Capture::finish`].
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i IFACE -w FILE` via `spawn` and waits until it
    /// captures.
    pub fn start(
        file: PathBuf,
        iface: &str,
        spawn: impl FnOnce(&mut Command) -> Result<Child>,
    ) -> Result<Self> {
        let mut cmd = Command::new("tcpdump");
        cmd.args([
            "-i",
            iface,
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-n",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file)
        .arg("tcp")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = spawn(&mut cmd)?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains("listening on") => break,
                Ok(l) => seen.push(l),
                Err(_) if Instant::now() > deadline => {
                    let _ = child.kill();
                    bail!("tcpdump did not start capturing: {}", seen.join("\n"));
                }
                Err(_) => {}
            }
        }
        Ok(Self {
            child: Some(child),
            file,
        })
    }

    /// Stops tcpdump (SIGINT flushes the file) and returns the capture.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if let Some(mut c) = self.child.take() {
            // Let the last packets in flight reach the file.
            std::thread::sleep(Duration::from_millis(300));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            )?;
            c.wait()?;
        }
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `needle` occurs in the captured bytes.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
