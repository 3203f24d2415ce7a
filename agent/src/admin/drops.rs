//! `GET /drops?window=1m[&pod=NAME]`: the kernel's drop, retransmit, reset
//! and traffic counters per pod over a window, as JSON.
//! `GET /drops/follow[?pod=NAME]`: drop and reset events as they happen,
//! one JSON object a line, until the client goes away.

use super::stats::Query;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use tokio::sync::{broadcast, mpsc};

use super::AdminState;
use super::routes::{Body, text, with_type};

/// The window when none is asked for.
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Lines a slow follower may have in flight before it misses events.
const FOLLOW_BUFFER: usize = 256;

const NOT_RUNNING: &str = "the kernel diagnostics are not running on this agent (disabled, or the kernel refused them: see the agent's log)\n";

pub fn report(state: &AdminState, query: Option<&str>) -> Response<Body> {
    let Some(kernel) = &state.kernel else {
        return text(StatusCode::SERVICE_UNAVAILABLE, NOT_RUNNING.into());
    };
    let query = match Query::parse(query) {
        Ok(q) => q,
        Err((status, msg)) => return text(status, msg + "\n"),
    };
    let window = match query.get("window") {
        None => DEFAULT_WINDOW,
        Some(w) => match humantime::parse_duration(w) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("window={w} is not a duration such as 30s, 5m or 1h\n"),
                );
            }
        },
    };
    let pod = query.get("pod");
    let node = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .node
        .name
        .clone();
    match kernel.report(&node, window, pod) {
        Ok(r) => match serde_json::to_string_pretty(&r) {
            Ok(json) => with_type(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the report: {e}\n"),
            ),
        },
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the kernel counters: {e}\n"),
        ),
    }
}

pub fn follow(state: &AdminState, query: Option<&str>) -> Response<Body> {
    let Some(kernel) = &state.kernel else {
        return text(StatusCode::SERVICE_UNAVAILABLE, NOT_RUNNING.into());
    };
    let pod = match Query::parse(query) {
        Ok(q) => q.get("pod").map(str::to_string),
        Err((status, msg)) => return text(status, msg + "\n"),
    };
    let mut events = kernel.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(FOLLOW_BUFFER);
    tokio::spawn(async move {
        loop {
            let line = tokio::select! {
                // The client went away: stop following.
                _ = tx.closed() => return,
                e = events.recv() => match e {
                    Ok(event) => {
                        if pod.as_ref().is_some_and(|p| *p != event.pod) {
                            continue;
                        }
                        match serde_json::to_string(&*event) {
                            Ok(json) => json,
                            Err(_) => continue,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        format!("{{\"missed\":{n}}}")
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Bytes::from(line + "\n")).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(LineStream(rx).boxed_unsync());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// A response body fed line by line from a channel.
struct LineStream(mpsc::Receiver<Bytes>);

impl hyper::body::Body for LineStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}
