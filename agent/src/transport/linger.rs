//! Closing a connection without throwing away what is still on its way.
//!
//! A TCP socket closed while bytes from the peer wait unread in it is
//! aborted by the kernel: it answers with a reset and drops everything
//! still in its own send queue, and the peer loses the end of what it was
//! being sent. On an HTTP/2 connection the peer keeps sending as it reads
//! (`WINDOW_UPDATE`s, `PING` answers), so a connection that ends right
//! after its last stream's data was written — a draining agent's tunnel
//! connection, whose last download is still in the kernel's buffers — is
//! closed with unread bytes almost every time (a rollout test lost the last
//! 380 KB of a 256 MiB transfer so). [`Linger`] shuts down its write side
//! instead (TLS `close_notify`, then a FIN after every queued byte) and
//! reads and discards until the peer closes too, as nginx's
//! `lingering_close` does, for at most a bounded time.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::coalesce::Coalesce;

/// How long an ending HTTP/2 connection (the tunnel's, a pod's) waits for
/// its peer to close after its own side is shut: a peer taking the last of
/// a download at a few MB/s needs well under a second; one that never
/// closes costs this.
pub const PEER_WAIT: Duration = Duration::from_secs(5);

/// The I/O an HTTP/2 connection over a socket runs on: its streams'
/// frames gathered into few writes ([`Coalesce`]), and shut down rather
/// than dropped at its end, waiting at most [`PEER_WAIT`] for the peer
/// ([`Linger`]), so that what is still on its way to the peer arrives.
pub fn h2_io<T>(io: T) -> Coalesce<Linger<T>> {
    Coalesce::new(Linger::new(io, PEER_WAIT))
}

/// An I/O object whose shutdown waits for the peer to close.
pub struct Linger<T> {
    inner: T,
    /// The longest a shutdown waits for the peer, from the shutdown.
    wait: Duration,
    state: State,
}

enum State {
    Open,
    /// Our side is shut; reading what the peer still sends until it closes
    /// or the deadline passes.
    Draining(Pin<Box<Sleep>>),
    Closed,
}

impl<T> Linger<T> {
    pub fn new(inner: T, wait: Duration) -> Self {
        Self {
            inner,
            wait,
            state: State::Open,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Linger<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Open => {
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    this.state = State::Draining(Box::pin(tokio::time::sleep(this.wait)));
                }
                State::Draining(deadline) => {
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                        // More from the peer: discarded, read on.
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                        // The peer closed (or the connection failed): done.
                        Poll::Ready(_) => this.state = State::Closed,
                        Poll::Pending => {
                            ready!(deadline.as_mut().poll(cx));
                            this.state = State::Closed;
                        }
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_shutdown_reads_until_the_peer_closes() {
        let (mut peer, ours) = pair().await;
        let mut ours = Linger::new(ours, Duration::from_secs(10));
        ours.write_all(b"last words").await.unwrap();
        // Unread bytes from the peer, as a reset would be made of.
        peer.write_all(b"window update").await.unwrap();
        let shut = tokio::spawn(async move { ours.shutdown().await });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
        // More from the peer is read and dropped; its close ends the wait.
        peer.write_all(b"more").await.unwrap();
        assert!(!shut.is_finished());
        drop(peer);
        tokio::time::timeout(Duration::from_secs(5), shut)
            .await
            .expect("the shutdown ended when the peer closed")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_never_closes_is_waited_for_no_longer_than_the_bound() {
        let (_peer, ours) = pair().await;
        let mut ours = Linger::new(ours, Duration::from_millis(300));
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), ours.shutdown())
            .await
            .expect("the shutdown gave up waiting")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
