//! A minimal HTTP/1.1 client for the agents' admin API, and a reader for
//! Prometheus text metrics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// A connection to an agent's admin API: its loopback TCP port or its Unix
/// socket.
pub trait AdminStream: Read + Write {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl AdminStream for TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl AdminStream for UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// Sends `GET path` with `Connection: close` over `stream` and returns the
/// status code and the body (chunked bodies are decoded).
pub fn http_get(mut stream: impl AdminStream, addr: &str, path: &str) -> Result<(u16, String)> {
    stream.set_timeouts(Duration::from_secs(10))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: waymark-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response to GET {path} from {addr}"))?;
    parse_response(&raw).with_context(|| format!("GET {path} from {addr}"))
}

fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        anyhow!(
            "incomplete HTTP response ({} bytes): {:?}",
            raw.len(),
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        )
    })?;
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            bail!("body cut short: {} of {n} bytes", rest.len());
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn decode_chunked(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or_else(|| anyhow!("chunk size line cut short"))?;
        let size_s = std::str::from_utf8(&b[..eol])?;
        let size_s = size_s.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size_s, 16).map_err(|_| anyhow!("bad chunk size {size_s:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("chunk cut short");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready";
        assert_eq!(parse_response(plain).unwrap(), (200, "ready".into()));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (503, "not ready".into()));
        let until_close = b"HTTP/1.0 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(until_close).unwrap(), (404, "nope".into()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
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
