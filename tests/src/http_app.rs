//! The test application (`testpeer http`): one HTTP/1.1 server whose
//! behaviour the request and a few flags choose, for every world test that
//! needs an application behind the agent — instead of a Python server
//! pasted into each test file, each a little different.
//!
//! What it answers (`name` is `--name`, `path` the request target with its
//! query):
//!
//! | request | answer |
//! |---|---|
//! | any | `200`, body `<name> <path>\n`, `x-pod: <name>`, `content-type: text/plain` |
//! | `/status/<n>…` | status `<n>` |
//! | a path under a `--status <prefix>=<n>` prefix | status `<n>` (the first such flag that matches) |
//! | `/fail…` | `500` |
//! | `/slow/<ms>…`, or `?sleep=<ms>` | the answer after `<ms>` milliseconds (plus `--delay`) |
//! | `/bytes/<n>` | `<n>` bytes of 0, 1, …, 255, 0, 1, … (`application/octet-stream`) |
//! | `/chunked` | the body in two chunks (`transfer-encoding: chunked`) |
//! | `TRACE` | the request head as received (`message/http`), as RFC 9110 asks |
//!
//! `--fail all` answers `503` to everything, `--fail alternate` to the
//! first, third, … request it receives (a flaky endpoint), `--fail-every
//! <n>` to the n-th, 2n-th, … (a known failure rate). Request bodies
//! are read to their end. It prints `listening <addr>` once bound, and for
//! each request `req <k> <method> <path> <status>` when it arrives and
//! `done <k> <path>` once answered, `k` counting from 1, so tests can tell
//! which endpoint got what and what was in flight.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// When the server answers `503` on its own (`--fail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fail {
    None,
    All,
    Alternate,
}

/// `testpeer http`'s options.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub fail: Fail,
    /// Answer `503` to every n-th request (0: never).
    pub fail_every: u64,
    /// Added to every answer's wait.
    pub delay: Duration,
    /// Paths under a prefix answered with a status of their own
    /// (`--status /b=500`).
    pub statuses: Vec<(String, StatusCode)>,
    /// No `req`/`done` lines: for load, where writing them would cost more
    /// than answering.
    pub quiet: bool,
}

type Body = http_body_util::Either<Full<Bytes>, Chunks>;

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, options: Options) {
    let shared = Arc::new((options, AtomicU64::new(0)));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    let (options, count) = &*shared;
                    let k = count.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok::<_, Infallible>(answer(req, options, k).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The status the request asks for, or the server's own.
fn status(path: &str, options: &Options, k: u64) -> StatusCode {
    let failing = match options.fail {
        Fail::None => false,
        Fail::All => true,
        Fail::Alternate => k % 2 == 1,
    } || (options.fail_every > 0 && k.is_multiple_of(options.fail_every));
    if failing {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(rest) = path.strip_prefix("/status/") {
        let code = rest.split('/').next().unwrap_or("");
        if let Some(s) = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            return s;
        }
    }
    if let Some((_, s)) = options
        .statuses
        .iter()
        .find(|(p, _)| path.starts_with(p.as_str()))
    {
        return *s;
    }
    if path.starts_with("/fail") {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::OK
}

/// How long the request asks the answer to wait.
fn wait(path: &str, query: Option<&str>, options: &Options) -> Duration {
    let ms = |s: &str| s.parse::<u64>().ok().map(Duration::from_millis);
    let slow = path
        .strip_prefix("/slow/")
        .and_then(|rest| ms(rest.split('/').next().unwrap_or("")));
    let sleep = query.and_then(|q| {
        form_pairs(q)
            .find(|(k, _)| *k == "sleep")
            .and_then(|(_, v)| ms(v))
    });
    options.delay + slow.unwrap_or_default() + sleep.unwrap_or_default()
}

/// Parses `--status <prefix>=<code>`.
pub fn parse_status(s: &str) -> Result<(String, StatusCode), String> {
    let (prefix, code) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected <path prefix>=<status code>"))?;
    let code = code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("{s:?}: {code:?} is not a status code"))?;
    if !prefix.starts_with('/') {
        return Err(format!("{s:?}: the prefix must start with /"));
    }
    Ok((prefix.to_string(), code))
}

/// One line on stdout, flushed: tests read them as they come.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the server down.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn form_pairs(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&').filter_map(|kv| kv.split_once('='))
}

async fn answer(req: Request<Incoming>, options: &Options, k: u64) -> Response<Body> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let path = req.uri().path().to_string();
    let status = status(&path, options, k);
    let method = req.method().clone();
    if !options.quiet {
        say(format_args!(
            "req {k} {method} {target} {status}",
            status = status.as_u16()
        ));
    }
    let head = (method == Method::TRACE).then(|| trace_head(&req));
    let delay = wait(&path, req.uri().query(), options);
    // The request's body, read to its end whatever it is.
    let _ = req.into_body().collect().await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut resp = Response::builder()
        .status(status)
        .header("x-pod", options.name.as_str());
    let body: Body = if let Some(head) = head {
        resp = resp.header("content-type", "message/http");
        http_body_util::Either::Left(Full::new(Bytes::from(head)))
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        resp = resp.header("content-type", "application/octet-stream");
        let bytes: Vec<u8> = (0..n).map(|i| (i % 256) as u8).collect();
        http_body_util::Either::Left(Full::new(Bytes::from(bytes)))
    } else {
        resp = resp.header("content-type", "text/plain");
        let text = Bytes::from(format!("{} {target}\n", options.name));
        if path == "/chunked" {
            let (a, b) = text.split_at(text.len().min(5));
            http_body_util::Either::Right(Chunks(VecDeque::from([
                Bytes::copy_from_slice(a),
                Bytes::copy_from_slice(b),
            ])))
        } else {
            http_body_util::Either::Left(Full::new(text))
        }
    };
    let resp = resp.body(body).unwrap_or_else(|e| {
        let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(
            e.to_string(),
        ))));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    });
    if !options.quiet {
        say(format_args!("done {k} {target}"));
    }
    resp
}

/// The request line and headers as received, for a `TRACE` answer.
fn trace_head(req: &Request<Incoming>) -> String {
    let mut head = format!(
        "{} {} {:?}\r\n",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
        req.version()
    );
    for (name, value) in req.headers() {
        head.push_str(&format!(
            "{}: {}\r\n",
            name,
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    head.push_str("\r\n");
    head
}

/// A body of chunks known in advance, with no length announced: hyper
/// sends each as an HTTP/1.1 chunk.
pub struct Chunks(VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}
