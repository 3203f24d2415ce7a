//! Bidirectional byte copy between the client and upstream sockets.
//!
//! Each direction has its own loop so a half-close (one side sends FIN while
//! still reading) is forwarded as a `shutdown(SHUT_WR)` and the other
//! direction keeps flowing. Backpressure is natural: a direction does not
//! read again until its last chunk is fully written.
//!
//! Memory: an idle connection holds no buffer. A direction allocates only
//! once its socket is readable, starts small and doubles while reads fill the
//! buffer (a bulk transfer), and gives the buffer back once the socket has
//! been drained — so 10,000 idle connections cost almost nothing while a bulk
//! stream still moves large chunks per syscall.

use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;

/// First buffer of a direction: enough for a typical request or response.
const MIN_BUF: usize = 8 * 1024;
/// Largest buffer a bulk direction grows to.
const MAX_BUF: usize = 256 * 1024;

/// Which socket an I/O error came from; decides how the other side is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

#[derive(Debug)]
pub struct CopyError {
    pub side: Side,
    pub error: io::Error,
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = match self.side {
            Side::Client => "client",
            Side::Upstream => "upstream",
        };
        write!(f, "{side} socket: {}", self.error)
    }
}

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Live byte counters updated as data moves (not only at close), so a
/// long-lived connection shows up in metrics while it runs.
pub struct Counters {
    pub client_to_upstream: Counter,
    pub upstream_to_client: Counter,
    /// Touched whenever bytes move, for the idle timeout (`None`: none).
    pub activity: Option<std::sync::Arc<super::idle::Activity>>,
}

/// Copies both ways until both directions have seen EOF, or fails on the
/// first I/O error. `t` counts as bytes move, so it is right also when the
/// copy ends in an error or is cancelled (a drain).
pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    counters: &Counters,
    t: &mut Transferred,
) -> Result<(), CopyError> {
    let (cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let u2c = pump(
        &mut ur,
        &mut cw,
        Side::Upstream,
        Side::Client,
        &counters.upstream_to_client,
        counters.activity.as_deref(),
        &mut t.upstream_to_client,
    );
    client_to_upstream(cr, &mut uw, counters, &mut t.client_to_upstream, u2c).await
}

/// Runs the client's direction next to `other` (the upstream's), reading
/// the client as [`super::idle::Activity::reads_whole`] says.
async fn client_to_upstream<W: AsyncWrite + Unpin>(
    mut cr: ReadHalf<'_>,
    uw: &mut W,
    counters: &Counters,
    total: &mut u64,
    other: impl std::future::Future<Output = Result<(), CopyError>>,
) -> Result<(), CopyError> {
    if counters
        .activity
        .as_deref()
        .is_some_and(super::idle::Activity::reads_whole)
    {
        client_pump(&mut Whole(cr), uw, counters, total, other).await
    } else {
        client_pump(&mut cr, uw, counters, total, other).await
    }
}

/// [`client_to_upstream`] with the client read through `from`.
async fn client_pump<W: AsyncWrite + Unpin>(
    from: &mut impl Source,
    uw: &mut W,
    counters: &Counters,
    total: &mut u64,
    other: impl std::future::Future<Output = Result<(), CopyError>>,
) -> Result<(), CopyError> {
    let c2u = pump(
        from,
        uw,
        Side::Client,
        Side::Upstream,
        &counters.client_to_upstream,
        counters.activity.as_deref(),
        total,
    );
    tokio::try_join!(c2u, other).map(|_| ())
}

/// The same with any byte stream upstream (a tunnel stream): the client
/// side keeps the socket's read-readiness wait (no buffer while idle).
pub async fn bidirectional_io<U: AsyncRead + AsyncWrite + Unpin>(
    client: &mut TcpStream,
    upstream: U,
    counters: &Counters,
    t: &mut Transferred,
) -> Result<(), CopyError> {
    let (cr, mut cw) = client.split();
    let (ur, mut uw) = tokio::io::split(upstream);
    let mut ur = Stream(ur);
    let u2c = pump(
        &mut ur,
        &mut cw,
        Side::Upstream,
        Side::Client,
        &counters.upstream_to_client,
        counters.activity.as_deref(),
        &mut t.upstream_to_client,
    );
    client_to_upstream(cr, &mut uw, counters, &mut t.client_to_upstream, u2c).await
}

/// Where a direction reads from.
trait Source {
    /// Reads up to `size` bytes into `buf` (emptied first); 0 is EOF.
    async fn read_into(&mut self, buf: &mut Vec<u8>, size: usize) -> io::Result<usize>;
}

/// A socket: wait until readable before taking a buffer, so an idle
/// connection holds none; read into uninitialised spare capacity.
///
/// The read itself is `poll_read`, not `try_read_buf`: tokio takes a read
/// that did not fill the buffer as proof that the socket is drained and
/// forgets its readiness, so the next wait parks at once instead of
/// costing a `recv` that answers `EAGAIN` (`try_read_buf` keeps the
/// readiness: one wasted system call per chunk, a request's worth on an
/// HTTP stream).
impl Source for ReadHalf<'_> {
    async fn read_into(&mut self, buf: &mut Vec<u8>, size: usize) -> io::Result<usize> {
        self.as_ref().ready(Interest::READABLE).await?;
        if buf.capacity() < size {
            *buf = Vec::with_capacity(size);
        }
        buf.clear();
        self.read_buf(buf).await
    }
}

/// A client socket the request shortcut may redirect into: the same wait,
/// then reads that keep the readiness until one answers `EAGAIN` (see
/// [`super::idle::ReadWhole`]).
struct Whole<'a>(ReadHalf<'a>);

impl Source for Whole<'_> {
    async fn read_into(&mut self, buf: &mut Vec<u8>, size: usize) -> io::Result<usize> {
        loop {
            self.0.as_ref().ready(Interest::READABLE).await?;
            if buf.capacity() < size {
                *buf = Vec::with_capacity(size);
            }
            buf.clear();
            match self.0.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The readiness was left from a short read: wait for
                    // the next edge holding no buffer, as above.
                    *buf = Vec::new();
                    continue;
                }
                read => return read,
            }
        }
    }
}

/// Any other reader (a tunnel stream): it has no readiness to wait on, so
/// an idle direction first waits with a zero-length read. A tunnel stream
/// (hyper's HTTP/2 upgrade) parks that read until the peer sends a DATA
/// frame or ends the stream and keeps the frame it received; only then is a
/// buffer taken. A reader that answers a zero-length read at once costs
/// one extra call, and waits in the real read, with its buffer, as before.
struct Stream<R>(R);

impl<R: AsyncRead + Unpin> Source for Stream<R> {
    async fn read_into(&mut self, buf: &mut Vec<u8>, size: usize) -> io::Result<usize> {
        if buf.capacity() == 0 {
            // Into no room, the amount is 0 by construction: it only waits.
            let waited = self.0.read(&mut []).await?;
            debug_assert_eq!(waited, 0);
        }
        if buf.capacity() < size {
            *buf = Vec::with_capacity(size);
        }
        buf.clear();
        self.0.read_buf(buf).await
    }
}

/// One direction: read until EOF, forward, then half-close the writer.
async fn pump<W: AsyncWrite + Unpin>(
    from: &mut impl Source,
    to: &mut W,
    from_side: Side,
    to_side: Side,
    counter: &Counter,
    activity: Option<&super::idle::Activity>,
    total: &mut u64,
) -> Result<(), CopyError> {
    let mut size = MIN_BUF;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let n = from
            .read_into(&mut buf, size)
            .await
            .map_err(|error| CopyError {
                side: from_side,
                error,
            })?;
        if n == 0 {
            // EOF from this side: forward the half-close and stop this
            // direction; the other one keeps running.
            to.shutdown().await.map_err(|error| CopyError {
                side: to_side,
                error,
            })?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|error| CopyError {
            side: to_side,
            error,
        })?;
        *total += n as u64;
        counter.inc_by(n as u64);
        if let Some(a) = activity {
            match from_side {
                Side::Client => a.moved_out(n as u64),
                Side::Upstream => a.moved_in(n as u64),
            }
        }
        if n >= size {
            size = (size * 2).min(MAX_BUF);
        } else {
            // The socket is drained: let an idle connection hold no buffer.
            size = MIN_BUF;
            buf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn counters() -> Counters {
        Counters {
            client_to_upstream: Counter::default(),
            upstream_to_client: Counter::default(),
            activity: None,
        }
    }

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close() {
        // app_client <-> (proxy_client ... proxy_upstream) <-> app_server
        let (mut app_client, mut proxy_client) = pair().await;
        let (mut proxy_upstream, mut app_server) = pair().await;
        let c = counters();
        let proxy = tokio::spawn(async move {
            let c = c;
            let mut t = Transferred::default();
            bidirectional(&mut proxy_client, &mut proxy_upstream, &c, &mut t)
                .await
                .unwrap();
            (t, c.client_to_upstream.get(), c.upstream_to_client.get())
        });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            app_client.write_all(&sent).await.unwrap();
            // Half-close: we still expect the server's answer afterwards.
            app_client.shutdown().await.unwrap();
            let mut answer = String::new();
            app_client.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let mut got = Vec::new();
        app_server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        app_server.write_all(b"got it").await.unwrap();
        app_server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), "got it");
        let (t, c2u, u2c) = proxy.await.unwrap();
        assert_eq!(t.client_to_upstream, 3_000_000);
        assert_eq!(t.upstream_to_client, 6);
        assert_eq!(c2u, 3_000_000);
        assert_eq!(u2c, 6);
    }

    #[tokio::test]
    async fn upstream_reset_is_an_upstream_error() {
        let (_app_client, mut proxy_client) = pair().await;
        let (mut proxy_upstream, app_server) = pair().await;
        // Abortive close: SO_LINGER 0 makes close() send RST.
        socket2::SockRef::from(&app_server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(app_server);
        let c = counters();
        let mut t = Transferred::default();
        let err = bidirectional(&mut proxy_client, &mut proxy_upstream, &c, &mut t)
            .await
            .unwrap_err();
        assert_eq!(err.side, Side::Upstream, "{err}");
    }
}
