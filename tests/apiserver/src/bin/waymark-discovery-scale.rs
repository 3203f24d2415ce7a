//! Scale of waymark's Kubernetes discovery: a stand-in API server holding a
//! large cluster (by default 10,000 Services with 5 endpoints each, 20,000
//! pods on 200 nodes), and a real agent discovering it. Prints the time to
//! the agent's first ready, its memory against the same agent on an empty
//! cluster, and how long an EndpointSlice change takes to reach the data
//! path (`GET /endpoints?service=…` shows it), over many changes.
//!
//! Run by `cargo xtask bench-discovery` (root: the agent loads its eBPF
//! programs; both run in a network namespace made for the run and removed
//! after it, and talk over its loopback only).

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};
use waymark_apiserver::ApiServer;

#[derive(Parser)]
struct Args {
    /// The agent binary to measure.
    #[arg(long)]
    waymark: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 5)]
    endpoints_per_service: usize,
    #[arg(long, default_value_t = 20_000)]
    pods: usize,
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    /// EndpointSlice changes timed after the agent is ready.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Also write the result as Markdown here.
    #[arg(long)]
    out: Option<PathBuf>,
}

const API: &str = "127.0.0.1:6443";
const ADMIN: &str = "127.0.0.1:4191";

/// The run's network namespace; removed on drop.
struct Netns(String);

impl Netns {
    fn create() -> Result<Self> {
        let name = format!("wmscale-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }

    /// Runs `f` on a thread inside the namespace.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = std::fs::File::open(self.path())?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the run's network namespace")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(st.success(), "{cmd} {args:?} failed: {st}");
    Ok(())
}

/// A running agent; stopped (SIGTERM, then SIGKILL) on drop.
struct Agent {
    child: Child,
}

impl Agent {
    fn start(bin: &Path, ns: &Netns, dir: &Path, tag: &str) -> Result<Self> {
        let config = dir.join(format!("agent-{tag}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"node-0\"\n[admin]\nlisten = \"{ADMIN}\"\nsocket = \"{}\"\n[kernel]\nenabled = false\n[capture]\nenabled = false\n[kubernetes]\nenabled = true\nkubeconfig = \"{}\"\n",
                dir.join("admin.sock").display(),
                dir.join("kubeconfig").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join(format!("agent-{tag}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(bin)
            .args(["agent", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        Ok(Agent { child })
    }

    /// The agent's resident memory, from /proc (the `ip netns exec` child
    /// execs the agent, so the pid is the agent's).
    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on the admin API: `/ready` on its TCP port (from inside the
/// namespace), everything else on its Unix socket in `dir`.
fn get(dir: &Path, path: &str) -> Result<(u16, String)> {
    let mut out = String::new();
    let request = format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n");
    if path == "/ready" {
        let mut s = TcpStream::connect_timeout(&ADMIN.parse()?, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        s.read_to_string(&mut out)?;
    } else {
        let mut s = std::os::unix::net::UnixStream::connect(dir.join("admin.sock"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        s.read_to_string(&mut out)?;
    }
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

/// Polls `/ready` until 200; the time from `start`.
fn until_ready(start: Instant, agent: &mut Agent) -> Result<Duration> {
    loop {
        if let Ok(Some(st)) = agent.child.try_wait() {
            bail!("the agent exited before it was ready: {st}");
        }
        if let Ok((200, _)) = get(Path::new(""), "/ready") {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("the agent was not ready within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    let n = i as u32;
    Ipv4Addr::new(10, 64 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn slice(ns: &str, svc: &str, addrs: &[(Ipv4Addr, String, String)]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|(ip, node, pod)| {
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                   "nodeName": node, "targetRef": {"kind": "Pod", "namespace": ns, "name": pod}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{svc}-1"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn populate(api: &ApiServer, a: &Args) -> Result<()> {
    let create = |o: Value| api.create(o).map_err(|e| anyhow::anyhow!("{e:?}"));
    let namespaces = 100.min(a.services.max(1));
    for n in 0..namespaces {
        create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{n}"), "labels": {"waymark.dev/mesh": "enabled"}}}))?;
    }
    for n in 0..a.nodes {
        create(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
            "status": {"addresses": [{"type": "InternalIP",
                "address": Ipv4Addr::new(10, 200, (n >> 8) as u8, n as u8).to_string()}]}}),
        )?;
    }
    // Pods on nodes 1.. (node 0 is the agent's: no sandboxes exist here).
    let node_of = |i: usize| format!("node-{}", 1 + i % (a.nodes - 1).max(1));
    for i in 0..a.pods {
        create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i % namespaces)},
            "spec": {"nodeName": node_of(i), "serviceAccountName": "app",
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": pod_ip(i).to_string(),
                       "podIPs": [{"ip": pod_ip(i).to_string()}]}}))?;
    }
    for s in 0..a.services {
        let ns = format!("ns-{}", s % namespaces);
        let name = format!("svc-{s}");
        let vip = Ipv4Addr::new(10, 96 + (s >> 16) as u8, (s >> 8) as u8, s as u8);
        create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))?;
        // Endpoints: pods of the service's namespace, spread over the pods.
        let addrs: Vec<(Ipv4Addr, String, String)> = (0..a.endpoints_per_service)
            .map(|k| {
                let i = ((s * a.endpoints_per_service + k) * namespaces + s % namespaces)
                    % a.pods.max(1);
                // Same namespace as the service: i ≡ s (mod namespaces).
                let i = i - i % namespaces + s % namespaces;
                let i = i.min(a.pods - 1);
                (pod_ip(i), node_of(i), format!("pod-{i}"))
            })
            .collect();
        create(slice(&ns, &name, &addrs))?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "run as root (the agent loads eBPF programs)"
    );
    ensure!(
        a.nodes >= 2 && a.pods >= 1,
        "--nodes must be at least 2 and --pods at least 1"
    );
    let dir = std::env::temp_dir().join(format!("wmscale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ns = Netns::create()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let netns_path = ns.path();
    let api = rt.block_on(ApiServer::start_with(move || {
        let file = std::fs::File::open(&netns_path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::other)?;
                std::net::TcpListener::bind(API.parse::<SocketAddr>().expect("constant"))
            })
            .join()
            .map_err(|_| std::io::Error::other("bind thread panicked"))?
        })
    }))?;
    std::fs::write(dir.join("kubeconfig"), api.kubeconfig())?;

    // The same agent on an empty cluster: the baseline memory.
    let (base_ready, base_rss) = {
        let start = Instant::now();
        let mut agent = Agent::start(&a.waymark, &ns, &dir, "empty")?;
        let ready = ns.within(|| until_ready(start, &mut agent))??;
        std::thread::sleep(Duration::from_secs(2));
        (ready, agent.rss_kib()?)
    };

    let t = Instant::now();
    populate(&api, &a)?;
    let populate_s = t.elapsed().as_secs_f64();
    eprintln!(
        "cluster: {} services × {} endpoints, {} pods on {} nodes (made in {populate_s:.1} s)",
        a.services, a.endpoints_per_service, a.pods, a.nodes
    );

    let start = Instant::now();
    let mut agent = Agent::start(&a.waymark, &ns, &dir, "full")?;
    let ready = ns.within(|| until_ready(start, &mut agent))??;
    std::thread::sleep(Duration::from_secs(2));
    let rss = agent.rss_kib()?;

    // Changes: one endpoint added to a slice, until the agent shows it.
    let namespaces = 100.min(a.services.max(1));
    let mut latencies = Vec::new();
    for k in 0..a.changes {
        let s = (k * 97) % a.services;
        let svc_ns = format!("ns-{}", s % namespaces);
        let name = format!("svc-{s}");
        let new_ip = Ipv4Addr::new(10, 250, (k >> 8) as u8, k as u8);
        let mut addrs = vec![(new_ip, "node-1".to_string(), format!("extra-{k}"))];
        addrs.extend((0..a.endpoints_per_service).map(|j| {
            let i = ((s * a.endpoints_per_service + j) * namespaces + s % namespaces) % a.pods;
            let i = (i - i % namespaces + s % namespaces).min(a.pods - 1);
            (
                pod_ip(i),
                format!("node-{}", 1 + i % (a.nodes - 1)),
                format!("pod-{i}"),
            )
        }));
        let want = format!("{new_ip}:8080");
        let query = format!("/endpoints?service={name}.{svc_ns}:80");
        let changed = Instant::now();
        api.apply(slice(&svc_ns, &name, &addrs))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let took = ns.within(|| -> Result<Duration> {
            loop {
                let (code, body) = get(&dir, &query)?;
                if code == 200 && body.contains(&want) {
                    return Ok(changed.elapsed());
                }
                if changed.elapsed() > Duration::from_secs(30) {
                    bail!("change {k} not applied within 30 s ({code} {body:.200})");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })??;
        latencies.push(took);
    }
    latencies.sort();
    drop(agent);
    // Timings depend on what else runs; say how busy the machine was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());

    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    let table = format!(
        "| discovery scale | value | target |\n|---|---|---|\n\
         | cluster | {} services × {} endpoints ({} endpoints), {} pods, {} nodes | 10,000 / 50,000 / 20,000 |\n\
         | first ready, empty cluster | {} ms | |\n\
         | first ready | {} ms | < 10,000 ms |\n\
         | RSS, empty cluster | {:.1} MiB | |\n\
         | RSS | {:.1} MiB (+{:.1} MiB) | < +100 MiB |\n\
         | change → data path, p50 / p99 / max ({} changes) | {} / {} / {} ms | p99 < 1,000 ms |\n\
         | machine: load average (1 min) at the end / CPUs | {load} / {cpus} | |\n",
        a.services,
        a.endpoints_per_service,
        a.services * a.endpoints_per_service,
        a.pods,
        a.nodes,
        ms(base_ready),
        ms(ready),
        base_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        rss.saturating_sub(base_rss) as f64 / 1024.0,
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
    );
    print!("{table}");
    if let Some(out) = &a.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    rt.block_on(async move {
        let mut api = api;
        api.stop().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
