//! `waymark top`: the busiest request paths right now, like `linkerd viz
//! top`, aggregated in the CLI from the agent's tap stream (same filters as
//! `waymark tap`) by source, destination, method and path:
//!
//! ```text
//! Source         Destination      Method   Path   Count   Best     Worst   Last     Success Rate   Failures
//! default/n0p0   default/n1p0     GET      /a     30      0.61ms   2.1ms   0.74ms   100.00%        -
//! default/n0p0   default/n1p0     GET      /b     10      0.58ms   1.3ms   0.66ms   0.00%          app=10
//! ```
//!
//! Source: the source pod (outbound), or the peer's verified identity as
//! `<namespace>/<service account>` (inbound), else the client's IP.
//! Destination: the destination pod when the agent knows it by name
//! (inbound), else the endpoint's address. Path: without the query.
//! Latencies are the response head's (`rsp`); a request counts when it
//! ends, as a success unless its status is 5xx, its gRPC status is not OK,
//! or it ended with an error. Failures are also counted by where their
//! status came from (the Failures column): `app` (the application
//! answered so), `proxy:<reason>` (an agent answered instead: `timeout`,
//! `no_endpoints`, `connect_failure`, `limit`, …), or `error` (no status:
//! the request was cancelled, or its body broke off). Opaque TCP
//! connections have no method or path and are left out, except those the
//! proxy refused or failed (a connection limit, no endpoints, a failed
//! connect): each is one failure of a `TCP` row, path `-`, by its reason.
//!
//! On a terminal the table is redrawn every second until Ctrl-C (then the
//! final table stays); with `--duration`, or when stdout is no terminal
//! (for [`DEFAULT_DURATION`] then), it prints the final table once.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::BodyExt;
use serde::Serialize;

use super::Output;
use super::client::{AdminClient, block_on};
use super::table;
use super::tap::{Lines, TapFilterArgs, open};
use crate::diagnostics::tap::event::{Event, Meta};
use crate::identity::SpiffeId;

/// How long `top` runs when stdout is no terminal and no `--duration` is
/// given (nobody would see a redraw, nor press Ctrl-C).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Requests seen but not ended yet that `top` keeps track of; beyond it
/// the oldest are forgotten (their `end` was dropped, or never comes).
const MAX_PENDING: usize = 10_000;
/// Rows shown in the table (all are in the JSON).
const MAX_ROWS: usize = 50;

#[derive(clap::Args, Clone, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    filter: TapFilterArgs,
    /// Run this long, then print the table once (`30s`). Without it a
    /// terminal gets a table redrawn every second until Ctrl-C; anything
    /// else gets the table after 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// What a row aggregates.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Key {
    /// `in` or `out`.
    pub direction: String,
    pub source: String,
    pub destination: String,
    pub method: String,
    pub path: String,
}

/// One row of the table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub count: u64,
    pub successes: u64,
    pub failures: u64,
    /// Response head latencies, µs (absent when no response head came).
    pub best_us: Option<u64>,
    pub worst_us: Option<u64>,
    pub last_us: Option<u64>,
    /// Failures by where their status came from: `app`,
    /// `proxy:<reason>`, or `error`.
    pub failure_sources: BTreeMap<String, u64>,
}

impl Row {
    pub fn success_rate(&self) -> Option<f64> {
        (self.count > 0).then(|| self.successes as f64 / self.count as f64)
    }

    /// `app=3,proxy:no_endpoints=1`, or `-` without failures.
    pub fn failures_by_source(&self) -> String {
        if self.failure_sources.is_empty() {
            return "-".to_string();
        }
        self.failure_sources
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `app`, or `proxy:<reason>`, from an event's `source` and `reason`.
fn source_key(source: Option<&str>, reason: Option<&str>) -> Option<String> {
    match (source?, reason) {
        ("proxy", Some(r)) => Some(format!("proxy:{r}")),
        (s, _) => Some(s.to_string()),
    }
}

/// A request seen (`req`) and not ended yet.
struct Pending {
    key: Key,
    status: Option<u16>,
    latency_us: Option<u64>,
    /// Where the status came from (`rsp`'s `source`).
    source: Option<String>,
}

/// The aggregate of a tap stream.
#[derive(Default)]
pub struct Top {
    rows: HashMap<Key, Row>,
    pending: BTreeMap<u64, Pending>,
    /// Events the agent dropped because this consumer fell behind.
    pub dropped: u64,
}

impl Top {
    /// Takes one event of the stream.
    pub fn observe(&mut self, event: Event) {
        match event {
            Event::Req {
                meta, method, path, ..
            } => {
                let key = Key {
                    direction: meta.proxy.clone(),
                    source: source(&meta),
                    destination: destination(&meta),
                    method,
                    path: path.split('?').next().unwrap_or_default().to_string(),
                };
                self.pending.insert(
                    meta.id,
                    Pending {
                        key,
                        status: None,
                        latency_us: None,
                        source: None,
                    },
                );
                while self.pending.len() > MAX_PENDING {
                    self.pending.pop_first();
                }
            }
            Event::Rsp {
                meta,
                status,
                latency_us,
                source,
                reason,
                ..
            } => {
                if let Some(p) = self.pending.get_mut(&meta.id) {
                    p.status = Some(status);
                    p.latency_us = Some(latency_us);
                    p.source = source_key(source.as_deref(), reason.as_deref());
                }
            }
            Event::End {
                meta,
                grpc_status,
                error,
                source,
                reason,
                ..
            } => {
                let Some(p) = self.pending.remove(&meta.id) else {
                    return;
                };
                let success = p.status.is_some_and(|s| s < 500)
                    && grpc_status.is_none_or(|g| g == 0)
                    && error.is_none();
                let row = self.rows.entry(p.key).or_default();
                row.count += 1;
                if success {
                    row.successes += 1;
                } else {
                    row.failures += 1;
                    // A failing status names its source; a request that
                    // failed otherwise (cancelled, its body broke off) has
                    // no status to attribute.
                    let status_failed =
                        p.status.is_some_and(|s| s >= 500) || grpc_status.is_some_and(|g| g != 0);
                    let from = source_key(source.as_deref(), reason.as_deref())
                        .or(p.source)
                        .filter(|_| status_failed)
                        .unwrap_or_else(|| "error".to_string());
                    *row.failure_sources.entry(from).or_default() += 1;
                }
                if let Some(l) = p.latency_us {
                    row.best_us = Some(row.best_us.map_or(l, |b| b.min(l)));
                    row.worst_us = Some(row.worst_us.map_or(l, |w| w.max(l)));
                    row.last_us = Some(l);
                }
            }
            Event::Dropped { count } => self.dropped += count,
            Event::Tcp {
                meta,
                source,
                reason,
                ..
            } => {
                // A connection the proxy ended is the failure an operator
                // looks for; the others have no method or path to rank.
                let Some(from) = source_key(source.as_deref(), reason.as_deref())
                    .filter(|_| source.as_deref() == Some("proxy"))
                else {
                    return;
                };
                let key = Key {
                    direction: meta.proxy.clone(),
                    source: self::source(&meta),
                    destination: destination(&meta),
                    method: "TCP".to_string(),
                    path: "-".to_string(),
                };
                let row = self.rows.entry(key).or_default();
                row.count += 1;
                row.failures += 1;
                *row.failure_sources.entry(from).or_default() += 1;
            }
        }
    }

    /// Rows by count, most first (then by key, so the order is stable).
    pub fn rows(&self) -> Vec<(&Key, &Row)> {
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        rows
    }

    pub fn table(&self) -> String {
        let us = |v: Option<u64>| table::ms(v.map(|v| v as f64 / 1000.0));
        let rows = self.rows();
        let shown: Vec<Vec<String>> = rows
            .iter()
            .take(MAX_ROWS)
            .map(|(k, r)| {
                vec![
                    k.source.clone(),
                    k.destination.clone(),
                    k.method.clone(),
                    k.path.clone(),
                    r.count.to_string(),
                    us(r.best_us),
                    us(r.worst_us),
                    us(r.last_us),
                    table::percent(r.success_rate()),
                    r.failures_by_source(),
                ]
            })
            .collect();
        let mut out = table::render(
            &[
                "Source",
                "Destination",
                "Method",
                "Path",
                "Count",
                "Best",
                "Worst",
                "Last",
                "Success Rate",
                "Failures",
            ],
            &shown,
        );
        if rows.len() > MAX_ROWS {
            out.push_str(&format!(
                "({} more rows; -o json has them all)\n",
                rows.len() - MAX_ROWS
            ));
        }
        if self.dropped > 0 {
            out.push_str(&format!(
                "(the agent dropped {} events this consumer could not take: counts are low)\n",
                self.dropped
            ));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows()
            .into_iter()
            .map(|(k, r)| {
                let mut v = serde_json::to_value(k).unwrap_or_default();
                if let (Some(o), serde_json::Value::Object(row)) = (
                    v.as_object_mut(),
                    serde_json::to_value(r).unwrap_or_default(),
                ) {
                    o.extend(row);
                    o.insert("success_rate".into(), serde_json::json!(r.success_rate()));
                }
                v
            })
            .collect();
        serde_json::json!({ "rows": rows, "dropped_events": self.dropped })
    }
}

/// The source pod, else the peer identity's `<namespace>/<service
/// account>`, else the client's IP.
fn source(m: &Meta) -> String {
    if let Some(p) = &m.src.pod {
        return p.clone();
    }
    if let Some(id) = &m.src.identity {
        return match id.parse::<SpiffeId>() {
            Ok(id) => format!("{}/{}", id.namespace(), id.service_account()),
            Err(_) => id.clone(),
        };
    }
    m.src.addr.ip().to_string()
}

/// The destination pod, else the endpoint's address.
fn destination(m: &Meta) -> String {
    m.dst.pod.clone().unwrap_or_else(|| m.dst.addr.to_string())
}

pub fn run(client: &AdminClient, args: TopArgs) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let duration = args.duration.or((!tty).then_some(DEFAULT_DURATION));
    let live = duration.is_none() && args.output == Output::Table;
    let query = args.filter.query(None, duration)?;
    let top = block_on(async {
        let mut body = open(client, &query).await?;
        let mut top = Top::default();
        let mut lines = Lines::default();
        let mut redraw = tokio::time::interval(Duration::from_secs(1));
        redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let Some(frame) = frame else { break };
                    let frame = frame.context("the tap stream broke off")?;
                    let Ok(data) = frame.into_data() else { continue };
                    lines.push(&data);
                    while let Some(line) = lines.next_line() {
                        // A newer agent's event this CLI does not know: skip it.
                        if let Ok(ev) = serde_json::from_slice::<Event>(&line) {
                            top.observe(ev);
                        }
                    }
                }
                _ = redraw.tick(), if live => {
                    let mut out = std::io::stdout().lock();
                    // Clear the screen, cursor home.
                    if write!(out, "\x1b[2J\x1b[H{}", top.table()).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
                _ = &mut ctrl_c => break,
            }
        }
        anyhow::Ok(top)
    })?;
    if live {
        // The last redraw is on screen; add what came since.
        print!("\x1b[2J\x1b[H");
    }
    match args.output {
        Output::Table => print!("{}", top.table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&top.json())?),
    }
    if top.rows.is_empty() {
        eprintln!(
            "waymark top: no request matched{} (is traffic flowing through this node's agent? `waymark tap` shows what it sees)",
            duration.map_or(String::new(), |d| format!(
                " in {}",
                humantime::format_duration(d)
            ))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::tap::event::{Dst, Src};

    fn meta(id: u64, inbound: bool) -> Meta {
        Meta {
            id,
            proxy: if inbound { "in" } else { "out" }.into(),
            src: Src {
                addr: "10.1.0.2:40000".parse().unwrap(),
                pod: (!inbound).then(|| "default/n0p0".to_string()),
                identity: inbound.then(|| "spiffe://cluster.local/ns/default/sa/n0p0".to_string()),
            },
            dst: Dst {
                addr: "10.2.0.2:8080".parse().unwrap(),
                dialled: "10.96.0.1:80".parse().unwrap(),
                service: Some("web".into()),
                backend: None,
                pod: inbound.then(|| "default/n1p0".to_string()),
            },
            tls: "true".into(),
        }
    }

    /// Opaque connections are left out, but one the proxy refused at a
    /// limit is a failure of a `TCP` row, by its reason.
    #[test]
    fn connections_the_proxy_refused_are_failures() {
        let mut top = Top::default();
        let tcp = |id, source: Option<&str>, reason: Option<&str>, close: &str| Event::Tcp {
            meta: meta(id, false),
            bytes_out: 0,
            bytes_in: 0,
            duration_us: 0,
            close: close.into(),
            error: None,
            source: source.map(Into::into),
            reason: reason.map(Into::into),
        };
        top.observe(tcp(1, None, None, "eof"));
        assert!(top.rows().is_empty());
        top.observe(tcp(2, Some("proxy"), Some("limit"), "refused"));
        top.observe(tcp(3, Some("proxy"), Some("limit"), "refused"));
        let rows = top.rows();
        assert_eq!(rows.len(), 1);
        let (k, r) = rows[0];
        assert_eq!((k.method.as_str(), k.path.as_str()), ("TCP", "-"));
        assert_eq!((r.count, r.failures), (2, 2));
        assert_eq!(r.failures_by_source(), "proxy:limit=2");
    }

    /// One request's three events.
    fn request(top: &mut Top, id: u64, inbound: bool, path: &str, status: u16, latency_us: u64) {
        let m = meta(id, inbound);
        top.observe(Event::Req {
            meta: m.clone(),
            method: "GET".into(),
            authority: None,
            path: path.into(),
            headers: vec![],
            headers_omitted: 0,
        });
        // 503s here are the proxy's (no endpoints), other statuses the app's.
        let (source, reason) = match status {
            503 => ("proxy", Some("no_endpoints".to_string())),
            _ => ("app", None),
        };
        top.observe(Event::Rsp {
            meta: m.clone(),
            status,
            latency_us,
            source: Some(source.into()),
            reason: reason.clone(),
            retries: 0,
            retry_budget_exhausted: false,
        });
        top.observe(Event::End {
            meta: m,
            grpc_status: None,
            duration_us: latency_us + 10,
            response_bytes: 2,
            error: None,
            kernel: None,
            source: Some(source.into()),
            reason,
        });
    }

    #[test]
    fn requests_aggregate_by_source_destination_method_and_path() {
        let mut top = Top::default();
        for (i, l) in [700, 300, 900, 500].into_iter().enumerate() {
            request(&mut top, i as u64, true, &format!("/a?i={i}"), 200, l);
        }
        request(&mut top, 10, true, "/b", 500, 100);
        request(&mut top, 11, true, "/b", 503, 200);
        request(&mut top, 12, false, "/b", 200, 50);
        let rows = top.rows();
        assert_eq!(rows.len(), 3);
        let (k, r) = rows[0];
        assert_eq!(
            (
                k.source.as_str(),
                k.destination.as_str(),
                k.method.as_str(),
                k.path.as_str()
            ),
            ("default/n0p0", "default/n1p0", "GET", "/a")
        );
        assert_eq!(k.direction, "in");
        assert_eq!(
            (
                r.count,
                r.successes,
                r.failures,
                r.best_us,
                r.worst_us,
                r.last_us
            ),
            (4, 4, 0, Some(300), Some(900), Some(500))
        );
        assert_eq!(r.success_rate(), Some(1.0));
        let (k, r) = rows[1];
        assert_eq!(
            (k.path.as_str(), r.count, r.success_rate()),
            ("/b", 2, Some(0.0))
        );
        // Outbound: the source pod, the endpoint address.
        let (k, r) = rows[2];
        assert_eq!(
            (k.direction.as_str(), k.destination.as_str(), r.count),
            ("out", "10.2.0.2:8080", 1)
        );

        let table = top.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("Source"), "{table}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "default/n0p0",
                "default/n1p0",
                "GET",
                "/a",
                "4",
                "0.30ms",
                "0.90ms",
                "0.50ms",
                "100.00%",
                "-"
            ]
        );
        assert!(
            lines[2].ends_with("0.00%          app=1,proxy:no_endpoints=1"),
            "{table}"
        );
        assert!(lines[0].ends_with("Success Rate   Failures"), "{table}");

        let json = top.json();
        assert_eq!(json["rows"][0]["path"], "/a");
        assert_eq!(json["rows"][0]["count"], 4);
        assert_eq!(json["rows"][0]["success_rate"], 1.0);
        assert_eq!(json["rows"][0]["best_us"], 300);
        assert_eq!(json["rows"][1]["success_rate"], 0.0);
        assert_eq!(json["rows"][1]["failures"], 2);
        assert_eq!(
            json["rows"][1]["failure_sources"],
            serde_json::json!({"app": 1, "proxy:no_endpoints": 1})
        );
        assert_eq!(json["dropped_events"], 0);
    }

    #[test]
    fn errors_and_grpc_failures_count_as_failures() {
        let mut top = Top::default();
        let m = meta(1, false);
        top.observe(Event::Req {
            meta: m.clone(),
            method: "POST".into(),
            authority: None,
            path: "/svc.Api/Call".into(),
            headers: vec![],
            headers_omitted: 0,
        });
        top.observe(Event::Rsp {
            meta: m.clone(),
            status: 200,
            latency_us: 10,
            source: Some("app".into()),
            reason: None,
            retries: 0,
            retry_budget_exhausted: false,
        });
        top.observe(Event::End {
            meta: m.clone(),
            grpc_status: Some(14),
            duration_us: 20,
            response_bytes: 0,
            error: None,
            kernel: None,
            source: Some("app".into()),
            reason: None,
        });
        // Cancelled before a response: counted, without a latency.
        let m = meta(2, false);
        top.observe(Event::Req {
            meta: m.clone(),
            method: "POST".into(),
            authority: None,
            path: "/svc.Api/Call".into(),
            headers: vec![],
            headers_omitted: 0,
        });
        top.observe(Event::End {
            meta: m,
            grpc_status: None,
            duration_us: 20,
            response_bytes: 0,
            error: Some("cancelled before the response ended".into()),
            kernel: None,
            source: None,
            reason: None,
        });
        // An end without its req (the tap dropped it) is not counted.
        top.observe(Event::End {
            meta: meta(3, false),
            grpc_status: None,
            duration_us: 20,
            response_bytes: 0,
            error: None,
            kernel: None,
            source: None,
            reason: None,
        });
        top.observe(Event::Dropped { count: 4 });
        let rows = top.rows();
        assert_eq!(rows.len(), 1);
        let r = rows[0].1;
        assert_eq!(
            (r.count, r.failures, r.best_us, r.worst_us),
            (2, 2, Some(10), Some(10))
        );
        assert_eq!(r.failures_by_source(), "app=1,error=1");
        assert!(top.table().contains("dropped 4 events"));
    }

    #[test]
    fn pending_requests_are_bounded() {
        let mut top = Top::default();
        for id in 0..(MAX_PENDING as u64 + 5) {
            top.observe(Event::Req {
                meta: meta(id, false),
                method: "GET".into(),
                authority: None,
                path: "/".into(),
                headers: vec![],
                headers_omitted: 0,
            });
        }
        assert_eq!(top.pending.len(), MAX_PENDING);
        assert!(!top.pending.contains_key(&0));
    }

    #[test]
    fn the_query_carries_the_filters_and_the_duration() {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: TopArgs,
        }
        let a = <P as clap::Parser>::try_parse_from([
            "top",
            "--direction",
            "in",
            "--path",
            "/b",
            "--duration",
            "5s",
            "-o",
            "json",
        ])
        .unwrap()
        .a;
        assert_eq!(
            a.filter.query(None, a.duration).unwrap(),
            "direction=in&path=/b&duration=5s"
        );
        assert_eq!(a.output, Output::Json);
        assert!(<P as clap::Parser>::try_parse_from(["top", "--direction", "up"]).is_err());
    }
}
