//! A client for the agents' admin API (hyper, over the loopback TCP port
//! or the Unix socket), and a reader for Prometheus text metrics.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// A connection to an agent's admin API: its loopback TCP port or its Unix
/// socket, connected by the caller (in whichever namespace it must be).
pub trait AdminStream {
    /// The same connection on the current tokio runtime.
    fn into_tokio(self) -> std::io::Result<Box<dyn AsyncStream>>;
}

/// What hyper needs of a connection.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

impl AdminStream for TcpStream {
    fn into_tokio(self) -> std::io::Result<Box<dyn AsyncStream>> {
        self.set_nonblocking(true)?;
        Ok(Box::new(tokio::net::TcpStream::from_std(self)?))
    }
}

impl AdminStream for UnixStream {
    fn into_tokio(self) -> std::io::Result<Box<dyn AsyncStream>> {
        self.set_nonblocking(true)?;
        Ok(Box::new(tokio::net::UnixStream::from_std(self)?))
    }
}

/// How long one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `GET path` over `stream` (`Host: addr`) and returns the status
/// code and the body.
pub fn http_get(stream: impl AdminStream, addr: &str, path: &str) -> Result<(u16, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for the admin request")?;
    rt.block_on(async {
        let io = stream.into_tokio()?;
        tokio::time::timeout(TIMEOUT, get(io, addr, path))
            .await
            .map_err(|_| anyhow!("no whole answer within {TIMEOUT:?}"))?
    })
    .with_context(|| format!("GET {path} from {addr}"))
}

async fn get(io: Box<dyn AsyncStream>, addr: &str, path: &str) -> Result<(u16, String)> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::USER_AGENT, "waymark-tests")
        // One request per connection: the agent may close it at once.
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The sum of all samples of metric `name` (the sample name exactly as
/// exposed, e.g. `tcp_open_total`) whose labels include every pair in
/// `labels`. `None` if no sample matches.
///
/// ```
/// # use waymark_tests::metric_value;
/// let body = "# TYPE tcp_open counter\n\
///             tcp_open_total{direction=\"outbound\",tls=\"true\"} 3\n\
///             tcp_open_total{direction=\"outbound\",tls=\"false\"} 2\n\
///             tcp_open_total{direction=\"inbound\"} 7\n";
/// assert_eq!(metric_value(body, "tcp_open_total", &[("direction", "outbound")]), Some(5.0));
/// assert_eq!(metric_value(body, "tcp_open_total", &[]), Some(12.0));
/// assert_eq!(metric_value(body, "tcp_close_total", &[]), None);
/// ```
pub fn metric_value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((n, ls, value)) = parse_sample(line) else {
            continue;
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
        {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

type Labels = Vec<(String, String)>;

/// Parses `name{a="b",…} value [timestamp]`.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let (ls, after) = parse_labels(&rest[1..])?;
        labels = ls;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// Parses labels up to and including the closing `}`; returns them and the
/// text after it.
fn parse_labels(mut s: &str) -> Option<(Labels, &str)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((out, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut val = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    other => val.push(other),
                },
                '"' => break i,
                c => val.push(c),
            }
        };
        out.push((key, val));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the test application: plain, chunked and error answers,
    /// over TCP (the Unix socket takes the same path after `into_tokio`).
    #[test]
    fn gets_plain_chunked_and_error_answers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let options = crate::http_app::Options {
                    name: "ready".into(),
                    fail: crate::http_app::Fail::None,
                    fail_every: 0,
                    delay: Duration::ZERO,
                    quiet: true,
                    statuses: vec![("/down".into(), hyper::StatusCode::SERVICE_UNAVAILABLE)],
                };
                crate::http_app::serve(listener, options).await
            })
        });
        assert!(crate::http_app::parse_status("/b=500").is_ok());
        for bad in ["/b", "/b=5000", "b=500", "/b=x"] {
            assert!(crate::http_app::parse_status(bad).is_err(), "{bad}");
        }
        let get = |path: &str| http_get(TcpStream::connect(addr).unwrap(), "localhost", path);
        assert_eq!(get("/").unwrap(), (200, "ready /\n".into()));
        assert_eq!(get("/chunked").unwrap(), (200, "ready /chunked\n".into()));
        assert_eq!(
            get("/status/503").unwrap(),
            (503, "ready /status/503\n".into())
        );
        assert_eq!(get("/down/x").unwrap(), (503, "ready /down/x\n".into()));
        assert_eq!(get("/downx").unwrap().0, 503, "a prefix, as given");
    }

    #[test]
    fn metric_values_by_label_subset() {
        let body = r#"# HELP request_total Requests.
# TYPE request_total counter
request_total{direction="outbound",authority="a.b:80"} 4
request_total{direction="outbound",authority="c,\"d\""} 1 1700000000
request_total{direction="inbound"} 2.5
response_latency_ms_bucket{le="+Inf"} 9
response_latency_ms_sum 12.5
process_up 1
# EOF
"#;
        assert_eq!(metric_value(body, "request_total", &[]), Some(7.5));
        assert_eq!(
            metric_value(body, "request_total", &[("direction", "outbound")]),
            Some(5.0)
        );
        assert_eq!(
            metric_value(body, "request_total", &[("authority", "c,\"d\"")]),
            Some(1.0)
        );
        assert_eq!(
            metric_value(body, "request_total", &[("direction", "x")]),
            None
        );
        assert_eq!(
            metric_value(body, "response_latency_ms_bucket", &[("le", "+Inf")]),
            Some(9.0)
        );
        assert_eq!(
            metric_value(body, "response_latency_ms_sum", &[]),
            Some(12.5)
        );
        assert_eq!(metric_value(body, "process_up", &[]), Some(1.0));
        assert_eq!(metric_value(body, "request", &[]), None);
    }
}
