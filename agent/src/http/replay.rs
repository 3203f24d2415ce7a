//! A request body that can be sent again, for retries of bodies whose length
//! is not known up front (chunked HTTP/1.1 uploads, and nearly every gRPC
//! call: gRPC clients do not send `content-length`).
//!
//! The first attempt streams the body as it arrives, without waiting for it
//! to end, and keeps a copy of every frame. A retry replays the copy and
//! then, if the client is still sending, continues with the rest of the
//! original stream. The copy is capped (`proxy.retry_buffer_bytes`, as
//! Linkerd caps its replay buffer at 64 KiB): once a body outgrows it, the
//! copy is dropped, the request streams on, and it can no longer be retried.
//! The same happens when the node-wide budget of buffered bytes
//! (`limits.buffer_memory`, [`super::budget`]) has no room for the copy.
//!
//! Only one attempt reads the client's stream at a time: the reader that
//! holds it gives it back when it is dropped. A retry is allowed only when
//! no earlier attempt still holds it (`can_replay`), e.g. an HTTP/1.1
//! connection still uploading to a server that already answered 503; the
//! original response then goes to the client rather than racing two
//! attempts for one stream.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::body::BoxError;
use super::budget::Account;

/// A replayable body; [`ReplayBody::replay`] makes the reader for the next
/// attempt.
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Frames of the copy this reader has sent.
    sent: usize,
    /// The client's stream while this reader holds it.
    inner: Option<B>,
    /// Trailers were sent (or there are none and the end was reported).
    finished: bool,
}

struct Shared<B> {
    /// The client's stream when no reader holds it; `None` while one does
    /// or once it has ended.
    inner: Option<B>,
    /// A reader holds the stream.
    held: bool,
    /// Every data frame so far, unless the body outgrew the cap.
    copy: Vec<Bytes>,
    copied: usize,
    cap: usize,
    /// The copy's share of the node-wide budget.
    account: Account,
    /// The body outgrew the cap: the copy is gone, no more replays.
    overflowed: bool,
    /// The client's stream has ended (all data is in `copy`).
    ended: bool,
    trailers: Option<HeaderMap>,
    /// The client's size hint, before anything was read.
    hint: SizeHint,
}

impl<B: Body<Data = Bytes>> ReplayBody<B> {
    /// Wraps the client's body, keeping a copy of up to `cap` bytes for as
    /// long as `account` gets them from the node-wide budget.
    pub fn new(body: B, cap: usize, account: Account) -> Self {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                inner: Some(body),
                held: false,
                copy: Vec::new(),
                copied: 0,
                cap,
                account,
                overflowed: false,
                ended,
                trailers: None,
                hint,
            })),
            sent: 0,
            inner: None,
            finished: false,
        }
    }

    /// Whether another attempt can send the whole body again: it fitted
    /// the cap so far and no earlier attempt is still reading the client.
    pub fn can_replay(&self) -> bool {
        let s = lock(&self.shared);
        !s.overflowed && !s.held
    }

    /// A reader for the next attempt, starting from the first byte.
    pub fn replay(&self) -> Self {
        ReplayBody {
            shared: self.shared.clone(),
            sent: 0,
            inner: None,
            finished: false,
        }
    }
}

fn lock<B>(m: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if this.inner.is_none() {
            let mut s = lock(&this.shared);
            if s.overflowed && this.sent > 0 {
                // The copy this reader was replaying is gone.
                return Poll::Ready(Some(Err(
                    "request body outgrew the retry buffer during a replay".into(),
                )));
            }
            if this.sent < s.copy.len() {
                let frame = s.copy[this.sent].clone();
                this.sent += 1;
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if s.ended {
                this.finished = true;
                return Poll::Ready(s.trailers.clone().map(|t| Ok(Frame::trailers(t))));
            }
            match s.inner.take() {
                Some(inner) => {
                    s.held = true;
                    this.inner = Some(inner);
                }
                None => {
                    return Poll::Ready(Some(Err(
                        "request body is still being sent by an earlier attempt".into(),
                    )));
                }
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        let mut s = lock(&this.shared);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        s.copied += data.len();
                        if s.copied > s.cap || !s.account.grow(data.len()) {
                            s.overflowed = true;
                            s.copy = Vec::new();
                            s.account.release();
                        } else {
                            s.copy.push(data.clone());
                            this.sent = s.copy.len();
                        }
                    }
                    // The client's stream ended with this frame (a gRPC
                    // call's one message, with END_STREAM): give it back
                    // now, not at the next poll. The server may answer
                    // before the attempt polls again — a gRPC server acts
                    // on the whole message, a trailers-only UNAVAILABLE is
                    // back at once — and the retry must find the body
                    // replayable, not still held.
                    if !s.overflowed && this.inner.as_ref().is_some_and(Body::is_end_stream) {
                        s.ended = true;
                        s.held = false;
                        this.inner = None;
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.ended = true;
                    this.finished = true;
                    s.held = false;
                    this.inner = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // A client that broke off its upload: nothing to replay.
                s.overflowed = true;
                s.copy = Vec::new();
                s.account.release();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.held = false;
                this.inner = None;
                this.finished = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.finished {
            return true;
        }
        if self.inner.is_some() {
            return false;
        }
        let s = lock(&self.shared);
        s.ended && !s.overflowed && self.sent >= s.copy.len() && s.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        if s.ended && !s.overflowed {
            SizeHint::with_exact(s.copied as u64)
        } else {
            s.hint
        }
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut s = lock(&self.shared);
            s.inner = Some(inner);
            s.held = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::channel::{Channel, Sender};

    fn account(max: usize) -> Account {
        crate::http::budget::BufferBudget::new(max, Default::default(), Default::default())
            .account("default/client")
    }

    fn channel() -> (Sender<Bytes>, Channel<Bytes>) {
        Channel::new(16)
    }

    async fn data(tx: &mut Sender<Bytes>, s: &'static str) {
        tx.send_data(Bytes::from(s)).await.unwrap();
    }

    async fn collect<B>(b: B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    /// A body whose last frame says it is the last (END_STREAM on a gRPC
    /// call's message) is replayable as soon as that frame is read: a
    /// response arriving before the attempt polls the body again must not
    /// find it still held.
    #[tokio::test]
    async fn a_body_is_given_back_with_its_last_frame() {
        let client = http_body_util::Full::new(Bytes::from_static(b"message"));
        let first = ReplayBody::new(client, 1024, account(1 << 20));
        let mut reader = first.replay();
        let f = reader.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "message");
        assert!(
            first.can_replay(),
            "the body is still held after its last frame"
        );
        assert!(reader.is_end_stream());
        assert!(reader.frame().await.is_none());
        let (again, trailers) = collect(first.replay()).await;
        assert_eq!(again, b"message");
        assert!(trailers.is_none());
    }

    #[tokio::test]
    async fn a_retry_replays_the_copy_then_the_rest_of_the_stream() {
        let (mut tx, body) = channel();
        let first = ReplayBody::new(body, 1024, account(1 << 20));
        let mut reader = first.replay();
        data(&mut tx, "ab").await;
        // The first attempt reads one frame, then gives up (its server
        // answered early): the stream goes back to the shared state.
        let f = reader.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(reader);
        assert!(first.can_replay());
        let retry = first.replay();
        data(&mut tx, "cd").await;
        let mut t = HeaderMap::new();
        t.insert("grpc-timeout", "1S".parse().unwrap());
        tx.send_trailers(t).await.unwrap();
        drop(tx);
        let (bytes, trailers) = collect(retry).await;
        assert_eq!(bytes, b"abcd");
        assert_eq!(trailers.unwrap()["grpc-timeout"], "1S");
        // And once more, entirely from the copy.
        let again = first.replay();
        assert_eq!(again.size_hint().exact(), Some(4));
        let (bytes, trailers) = collect(again).await;
        assert_eq!(bytes, b"abcd");
        assert!(trailers.is_some());
    }

    #[tokio::test]
    async fn a_body_over_the_cap_streams_once_and_is_not_replayed() {
        let (mut tx, body) = channel();
        let first = ReplayBody::new(body, 4, account(1 << 20));
        let reader = first.replay();
        data(&mut tx, "abc").await;
        data(&mut tx, "defg").await;
        drop(tx);
        let (bytes, _) = collect(reader).await;
        assert_eq!(bytes, b"abcdefg", "the first attempt gets every byte");
        assert!(!first.can_replay());
    }

    #[tokio::test]
    async fn a_body_the_node_wide_budget_cannot_hold_is_not_replayed() {
        let budget =
            crate::http::budget::BufferBudget::new(5, Default::default(), Default::default());
        let (mut tx, body) = channel();
        let first = ReplayBody::new(body, 1024, budget.account("default/client"));
        let reader = first.replay();
        data(&mut tx, "abc").await;
        data(&mut tx, "def").await;
        drop(tx);
        let (bytes, _) = collect(reader).await;
        assert_eq!(bytes, b"abcdef", "the first attempt gets every byte");
        assert!(!first.can_replay(), "6 bytes do not fit a budget of 5");
        assert_eq!(budget.in_use(), 0, "the partial copy is given back");
        // Within the budget, the copy holds its bytes until it goes.
        let (mut tx, body) = channel();
        let second = ReplayBody::new(body, 1024, budget.account("default/client"));
        data(&mut tx, "abcd").await;
        drop(tx);
        collect(second.replay()).await;
        assert!(second.can_replay());
        assert_eq!(budget.in_use(), 4);
        drop(second);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn no_replay_while_an_earlier_attempt_still_reads() {
        let (mut tx, body) = channel();
        let first = ReplayBody::new(body, 1024, account(1 << 20));
        let mut reader = first.replay();
        data(&mut tx, "ab").await;
        reader.frame().await.unwrap().unwrap();
        assert!(!first.can_replay(), "the reader holds the client's stream");
        drop(reader);
        assert!(first.can_replay());
    }

    #[tokio::test]
    async fn an_empty_body_is_at_its_end_at_once() {
        let first = ReplayBody::new(http_body_util::Empty::<Bytes>::new(), 16, account(1 << 20));
        let reader = first.replay();
        assert!(reader.is_end_stream());
        assert_eq!(collect(reader).await.0, b"");
        assert!(first.can_replay());
    }

    #[tokio::test]
    async fn a_client_error_ends_replays() {
        let (tx, body) = Channel::<Bytes, std::io::Error>::new(4);
        let first = ReplayBody::new(body, 1024, account(1 << 20));
        let mut reader = first.replay();
        tx.abort(std::io::Error::other("client went away"));
        assert!(reader.frame().await.unwrap().is_err());
        drop(reader);
        assert!(!first.can_replay());
    }
}
