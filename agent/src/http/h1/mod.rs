//! The HTTP/1.1 server side of the proxy: a codec of its own on
//! `httparse`, in place of hyper's HTTP/1 server connection.
//!
//! Why not hyper here: hyper's HTTP/1 connection keeps an 8 KiB write
//! buffer for its whole life and reserves an 8 KiB read buffer again
//! before every read, also while a keep-alive connection sits idle, and
//! offers no setting for either; 10,000 idle pod connections cost the
//! agent 180 MiB (bench/README.md). This server holds no buffer while a
//! connection is idle: it waits for the socket to become readable
//! ([`Io::poll_read_ready`]) and only then takes a buffer, which is
//! released again once the request is answered and nothing more is
//! buffered. It also answers in fewer system calls: the response head and
//! the first body bytes that are ready go out in one write, and a request
//! without a body needs no channel or extra task.
//!
//! What it does, as hyper did: keep-alive (HTTP/1.1 by default, HTTP/1.0
//! with `Connection: keep-alive`), pipelined requests (answered in order),
//! `Content-Length` and chunked bodies both ways with trailers (sent to a
//! client that said `TE: trailers`), `Expect: 100-continue`, upgrades
//! (`101`, see [`upgrade`]), a client's half-close while it waits for its
//! answer, a head size and header count limit (431), 400 for a malformed
//! head or ambiguous framing, a time limit for a head once it has started
//! arriving (slowloris), and a graceful stop (the connection closes when
//! idle, or after the response in flight, which then says
//! `Connection: close`). Each request is handed to the proxy's service as
//! an `http::Request` with the proxy's one body type, so routing and
//! forwarding are the same for HTTP/1 and HTTP/2 clients.

mod body;
pub mod client;
mod fitted;
mod head;
pub mod upgrade;

use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::http::body::{BoxError, ProxyBody, empty};
use crate::transport::idle::IdleIo;
use body::{BodyError, Decoded, Decoder};
use head::{Framing, Out};

pub use head::MAX_HEADERS;

/// How much a request head's buffer grows by when the head did not come
/// whole in its first read (which allocates only what arrived: [`fitted`]).
const HEAD_BUF: usize = 4096;
/// Reads of a request body.
const BODY_BUF: usize = 16 * 1024;
/// A response body frame up to this size is copied behind the head (or
/// chunk framing) to go out in the same write; a larger one is written
/// as it is.
const COALESCE: usize = 16 * 1024;
/// After refusing a head: how long, and how many bytes, the rest of what
/// the client sends is read and discarded before closing, so that the
/// client reads the refusal and a clean end instead of a reset (closing a
/// socket with unread bytes sends RST).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// A connection the server can run on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Ready once a read may find bytes (or the end), without reading:
    /// an idle connection waits here holding no buffer. It may say ready
    /// when there is nothing yet; the read that follows then waits. The
    /// default says ready at once.
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A socket read whole (the request shortcut's two queues:
/// [`crate::transport::idle::Activity::reads_whole`]) keeps its readiness
/// after a short read, so it may say
/// ready with nothing to read: the head's first read then finds `EAGAIN`
/// and waits, still without a buffer (it reads into a per-thread scratch,
/// [`fitted`]). Confirming the readiness first (a one-byte `MSG_PEEK`)
/// cost a system call per request.
impl Io for IdleIo<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().poll_read_ready(cx)
    }
}

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Largest request head (and chunked trailers) accepted.
    pub max_head: usize,
    /// How long a request head may take to arrive once it has started.
    pub header_read_timeout: Duration,
}

/// A graceful stop of one connection, asked for by the drain: kept inside
/// the connection's future (a `CancellationToken` would be one more
/// allocation per connection, and 10,000 idle connections add up).
#[derive(Default)]
pub struct Stop {
    asked: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    pub fn ask(&self) {
        self.asked.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_asked(&self) -> bool {
        self.asked.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn asked(&self) {
        let notified = self.notify.notified();
        let mut notified = pin!(notified);
        // Registered before the flag is read, so an `ask` in between is
        // not missed.
        notified.as_mut().enable();
        if self.is_asked() {
            return;
        }
        notified.await;
    }
}

/// Why a connection ended other than by a close of the client's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("request head refused ({0})")]
    Head(#[from] head::HeadError),
    #[error("request head not complete within {0:?}")]
    HeadTimeout(Duration),
    #[error("response body failed: {0}")]
    ResponseBody(BoxError),
    #[error("response body longer than its content-length")]
    ResponseTooLong,
}

/// Serves requests on `io` until the client closes, an error, or `stop`
/// (a graceful stop: an idle connection closes at once, one with a request
/// in flight after its response). `service` answers each request.
///
/// A plain function returning an `async move` block, not an `async fn`
/// (which keeps its arguments twice in its state, here 120 bytes): every
/// open connection holds this state for its life.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve<'a, I, S, F>(
    io: I,
    config: Config,
    stop: &'a Stop,
    mut service: S,
) -> impl Future<Output = Result<(), Error>> + 'a
where
    I: Io + 'a,
    S: FnMut(Request<ProxyBody>) -> F + 'a,
    F: Future<Output = Response<ProxyBody>>,
{
    // Made here, not in the block: moved into a local there, `io` would
    // be kept twice (as captured and in `conn`).
    let conn = Conn(Mutex::new(io));
    async move {
        let mut buf = BytesMut::new();
        loop {
            let Some(head) = read_head(&conn, &mut buf, &config, stop).await? else {
                return Ok(());
            };
            // Boxed: the exchange's state exists only while a request is in
            // flight, so an idle connection's future holds no room for it;
            // allocated before the future is made (`in_box`).
            let exchange = crate::in_box::in_box!(exchange(
                &conn,
                &mut buf,
                head,
                &config,
                stop,
                &mut service
            ));
            match exchange.await? {
                After::Next => {}
                After::Close => {
                    let mut io = conn.0.into_inner().unwrap_or_else(|e| e.into_inner());
                    let _ = io.shutdown().await;
                    return Ok(());
                }
                After::Upgrade(tx) => {
                    let io = conn.0.into_inner().unwrap_or_else(|e| e.into_inner());
                    let _ = tx.send(upgrade::Upgraded::new(buf.freeze(), Box::new(io)));
                    return Ok(());
                }
            }
        }
    }
}

/// What the connection does after an exchange.
enum After {
    Next,
    Close,
    /// Hand the connection over (a `101` was written).
    Upgrade(oneshot::Sender<upgrade::Upgraded>),
}

/// One request and its response.
async fn exchange<I, S, F>(
    conn: &Conn<I>,
    buf: &mut BytesMut,
    head: head::Head,
    config: &Config,
    stop: &Stop,
    service: &mut S,
) -> Result<After, Error>
where
    I: Io,
    S: FnMut(Request<ProxyBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let head::Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        te_trailers,
    } = head;
    let (parts, ()) = request.into_parts();
    let (method, version) = (parts.method.clone(), parts.version);
    let (body, reading) = match framing {
        Framing::Empty => (empty(), None),
        Framing::Length(n) => {
            let (tx, rx) = body::channel(Some(n));
            (ProxyBody::new(rx), Some((Decoder::length(n), tx)))
        }
        Framing::Chunked => {
            let (tx, rx) = body::channel(None);
            (
                ProxyBody::new(rx),
                Some((Decoder::chunked(config.max_head), tx)),
            )
        }
    };
    let mut req = Request::from_parts(parts, body);
    let upgraded = upgrade.then(|| {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut()
            .insert(upgrade::OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
        tx
    });
    if expect_continue {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    // The request body is read while the service runs and while the
    // response is written (an endpoint may answer before it has read it
    // all). `pumped`: read to its end (`Some(false)`: it broke off, and
    // its reader got the error).
    let mut pumped = reading.is_none().then_some(true);
    let mut pump = pin!(async {
        match reading {
            Some((decoder, tx)) => pump(conn, buf, decoder, tx).await,
            None => true,
        }
    });
    let mut answer = pin!(service(req));
    let resp = loop {
        tokio::select! {
            resp = &mut answer => break resp,
            done = &mut pump, if pumped.is_none() => pumped = Some(done),
        }
    };
    let mut close = !keep_alive || stop.is_asked();
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    {
        let mut write = pin!(write_response(
            conn,
            resp,
            &method,
            version,
            keep_alive,
            te_trailers,
            &mut close
        ));
        loop {
            tokio::select! {
                r = &mut write => break r,
                done = &mut pump, if pumped.is_none() => pumped = Some(done),
            }
        }
    }?;
    Ok(match (switching, upgraded) {
        (true, Some(tx)) => After::Upgrade(tx),
        (true, None) => After::Close,
        // A body not read to its end cannot be skipped to the next
        // request: the connection ends after this response.
        _ if close || pumped != Some(true) => After::Close,
        _ => After::Next,
    })
}

/// The connection, shared by the reading of a request body and the
/// writing of its response, which go on together in the connection's
/// task (a lock held only inside each poll, never across a wait).
struct Conn<I>(Mutex<I>);

impl<I: Io> Conn<I> {
    fn lock(&self) -> std::sync::MutexGuard<'_, I> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn readable(&self) -> io::Result<()> {
        poll_fn(|cx| self.lock().poll_read_ready(cx)).await
    }

    /// Reads into `buf`'s spare capacity (which the caller reserved).
    async fn read(&self, buf: &mut BytesMut) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut io = self.lock();
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
        })
        .await
    }

    /// Reads what has arrived into `buf`, allocated to fit (see
    /// [`fitted`]).
    async fn read_fitted(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut io = self.lock();
            fitted::poll_read(Pin::new(&mut *io), cx, buf, limit)
        })
        .await
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| Pin::new(&mut *self.lock()).poll_write(cx, data)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes `first` then `second`, in one system call when the socket
    /// takes both.
    async fn write_two(&self, first: &[u8], second: &[u8]) -> io::Result<()> {
        let (mut a, mut b) = (first, second);
        while !a.is_empty() {
            let bufs = [io::IoSlice::new(a), io::IoSlice::new(b)];
            let n =
                poll_fn(|cx| Pin::new(&mut *self.lock()).poll_write_vectored(cx, &bufs)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            if n < a.len() {
                a = &a[n..];
            } else {
                b = &b[n - a.len()..];
                a = &[];
            }
        }
        self.write_all(b).await
    }
}

/// Waits for the next request head. `Ok(None)`: the connection is over
/// (the client closed it between requests, or a graceful stop while
/// idle); `Ok(Some(Err))`: a head to refuse.
///
/// A head it refuses is answered here ([`refuse`]) and returned as the
/// error: awaited in [`serve`], the refusal would keep room for a head
/// beside it in every connection's future, idle ones too.
///
/// A plain function returning an `async move` block (see [`serve`]): an
/// idle connection waits in this state.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn read_head<'a, I: Io>(
    conn: &'a Conn<I>,
    buf: &'a mut BytesMut,
    config: &'a Config,
    stop: &'a Stop,
) -> impl Future<Output = Result<Option<head::Head>, Error>> + 'a {
    async move {
        // Set once a head is seen to be arriving in pieces.
        let mut deadline = None;
        loop {
            if buf.is_empty() {
                // Idle: no buffer is held while waiting for the socket to
                // become readable; a stop ends the wait (or the read, on a
                // connection that cannot wait without reading).
                *buf = BytesMut::new();
                let first = async {
                    conn.readable().await?;
                    conn.read_fitted(buf, config.max_head).await
                };
                let n = tokio::select! {
                    biased;
                    r = first => r?,
                    () = stop.asked() => return Ok(None),
                };
                if n == 0 {
                    return Ok(None);
                }
                // The head's clock starts only if this read did not bring all
                // of it (below): a head that came whole costs no clock read.
                continue;
            } else {
                let refused = match head::parse(buf) {
                    Ok(Some(h)) => return Ok(Some(h)),
                    Ok(None) if buf.len() >= config.max_head => Some(head::HeadError::TooLarge),
                    Ok(None) => None,
                    Err(e) => Some(e),
                };
                if let Some(e) = refused {
                    // Boxed, being rare.
                    Box::pin(refuse(conn, e.status())).await;
                    return Err(e.into());
                }
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len().max(HEAD_BUF));
                }
            }
            // Part of a head is here (from the first read, or pipelined behind
            // the previous request): the rest must come within the timeout.
            let d = *deadline.get_or_insert_with(|| Instant::now() + config.header_read_timeout);
            let n = tokio::time::timeout_at(d, conn.read(buf))
                .await
                .map_err(|_| Error::HeadTimeout(config.header_read_timeout))??;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

/// Answers a refused head and closes: the write side first, then what the
/// client still sends is read and dropped for a while, so it sees the
/// answer and an orderly end.
async fn refuse<I: Io>(conn: &Conn<I>, status: StatusCode) {
    if conn.write_all(&head::refusal(status)).await.is_err() {
        return;
    }
    let _ = poll_fn(|cx| Pin::new(&mut *conn.lock()).poll_shutdown(cx)).await;
    let drain = async {
        let mut sink = BytesMut::with_capacity(16 * 1024);
        let mut total = 0;
        while total < LINGER_BYTES {
            sink.clear();
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Reads a request body off the connection into its channel. True when
/// it was read to its end; false when it broke off (the error went to the
/// body's reader) or the reader went away before the end.
async fn pump<I: Io>(
    conn: &Conn<I>,
    buf: &mut BytesMut,
    mut decoder: Decoder,
    tx: body::Sender,
) -> bool {
    loop {
        let frame = match decoder.decode(buf) {
            Ok(Decoded::Data(d)) => Frame::data(d),
            Ok(Decoded::Trailers(t)) => Frame::trailers(t),
            Ok(Decoded::Done) => return true,
            Ok(Decoded::Need) => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(BODY_BUF);
                }
                let err: BoxError = match conn.read(buf).await {
                    Ok(0) => Box::new(BodyError::Incomplete),
                    Ok(_) => continue,
                    Err(e) => Box::new(e),
                };
                let _ = tx.send(Err(err)).await;
                return false;
            }
            Err(e) => {
                let _ = tx.send(Err(Box::new(e))).await;
                return false;
            }
        };
        if tx.send(Ok(frame)).await.is_err() {
            return decoder.is_done();
        }
    }
}

/// Writes one response: the head, then the body as its framing says,
/// coalescing what is ready into as few writes as it can. Sets `close`
/// when the connection cannot carry another exchange after it.
async fn write_response<I: Io>(
    conn: &Conn<I>,
    resp: Response<ProxyBody>,
    method: &http::Method,
    client: http::Version,
    keep_alive: bool,
    te_trailers: bool,
    close: &mut bool,
) -> Result<(), Error> {
    let mut out = Vec::with_capacity(512);
    let exact = resp.body().size_hint().exact();
    let framing = head::encode(&resp, method, client, exact, keep_alive, close, &mut out);
    let mut body = resp.into_body();
    if framing == Out::None {
        conn.write_all(&out).await?;
        return Ok(());
    }
    let mut sent: u64 = 0;
    let mut trailers = None;
    loop {
        // What the body has ready goes behind what is not written yet;
        // only when it has nothing ready is the pending data written.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    conn.write_all(&out).await?;
                    out.clear();
                }
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                // The client cannot be told but by the connection's end;
                // what was ready goes first.
                *close = true;
                let _ = conn.write_all(&out).await;
                return Err(Error::ResponseBody(e));
            }
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            Out::Length(n) if sent > n => {
                *close = true;
                let _ = conn.write_all(&out).await;
                return Err(Error::ResponseTooLong);
            }
            Out::Chunked => {
                let _ = write!(out, "{:x}\r\n", data.len());
                push(conn, &mut out, data).await?;
                out.extend_from_slice(b"\r\n");
            }
            _ => push(conn, &mut out, data).await?,
        }
    }
    match framing {
        Out::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let (Some(t), true) = (trailers, te_trailers) {
                head::put_fields(&mut out, &t);
            }
            out.extend_from_slice(b"\r\n");
        }
        Out::Length(n) if sent < n => *close = true,
        _ => {}
    }
    if !out.is_empty() {
        conn.write_all(&out).await?;
    }
    Ok(())
}

/// Appends body bytes behind `out`, or writes both when the bytes are
/// large (no copy of a bulk body).
async fn push<I: Io>(conn: &Conn<I>, out: &mut Vec<u8>, data: Bytes) -> io::Result<()> {
    if data.len() <= COALESCE {
        out.extend_from_slice(&data);
        return Ok(());
    }
    conn.write_two(out, &data).await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
