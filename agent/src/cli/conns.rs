//! `waymark conns`: the connections the agent carries now (its `GET
//! /conns`), one row each, oldest first:
//!
//! ```text
//! DIR   POD            SRC              DST               SERVICE   ENDPOINT        PROTO    PATH     AGE   OUT     IN      REQS   KERNEL
//! out   default/n0p0   10.1.0.2:54986   10.96.0.70:5432   db        10.2.0.2:7000   opaque   tunnel   0s    1000B   1000B   0      0
//! out   default/n0p0   10.1.0.2:55002   10.96.0.71:80     web       10.1.0.3:8080   http1    direct   0s    204B    351B    3      0
//! ```
//!
//! Filters (`--pod`, `--src`, `--dst`, `--proto`, `--service`,
//! `--direction`) are checked here, with the agent's own parser, before
//! anything is sent.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::client::{AdminClient, block_on};
use super::table::{NONE, render};
use crate::http::query;
use crate::telemetry::conns::{ConnFilter, ConnRow, ConnsReport};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnsOutput {
    /// Aligned columns.
    #[default]
    Table,
    /// The columns, the route's backend, the peer identity, the idle time
    /// and the kernel's counters per TCP connection.
    Wide,
    /// The agent's report as it is, for scripts.
    Json,
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConnsArgs {
    /// The pod on this node the connection belongs to (the client
    /// outbound, the destination inbound): `namespace/name`, or
    /// `namespace/workload` for the pods named `workload-…`.
    #[arg(long)]
    pub pod: Option<String>,
    /// The client: `IP`, `IP:PORT`, `[IPv6]:PORT`, a network
    /// (`10.1.0.0/16`) or a port (`:40112`).
    #[arg(long)]
    pub src: Option<String>,
    /// The original destination or the endpoint it went to, in the same
    /// forms as `--src`.
    #[arg(long)]
    pub dst: Option<String>,
    /// `opaque`, `tls`, `http1`, `h2`, `grpc`, `http` (any HTTP) or
    /// `detecting`.
    #[arg(long)]
    pub proto: Option<String>,
    /// The service dialled, or a route's backend.
    #[arg(long)]
    pub service: Option<String>,
    /// `in` (through the tunnel to a pod of this node) or `out` (from one).
    #[arg(long)]
    pub direction: Option<String>,
    /// `table`, `wide` or `json`.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: ConnsOutput,
}

impl ConnsArgs {
    fn pairs(&self) -> Vec<(&'static str, &str)> {
        [
            ("pod", &self.pod),
            ("src", &self.src),
            ("dst", &self.dst),
            ("proto", &self.proto),
            ("service", &self.service),
            ("direction", &self.direction),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    /// `/conns?…`, once the filters parse.
    pub fn path(&self) -> Result<String> {
        let pairs = self.pairs();
        ConnFilter::from_pairs(pairs.iter().copied())?;
        let query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", query::encode(v)))
            .collect();
        Ok(match query.is_empty() {
            true => "/conns".to_string(),
            false => format!("/conns?{}", query.join("&")),
        })
    }
}

pub fn run(client: &AdminClient, args: ConnsArgs) -> Result<()> {
    let path = args.path()?;
    let report: ConnsReport = block_on(client.get_json(&path))?;
    match args.output {
        ConnsOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        o => print!("{}", table(&report, o == ConnsOutput::Wide)),
    }
    Ok(())
}

fn or_dash<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| NONE.to_string(), T::to_string)
}

/// `512B`, `1.2KiB`, `48KiB`, `3.1MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match v < 10.0 {
        true => format!("{v:.1}{}", UNITS[unit]),
        false => format!("{v:.0}{}", UNITS[unit]),
    }
}

/// `2m5s`, `31s`, `0s`: whole seconds are enough for an age.
fn age(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000))
        .to_string()
        .replace(' ', "")
}

/// The kernel's counters summed over the connection's legs: what is not
/// zero (`drops=1 retx=2 rst_in=1`), `0` when all are, `-` without them.
fn kernel_summary(c: &ConnRow) -> String {
    let Some(flows) = &c.kernel else {
        return NONE.to_string();
    };
    let sum = |f: fn(&crate::telemetry::conns::KernelFlowRow) -> u64| -> u64 {
        flows.iter().map(f).sum()
    };
    let parts: Vec<String> = [
        ("drops", sum(|f| f.drops)),
        ("retx", sum(|f| f.retransmits)),
        ("rst_out", sum(|f| f.resets_sent)),
        ("rst_in", sum(|f| f.resets_received)),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k}={n}"))
    .collect();
    match parts.is_empty() {
        true => "0".to_string(),
        false => parts.join(" "),
    }
}

pub fn table(report: &ConnsReport, wide: bool) -> String {
    let rows: Vec<Vec<String>> = report
        .connections
        .iter()
        .map(|c| {
            let mut row = vec![
                c.direction.clone(),
                or_dash(&c.pod),
                or_dash(&c.src),
                c.dst.to_string(),
                or_dash(&c.service),
                or_dash(&c.endpoint),
                c.protocol.clone(),
                if c.tunnel { "tunnel" } else { "direct" }.to_string(),
                age(c.age_ms),
                bytes(c.bytes_out),
                bytes(c.bytes_in),
                c.requests.to_string(),
            ];
            if wide {
                row.extend([
                    or_dash(&c.backend),
                    or_dash(&c.peer_identity),
                    age(c.idle_ms),
                ]);
            }
            row.push(kernel_summary(c));
            row
        })
        .collect();
    let mut headers = vec![
        "DIR", "POD", "SRC", "DST", "SERVICE", "ENDPOINT", "PROTO", "PATH", "AGE", "OUT", "IN",
        "REQS",
    ];
    if wide {
        headers.extend(["BACKEND", "PEER_IDENTITY", "IDLE"]);
    }
    headers.push("KERNEL");
    let mut out = render(&headers, &rows);
    if wide {
        for c in &report.connections {
            for f in c.kernel.iter().flatten() {
                let _ = writeln!(
                    out,
                    "  conn {} {} {}->{}: drops={} retransmits={} resets_sent={} resets_received={}",
                    c.id,
                    f.leg,
                    f.local,
                    f.peer,
                    f.drops,
                    f.retransmits,
                    f.resets_sent,
                    f.resets_received
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "{} of {} open connections",
        report.connections.len(),
        report.open
    );
    if let Some(l) = report.limits {
        let bound = |n: usize| {
            if n == 0 {
                "no limit".to_string()
            } else {
                n.to_string()
            }
        };
        let _ = writeln!(
            out,
            "outbound limits: {} per pod (outbound.max_connections_per_pod), {} in all (outbound.max_connections)",
            bound(l.per_pod),
            bound(l.total)
        );
    }
    // Only pods with sockets: the kernel's count is what its refusals at
    // connect() go by, and it may exceed the rows above (sockets not
    // accepted yet, or closed by the agent and not yet by the pod).
    for (pod, n) in report.pod_sockets.iter().flatten().filter(|(_, n)| **n > 0) {
        let _ = writeln!(
            out,
            "kernel: pod {pod} has {n} sockets redirected to the agent"
        );
    }
    if !report.kernel_counters {
        out.push_str(
            "kernel counters: not available (the kernel diagnostics do not run on this agent; see `waymark drops`)\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filters_fail_before_anything_is_sent() {
        let args = ConnsArgs {
            dst: Some("10.2.0.300:80".into()),
            ..Default::default()
        };
        let e = args.path().unwrap_err().to_string();
        assert!(
            e.starts_with("conns filter dst=\"10.2.0.300:80\": give an address"),
            "{e}"
        );
        let args = ConnsArgs {
            pod: Some("default/web".into()),
            dst: Some("[fd00::5]:8080".into()),
            proto: Some("http".into()),
            ..Default::default()
        };
        assert_eq!(
            args.path().unwrap(),
            "/conns?pod=default/web&dst=%5Bfd00::5%5D:8080&proto=http"
        );
        assert_eq!(ConnsArgs::default().path().unwrap(), "/conns");
    }

    #[test]
    fn the_limits_in_force_follow_the_count() {
        let report = ConnsReport {
            open: 3,
            kernel_counters: true,
            limits: Some(crate::telemetry::conns::OutboundLimits {
                per_pod: 4_744,
                total: 0,
            }),
            pod_sockets: Some([("default/a".to_string(), 5), ("default/b".to_string(), 0)].into()),
            connections: Vec::new(),
        };
        let out = table(&report, false);
        assert!(
            out.contains("kernel: pod default/a has 5 sockets redirected to the agent\n")
                && !out.contains("default/b"),
            "{out}"
        );
        assert!(
            out.contains("0 of 3 open connections\noutbound limits: 4744 per pod (outbound.max_connections_per_pod), no limit in all (outbound.max_connections)\n"),
            "{out}"
        );
        let older = ConnsReport {
            limits: None,
            ..report
        };
        assert!(!table(&older, false).contains("outbound limits"));
    }

    #[test]
    fn sizes_and_ages_read_at_a_glance() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1250), "1.2KiB");
        assert_eq!(bytes(49_152), "48KiB");
        assert_eq!(bytes(3_250_000), "3.1MiB");
        assert_eq!(age(125_400), "2m5s");
        assert_eq!(age(400), "0s");
    }
}
