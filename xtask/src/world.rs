//! `cargo xtask world up|down|status|exec`: a test world to poke at by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use waymark_tests::World;
use waymark_tests::world::state::{WorldState, list_worlds, read_state, world_dir};
use waymark_tests::world::{cleanup, process, skip_reason};

#[derive(Subcommand)]
pub enum WorldCmd {
    /// Builds a world, starts its agents, prints how to reach everything, and
    /// leaves it running (an earlier world of the same name is replaced).
    Up {
        #[arg(long, default_value = "dev")]
        name: String,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Do not start agents (just namespaces, links and cgroups).
        #[arg(long)]
        no_agent: bool,
        /// Do not run `cargo build -p waymark-agent` first.
        #[arg(long)]
        no_build: bool,
        /// A TOML file merged into every agent's config.
        #[arg(long)]
        config_extra: Option<PathBuf>,
    },
    /// Removes a world: processes, namespaces, cgroups, state. Idempotent;
    /// also cleans up after a crashed test or `up`.
    Down {
        #[arg(long, default_value = "dev")]
        name: String,
        /// Every world on this machine, and stray `wmXXXX-*` namespaces.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Prints the table of a running world (or lists the worlds).
    Status {
        #[arg(long)]
        name: Option<String>,
    },
    /// Runs a command in a pod (`NODE/POD`, e.g. `0/1`: in its cgroup and
    /// netns) or on a node (`NODE`: in its netns).
    Exec {
        #[arg(long, default_value = "dev")]
        name: String,
        /// `NODE/POD` or `NODE` (indices).
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

pub fn run(cmd: WorldCmd) -> Result<()> {
    match cmd {
        WorldCmd::Up {
            name,
            nodes,
            pods,
            no_agent,
            no_build,
            config_extra,
        } => up(
            &name,
            nodes,
            pods,
            !no_agent,
            !no_build,
            config_extra.as_deref(),
        ),
        WorldCmd::Down { name, all } => down(&name, all),
        WorldCmd::Status { name } => status(name.as_deref()),
        WorldCmd::Exec { name, target, cmd } => exec(&name, &target, &cmd),
    }
}

fn require_root() -> Result<()> {
    if let Some(reason) = skip_reason() {
        bail!("the test world cannot run here: {reason}");
    }
    Ok(())
}

fn up(
    name: &str,
    nodes: usize,
    pods: usize,
    agent: bool,
    build: bool,
    extra: Option<&Path>,
) -> Result<()> {
    require_root()?;
    if agent && build && std::env::var_os("WAYMARK_BIN").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        crate::setup::ensure_build_deps()?;
        eprintln!("building the agent: cargo build -p waymark-agent");
        let st = Command::new(cargo)
            .args(["build", "-p", "waymark-agent"])
            .status()
            .context("running cargo build")?;
        if !st.success() {
            bail!("cargo build -p waymark-agent failed ({st})");
        }
    }
    let mut b = World::builder(name)
        .nodes(nodes)
        .pods_per_node(pods)
        .agent(agent)
        .persistent(true);
    if let Some(path) = extra {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        b = b.agent_config_extra(text);
    }
    let world = b
        .build()
        .with_context(|| format!("building world {name}"))?;
    let state = world.state();
    world.detach();
    print_table(&state);
    Ok(())
}

fn down(name: &str, all: bool) -> Result<()> {
    require_root()?;
    let names = if all {
        cleanup::known_worlds()
    } else {
        vec![name.to_string()]
    };
    let mut any = false;
    for n in names {
        for line in cleanup::remove_world(&n, Duration::from_secs(5))? {
            println!("{n}: {line}");
            any = true;
        }
    }
    if all {
        for line in cleanup::remove_orphan_netns()? {
            println!("{line}");
            any = true;
        }
    }
    if !any {
        println!("nothing to remove");
    }
    Ok(())
}

fn status(name: Option<&str>) -> Result<()> {
    match name {
        Some(n) => match read_state(n)? {
            Some(st) => print_table(&st),
            None => bail!("no world named {n} (nothing in {})", world_dir(n).display()),
        },
        None => {
            let names = list_worlds();
            if names.is_empty() {
                println!("no worlds");
            }
            for n in names {
                match read_state(&n) {
                    Ok(Some(st)) => println!(
                        "{n}  id {}  {} nodes  {} pods  {}",
                        st.id,
                        st.nodes.len(),
                        st.nodes.iter().map(|x| x.pods.len()).sum::<usize>(),
                        st.dir.display()
                    ),
                    _ => {
                        println!("{n}  (no state: leftovers; `cargo xtask world down --name {n}`)")
                    }
                }
            }
        }
    }
    Ok(())
}

fn exec(name: &str, target: &str, cmd: &[String]) -> Result<()> {
    require_root()?;
    let st = read_state(name)?.with_context(|| format!("no world named {name}"))?;
    let (netns, cgroup, socket) = match target.split_once('/') {
        Some((i, j)) => {
            let node = st.nodes.get(i.parse::<usize>()?).context("no such node")?;
            let pod = node.pods.get(j.parse::<usize>()?).context("no such pod")?;
            (pod.netns_path.clone(), Some(pod.cgroup.clone()), None)
        }
        None => {
            let node = st
                .nodes
                .get(target.parse::<usize>()?)
                .context("no such node")?;
            (node.netns_path.clone(), None, node.admin_socket.clone())
        }
    };
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]);
    // The CLI on a node finds that node's agent.
    if let Some(socket) = socket
        && std::env::var_os("WAYMARK_ADMIN").is_none()
    {
        c.env("WAYMARK_ADMIN", socket);
    }
    let status = process::spawn_in(&mut c, &netns, cgroup.as_deref())?.wait()?;
    std::process::exit(status.code().unwrap_or(1));
}

fn agent_pid(st: &WorldState, node: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(st.dir.join(format!("{node}-agent.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn print_table(st: &WorldState) {
    println!(
        "world {} (id {}): state, configs and logs in {}",
        st.name,
        st.id,
        st.dir.display()
    );
    println!(
        "cgroup root {}   fabric netns {}\n",
        st.cgroup.display(),
        st.fabric_netns
    );
    let mut nodes = vec![vec![
        "NODE".to_string(),
        "NETNS".into(),
        "FABRIC IP".into(),
        "POD NETWORKS".into(),
        "PODS CGROUP (agent attaches)".into(),
        "ADMIN (in node netns)".into(),
        "AGENT".into(),
    ]];
    for n in &st.nodes {
        let agent = match (n.agent, agent_pid(st, &n.name)) {
            (_, Some(pid)) => format!("pid {pid}, log {}", n.log.display()),
            (true, None) => format!("not running! log {}", n.log.display()),
            (false, None) => "none".into(),
        };
        nodes.push(vec![
            n.name.clone(),
            n.netns.clone(),
            format!("{} {}", n.fabric_ip, n.fabric_ip6),
            format!("{} {}", n.pod_cidr, n.pod_cidr6),
            n.cgroup.display().to_string(),
            match &n.admin_socket {
                Some(sock) => format!("{} {}", n.admin, sock.display()),
                None => n.admin.clone(),
            },
            agent,
        ]);
    }
    print!("{}", table(&nodes));
    println!();
    let mut pods = vec![vec![
        "POD".to_string(),
        "NODE".into(),
        "NETNS".into(),
        "IPV4".into(),
        "IPV6".into(),
        "CGROUP".into(),
    ]];
    for n in &st.nodes {
        for p in &n.pods {
            pods.push(vec![
                p.name.clone(),
                n.name.clone(),
                p.netns.clone(),
                p.ip.clone(),
                p.ip6.clone(),
                p.cgroup.display().to_string(),
            ]);
        }
    }
    print!("{}", table(&pods));
    println!();
    if let Some(n) = st.nodes.first() {
        println!("Run a command in a pod (into its cgroup first, then its netns):");
        if let Some(p) = n.pods.first() {
            println!("  cargo xtask world exec --name {} 0/0 -- ip addr", st.name);
            println!(
                "  sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net={} ip addr'",
                p.cgroup.display(),
                p.netns_path.display()
            );
        }
        println!("On a node (its netns; not in any pod cgroup):");
        println!("  nsenter --net={} ip route", n.netns_path.display());
        println!(
            "  nsenter --net={} curl -s http://{}/metrics",
            n.netns_path.display(),
            n.admin
        );
        println!("(not `ip netns exec`: it remounts /sys and hides the cgroup2 mount)");
    }
    println!("Remove it: cargo xtask world down --name {}", st.name);
}
