//! Counting the HTTP/2 streams the agent refuses a pod.
//!
//! The h2 layer enforces `limits.h2_max_concurrent_streams` by itself: a
//! stream opened beyond it (a client that has not read the agent's
//! SETTINGS yet, or ignores them) is answered with `RST_STREAM
//! REFUSED_STREAM` and never reaches the agent's code, and h2 keeps no
//! count of it. [`RefusedStreams`] sits under hyper on the pod's
//! connection and reads the frame headers the agent writes: each
//! `RST_STREAM` carrying `REFUSED_STREAM` (RFC 9113 §8.7: the stream was
//! not processed) is one refused stream, counted with the pod
//! (`waymark_limit_refused_total{pod,limit="h2_streams"}`). The agent
//! itself refuses streams in no other way (a drain sends GOAWAY), so the
//! count is the limit's.
//!
//! Only the server's side is read, and only headers: nine bytes per frame,
//! four more for a reset; payloads are skipped without copying.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The limit label of streams refused by `limits.h2_max_concurrent_streams`.
pub const LIMIT: &str = "h2_streams";

const FRAME_HEADER: usize = 9;
const RST_STREAM: u8 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

/// Reads the frames of one direction of an HTTP/2 connection that starts
/// with a frame (a server's side: no client preface).
#[derive(Debug, Default)]
pub struct FrameScan {
    /// The frame header being read, and how much of it is in.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    /// The current frame is a 4-byte `RST_STREAM`: its error code so far.
    code: Option<(u32, usize)>,
}

impl FrameScan {
    /// Feeds bytes as they were written; returns how many `RST_STREAM
    /// REFUSED_STREAM` frames ended in them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut refused = 0;
        while !bytes.is_empty() {
            if let Some((code, got)) = &mut self.code {
                let take = (4 - *got).min(bytes.len());
                for b in &bytes[..take] {
                    *code = (*code << 8) | u32::from(*b);
                }
                *got += take;
                bytes = &bytes[take..];
                if *got == 4 {
                    if *code & 0x7fff_ffff == REFUSED_STREAM {
                        refused += 1;
                    }
                    self.code = None;
                }
                continue;
            }
            if self.skip > 0 {
                let take = self.skip.min(bytes.len());
                self.skip -= take;
                bytes = &bytes[take..];
                continue;
            }
            let take = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == FRAME_HEADER {
                self.have = 0;
                let h = &self.header;
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                if h[3] == RST_STREAM && len == 4 {
                    self.code = Some((0, 0));
                } else {
                    self.skip = len;
                }
            }
        }
        refused
    }
}

/// A pod's HTTP/2 connection whose refused streams are counted.
pub struct RefusedStreams<T> {
    inner: T,
    scan: FrameScan,
    refused: Counter,
}

impl<T> RefusedStreams<T> {
    pub fn new(inner: T, refused: Counter) -> Self {
        RefusedStreams {
            inner,
            scan: FrameScan::default(),
            refused,
        }
    }

    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        for b in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(b.len());
            let refused = self.scan.feed(&b[..take]);
            if refused > 0 {
                self.refused.inc_by(refused);
            }
            n -= take;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RefusedStreams<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RefusedStreams<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(&[io::IoSlice::new(buf)], n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(bufs, n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn server_side() -> Vec<u8> {
        let mut out = frame(0x4, 0, &[0, 3, 0, 0, 0, 7]); // SETTINGS
        out.extend(frame(0x1, 1, &[0x88])); // HEADERS
        out.extend(frame(RST_STREAM, 3, &REFUSED_STREAM.to_be_bytes()));
        // A payload that looks like a reset must not count.
        out.extend(frame(0x0, 1, &frame(RST_STREAM, 5, &[0, 0, 0, 7])));
        out.extend(frame(RST_STREAM, 5, &[0, 0, 0, 0x8])); // CANCEL
        out.extend(frame(RST_STREAM, 7, &REFUSED_STREAM.to_be_bytes()));
        out.extend(frame(0x7, 0, &[0; 8])); // GOAWAY
        out
    }

    #[test]
    fn refused_resets_are_counted_however_the_writes_split() {
        let bytes = server_side();
        assert_eq!(FrameScan::default().feed(&bytes), 2);
        for split in 1..bytes.len() {
            let mut scan = FrameScan::default();
            let n: u64 = bytes.chunks(split).map(|c| scan.feed(c)).sum();
            assert_eq!(n, 2, "writes of {split} bytes");
        }
    }

    #[tokio::test]
    async fn a_short_vectored_write_counts_only_what_was_written() {
        use tokio::io::AsyncReadExt as _;
        let bytes = server_side();
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let counter = Counter::default();
        let mut io = RefusedStreams::new(a, counter.clone());
        // Everything up to the middle of the first reset's error code.
        // SETTINGS (15 bytes), HEADERS (10), the reset's header and half
        // its code.
        let cut = 15 + 10 + 9 + 2;
        let (head, tail) = bytes.split_at(cut);
        let n = std::future::poll_fn(|cx| {
            Pin::new(&mut io).poll_write_vectored(cx, &[io::IoSlice::new(head)])
        })
        .await
        .unwrap();
        assert_eq!((n, counter.get()), (cut, 0));
        tokio::io::AsyncWriteExt::write_all(&mut io, tail)
            .await
            .unwrap();
        assert_eq!(counter.get(), 2);
        let mut seen = vec![0; bytes.len()];
        b.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, bytes);
    }
}
