//! The load generators, all run in the client pod (0,0):
//! - saturation: `wrk -t1 -c64` (closed loop: as fast as the path answers);
//! - latency at a fixed rate: `testpeer http-rate` (open loop, constant
//!   rate, latency from when each request was due; Debian has no wrk2);
//! - bulk: `iperf3 -c … -J`;
//! - idle connections: `testpeer hold`;
//! - HTTP/2 (h2c) saturation: `h2load -c4 -m16` (prior knowledge; 64
//!   streams in flight, like wrk's 64 connections);
//! - gRPC unary saturation: the same h2load, POSTing one gRPC message per
//!   call (ghz is not packaged); each path is first probed with one call
//!   from grpcio, which checks the echoed message and the status.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use waymark_tests::{Pod, Server};

/// wrk's connections and threads for saturation.
pub const WRK_CONNS: usize = 64;
/// h2load's connections and concurrent streams per connection.
pub const H2_CONNS: usize = 4;
pub const H2_STREAMS: usize = 16;
/// Connections of the fixed-rate latency runs.
pub const RATE_CONNS: usize = 16;

/// Latency percentiles, µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pct {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WrkErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    /// Responses that were not 2xx/3xx.
    pub status: u64,
    pub timeout: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub errors: WrkErrors,
    pub lat_us: Pct,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6).max(1e-9)
    }
}

/// wrk's `done` hook: one JSON line with the counts and percentiles.
const WRK_LUA: &str = r#"-- written by `cargo xtask bench`
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"lat_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f,"max":%.0f,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"#;

pub fn write_wrk_script(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("bench-wrk.lua");
    std::fs::write(&p, WRK_LUA)?;
    Ok(p)
}

fn json_line<T: for<'de> Deserialize<'de>>(out: &str, starts: &str, what: &str) -> Result<T> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with(starts))
        .with_context(|| format!("{what} printed no JSON summary; output:\n{out}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing {what}'s summary {line:?}"))
}

/// `wrk -t1 -c64 -d<secs>s` against `http://addr/`.
pub fn wrk(client: &Pod, script: &Path, addr: SocketAddr, secs: u64) -> Result<WrkResult> {
    let out = client.run_timeout(
        Command::new("wrk")
            .arg("-t1")
            .arg(format!("-c{WRK_CONNS}"))
            .arg(format!("-d{secs}s"))
            .arg("--timeout")
            .arg("5s")
            .arg("-s")
            .arg(script)
            .arg(format!("http://{addr}/")),
        Duration::from_secs(secs + 30),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    json_line(&stdout, "{\"requests\"", "wrk")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateResult {
    pub target_rate: u64,
    pub conns: u64,
    pub requests: u64,
    pub ok: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub late_sends: u64,
    pub achieved_rate: f64,
    /// From when each request was due (coordinated omission corrected).
    pub latency_us: Option<Pct>,
    /// From when each request was actually sent.
    pub service_us: Option<Pct>,
    /// Each second of the run: when the slow requests fell (read, not kept
    /// in the bench's results).
    #[serde(default, skip_serializing)]
    pub per_second_us: Vec<SecondPct>,
    /// Requests slower than a threshold (`--over-us`), when one was given.
    #[serde(default)]
    pub over: Option<Over>,
    pub first_error: Option<String>,
}

impl RateResult {
    /// The share of the requests (%) over the `--over-us` threshold, when
    /// one was given.
    pub fn over_pct(&self) -> Option<f64> {
        let o = self.over.as_ref()?;
        Some(o.count as f64 * 100.0 / self.requests.max(1) as f64)
    }
}

/// How many requests of a fixed-rate run took longer than `us` (from when
/// they were due): a p99 target read as a share of requests, which moves
/// less from run to run than the p99 itself on a machine whose slowest
/// percent is made of a few stalls (`bench/README.md`, "What the slowest
/// percent is made of").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Over {
    pub us: u64,
    pub count: u64,
}

/// One second of a fixed-rate run: its p99 in µs from when each request
/// was due (testpeer also says how many requests and the slowest).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecondPct {
    pub p99: u64,
}

/// `testpeer http-rate`: `rate` requests/s over 16 connections for `secs`;
/// with `over_us`, also how many requests took longer than that; with
/// `samples`, every request written to that file.
#[allow(clippy::too_many_arguments)]
pub fn http_rate(
    client: &Pod,
    testpeer: &Path,
    addr: SocketAddr,
    rate: u64,
    secs: u64,
    over_us: Option<u64>,
    samples: Option<&Path>,
) -> Result<RateResult> {
    let mut cmd = Command::new(testpeer);
    cmd.arg("http-rate")
        .arg("--connect")
        .arg(addr.to_string())
        .arg("--rate")
        .arg(rate.to_string())
        .arg("--conns")
        .arg(RATE_CONNS.to_string())
        .arg("--duration")
        .arg(format!("{secs}s"));
    if let Some(us) = over_us {
        cmd.arg("--over-us").arg(us.to_string());
    }
    if let Some(file) = samples {
        cmd.arg("--samples").arg(file);
    }
    let out = client.run_timeout(&mut cmd, Duration::from_secs(secs + 30))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: RateResult = json_line(&stdout, "{", "testpeer http-rate").with_context(|| {
        format!(
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        )
    })?;
    Ok(r)
}

#[derive(Debug, Clone, Serialize)]
pub struct IperfResult {
    pub gbit_s: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub retransmits: Option<u64>,
}

/// `iperf3 -c addr -t secs -J` (client → server; `reverse`: `-R`, server →
/// client), what the receiving end got.
pub fn iperf3(client: &Pod, addr: SocketAddr, secs: u64, reverse: bool) -> Result<IperfResult> {
    let mut cmd = Command::new("iperf3");
    cmd.arg("-c")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-t")
        .arg(secs.to_string())
        .arg("-J");
    if reverse {
        cmd.arg("-R");
    }
    let out = client.run_timeout(&mut cmd, Duration::from_secs(secs + 30))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    Ok(IperfResult {
        gbit_s: bps / 1e9,
        bytes: recv["bytes"].as_u64().unwrap_or(0),
        seconds: recv["seconds"].as_f64().unwrap_or(0.0),
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
    })
}

/// `testpeer hold`: `count` keep-alive connections, one GET each (over
/// HTTP/2 with prior knowledge when `h2`), left idle. Returns the running
/// client (connections close when it is dropped) and how many are held.
pub fn hold(
    client: &Pod,
    testpeer: &Path,
    addr: SocketAddr,
    count: usize,
    h2: bool,
) -> Result<(Server, usize, usize)> {
    let mut srv = client.serve_until(
        Command::new(testpeer)
            .arg("hold")
            .arg("--connect")
            .arg(addr.to_string())
            .arg("--count")
            .arg(count.to_string())
            .arg(if h2 { "--h2" } else { "--http" })
            .arg("--hold")
            .arg("120s"),
        "holding ",
        Duration::from_secs(60),
    )?;
    let line = srv.wait_line("holding ", Duration::from_secs(1))?;
    // "holding <ok> failed <n>"
    let f: Vec<&str> = line.split_whitespace().collect();
    let held = f.get(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    let failed = f.get(3).and_then(|x| x.parse().ok()).unwrap_or(count);
    Ok((srv, held, failed))
}

/// `h2load -t1 -c4 -m16 -D<secs>` against `http://addr/` (h2c, prior
/// knowledge), as a [`WrkResult`]: h2load prints no percentiles, so they
/// come from its per-request log (`--log-file`, written to `log`).
pub fn h2load(client: &Pod, addr: SocketAddr, secs: u64, log: &Path) -> Result<WrkResult> {
    run_h2load(client, &format!("http://{addr}/"), &[], secs, log)
}

/// The gRPC method the gRPC rows call (`testpeer grpc` answers any).
pub const GRPC_METHOD: &str = "/waymark.bench.Echo/Call";
/// The message of every gRPC call, before its 5-byte prefix.
pub const GRPC_MESSAGE_BYTES: usize = 100;

/// Writes the body of one gRPC call (a length-prefixed 100-byte message)
/// for h2load's `-d`.
pub fn write_grpc_request(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("grpc-request.bin");
    let message = vec![b'x'; GRPC_MESSAGE_BYTES];
    std::fs::write(&path, waymark_tests::grpc_unary::frame(&message))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// [`h2load`] sending gRPC unary calls: POSTs of `request` to
/// [`GRPC_METHOD`] with gRPC's headers. h2load counts HTTP statuses, not
/// `grpc-status`; the probe before the run checks that.
pub fn grpc(
    client: &Pod,
    addr: SocketAddr,
    secs: u64,
    log: &Path,
    request: &Path,
) -> Result<WrkResult> {
    let data = format!("-d{}", request.display());
    let args = [
        data.as_str(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ];
    run_h2load(
        client,
        &format!("http://{addr}{GRPC_METHOD}"),
        &args,
        secs,
        log,
    )
}

fn run_h2load(client: &Pod, url: &str, extra: &[&str], secs: u64, log: &Path) -> Result<WrkResult> {
    let _ = std::fs::remove_file(log);
    let out = client.run_timeout(
        Command::new("h2load")
            .arg("-t1")
            .arg(format!("-c{H2_CONNS}"))
            .arg(format!("-m{H2_STREAMS}"))
            .arg(format!("-D{secs}"))
            .arg(format!("--log-file={}", log.display()))
            .args(extra)
            .arg(url),
        Duration::from_secs(secs + 30),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed ({}): {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let log = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    parse_h2load(&stdout, &log)
}

/// The numbers after `key` on the line starting with `prefix`, e.g.
/// `requests: 10 total, 10 started, 9 done, 9 succeeded, 1 failed, …`.
fn h2load_count(out: &str, prefix: &str, key: &str) -> Result<u64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("h2load printed no `{prefix}` line; output:\n{out}"))?;
    line.trim_start_matches(prefix)
        .split(',')
        .map(str::trim)
        .find_map(|f| f.strip_suffix(key).map(str::trim))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no `{key}` count in h2load's {line:?}"))
}

fn parse_h2load(out: &str, log: &str) -> Result<WrkResult> {
    let finished = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .context("h2load printed no `finished in` line")?;
    let secs = finished
        .split(',')
        .next()
        .map(str::trim)
        .and_then(|d| {
            d.strip_suffix("ms")
                .and_then(|x| x.parse::<f64>().ok().map(|x| x / 1e3))
                .or_else(|| d.strip_suffix('s').and_then(|x| x.parse().ok()))
        })
        .with_context(|| format!("h2load's duration {finished:?}"))?;
    let succeeded = h2load_count(out, "requests:", "succeeded")?;
    let failed = h2load_count(out, "requests:", "failed")?;
    let errored = h2load_count(out, "requests:", "errored")?;
    let timeout = h2load_count(out, "requests:", "timeout")?;
    let bad =
        h2load_count(out, "status codes:", "4xx")? + h2load_count(out, "status codes:", "5xx")?;
    let bytes = out
        .lines()
        .find_map(|l| l.strip_prefix("traffic: "))
        .and_then(|t| t.split_once('(')?.1.split_once(')')?.0.parse().ok())
        .unwrap_or(0);
    // Log lines: start (µs since the epoch) \t status \t µs to the end of the response.
    let mut lat: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    Ok(WrkResult {
        requests: succeeded,
        duration_us: (secs * 1e6) as u64,
        bytes,
        errors: WrkErrors {
            // Requests that failed for another reason than their status.
            connect: failed.saturating_sub(bad),
            read: errored,
            write: 0,
            status: bad,
            timeout,
        },
        lat_us: Pct {
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            p999: pct(0.999),
            max: lat.last().copied().unwrap_or(f64::NAN),
            mean,
        },
    })
}

/// One GET through the path with curl (`--http2-prior-knowledge` for h2c
/// paths): status and body length.
/// One gRPC call from grpcio (a real gRPC client): the message must come
/// back with status OK.
pub fn probe_grpc(client: &Pod, addr: SocketAddr) -> Result<()> {
    const CALL: &str = r#"
import grpc, sys
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
msg = b"x" * int(sys.argv[3])
got = ch.unary_unary(sys.argv[2])(msg, timeout=5)
print("ok" if got == msg else "echo differs: %r" % got[:32])
"#;
    let out = client.run_ok(waymark_tests::python().args([
        "-c",
        CALL,
        &addr.to_string(),
        GRPC_METHOD,
        &GRPC_MESSAGE_BYTES.to_string(),
    ]))?;
    if out.trim() != "ok" {
        bail!("gRPC call to {addr}{GRPC_METHOD}: {}", out.trim());
    }
    Ok(())
}

pub fn probe(client: &Pod, addr: SocketAddr, h2c: bool) -> Result<()> {
    let url = format!("http://{addr}/");
    let mut args = vec![
        "-sS",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{http_version}",
    ];
    if h2c {
        args.push("--http2-prior-knowledge");
    }
    args.push(&url);
    let out = client.run_ok(Command::new("curl").args(&args))?;
    let want = if h2c { "200 100 2" } else { "200 100 1.1" };
    if out.trim() != want {
        bail!(
            "GET {url} gave `{}`, not `{want}` (status, bytes, HTTP version)",
            out.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_wrk_hook_line() {
        let out = "Running 1s test @ http://x/\n  1 threads and 64 connections\n\
                   {\"requests\":1000,\"duration_us\":1000000,\"bytes\":5,\"errors\":{\"connect\":0,\"read\":0,\"write\":0,\"status\":0,\"timeout\":0},\
                   \"lat_us\":{\"p50\":100,\"p90\":200,\"p99\":300,\"p999\":400,\"max\":500,\"mean\":120.5}}\n";
        let r: WrkResult = json_line(out, "{\"requests\"", "wrk").unwrap();
        assert_eq!(r.requests, 1000);
        assert_eq!(r.rps(), 1000.0);
        assert_eq!(r.lat_us.p999, 400.0);
    }

    #[test]
    fn parses_h2load_output_and_log() {
        let out = "starting benchmark...\n\
                   finished in 3.00s, 1000.00 req/s, 120.00KB/s\n\
                   requests: 3002 total, 3066 started, 3002 done, 3000 succeeded, 2 failed, 1 errored, 0 timeout\n\
                   status codes: 3000 2xx, 0 3xx, 1 4xx, 0 5xx\n\
                   traffic: 351.56KB (360000) total, 1.2KB (1234) headers\n";
        let log: String = (1..=100)
            .map(|i| format!("1700000000000000\t200\t{i}\n"))
            .collect();
        let r = parse_h2load(out, &log).unwrap();
        assert_eq!(r.requests, 3000);
        assert_eq!(r.duration_us, 3_000_000);
        assert_eq!(r.bytes, 360_000);
        assert_eq!(
            (r.errors.status, r.errors.connect, r.errors.read),
            (1, 1, 1)
        );
        assert_eq!(
            (r.lat_us.p50, r.lat_us.p99, r.lat_us.max),
            (50.0, 99.0, 100.0)
        );
        assert!(parse_h2load("nothing", "").is_err());
    }
}
