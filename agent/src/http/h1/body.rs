//! Request bodies: decoding what the client sends (`Content-Length` or
//! chunked, trailers included), and the body the rest of the proxy reads.
//!
//! The connection's task reads the socket and decodes (it owns the socket
//! and its buffer); the frames go to the request's body through a channel
//! of one frame, so a client sending faster than the endpoint takes is
//! held back by TCP, not buffered here. A request without a body has no
//! channel at all.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::http::body::BoxError;

/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("malformed chunked body")]
    Chunked,
    #[error("the client closed the connection in the middle of the request body")]
    Incomplete,
    #[error("chunked trailers larger than {0} bytes")]
    TrailersTooLarge(usize),
}

/// Where a body decoder is.
#[derive(Debug)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left of the current chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields (or the final CRLF) after the last chunk.
    Trailers,
    /// Everything until the connection closes (a response without length).
    Close,
    Done,
}

/// One step of decoding.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// More bytes are needed.
    Need,
    Done,
}

/// Decodes a request body out of the connection's read buffer.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    max_trailers: usize,
}

impl Decoder {
    pub fn length(n: u64) -> Self {
        Decoder {
            state: State::Length(n),
            max_trailers: 0,
        }
    }

    pub fn chunked(max_trailers: usize) -> Self {
        Decoder {
            state: State::Size,
            max_trailers,
        }
    }

    /// A response body delimited by the connection's end (RFC 9112 §6.3).
    pub fn until_close() -> Self {
        Decoder {
            state: State::Close,
            max_trailers: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Bytes still to come of a body of known length.
    pub fn remaining_length(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Whether the connection's end is the body's end.
    pub fn ends_at_close(&self) -> bool {
        matches!(self.state, State::Close)
    }

    /// Takes what it can from `buf`: a data frame (a slice of the buffer,
    /// no copy), trailers, or the end; [`Decoded::Need`] when `buf` holds
    /// too little to go on.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::Done),
                State::Close if buf.is_empty() => return Ok(Decoded::Need),
                State::Close => return Ok(Decoded::Data(buf.split().freeze())),
                State::Length(0) => {
                    self.state = State::Done;
                    return Ok(Decoded::Done);
                }
                State::Length(n) | State::Data(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::Need);
                    }
                    let take = (buf.len() as u64).min(n) as usize;
                    let data = buf.split_to(take).freeze();
                    let left = n - take as u64;
                    self.state = match self.state {
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::DataEnd,
                        _ => State::Data(left),
                    };
                    return Ok(Decoded::Data(data));
                }
                State::Size => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(BodyError::Chunked);
                        }
                        return Ok(Decoded::Need);
                    };
                    let line = &buf[..end];
                    let size = line
                        .iter()
                        .position(|b| *b == b';')
                        .map_or(line, |i| &line[..i]);
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(|s| s.trim_matches([' ', '\t']))
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or(BodyError::Chunked)?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::Need);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Chunked);
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = State::Done;
                        return Ok(Decoded::Done);
                    }
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        if buf.len() > self.max_trailers {
                            return Err(BodyError::TrailersTooLarge(self.max_trailers));
                        }
                        return Ok(Decoded::Need);
                    };
                    let block = buf.split_to(end + 4).freeze();
                    self.state = State::Done;
                    return Ok(Decoded::Trailers(trailers(&block)?));
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n")
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

fn trailers(block: &Bytes) -> Result<HeaderMap, BodyError> {
    let mut headers = [httparse::EMPTY_HEADER; super::head::MAX_HEADERS];
    let parsed = match httparse::parse_headers(block, &mut headers) {
        Ok(httparse::Status::Complete((_, h))) => h,
        _ => return Err(BodyError::Chunked),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| BodyError::Chunked)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| BodyError::Chunked)?;
        map.append(name, value);
    }
    Ok(map)
}

type Item = Result<Frame<Bytes>, BoxError>;

/// The sending end: the connection's task puts decoded frames in.
pub type Sender = mpsc::Sender<Item>;

/// A request body arriving on an HTTP/1 connection.
pub struct RecvBody {
    rx: mpsc::Receiver<Item>,
    /// `Content-Length` bytes not yet received (`None`: chunked).
    remaining: Option<u64>,
    ended: bool,
}

/// A body channel for a request framed as `framing` (not empty).
pub fn channel(length: Option<u64>) -> (Sender, RecvBody) {
    let (tx, rx) = mpsc::channel(1);
    (
        tx,
        RecvBody {
            rx,
            remaining: length,
            ended: false,
        },
    )
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(n), Some(d)) = (self.remaining.as_mut(), frame.data_ref()) {
                    *n = n.saturating_sub(d.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        mut d: Decoder,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, HeaderMap), BodyError> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = HeaderMap::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = t,
                Decoded::Done => return Ok((data, trailers)),
                Decoded::Need => {
                    if fed >= input.len() {
                        return Err(BodyError::Incomplete);
                    }
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n";
        for step in 1..input.len() {
            let (data, trailers) = decode_all(Decoder::chunked(1024), input, step).unwrap();
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(trailers["x-sum"], "42");
        }
        let (data, trailers) = decode_all(Decoder::chunked(1024), b"0\r\n\r\n", 3).unwrap();
        assert!(data.is_empty() && trailers.is_empty());
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        assert!(decode_all(Decoder::chunked(1024), b"zz\r\n", 64).is_err());
        assert!(decode_all(Decoder::chunked(1024), b"3\r\nabcX\r\n", 64).is_err());
        assert!(decode_all(Decoder::chunked(8), b"0\r\nx-long-trailer: 1", 64).is_err());
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let mut buf = BytesMut::from(&b"abcdefGET /"[..]);
        let mut d = Decoder::length(6);
        match d.decode(&mut buf).unwrap() {
            Decoded::Data(b) => assert_eq!(&b[..], b"abcdef"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(d.decode(&mut buf).unwrap(), Decoded::Done));
        assert_eq!(&buf[..], b"GET /");
    }
}
