//! The HTTP/1.1 client side: one request on one upstream connection, in the
//! task of the request that sends it.
//!
//! hyper's client runs each connection in a task of its own and hands the
//! request to it, and the response and each body frame back, through
//! channels: three task hand-offs per request on the data path. Here the
//! request's own task writes the request and reads the response head; a
//! response whose body arrived with its head (most small ones) is
//! complete before it is returned, and the connection goes back to its
//! pool at once. A longer body is read by whoever polls the response body
//! (the client's connection task, for an HTTP/1 client), and the
//! connection goes back when the body has ended. A connection idle in a
//! pool holds no buffer.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::body::{Decoded, Decoder};
use super::head::{
    Framing, MAX_HEADERS, Spans, chunked_last, content_length, has_token, header_map, put_fields,
};
use super::upgrade::{OnUpgrade, UpgradeIo, Upgraded};
use crate::http::body::{BoxError, ProxyBody, empty, full};

/// Largest response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 96 * 1024;
const READ_BUF: usize = 8 * 1024;

/// An upstream HTTP/1.1 connection between requests.
pub struct ClientConn<I> {
    io: I,
}

impl<I> ClientConn<I> {
    pub fn new(io: I) -> Self {
        ClientConn { io }
    }

    pub fn get_ref(&self) -> &I {
        &self.io
    }
}

/// Why a request failed on its connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection closed before message completed")]
    Incomplete,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("malformed response head from the endpoint")]
    Malformed,
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body failed: {0}")]
    RequestBody(BoxError),
}

impl ClientError {
    /// The connection ended before the response did (the endpoint closed
    /// a keep-alive connection as the request went out, say).
    pub fn is_incomplete_message(&self) -> bool {
        matches!(self, ClientError::Incomplete)
    }
}

/// A request that failed, and the request itself when not a byte of it
/// was written (it may go again on another connection).
pub struct Failed {
    pub error: ClientError,
    pub unsent: Option<Request<ProxyBody>>,
    /// A request without a body, written, whose connection closed before a
    /// byte of the answer came (keep-alive's race: the endpoint closed the
    /// idle connection as the request went out): the caller may send it
    /// again if its method is idempotent (RFC 9112 §9.3.1).
    pub resendable: Option<Request<ProxyBody>>,
}

/// What to do with the connection once its response is over and it can
/// carry another request (put it back in its pool).
pub type Recycle<I> = Box<dyn FnOnce(ClientConn<I>) + Send>;

/// Sends `req` on `conn` and reads the response head. The request's URI
/// is written as it is (origin form, as the caller made it). `recycle`
/// gets the connection back once the response has ended and it can carry
/// another request (see [`Recycle`]).
///
/// A plain function returning an `async move` block, not an `async fn`
/// (which keeps its arguments twice in its state): this state is part of
/// every request's future, which is moved into its box per request.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn send<I, R>(
    conn: ClientConn<I>,
    req: Request<ProxyBody>,
    recycle: R,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Failed>> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: FnOnce(ClientConn<I>) + Send + 'static,
{
    async move {
        let mut io = conn.io;
        // A pooled connection the endpoint closed (or wrote to) while it was
        // idle is no use: found before a byte is written, so the request can
        // go on another. Costs no system call while the socket has not become
        // readable (tokio keeps its readiness).
        if let Some(error) = probe(&mut io) {
            return Err(Failed {
                error,
                unsent: Some(req),
                resendable: None,
            });
        }
        let mut head = Vec::with_capacity(256);
        let framing = encode_request(&req, &mut head);
        // The head first: if the connection fails before any of it is taken,
        // the request is handed back untouched.
        let mut written = 0;
        while written < head.len() {
            match io.write(&head[written..]).await {
                Ok(0) | Err(_) if written == 0 => {
                    return Err(Failed {
                        error: ClientError::Incomplete,
                        unsent: Some(req),
                        resendable: None,
                    });
                }
                Ok(0) => return Err(failed(ClientError::Incomplete)),
                Ok(n) => written += n,
                Err(e) => return Err(failed(e.into())),
            }
        }
        let (parts, mut body) = req.into_parts();
        let mut reusable = true;
        if framing != Framing::Empty
            && let Err(e) = write_body(&mut io, &mut body, framing).await
        {
            match e {
                // The endpoint may have answered early and closed (413, say):
                // its answer, if it is there, is still read below.
                ClientError::Io(_) => reusable = false,
                e => return Err(failed(e)),
            }
        }
        drop(body);
        let mut buf = BytesMut::new();
        let head = loop {
            if let Some(h) = parse_response(&mut buf).map_err(failed)? {
                // Interim answers (100 Continue) are not passed on; 101 is the
                // answer to an upgrade.
                if h.status.is_informational() && h.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                break h;
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(failed(ClientError::HeadTooLarge));
            }
            let read = if buf.is_empty() {
                // The head's first read allocates only what arrived.
                poll_fn(|cx| {
                    super::fitted::poll_read(Pin::new(&mut io), cx, &mut buf, MAX_RESPONSE_HEAD)
                })
                .await
            } else {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_BUF);
                }
                io.read_buf(&mut buf).await
            };
            match read {
                Ok(0) if buf.is_empty() && framing == Framing::Empty => {
                    return Err(Failed {
                        error: ClientError::Incomplete,
                        unsent: None,
                        resendable: Some(Request::from_parts(parts, empty())),
                    });
                }
                Ok(0) => return Err(failed(ClientError::Incomplete)),
                Ok(_) => {}
                Err(e) => return Err(failed(e.into())),
            }
        };
        let ResponseHead {
            status,
            version,
            headers,
        } = head;
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // The connection belongs to the upgrade now, with whatever the
            // endpoint sent after its head.
            let (tx, rx) = oneshot::channel();
            let io: Box<dyn UpgradeIo> = Box::new(io);
            let _ = tx.send(Upgraded::new(buf.freeze(), io));
            resp.extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            *resp.headers_mut() = headers;
            return Ok(resp);
        }
        let keep_alive = match version {
            Version::HTTP_10 => has_token(&headers, header::CONNECTION, "keep-alive"),
            _ => !has_token(&headers, header::CONNECTION, "close"),
        };
        reusable &= keep_alive;
        let bodiless = parts.method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let decoder = if bodiless {
            None
        } else {
            match response_framing(&headers) {
                Ok(Some(Framing::Empty)) => None,
                Ok(Some(Framing::Length(n))) => Some(Decoder::length(n)),
                Ok(Some(Framing::Chunked)) => Some(Decoder::chunked(MAX_RESPONSE_HEAD)),
                Ok(None) => {
                    reusable = false;
                    Some(Decoder::until_close())
                }
                Err(()) => return Err(failed(ClientError::Malformed)),
            }
        };
        *resp.headers_mut() = headers;
        let conn = ClientConn { io };
        let Some(decoder) = decoder else {
            if reusable && buf.is_empty() {
                recycle(conn);
            }
            return Ok(resp);
        };
        // The whole body arrived with the head: the response is complete and
        // the connection free before anyone reads the body.
        if let Some(n) = decoder.remaining_length()
            && buf.len() as u64 == n
        {
            let data = buf.split().freeze();
            if reusable {
                recycle(conn);
            }
            *resp.body_mut() = full(data);
            return Ok(resp);
        }
        *resp.body_mut() = ProxyBody::new(RecvBody {
            conn: Some(conn),
            buf,
            decoder,
            // Boxed only here, for a body still to come: a response that
            // came whole recycles its connection without an allocation.
            recycle: reusable.then(|| Box::new(recycle) as Recycle<I>),
        });
        Ok(resp)
    }
}

/// Whether an idle connection was closed or written to by the endpoint.
fn probe<I: AsyncRead + Unpin>(io: &mut I) -> Option<ClientError> {
    let mut byte = [0u8; 1];
    let mut probe = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(io).poll_read(&mut cx, &mut probe) {
        Poll::Pending => None,
        Poll::Ready(Ok(())) if probe.filled().is_empty() => Some(ClientError::Incomplete),
        Poll::Ready(Ok(())) => Some(ClientError::Malformed),
        Poll::Ready(Err(e)) => Some(e.into()),
    }
}

fn failed(error: ClientError) -> Failed {
    Failed {
        error,
        unsent: None,
        resendable: None,
    }
}

/// Writes the request head: the request line, the headers as they are,
/// and the framing of the body.
fn encode_request(req: &Request<ProxyBody>, dst: &mut Vec<u8>) -> Framing {
    let body = req.body();
    let declared = req.headers().contains_key(header::CONTENT_LENGTH);
    let framing = if body.is_end_stream() {
        Framing::Empty
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else {
        Framing::Chunked
    };
    dst.extend_from_slice(req.method().as_str().as_bytes());
    dst.push(b' ');
    match req.uri().path_and_query() {
        Some(p) => dst.extend_from_slice(p.as_str().as_bytes()),
        None => dst.push(b'/'),
    }
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    put_fields(
        dst,
        req.headers().iter().filter(|(name, _)| {
            *name != header::TRANSFER_ENCODING
                && (*name != header::CONTENT_LENGTH || framing != Framing::Chunked)
        }),
    );
    match framing {
        Framing::Length(n) if !declared => {
            use std::io::Write as _;
            let _ = write!(dst, "content-length: {n}\r\n");
        }
        Framing::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    dst.extend_from_slice(b"\r\n");
    framing
}

async fn write_body<I: AsyncWrite + Unpin>(
    io: &mut I,
    body: &mut ProxyBody,
    framing: Framing,
) -> Result<(), ClientError> {
    let chunked = framing == Framing::Chunked;
    let mut trailers = None;
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ClientError::RequestBody)?;
        if let Some(d) = frame.data_ref() {
            sent += d.len() as u64;
            if let Framing::Length(n) = framing
                && sent > n
            {
                return Err(ClientError::RequestBody(
                    "longer than its content-length".into(),
                ));
            }
        }
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if chunked => {
                let size = format!("{:x}\r\n", data.len());
                io.write_all(size.as_bytes()).await?;
                io.write_all(&data).await?;
                io.write_all(b"\r\n").await?;
            }
            Ok(data) => io.write_all(&data).await?,
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    if let Framing::Length(n) = framing
        && sent < n
    {
        return Err(ClientError::RequestBody(
            "shorter than its content-length".into(),
        ));
    }
    if chunked {
        let mut end = b"0\r\n".to_vec();
        put_fields(&mut end, trailers.iter().flatten());
        end.extend_from_slice(b"\r\n");
        io.write_all(&end).await?;
    }
    Ok(())
}

struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

fn parse_response(buf: &mut BytesMut) -> Result<Option<ResponseHead>, ClientError> {
    // Left uninitialised: httparse writes what it parses.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ClientError::Malformed),
    };
    let status =
        StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| ClientError::Malformed)?;
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let spans = Spans::of(resp.headers, buf.as_ptr() as usize);
    let bytes: Bytes = buf.split_to(len).freeze();
    let map = header_map(&bytes, &spans).map_err(|()| ClientError::Malformed)?;
    Ok(Some(ResponseHead {
        status,
        version,
        headers: map,
    }))
}

/// How a response body is delimited; `None`: by the connection's end.
fn response_framing(map: &HeaderMap) -> Result<Option<Framing>, ()> {
    if map.contains_key(header::TRANSFER_ENCODING) {
        return Ok(chunked_last(map).then_some(Framing::Chunked));
    }
    Ok(match content_length(map)? {
        Some(0) => Some(Framing::Empty),
        Some(n) => Some(Framing::Length(n)),
        None => None,
    })
}

/// A response body still arriving on its connection.
struct RecvBody<I> {
    conn: Option<ClientConn<I>>,
    buf: BytesMut,
    decoder: Decoder,
    /// Where the connection goes once the body has ended (`None`: it
    /// cannot carry another request).
    recycle: Option<Recycle<I>>,
}

// SAFETY: the proxy's body type must be `Sync`, and the connection (a
// tunnel stream is not `Sync`) and the callback are touched only through
// `&mut self` (`poll_frame`, `finish`); the `&self` methods read only the
// decoder's state (plain data) — the argument of `sync_wrapper::SyncWrapper`.
unsafe impl<I: Send> Sync for RecvBody<I> {}

impl<I: AsyncRead + Unpin> RecvBody<I> {
    fn finish(&mut self) {
        if let (Some(conn), Some(recycle)) = (self.conn.take(), self.recycle.take())
            && self.buf.is_empty()
        {
            recycle(conn);
        }
        self.buf = BytesMut::new();
    }
}

impl<I: AsyncRead + Unpin> Body for RecvBody<I> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut this.buf) {
                Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Decoded::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::Need) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
            if this.buf.capacity() - this.buf.len() < 1024 {
                this.buf.reserve(READ_BUF);
            }
            let n = match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut this.buf
            )) {
                Ok(n) => n,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            };
            if n == 0 {
                if this.decoder.ends_at_close() {
                    this.recycle = None;
                    this.finish();
                    return Poll::Ready(None);
                }
                this.conn = None;
                return Poll::Ready(Some(Err(Box::new(ClientError::Incomplete))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining_length() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
