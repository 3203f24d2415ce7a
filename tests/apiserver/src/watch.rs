//! Watch streams: newline-delimited JSON events over a chunked response,
//! from the history replay or the current state, then live writes, with
//! bookmarks, `timeoutSeconds`, and selectors applied per event the way the
//! watch cache applies them (an object that stops matching is DELETED).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::resources::ResourceType;
use crate::selector::Selectors;
use crate::status::ApiError;
use crate::store::{Event, EventType, WatchStart};

/// A response body fed by the watch's producer task; the stream ends when
/// the producer drops its sender.
pub struct EventBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// What one watch request asked for.
pub struct WatchRequest {
    pub resource: ResourceType,
    pub version: String,
    pub namespace: Option<String>,
    pub selectors: Selectors,
    pub bookmarks: bool,
    pub send_initial: bool,
    pub timeout: Option<Duration>,
}

/// Signals that end a watch from outside: a "drop all watches" knob and the
/// server's shutdown.
pub struct Stoppers {
    pub drop_all: watch::Receiver<u64>,
    pub shutdown: watch::Receiver<bool>,
    pub bookmark_interval: Duration,
}

impl WatchRequest {
    fn visible(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && self.selectors.matches(obj)
    }

    fn render(&self, mut obj: Value) -> Value {
        obj["apiVersion"] = self.resource.api_version(&self.version).into();
        obj["kind"] = self.resource.kind.clone().into();
        obj
    }

    /// The event this watcher sees for a write, if any.
    fn convert(&self, ev: &Event) -> Option<(EventType, Value)> {
        if ev.group != self.resource.group || ev.resource != self.resource.plural {
            return None;
        }
        let now = self.visible(&ev.object);
        let before = ev.prev.as_ref().is_some_and(|p| self.visible(p));
        match ev.kind {
            EventType::Added if now => Some((EventType::Added, ev.object.clone())),
            EventType::Deleted if now => Some((EventType::Deleted, ev.object.clone())),
            EventType::Modified => match (before, now) {
                (true, true) => Some((EventType::Modified, ev.object.clone())),
                (false, true) => Some((EventType::Added, ev.object.clone())),
                (true, false) => {
                    // The previous state, at the write's resourceVersion.
                    let mut gone = ev.prev.clone().unwrap_or(Value::Null);
                    gone["metadata"]["resourceVersion"] = ev.rv.to_string().into();
                    Some((EventType::Deleted, gone))
                }
                (false, false) => None,
            },
            _ => None,
        }
    }

    fn line(&self, kind: &str, obj: Value) -> Bytes {
        let mut text = json!({"type": kind, "object": obj}).to_string();
        text.push('\n');
        Bytes::from(text)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({
            "kind": self.resource.kind,
            "apiVersion": self.resource.api_version(&self.version),
            "metadata": meta,
        });
        self.line("BOOKMARK", obj)
    }
}

/// A body holding one ERROR event: how a watch from a compacted
/// resourceVersion fails (with 200 OK, as the watch cache answers).
pub fn error_body(err: &ApiError) -> EventBody {
    let (tx, rx) = mpsc::channel(1);
    let mut line = json!({"type": "ERROR", "object": err.to_status()}).to_string();
    line.push('\n');
    let _ = tx.try_send(Bytes::from(line));
    EventBody { rx }
}

/// Starts the producer of a watch stream and returns its body.
pub fn stream(req: WatchRequest, start: WatchStart, stoppers: Stoppers) -> EventBody {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(produce(req, start, stoppers, tx));
    EventBody { rx }
}

async fn produce(
    req: WatchRequest,
    start: WatchStart,
    mut stop: Stoppers,
    tx: mpsc::Sender<Bytes>,
) {
    let WatchStart {
        replay,
        initial,
        rv,
        mut live,
    } = start;
    let mut last_rv = rv;
    for obj in initial.into_iter().filter(|o| req.visible(o)) {
        let line = req.line("ADDED", req.render(obj));
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if req.send_initial && req.bookmarks && tx.send(req.bookmark(rv, true)).await.is_err() {
        return;
    }
    for ev in replay {
        if let Some((kind, obj)) = req.convert(&ev)
            && tx
                .send(req.line(kind.as_str(), req.render(obj)))
                .await
                .is_err()
        {
            return;
        }
    }
    // A timeout too large to add is no timeout.
    let deadline = req.timeout.and_then(|t| Instant::now().checked_add(t));
    let mut ticker = tokio::time::interval_at(
        Instant::now() + stop.bookmark_interval,
        stop.bookmark_interval,
    );
    // Mark the current values seen, so only a change ends the stream.
    stop.drop_all.borrow_and_update();
    stop.shutdown.borrow_and_update();
    loop {
        let line = tokio::select! {
            ev = live.recv() => match ev {
                Ok(ev) if ev.rv <= last_rv => continue,
                Ok(ev) => {
                    last_rv = ev.rv;
                    match req.convert(&ev) {
                        Some((kind, obj)) => req.line(kind.as_str(), req.render(obj)),
                        None => continue,
                    }
                }
                // A watcher too slow to keep up is closed; the client
                // re-watches from its last resourceVersion.
                Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = ticker.tick(), if req.bookmarks => req.bookmark(last_rv, false),
            _ = sleep_until(deadline) => return,
            _ = stop.drop_all.changed() => return,
            _ = stop.shutdown.changed() => return,
            _ = tx.closed() => return,
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
