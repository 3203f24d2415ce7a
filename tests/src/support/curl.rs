//! curl run from inside a pod, so requests take the production path (the
//! pod's cgroup and netns, redirected by the agent) and are made by a real,
//! independent HTTP client.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::world::Pod;

/// The flags every call shares: no proxy from the environment, bounded time.
fn base(max_secs: u32) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", &max_secs.to_string()]);
    cmd
}

/// Splits the `-w "\n%{http_code}"` trailer off curl's output.
fn status_and_rest(out: &str) -> (u16, String) {
    let (rest, code) = out.rsplit_once('\n').unwrap_or(("", out));
    (code.trim().parse().unwrap_or(0), rest.to_string())
}

/// One request from `pod`: (status, body); status 0 when no response came.
/// `extra` are more curl arguments (`-H NAME:VALUE`, `-X POST`, …).
pub fn curl(pod: &Pod, url: &str, extra: &[&str]) -> Result<(u16, String)> {
    let out = pod.run_ok(base(10).args(["-w", "\n%{http_code}"]).args(extra).arg(url))?;
    Ok(status_and_rest(&out))
}

/// One request from `pod` with `curl -i`: (status, head and body as one
/// text, for tests that look at headers and body together).
pub fn curl_i(pod: &Pod, url: &str, extra: &[&str]) -> Result<(u16, String)> {
    let out = pod.run_ok(
        base(10)
            .args(["-i", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(url),
    )?;
    Ok(status_and_rest(&out))
}

/// Requests `urls` from `pod` one after another on one keep-alive
/// connection; returns the status codes. Fails unless every URL got a
/// response (a "000" means curl got none).
pub fn curl_codes(pod: &Pod, extra: &[&str], urls: &[String]) -> Result<Vec<String>> {
    let mut cmd = base(20);
    cmd.args(["-w", "%{http_code}\n"]).args(extra);
    for u in urls {
        cmd.args(["-o", "/dev/null", u]);
    }
    let out = pod.run_timeout(&mut cmd, Duration::from_secs(120))?;
    let codes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ensure!(
        codes.len() == urls.len() && codes.iter().all(|c| c != "000"),
        "curl {extra:?} {urls:?} from {}: {codes:?} {}",
        pod.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(codes)
}

/// What curl said about each of many requests, tallied.
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: u32,
    /// By status code; "000" when no response came.
    pub status: BTreeMap<String, u32>,
    /// By the pod that answered (`x-pod`), "" when none did.
    pub pods: BTreeMap<String, u32>,
    /// Answers of the proxy itself, by `l5d-proxy-error`.
    pub proxy_errors: BTreeMap<String, u32>,
    /// Connections curl opened.
    pub connects: u32,
    /// The slowest request.
    pub max_secs: f64,
}

impl Tally {
    pub fn status(&self, code: &str) -> u32 {
        self.status.get(code).copied().unwrap_or(0)
    }

    pub fn pod(&self, name: &str) -> u32 {
        self.pods.get(name).copied().unwrap_or(0)
    }

    /// Adds one `-w` line of [`WRITE_OUT`].
    fn add(&mut self, line: &str) -> Result<()> {
        let bad = || format!("curl -w line {line:?}");
        let (head, err) = line.split_once(" err=").with_context(bad)?;
        let (head, pod_name) = head.split_once(" pod=").with_context(bad)?;
        let mut f = head.split(' ');
        let (code, connects, secs) = (f.next(), f.next(), f.next());
        self.requests += 1;
        *self
            .status
            .entry(code.unwrap_or("?").to_string())
            .or_default() += 1;
        *self.pods.entry(pod_name.to_string()).or_default() += 1;
        if !err.is_empty() {
            *self.proxy_errors.entry(err.to_string()).or_default() += 1;
        }
        self.connects += connects.and_then(|c| c.parse().ok()).unwrap_or(0);
        let secs: f64 = secs.and_then(|s| s.parse().ok()).unwrap_or(0.0);
        self.max_secs = self.max_secs.max(secs);
        Ok(())
    }
}

const WRITE_OUT: &str =
    "%{http_code} %{num_connects} %{time_total} pod=%header{x-pod} err=%header{l5d-proxy-error}\n";

/// GETs `url` from `pod` with curl, whose URL globs make it many requests
/// (`/a?i=[1-100]`) over keep-alive connections, `parallel` at a time;
/// `extra` are more curl arguments. Bodies are discarded.
pub fn curl_many(pod: &Pod, url: &str, parallel: u32, extra: &[&str]) -> Result<Tally> {
    let mut cmd = base(20);
    cmd.args(["-o", "/dev/null", "-w", WRITE_OUT]);
    if parallel > 1 {
        cmd.args(["--parallel", "--parallel-max", &parallel.to_string()]);
    }
    let out = pod.run_timeout(cmd.args(extra).arg(url), Duration::from_secs(120))?;
    let mut t = Tally::default();
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
    {
        t.add(line)?;
    }
    Ok(t)
}
