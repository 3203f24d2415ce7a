//! Reads whose buffer is the size of what arrived.
//!
//! The first read of a request or response head used to reserve a whole
//! read buffer (4 KiB for a request, 8 KiB for a response) for a head of
//! a few hundred bytes. With jemalloc, blocks that size are one to a slab:
//! every such buffer took a slab from the arena and gave it back when the
//! message was done, and the profile of the one-hop L7 path showed the
//! allocator's slow path (tcache refills, slab allocation and flushes) on
//! every request. Here the socket is read into a per-thread scratch
//! buffer, and only what arrived is copied into the message's buffer: an
//! exactly sized small allocation, which jemalloc serves from its
//! thread cache. The copy is of the bytes that arrived, which the parser
//! reads next anyway.
//!
//! A read that fills the scratch buffer is copied whole and the caller
//! goes on reading into its own buffer as before (a large head or a body
//! that came with it), so nothing is bounded by the scratch size.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

/// The scratch buffer's size: larger than nearly every head, so one read
/// takes a head whole; one per thread that serves connections.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Reads once from `io`, at most `limit` bytes, and appends what arrived
/// to `buf`, growing it by exactly that much. `Ok(0)`: the end of the
/// stream. The limit keeps a head limit exact: a read never takes more
/// than the caller would have reserved for it.
pub fn poll_read<R: AsyncRead + ?Sized>(
    io: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    limit: usize,
) -> Poll<io::Result<usize>> {
    BUF.with(|scratch| {
        // Not re-entered (a read does not read another connection), but if
        // it ever were, reading into the caller's buffer is still right.
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            let mut part = BytesMut::with_capacity(limit.min(SCRATCH));
            let n = ready!(tokio_util::io::poll_read_buf(io, cx, &mut part))?;
            buf.extend_from_slice(&part);
            return Poll::Ready(Ok(n));
        };
        let mut rb = ReadBuf::new(&mut scratch[..limit.min(SCRATCH)]);
        ready!(io.poll_read(cx, &mut rb))?;
        let got = rb.filled();
        buf.extend_from_slice(got);
        Poll::Ready(Ok(got.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_small_read_allocates_what_arrived_and_a_large_one_all_of_it() {
        let (mut tx, mut rx) = tokio::io::duplex(64 * 1024);
        tx.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let n = poll_fn(|cx| poll_read(Pin::new(&mut rx), cx, &mut buf, usize::MAX))
            .await
            .unwrap();
        assert_eq!(n, 38);
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(buf.capacity() < 64, "capacity {}", buf.capacity());

        // More than the scratch holds: one read takes a scratch's worth,
        // the next the rest, appended behind what is already there.
        let big: Vec<u8> = (0..SCRATCH + 100).map(|i| (i % 251) as u8).collect();
        tx.write_all(&big).await.unwrap();
        let mut buf = BytesMut::from(&b"x"[..]);
        let mut got = 0;
        while got < big.len() {
            got += poll_fn(|cx| poll_read(Pin::new(&mut rx), cx, &mut buf, usize::MAX))
                .await
                .unwrap();
        }
        assert_eq!(&buf[1..], &big[..]);

        // A limit below what is there: only that much is taken.
        tx.write_all(b"0123456789").await.unwrap();
        let mut buf = BytesMut::new();
        let n = poll_fn(|cx| poll_read(Pin::new(&mut rx), cx, &mut buf, 4))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (4, &b"0123"[..]));
        let n = poll_fn(|cx| poll_read(Pin::new(&mut rx), cx, &mut buf, 100))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (6, &b"0123456789"[..]));

        drop(tx);
        let n = poll_fn(|cx| poll_read(Pin::new(&mut rx), cx, &mut buf, usize::MAX))
            .await
            .unwrap();
        assert_eq!(n, 0, "the end of the stream");
    }
}
