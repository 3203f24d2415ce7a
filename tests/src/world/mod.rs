//! The test world: a small cluster of network namespaces on this machine.
//!
//! ```ignore
//! use waymark_tests::{World, testpeer, require_root_or_skip};
//!
//! #[test]
//! fn pods_talk() {
//!     require_root_or_skip!();
//!     let world = World::builder("pods_talk").nodes(2).pods_per_node(1).agent(false).build().unwrap();
//!     let server = world.pod(1, 0);
//!     let _echo = server.serve(&mut testpeer(["echo", "--listen", &format!("{}:7000", server.ip())])).unwrap();
//!     let out = world.pod(0, 0).run_ok(&mut testpeer(["client", "--connect", &format!("{}:7000", server.ip())])).unwrap();
//! }
//! ```
//!
//! Layout and addresses: see [`topology`]. Everything the world creates is
//! removed by [`World::shutdown`] or when it is dropped, also while a test
//! panics; a world left behind by a killed process is removed by the next
//! world of the same name, or by `cargo xtask world down --name NAME`.

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod cleanup;
pub mod net;
mod node;
mod pod;
pub mod process;
pub mod state;
pub mod topology;
pub mod wait;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub use node::{AGENT_STOP_PATIENCE, Node, SuccessorAgent};
pub use pod::{DEFAULT_RUN_TIMEOUT, Pod};

use net::{netns_inode, netns_path};
use process::Tracker;
use state::{NodeState, PodState, WorldState, netns_prefix, validate_name, world_dir, world_id};

/// `90s`, `1500ms`: a duration as the agent's config reads it.
fn humantime_str(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Why the world cannot be built here, if it cannot (checked once).
pub fn skip_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Some("needs root (creates network namespaces and cgroups)".into());
            }
            if let Err(e) = cgroup::cgroup2_mount() {
                return Some(format!("{e:#}"));
            }
            if std::process::Command::new("ip").arg("-V").output().is_err() {
                return Some("iproute2's `ip` is not installed".into());
            }
            None
        })
        .clone()
}

/// Whether we run in CI (env `CI` set, not empty, not `false`/`0`): world
/// tests must then run, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Worlds alive in this process, by id, so that two names with the same id
/// fail loudly instead of removing each other's namespaces.
fn live_ids() -> &'static Mutex<HashMap<String, String>> {
    static LIVE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

type ConfigFn = dyn Fn(usize, &mut toml::Table) + Send + Sync;

/// Builds a [`World`]; see [`World::builder`].
pub struct WorldBuilder {
    name: String,
    nodes: usize,
    pods: usize,
    agent: bool,
    config_extra: Vec<String>,
    config_fn: Option<Box<ConfigFn>>,
    ready_timeout: Duration,
    persistent: bool,
    agent_env: Vec<(String, String)>,
    agent_bin: Option<PathBuf>,
    mtls: Option<MtlsOptions>,
}

/// Node-to-node mTLS for every agent of a world; see [`WorldBuilder::mtls`].
#[derive(Debug, Clone)]
struct MtlsOptions {
    leaf_lifetime: String,
    /// Nodes whose agent gets a trust anchor of its own.
    foreign: Vec<usize>,
    /// `waymark identity init` flags, e.g. `--issuer-lifetime 10d`.
    init_args: Vec<String>,
}

impl Default for MtlsOptions {
    fn default() -> Self {
        Self {
            leaf_lifetime: "1h".into(),
            foreign: Vec::new(),
            init_args: Vec::new(),
        }
    }
}

impl WorldBuilder {
    /// Turns on node-to-node mTLS: runs `waymark identity init` into
    /// `<world dir>/identity` and gives every agent an `[identity]` from
    /// it, its inbound tunnel on `<fabric ip>:15008`, every node in
    /// `[[nodes]]`, and every pod the identity
    /// `spiffe://cluster.local/ns/default/sa/n<i>p<j>` (see
    /// [`agent::pod_identity`]). Applied before `agent_config_extra` and
    /// `agent_config`, which can change any of it.
    pub fn mtls(mut self, on: bool) -> Self {
        self.mtls = on.then(|| self.mtls.take().unwrap_or_default());
        self
    }

    /// Leaf lifetime of the agents' certificates with [`Self::mtls`]
    /// (default 1h); short values exercise rotation.
    pub fn mtls_leaf_lifetime(mut self, lifetime: Duration) -> Self {
        let m = self.mtls.get_or_insert_with(Default::default);
        m.leaf_lifetime = humantime_str(lifetime);
        self
    }

    /// With [`Self::mtls`]: the issuer and the trust anchor (root) of the
    /// world's CA expire this long from now (`waymark identity init
    /// --issuer-lifetime/--root-lifetime`); `None` keeps init's default.
    pub fn mtls_ca_lifetimes(mut self, issuer: Option<Duration>, root: Option<Duration>) -> Self {
        let m = self.mtls.get_or_insert_with(Default::default);
        for (flag, d) in [("--issuer-lifetime", issuer), ("--root-lifetime", root)] {
            if let Some(d) = d {
                m.init_args.push(flag.into());
                m.init_args.push(humantime_str(d));
            }
        }
        self
    }

    /// With [`Self::mtls`]: node `i`'s agent gets a trust anchor and issuer
    /// of its own (`<world dir>/identity-node<i>`), so its peers reject its
    /// certificates and it rejects theirs.
    pub fn mtls_foreign_anchor(mut self, node: usize) -> Self {
        self.mtls
            .get_or_insert_with(Default::default)
            .foreign
            .push(node);
        self
    }

    /// Number of nodes (default 2).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Pods on every node (default 2).
    pub fn pods_per_node(mut self, n: usize) -> Self {
        self.pods = n;
        self
    }

    /// Whether every node starts a `waymark agent` (default true).
    pub fn agent(mut self, on: bool) -> Self {
        self.agent = on;
        self
    }

    /// TOML merged into every node's agent config: tables merge key by key,
    /// other values (arrays too) replace. Can be called several times.
    pub fn agent_config_extra(mut self, toml: impl Into<String>) -> Self {
        self.config_extra.push(toml.into());
        self
    }

    /// Edits each node's agent config (after the extra TOML); gets the node
    /// index.
    pub fn agent_config(
        mut self,
        f: impl Fn(usize, &mut toml::Table) + Send + Sync + 'static,
    ) -> Self {
        self.config_fn = Some(Box::new(f));
        self
    }

    /// An environment variable for the agents.
    pub fn agent_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.agent_env.push((key.into(), value.into()));
        self
    }

    /// Runs this binary as the agent (`BIN agent --config FILE`) instead of
    /// `waymark` (env `WAYMARK_BIN`, else next to the running executable).
    pub fn agent_bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(bin.into());
        self
    }

    /// How long to wait for an agent's `/ready` (default 20 s).
    pub fn agent_ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// Agents start in a session of their own, so they outlive the terminal
    /// of a `cargo xtask world up` (which then calls [`World::detach`]).
    pub fn persistent(mut self, on: bool) -> Self {
        self.persistent = on;
        self
    }

    /// Builds the world: removes leftovers of an earlier world of the same
    /// name, creates namespaces, links, cgroups and agent configs, starts the
    /// agents and waits until they are ready. On error, whatever was created
    /// is removed again.
    pub fn build(self) -> Result<World> {
        if let Some(reason) = skip_reason() {
            bail!("cannot build the test world: {reason}");
        }
        validate_name(&self.name)?;
        if self.nodes == 0 || self.nodes > topology::MAX_NODES {
            bail!("nodes must be 1..={}", topology::MAX_NODES);
        }
        if self.pods > topology::MAX_PODS {
            bail!("pods per node must be at most {}", topology::MAX_PODS);
        }
        let id = world_id(&self.name);
        let mount = cgroup::cgroup2_mount()?;
        {
            let mut live = live_ids().lock().unwrap();
            if let Some(other) = live.get(&id) {
                bail!(
                    "world {:?} has the same id {id} as world {other:?}, alive in this process; rename one of them",
                    self.name
                );
            }
            live.insert(id.clone(), self.name.clone());
        }
        let shared = Arc::new(Shared {
            name: self.name.clone(),
            id: id.clone(),
            dir: world_dir(&self.name),
            tracker: Arc::default(),
            persistent: self.persistent,
            ready_timeout: self.ready_timeout,
            agent_env: self.agent_env.clone(),
            agent_bin: self.agent_bin.clone(),
        });
        // From here on, dropping `world` (on any error) removes what exists.
        let mut world = World {
            cgroup_root: cgroup::world_root(&mount, &self.name),
            fabric: format!("{}fab", netns_prefix(&id)),
            shared,
            nodes: Vec::new(),
            netns: Vec::new(),
            done: false,
            detached: false,
        };
        world.setup(&self)?;
        Ok(world)
    }
}

/// What a world's nodes and pods share.
pub(crate) struct Shared {
    pub name: String,
    pub id: String,
    pub dir: PathBuf,
    pub tracker: Arc<Tracker>,
    pub persistent: bool,
    pub ready_timeout: Duration,
    pub agent_env: Vec<(String, String)>,
    pub agent_bin: Option<PathBuf>,
}

/// A running test world. Dropping it removes everything it created.
pub struct World {
    shared: Arc<Shared>,
    nodes: Vec<Node>,
    /// Namespaces in creation order.
    netns: Vec<String>,
    fabric: String,
    cgroup_root: PathBuf,
    done: bool,
    detached: bool,
}

impl World {
    /// A builder for a world named `name` (name it after the test: the name
    /// appears in paths, and two live worlds must not share it).
    ///
    /// `WAYMARK_WORLD_TAG`, when set, is appended to every world's name, so
    /// two checkouts can run the same tests on one machine at once.
    ///
    /// A name longer than the 64 characters a world name may have (a long
    /// test name, or a tag) is shortened to fit, keeping its start and adding
    /// a hash of the whole, so two long names that share a start stay apart.
    pub fn builder(name: &str) -> WorldBuilder {
        let name = match std::env::var("WAYMARK_WORLD_TAG") {
            Ok(tag) if !tag.is_empty() => format!("{name}-{tag}"),
            _ => name.to_string(),
        };
        let name = state::fit_name(&name);
        WorldBuilder {
            name,
            nodes: 2,
            pods: 2,
            agent: true,
            config_extra: Vec::new(),
            config_fn: None,
            ready_timeout: Duration::from_secs(20),
            persistent: false,
            agent_env: Vec::new(),
            agent_bin: None,
            mtls: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The short id in the world's netns names (`wm<id>-…`).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The world's directory: agent configs and logs, state for `xtask`.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The fabric's netns name.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    /// All namespaces of the world (fabric, nodes, pods).
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }

    /// `<cgroup2 mount>/waymark-<name>`
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`. Panics if there is no such node.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("the world has {} nodes, no node {i}", self.nodes.len()))
    }

    /// Pod `j` of node `i`. Panics if there is no such pod.
    pub fn pod(&self, i: usize, j: usize) -> &Pod {
        self.node(i).pod(j)
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// What the world recorded in `state.json`.
    pub fn state(&self) -> WorldState {
        WorldState {
            name: self.shared.name.clone(),
            id: self.shared.id.clone(),
            dir: self.shared.dir.clone(),
            cgroup: self.cgroup_root.clone(),
            fabric_netns: self.fabric.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeState {
                    name: n.name.clone(),
                    netns: n.netns.clone(),
                    netns_path: n.netns_path(),
                    cgroup: n.cgroup.clone(),
                    fabric_ip: n.fabric_ip.to_string(),
                    fabric_ip6: n.fabric_ip6.to_string(),
                    pod_cidr: topology::pod_cidr(n.index),
                    pod_cidr6: topology::pod_cidr6(n.index),
                    admin: n.admin_addr().to_string(),
                    admin_socket: Some(n.admin_socket()),
                    agent: n.agent.lock().unwrap().is_some(),
                    config: n.config_path.clone(),
                    log: n.log_path.clone(),
                    pods: n
                        .pods
                        .iter()
                        .map(|p| PodState {
                            name: p.name.clone(),
                            netns: p.netns.clone(),
                            netns_path: p.netns_path(),
                            cgroup: p.cgroup.clone(),
                            ip: p.ip.to_string(),
                            ip6: p.ip6.to_string(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn create_netns(&mut self, name: &str) -> Result<()> {
        // Recorded as soon as it exists (not before: one that existed already
        // is not ours to delete), so a half-set-up namespace is removed too.
        net::ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        net::ip_in(name, &["link", "set", "lo", "up"])?;
        let inode = netns_inode(&netns_path(name))
            .with_context(|| format!("netns {name} vanished after creation"))?;
        self.shared.tracker.add_netns(inode);
        topology::base_sysctls(&netns_path(name))
    }

    fn setup(&mut self, b: &WorldBuilder) -> Result<()> {
        let name = b.name.clone();
        let id = self.shared.id.clone();
        let prefix = netns_prefix(&id);

        // Another world (another process, or a crashed one) with this id?
        for other in state::list_worlds() {
            if other != name && world_id(&other) == id && !net::list_netns(&prefix).is_empty() {
                bail!(
                    "world {name:?} has the same id {id} as world {other:?}, whose namespaces {prefix}* exist; \
                     remove it with `cargo xtask world down --name {other}` or rename this world"
                );
            }
        }
        let removed = cleanup::remove_world(&name, Duration::from_secs(5))
            .with_context(|| format!("removing leftovers of an earlier world {name:?}"))?;
        if !removed.is_empty() {
            eprintln!(
                "waymark world {name}: removed leftovers of an earlier run: {}",
                removed.join("; ")
            );
        }
        std::fs::create_dir_all(&self.shared.dir)
            .with_context(|| format!("creating {}", self.shared.dir.display()))?;
        state::mount_pin_root(&name)?;

        // Namespaces.
        let fabric = self.fabric.clone();
        self.create_netns(&fabric)?;
        let node_ns: Vec<String> = (0..b.nodes).map(|i| format!("{prefix}n{i}")).collect();
        let pod_ns: Vec<Vec<String>> = (0..b.nodes)
            .map(|i| (0..b.pods).map(|j| format!("{prefix}n{i}p{j}")).collect())
            .collect();
        for ns in node_ns.iter().chain(pod_ns.iter().flatten()) {
            self.create_netns(ns)?;
        }
        for ns in &node_ns {
            topology::node_sysctls(&netns_path(ns))?;
        }

        // Links, addresses, routes.
        topology::ip_batch(Some(&fabric), &topology::fabric_script(&node_ns))?;
        for (i, ns) in node_ns.iter().enumerate() {
            topology::ip_batch(Some(ns), &topology::node_script(i, b.nodes, &pod_ns[i]))?;
            for (j, pns) in pod_ns[i].iter().enumerate() {
                topology::ip_batch(Some(pns), &topology::pod_script(i, j))?;
            }
        }

        // Cgroups.
        std::fs::create_dir(&self.cgroup_root)
            .with_context(|| format!("creating cgroup {}", self.cgroup_root.display()))?;
        for i in 0..b.nodes {
            let node_cg = self.cgroup_root.join(format!("node{i}"));
            std::fs::create_dir(&node_cg)
                .with_context(|| format!("creating cgroup {}", node_cg.display()))?;
            // Beside the pods, as `Node::agent_cgroup` says.
            let agent_cg = self.cgroup_root.join(format!("agent{i}"));
            std::fs::create_dir(&agent_cg)
                .with_context(|| format!("creating cgroup {}", agent_cg.display()))?;
            for j in 0..b.pods {
                let pod_cg = node_cg.join(format!("pod{j}"));
                std::fs::create_dir(&pod_cg)
                    .with_context(|| format!("creating cgroup {}", pod_cg.display()))?;
            }
        }

        // Identity material (mTLS).
        let mut ca_dirs: Vec<PathBuf> = Vec::new();
        if let Some(m) = &b.mtls {
            let bin = match &self.shared.agent_bin {
                Some(b) => b.clone(),
                None => agent::waymark_bin()?,
            };
            let shared_ca = self.shared.dir.join("identity");
            agent::identity_init(&bin, &shared_ca, &m.init_args)?;
            for i in 0..b.nodes {
                if m.foreign.contains(&i) {
                    let own = self.shared.dir.join(format!("identity-node{i}"));
                    agent::identity_init(&bin, &own, &m.init_args)?;
                    ca_dirs.push(own);
                } else {
                    ca_dirs.push(shared_ca.clone());
                }
            }
        }
        let node_addrs: Vec<(String, std::net::IpAddr)> = (0..b.nodes)
            .map(|i| (format!("node{i}"), topology::node_fabric_ip(i).into()))
            .collect();

        // Nodes, pods, agent configs.
        for (i, ns) in node_ns.iter().enumerate() {
            let node_cg = self.cgroup_root.join(format!("node{i}"));
            let pods: Vec<Pod> = (0..b.pods)
                .map(|j| Pod {
                    node: i,
                    index: j,
                    name: format!("default/n{i}p{j}"),
                    netns: pod_ns[i][j].clone(),
                    cgroup: node_cg.join(format!("pod{j}")),
                    ip: topology::pod_ip(i, j),
                    ip6: topology::pod_ip6(i, j),
                    shared: self.shared.clone(),
                })
                .collect();
            let entries: Vec<agent::PodEntry> = pods
                .iter()
                .map(|p| agent::PodEntry {
                    name: p.name.clone(),
                    netns: p.netns_path(),
                    ips: vec![p.ip.to_string(), p.ip6.to_string()],
                })
                .collect();
            let node_name = format!("node{i}");
            // Each agent its own socket, in the world's directory: a short
            // name, as a Unix socket path holds at most 107 bytes.
            let socket = self.shared.dir.join(format!("n{i}.sock"));
            let pins = state::pin_root(&self.shared.name).join(&node_name);
            let mut cfg = agent::base_config(
                &node_name,
                &socket,
                &node_cg,
                &pins,
                topology::FABRIC_NET,
                &entries,
            );
            if let Some(m) = &b.mtls {
                agent::mtls_config(
                    &mut cfg,
                    &ca_dirs[i],
                    &m.leaf_lifetime,
                    topology::node_fabric_ip(i).into(),
                    &node_addrs,
                );
            }
            for extra in &b.config_extra {
                agent::merge_str(&mut cfg, extra)?;
            }
            if let Some(f) = &b.config_fn {
                f(i, &mut cfg);
            }
            agent::admin_addr(&cfg)?;
            let config_path = self.shared.dir.join(format!("{node_name}-agent.toml"));
            agent::write_config(&config_path, &cfg)?;
            self.nodes.push(Node {
                index: i,
                name: node_name.clone(),
                netns: ns.clone(),
                cgroup: node_cg,
                fabric_ip: topology::node_fabric_ip(i),
                fabric_ip6: topology::node_fabric_ip6(i),
                pods,
                log_path: self.shared.dir.join(format!("{node_name}-agent.log")),
                config_path,
                config: Mutex::new(cfg),
                agent: Mutex::new(None),
                shared: self.shared.clone(),
            });
        }
        self.state().write()?;

        if b.agent {
            for n in &self.nodes {
                n.spawn_agent()?;
            }
            for n in &self.nodes {
                n.wait_agent_ready()?;
            }
            self.state().write()?;
        }
        Ok(())
    }

    /// Spawns `cmd` in the fabric's netns (where the nodes' links meet: a
    /// capture on `br0` sees all traffic between nodes). Killed with the
    /// world.
    pub fn spawn_in_fabric(&self, cmd: &mut std::process::Command) -> Result<std::process::Child> {
        let child = process::spawn_in(cmd, &netns_path(&self.fabric), None)?;
        self.shared.tracker.track(child.id() as i32);
        Ok(child)
    }

    /// Leaves the world running when this value is dropped (for `cargo xtask
    /// world up`); `cargo xtask world down` removes it later.
    pub fn detach(mut self) {
        self.detached = true;
        live_ids().lock().unwrap().remove(&self.shared.id);
    }

    /// Removes everything the world created: its processes (SIGTERM, 5 s,
    /// SIGKILL), namespaces (and so their links), cgroups, and its
    /// directory (kept, with the agent logs, if the thread is panicking or
    /// `WAYMARK_KEEP_WORLD_LOGS` is set). Idempotent; also done on drop.
    pub fn shutdown(&mut self) -> Result<()> {
        if self.done || self.detached {
            return Ok(());
        }
        self.done = true;
        let mut errors: Vec<String> = Vec::new();
        let tracker = &self.shared.tracker;

        tracker.terminate(&tracker.pids(), Duration::from_secs(5));
        for n in &self.nodes {
            if let Some(mut c) = n.agent.lock().unwrap().take() {
                let _ = c.try_wait();
            }
        }
        if !tracker.sweep() {
            errors.push("processes still alive in the world's namespaces after SIGKILL".into());
        }
        if !cgroup::kill_tree(&self.cgroup_root, Duration::from_secs(5)) {
            errors.push(format!(
                "processes still alive in {}",
                self.cgroup_root.display()
            ));
        }
        if let Err(e) = state::unmount_pin_root(&self.shared.name) {
            errors.push(format!("{e:#}"));
        }
        for ns in self.netns.iter().rev() {
            if let Err(e) = net::del_netns(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = cgroup::remove_tree(&self.cgroup_root) {
            errors.push(format!("{e:#}"));
        }

        let keep =
            std::thread::panicking() || std::env::var_os("WAYMARK_KEEP_WORLD_LOGS").is_some();
        let dir = &self.shared.dir;
        if keep && dir.exists() {
            for n in &self.nodes {
                if n.log_path.exists() {
                    eprintln!(
                        "---- last lines of {} ----\n{}",
                        n.log_path.display(),
                        process::tail(&n.log_path, 30)
                    );
                }
            }
            let _ = std::fs::remove_file(dir.join("state.json"));
            eprintln!(
                "waymark world {}: logs kept in {}",
                self.shared.name,
                dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
        live_ids().lock().unwrap().remove(&self.shared.id);
        if !errors.is_empty() {
            bail!(
                "shutting down world {}: {}",
                self.shared.name,
                errors.join("; ")
            );
        }
        Ok(())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("{e:#}");
        }
    }
}
