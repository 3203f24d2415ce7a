//! What the bench reads from `/proc`: CPU time and memory of the proxy
//! processes, the machine's load, and a description of the machine.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

/// Clock ticks per second (`utime`/`stime` unit).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `(ppid, utime + stime)` of a process, from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. Field 3 is the state, 4 the ppid, 14/15 utime/stime.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `pids` and all their descendants (nginx's master and worker, say).
pub fn with_descendants(pids: &[i32]) -> Vec<i32> {
    let mut parent: BTreeMap<i32, i32> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
                && let Some((ppid, _)) = stat(pid)
            {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out: Vec<i32> = pids.to_vec();
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for (&c, &pp) in &parent {
            if pp == p && !out.contains(&c) {
                out.push(c);
            }
        }
        i += 1;
    }
    out
}

/// CPU seconds (user + system, all threads) used so far by these processes.
pub fn cpu_seconds(pids: &[i32]) -> f64 {
    let ticks: u64 = pids.iter().filter_map(|&p| stat(p).map(|s| s.1)).sum();
    ticks as f64 / clk_tck()
}

/// Times the processes' threads went to sleep of their own accord
/// (`voluntary_ctxt_switches`, summed over every thread): for a backend
/// that waits in `epoll_wait`, each is a wake-up some sender paid for
/// (see bench/README.md, "waking the receiver").
pub fn sleeps(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/task")).ok())
        .flatten()
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| status_field(&s, "voluntary_ctxt_switches"))
        .sum()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&s, field)
}

/// The number a field of a `status` file starts with (`VmRSS:  1234 kB`).
fn status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Sum of `VmRSS` over the processes, KiB. (Pages shared between processes,
/// such as nginx's master and worker, count once per process.)
pub fn rss_kib(pids: &[i32]) -> u64 {
    pids.iter().filter_map(|&p| status_kib(p, "VmRSS")).sum()
}

/// Sum of `VmHWM` (peak RSS since start) over the processes, KiB.
pub fn hwm_kib(pids: &[i32]) -> u64 {
    pids.iter().filter_map(|&p| status_kib(p, "VmHWM")).sum()
}

/// Open file descriptors of the processes.
pub fn fds(pids: &[i32]) -> usize {
    pids.iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|rd| rd.count())
        .sum()
}

/// Samples the summed RSS of some processes every 100 ms; `stop` returns
/// the largest sample.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl RssSampler {
    pub fn start(pids: Vec<i32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = rss_kib(&pids);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                max = max.max(rss_kib(&pids));
            }
            max
        });
        RssSampler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// `/proc/loadavg`: 1, 5 and 15 minutes.
pub fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = s.split_whitespace().map(|x| x.parse().unwrap_or(f64::NAN));
    [
        v.next().unwrap_or(f64::NAN),
        v.next().unwrap_or(f64::NAN),
        v.next().unwrap_or(f64::NAN),
    ]
}

/// The machine's CPU counters (`cpu` line of `/proc/stat`), ticks of all
/// cores together: busy (user, nice, system, irq, softirq), and stolen by
/// the hypervisor.
#[derive(Clone, Copy)]
pub struct CpuTimes {
    busy: u64,
    steal: u64,
}

pub fn cpu_times() -> CpuTimes {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest
    // time is already in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let steal = v.get(7).copied().unwrap_or(0);
    CpuTimes {
        busy: total.saturating_sub(idle).saturating_sub(steal),
        steal,
    }
}

/// CPU seconds of this process and of its children that were waited for
/// (wrk, iperf3, curl, … once they have exited).
fn own_and_children_cpu() -> f64 {
    let get = |who| {
        // SAFETY: getrusage fills the struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    get(libc::RUSAGE_SELF) + get(libc::RUSAGE_CHILDREN)
}

/// How the machine's CPU was used during a measurement, in cores (1.0 = one
/// core busy all along).
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// All busy time.
    pub busy_cores: f64,
    /// The bench's own: processes in the world's namespaces (load
    /// generators, servers, proxies, agent) and the bench process with the
    /// children it waited for.
    pub bench_cores: f64,
    /// The rest: other work on the machine, and kernel threads (softirq
    /// processing that ran in no bench process's context counts here).
    pub others_cores: f64,
    /// Taken by the hypervisor.
    pub steal_cores: f64,
}

/// Waits until the machine has been nearly idle (under `cores` busy) for
/// half a second, at most `patience`; returns how long it waited. Call it
/// while the bench itself is idle: then all busy time is other work.
pub fn wait_quiet(cores: f64, patience: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let a = cpu_times();
        std::thread::sleep(Duration::from_millis(500));
        let b = cpu_times();
        let busy = b.busy.saturating_sub(a.busy) as f64 / clk_tck() / 0.5;
        if busy < cores || start.elapsed() >= patience {
            return start.elapsed();
        }
    }
}

/// A measurement window: open before, close after.
pub struct Window {
    start: std::time::Instant,
    machine: CpuTimes,
    pids: Vec<i32>,
    world_cpu: f64,
    own_cpu: f64,
}

impl Window {
    /// `world_pids`: the processes of the world at the start (those started
    /// during the window and waited for count through `getrusage`).
    pub fn open(world_pids: Vec<i32>) -> Window {
        Window {
            start: std::time::Instant::now(),
            machine: cpu_times(),
            world_cpu: cpu_seconds(&world_pids),
            pids: world_pids,
            own_cpu: own_and_children_cpu(),
        }
    }

    pub fn close(self) -> CpuUse {
        let secs = self.start.elapsed().as_secs_f64().max(1e-6);
        let m = cpu_times();
        let tck = clk_tck();
        let busy = m.busy.saturating_sub(self.machine.busy) as f64 / tck;
        let steal = m.steal.saturating_sub(self.machine.steal) as f64 / tck;
        let bench =
            (cpu_seconds(&self.pids) - self.world_cpu) + (own_and_children_cpu() - self.own_cpu);
        CpuUse {
            busy_cores: busy / secs,
            bench_cores: bench / secs,
            others_cores: ((busy - bench) / secs).max(0.0),
            steal_cores: steal / secs,
        }
    }
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    match Command::new(prog).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).trim_end().to_string();
            let e = String::from_utf8_lossy(&o.stderr);
            if s.is_empty() {
                s = e.trim_end().to_string();
            }
            s
        }
        Err(e) => format!("({prog}: {e})"),
    }
}

/// What the report says about the machine and the software measured.
#[derive(Serialize, Clone)]
pub struct Machine {
    pub nproc: String,
    pub free: String,
    pub uname: String,
    pub lscpu: String,
    pub uptime: String,
    pub versions: BTreeMap<String, String>,
}

pub fn machine(agent_version: String) -> Machine {
    let first = |s: String| s.lines().next().unwrap_or_default().to_string();
    let mut versions = BTreeMap::new();
    versions.insert("waymark".into(), agent_version);
    versions.insert("haproxy".into(), first(cmd_out("haproxy", &["-v"])));
    versions.insert("nginx".into(), first(cmd_out("nginx", &["-v"])));
    versions.insert("wrk".into(), first(cmd_out("wrk", &["--version"])));
    versions.insert("iperf3".into(), first(cmd_out("iperf3", &["--version"])));
    versions.insert("kernel".into(), cmd_out("uname", &["-r"]));
    Machine {
        nproc: cmd_out("nproc", &[]),
        free: cmd_out("free", &["-h"]),
        uname: cmd_out("uname", &["-a"]),
        lscpu: cmd_out("lscpu", &[]),
        uptime: cmd_out("uptime", &[]),
        versions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_field_is_its_first_number() {
        let status = "Name:\tnginx\nVmRSS:\t   5120 kB\n\
                      voluntary_ctxt_switches:\t41\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_field(status, "VmRSS"), Some(5120));
        assert_eq!(status_field(status, "voluntary_ctxt_switches"), Some(41));
        assert_eq!(status_field(status, "nonvoluntary_ctxt_switches"), Some(7));
        assert_eq!(status_field(status, "VmHWM"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        assert!(stat(me).is_some());
        assert!(rss_kib(&[me]) > 0);
        assert!(hwm_kib(&[me]) >= rss_kib(&[me]) / 2);
        assert!(sleeps(&[me]) > 0);
        assert!(cpu_seconds(&[me]) >= 0.0);
        assert!(with_descendants(&[me]).contains(&me));
        assert!(loadavg()[0] >= 0.0);
        let w = Window::open(vec![me]);
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let u = w.close();
        assert!(u.busy_cores >= 0.0 && u.others_cores >= 0.0 && u.bench_cores >= 0.0);
    }
}
