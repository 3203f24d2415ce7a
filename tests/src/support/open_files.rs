//! An agent started under a given open-files limit, for the tests of what
//! the agent does with its descriptors.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A script that starts the agent with `prlimit --nofile=SOFT:HARD`, for
/// [`WorldBuilder::agent_bin`](crate::WorldBuilder::agent_bin). Its
/// directory is removed when this is dropped, also when the test fails.
pub struct AgentWithFiles {
    dir: PathBuf,
    path: PathBuf,
}

impl AgentWithFiles {
    /// Soft and hard limit `files`: the agent cannot raise it.
    pub fn new(files: u64) -> Result<Self> {
        Self::soft_hard(files, files)
    }

    /// Soft limit `soft` under hard limit `hard`.
    pub fn soft_hard(soft: u64, hard: u64) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "waymark-files-{soft}-{hard}-{}",
            std::process::id()
        ));
        // Owned from here on, so a failure below still removes it.
        let me = Self {
            path: dir.join("waymark"),
            dir,
        };
        std::fs::create_dir_all(&me.dir)
            .with_context(|| format!("creating {}", me.dir.display()))?;
        std::fs::write(
            &me.path,
            format!(
                "#!/bin/sh\nexec prlimit --nofile={soft}:{hard} {} \"$@\"\n",
                crate::world::agent::waymark_bin()?.display()
            ),
        )
        .with_context(|| format!("writing {}", me.path.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&me.path, std::fs::Permissions::from_mode(0o755))?;
        Ok(me)
    }

    /// The script, to start the agent with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AgentWithFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The hard open-files limit of this process (`/proc/self/limits`), which
/// the agents it starts inherit.
pub fn hard_limit() -> Result<u64> {
    std::fs::read_to_string("/proc/self/limits")?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|n| n.parse().ok())
        .context("no open files limit in /proc/self/limits")
}
