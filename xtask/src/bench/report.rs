//! Results of a run, their summary (medians and ratios), and the three ways
//! they are shown: a table on stdout, JSON, markdown.

use std::fmt::Write as _;

use serde::Serialize;

use super::load::{IperfResult, RateResult, WrkResult};
use super::measure::{CpuUse, Machine};
use super::topology::{Layer, PathSpec};

#[derive(Serialize, Clone)]
pub struct SatSample {
    pub rep: usize,
    pub rps: f64,
    pub wrk: WrkResult,
    /// CPU seconds of the path's proxy processes during the run.
    pub proxy_cpu_s: f64,
    pub cpu_s_per_100k: Option<f64>,
    /// The backend nginx's CPU per 100k requests (the same work on every
    /// path: a check that the load was the same).
    pub backend_cpu_s_per_100k: f64,
    /// The backend's sleeps per request ([`super::measure::sleeps`]): how
    /// often a request found it idle and its sender paid to wake it.
    pub backend_sleeps_per_request: f64,
    /// The proxy's threads' sleeps per request (how often it ran out of
    /// work and waited in `epoll_wait`).
    pub proxy_sleeps_per_request: Option<f64>,
    /// Largest summed VmRSS of the proxy processes, sampled every 100 ms.
    pub rss_load_kib: Option<u64>,
    /// Summed VmHWM (peak RSS since each process started) after the run.
    pub rss_hwm_kib: Option<u64>,
    /// How the machine's cores were used during the run: by the bench,
    /// and by everything else on the machine.
    pub cpu_use: CpuUse,
    pub loadavg: [f64; 3],
    /// waymark only: connections its metrics counted during the run.
    pub proxied_conns: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct BulkSample {
    pub rep: usize,
    pub iperf: IperfResult,
    pub proxy_cpu_s: f64,
    pub cpu_s_per_gib: Option<f64>,
    pub cpu_use: CpuUse,
    pub loadavg: [f64; 3],
}

#[derive(Serialize, Clone)]
pub struct LatSample {
    pub result: RateResult,
    pub proxy_cpu_s: f64,
    pub cpu_s_per_100k: Option<f64>,
    pub cpu_use: CpuUse,
    pub loadavg: [f64; 3],
}

#[derive(Serialize, Clone)]
pub struct IdleSample {
    pub requested: usize,
    pub held: usize,
    pub failed: usize,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
    pub fds_before: usize,
    pub fds_idle: usize,
}

impl IdleSample {
    /// What each held connection added to the proxies' RSS, in bytes.
    pub fn bytes_per_conn(&self) -> Option<f64> {
        (self.held > 0).then(|| {
            (self.rss_idle_kib as f64 - self.rss_before_kib as f64) * 1024.0 / self.held as f64
        })
    }
}

/// Bytes per idle connection as the memory table prints them.
fn per_conn(i: Option<&IdleSample>) -> String {
    i.and_then(IdleSample::bytes_per_conn)
        .map(|b| format!("{:.0}", b.max(0.0)))
        .unwrap_or_else(|| "—".into())
}

#[derive(Serialize, Default, Clone)]
pub struct Summary {
    pub rps_median: Option<f64>,
    pub rps_min: Option<f64>,
    pub rps_max: Option<f64>,
    pub rps_vs_direct: Option<f64>,
    pub best_peer: Option<String>,
    pub rps_vs_best_peer: Option<f64>,
    pub sat_p50_us: Option<f64>,
    pub sat_p99_us: Option<f64>,
    pub cpu_s_per_100k: Option<f64>,
    pub cpu_vs_best_peer: Option<f64>,
    pub rss_load_mib: Option<f64>,
    pub lat_p50_us: Option<f64>,
    pub lat_p99_us: Option<f64>,
    pub lat_p999_us: Option<f64>,
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    /// Median over the rounds of the share of requests (%) slower than
    /// the same round's baseline p99 + [`ADDED_P99_TARGET_US`]: at most
    /// 1 % when the p99 target is met.
    pub over_target_pct: Option<f64>,
    pub rss_before_mib: Option<f64>,
    pub rss_idle_mib: Option<f64>,
    pub rss_idle_l7_mib: Option<f64>,
    pub bulk_gbit_median: Option<f64>,
    pub bulk_gbit_min: Option<f64>,
    pub bulk_gbit_max: Option<f64>,
    pub bulk_vs_direct: Option<f64>,
    pub bulk_cpu_s_per_gib: Option<f64>,
    /// Median CPU used outside the bench during the saturation runs, cores.
    pub others_cores: Option<f64>,
    /// Saturation samples taken while other work used under
    /// [`QUIET_CORES`], and their medians.
    pub quiet_n: usize,
    pub quiet_rps: Option<f64>,
    pub quiet_cpu_s_per_100k: Option<f64>,
    /// Against [`PathResult::same_work`]: requests/s and CPU per request.
    pub rps_vs_same_work: Option<f64>,
    pub cpu_vs_same_work: Option<f64>,
}

/// A sample is "quiet" when other work on the machine used less than this
/// many cores during it.
pub const QUIET_CORES: f64 = 0.2;

#[derive(Serialize, Clone)]
pub struct PathResult {
    pub id: String,
    pub label: String,
    pub what: String,
    pub hops: usize,
    pub layer: Layer,
    pub same_node: bool,
    pub agent: String,
    pub baseline: String,
    pub class: Option<String>,
    /// The peer row doing the same work (see `PathSpec::same_work`).
    pub same_work: Option<String>,
    pub http_target: String,
    pub bulk_target: Option<String>,
    pub saturation: Vec<SatSample>,
    pub bulk: Vec<BulkSample>,
    /// One per repetition (round robin over the paths, like saturation).
    pub latency: Vec<LatSample>,
    pub idle: Option<IdleSample>,
    /// The same at `--idle-conns-l7` connections (waymark's HTTP/1.1 L7
    /// paths only: the target's 10,000 connections).
    pub idle_l7: Option<IdleSample>,
    pub errors: Vec<String>,
    pub summary: Summary,
}

impl PathResult {
    pub fn new(p: &PathSpec) -> PathResult {
        PathResult {
            id: p.id.clone(),
            label: p.label.clone(),
            what: p.what.clone(),
            hops: p.hops,
            layer: p.layer,
            same_node: p.same_node,
            agent: p.agent.describe(),
            baseline: p.baseline.into(),
            class: p.class.map(Into::into),
            same_work: p.same_work.map(Into::into),
            http_target: p.http.to_string(),
            bulk_target: p.bulk.map(|b| b.to_string()),
            saturation: vec![],
            bulk: vec![],
            latency: vec![],
            idle: None,
            idle_l7: None,
            errors: vec![],
            summary: Summary::default(),
        }
    }
}

#[derive(Serialize)]
pub struct Settings {
    pub quick: bool,
    pub reps: usize,
    pub duration_s: u64,
    pub bulk_s: u64,
    pub latency_s: u64,
    pub rate: Option<u64>,
    pub rate_chosen_as: String,
    pub idle_conns: usize,
    /// `--idle-conns-l7` (0: the step did not run).
    pub idle_conns_l7: usize,
    /// `--wait-quiet` (s) and the time spent waiting for a quiet machine.
    pub wait_quiet_s: u64,
    pub waited_s: f64,
    /// The agent binary measured, and extra environment it ran with.
    pub agent: String,
    pub agent_env: Vec<String>,
    /// `--agent-toml`: TOML merged into the agents' config.
    pub agent_toml: Vec<String>,
    /// `--bulk-reverse`: iperf3 ran server → client.
    pub bulk_reverse: bool,
    pub wrk: String,
    pub rate_generator: String,
}

#[derive(Serialize)]
pub struct Run {
    pub started: String,
    pub elapsed_s: f64,
    pub git: String,
    pub settings: Settings,
    pub machine: Machine,
    pub loadavg_start: [f64; 3],
    pub loadavg_end: [f64; 3],
    /// Lowest and highest 1-minute load average seen before a measurement.
    pub loadavg_1m_range: [f64; 2],
    /// CPU used outside the bench during the measurements, in cores.
    pub others_cores: Others,
    pub paths: Vec<PathResult>,
    pub not_measured: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// Other work on the machine during the measurements.
#[derive(Serialize, Default)]
pub struct Others {
    /// Mean over the measurements, in cores.
    pub mean: f64,
    /// The highest of any one measurement.
    pub max: f64,
    /// Mean CPU stolen by the hypervisor, in cores.
    pub steal_mean: f64,
}

pub fn others(v: &[CpuUse]) -> Others {
    if v.is_empty() {
        return Others::default();
    }
    let n = v.len() as f64;
    Others {
        mean: v.iter().map(|c| c.others_cores).sum::<f64>() / n,
        max: v.iter().map(|c| c.others_cores).fold(0.0, f64::max),
        steal_mean: v.iter().map(|c| c.steal_cores).sum::<f64>() / n,
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::min)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

const MIB: f64 = 1024.0;

/// Fills in every path's summary: its own medians first, then the ratios
/// against the direct path and the best peer of the same class.
pub fn summarize(paths: &mut [PathResult]) {
    for p in paths.iter_mut() {
        let s = &mut p.summary;
        let rps: Vec<f64> = p.saturation.iter().map(|x| x.rps).collect();
        s.rps_median = median(&rps);
        s.rps_min = min(&rps);
        s.rps_max = max(&rps);
        let p50: Vec<f64> = p.saturation.iter().map(|x| x.wrk.lat_us.p50).collect();
        let p99: Vec<f64> = p.saturation.iter().map(|x| x.wrk.lat_us.p99).collect();
        s.sat_p50_us = median(&p50);
        s.sat_p99_us = median(&p99);
        let cpu: Vec<f64> = p
            .saturation
            .iter()
            .filter_map(|x| x.cpu_s_per_100k)
            .collect();
        s.cpu_s_per_100k = median(&cpu);
        let others: Vec<f64> = p
            .saturation
            .iter()
            .map(|x| x.cpu_use.others_cores)
            .collect();
        s.others_cores = median(&others);
        let quiet: Vec<&SatSample> = p
            .saturation
            .iter()
            .filter(|x| x.cpu_use.others_cores < QUIET_CORES)
            .collect();
        s.quiet_n = quiet.len();
        s.quiet_rps = median(&quiet.iter().map(|x| x.rps).collect::<Vec<_>>());
        s.quiet_cpu_s_per_100k = median(
            &quiet
                .iter()
                .filter_map(|x| x.cpu_s_per_100k)
                .collect::<Vec<_>>(),
        );
        s.rss_load_mib = p
            .saturation
            .iter()
            .filter_map(|x| x.rss_load_kib)
            .max()
            .map(|k| k as f64 / MIB);
        let lat: Vec<&super::load::Pct> = p
            .latency
            .iter()
            .filter_map(|l| l.result.latency_us.as_ref())
            .collect();
        s.lat_p50_us = median(&lat.iter().map(|l| l.p50).collect::<Vec<_>>());
        s.lat_p99_us = median(&lat.iter().map(|l| l.p99).collect::<Vec<_>>());
        s.lat_p999_us = median(&lat.iter().map(|l| l.p999).collect::<Vec<_>>());
        s.over_target_pct = median(
            &p.latency
                .iter()
                .filter_map(|l| l.result.over_pct())
                .collect::<Vec<_>>(),
        );
        if let Some(i) = &p.idle {
            s.rss_before_mib = Some(i.rss_before_kib as f64 / MIB);
            s.rss_idle_mib = Some(i.rss_idle_kib as f64 / MIB);
        }
        if let Some(i) = &p.idle_l7 {
            s.rss_idle_l7_mib = Some(i.rss_idle_kib as f64 / MIB);
        }
        let g: Vec<f64> = p.bulk.iter().map(|b| b.iperf.gbit_s).collect();
        s.bulk_gbit_median = median(&g);
        s.bulk_gbit_min = min(&g);
        s.bulk_gbit_max = max(&g);
        let c: Vec<f64> = p.bulk.iter().filter_map(|b| b.cpu_s_per_gib).collect();
        s.bulk_cpu_s_per_gib = median(&c);
    }
    let snapshot: Vec<PathResult> = paths.to_vec();
    let find = |id: &str| snapshot.iter().find(|p| p.id == id);
    for p in paths.iter_mut() {
        if let Some(base) = find(&p.baseline)
            && base.id != p.id
        {
            p.summary.rps_vs_direct = ratio(p.summary.rps_median, base.summary.rps_median);
            p.summary.bulk_vs_direct =
                ratio(p.summary.bulk_gbit_median, base.summary.bulk_gbit_median);
            if let (Some(a), Some(b)) = (p.summary.lat_p99_us, base.summary.lat_p99_us) {
                p.summary.added_p99_us = Some(a - b);
            }
            if let (Some(a), Some(b)) = (p.summary.lat_p50_us, base.summary.lat_p50_us) {
                p.summary.added_p50_us = Some(a - b);
            }
        }
        if let Some(peer) = p.same_work.as_deref().and_then(find) {
            p.summary.rps_vs_same_work = ratio(p.summary.rps_median, peer.summary.rps_median);
            p.summary.cpu_vs_same_work =
                ratio(p.summary.cpu_s_per_100k, peer.summary.cpu_s_per_100k);
        }
        let Some(class) = &p.class else { continue };
        // The best peer of the class: most requests/s (the peers are the
        // ones that are not waymark, i.e. run with the agents stopped).
        let peers: Vec<&PathResult> = snapshot
            .iter()
            .filter(|q| q.class.as_ref() == Some(class) && q.agent == "agents stopped")
            .filter(|q| q.summary.rps_median.is_some())
            .collect();
        let best_rps = peers.iter().max_by(|a, b| {
            a.summary
                .rps_median
                .partial_cmp(&b.summary.rps_median)
                .unwrap()
        });
        if let Some(b) = best_rps {
            p.summary.best_peer = Some(b.id.clone());
            p.summary.rps_vs_best_peer = ratio(p.summary.rps_median, b.summary.rps_median);
        }
        let best_cpu = peers
            .iter()
            .filter_map(|q| q.summary.cpu_s_per_100k)
            .reduce(f64::min);
        p.summary.cpu_vs_best_peer = ratio(p.summary.cpu_s_per_100k, best_cpu);
    }
}

// ---- formatting ----

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "—".into())
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn times(x: f64) -> String {
    format!("{x:.2}×")
}

/// What a path may add to its direct baseline's p99 at half of
/// saturation, µs: waymark's latency target (`bench/README.md`).
pub const ADDED_P99_TARGET_US: f64 = 500.0;

/// Rows of the HTTP/1.1 table, header first.
fn http_rows(run: &Run) -> Vec<Vec<String>> {
    let rate = run
        .settings
        .rate
        .map(|r| format!("{} rps", thousands(r as f64)))
        .unwrap_or_else(|| "fixed rate".into());
    let mut rows = vec![vec![
        "path".to_string(),
        "hops".into(),
        "req/s median (min–max)".into(),
        "×direct".into(),
        "×best peer".into(),
        "CPU-s/100k".into(),
        "CPU ×best peer".into(),
        "p50/p99 ms @sat".into(),
        format!("p50/p99/p99.9 ms @{rate}"),
        "+p99 ms vs direct".into(),
        format!(
            "% over direct's p99 + {} ms (target ≤ 1 %)",
            ADDED_P99_TARGET_US / 1000.0
        ),
        "others' CPU (cores)".into(),
        format!("quiet: req/s · CPU-s/100k (n, others < {QUIET_CORES})"),
    ]];
    for p in &run.paths {
        let s = &p.summary;
        if !p.errors.is_empty() && s.rps_median.is_none() {
            rows.push(vec![
                p.label.clone(),
                p.hops.to_string(),
                format!("error: {}", p.errors[0].lines().next().unwrap_or_default()),
            ]);
            continue;
        }
        let rps = match (s.rps_median, s.rps_min, s.rps_max) {
            (Some(m), Some(a), Some(b)) if a != b => {
                format!("{} ({}–{})", thousands(m), thousands(a), thousands(b))
            }
            (Some(m), _, _) => thousands(m),
            _ => "—".into(),
        };
        let lat = match (s.lat_p50_us, s.lat_p99_us, s.lat_p999_us) {
            (Some(a), Some(b), Some(c)) => format!("{} / {} / {}", ms(a), ms(b), ms(c)),
            _ => "—".into(),
        };
        let behind = if p
            .latency
            .iter()
            .any(|l| l.result.achieved_rate < 0.95 * l.result.target_rate as f64)
        {
            " (fell behind)"
        } else {
            ""
        };
        rows.push(vec![
            p.label.clone(),
            p.hops.to_string(),
            rps,
            opt(s.rps_vs_direct, times),
            opt(s.rps_vs_best_peer, times),
            opt(s.cpu_s_per_100k, |x| format!("{x:.2}")),
            opt(s.cpu_vs_best_peer, times),
            match (s.sat_p50_us, s.sat_p99_us) {
                (Some(a), Some(b)) => format!("{} / {}", ms(a), ms(b)),
                _ => "—".into(),
            },
            lat + behind,
            opt(s.added_p99_us, |x| format!("{:+.2}", x / 1000.0)),
            opt(s.over_target_pct, |x| format!("{x:.2}")),
            opt(s.others_cores, |x| format!("{x:.2}")),
            match s.quiet_rps {
                Some(r) => format!(
                    "{} · {} ({})",
                    thousands(r),
                    opt(s.quiet_cpu_s_per_100k, |x| format!("{x:.2}")),
                    s.quiet_n
                ),
                None => "— (0)".into(),
            },
        ]);
    }
    rows
}

/// The waymark rows that name a peer doing the same work, beside it.
fn same_work_rows(run: &Run) -> Vec<Vec<String>> {
    same_work_rows_of(&run.paths)
}

fn same_work_rows_of(paths: &[PathResult]) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "waymark row".to_string(),
        "peer doing the same work".into(),
        "req/s".into(),
        "CPU-s/100k".into(),
        "req/s ×peer".into(),
        "CPU ×peer".into(),
    ]];
    let find = |id: &str| paths.iter().find(|p| p.id == id);
    for p in paths {
        let Some(peer) = p.same_work.as_deref().and_then(find) else {
            continue;
        };
        let pair = |a: Option<f64>, b: Option<f64>, f: &dyn Fn(f64) -> String| {
            format!("{} / {}", opt(a, f), opt(b, f))
        };
        rows.push(vec![
            p.label.clone(),
            peer.label.clone(),
            pair(p.summary.rps_median, peer.summary.rps_median, &thousands),
            pair(
                p.summary.cpu_s_per_100k,
                peer.summary.cpu_s_per_100k,
                &|x| format!("{x:.2}"),
            ),
            opt(p.summary.rps_vs_same_work, times),
            opt(p.summary.cpu_vs_same_work, times),
        ]);
    }
    rows
}

fn memory_rows(run: &Run) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "path".to_string(),
        "RSS idle MiB".into(),
        "RSS under load MiB (peak)".into(),
        format!("RSS @{} idle conns MiB", run.settings.idle_conns),
        "conns held".into(),
        "proxy fds".into(),
        "bytes/idle conn".into(),
    ]];
    if run.settings.idle_conns_l7 > 0 {
        rows[0].push(format!(
            "RSS @{} idle conns MiB (L7)",
            run.settings.idle_conns_l7
        ));
        rows[0].push("conns held (L7)".into());
        rows[0].push("bytes/idle conn (L7)".into());
    }
    for p in run.paths.iter().filter(|p| p.hops > 0) {
        let s = &p.summary;
        rows.push(vec![
            p.label.clone(),
            opt(s.rss_before_mib, |x| format!("{x:.1}")),
            opt(s.rss_load_mib, |x| format!("{x:.1}")),
            opt(s.rss_idle_mib, |x| format!("{x:.1}")),
            p.idle
                .as_ref()
                .map(|i| format!("{}/{}", i.held, i.requested))
                .unwrap_or_else(|| "—".into()),
            p.idle
                .as_ref()
                .map(|i| i.fds_idle.to_string())
                .unwrap_or_else(|| "—".into()),
            per_conn(p.idle.as_ref()),
        ]);
        if run.settings.idle_conns_l7 > 0 {
            let row = rows.last_mut().expect("just pushed");
            row.push(opt(s.rss_idle_l7_mib, |x| format!("{x:.1}")));
            row.push(
                p.idle_l7
                    .as_ref()
                    .map(|i| format!("{}/{}", i.held, i.requested))
                    .unwrap_or_else(|| "—".into()),
            );
            row.push(per_conn(p.idle_l7.as_ref()));
        }
    }
    rows
}

fn bulk_rows(run: &Run) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "path (iperf3)".to_string(),
        "hops".into(),
        "Gbit/s median (min–max)".into(),
        "×direct".into(),
        "proxy CPU-s/GiB".into(),
    ]];
    for p in run.paths.iter().filter(|p| !p.bulk.is_empty()) {
        let s = &p.summary;
        let g = match (s.bulk_gbit_median, s.bulk_gbit_min, s.bulk_gbit_max) {
            (Some(m), Some(a), Some(b)) if a != b => format!("{m:.2} ({a:.2}–{b:.2})"),
            (Some(m), _, _) => format!("{m:.2}"),
            _ => "—".into(),
        };
        rows.push(vec![
            p.label.clone(),
            p.hops.to_string(),
            g,
            opt(s.bulk_vs_direct, times),
            opt(s.bulk_cpu_s_per_gib, |x| format!("{x:.2}")),
        ]);
    }
    rows
}

fn text_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = |s: &str| s.chars().count();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter(|r| r.len() == cols)
                .filter_map(|r| r.get(c))
                .map(|s| width(s))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let pad = widths.get(c).copied().unwrap_or(0).saturating_sub(width(s));
                format!("{s}{}", " ".repeat(pad))
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * cols.saturating_sub(1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

fn md_table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let mut cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        cells.resize(cols, String::new());
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if i == 0 {
            let _ = writeln!(out, "|{}", "---|".repeat(cols));
        }
    }
    out
}

fn load_line(run: &Run) -> String {
    let f = |l: [f64; 3]| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]);
    format!(
        "load average at start {}, at end {}; 1-min load before measurements ranged {:.2}–{:.2}; \
         other work on the machine (outside the bench) used {:.2} of the {} cores on average during \
         the measurements, {:.2} at most; hypervisor steal {:.2} cores",
        f(run.loadavg_start),
        f(run.loadavg_end),
        run.loadavg_1m_range[0],
        run.loadavg_1m_range[1],
        run.others_cores.mean,
        run.machine.nproc,
        run.others_cores.max,
        run.others_cores.steal_mean
    )
}

pub fn text(run: &Run) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nwaymark bench {} ({}; {} rep(s) × {} s wrk -t1 -c64, {} s fixed-rate latency, {} s iperf3; {:.0} s in all)",
        run.started,
        if run.settings.quick { "quick" } else { "full" },
        run.settings.reps,
        run.settings.duration_s,
        run.settings.latency_s,
        run.settings.bulk_s,
        run.elapsed_s
    );
    let _ = writeln!(s, "{}\n", load_line(run));
    let _ = writeln!(
        s,
        "HTTP/1.1 (wrk; `*-h2` rows: HTTP/2 h2c, h2load; `*-grpc` rows: gRPC unary calls, h2load), 100-byte body, keep-alive:"
    );
    s.push_str(&text_table(&http_rows(run)));
    let same = same_work_rows(run);
    if same.len() > 1 {
        let _ = writeln!(
            s,
            "\nSame work (the upstream connection made in the pod's namespace, or the node's):"
        );
        s.push_str(&text_table(&same));
    }
    let _ = writeln!(
        s,
        "\nMemory of the proxy processes (sum over the path's proxies):"
    );
    s.push_str(&text_table(&memory_rows(run)));
    let _ = writeln!(
        s,
        "\nBulk TCP (L4 paths, {}):",
        bulk_direction(run.settings.bulk_reverse)
    );
    s.push_str(&text_table(&bulk_rows(run)));
    let _ = writeln!(s, "\nNot measured:");
    for (what, why) in &run.not_measured {
        let _ = writeln!(s, "  {what}: {why}");
    }
    for n in &run.notes {
        let _ = writeln!(s, "note: {n}");
    }
    let errs: Vec<String> = run
        .paths
        .iter()
        .flat_map(|p| p.errors.iter().map(move |e| format!("{}: {e}", p.id)))
        .collect();
    if !errs.is_empty() {
        let _ = writeln!(s, "\nErrors:");
        for e in errs {
            let _ = writeln!(s, "  {e}");
        }
    }
    s
}

pub fn markdown(run: &Run) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# waymark bench: results of {}\n", run.started);
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench` ({} run: {} repetition(s), each of {} s of `wrk -t1 -c64`, \
         {} s of fixed-rate latency with `testpeer http-rate` and {} s of iperf3 per path; \
         medians over the repetitions; {:.0} s in all; commit `{}`). \
         How to read it: [`bench/README.md`](../README.md).\n",
        if run.settings.quick { "quick" } else { "full" },
        run.settings.reps,
        run.settings.duration_s,
        run.settings.latency_s,
        run.settings.bulk_s,
        run.elapsed_s,
        run.git
    );
    let _ = writeln!(s, "**Machine load:** {}.\n", load_line(run));
    let _ = writeln!(
        s,
        "**Agent measured:** `{}` ({}).\n",
        run.settings.agent,
        run.machine
            .versions
            .get("waymark")
            .map(String::as_str)
            .unwrap_or("?")
    );
    if run.settings.wait_quiet_s > 0 {
        let _ = writeln!(
            s,
            "Each measurement waited up to {} s for a quiet machine (`--wait-quiet`); \
             {:.0} s of waiting in all.\n",
            run.settings.wait_quiet_s, run.settings.waited_s
        );
    }
    if !run.settings.agent_env.is_empty() {
        let _ = writeln!(
            s,
            "**Agent environment:** `{}`.\n",
            run.settings.agent_env.join(" ")
        );
    }
    if !run.settings.agent_toml.is_empty() {
        let _ = writeln!(
            s,
            "**Agent config added:** `{}`.\n",
            run.settings.agent_toml.join(" ").replace('\n', " ")
        );
    }
    let _ = writeln!(
        s,
        "Fixed rate for the latency columns: {}.\n",
        run.settings.rate_chosen_as
    );
    let _ = writeln!(
        s,
        "## HTTP/1.1 (100-byte body, keep-alive, 64 connections; `*-h2` rows: HTTP/2 h2c, 64 streams; `*-grpc` rows: gRPC unary, 100-byte message, 64 calls in flight)\n"
    );
    s.push_str(&md_table(&http_rows(run)));
    let same = same_work_rows(run);
    if same.len() > 1 {
        let _ = writeln!(
            s,
            "\n## Same work: where the upstream connection is made\n\n\
             waymark makes a pod's upstream connection in the pod's network namespace (the \
             default, so that it reaches only what the pod may reach), a per-node peer in the \
             node's; the kernel's work per request differs between the two (`bench/README.md`, \
             \"Dialling as the pod\"). Each waymark row here beside the peer row that dials the \
             same way.\n"
        );
        s.push_str(&md_table(&same));
    }
    let _ = writeln!(
        s,
        "\n## Memory of the proxy processes\n\nSum of VmRSS over the path's proxy processes \
         (nginx: master + worker; two hops: both proxies).\n"
    );
    s.push_str(&md_table(&memory_rows(run)));
    let _ = writeln!(
        s,
        "\n## Bulk TCP (iperf3, {})\n",
        bulk_direction(run.settings.bulk_reverse)
    );
    s.push_str(&md_table(&bulk_rows(run)));
    let _ = writeln!(s, "\n## Not measured\n");
    for (what, why) in &run.not_measured {
        let _ = writeln!(s, "- {what}: {why}");
    }
    let _ = writeln!(s, "\n## What each path is\n");
    let _ = writeln!(
        s,
        "| path | hops | layer | waymark agent | exactly |\n|---|---|---|---|---|"
    );
    for p in &run.paths {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            p.label,
            p.hops,
            match (p.hops, p.layer) {
                (0, _) => "—",
                (_, Layer::L4) => "L4",
                (_, Layer::L7) => "L7",
            },
            p.agent,
            p.what.replace('|', "\\|")
        );
    }
    if !run.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &run.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    let errs: Vec<String> = run
        .paths
        .iter()
        .flat_map(|p| p.errors.iter().map(move |e| format!("`{}`: {e}", p.id)))
        .collect();
    if !errs.is_empty() {
        let _ = writeln!(s, "\n## Errors\n");
        for e in errs {
            let _ = writeln!(s, "- {}", e.replace('\n', " "));
        }
    }
    let m = &run.machine;
    let _ = writeln!(s, "\n## Machine\n");
    let _ = writeln!(
        s,
        "```\n$ nproc\n{}\n$ uname -a\n{}\n$ uptime   # at start\n{}\n$ free -h\n{}\n```\n",
        m.nproc, m.uname, m.uptime, m.free
    );
    let _ = writeln!(s, "Versions:\n");
    for (k, v) in &m.versions {
        let _ = writeln!(s, "- {k}: `{v}`");
    }
    let _ = writeln!(
        s,
        "\n<details><summary>lscpu</summary>\n\n```\n{}\n```\n</details>",
        m.lscpu
    );
    s
}

/// Which way iperf3's bytes went.
fn bulk_direction(reverse: bool) -> &'static str {
    if reverse {
        "server → client, `-R`"
    } else {
        "client → server"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(thousands(23100.4), "23,100");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }

    /// A path's same-work peer is found by id and its ratios are the
    /// medians' quotients; a path naming none, or a missing row, gets none.
    #[test]
    fn same_work_ratios_are_against_the_named_row() {
        let plan = super::super::topology::plan();
        let row = |id: &str, cpu: &[f64], rps: f64| {
            let spec = plan.paths.iter().find(|p| p.id == id).expect("plan row");
            let mut r = PathResult::new(spec);
            r.saturation = cpu
                .iter()
                .enumerate()
                .map(|(rep, &c)| SatSample {
                    rep,
                    rps,
                    wrk: Default::default(),
                    proxy_cpu_s: 0.0,
                    cpu_s_per_100k: Some(c),
                    backend_cpu_s_per_100k: 0.0,
                    backend_sleeps_per_request: 0.0,
                    proxy_sleeps_per_request: None,
                    rss_load_kib: None,
                    rss_hwm_kib: None,
                    cpu_use: Default::default(),
                    loadavg: [0.0; 3],
                    proxied_conns: None,
                })
                .collect();
            r
        };
        let mut paths = vec![
            row("waymark-l7", &[2.2, 2.4, 2.3], 40_000.0),
            row("haproxy-http-pod", &[2.0, 2.1, 2.2], 50_000.0),
            row("waymark-l7-node", &[2.0], 45_000.0),
        ];
        summarize(&mut paths);
        let s = &paths[0].summary;
        assert!((s.cpu_vs_same_work.unwrap() - 2.3 / 2.1).abs() < 1e-9);
        assert!((s.rps_vs_same_work.unwrap() - 0.8).abs() < 1e-9);
        // Its peer (HAProxy per node) is not in this run.
        assert_eq!(paths[2].summary.cpu_vs_same_work, None);
        assert_eq!(paths[1].summary.cpu_vs_same_work, None);
        let run_rows = same_work_rows_of(&paths);
        assert_eq!(run_rows.len(), 2, "a header and the one pair found");
        assert_eq!(run_rows[1][4], "0.80×");
    }

    /// The share over the target is each round's count over its
    /// requests, the median over the rounds; a run without a baseline (no
    /// threshold given) has none.
    #[test]
    fn share_over_the_p99_target_is_the_median_of_the_rounds() {
        let plan = super::super::topology::plan();
        let spec = plan
            .paths
            .iter()
            .find(|p| p.id == "waymark-l7")
            .expect("plan row");
        let lat = |requests: u64, over: Option<u64>| {
            let result: RateResult = serde_json::from_value(serde_json::json!({
                "target_rate": 16_500, "conns": 16, "requests": requests, "ok": requests,
                "non_2xx": 0, "errors": 0, "reconnects": 0, "late_sends": 0,
                "achieved_rate": 16_500.0,
                "latency_us": {"p50": 150.0, "p90": 300.0, "p99": 700.0, "p999": 3000.0,
                               "max": 9000.0, "mean": 200.0},
                "service_us": null,
                "over": over.map(|c| serde_json::json!({"us": 650, "count": c})),
                "first_error": null,
            }))
            .expect("a testpeer http-rate line");
            LatSample {
                result,
                proxy_cpu_s: 0.0,
                cpu_s_per_100k: None,
                cpu_use: Default::default(),
                loadavg: [0.0; 3],
            }
        };
        let mut with = PathResult::new(spec);
        with.latency = vec![
            lat(100_000, Some(1_500)),
            lat(100_000, Some(700)),
            lat(50_000, Some(450)),
        ];
        let mut without = PathResult::new(spec);
        without.latency = vec![lat(100_000, None)];
        let mut paths = vec![with, without];
        summarize(&mut paths);
        assert!((paths[0].summary.over_target_pct.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(paths[1].summary.over_target_pct, None);
    }

    #[test]
    fn tables_are_rectangular() {
        let rows = vec![
            vec!["a".to_string(), "bb".into()],
            vec!["ccc".to_string(), "d".into()],
        ];
        let t = text_table(&rows);
        assert_eq!(t.lines().count(), 3);
        let m = md_table(&rows);
        assert!(m.starts_with("| a | bb |\n|---|---|\n"));
    }
}
