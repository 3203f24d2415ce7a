//! `waymark capture`: a packet capture in a pod's network namespace (or the
//! node's), written as pcapng to a file or to stdout for a pipe into
//! `tshark -r -` / `wireshark -k -i -`. The agent applies the filter and the
//! bounds; the CLI copies the stream and prints a summary on stderr.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;

use super::client::{AdminClient, block_on};
use crate::diagnostics::capture::pcapng::{STOP_COMMENT_PREFIX, StreamSummary};
use crate::http::query;

#[derive(clap::Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pod", "node"])))]
pub struct CaptureArgs {
    /// Capture in this pod's network namespace (`namespace/name`, a pod of
    /// this node): all of its interfaces, loopback included.
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// Capture in the node's own network namespace (where the agent runs).
    #[arg(long)]
    pub node: bool,
    /// tcpdump filter expression, e.g. 'tcp port 8080'.
    #[arg(long, short = 'f', value_name = "EXPR")]
    pub filter: Option<String>,
    /// How long to capture (the agent caps it: capture.max_duration).
    #[arg(long, short = 'd', default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many packets.
    #[arg(long, short = 'c', value_name = "N")]
    pub max_packets: Option<u64>,
    /// Stop once this many bytes of pcapng are written (default 64 MiB;
    /// the agent caps it: capture.max_bytes).
    #[arg(long, value_name = "N")]
    pub max_bytes: Option<u64>,
    /// Bytes kept of each packet (default and most: 262144).
    #[arg(long, short = 's', value_name = "N")]
    pub snaplen: Option<u32>,
    /// Embed the node-to-node tunnel's TLS session secrets (pcapng
    /// Decryption Secrets Block), so Wireshark decrypts it. Needs --node and
    /// `capture.keylog = true` on the agent.
    #[arg(long)]
    pub keylog: bool,
    /// Where to write the pcapng: a file, or `-` for stdout.
    #[arg(short = 'w', value_name = "FILE|-")]
    pub write: PathBuf,
}

impl CaptureArgs {
    /// The admin API path and query of the request.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        match &self.pod {
            Some(pod) => q.push(format!("pod={}", query::encode(pod))),
            None => q.push("node=1".to_string()),
        }
        if let Some(f) = &self.filter {
            q.push(format!("filter={}", query::encode(f)));
        }
        q.push(format!(
            "duration={}",
            query::encode(&humantime::format_duration(self.duration).to_string())
        ));
        if let Some(n) = self.max_packets {
            q.push(format!("max_packets={n}"));
        }
        if let Some(n) = self.max_bytes {
            q.push(format!("max_bytes={n}"));
        }
        if let Some(n) = self.snaplen {
            q.push(format!("snaplen={n}"));
        }
        if self.keylog {
            q.push("keylog=1".to_string());
        }
        format!("/capture?{}", q.join("&"))
    }

    fn target(&self) -> String {
        match &self.pod {
            Some(p) => format!("pod {p}"),
            None => "the node".to_string(),
        }
    }
}

pub fn run(client: &AdminClient, args: CaptureArgs) -> Result<()> {
    let to_stdout = args.write.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        bail!(
            "refusing to write pcapng to a terminal; pipe it (-w - | tshark -r -) or write a file (-w out.pcapng)"
        );
    }
    let start = Instant::now();
    let (summary, bytes, ended, excluded) = block_on(copy_stream(client, &args))?;
    let dest = if to_stdout {
        "stdout".to_string()
    } else {
        args.write.display().to_string()
    };
    let why = match (&summary.stop_comment, ended) {
        (_, Ended::Interrupted) => "interrupted".to_string(),
        (_, Ended::OutputClosed) => "the output was closed".to_string(),
        (Some(c), Ended::Stream) => c
            .strip_prefix(STOP_COMMENT_PREFIX)
            .and_then(|c| c.split(" (").next())
            .unwrap_or(c)
            .to_string(),
        (None, Ended::Stream) => "the agent ended the stream early (see its log)".to_string(),
    };
    let drops = match summary.kernel_drops {
        Some(n) if n > 0 => format!(", {n} dropped by the kernel (the reader was too slow)"),
        _ => String::new(),
    };
    let secrets = if args.keylog {
        format!(", {} TLS secrets blocks", summary.secrets_blocks)
    } else {
        String::new()
    };
    let excluded = excluded
        .map(|e| {
            format!("; left out: the agent's admin API connections ({e}), which carry captures")
        })
        .unwrap_or_default();
    eprintln!(
        "waymark capture: {}: {} packets, {} bytes written to {dest} in {:.1}s; stopped: {why}{drops}{secrets}{excluded}",
        args.target(),
        summary.packets,
        bytes,
        start.elapsed().as_secs_f64(),
    );
    Ok(())
}

enum Ended {
    Stream,
    Interrupted,
    OutputClosed,
}

/// The output, opened once the agent has accepted (a refused capture
/// leaves no empty file behind).
fn open_output(path: &std::path::Path) -> Result<Box<dyn Write>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdout().lock()));
    }
    Ok(Box::new(std::fs::File::create(path).with_context(
        || format!("cannot create {}", path.display()),
    )?))
}

async fn copy_stream(
    client: &AdminClient,
    args: &CaptureArgs,
) -> Result<(StreamSummary, u64, Ended, Option<String>)> {
    let path = args.path();
    let rsp = client.send(Method::POST, &path, Bytes::new()).await?;
    let status = rsp.status();
    let excluded = rsp
        .headers()
        .get(crate::admin::CAPTURE_EXCLUDED_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = rsp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        bail!(
            "the agent refused the capture ({status}): {}",
            text.trim_end()
        );
    }
    let mut out = open_output(&args.write)?;
    let mut summary = StreamSummary::default();
    let mut written = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let ended = loop {
        let frame = tokio::select! {
            _ = &mut ctrl_c => break Ended::Interrupted,
            f = body.frame() => f,
        };
        let Some(frame) = frame else {
            break Ended::Stream;
        };
        let frame = frame.context("the capture stream broke off")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        summary.feed(&data);
        let wrote = out.write_all(&data).and_then(|()| out.flush());
        match wrote {
            Ok(()) => written += data.len() as u64,
            // `| head`, or tshark exiting: stop quietly, which ends the
            // capture on the agent.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ended::OutputClosed,
            Err(e) => return Err(e).context("cannot write the capture"),
        }
    };
    out.flush().ok();
    Ok((summary, written, ended, excluded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CaptureArgs,
    }

    #[test]
    fn the_request_carries_every_option() {
        let cli = Cli::parse_from([
            "x",
            "--pod",
            "default/web",
            "--filter",
            "tcp port 80",
            "--duration",
            "5s",
            "-c",
            "10",
            "--snaplen",
            "96",
            "-w",
            "-",
        ]);
        assert_eq!(
            cli.args.path(),
            "/capture?pod=default/web&filter=tcp%20port%2080&duration=5s&max_packets=10&snaplen=96"
        );
        let cli = Cli::parse_from(["x", "--node", "--keylog", "-w", "out.pcapng"]);
        assert_eq!(cli.args.path(), "/capture?node=1&duration=30s&keylog=1");
    }

    #[test]
    fn pod_or_node_is_required_and_exclusive() {
        assert!(Cli::try_parse_from(["x", "-w", "-"]).is_err());
        assert!(Cli::try_parse_from(["x", "--node", "--pod", "a/b", "-w", "-"]).is_err());
        assert!(Cli::try_parse_from(["x", "--node"]).is_err());
    }
}
