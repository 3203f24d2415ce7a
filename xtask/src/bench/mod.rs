//! `cargo xtask bench`: waymark side by side with the direct path and the
//! peer proxies (HAProxy, nginx), in one run, in one test world.
//!
//! See `bench/README.md` for what each row is and how to read it. In short:
//! a world of 2 nodes × 2 pods; the backend (nginx, 100-byte body) in pod
//! (1,0) (and (0,1) for same-node paths); the load generators in pod (0,0);
//! waymark's agent on node 0 for waymark rows; the agents stopped (nothing
//! attached: pods connect directly) for the direct and peer rows; peers as
//! per-node processes in the node netns, dialled explicitly.

pub mod discovery;
mod load;
mod measure;
pub mod noisy;
mod peers;
mod profile;
mod report;
mod tools;
mod topology;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use waymark_tests::{Pod, Server, Signal, World, metric_value};

use crate::setup;
use crate::test::cargo;
use load::{RATE_CONNS, WRK_CONNS};
use measure::{CpuUse, RssSampler, Window, cpu_seconds, loadavg, with_descendants};
use peers::Proc;
use report::{
    ADDED_P99_TARGET_US, BulkSample, IdleSample, LatSample, PathResult, Run, SatSample, Settings,
};
use topology::{AgentState, IPERF_PORT, Layer, PathSpec, Proto, ProxyRef};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smoke run for CI: 1 repetition of 3 s, a subset of the paths
    /// (about a minute and a half).
    #[arg(long)]
    quick: bool,
    /// Repetitions of each saturation and bulk measurement [default: 3; 1 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds of each saturation (wrk) run [default: 10; 3 with --quick].
    #[arg(long)]
    duration: Option<u64>,
    /// Seconds of each iperf3 run [default: 2].
    #[arg(long)]
    bulk_secs: Option<u64>,
    /// Seconds of each fixed-rate latency run (one per path and
    /// repetition) [default: 5; 2 with --quick]. A p99 wants samples: at
    /// the usual ~4,000 requests/s, 2 s leaves ~80 above it and one stall
    /// of the shared machine moved it by a millisecond.
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Requests/s of the fixed-rate latency runs [default: half the median
    /// saturation rate of the slowest path measured, rounded down to 100].
    #[arg(long)]
    rate: Option<u64>,
    /// Write every request of the fixed-rate runs to
    /// `DIR/<path>-round<N>.txt` (`testpeer http-rate --samples`): when the
    /// slow ones fell, to lay beside a `perf record -k CLOCK_MONOTONIC` of
    /// the machine (`bench/README.md`, "What the slowest percent is made of").
    #[arg(long)]
    latency_samples: Option<PathBuf>,
    /// Idle keep-alive connections for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle_conns: usize,
    /// Idle keep-alive connections of a second memory step, for waymark's
    /// HTTP/1.1 L7 paths only (the target: 10,000 open connections; an L4
    /// path would need 2 fds per connection, over the 20,000-file limit);
    /// 0 skips the step.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    idle_conns_l7: u64,
    /// Only these paths (comma-separated ids, see bench/README.md).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Before each measurement, wait up to this many seconds for the
    /// machine to be quiet (other work under 0.2 cores for 0.5 s) [default:
    /// 0, do not wait]. For runs whose results are to be kept, on a machine
    /// others use too.
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
    /// Do not build; use the release binaries as they are.
    #[arg(long)]
    no_build: bool,
    /// Run this agent binary instead of the freshly built one (e.g. to
    /// compare two builds).
    #[arg(long)]
    waymark_bin: Option<PathBuf>,
    /// An environment variable for the agents, `KEY=VALUE` (repeatable; e.g.
    /// allocator settings for an experiment). Recorded in the report.
    #[arg(long, value_parser = parse_env)]
    agent_env: Vec<(String, String)>,
    /// TOML merged into every agent's config (repeatable), e.g.
    /// `--agent-toml $'[redirect]\nreply_shortcut = true'` to measure an
    /// option against a run without it. Recorded in the report.
    #[arg(long)]
    agent_toml: Vec<String>,
    /// iperf3 with `-R`: the server sends and the client receives, the
    /// direction of replies (downloads) rather than of requests (uploads).
    #[arg(long)]
    bulk_reverse: bool,
    /// Do not update bench/results/latest.{md,json} (a full run of all
    /// paths does; --quick and --paths runs never do).
    #[arg(long)]
    no_results: bool,
    /// Record a CPU profile (`perf record`) of the proxies (the agents and
    /// the peer proxies) during each saturation run into this directory,
    /// and fold it into a flame graph when inferno is installed (see
    /// `profile.rs`).
    /// Profiling perturbs the figures: combine with --no-results.
    #[arg(long)]
    perf: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

struct Bins {
    waymark: PathBuf,
    testpeer: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the repository")
        .to_path_buf()
}

fn target_dir() -> Result<PathBuf> {
    let out = cargo(&["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(repo_root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(PathBuf::from(
        v["target_directory"]
            .as_str()
            .context("cargo metadata: no target_directory")?,
    ))
}

fn build(no_build: bool, agent: bool) -> Result<Bins> {
    if !no_build {
        let mut a = vec!["build", "--release", "-p", "waymark-tests", "--bins"];
        if agent {
            setup::ensure_build_deps()?;
            a.extend(["-p", "waymark-agent"]);
        }
        eprintln!("bench: cargo {}", a.join(" "));
        setup::run(cargo(&a).current_dir(repo_root()))?;
    }
    let dir = target_dir()?.join("release");
    let bins = Bins {
        waymark: dir.join("waymark"),
        testpeer: dir.join("testpeer"),
    };
    if !bins.testpeer.is_file() {
        bail!(
            "{} is missing; run without --no-build",
            bins.testpeer.display()
        );
    }
    Ok(bins)
}

fn shell(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Everything the measurements need.
struct Ctx<'a> {
    world: &'a World,
    client: &'a Pod,
    bins: &'a Bins,
    /// The bench's directory in the world (configs, logs, h2load's log).
    dir: PathBuf,
    script: PathBuf,
    /// Indexed like `Plan::peers`; `None` when not started.
    peers: Vec<Option<Proc>>,
    backend_far: Proc,
    backend_near: Proc,
    /// The mTLS rows' backend, in pod (1,1).
    backend_mesh: Proc,
    /// `testpeer grpc` in the far server pod: the gRPC rows' backend.
    backend_grpc: Server,
    /// The same in pod (1,1), for the tunnelled gRPC row.
    backend_grpc_mesh: Server,
    /// The body of one gRPC call, for h2load's `-d`.
    grpc_request: PathBuf,
    agent: AgentState,
    loads: Vec<f64>,
    /// CPU use of every measurement.
    cpu_use: Vec<CpuUse>,
    /// The world's network namespaces (inodes).
    netns: HashSet<u64>,
    /// `--wait-quiet`, and how long the waits took in all.
    wait_quiet: Duration,
    waited: Duration,
    /// `--perf`: where the profiles go.
    perf: Option<PathBuf>,
    /// Node 0's `outbound.dial_from` as configured (by `--agent-toml`, or
    /// `None`: the agent's default), put back after a `DialNode` row.
    dial_from: Option<toml::Value>,
}

/// The table `name` of an agent config, made if it is not there.
fn section<'a>(config: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    let v = config
        .entry(name)
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if !v.is_table() {
        *v = toml::Value::Table(Default::default());
    }
    v.as_table_mut().expect("made a table above")
}

impl Ctx<'_> {
    /// Puts the agents in the state a path needs: node 0's with the
    /// path's workers (or stopped), node 1's running only for the mTLS rows.
    fn set_agent(&mut self, want: AgentState) -> Result<()> {
        let node = self.world.node(0);
        let running = node.agent_pid().is_some();
        let wanted = want.node0();
        let node0_ok = self.agent.node0() == wanted && running == wanted.is_some();
        let far = self.world.node(1);
        let far_running = far.agent_pid().is_some();
        let far_wanted = matches!(want, AgentState::Mesh(_));
        if node0_ok && far_running == far_wanted {
            self.agent = want;
            return Ok(());
        }
        if !node0_ok {
            if running {
                node.stop_agent(Signal::SIGTERM)
                    .context("stopping node0's agent")?;
            }
            if let Some((w, dial_node)) = wanted {
                let dial_from = &self.dial_from;
                node.update_config(|c| {
                    section(c, "runtime").insert("workers".into(), toml::Value::Integer(w as i64));
                    let outbound = section(c, "outbound");
                    match (dial_node, dial_from) {
                        (true, _) => {
                            outbound.insert("dial_from".into(), "node".into());
                        }
                        (false, Some(v)) => {
                            outbound.insert("dial_from".into(), v.clone());
                        }
                        (false, None) => {
                            outbound.remove("dial_from");
                        }
                    }
                })?;
                node.start_agent().context("starting node0's agent")?;
            }
        }
        if far_running && !far_wanted {
            far.stop_agent(Signal::SIGTERM)
                .context("stopping node1's agent")?;
        } else if !far_running && far_wanted {
            far.start_agent().context("starting node1's agent")?;
        }
        eprintln!("bench: {}", want.describe());
        self.agent = want;
        Ok(())
    }

    fn proxy_pids(&self, p: &PathSpec) -> Result<Vec<i32>> {
        let mut roots = Vec::new();
        for r in &p.proxies {
            roots.push(match r {
                ProxyRef::Agent(i) => self
                    .world
                    .node(*i)
                    .agent_pid()
                    .with_context(|| format!("node{i}'s agent is not running"))?,
                ProxyRef::Peer(i) => self.peers[*i]
                    .as_ref()
                    .context("peer proxy not started")?
                    .pid(),
            });
        }
        Ok(with_descendants(&roots))
    }

    fn backend_pids(&self, p: &PathSpec) -> Vec<i32> {
        if p.proto == Proto::Grpc {
            let grpc = if p.tunnel {
                &self.backend_grpc_mesh
            } else {
                &self.backend_grpc
            };
            return vec![grpc.pid()];
        }
        let b = if p.same_node {
            &self.backend_near
        } else if p.tunnel {
            &self.backend_mesh
        } else {
            &self.backend_far
        };
        with_descendants(&[b.pid()])
    }

    fn check_alive(&mut self, p: &PathSpec) -> Result<()> {
        for r in &p.proxies {
            if let ProxyRef::Peer(i) = r
                && let Some(proc) = self.peers[*i].as_mut()
            {
                proc.check_alive()?;
            }
        }
        self.backend_far.check_alive()?;
        self.backend_mesh.check_alive()?;
        for grpc in [&mut self.backend_grpc, &mut self.backend_grpc_mesh] {
            if let Some(st) = grpc.try_wait()? {
                bail!("testpeer grpc exited ({st}): {}", grpc.stderr());
            }
        }
        self.backend_near.check_alive()
    }

    /// Connections plus HTTP requests node0's agent has counted so far (no
    /// sample yet: none). With `tunnel`, only those it carried through the
    /// mTLS tunnel (`tls="true"`: opaque connections, and HTTP responses).
    fn opened(&self, tunnel: bool) -> Option<f64> {
        let m = self.world.node(0).metrics().ok()?;
        Some(if tunnel {
            let tls = [("tls", "true")];
            metric_value(&m, "tcp_open_total", &tls).unwrap_or(0.0)
                + metric_value(&m, "response_total", &tls).unwrap_or(0.0)
        } else {
            metric_value(&m, "tcp_open_total", &[]).unwrap_or(0.0)
                + metric_value(&m, "request_total", &[]).unwrap_or(0.0)
        })
    }

    fn window(&self) -> Window {
        Window::open(waymark_tests::world::net::pids_in_netns(&self.netns))
    }

    fn note_load(&mut self) -> [f64; 3] {
        if self.wait_quiet > Duration::ZERO {
            let waited = measure::wait_quiet(report::QUIET_CORES, self.wait_quiet);
            self.waited += waited;
        }
        let l = loadavg();
        self.loads.push(l[0]);
        l
    }

    fn saturate(&mut self, p: &PathSpec, rep: usize, secs: u64) -> Result<SatSample> {
        self.check_alive(p)?;
        let pids = self.proxy_pids(p)?;
        let backend = self.backend_pids(p);
        let load = self.note_load();
        let opened0 = if p.waymark {
            self.opened(p.tunnel)
        } else {
            None
        };
        let window = self.window();
        let (cpu0, b0) = (cpu_seconds(&pids), cpu_seconds(&backend));
        let (sleeps0, bsleeps0) = (measure::sleeps(&pids), measure::sleeps(&backend));
        let sampler = (!pids.is_empty()).then(|| RssSampler::start(pids.clone()));
        let recording = match &self.perf {
            Some(dir) if !pids.is_empty() => {
                Some(profile::start(dir, &format!("{}-rep{rep}", p.id), &pids)?)
            }
            _ => None,
        };
        let r = match p.proto {
            Proto::Http1 => load::wrk(self.client, &self.script, p.http, secs),
            Proto::H2c => load::h2load(self.client, p.http, secs, &self.dir.join("h2load.log")),
            Proto::Grpc => load::grpc(
                self.client,
                p.http,
                secs,
                &self.dir.join("h2load.log"),
                &self.grpc_request,
            ),
        };
        let rss = sampler.map(RssSampler::stop);
        let (cpu1, b1) = (cpu_seconds(&pids), cpu_seconds(&backend));
        let (sleeps1, bsleeps1) = (measure::sleeps(&pids), measure::sleeps(&backend));
        if let Some(rec) = recording {
            rec.finish()?;
        }
        let cpu_use = window.close();
        self.cpu_use.push(cpu_use);
        let r = r?;
        let e = &r.errors;
        if r.requests == 0 || e.status > 0 || e.connect > 0 {
            bail!(
                "wrk: {} requests, errors {:?} (non-2xx/3xx: {}, connect: {})",
                r.requests,
                e,
                e.status,
                e.connect
            );
        }
        let proxied = if p.waymark {
            let n = match (opened0, self.opened(p.tunnel)) {
                (Some(a), Some(b)) => b - a,
                _ => 0.0,
            };
            if n < WRK_CONNS as f64 {
                bail!(
                    "waymark's metrics count {n} new connections and requests{} during a run of \
                     {WRK_CONNS} connections: the traffic did not go through the agent{}",
                    if p.tunnel { " with tls=\"true\"" } else { "" },
                    if p.tunnel { "'s mTLS tunnel" } else { "" }
                );
            }
            Some(n)
        } else {
            None
        };
        let per100k = |cpu: f64| cpu / r.requests as f64 * 100_000.0;
        Ok(SatSample {
            rep,
            rps: r.rps(),
            proxy_cpu_s: cpu1 - cpu0,
            cpu_s_per_100k: (!pids.is_empty()).then(|| per100k(cpu1 - cpu0)),
            backend_cpu_s_per_100k: per100k(b1 - b0),
            backend_sleeps_per_request: bsleeps1.saturating_sub(bsleeps0) as f64
                / r.requests as f64,
            proxy_sleeps_per_request: (!pids.is_empty())
                .then(|| sleeps1.saturating_sub(sleeps0) as f64 / r.requests as f64),
            rss_load_kib: rss,
            rss_hwm_kib: (!pids.is_empty()).then(|| measure::hwm_kib(&pids)),
            cpu_use,
            loadavg: load,
            proxied_conns: proxied,
            wrk: r,
        })
    }

    fn bulk(
        &mut self,
        p: &PathSpec,
        rep: usize,
        secs: u64,
        reverse: bool,
    ) -> Result<Option<BulkSample>> {
        let Some(addr) = p.bulk else { return Ok(None) };
        self.check_alive(p)?;
        let pids = self.proxy_pids(p)?;
        let load = self.note_load();
        let window = self.window();
        let cpu0 = cpu_seconds(&pids);
        let r = load::iperf3(self.client, addr, secs, reverse);
        let cpu1 = cpu_seconds(&pids);
        let cpu_use = window.close();
        self.cpu_use.push(cpu_use);
        let r = r?;
        let gib = r.bytes as f64 / (1u64 << 30) as f64;
        Ok(Some(BulkSample {
            rep,
            proxy_cpu_s: cpu1 - cpu0,
            cpu_s_per_gib: (!pids.is_empty() && gib > 0.0).then(|| (cpu1 - cpu0) / gib),
            cpu_use,
            loadavg: load,
            iperf: r,
        }))
    }

    fn latency(
        &mut self,
        p: &PathSpec,
        rate: u64,
        secs: u64,
        over_us: Option<u64>,
        samples: Option<&Path>,
    ) -> Result<LatSample> {
        self.check_alive(p)?;
        let pids = self.proxy_pids(p)?;
        let load = self.note_load();
        let window = self.window();
        let cpu0 = cpu_seconds(&pids);
        let r = load::http_rate(
            self.client,
            &self.bins.testpeer,
            p.http,
            rate,
            secs,
            over_us,
            samples,
        );
        let cpu = cpu_seconds(&pids) - cpu0;
        let cpu_use = window.close();
        self.cpu_use.push(cpu_use);
        let r = r?;
        if r.errors > 0 || r.non_2xx > 0 {
            bail!(
                "testpeer http-rate: {} errors, {} non-2xx; first error: {:?}",
                r.errors,
                r.non_2xx,
                r.first_error
            );
        }
        Ok(LatSample {
            cpu_s_per_100k: (!pids.is_empty() && r.requests > 0)
                .then(|| cpu / r.requests as f64 * 100_000.0),
            proxy_cpu_s: cpu,
            loadavg: load,
            cpu_use,
            result: r,
        })
    }

    fn idle(&mut self, p: &PathSpec, n: usize) -> Result<IdleSample> {
        self.check_alive(p)?;
        let pids = self.proxy_pids(p)?;
        let (rss0, fds0) = (measure::rss_kib(&pids), measure::fds(&pids));
        let (srv, held, failed): (Server, usize, usize) = load::hold(
            self.client,
            &self.bins.testpeer,
            p.http,
            n,
            p.proto == Proto::H2c,
        )?;
        // Let the proxies settle (upstream connects, buffers given back:
        // waymark's agent looks every 2 s whether to hand freed memory back).
        std::thread::sleep(Duration::from_secs(3));
        let (rss1, fds1) = (measure::rss_kib(&pids), measure::fds(&pids));
        drop(srv);
        std::thread::sleep(Duration::from_millis(500));
        Ok(IdleSample {
            requested: n,
            held,
            failed,
            rss_before_kib: rss0,
            rss_idle_kib: rss1,
            fds_before: fds0,
            fds_idle: fds1,
        })
    }
}

impl Ctx<'_> {
    /// One memory step of a path: `n` idle connections held, progress
    /// printed, failures recorded in `errors`.
    fn idle_step(
        &mut self,
        p: &PathSpec,
        n: usize,
        what: &str,
        errors: &mut Vec<String>,
    ) -> Option<IdleSample> {
        if let Err(e) = self.set_agent(p.agent) {
            progress(p, what, &format!("FAILED: {e:#}"));
            errors.push(format!("{what}: {e:#}"));
            return None;
        }
        match self.idle(p, n) {
            Ok(s) => {
                progress(
                    p,
                    what,
                    &format!(
                        "{}/{} held: RSS {:.1} → {:.1} MiB, fds {} → {}",
                        s.held,
                        s.requested,
                        s.rss_before_kib as f64 / 1024.0,
                        s.rss_idle_kib as f64 / 1024.0,
                        s.fds_before,
                        s.fds_idle
                    ),
                );
                if s.failed > 0 || s.held < s.requested {
                    errors.push(format!(
                        "{what}: {} of {} connections held ({} failed)",
                        s.held, s.requested, s.failed
                    ));
                }
                Some(s)
            }
            Err(e) => {
                progress(p, what, &format!("FAILED: {e:#}"));
                errors.push(format!("{what}: {e:#}"));
                None
            }
        }
    }
}

fn progress(p: &PathSpec, what: &str, msg: &str) {
    eprintln!("bench: {:<34} {what:<8} {msg}", p.label);
}

pub fn run(args: BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let started = shell("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    let stamp = shell("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    if let Some(reason) = waymark_tests::skip_reason() {
        bail!("the bench needs the test world, which cannot run here: {reason}");
    }
    tools::ensure()?;
    let mut bins = build(args.no_build, args.waymark_bin.is_none())?;
    if let Some(b) = &args.waymark_bin {
        bins.waymark = b
            .canonicalize()
            .with_context(|| format!("{}", b.display()))?;
    }
    if !bins.waymark.is_file() {
        bail!(
            "{} is missing; run without --no-build",
            bins.waymark.display()
        );
    }
    let quick = args.quick;
    let reps = args.reps.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let duration = args.duration.unwrap_or(if quick { 3 } else { 10 }).max(1);
    let bulk_secs = args.bulk_secs.unwrap_or(2).max(1);
    let latency_secs = args
        .latency_secs
        .unwrap_or(if quick { 2 } else { 5 })
        .max(1);

    let plan = topology::plan();
    let known: Vec<&str> = plan.paths.iter().map(|p| p.id.as_str()).collect();
    for id in &args.paths {
        if !known.contains(&id.as_str()) {
            bail!("unknown path {id:?}; known: {}", known.join(", "));
        }
    }
    let selected: Vec<PathSpec> = plan
        .paths
        .iter()
        .filter(|p| {
            if !args.paths.is_empty() {
                args.paths.contains(&p.id)
            } else {
                !quick || p.quick
            }
        })
        .cloned()
        .collect();
    // Measure in agent-state groups (few agent restarts), report in plan order.
    let mut order: Vec<usize> = (0..selected.len()).collect();
    order.sort_by_key(|&i| selected[i].agent);

    let loadavg_start = loadavg();
    let machine = measure::machine(shell(
        bins.waymark.to_str().unwrap_or("waymark"),
        &["--version"],
    ));
    let git = shell(
        "git",
        &[
            "-C",
            repo_root().to_str().unwrap_or("."),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    eprintln!(
        "bench: {} paths, {reps} rep(s) × {duration} s; load average {:.2} {:.2} {:.2}",
        selected.len(),
        loadavg_start[0],
        loadavg_start[1],
        loadavg_start[2]
    );

    let mut builder = World::builder("bench")
        .nodes(2)
        .pods_per_node(2)
        .agent_bin(&bins.waymark)
        // Identities and the node-to-node tunnel: used by the `*-mtls`
        // services only (the other rows' destinations are dialled directly).
        .mtls(true)
        // Production-like logging: no line per connection.
        .agent_env("RUST_LOG", "info")
        .agent_config_extra(topology::agent_config_extra());
    for (k, v) in &args.agent_env {
        builder = builder.agent_env(k, v);
    }
    for toml in &args.agent_toml {
        toml.parse::<toml::Table>()
            .with_context(|| format!("--agent-toml {toml:?} is not TOML"))?;
        builder = builder.agent_config_extra(toml.clone());
    }
    let mut world = builder.build().context("building the bench world")?;
    let dial_from = world
        .node(0)
        .config()
        .get("outbound")
        .and_then(|o| o.get("dial_from"))
        .cloned();
    // Node1's agent runs only for the mTLS rows (`AgentState::Mesh`).
    world.node(1).stop_agent(Signal::SIGTERM)?;
    let dir = world.dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let backend_far = peers::start_backend(
        "backend-n1p0",
        world.pod(1, 0),
        world.node(1),
        &dir,
        topology::HTTP_PORT,
        topology::H2C_PORT,
    )?;
    let backend_near = peers::start_backend(
        "backend-n0p1",
        world.pod(0, 1),
        world.node(0),
        &dir,
        topology::HTTP_PORT,
        topology::H2C_PORT,
    )?;
    // The mTLS rows' endpoints: the same servers in pod (1,1) (see
    // `topology`: a tunnelled endpoint's address is never dialled directly).
    let backend_mesh = peers::start_backend(
        "backend-n1p1",
        world.pod(1, 1),
        world.node(1),
        &dir,
        topology::HTTP_PORT,
        topology::H2C_PORT,
    )?;
    let grpc_server = |pod: &Pod| {
        pod.serve(
            Command::new(&bins.testpeer)
                .arg("grpc")
                .arg("--listen")
                .arg(format!("0.0.0.0:{}", topology::GRPC_PORT)),
        )
    };
    let backend_grpc = grpc_server(world.pod(1, 0))?;
    let backend_grpc_mesh = grpc_server(world.pod(1, 1))?;
    let grpc_request = load::write_grpc_request(&dir)?;
    let mut iperf_servers = Vec::new();
    for pod in [world.pod(1, 0), world.pod(1, 1), world.pod(0, 1)] {
        iperf_servers.push(
            pod.serve_until(
                Command::new("iperf3")
                    .args(["-s", "--forceflush", "-p"])
                    .arg(IPERF_PORT.to_string()),
                "Server listening",
                Duration::from_secs(10),
            )?,
        );
    }
    let needed: BTreeSet<usize> = selected
        .iter()
        .flat_map(|p| p.proxies.iter())
        .filter_map(|r| match r {
            ProxyRef::Peer(i) => Some(*i),
            ProxyRef::Agent(_) => None,
        })
        .collect();
    if needed.iter().any(|&i| plan.peers[i].tls.is_some()) {
        peers::make_peer_certs(&dir, waymark_tests::world::topology::node_fabric_ip(1))
            .context("making the TLS peers' certificates")?;
    }
    let mut peer_procs: Vec<Option<Proc>> = (0..plan.peers.len()).map(|_| None).collect();
    for &i in &needed {
        let spec = &plan.peers[i];
        peer_procs[i] = Some(peers::start_peer(spec, &world, &dir)?);
    }
    let netns: HashSet<u64> = world
        .netns_names()
        .iter()
        .filter_map(|n| {
            waymark_tests::world::net::netns_inode(&waymark_tests::world::net::netns_path(n))
        })
        .collect();
    let mut ctx = Ctx {
        world: &world,
        client: world.pod(0, 0),
        bins: &bins,
        script: load::write_wrk_script(&dir)?,
        dir: dir.clone(),
        peers: peer_procs,
        backend_far,
        backend_near,
        backend_mesh,
        backend_grpc,
        backend_grpc_mesh,
        grpc_request,
        agent: AgentState::Workers(1),
        loads: vec![],
        cpu_use: vec![],
        netns,
        wait_quiet: Duration::from_secs(args.wait_quiet),
        perf: args.perf.clone(),
        waited: Duration::ZERO,
        dial_from,
    };
    let mut results: Vec<PathResult> = selected.iter().map(PathResult::new).collect();

    let ok = |results: &[PathResult], i: usize| {
        results[i].errors.is_empty() || !results[i].errors[0].starts_with("probe")
    };

    for rep in 0..reps {
        let l = loadavg();
        eprintln!(
            "bench: repetition {}/{reps} (load average {:.2} {:.2} {:.2}, {:.0} s so far)",
            rep + 1,
            l[0],
            l[1],
            l[2],
            t0.elapsed().as_secs_f64()
        );
        for &i in &order {
            if !ok(&results, i) {
                continue;
            }
            let p = &selected[i];
            ctx.set_agent(p.agent)?;
            // The first time: one GET must come back right, or the path is
            // skipped (an error row) rather than measured.
            let probed = match p.proto {
                Proto::Grpc => load::probe_grpc(ctx.client, p.http),
                _ => load::probe(ctx.client, p.http, p.proto == Proto::H2c),
            };
            if rep == 0
                && let Err(e) = probed
            {
                progress(p, "probe", &format!("FAILED: {e:#}"));
                results[i].errors.push(format!("probe: {e:#}"));
                continue;
            }
            let generator = match p.proto {
                Proto::Http1 => "wrk",
                Proto::H2c => "h2load",
                Proto::Grpc => "h2load (gRPC)",
            };
            match ctx.saturate(p, rep, duration) {
                Ok(s) => {
                    progress(
                        p,
                        generator,
                        &format!(
                            "{:>9.0} req/s  p99 {:>6.2} ms  proxy CPU {} s/100k  sleeps/req proxy {} backend {:.3}  others {:.2} cores  load {:.2}",
                            s.rps,
                            s.wrk.lat_us.p99 / 1000.0,
                            s.cpu_s_per_100k
                                .map(|c| format!("{c:.2}"))
                                .unwrap_or_else(|| "—".into()),
                            s.proxy_sleeps_per_request
                                .map(|c| format!("{c:.3}"))
                                .unwrap_or_else(|| "—".into()),
                            s.backend_sleeps_per_request,
                            s.cpu_use.others_cores,
                            s.loadavg[0]
                        ),
                    );
                    results[i].saturation.push(s);
                }
                Err(e) => {
                    progress(p, generator, &format!("FAILED: {e:#}"));
                    results[i]
                        .errors
                        .push(format!("rep {rep}: {generator}: {e:#}"));
                }
            }
            match ctx.bulk(p, rep, bulk_secs, args.bulk_reverse) {
                Ok(Some(b)) => {
                    progress(
                        p,
                        "iperf3",
                        &format!(
                            "{:>9.2} Gbit/s  proxy CPU {} s/GiB",
                            b.iperf.gbit_s,
                            b.cpu_s_per_gib
                                .map(|c| format!("{c:.2}"))
                                .unwrap_or_else(|| "—".into())
                        ),
                    );
                    results[i].bulk.push(b);
                }
                Ok(None) => {}
                Err(e) => {
                    progress(p, "iperf3", &format!("FAILED: {e:#}"));
                    results[i].errors.push(format!("rep {rep}: iperf3: {e:#}"));
                }
            }
        }
    }

    // One fixed rate for every path: below the saturation of all of them.
    // HTTP/1.1 paths only: the fixed-rate generator speaks HTTP/1.1, and
    // the h2c rows are not run at a fixed rate.
    let slowest = results
        .iter()
        .zip(&selected)
        .filter(|(_, p)| p.proto == Proto::Http1)
        .map(|(r, _)| r)
        .filter_map(|r| report::median(&r.saturation.iter().map(|s| s.rps).collect::<Vec<_>>()))
        .reduce(f64::min);
    let (rate, rate_chosen_as) = match (args.rate, slowest) {
        (Some(r), _) => (Some(r), format!("{r} requests/s, given with --rate")),
        (None, Some(s)) => {
            let r = (((s * 0.5) / 100.0).floor() * 100.0).max(100.0) as u64;
            (
                Some(r),
                format!(
                    "{r} requests/s over {RATE_CONNS} connections = half the median saturation rate \
                     of the slowest path ({s:.0} req/s), rounded down to 100"
                ),
            )
        }
        (None, None) => (None, "none (no saturation result)".into()),
    };
    if let Some(dir) = &args.latency_samples {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --latency-samples {}", dir.display()))?;
    }
    if let Some(rate) = rate {
        for round in 0..reps {
            eprintln!(
                "bench: latency at a fixed {rate} requests/s, round {}/{reps}, {latency_secs} s per path",
                round + 1
            );
            // Each round's baselines (the direct rows) run first (their
            // agent state sorts first): their p99 + 0.5 ms, the target, is
            // counted against in the same round's other rows.
            let mut baseline_p99: HashMap<&str, f64> = HashMap::new();
            for &i in &order {
                if !ok(&results, i) || selected[i].proto != Proto::Http1 {
                    continue;
                }
                let p = &selected[i];
                ctx.set_agent(p.agent)?;
                // None for a baseline itself: it is recorded after it ran.
                let over_us = baseline_p99
                    .get(p.baseline)
                    .map(|b| (b + ADDED_P99_TARGET_US) as u64);
                let samples = args
                    .latency_samples
                    .as_ref()
                    .map(|d| d.join(format!("{}-round{}.txt", p.id, round + 1)));
                match ctx.latency(p, rate, latency_secs, over_us, samples.as_deref()) {
                    Ok(l) => {
                        if let Some(lat) = &l.result.latency_us {
                            let over = match (l.result.over_pct(), &l.result.over) {
                                (Some(pct), Some(o)) => {
                                    format!("  {pct:.2} % over {:.2} ms", o.us as f64 / 1000.0)
                                }
                                _ => String::new(),
                            };
                            progress(
                                p,
                                "latency",
                                &format!(
                                    "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  ({:.0} req/s achieved){over}",
                                    lat.p50 / 1000.0,
                                    lat.p99 / 1000.0,
                                    lat.p999 / 1000.0,
                                    l.result.achieved_rate
                                ),
                            );
                            if p.baseline == p.id {
                                baseline_p99.insert(p.baseline, lat.p99);
                            }
                        }
                        results[i].latency.push(l);
                    }
                    Err(e) => {
                        progress(p, "latency", &format!("FAILED: {e:#}"));
                        results[i]
                            .errors
                            .push(format!("latency round {round}: {e:#}"));
                    }
                }
            }
        }
    }

    eprintln!(
        "bench: memory at {} idle keep-alive connections",
        args.idle_conns
    );
    for &i in &order {
        let p = &selected[i];
        // `testpeer hold` speaks HTTP/1.1, or h2c for waymark's h2c rows
        // (the peers are not measured over HTTP/2); no gRPC figure.
        let h2_waymark = p.proto == Proto::H2c && p.waymark;
        if !ok(&results, i) || p.proxies.is_empty() || !(p.proto == Proto::Http1 || h2_waymark) {
            continue;
        }
        results[i].idle = ctx.idle_step(p, args.idle_conns, "idle", &mut results[i].errors);
    }
    let l7_conns = args.idle_conns_l7 as usize;
    if l7_conns > 0 {
        eprintln!("bench: memory at {l7_conns} idle keep-alive connections, waymark's L7 paths");
    }
    for &i in &order {
        let p = &selected[i];
        let waymark_l7 = p.layer == Layer::L7 && p.agent != AgentState::Stopped;
        if l7_conns == 0 || !ok(&results, i) || !waymark_l7 || p.proto != Proto::Http1 {
            continue;
        }
        results[i].idle_l7 = ctx.idle_step(p, l7_conns, "idle-l7", &mut results[i].errors);
    }

    let loads = std::mem::take(&mut ctx.loads);
    let cpu_use = std::mem::take(&mut ctx.cpu_use);
    let waited = ctx.waited;
    drop(ctx);
    drop(iperf_servers);
    world.shutdown().context("removing the bench world")?;

    report::summarize(&mut results);
    let run = Run {
        started,
        elapsed_s: t0.elapsed().as_secs_f64(),
        git,
        settings: Settings {
            quick,
            reps,
            duration_s: duration,
            bulk_s: bulk_secs,
            latency_s: latency_secs,
            rate,
            rate_chosen_as,
            idle_conns: args.idle_conns,
            idle_conns_l7: args.idle_conns_l7 as usize,
            wait_quiet_s: args.wait_quiet,
            waited_s: waited.as_secs_f64(),
            agent: bins.waymark.display().to_string(),
            agent_env: args
                .agent_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            agent_toml: args.agent_toml.clone(),
            bulk_reverse: args.bulk_reverse,
            wrk: format!("wrk -t1 -c{WRK_CONNS} -d{duration}s --timeout 5s"),
            rate_generator: format!(
                "testpeer http-rate --conns {RATE_CONNS} (open loop, latency from when each request was due)"
            ),
        },
        machine,
        loadavg_start,
        loadavg_end: loadavg(),
        loadavg_1m_range: [
            loads.iter().copied().reduce(f64::min).unwrap_or(f64::NAN),
            loads.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
        ],
        others_cores: report::others(&cpu_use),
        paths: results,
        not_measured: not_measured(),
        notes: notes(),
    };
    print!("{}", report::text(&run));
    write_outputs(
        &run,
        &stamp,
        !quick && args.paths.is_empty() && !args.no_results,
    )?;
    Ok(())
}

fn not_measured() -> Vec<(String, String)> {
    [
        (
            "waymark 2 hops without mTLS",
            "n/a: waymark's second hop is the mTLS tunnel; its plaintext rows are one hop",
        ),
        (
            "HTTP/2 and gRPC through the peer proxies",
            "not measured: the h2c and gRPC rows compare waymark with the direct path only",
        ),
        (
            "fixed-rate latency of the h2c and gRPC rows, idle memory of the gRPC rows",
            "not measured: testpeer http-rate speaks HTTP/1.1, hold HTTP/1.1 or plain h2c GETs",
        ),
        (
            "peer proxies on the same-node path",
            "not measured: compare waymark same node with direct same node",
        ),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

fn notes() -> Vec<String> {
    vec![
        "Two shared cores: the load generator, the backend and the proxies compete for them, \
         so requests/s mostly measures who got the CPU; CPU-s/100k is the fairer cost figure."
            .into(),
        "waymark's plaintext paths are one hop; its `*-mtls` rows are two hops (node0's agent → \
         mTLS tunnel → node1's agent). Compare waymark L4/L7 one hop with the 1-hop L4/L7 peers, \
         and the `*-mtls` rows with the peers' 2-hop TLS rows (`*-tls-2hop`)."
            .into(),
        format!(
            "h2c rows (`*-h2`): `h2load -t1 -c{} -m{} -D<duration>` (64 streams in flight), \
             percentiles from h2load's per-request log; compared with `direct-h2` only.",
            load::H2_CONNS,
            load::H2_STREAMS
        ),
        format!(
            "gRPC rows (`*-grpc`): the same h2load sending unary calls ({}-byte message, \
             `content-type: application/grpc`) to `testpeer grpc` in pod (1,0) (the tunnelled row: (1,1)), each path first \
             probed with one grpcio call; compared with `direct-grpc` only.",
            load::GRPC_MESSAGE_BYTES
        ),
        "Saturation latency (p50/p99 @sat) is wrk's closed-loop latency with 64 connections: \
         it grows with queueing, not only with the path."
            .into(),
    ]
}

fn write_outputs(run: &Run, stamp: &str, results: bool) -> Result<()> {
    let root = repo_root().join("bench");
    let runs = root.join("runs");
    std::fs::create_dir_all(&runs)?;
    let json = serde_json::to_string_pretty(run)?;
    let path = runs.join(format!("{stamp}.json"));
    std::fs::write(&path, &json)?;
    println!("\nwrote {}", path.display());
    if results {
        let dir = root.join("results");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("latest.json"), &json)?;
        std::fs::write(dir.join("latest.md"), report::markdown(run))?;
        println!("wrote {} and latest.json", dir.join("latest.md").display());
    }
    Ok(())
}
