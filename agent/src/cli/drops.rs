//! `waymark drops [--window 1m] [--pod NAME] [-o json]`: what the kernel
//! dropped, retransmitted and reset, per pod and drop reason, over a window.
//! `waymark drops --follow`: the events as they happen.

use std::io::Write as _;

use anyhow::{Context, Result, bail};
use http_body_util::BodyExt;
use hyper::Method;

use super::Output;
use super::client::{AdminClient, block_on};
use crate::http::query;
use crate::kernel::{DropEvent, DropsReport};

#[derive(clap::Args, Clone, Debug)]
pub struct DropsArgs {
    /// How far back to count (e.g. 30s, 5m, 1h); at most the agent's
    /// `kernel.history`.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub window: std::time::Duration,
    /// Only this pod (`namespace/name`, or `node`).
    #[arg(long)]
    pub pod: Option<String>,
    /// Stream drop and reset events instead of counting.
    #[arg(long, short)]
    pub follow: bool,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn run(client: &AdminClient, args: DropsArgs) -> Result<()> {
    block_on(async {
        if args.follow {
            follow(client, &args).await
        } else {
            counts(client, &args).await
        }
    })
}

async fn counts(client: &AdminClient, args: &DropsArgs) -> Result<()> {
    let mut path = format!(
        "/drops?window={}",
        query::encode(&humantime::format_duration(args.window).to_string())
    );
    if let Some(pod) = &args.pod {
        path += &format!("&pod={}", query::encode(pod));
    }
    if args.output == Output::Json {
        print!("{}", client.get_text(&path).await?);
        return Ok(());
    }
    let report: DropsReport = client.get_json(&path).await?;
    print!("{}", render(&report));
    Ok(())
}

/// The two tables: drops per pod and reason, then the TCP and traffic
/// counters per pod.
pub fn render(r: &DropsReport) -> String {
    let mut out = format!(
        "node {}: last {}{}\n\n",
        r.node,
        humantime::format_duration(std::time::Duration::from_secs(r.window_secs.round() as u64)),
        if r.window_secs + 1.0 < r.requested_window_secs {
            " (the agent has no older counters)"
        } else {
            ""
        }
    );
    let mut drops = vec![["POD".to_string(), "REASON".into(), "DROPS".into()]];
    for p in &r.pods {
        for d in &p.drops {
            drops.push([p.pod.clone(), d.reason.clone(), d.count.to_string()]);
        }
    }
    if drops.len() == 1 {
        out += "no drops\n";
    } else {
        out += &table(&drops);
    }
    out += "\n";
    let mut tcp = vec![[
        "POD".to_string(),
        "RETRANSMITS".into(),
        "SYN_RETRANSMITS".into(),
        "RESETS_SENT".into(),
        "RESETS_RECEIVED".into(),
        "BYTES_IN".into(),
        "BYTES_OUT".into(),
        "PACKETS_IN".into(),
        "PACKETS_OUT".into(),
        "SOCKMAP_IN".into(),
        "SOCKMAP_OUT".into(),
    ]];
    for p in &r.pods {
        tcp.push([
            p.pod.clone(),
            p.retransmits.to_string(),
            p.syn_retransmits.to_string(),
            p.resets_sent.to_string(),
            p.resets_received.to_string(),
            p.bytes_in.to_string(),
            p.bytes_out.to_string(),
            p.packets_in.to_string(),
            p.packets_out.to_string(),
            p.sockmap_bytes_in.to_string(),
            p.sockmap_bytes_out.to_string(),
        ]);
    }
    out += &table(&tcp);
    if r.events_suppressed > 0 || r.events_lost > 0 {
        out += &format!(
            "\nevents: {} held back by the rate limit, {} lost (counters above are complete)\n",
            r.events_suppressed, r.events_lost
        );
    }
    let down: Vec<String> = r
        .programs
        .iter()
        .filter(|p| p.state != "attached")
        .map(|p| format!("  {} ({}): {}", p.program, p.hook, p.state))
        .collect();
    if !down.is_empty() {
        out += &format!("\nnot running:\n{}\n", down.join("\n"));
    }
    out
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                // Names left, numbers right.
                if i == 0 || cell.parse::<u64>().is_err() {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out += "\n";
    }
    out
}

async fn follow(client: &AdminClient, args: &DropsArgs) -> Result<()> {
    let mut path = "/drops/follow".to_string();
    if let Some(pod) = &args.pod {
        path += &format!("?pod={}", query::encode(pod));
    }
    let rsp = client.send(Method::GET, &path, bytes::Bytes::new()).await?;
    if !rsp.status().is_success() {
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        bail!(
            "agent answered {status} to {path}: {}",
            String::from_utf8_lossy(&body).trim_end()
        );
    }
    let mut body = rsp.into_body();
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the event stream broke off")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let mut out = stdout.lock();
            if args.output == Output::Json {
                write!(out, "{line}")?;
            } else {
                writeln!(out, "{}", follow_line(line.trim_end()))?;
            }
            out.flush()?;
        }
    }
    Ok(())
}

/// `2025-01-01T12:00:00.123Z  default/web  drop  NETFILTER_DROP  tcp 10.2.0.2:8080 -> 10.0.0.1:43122  ESTABLISHED`
fn follow_line(json: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(json)
        && let Some(missed) = v.get("missed")
    {
        return format!("... {missed} events missed (this terminal was too slow)");
    }
    match serde_json::from_str::<DropEvent>(json) {
        Ok(e) => {
            let flow = match (&e.src, &e.dst) {
                (Some(s), Some(d)) => format!("{} {s} -> {d}", e.proto),
                _ => e.proto.clone(),
            };
            let mut line = format!("{}  {}  {}", e.time, e.pod, e.kind);
            if !e.reason.is_empty() {
                line += &format!("  {}", e.reason);
            }
            line += &format!("  {flow}");
            if let Some(state) = &e.state {
                line += &format!("  {state}");
            }
            line
        }
        Err(_) => json.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::PodReport;

    #[test]
    fn tables_show_pods_and_reasons() {
        let r = DropsReport {
            node: "n0".into(),
            window_secs: 60.0,
            requested_window_secs: 60.0,
            pods: vec![PodReport {
                pod: "default/web".into(),
                drops: vec![crate::kernel::ReasonCount {
                    reason: "NETFILTER_DROP".into(),
                    count: 12,
                }],
                drops_total: 12,
                retransmits: 3,
                ..PodReport::default()
            }],
            ..DropsReport::default()
        };
        let out = render(&r);
        assert!(out.contains("node n0: last 1m"), "{out}");
        assert!(out.contains("default/web  NETFILTER_DROP     12"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("default/web") && l.contains(" 3 ")),
            "{out}"
        );
    }

    #[test]
    fn follow_lines_are_readable() {
        let e = DropEvent {
            time: "2025-01-01T00:00:00.000Z".into(),
            pod: "default/web".into(),
            kind: "drop".into(),
            reason: "NO_SOCKET".into(),
            proto: "tcp".into(),
            src: Some("10.1.0.2:1".into()),
            dst: Some("10.1.0.3:9".into()),
            state: None,
            netns_cookie: 1,
            cgroup_id: 0,
        };
        let line = follow_line(&serde_json::to_string(&e).unwrap());
        assert_eq!(
            line,
            "2025-01-01T00:00:00.000Z  default/web  drop  NO_SOCKET  tcp 10.1.0.2:1 -> 10.1.0.3:9"
        );
        assert!(follow_line("{\"missed\":3}").contains("3 events missed"));
    }
}
