//! `cargo xtask bench-noisy`: one pod cannot take the node's proxy from the
//! others. A noisy pod opens thousands of idle connections through node 0's
//! agent while a quiet pod of the same node sends HTTP requests at a fixed
//! rate through the same agent; the quiet pod's latency is measured before
//! (idle agent), while the connections are being opened (three times, by
//! default), and while they are held, with the agent's memory and
//! descriptors at each step — then the same steps with no agent, in a world
//! of their own, for the share of the latency the machine makes by itself.
//!
//! ```text
//! noisy pod (0,0) ── testpeer hold (N opaque connections) ──► echo, pod (1,0)
//! quiet pod (0,1) ── testpeer http-rate (L7 service) ───────► nginx, pod (1,1)
//!                 both through node 0's agent (`--workers`, 2 by default)
//! ```
//!
//! The noisy pod tries 20,000 by default (two client processes: a process
//! may have 20,000 open files here). Each proxied connection holds two of
//! the agent's descriptors (the pod's side and the upstream), so the agent
//! takes what its limits derived from those 20,000 files allow one pod
//! (4,744 with the defaults); the kernel refuses the rest at `connect()`
//! (`ECONNREFUSED`, before a SYN), and the agent resets at accept the few
//! that two CPUs let through at once. The bench reads the limits from
//! `/conns` and checks that every connect was held, refused or reset, and
//! counts each. A measurement, not a test: it
//! prints and records figures (`bench/results/noisy.md`); the functional
//! side (the quiet pod's requests all succeed, a pod over its connection
//! limit is refused and counted) is asserted by the world tests.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use waymark_tests::{Pod, Server, Signal, World, metric_value};

use super::load::{self, Pct, RateResult};
use super::measure::{RssSampler, cpu_seconds, fds, loadavg, rss_kib};
use super::{Bins, build, peers, repo_root, shell};
use waymark_tests::world::topology::pod_ip;

/// `outbound.accept_rate_per_pod`'s default: `--direct` paces the noisy
/// pod's connects at it.
const DEFAULT_ACCEPT_RATE: u32 = 1_000;

/// The quiet pod's service (HTTP/1.1, routed by the agent).
const QUIET_SERVICE: &str = "10.96.0.90:80";
/// The noisy pod's idle connections go to this port of pod (1,0), which
/// the agent treats as opaque TCP (no protocol detection to wait for).
const ECHO_PORT: u16 = 7000;

/// Connections one client process of the noisy pod opens at most: a
/// process may have 20,000 open files here.
const PER_CLIENT: usize = 10_000;

/// Connections `--direct` alone opens at most: one echo process holds them
/// all, and a process may have 20,000 open files here. Run after the
/// agent's steps, it opens as many as the agent held.
const DIRECT_MAX: usize = 18_000;

#[derive(clap::Args)]
pub struct NoisyArgs {
    /// Idle connections the noisy pod tries to open and hold, from as many
    /// client processes as it takes at 10,000 each (a process may have
    /// 20,000 open files here). The agent holds what its limits allow (with
    /// the defaults and 20,000 open files, half of half: 4,744 for one pod)
    /// and the kernel refuses the rest at `connect()`.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=40_000))]
    conns: u64,
    /// `outbound.max_connections_per_pod` of node 0's agent; unset, the
    /// agent's default (half of what its descriptors hold).
    #[arg(long)]
    max_per_pod: Option<usize>,
    /// Seconds of the quiet pod's fixed-rate run during each opening: an
    /// opening lasts as long as the agent's accept rate takes to go through
    /// every connect of the noisy pod (20 s for 20,000 at 1,000/s), and the
    /// run should cover it.
    #[arg(long, default_value_t = 20)]
    open_secs: u64,
    /// Requests/s of the quiet pod's fixed-rate load.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of each fixed-rate run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Fixed-rate runs before, while and after the connections are held.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Times the noisy pod opens its connections (each opening one
    /// fixed-rate run; the connections are let go and the agent's side seen
    /// closed before the next): a single opening's p99 varied 2.4–5.1× the
    /// idle value between runs of the same binary, so the ratio is taken
    /// from their median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=5))]
    open_reps: u64,
    /// The agent's data-path worker threads (`runtime.workers`; 2 is the
    /// agent's default, `cargo xtask bench` measures with 1).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// `outbound.accept_rate_per_pod` of node 0's agent (0: no limit); the
    /// agent's default when not given.
    #[arg(long)]
    accept_rate: Option<u32>,
    /// `outbound.accept_burst_per_pod` of node 0's agent; the agent's
    /// default when not given.
    #[arg(long)]
    accept_burst: Option<u32>,
    /// Connects per second of the noisy pod's client itself (`testpeer hold
    /// --rate`; 0, the default: as fast as its 256 concurrent connects
    /// go, so the agent's accept rate paces them through its listener's
    /// queue). With the client pacing itself at the same rate the other
    /// pod's p99 rose much less (bench/README.md, "Who paces the opening").
    #[arg(long, default_value_t = 0)]
    client_rate: u32,
    /// `outbound.dial_from` of node 0's agent (`pod`: upstream sockets made
    /// in the pod's network namespace; `node`: in the node's); the agent's
    /// default when not given.
    #[arg(long)]
    dial_from: Option<String>,
    /// Bound the noisy pod's client processes to this many cores (e.g.
    /// 1.0), as a pod's `resources.limits.cpu` would on a cluster; the
    /// quiet pod stays unbounded. Unset: the client may take both cores
    /// with its own connects, as with no proxy at all. Needs the cpu
    /// controller of cgroup v1 (`/sys/fs/cgroup/cpu`, as on these hybrid
    /// hosts). Applies to the no-agent steps too.
    #[arg(long)]
    noisy_cpu: Option<f64>,
    /// Use the debug build (target/debug) instead of a release build.
    #[arg(long)]
    debug: bool,
    /// Do not build; use the binaries as they are.
    #[arg(long)]
    no_build: bool,
    /// Do not write bench/results/noisy.md.
    #[arg(long)]
    no_results: bool,
    /// The same steps with no agent in the way (both pods dial directly,
    /// the quiet pod the nginx pod's address; the noisy pod's connects
    /// paced at `--client-rate` when given, else at `--accept-rate`, the
    /// agent's default 1,000/s when not given): what the machine itself
    /// makes of them, the share of the quiet pod's latency no proxy could
    /// remove. Prints; writes nothing.
    #[arg(long)]
    direct: bool,
    /// Do not follow the agent's steps with the same steps with no agent
    /// (`--direct`), which the report otherwise shows beside them.
    #[arg(long, conflicts_with = "direct")]
    no_direct: bool,
}

/// One opening of the noisy pod's connections.
struct Opening {
    /// The quiet pod's fixed-rate run meanwhile.
    during: RateResult,
    /// Until the client held them all.
    open_secs: f64,
    /// Until the agent showed them all open.
    taken_secs: f64,
    /// The agent's CPU per connection taken, the quiet pod's share out.
    cpu_per_conn_us: f64,
    /// Connections that waited for the accept rate.
    delayed: f64,
    /// Connections refused at a limit: by the kernel at `connect()` and
    /// by the agent at accept (`waymark_outbound_refused_total`).
    refused: f64,
    /// Of those, the connects the client saw refused (`ECONNREFUSED`):
    /// the kernel's.
    at_connect: usize,
    /// Connects of the noisy pod that succeeded (held or refused after).
    connected: usize,
    /// Connects that succeeded at the client but never reached the agent
    /// (the handshake's last ACK dropped while the listener's queue was
    /// full).
    unseen: usize,
}

/// What the agent holds at one step.
struct AgentSample {
    rss_kib: u64,
    fds: usize,
}

fn agent_sample(pid: i32) -> AgentSample {
    AgentSample {
        rss_kib: rss_kib(&[pid]),
        fds: fds(&[pid]),
    }
}

fn p99_ms(r: &RateResult) -> f64 {
    ms_p99(r.latency_us.as_ref())
}

/// A percentile set's p99 in milliseconds (NaN when there were no samples).
fn ms_p99(p: Option<&Pct>) -> f64 {
    p.map(|p| p.p99 / 1000.0).unwrap_or(f64::NAN)
}

/// What separates the client's own lateness from the path's: the p99
/// measured from when each request was actually sent, and how many were
/// sent more than 1 ms after they were due (the client's thread was not
/// running in time).
fn client_side(r: &RateResult) -> String {
    let sent = ms_p99(r.service_us.as_ref());
    format!("{sent:.2} ms from the send, {} sent late", r.late_sends)
}

/// A fixed-rate run's p99 second by second, in ms (`1.20 0.45 0.41 …`):
/// whether the slow requests of an opening fall at its start, where the
/// client's connects burst into the agent's listener queue, or all along.
fn by_second(r: &RateResult) -> String {
    r.per_second_us
        .iter()
        .map(|s| format!("{:.2}", s.p99 as f64 / 1000.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Each run's figure, as the report lists them: `0.21, 0.25, 0.19`.
fn listed(v: impl IntoIterator<Item = f64>) -> String {
    v.into_iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn failed(r: &RateResult) -> u64 {
    r.non_2xx + r.errors
}

pub fn run(a: NoisyArgs) -> Result<()> {
    let bins = if a.debug {
        debug_bins(a.no_build)?
    } else {
        build(a.no_build, true)?
    };
    if a.direct {
        return run_direct(
            &a,
            &bins,
            (a.conns as usize).min(DIRECT_MAX),
            direct_pace(&a),
        )
        .map(|_| ());
    }
    // Before the world: dropped after it, once the clients are gone.
    let cpu = a.noisy_cpu.map(CpuLimit::new).transpose()?;
    let conns = a.conns as usize;
    let mut accept_rate = String::new();
    if a.accept_rate.is_some()
        || a.accept_burst.is_some()
        || a.dial_from.is_some()
        || a.max_per_pod.is_some()
    {
        accept_rate.push_str("[outbound]\n");
    }
    if let Some(n) = a.max_per_pod {
        accept_rate.push_str(&format!("max_connections_per_pod = {n}\n"));
    }
    if let Some(d) = &a.dial_from {
        accept_rate.push_str(&format!("dial_from = {d:?}\n"));
    }
    if let Some(r) = a.accept_rate {
        accept_rate.push_str(&format!("accept_rate_per_pod = {r}\n"));
    }
    if let Some(b) = a.accept_burst {
        accept_rate.push_str(&format!("accept_burst_per_pod = {b}\n"));
    }
    let config = format!(
        r#"{accept_rate}[runtime]
workers = {workers}
[proxy]
opaque_ports = [{ECHO_PORT}]
[[services]]
name = "quiet"
addresses = ["{QUIET_SERVICE}"]
protocol = "http1"
endpoints = [{{ addr = "{}:{}" }}]
"#,
        pod_ip(1, 1),
        super::topology::HTTP_PORT,
        workers = a.workers,
    );
    let world = World::builder("bench-noisy")
        .nodes(2)
        .pods_per_node(2)
        .agent_bin(&bins.waymark)
        .agent_env("RUST_LOG", "info")
        .agent_config_extra(config)
        .build()
        .context("building the world")?;
    // Node 1's pods are only servers: its agent has nothing to do.
    world.node(1).stop_agent(Signal::SIGTERM)?;
    let dir = world.dir().join("bench-noisy");
    std::fs::create_dir_all(&dir)?;
    let (noisy, quiet, node) = (world.pod(0, 0), world.pod(0, 1), world.node(0));
    let _servers = start_servers(&world, &bins, &dir)?;
    let pid = node.agent_pid().context("node 0 has no agent")?;
    let service: SocketAddr = QUIET_SERVICE.parse()?;
    load::probe(quiet, service, false)?;
    let rate_for = |what: &str, secs: u64| -> Result<RateResult> {
        let r = load::http_rate(quiet, &bins.testpeer, service, a.rate, secs, None, None)?;
        eprintln!(
            "bench-noisy: {what}: p99 {:.2} ms ({}), {} of {} failed, {:.0} req/s",
            p99_ms(&r),
            client_side(&r),
            failed(&r),
            r.requests,
            r.achieved_rate
        );
        Ok(r)
    };
    let rate = |what: &str| rate_for(what, a.secs);
    let load_start = loadavg();
    let t0 = Instant::now();

    // 1. The agent with nothing but the quiet pod's load.
    let _ = rate("warm-up")?;
    let before = agent_sample(pid);
    let cpu_idle_start = (Instant::now(), cpu_seconds(&[pid]));
    let idle: Vec<RateResult> = (0..a.reps)
        .map(|i| rate(&format!("idle agent {}/{}", i + 1, a.reps)))
        .collect::<Result<_>>()?;
    // The agent's CPU for the quiet pod's load alone, per second.
    let quiet_cpu_per_s =
        (cpu_seconds(&[pid]) - cpu_idle_start.1) / cpu_idle_start.0.elapsed().as_secs_f64();

    // 2. The noisy pod opens its connections while the quiet pod's load
    // runs, `--open-reps` times; all but the last are let go again.
    let echo = SocketAddr::new(pod_ip(1, 0).into(), ECHO_PORT);
    widen_port_range(noisy)?;
    // The noisy pod's series of `name` (with `more` labels) in one scrape
    // of node 0's agent; 0 when it has none yet.
    let of_noisy = |text: &str, name: &str, more: &[(&str, &str)]| {
        let mut labels = vec![("pod", noisy.name())];
        labels.extend_from_slice(more);
        metric_value(text, name, &labels).unwrap_or(0.0)
    };
    let open_in =
        |text: &str| of_noisy(text, "tcp_open_connections", &[("direction", "outbound")]) as usize;
    let refused_in = |text: &str| of_noisy(text, "waymark_outbound_refused_total", &[]);
    let delayed_in = |text: &str| {
        of_noisy(
            text,
            "waymark_limit_delayed_total",
            &[("limit", "accept_rate")],
        )
    };
    // What the agent takes of the noisy pod's connections: its limits as
    // it derived them (`/conns`).
    let limits = agent_limits(node)?;
    let expected = [limits.per_pod, limits.total]
        .into_iter()
        .filter(|&l| l > 0)
        .fold(conns, usize::min);
    eprintln!(
        "bench-noisy: node 0's agent takes {} per pod and {} in all; of the noisy pod's {conns} it should hold {expected}",
        limits.per_pod, limits.total
    );
    // Until the agent has closed every connection of the noisy pod.
    let released = || -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while open_in(&node.metrics()?) > 0 {
            if Instant::now() > deadline {
                bail!("the noisy pod's connections are still open a minute after it let them go");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    };
    let sampler = RssSampler::start(vec![pid]);
    let open_reps = a.open_reps as usize;
    let mut openings: Vec<Opening> = Vec::with_capacity(open_reps);
    let mut held_by = None;
    for i in 0..open_reps {
        let opened_at = Instant::now();
        let cpu_before_open = cpu_seconds(&[pid]);
        let text = node.metrics()?;
        let (delayed_before, refused_before) = (delayed_in(&text), refused_in(&text));
        let (mut hold, during) = open_while(
            noisy,
            &bins,
            echo,
            conns,
            a.client_rate,
            cpu.as_ref(),
            || {
                rate_for(
                    &format!(
                        "while the noisy pod opens its connections {}/{open_reps}",
                        i + 1
                    ),
                    a.open_secs,
                )
            },
        )?;
        let (connected, hold_failed, at_connect) = held_counts(&mut hold)?;
        let open_secs = opened_at.elapsed().as_secs_f64();
        eprintln!(
            "bench-noisy: the noisy pod connected {connected} of {conns} ({hold_failed} failed, {at_connect} of them refused at connect()) in {open_secs:.1} s"
        );
        eprintln!(
            "bench-noisy: the quiet pod's p99 by second of that run, ms: {}",
            by_second(&during)
        );
        ensure!(
            connected >= expected,
            "the noisy pod connected {connected} of {conns}, fewer than the {expected} the agent should hold ({hold_failed} failed)"
        );
        // Every connect was refused at connect() by the kernel, or
        // succeeded and is either held by the agent (its upstream dialled)
        // or reset at a limit, or never reached it: while
        // the pod listener's queue is full the kernel drops a handshake's
        // last ACK (the client counts the connect done, the listener
        // retransmits its SYN-ACK a few times and then forgets it), as it
        // does for any listener that accepts slower than it is dialled. A
        // reset can also beat the client to its connect's completion,
        // which then counts it failed. So: wait until the agent holds its
        // share and its counts have not moved for 3 s.
        let metrics_deadline = Instant::now() + Duration::from_secs(120);
        let mut last = None;
        let mut still = 0;
        let (refused, reset) = loop {
            let text = node.metrics()?;
            let open = open_in(&text);
            let refused = refused_in(&text) - refused_before;
            let reset = (refused as usize).saturating_sub(at_connect);
            let now = (open, refused as usize);
            still = if last == Some(now) { still + 1 } else { 0 };
            if open == expected && (open + reset >= connected || still >= 3) {
                break (refused, reset);
            }
            if Instant::now() > metrics_deadline {
                bail!(
                    "node 0's agent holds {open} connections of the noisy pod (expected {expected}) and refused {refused}, of {connected} connected"
                );
            }
            last = Some(now);
            std::thread::sleep(Duration::from_millis(1000));
        };
        let unseen = connected.saturating_sub(expected + reset);
        let text = node.metrics()?;
        let no_dst = of_noisy(&text, "waymark_outbound_no_original_dst_total", &[]);
        eprintln!("bench-noisy: accepted without an original destination so far: {no_dst}");
        let taken_secs = opened_at.elapsed().as_secs_f64();
        // What taking (or refusing) one connection cost the agent, the
        // quiet pod's share of the window taken out.
        let cpu_per_conn_us =
            ((cpu_seconds(&[pid]) - cpu_before_open) - quiet_cpu_per_s * taken_secs).max(0.0)
                / connected as f64
                * 1e6;
        let delayed = delayed_in(&text) - delayed_before;
        eprintln!(
            "bench-noisy: the agent took {expected} and {refused} were refused ({at_connect} by the kernel at connect()) in {taken_secs:.1} s ({unseen} connected never reached it), {cpu_per_conn_us:.0} µs of CPU per connection that connected; {delayed} waited for the accept rate"
        );
        openings.push(Opening {
            during,
            open_secs,
            taken_secs,
            cpu_per_conn_us,
            delayed,
            refused,
            at_connect,
            connected,
            unseen,
        });
        if i + 1 < open_reps {
            drop(hold);
            released()?;
        } else {
            held_by = Some(hold);
        }
    }
    let hold = held_by.context("no opening was run")?;
    let opening = |f: fn(&Opening) -> f64| median(openings.iter().map(f).collect());
    let unseen = opening(|o| o.unseen as f64);
    let at_connect = opening(|o| o.at_connect as f64);
    let (open_secs, taken_secs, cpu_per_conn_us, delayed, refused, connected) = (
        opening(|o| o.open_secs),
        opening(|o| o.taken_secs),
        opening(|o| o.cpu_per_conn_us),
        opening(|o| o.delayed),
        opening(|o| o.refused),
        opening(|o| o.connected as f64),
    );

    // 3. The same load while they are held.
    let holding: Vec<RateResult> = (0..a.reps)
        .map(|i| {
            rate(&format!(
                "{expected} idle connections held {}/{}",
                i + 1,
                a.reps
            ))
        })
        .collect::<Result<_>>()?;
    let peak_kib = sampler.stop();
    let after = agent_sample(pid);
    drop(hold);

    // 4. The agent idle again: a second baseline, the machine's drift
    // between the two shows in their spread.
    released()?;
    let after_idle: Vec<RateResult> = (0..a.reps)
        .map(|i| rate(&format!("idle agent again {}/{}", i + 1, a.reps)))
        .collect::<Result<_>>()?;
    let released = agent_sample(pid);

    let all_failed: u64 = idle
        .iter()
        .chain(&after_idle)
        .chain(&holding)
        .chain(openings.iter().map(|o| &o.during))
        .map(failed)
        .sum();
    let p99_idle = median(idle.iter().chain(&after_idle).map(p99_ms).collect());
    let runs = |v: &[RateResult]| listed(v.iter().map(p99_ms));
    let p99_held = median(holding.iter().map(p99_ms).collect());
    let p99_opening = opening(|o| p99_ms(&o.during));
    let opening_runs = listed(openings.iter().map(|o| p99_ms(&o.during)));
    let per_conn_kib = (after.rss_kib.saturating_sub(before.rss_kib)) as f64 / expected as f64;
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
    // The same steps with no agent, in a world of their own, once this
    // one is gone: the share of the quiet pod's latency the machine makes
    // by itself, measured in the same run.
    drop(_servers);
    drop(world);
    // Twice when the noisy client is unpaced: its connects paced as the
    // agent paced them (as many as it held), and as fast as they go (every
    // connection it tries, up to what one echo process holds): what the
    // pod's own opening costs the machine with no proxy at all.
    let direct = if a.no_direct {
        None
    } else {
        Some(run_direct(&a, &bins, expected, direct_pace(&a))?)
    };
    let direct_unpaced = if a.no_direct || a.client_rate > 0 {
        None
    } else {
        Some(run_direct(&a, &bins, conns.min(DIRECT_MAX), 0)?)
    };
    let mut md = String::new();
    let client_pace = if a.client_rate > 0 {
        format!(", at most {}/s", a.client_rate)
    } else {
        String::new()
    };
    let _ = writeln!(md, "# Noisy neighbour: idle connections of one pod\n");
    let _ = writeln!(
        md,
        "`cargo xtask bench-noisy{}` (commit `{git}`, {} build, node 0's agent on {} worker(s), \
         {} UTC; load average at start {:.2} {:.2} {:.2}, {:.0} s in all). The noisy pod \
         (0,0) tries to open {conns} idle opaque TCP connections through node 0's agent to an \
         echo server on node 1 (`testpeer hold`, {} client process(es) of at most {PER_CLIENT}, \
         each 256 at a time{client_pace}) and holds them; node 0's agent holds {expected} of \
         them (its limits in force: {} per pod, {} in all); the kernel refuses the rest at \
         `connect()` and the agent resets at accept the few two CPUs let through at once. The \
         quiet pod (0,1) sends {} HTTP/1.1 GET/s over 16 keep-alive connections to an L7 \
         service (nginx on node 1) through the same agent, {} s per run ({} s during an \
         opening; `testpeer http-rate`, latency from when each request was due). Medians of \
         {} runs ({} for the idle agent: before and after); the connections are opened \
         {open_reps} times, one run during each, all but the last let go again, and the \
         opening's figures are their medians.\n",
        [
            a.debug.then(|| " --debug".to_string()),
            a.accept_rate.map(|r| format!(" --accept-rate {r}")),
            a.accept_burst.map(|b| format!(" --accept-burst {b}")),
            (a.client_rate > 0).then(|| format!(" --client-rate {}", a.client_rate)),
            a.dial_from.as_ref().map(|d| format!(" --dial-from {d}")),
            a.noisy_cpu.map(|c| format!(" --noisy-cpu {c}")),
        ]
        .into_iter()
        .flatten()
        .collect::<String>(),
        if a.debug { "debug" } else { "release" },
        a.workers,
        chrono_now(),
        load_start[0],
        load_start[1],
        load_start[2],
        t0.elapsed().as_secs_f64(),
        conns.div_ceil(PER_CLIENT),
        limits.per_pod,
        limits.total,
        a.rate,
        a.secs,
        a.open_secs,
        a.reps,
        2 * a.reps
    );
    let _ = writeln!(
        md,
        "| quiet pod's requests | p99 | failed | agent RSS | agent fds |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| agent idle (runs before: {}; after: {}) | {p99_idle:.2} ms | {} | {:.1} MiB | {} |",
        runs(&idle),
        runs(&after_idle),
        idle.iter().chain(&after_idle).map(failed).sum::<u64>(),
        before.rss_kib as f64 / 1024.0,
        before.fds
    );
    let _ = writeln!(
        md,
        "| while the noisy pod opens {conns} (runs: {opening_runs}; {connected:.0} connected, in {open_secs:.1} s; the agent held {expected}; {refused:.0} refused, {at_connect:.0} of them at connect(), within {taken_secs:.1} s; {unseen:.0} never reached it) | {p99_opening:.2} ms | {} | peak {:.1} MiB | — |",
        openings.iter().map(|o| failed(&o.during)).sum::<u64>(),
        peak_kib as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| {expected} idle connections held (runs: {}) | {p99_held:.2} ms | {} | {:.1} MiB | {} |",
        runs(&holding),
        holding.iter().map(failed).sum::<u64>(),
        after.rss_kib as f64 / 1024.0,
        after.fds
    );
    let _ = writeln!(
        md,
        "| after the noisy pod closed them | — | — | {:.1} MiB | {} |",
        released.rss_kib as f64 / 1024.0,
        released.fds
    );
    let _ = writeln!(
        md,
        "\np99 held / idle: **{:.2}×** (while opening: {:.2}×). The agent's memory grew by \
         {:.1} MiB, {per_conn_kib:.1} KiB per idle opaque connection (two sockets, the \
         connection's task and its kernel-map entries; no copy buffer while no byte moves). \
         Taking or resetting one connection cost the agent about {cpu_per_conn_us:.0} µs of \
         CPU (the quiet pod's share taken out); {delayed} of the noisy pod's connections \
         waited for its accept rate \
         (`outbound.accept_rate_per_pod`: {}, `accept_burst_per_pod`: {}).",
        p99_held / p99_idle,
        p99_opening / p99_idle,
        (after.rss_kib.saturating_sub(before.rss_kib)) as f64 / 1024.0,
        match a.accept_rate {
            Some(0) => "0, no limit".to_string(),
            Some(r) => format!("{r}/s"),
            None => "the default".to_string(),
        },
        a.accept_burst
            .map_or_else(|| "the default".to_string(), |b| b.to_string())
    );
    let _ = writeln!(
        md,
        "\nThe quiet pod's p99 second by second (ms, by when each request was due) during \
         each opening: {}.",
        openings
            .iter()
            .enumerate()
            .map(|(i, o)| format!("{}: {}", i + 1, by_second(&o.during)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if let Some(d) = &direct {
        let _ = writeln!(
            md,
            "\nThe same steps with no agent (`--direct`: both pods dial directly, the quiet pod \
             the nginx pod's address, the noisy pod opening the {expected} the agent held, its \
             connects paced at {}/s), in a world of their own right after: {}.",
            direct_pace(&a),
            d.figures()
        );
    }
    if let Some(d) = &direct_unpaced {
        let _ = writeln!(
            md,
            "\nAnd with no agent and the noisy pod's client unpaced, as it ran through the \
             agent (256 connects at a time per process, as fast as they go; it holds all {} \
             it tries, with no limit in the way), in a world of their own: {}.",
            conns.min(DIRECT_MAX),
            d.figures()
        );
    }
    print!("{md}");
    ensure!(
        all_failed == 0,
        "{all_failed} of the quiet pod's requests failed"
    );
    if !a.no_results {
        let out = repo_root().join("bench/results/noisy.md");
        std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench-noisy: wrote {}", out.display());
    }
    Ok(())
}

fn debug_bins(no_build: bool) -> Result<Bins> {
    if !no_build {
        crate::setup::ensure_build_deps()?;
        let a = [
            "build",
            "-p",
            "waymark-tests",
            "--bins",
            "-p",
            "waymark-agent",
        ];
        eprintln!("bench-noisy: cargo {}", a.join(" "));
        crate::setup::run(crate::test::cargo(&a).current_dir(repo_root()))?;
    }
    let dir = super::target_dir()?.join("debug");
    Ok(Bins {
        waymark: dir.join("waymark"),
        testpeer: dir.join("testpeer"),
    })
}

/// The time now, `YYYY-MM-DD HH:MM` (from `date`, as the rest of the bench
/// reports do without a date crate).
fn chrono_now() -> String {
    shell("date", &["-u", "+%Y-%m-%d %H:%M"])
}

/// The quiet pod's p99s (ms) with no agent: each run idle, while each
/// opening, and while held.
struct Direct {
    idle: Vec<f64>,
    openings: Vec<f64>,
    held: Vec<f64>,
}

impl Direct {
    /// "p99 idle … (runs: …), while the connections open … (runs: …;
    /// **N×**), held … (runs: …; N×)", for the report.
    fn figures(&self) -> String {
        let (idle, opening, held) = self.medians();
        format!(
            "p99 idle {idle:.2} ms (runs: {}), while the connections open {opening:.2} ms \
             (runs: {}; **{:.2}×**), held {held:.2} ms (runs: {}; {:.2}×)",
            listed(self.idle.iter().copied()),
            listed(self.openings.iter().copied()),
            opening / idle,
            listed(self.held.iter().copied()),
            held / idle,
        )
    }

    /// The medians: idle, while opening, held.
    fn medians(&self) -> (f64, f64, f64) {
        (
            median(self.idle.clone()),
            median(self.openings.clone()),
            median(self.held.clone()),
        )
    }
}

/// `--direct`: the quiet pod's p99 idle, while the noisy pod opens its
/// connections and while it holds them, with no agent (stopped, its
/// programs detached: `on_agent_down = "open"`). The noisy pod opens
/// `conns` (as many as the agent held, or every one it tries), its connects
/// paced at `pace` a second (0: as fast as they go).
fn run_direct(a: &NoisyArgs, bins: &Bins, conns: usize, pace: u32) -> Result<Direct> {
    let cpu = a.noisy_cpu.map(CpuLimit::new).transpose()?;
    let world = World::builder("bench-noisy-direct")
        .nodes(2)
        .pods_per_node(2)
        .agent_bin(&bins.waymark)
        .agent_config_extra("[redirect]\non_agent_down = \"open\"\n")
        .build()
        .context("building the world")?;
    world.node(0).stop_agent(Signal::SIGTERM)?;
    world.node(1).stop_agent(Signal::SIGTERM)?;
    let dir = world.dir().join("bench-noisy");
    std::fs::create_dir_all(&dir)?;
    let (noisy, quiet) = (world.pod(0, 0), world.pod(0, 1));
    let _servers = start_servers(&world, bins, &dir)?;
    let target = SocketAddr::new(pod_ip(1, 1).into(), super::topology::HTTP_PORT);
    load::probe(quiet, target, false)?;
    let rate = |what: &str| -> Result<f64> {
        let r = load::http_rate(quiet, &bins.testpeer, target, a.rate, a.secs, None, None)?;
        eprintln!(
            "bench-noisy --direct: {what}: p99 {:.2} ms ({}), {} of {} failed",
            p99_ms(&r),
            client_side(&r),
            failed(&r),
            r.requests
        );
        Ok(p99_ms(&r))
    };
    let _ = rate("warm-up")?;
    let idle: Vec<f64> = (0..a.reps)
        .map(|i| rate(&format!("idle {}/{}", i + 1, a.reps)))
        .collect::<Result<_>>()?;
    let echo = SocketAddr::new(pod_ip(1, 0).into(), ECHO_PORT);
    widen_port_range(noisy)?;
    let open_reps = a.open_reps as usize;
    let mut openings = Vec::with_capacity(open_reps);
    let mut held_by = None;
    for i in 0..open_reps {
        let (mut hold, opening) = open_while(noisy, bins, echo, conns, pace, cpu.as_ref(), || {
            rate(&format!(
                "while the noisy pod opens its connections {}/{open_reps}",
                i + 1
            ))
        })?;
        let (connected, failed, _) = held_counts(&mut hold)?;
        eprintln!(
            "bench-noisy --direct: holding {connected} failed {failed} (paced at {pace}/s; 0: unpaced)"
        );
        openings.push(opening);
        if i + 1 < open_reps {
            // No agent to wait for: the client's exit closes them.
            drop(hold);
        } else {
            held_by = Some(hold);
        }
    }
    let hold = held_by.context("no opening was run")?;
    let held: Vec<f64> = (0..a.reps)
        .map(|i| rate(&format!("{conns} connections held {}/{}", i + 1, a.reps)))
        .collect::<Result<_>>()?;
    drop(hold);
    let d = Direct {
        idle,
        openings,
        held,
    };
    let (p99_idle, opening, held) = d.medians();
    eprintln!(
        "bench-noisy --direct: p99 idle {p99_idle:.2} ms; while opening {opening:.2} ms ({:.2}x); held {held:.2} ms ({:.2}x)",
        opening / p99_idle,
        held / p99_idle
    );
    Ok(d)
}

/// Gives the noisy pod's namespace the source ports of a node
/// (`1024 65535`, as the world's nodes have). Each opening the pod lets go
/// leaves its ports in TIME_WAIT for a minute — the client's sockets and,
/// with the agent, the agent's upstream sockets made in the same
/// namespace — and the default range (32768–60999) holds three openings
/// of 9,000 only just.
fn widen_port_range(pod: &Pod) -> Result<()> {
    waymark_tests::world::net::sysctl_in(
        &pod.netns_path(),
        "net.ipv4.ip_local_port_range",
        "1024 65535",
    )
}

/// The noisy pod opens `conns` connections to `echo` (`testpeer hold`, one
/// process per [`PER_CLIENT`], each 256 at a time, together at most `rate`
/// a second unless 0) and holds them, while `during` runs on this thread:
/// returns the holding clients, once each holds its share or gave up, and
/// what `during` returned.
#[allow(clippy::too_many_arguments)] // one call per step kind, each naming them
fn open_while<T>(
    noisy: &Pod,
    bins: &Bins,
    echo: SocketAddr,
    conns: usize,
    rate: u32,
    cpu: Option<&CpuLimit>,
    during: impl FnOnce() -> Result<T>,
) -> Result<(Vec<Server>, T)> {
    let clients = conns.div_ceil(PER_CLIENT);
    let share = |i: usize| conns / clients + usize::from(i < conns % clients);
    let client_rate = |i: usize| {
        if rate == 0 {
            0
        } else {
            // Split so that the sum stays the rate asked for.
            let r = rate as usize;
            (r / clients + usize::from(i < r % clients)).max(1) as u32
        }
    };
    let (holds, result) = std::thread::scope(|s| {
        let holds: Vec<_> = (0..clients)
            .map(|i| {
                s.spawn(move || {
                    noisy.serve_until(
                        CpuLimit::command(cpu, &bins.testpeer)
                            .arg("hold")
                            .arg("--connect")
                            .arg(echo.to_string())
                            .arg("--count")
                            .arg(share(i).to_string())
                            .arg("--concurrency")
                            .arg("256")
                            .arg("--rate")
                            .arg(client_rate(i).to_string())
                            .arg("--hold")
                            .arg("1800s"),
                        "holding ",
                        Duration::from_secs(300),
                    )
                })
            })
            .collect();
        let result = during();
        (
            holds.into_iter().map(|h| h.join()).collect::<Vec<_>>(),
            result,
        )
    });
    let mut servers = Vec::with_capacity(holds.len());
    for h in holds {
        match h {
            Ok(h) => servers.push(h?),
            Err(_) => bail!("a holding thread panicked"),
        }
    }
    Ok((servers, result?))
}

/// A CPU bound for the noisy pod's clients: a cgroup v1 `cpu` directory of
/// its own with a CFS quota, which each client joins before it execs (the
/// pod's cgroup v2 membership, which the redirect depends on, is another
/// hierarchy and stays as it is). Removed when dropped.
struct CpuLimit {
    dir: std::path::PathBuf,
}

/// The cgroup v1 `cpu` hierarchy of a hybrid host.
const CPU_V1: &str = "/sys/fs/cgroup/cpu";

impl CpuLimit {
    fn new(cores: f64) -> Result<Self> {
        ensure!(
            cores > 0.0 && cores <= 64.0,
            "--noisy-cpu {cores}: between 0 and 64 cores"
        );
        let root = std::path::Path::new(CPU_V1);
        ensure!(
            root.join("cpu.cfs_quota_us").exists(),
            "--noisy-cpu needs the cgroup v1 cpu controller at {CPU_V1}; on a cgroup v2 host bound the pod's own cgroup (cpu.max)"
        );
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("waymark-bench-noisy-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let limit = Self { dir };
        let period: u64 = std::fs::read_to_string(limit.dir.join("cpu.cfs_period_us"))?
            .trim()
            .parse()
            .context("reading cpu.cfs_period_us")?;
        let quota = (cores * period as f64).round() as u64;
        std::fs::write(limit.dir.join("cpu.cfs_quota_us"), quota.to_string())
            .with_context(|| format!("writing the quota {quota} µs of {period}"))?;
        eprintln!(
            "bench-noisy: the noisy pod's clients are held to {cores} core(s) ({} µs per {period} µs)",
            quota
        );
        Ok(limit)
    }

    /// `program`, joining the cgroup first when there is a bound.
    fn command(limit: Option<&Self>, program: &std::path::Path) -> Command {
        match limit {
            None => Command::new(program),
            Some(l) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!(
                        "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                        l.dir.display()
                    ))
                    .arg("sh")
                    .arg(program);
                c
            }
        }
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // The clients have exited by now (a cgroup that just lost its last
        // process can still be busy for a moment: `remove_tree` waits).
        if let Err(e) = waymark_tests::world::cgroup::remove_tree(&self.dir) {
            eprintln!("bench-noisy: {e:#}");
        }
    }
}

/// What the holding clients said: connects that succeeded (each then held,
/// or reset by the agent at a limit), connects that failed, and of those
/// the ones refused outright (`ECONNREFUSED`: by the kernel at a limit).
fn held_counts(clients: &mut [Server]) -> Result<(usize, usize, usize)> {
    let (mut connected, mut failed, mut refused) = (0, 0, 0);
    for c in clients {
        // "holding N failed M refused R"
        let line = c.wait_line("holding ", Duration::from_secs(1))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> Result<usize> {
            f.get(i)
                .and_then(|x| x.parse().ok())
                .with_context(|| format!("testpeer hold said {line:?}"))
        };
        connected += n(1)?;
        failed += n(3)?;
        refused += n(5)?;
    }
    Ok((connected, failed, refused))
}

/// How many connections node 0's agent takes per pod and in all (0: no
/// limit).
struct OutboundLimits {
    per_pod: usize,
    total: usize,
}

/// Node 0's agent's outbound limits as it derived them (`GET /conns`).
fn agent_limits(node: &waymark_tests::Node) -> Result<OutboundLimits> {
    let (status, body) = node.admin_socket_get("/conns?direction=out")?;
    ensure!(status == 200, "/conns answered {status}: {body}");
    let report: serde_json::Value = serde_json::from_str(&body).context("reading /conns")?;
    let limit = |key: &str| {
        report["limits"][key]
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("the agent's /conns reports no limits.{key}: {body}"))
    };
    Ok(OutboundLimits {
        per_pod: limit("per_pod")?,
        total: limit("total")?,
    })
}

/// The servers on node 1: nginx in pod (1,1) for the quiet pod's requests,
/// `testpeer echo` in pod (1,0) for the noisy pod's connections. They run
/// until the returned handles are dropped.
fn start_servers(
    world: &World,
    bins: &Bins,
    dir: &std::path::Path,
) -> Result<(peers::Proc, Server)> {
    let nginx = peers::start_backend(
        "backend-n1p1",
        world.pod(1, 1),
        world.node(1),
        dir,
        super::topology::HTTP_PORT,
        super::topology::H2C_PORT,
    )?;
    let echo = world.pod(1, 0).serve(
        Command::new(&bins.testpeer)
            .arg("echo")
            .arg("--listen")
            .arg(format!("0.0.0.0:{ECHO_PORT}")),
    )?;
    Ok((nginx, echo))
}

/// The rate the `--direct` steps pace the noisy pod's connects at: the
/// client's own (`--client-rate`) when given, else what the agent's accept
/// rate would pace them at (its default when not given), so the opening
/// overlaps the measured window alike.
fn direct_pace(a: &NoisyArgs) -> u32 {
    if a.client_rate > 0 {
        a.client_rate
    } else {
        a.accept_rate.unwrap_or(DEFAULT_ACCEPT_RATE)
    }
}
