//! `waymark cleanup`: removes what an agent leaves pinned in bpffs, for
//! uninstalling waymark from a node.
//!
//! The redirect's links and maps are pinned so that a rollout or a crash
//! never detaches them (`redirect.on_agent_down = "closed"` keeps enrolled
//! pods off the network rather than letting them bypass the mesh). That is
//! what an upgrade wants and what an uninstall must undo: once the DaemonSet
//! is gone nothing would ever unpin them, and every enrolled pod's new
//! connections would be refused. Unlinking the pins detaches the programs
//! (the links held them) and frees the maps.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::handover::{self, Claim};
use crate::redirect::pin::{self, LAYOUT};

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    /// The agent's `redirect.pin_path`.
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Read `redirect.pin_path` from this config file instead.
    #[arg(long, short, value_name = "FILE", conflicts_with = "pin_path")]
    pub config: Option<PathBuf>,
}

/// What was removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

pub fn run(args: CleanupArgs) -> Result<()> {
    let root = match &args.config {
        Some(file) => {
            crate::config::Config::from_file(file)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("reading {}", file.display()))?
                .redirect
                .pin_path
        }
        None => args.pin_path.clone(),
    };
    match cleanup(&root)? {
        None => println!(
            "nothing pinned at {}: no waymark state on this node",
            root.display()
        ),
        Some(r) => println!(
            "removed {}: {} pinned links (their programs are detached) and {} maps",
            root.display(),
            r.links,
            r.maps
        ),
    }
    Ok(())
}

/// Removes the pinned layout under `root` unless an agent serves the node
/// (its lock is held); `None` when nothing is pinned there.
pub fn cleanup(root: &Path) -> Result<Option<Removed>> {
    if !root.exists() {
        return Ok(None);
    }
    if !pin::is_bpffs(root) {
        bail!(
            "{} is not on a bpffs: not waymark's pinned state, left alone",
            root.display()
        );
    }
    let layout = root.join(LAYOUT);
    if layout.exists() {
        // Holding the serving lock keeps an agent from starting meanwhile.
        let _lock = match handover::claim(root, &layout)? {
            Claim::Serving(lock) => lock,
            Claim::Successor { .. } => bail!(
                "an agent serves this node (it holds the lock on {}): stop it first \
                 (uninstall the DaemonSet), then run the cleanup again",
                root.display()
            ),
        };
        let mut removed = Removed::default();
        count(&layout, &mut removed)?;
        std::fs::remove_dir_all(&layout)
            .with_context(|| format!("removing {}", layout.display()))?;
        std::fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
        return Ok(Some(removed));
    }
    let leftover: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !leftover.is_empty() {
        bail!(
            "{} holds {leftover:?}, not a layout this waymark knows ({LAYOUT}): left alone",
            root.display()
        );
    }
    std::fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
    Ok(Some(Removed::default()))
}

/// Counts the pinned links (`links-*/`) and maps (`maps/`) under `layout`.
fn count(layout: &Path, removed: &mut Removed) -> Result<()> {
    for entry in
        std::fs::read_dir(layout).with_context(|| format!("reading {}", layout.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let n = std::fs::read_dir(entry.path())
            .map(|d| d.count())
            .unwrap_or(0);
        if name == "maps" {
            removed.maps += n;
        } else if name.starts_with("links-") {
            removed.links += n;
        }
    }
    Ok(())
}
