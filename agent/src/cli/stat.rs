//! `waymark stat`, `waymark routes` and `waymark edges`: the agent's
//! sliding-window golden metrics (success rate, requests per second,
//! latency percentiles, TCP connections, retries) as aligned tables, or as
//! the agent's JSON with `-o json`. `stat` also shows how many of a row's
//! pods are meshed (see `admin::meshed`).

use anyhow::{Result, bail};

use super::Output;
use super::client::{AdminClient, block_on};
use super::table::{ms, percent, render, rps};
#[cfg(test)]
use crate::diagnostics::stats_view::{BackendRow, RouteRow};
use crate::diagnostics::stats_view::{EdgesReport, Golden, RoutesReport, StatReport};
use crate::http::query;

/// What `stat` groups by.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Destination services, over every source pod.
    #[value(alias = "svc", alias = "services")]
    Service,
    /// Source pods, over every destination (or the one `--to` names).
    #[value(alias = "po", alias = "pods")]
    Pod,
}

/// What MESHED counts, for `waymark stat --help`.
const MESHED_HELP: &str = "MESHED is meshed/total pods, as in Linkerd. A pod row is 1/1 when the agent's programs are all attached to redirect.cgroup and the pod's listener is bound in its namespace (the kernel's word, asked now), else 0/1. A service row counts its endpoints: one on this node counts as its pod does, one on another node counts when that node is in [[nodes]] with mTLS on (an agent there terminates the tunnel), and an address that is no pod does not count. `-` is a row in no config.";

#[derive(clap::Args, Clone, Debug)]
#[command(after_help = MESHED_HELP)]
pub struct StatArgs {
    /// Group by `service` (svc) or `pod` (po).
    #[arg(value_enum, default_value = "service")]
    pub kind: Kind,
    /// Only this service or pod (`namespace/name`).
    pub name: Option<String>,
    /// Only traffic to this service.
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub common: WindowArgs,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RoutesArgs {
    /// The service whose routes to show (the one pods dial).
    pub service: String,
    #[command(flatten)]
    pub common: WindowArgs,
}

#[derive(clap::Args, Clone, Debug)]
pub struct WindowArgs {
    /// How far back to look: 10s to 10m, in 10 s steps (the current,
    /// partial step is always included).
    #[arg(long, short = 'w', default_value = "1m")]
    pub window: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

fn window_query(w: &WindowArgs) -> String {
    format!("window={}", query::encode(&w.window))
}

/// The columns every table shares, after its name columns.
const GOLDEN: [&str; 5] = [
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
];

fn golden_cells(g: &Golden) -> Vec<String> {
    vec![
        percent(g.success_rate),
        rps(g.requests, g.rps),
        ms(g.latency_ms_p50),
        ms(g.latency_ms_p95),
        ms(g.latency_ms_p99),
    ]
}

fn headers<'a>(names: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    names.iter().chain(&GOLDEN).chain(extra).copied().collect()
}

/// Retries as a share of requests: how much load retrying adds.
fn retries(g: &Golden) -> String {
    percent((g.requests > 0).then(|| g.retries as f64 / g.requests as f64))
}

/// The routes' requests by backend, for the routes that send elsewhere
/// than the service itself (a split, a canary): share, success, latency,
/// and backends without endpoints marked. Empty when there are none.
fn backends_table(report: &RoutesReport) -> String {
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .filter(|r| r.backends.iter().any(|b| b.backend != r.service))
        .flat_map(|r| {
            r.backends.iter().map(|b| {
                let mut row = vec![
                    r.route.clone(),
                    b.backend.clone(),
                    b.weight.map_or("-".to_string(), |w| w.to_string()),
                    percent(b.share),
                ];
                row.extend(golden_cells(&b.golden));
                row.push(if b.no_endpoints { "none" } else { "yes" }.to_string());
                row
            })
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let h = headers(&["ROUTE", "BACKEND", "WEIGHT", "SHARE"], &["ENDPOINTS"]);
    format!("\n{}", render(&h, &rows))
}

/// RETRY_BUDGET: `exhausted:N` when the retry budget refused N requests a
/// retry in the window, else `-`.
fn budget(g: &Golden) -> String {
    match g.budget_exhausted {
        0 => "-".to_string(),
        n => format!("exhausted:{n}"),
    }
}

/// The line under a table for each row whose retry budget ran out: the
/// retry percentage alone cannot tell "no retries wanted" from "retries
/// refused".
fn budget_notes<'a>(rows: impl Iterator<Item = (String, &'a Golden)>) -> String {
    let mut out = String::new();
    for (what, g) in rows.filter(|(_, g)| g.budget_exhausted > 0) {
        out.push_str(&format!(
            "retry budget exhausted for {what}: {} of {} requests were not retried (the service's retry_budget allows no more now)\n",
            g.budget_exhausted, g.requests
        ));
    }
    out
}

pub fn stat(client: &AdminClient, args: StatArgs) -> Result<()> {
    let by = match args.kind {
        Kind::Service => "service",
        Kind::Pod => "pod",
    };
    let mut path = format!("/stat?by={by}&{}", window_query(&args.common));
    if let Some(to) = &args.to {
        path.push_str(&format!("&to={}", query::encode(to)));
    }
    let mut report: StatReport = block_on(client.get_json(&path))?;
    if let Some(name) = &args.name {
        report.rows.retain(|r| &r.name == name);
        if report.rows.is_empty() {
            bail!("no {by} {name:?} on this agent");
        }
    }
    match args.common.output {
        Output::Json => print_json(&report),
        Output::Table => {
            let rows: Vec<Vec<String>> = report
                .rows
                .iter()
                .map(|r| {
                    let mut row = vec![r.name.clone(), r.meshed.clone().unwrap_or("-".into())];
                    row.extend(golden_cells(&r.golden));
                    row.push(r.golden.tcp_open.to_string());
                    row.push(retries(&r.golden));
                    row.push(budget(&r.golden));
                    row
                })
                .collect();
            let h = headers(
                &["NAME", "MESHED"],
                &["TCP_CONN", "RETRIES", "RETRY_BUDGET"],
            );
            print!("{}", render(&h, &rows));
            print!(
                "{}",
                budget_notes(
                    report
                        .rows
                        .iter()
                        .map(|r| (format!("{by} {}", r.name), &r.golden))
                )
            );
            Ok(())
        }
    }
}

pub fn routes(client: &AdminClient, args: RoutesArgs) -> Result<()> {
    let path = format!(
        "/routes?service={}&{}",
        query::encode(&args.service),
        window_query(&args.common)
    );
    let report: RoutesReport = block_on(client.get_json(&path))?;
    match args.common.output {
        Output::Json => print_json(&report),
        Output::Table => {
            let rows: Vec<Vec<String>> = report
                .rows
                .iter()
                .map(|r| {
                    let mut row = vec![r.route.clone(), r.service.clone()];
                    row.extend(golden_cells(&r.golden));
                    row.push(retries(&r.golden));
                    row.push(budget(&r.golden));
                    row
                })
                .collect();
            let h = headers(&["ROUTE", "SERVICE"], &["RETRIES", "RETRY_BUDGET"]);
            print!("{}", render(&h, &rows));
            print!("{}", backends_table(&report));
            print!(
                "{}",
                budget_notes(report.rows.iter().map(|r| (
                    format!("route {} of service {}", r.route, r.service),
                    &r.golden
                )))
            );
            Ok(())
        }
    }
}

pub fn edges(client: &AdminClient, args: WindowArgs) -> Result<()> {
    let path = format!("/edges?{}", window_query(&args));
    let report: EdgesReport = block_on(client.get_json(&path))?;
    match args.output {
        Output::Json => print_json(&report),
        Output::Table => {
            let rows: Vec<Vec<String>> = report
                .rows
                .iter()
                .map(|r| {
                    vec![
                        r.src.clone(),
                        r.dst.clone(),
                        r.src_id.clone().unwrap_or("-".into()),
                        r.dst_id.clone().unwrap_or("-".into()),
                        r.tls.clone(),
                        percent(r.golden.success_rate),
                        rps(r.golden.requests, r.golden.rps),
                        r.golden.tcp_open.to_string(),
                    ]
                })
                .collect();
            let h = [
                "SRC", "DST", "SRC_ID", "DST_ID", "TLS", "SUCCESS", "RPS", "TCP_CONN",
            ];
            print!("{}", render(&h, &rows));
            Ok(())
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_retry_budget_is_shown_and_explained() {
        let quiet = Golden {
            requests: 10,
            retries: 2,
            ..Golden::default()
        };
        let refused = Golden {
            requests: 10,
            budget_exhausted: 7,
            ..Golden::default()
        };
        assert_eq!(budget(&quiet), "-");
        assert_eq!(budget(&refused), "exhausted:7");
        assert_eq!(
            budget_notes(
                [
                    ("route a of service web".to_string(), &quiet),
                    ("route fail of service web".to_string(), &refused),
                ]
                .into_iter()
            ),
            "retry budget exhausted for route fail of service web: 7 of 10 requests were not retried (the service's retry_budget allows no more now)\n"
        );
        // An agent from before the count: absent reads as none.
        let old: Golden = serde_json::from_str(
            r#"{"requests":1,"successes":1,"failures":0,"success_rate":1.0,"rps":0.1,"latency_ms_p50":null,"latency_ms_p95":null,"latency_ms_p99":null,"retries":0,"retried_requests":0,"tcp_open":0,"tcp_opened":0}"#,
        )
        .unwrap();
        assert_eq!(budget(&old), "-");
    }

    #[test]
    fn a_split_is_broken_down_by_backend_with_the_empty_one_marked() {
        let backend = |name: &str, weight, share, rate, no_endpoints| BackendRow {
            backend: name.to_string(),
            weight: Some(weight),
            share: Some(share),
            no_endpoints,
            golden: Golden {
                requests: 10,
                success_rate: Some(rate),
                ..Golden::default()
            },
        };
        let route = |name: &str, backends| RouteRow {
            route: name.to_string(),
            service: "shop".to_string(),
            golden: Golden::default(),
            backends,
        };
        let mut report = RoutesReport {
            service: "shop".into(),
            window: "1m".into(),
            window_seconds: 60.0,
            rows: vec![route(
                "[DEFAULT]",
                vec![backend("shop", 1, 1.0, 1.0, false)],
            )],
        };
        // A route to the service itself has nothing to break down.
        assert_eq!(backends_table(&report), "");
        report.rows.push(route(
            "split",
            vec![
                backend("shop-v1", 90, 0.9, 1.0, false),
                backend("shop-v2", 10, 0.1, 0.0, true),
            ],
        ));
        let t = backends_table(&report);
        let lines: Vec<Vec<&str>> = t
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "ROUTE",
                "BACKEND",
                "WEIGHT",
                "SHARE",
                "SUCCESS",
                "RPS",
                "LATENCY_P50",
                "LATENCY_P95",
                "LATENCY_P99",
                "ENDPOINTS"
            ]
        );
        assert_eq!(
            lines[1][..5],
            ["split", "shop-v1", "90", "90.00%", "100.00%"]
        );
        assert_eq!(lines[2][..5], ["split", "shop-v2", "10", "10.00%", "0.00%"]);
        assert_eq!(lines[2].last(), Some(&"none"));
        assert_eq!(lines.len(), 3, "{t}");
    }
}
