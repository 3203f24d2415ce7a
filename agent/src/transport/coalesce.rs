//! Write coalescing for the tunnel's HTTP/2 connections: the frames that
//! many streams queue in one turn of the scheduler leave in one TLS record
//! and one `send`, instead of one each.
//!
//! Why: every pod connection carried by a tunnel connection is a task of
//! its own that writes its bytes into an HTTP/2 stream and wakes the
//! connection's task. Tokio runs a task woken by the running one next (its
//! LIFO slot), so the connection task used to flush after every single
//! stream's write: under load the agents made about two `send`s per
//! request on the tunnel, each a TLS record of a few hundred bytes and a
//! trip through the receiving node's network stack (which the sender pays
//! for on these veth paths). [`Coalesce`] answers the first flush of a
//! batch by re-queueing the task behind the tasks already waiting to run
//! (the way `tokio::task::yield_now` did before it deferred to the I/O
//! driver), so those tasks add their frames first and the flush that
//! follows writes them all at once. On an idle machine nothing else waits:
//! the task runs again at once and the cost is one more poll.
//!
//! Bytes are only ever held across a flush request for that one
//! re-queueing; writes beyond [`HIGH_WATER`] go through at once, so a bulk
//! transfer is not held up by the buffer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes buffered before a write goes through without waiting for a
/// flush: four full TLS records.
pub const HIGH_WATER: usize = 64 * 1024;

/// Where a flush is: `Idle` until a flush finds buffered bytes, `Yielded`
/// once the task has been re-queued for this batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Idle,
    Yielded,
}

/// An I/O object whose writes are gathered until the writer flushes and
/// the scheduler has run the other ready tasks once.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// How much of `buf` has been written to `inner`.
    written: usize,
    flush: Flush,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            flush: Flush::Idle,
        }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything buffered to the inner object.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Given back every time: an idle connection holds no buffer, and a
        // busy one allocates per batch, not per frame.
        self.written = 0;
        self.buf = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: past the high-water mark, what is
    /// buffered goes out first.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.pending() > 0 && self.pending() + len > HIGH_WATER {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if len >= HIGH_WATER {
            // Nothing is buffered (poll_room drained it): a large write
            // goes straight through.
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() > 0 && this.flush == Flush::Idle {
            // Re-queued behind the tasks ready to run, which may add to
            // this batch before it goes out.
            this.flush = Flush::Yielded;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.flush = Flush::Idle;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        this.flush = Flush::Idle;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// Records every write the inner object receives.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_leave_together() {
        let writes = Writes::default();
        let mut io = Coalesce::new(writes.clone());
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two").await.unwrap();
        assert!(
            writes.0.lock().unwrap().is_empty(),
            "nothing before a flush"
        );
        io.flush().await.unwrap();
        assert_eq!(*writes.0.lock().unwrap(), vec![b"one two".to_vec()]);
        // Nothing buffered: a flush goes straight through.
        io.flush().await.unwrap();
        assert_eq!(writes.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_first_flush_of_a_batch_lets_other_ready_tasks_run() {
        let writes = Writes::default();
        let mut io = Coalesce::new(writes.clone());
        io.write_all(b"a").await.unwrap();
        let mut flush = std::pin::pin!(io.flush());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(flush.as_mut().poll(&mut cx).is_pending());
        assert!(flush.as_mut().poll(&mut cx).is_ready());
        assert_eq!(*writes.0.lock().unwrap(), vec![b"a".to_vec()]);
    }

    #[tokio::test]
    async fn past_the_high_water_mark_writes_go_through() {
        let writes = Writes::default();
        let mut io = Coalesce::new(writes.clone());
        let chunk = vec![7u8; HIGH_WATER / 2 + 1];
        io.write_all(&chunk).await.unwrap();
        io.write_all(&chunk).await.unwrap();
        assert_eq!(
            writes.0.lock().unwrap().len(),
            1,
            "the first chunk went out"
        );
        let big = vec![9u8; HIGH_WATER];
        io.write_all(&big).await.unwrap();
        let w = writes.0.lock().unwrap().clone();
        assert_eq!(w.len(), 3);
        assert_eq!(w[1], chunk, "the buffered chunk before the large write");
        assert_eq!(w[2], big);
        io.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_buffered() {
        let writes = Writes::default();
        let mut io = Coalesce::new(writes.clone());
        io.write_all(b"last").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(*writes.0.lock().unwrap(), vec![b"last".to_vec()]);
    }
}
