//! A gRPC unary responder over h2c, for `testpeer grpc` and the bench's
//! gRPC rows: every request (any path, like a generic handler) is read to
//! its end and answered as a unary call answers — `200`, `content-type:
//! application/grpc`, the request's message echoed back in one
//! length-prefixed frame, and the status in trailers (`grpc-status: 0`).
//! A request whose body is not one whole gRPC message gets `grpc-status: 3`
//! (INVALID_ARGUMENT), so a load generator that sends the wrong bytes
//! fails loudly instead of being counted.
//!
//! It is written on hyper, not grpcio, so that the server is never the
//! bottleneck of a proxy measurement (a Python handler would be).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The largest request body read (a unary call's message and its prefix).
const MAX_BODY: usize = 4 << 20;

/// Serves on `listener` until the process ends; prints nothing per call.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

/// `[compressed flag (0)][length, 4 bytes big-endian][message]`.
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    b.put_slice(message);
    b.freeze()
}

/// The message of a body holding exactly one uncompressed frame.
fn message(body: &[u8]) -> Option<&[u8]> {
    let (head, rest) = body.split_at_checked(5)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    (head[0] == 0 && rest.len() == len).then_some(rest)
}

async fn answer(req: Request<Incoming>) -> Result<Response<Unary>, Infallible> {
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let (data, status) = match message(&body) {
        Some(m) => (frame(m), "0"),
        None => (Bytes::new(), "3"),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let mut resp = Response::new(Unary {
        data: (!data.is_empty()).then_some(data),
        trailers: Some(trailers),
    });
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

/// One data frame, then the trailers.
pub struct Unary {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Unary {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// Binds `addr` and serves; prints `listening <addr>` once bound.
pub async fn run(addr: SocketAddr) -> i32 {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testpeer: cannot listen on {addr}: {e}");
            return 2;
        }
    };
    println!("listening {}", listener.local_addr().map_or(addr, |a| a));
    serve(listener).await;
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_bodies_are_refused() {
        let f = frame(b"hello");
        assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(message(&f), Some(&b"hello"[..]));
        assert_eq!(message(&frame(b"")), Some(&b""[..]));
        assert_eq!(message(b"GET /"), None);
        assert_eq!(message(&f[..7]), None, "a cut message");
        let mut compressed = f.to_vec();
        compressed[0] = 1;
        assert_eq!(message(&compressed), None);
    }
}
