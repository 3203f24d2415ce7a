//! `waymark tap`: streams the requests the agent is proxying right now,
//! like `linkerd viz tap`, from the admin API's `GET /tap`: `proxy=out`
//! for requests from this node's pods, `proxy=in` for requests that came
//! through the mTLS tunnel to them.
//!
//! ```text
//! req id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity :method=GET :authority=hello :path=/hello
//! rsp id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity :status=200 latency=1234µs
//! end id=3 proxy=out src=10.1.0.2:40142 dst=10.2.0.2:8080 tls=no_identity duration=1377µs response-length=5B
//! ```
//!
//! `-o json` prints the agent's lines as they come (one JSON object a line,
//! request headers included, credentials redacted by the agent). When
//! nothing matched for a few seconds it says on stderr why the tap may be
//! empty ([`super::tap_explain`]).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Incoming;

use super::client::{AdminClient, block_on};
use super::tap_explain::{Asked, EXPLAIN_AFTER, SEEN_WINDOW, Seen, explain};
use crate::diagnostics::stats_view::EdgesReport;
use crate::diagnostics::tap::event::Event;
use crate::diagnostics::tap::filter::{Filter, Pods};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TapOutput {
    /// One line per event, as `linkerd tap` prints them.
    #[default]
    Text,
    /// The text lines plus the source pod and destination service.
    Wide,
    /// The agent's JSON lines, as they come.
    Json,
}

/// The filters `waymark tap` and `waymark top` share.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TapFilterArgs {
    /// Source: a pod (`default/web-5d8f-x2`), a workload whose pods are
    /// named `<workload>-…` (`default/web`), or an IP. Inbound requests
    /// (`proxy=in`) match by the peer's verified identity: its
    /// `<namespace>/<service account>` by the same rule, or its whole
    /// SPIFFE ID, or by the calling pod's IP.
    #[arg(long)]
    from: Option<String>,
    /// Destination: a service (dialled, the backend a route chose, or
    /// inbound one the pod is an endpoint of), a pod of this node, an IP or
    /// IP:port (endpoint or dialled address).
    #[arg(long)]
    to: Option<String>,
    /// Only requests from this node's pods (`out`) or through the tunnel
    /// to them (`in`).
    #[arg(long, value_parser = ["in", "out"])]
    direction: Option<String>,
    /// `:authority` / `Host`, exactly.
    #[arg(long)]
    authority: Option<String>,
    /// A path prefix, e.g. `/api`.
    #[arg(long)]
    path: Option<String>,
    /// An HTTP method, e.g. `POST`.
    #[arg(long)]
    method: Option<String>,
    /// A status class (`2xx`, `4xx`, `5xx`) or one code (`503`).
    #[arg(long)]
    status: Option<String>,
    /// Only responses whose head took at least this long (`100ms`).
    #[arg(long, value_parser = humantime::parse_duration)]
    min_latency: Option<Duration>,
}

impl TapFilterArgs {
    /// The `/tap` query with `max` and `duration`, checked here first so a
    /// typo is caught before the agent is asked.
    pub(super) fn query(&self, max: Option<u64>, duration: Option<Duration>) -> Result<String> {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        let mut put = |k, v: Option<String>| {
            if let Some(v) = v {
                pairs.push((k, v));
            }
        };
        put("from", self.from.clone());
        put("to", self.to.clone());
        put("direction", self.direction.clone());
        put("authority", self.authority.clone());
        put("path", self.path.clone());
        put("method", self.method.clone());
        put("status", self.status.clone());
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        put("min_latency", self.min_latency.map(fmt));
        put("max", max.map(|m| m.to_string()));
        put("duration", duration.map(fmt));
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", crate::http::query::encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        Filter::from_query(&query, &Pods::default()).map_err(anyhow::Error::msg)?;
        Ok(query)
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct TapArgs {
    #[command(flatten)]
    filter: TapFilterArgs,
    /// Stop after this many requests have ended.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this long (`30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: TapOutput,
}

impl TapArgs {
    fn query(&self) -> Result<String> {
        self.filter.query(self.max, self.duration)
    }
}

/// Opens the agent's tap stream for `query`; the body is newline-delimited
/// JSON events ([`Lines`] splits it).
pub(super) async fn open(client: &AdminClient, query: &str) -> Result<Incoming> {
    let path = if query.is_empty() {
        "/tap".to_string()
    } else {
        format!("/tap?{query}")
    };
    let rsp = client.send(Method::GET, &path, Bytes::new()).await?;
    let status = rsp.status();
    let body = rsp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "agent answered {status} to {path}: {}",
            String::from_utf8_lossy(&text).trim_end()
        );
    }
    Ok(body)
}

/// Splits a byte stream into lines (without their newline, empty ones
/// skipped) as the chunks arrive.
#[derive(Default)]
pub(super) struct Lines {
    buf: BytesMut,
}

impl Lines {
    pub(super) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub(super) fn next_line(&mut self) -> Option<Bytes> {
        loop {
            let nl = self.buf.iter().position(|b| *b == b'\n')?;
            let line = self.buf.split_to(nl + 1).freeze().slice(..nl);
            if !line.is_empty() {
                return Some(line);
            }
        }
    }
}

pub fn run(client: &AdminClient, args: TapArgs) -> Result<()> {
    let query = args.query()?;
    block_on(async {
        let mut body = open(client, &query).await?;
        let mut out = std::io::stdout().lock();
        let mut lines = Lines::default();
        // Nothing within a few seconds: say why it may be empty, once.
        let explain_at = tokio::time::sleep(EXPLAIN_AFTER);
        tokio::pin!(explain_at);
        let (mut shown, mut explained) = (false, false);
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let Some(frame) = frame else { break };
                    let frame = frame.context("the tap stream broke off")?;
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    lines.push(&data);
                    while let Some(line) = lines.next_line() {
                        shown = true;
                        if print_line(&mut out, &line, args.output).is_err() {
                            // stdout closed (`| head`): stop quietly.
                            return Ok(());
                        }
                    }
                }
                _ = &mut explain_at, if !shown && !explained => {
                    explained = true;
                    eprint!("{}", why_empty(client, &args.filter).await);
                }
            }
        }
        Ok(())
    })
}

/// What `waymark tap` prints on stderr when nothing matched for
/// [`EXPLAIN_AFTER`].
async fn why_empty(client: &AdminClient, filter: &TapFilterArgs) -> String {
    let head = format!(
        "waymark tap: nothing matched in {}",
        humantime::format_duration(EXPLAIN_AFTER)
    );
    let config = client.get_json::<serde_json::Value>("/config").await;
    let edges = client
        .get_json::<EdgesReport>(&format!("/edges?window={SEEN_WINDOW}"))
        .await;
    let (config, edges) = match (config, edges) {
        (Ok(c), Ok(e)) => (c, e),
        (Err(e), _) | (_, Err(e)) => {
            return format!("{head} (the agent could not be asked why: {e:#})\n");
        }
    };
    let names = |key: &str| -> Vec<String> {
        config[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let seen = Seen {
        pods: names("pods"),
        services: names("services"),
        edges: edges.rows,
    };
    let asked = Asked {
        from: filter.from.as_deref(),
        to: filter.to.as_deref(),
        inbound: filter.direction.as_deref() == Some("in"),
    };
    let mut out = format!("{head}; why it may be empty:\n");
    for why in explain(&asked, &seen) {
        out.push_str(&format!("  - {why}\n"));
    }
    out
}

fn print_line(
    out: &mut impl std::io::Write,
    line: &[u8],
    output: TapOutput,
) -> std::io::Result<()> {
    if output == TapOutput::Json {
        out.write_all(line)?;
        return out.write_all(b"\n");
    }
    match serde_json::from_slice::<Event>(line) {
        Ok(ev) => writeln!(out, "{}", ev.render(output == TapOutput::Wide)),
        // A newer agent's event this CLI does not know: show it as it is.
        Err(_) => writeln!(out, "{}", String::from_utf8_lossy(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> TapArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: TapArgs,
        }
        let mut argv = vec!["tap"];
        argv.extend_from_slice(extra);
        <P as clap::Parser>::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn flags_become_the_query() {
        let q = args(&[
            "--from",
            "default/web",
            "--to",
            "10.2.0.2:8080",
            "--direction",
            "in",
            "--path",
            "/a b",
            "--status",
            "5xx",
            "--min-latency",
            "100ms",
            "--max",
            "3",
            "--duration",
            "30s",
            "-o",
            "json",
        ])
        .query()
        .unwrap();
        assert_eq!(
            q,
            "from=default/web&to=10.2.0.2:8080&direction=in&path=/a%20b&status=5xx&min_latency=100ms&max=3&duration=30s"
        );
        assert_eq!(args(&[]).query().unwrap(), "");
    }

    #[test]
    fn bad_flags_are_caught_before_asking_the_agent() {
        let e = args(&["--status", "6xx"]).query().unwrap_err();
        assert!(e.to_string().contains("5xx"), "{e}");
        let e = args(&["--max", "0"]).query().unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
    }

    #[test]
    fn lines_are_split_across_chunks() {
        let mut l = Lines::default();
        l.push(b"{\"a\":1}\n\n{\"b\"");
        assert_eq!(l.next_line().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(l.next_line(), None);
        l.push(b":2}\n");
        assert_eq!(l.next_line().as_deref(), Some(&b"{\"b\":2}"[..]));
        assert_eq!(l.next_line(), None);
    }

    #[test]
    fn lines_are_rendered_or_passed_through() {
        let mut out = Vec::new();
        print_line(
            &mut out,
            br#"{"type":"dropped","count":3}"#,
            TapOutput::Text,
        )
        .unwrap();
        print_line(
            &mut out,
            br#"{"type":"dropped","count":3}"#,
            TapOutput::Json,
        )
        .unwrap();
        print_line(&mut out, br#"{"type":"new"}"#, TapOutput::Text).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("dropped 3 events"), "{text}");
        assert_eq!(lines[1], r#"{"type":"dropped","count":3}"#);
        assert_eq!(lines[2], r#"{"type":"new"}"#);
    }
}
