//! A node: a network namespace on the fabric with a bridge for its pods, a
//! pods cgroup, and (usually) a running `waymark agent`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

use super::Shared;
use super::admin::http_get;
use super::agent::{self, waymark_bin};
use super::net::{in_netns, netns_path};
use super::pod::{DEFAULT_RUN_TIMEOUT, Pod};
use super::process::{
    Placement, Server, output_ok, serve_with, signal, spawn_placed, tail, wait_output,
};

/// How long `stop_agent` waits for the agent to exit before SIGKILL.
pub const AGENT_STOP_PATIENCE: Duration = Duration::from_secs(20);

/// A node of the world. Get one with [`World::node`](super::World::node).
pub struct Node {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) cgroup: PathBuf,
    pub(crate) fabric_ip: Ipv4Addr,
    pub(crate) fabric_ip6: Ipv6Addr,
    pub(crate) pods: Vec<Pod>,
    pub(crate) config_path: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) config: Mutex<toml::Table>,
    pub(crate) agent: Mutex<Option<Child>>,
    pub(crate) shared: Arc<Shared>,
}

impl Node {
    /// `node<i>`
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's pods.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pod `j` of this node. Panics if there is no such pod.
    pub fn pod(&self, j: usize) -> &Pod {
        self.pods
            .get(j)
            .unwrap_or_else(|| panic!("{} has {} pods, no pod {j}", self.name, self.pods.len()))
    }

    /// 10.0.0.(i+1), on the fabric.
    pub fn fabric_ip(&self) -> Ipv4Addr {
        self.fabric_ip
    }

    /// fd00::(i+1), on the fabric.
    pub fn fabric_ip6(&self) -> Ipv6Addr {
        self.fabric_ip6
    }

    /// The netns name (`wm<id>-n<i>`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/var/run/netns/wm<id>-n<i>`
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The node's pods cgroup, which its agent attaches to:
    /// `<cgroup2 mount>/waymark-<world>/node<i>`.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// Where the agent's config is written.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The agent's config as last written.
    pub fn config(&self) -> toml::Table {
        self.config.lock().unwrap().clone()
    }

    /// Changes the agent's config file (atomically replaced); a running
    /// agent is not restarted or signalled.
    pub fn update_config(&self, f: impl FnOnce(&mut toml::Table)) -> Result<()> {
        let mut cfg = self.config.lock().unwrap();
        let mut next = cfg.clone();
        f(&mut next);
        agent::admin_addr(&next)?;
        agent::write_config(&self.config_path, &next)?;
        *cfg = next;
        Ok(())
    }

    /// The agent's admin socket: every endpoint, for root (the tests) and
    /// `admin.socket_group`. Commands run on the node get it as
    /// `WAYMARK_ADMIN`, so the CLI finds it.
    pub fn admin_socket(&self) -> PathBuf {
        agent::admin_socket(&self.config.lock().unwrap())
    }

    /// The agent's loopback TCP admin address (in the node's netns): `/live`,
    /// `/ready` and `/metrics` only.
    pub fn admin_addr(&self) -> SocketAddr {
        agent::admin_addr(&self.config.lock().unwrap())
            .expect("checked when the config was written")
    }

    /// Where the agent's stdout and stderr go.
    pub fn agent_log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent logged so far (across restarts).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Spawns `cmd` in the node's netns (not in any pod's cgroup: it stays in
    /// the caller's), with `WAYMARK_ADMIN` set to the agent's admin socket
    /// unless `cmd` sets it. The world kills it when it shuts down.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        if !cmd.get_envs().any(|(k, _)| k == "WAYMARK_ADMIN") {
            cmd.env("WAYMARK_ADMIN", self.admin_socket());
        }
        let child = spawn_placed(
            cmd,
            &Placement {
                netns: &self.netns_path(),
                cgroup: None,
                new_session: false,
            },
        )?;
        self.shared.tracker.track(child.id() as i32);
        Ok(child)
    }

    /// The cgroup the node's agents run in: `agent<i>`, beside the node's
    /// pods cgroup (as a DaemonSet's pod sits beside the others), so the
    /// agent's own `sock_ops` program (the request shortcut) sees the
    /// agent's sockets and nothing else.
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup.with_file_name(format!("agent{}", self.index))
    }

    /// Spawns `cmd` as a hostNetwork pod's container runs: in the node's
    /// network namespace, but in a pod cgroup `pod<uid>` under the node's
    /// pods cgroup, which the agent's redirect programs are attached to (so
    /// only enrollment, by network namespace, keeps it from being
    /// redirected). The world kills it and removes the cgroup at shutdown.
    pub fn spawn_host_network(&self, cmd: &mut Command, uid: &str) -> Result<Child> {
        let cgroup = self.cgroup.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)?;
        let child = spawn_placed(
            cmd,
            &Placement {
                netns: &self.netns_path(),
                cgroup: Some(&cgroup),
                new_session: false,
            },
        )?;
        self.shared.tracker.track(child.id() as i32);
        Ok(child)
    }

    /// Runs `cmd` on the node to completion, killing it after 30 s.
    pub fn run(&self, cmd: &mut Command) -> Result<Output> {
        self.run_timeout(cmd, DEFAULT_RUN_TIMEOUT)
    }

    pub fn run_timeout(&self, cmd: &mut Command, timeout: Duration) -> Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?} on {}", self.name);
        wait_output(self.spawn(cmd)?, timeout, &what)
    }

    /// Runs `cmd` on the node and returns its stdout; non-zero exit is an error.
    pub fn run_ok(&self, cmd: &mut Command) -> Result<String> {
        let what = format!("{cmd:?} on {}", self.name);
        output_ok(self.run(cmd)?, &what)
    }

    /// Starts a server on the node and waits for its `listening …` line.
    pub fn serve(&self, cmd: &mut Command) -> Result<Server> {
        serve_with(
            cmd,
            self.shared.tracker.clone(),
            |c| self.spawn(c),
            "listening ",
            Duration::from_secs(10),
        )
    }

    /// Runs `f` on a thread inside the node's netns.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.netns_path(), f)
    }

    /// Opens a TCP connection from inside the node's netns (from the test
    /// process's cgroup, so it is never redirected).
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.in_netns(|| TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connecting to {addr} from {}", self.name))
    }

    /// `GET path` on the agent's loopback TCP admin port, from inside the
    /// node's netns (what probes and scrapers see: `/live`, `/ready`,
    /// `/metrics`). Returns the status and the body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self.admin_addr();
        let stream = self.tcp_connect(addr, Duration::from_secs(2))?;
        http_get(stream, &addr.to_string(), path)
    }

    /// `GET path` on the agent's admin socket, as root: every endpoint.
    pub fn admin_socket_get(&self, path: &str) -> Result<(u16, String)> {
        let socket = self.admin_socket();
        let stream = UnixStream::connect(&socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        http_get(stream, "localhost", path)
            .with_context(|| format!("on the admin socket {}", socket.display()))
    }

    /// `GET /metrics`, failing unless the status is 200.
    pub fn metrics(&self) -> Result<String> {
        match self.admin_get("/metrics")? {
            (200, body) => Ok(body),
            (st, body) => bail!("GET /metrics on {}: {st}: {body}", self.name),
        }
    }

    /// The agent's pid, if it was started and has not been seen to exit.
    pub fn agent_pid(&self) -> Option<i32> {
        let mut slot = self.agent.lock().unwrap();
        match slot.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => slot.as_ref().map(|c| c.id() as i32),
            _ => None,
        }
    }

    /// Starts the agent and waits until `GET /ready` answers 200.
    pub fn start_agent(&self) -> Result<()> {
        self.spawn_agent()?;
        self.wait_agent_ready()
    }

    /// Starts `waymark agent --config <file>` in the node's netns without
    /// waiting for readiness.
    pub fn spawn_agent(&self) -> Result<()> {
        let mut slot = self.agent.lock().unwrap();
        if let Some(c) = slot.as_mut()
            && c.try_wait()?.is_none()
        {
            bail!(
                "the agent of {} is already running (pid {})",
                self.name,
                c.id()
            );
        }
        let bin = match &self.shared.agent_bin {
            Some(b) => b.clone(),
            None => waymark_bin()?,
        };
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(
            log,
            "==== waymark-tests: starting {} agent --config {} in netns {} ====",
            bin.display(),
            self.config_path.display(),
            self.netns
        )?;
        let mut cmd = Command::new(&bin);
        cmd.arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "waymark=debug,info");
        }
        // Plain text in the log file.
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.shared.agent_env {
            cmd.env(k, v);
        }
        let child = spawn_placed(
            &mut cmd,
            &Placement {
                netns: &self.netns_path(),
                cgroup: Some(&self.agent_cgroup()),
                new_session: self.shared.persistent,
            },
        )?;
        let pid = child.id() as i32;
        self.shared.tracker.track(pid);
        let _ = std::fs::write(self.pid_file(), format!("{pid}\n"));
        *slot = Some(child);
        Ok(())
    }

    fn pid_file(&self) -> PathBuf {
        self.shared.dir.join(format!("{}-agent.pid", self.name))
    }

    /// Polls `GET /ready` until it answers 200, failing with the tail of the
    /// agent's log if the agent exits or the world's ready timeout passes.
    pub fn wait_agent_ready(&self) -> Result<()> {
        let patience = self.shared.ready_timeout;
        let start = Instant::now();
        let mut last;
        loop {
            {
                let mut slot = self.agent.lock().unwrap();
                let Some(child) = slot.as_mut() else {
                    bail!("the agent of {} is not running", self.name);
                };
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "the agent of {} exited ({st}) before it was ready; last lines of {}:\n{}",
                        self.name,
                        self.log_path.display(),
                        tail(&self.log_path, 40)
                    );
                }
            }
            match self.admin_get("/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((st, body)) => last = format!("GET /ready: {st} {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if start.elapsed() >= patience {
                bail!(
                    "the agent of {} was not ready within {patience:?} ({last}); last lines of {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    tail(&self.log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `sig` to the agent without waiting.
    pub fn signal_agent(&self, sig: Signal) -> Result<()> {
        let pid = self
            .agent_pid()
            .ok_or_else(|| anyhow!("the agent of {} is not running", self.name))?;
        signal(pid, sig as i32);
        Ok(())
    }

    /// Waits for the agent to exit by itself and returns how it exited.
    pub fn wait_agent_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            {
                let mut slot = self.agent.lock().unwrap();
                let child = slot
                    .as_mut()
                    .ok_or_else(|| anyhow!("the agent of {} was not started", self.name))?;
                if let Some(st) = child.try_wait()? {
                    slot.take();
                    let _ = std::fs::remove_file(self.pid_file());
                    return Ok(st);
                }
            }
            if start.elapsed() >= timeout {
                bail!("the agent of {} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the agent and waits up to [`AGENT_STOP_PATIENCE`] for
    /// it to exit; past that it is SIGKILLed and this is an error.
    pub fn stop_agent(&self, sig: Signal) -> Result<ExitStatus> {
        self.signal_agent(sig)?;
        match self.wait_agent_exit(AGENT_STOP_PATIENCE) {
            Ok(st) => Ok(st),
            Err(e) => {
                if let Some(pid) = self.agent_pid() {
                    signal(pid, libc::SIGKILL);
                }
                let _ = self.wait_agent_exit(Duration::from_secs(5));
                Err(e.context(format!("sent {sig}; killed the agent")))
            }
        }
    }
}

/// A second agent on a node, as a DaemonSet rollout (`maxSurge: 1`) starts
/// it beside the running one: the node's config with an admin port of its
/// own (in a cluster both would share one through `SO_REUSEPORT`; apart,
/// a test can tell which agent answers). Killed with the world.
pub struct SuccessorAgent {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Node {
    /// Starts a successor agent (see [`SuccessorAgent`]) without waiting.
    pub fn spawn_successor(&self, admin_port: u16) -> Result<SuccessorAgent> {
        self.spawn_successor_with(admin_port, |_| {})
    }

    /// Starts a successor agent whose config is the node's, changed by
    /// `edit` after its admin port is set (a port equal to the node's own
    /// shares it, as two agents of a DaemonSet rollout do).
    pub fn spawn_successor_with(
        &self,
        admin_port: u16,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Result<SuccessorAgent> {
        let mut cfg = self.config();
        let admin = SocketAddr::new(self.admin_addr().ip(), admin_port);
        cfg.get_mut("admin")
            .and_then(|a| a.as_table_mut())
            .context("the node's config has no [admin]")?
            .insert("listen".into(), toml::Value::String(admin.to_string()));
        edit(&mut cfg);
        let path = self
            .shared
            .dir
            .join(format!("{}-successor.toml", self.name));
        agent::write_config(&path, &cfg)?;
        let log = self.shared.dir.join(format!("{}-successor.log", self.name));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let bin = match &self.shared.agent_bin {
            Some(b) => b.clone(),
            None => waymark_bin()?,
        };
        let mut cmd = Command::new(bin);
        cmd.arg("agent")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "waymark=debug,info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_placed(
            &mut cmd,
            &Placement {
                netns: &self.netns_path(),
                cgroup: Some(&self.agent_cgroup()),
                new_session: false,
            },
        )?;
        self.shared.tracker.track(child.id() as i32);
        Ok(SuccessorAgent { child, admin, log })
    }
}

impl SuccessorAgent {
    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its admin address (inside the node's netns).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Sends `sig` to it.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        signal(self.child.id() as i32, sig as i32);
        Ok(())
    }

    /// Waits for it to exit by itself and returns how it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if start.elapsed() >= timeout {
                bail!("the successor agent did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `GET /ready` on its admin port answers 200 (failing with
    /// its log if it exits first or the world's ready timeout passes).
    pub fn wait_ready(&mut self, node: &Node) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "the successor agent on {} exited ({st}):\n{}",
                    node.name,
                    self.log()
                );
            }
            let ready = node
                .tcp_connect(self.admin, Duration::from_secs(1))
                .and_then(|s| http_get(s, &self.admin.to_string(), "/ready"));
            if matches!(ready, Ok((200, _))) {
                return Ok(());
            }
            if start.elapsed() >= node.shared.ready_timeout {
                bail!(
                    "the successor agent on {} was not ready within {:?}:\n{}",
                    node.name,
                    node.shared.ready_timeout,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
