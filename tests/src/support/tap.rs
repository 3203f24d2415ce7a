//! Running the operator's CLI on a node: `waymark tap` during traffic, and
//! reading its `-o json` lines.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::await_metric;
use crate::world::Node;

/// The `waymark` binary the world's agents run, as a command.
pub fn waymark() -> Command {
    let bin = crate::world::agent::waymark_bin().expect("the waymark binary");
    Command::new(bin)
}

/// Runs `waymark tap ARGS` on `node` while `traffic` runs, once the agent
/// has the tap open; returns what the tap printed. The tap must end by
/// itself (its `--max` or `--duration`).
pub fn tap(node: &Node, args: &[&str], traffic: impl FnOnce() -> Result<()>) -> Result<String> {
    std::thread::scope(|s| {
        let cli =
            s.spawn(|| node.run_timeout(waymark().arg("tap").args(args), Duration::from_secs(90)));
        let opened = await_metric(node, "waymark_tap_streams", &[], 1.0);
        let sent = opened.and_then(|()| traffic());
        let out: Output = cli.join().expect("the tap thread")?;
        sent?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "waymark tap {args:?}: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    })
}

/// The JSON events of a `-o json` tap.
pub fn tap_events(out: &str) -> Result<Vec<Value>> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("tap line {l:?}")))
        .collect()
}
