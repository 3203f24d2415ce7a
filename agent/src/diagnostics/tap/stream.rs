//! A tap's stream: the body of a `/tap` response, newline-delimited JSON
//! read from the tap's bounded channel as the admin connection can take it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::event::Event;
use super::{Sink, TapHub};

/// The stream of one open tap. Dropping it (hyper does when the client goes
/// away) closes the tap.
pub struct TapStream {
    hub: Arc<TapHub>,
    sink: Arc<Sink>,
    rx: mpsc::Receiver<Bytes>,
    /// Ready once the tap has shown `max` requests to their end.
    done: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    finished: bool,
}

impl TapStream {
    pub(super) fn new(
        hub: Arc<TapHub>,
        sink: Arc<Sink>,
        rx: mpsc::Receiver<Bytes>,
        duration: Option<Duration>,
    ) -> Self {
        let done = Some(Box::pin(sink.done.clone().cancelled_owned()));
        TapStream {
            hub,
            sink,
            rx,
            done,
            deadline: duration.map(|d| Box::pin(tokio::time::sleep(d))),
            finished: false,
        }
    }

    fn stop(&mut self) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.finished = true;
        self.hub.close(&self.sink);
        Poll::Ready(None)
    }
}

impl Body for TapStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        // Events lost while the consumer was behind: say so first.
        let dropped = this.sink.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let line = Event::Dropped { count: dropped }.to_line();
            return Poll::Ready(Some(Ok(Frame::data(line))));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(line)) => return Poll::Ready(Some(Ok(Frame::data(line)))),
            Poll::Ready(None) => return this.stop(),
            Poll::Pending => {}
        }
        let timed_out = this
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        let done = match this.done.as_mut() {
            Some(d) => d.as_mut().poll(cx).is_ready(),
            None => true,
        };
        if done {
            this.done = None;
        }
        if timed_out || done {
            // The last `end` was queued before the tap was marked done;
            // deliver what is queued, then end.
            if let Ok(line) = this.rx.try_recv() {
                return Poll::Ready(Some(Ok(Frame::data(line))));
            }
            return this.stop();
        }
        Poll::Pending
    }
}

impl Drop for TapStream {
    fn drop(&mut self) {
        self.hub.close(&self.sink);
    }
}
