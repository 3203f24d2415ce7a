//! A pod: a network namespace with one `eth0` on its node's `pods` bridge,
//! and a cgroup its processes are placed in.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::Shared;
use super::net::netns_path;
use super::process::{Placement, Server, output_ok, serve_with, spawn_placed, wait_output};

/// How long `run` waits for a command by default.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A pod of the world. Get one with [`World::pod`](super::World::pod).
pub struct Pod {
    pub(crate) node: usize,
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) cgroup: PathBuf,
    pub(crate) ip: Ipv4Addr,
    pub(crate) ip6: Ipv6Addr,
    pub(crate) shared: Arc<Shared>,
}

impl Pod {
    /// `default/n<node>p<pod>`, the name the agent's config gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Index of the pod's node.
    pub fn node_index(&self) -> usize {
        self.node
    }

    /// Index of the pod on its node.
    pub fn index(&self) -> usize {
        self.index
    }

    /// 10.(node+1).0.(pod+2)
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// fd00:(node+1)::(pod+2)
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// The netns name (`wm<id>-n<i>p<j>`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/var/run/netns/wm<id>-n<i>p<j>`
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// `<cgroup2 mount>/waymark-<world>/node<i>/pod<j>`
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// Spawns `cmd` in the pod: placed in the pod's cgroup, then in its
    /// network namespace. The world kills it (by pid) when it shuts down.
    /// Build a new `Command` for every spawn.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let child = spawn_placed(
            cmd,
            &Placement {
                netns: &self.netns_path(),
                cgroup: Some(&self.cgroup),
                new_session: false,
            },
        )?;
        self.shared.tracker.track(child.id() as i32);
        Ok(child)
    }

    /// Starts the pod's sandbox as Kubernetes would name it: a `sleep`
    /// in the pod's netns, in a child cgroup `pod<uid>` of the pod's cgroup
    /// (the kubelet's cgroup paths carry the pod's UID, which is how the
    /// agent finds a pod's network namespace). The world kills it at
    /// shutdown and removes the cgroup with the pod's.
    pub fn start_sandbox(&self, uid: &str) -> Result<Child> {
        let cgroup = self.cgroup.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)?;
        let child = spawn_placed(
            Command::new("sleep").arg("infinity").stdin(Stdio::null()),
            &Placement {
                netns: &self.netns_path(),
                cgroup: Some(&cgroup),
                new_session: false,
            },
        )?;
        self.shared.tracker.track(child.id() as i32);
        Ok(child)
    }

    /// Runs `cmd` in the pod to completion (stdin closed, output collected),
    /// killing it after [`DEFAULT_RUN_TIMEOUT`]. Any exit status is Ok.
    pub fn run(&self, cmd: &mut Command) -> Result<Output> {
        self.run_timeout(cmd, DEFAULT_RUN_TIMEOUT)
    }

    /// [`run`](Self::run) with a deadline of your own.
    pub fn run_timeout(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?} in pod {}", self.name);
        wait_output(self.spawn(cmd)?, timeout, &what)
    }

    /// Runs `cmd` and returns its stdout; a non-zero exit is an error that
    /// carries stderr.
    pub fn run_ok(&self, cmd: &mut Command) -> Result<String> {
        let what = format!("{cmd:?} in pod {}", self.name);
        output_ok(self.run(cmd)?, &what)
    }

    /// Starts a server in the pod and waits (10 s) for its `listening …`
    /// line on stdout (what `testpeer` servers print once bound).
    pub fn serve(&self, cmd: &mut Command) -> Result<Server> {
        self.serve_until(cmd, "listening ", Duration::from_secs(10))
    }

    /// Starts a process in the pod and waits for a stdout line that starts
    /// with `ready_prefix`.
    pub fn serve_until(
        &self,
        cmd: &mut Command,
        ready_prefix: &str,
        timeout: Duration,
    ) -> Result<Server> {
        serve_with(
            cmd,
            self.shared.tracker.clone(),
            |c| self.spawn(c),
            ready_prefix,
            timeout,
        )
    }
}
