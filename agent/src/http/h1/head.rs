//! Request heads in, response heads out.
//!
//! A request head is parsed by `httparse` straight from the connection's
//! read buffer; the header values and the request target are slices of
//! that buffer (one allocation for the whole head, shared by reference
//! count, as hyper does), and header names are `http`'s interned constants
//! for the standard ones. How the body is framed follows RFC 9112 §6:
//! `Transfer-Encoding` ending in `chunked`, else `Content-Length`, else no
//! body; anything ambiguous (both, differing lengths, another coding last)
//! is refused, since a proxy that frames a message differently from the
//! next hop is how requests are smuggled.

use std::io::Write as _;
use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};

/// Headers a request may carry: hyper's default, so what hyper answered
/// 431 still gets 431.
pub const MAX_HEADERS: usize = 100;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
}

/// Why a request head was refused; each is the status the client gets
/// before the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request head")]
    Malformed,
    #[error("too many headers or too large a head")]
    TooLarge,
    #[error("ambiguous or unsupported body framing")]
    Framing,
}

impl HeadError {
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::Malformed | HeadError::Framing => StatusCode::BAD_REQUEST,
        }
    }
}

/// A parsed request head and what the connection needs to know about it.
pub struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header (RFC 9110 §7.8).
    pub upgrade: bool,
    /// `TE: trailers`: the client takes trailers in a chunked response.
    pub te_trailers: bool,
}

/// Where a header's name and value lie in its head's bytes.
///
/// httparse's headers borrow the read buffer, which must be split and
/// frozen before the header map can share it; the offsets carry the
/// headers across that step.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// Headers whose spans are kept on the stack; a head with more (rare:
/// real requests carry about ten) spills them into a vector.
const INLINE_SPANS: usize = 16;

/// The spans of one head's headers, without an allocation per message for
/// the usual few.
pub(super) struct Spans {
    inline: [Span; INLINE_SPANS],
    len: usize,
    spill: Vec<Span>,
}

impl Spans {
    /// The spans of `headers`, parsed from a buffer starting at `base`.
    #[inline]
    pub(super) fn of(headers: &[httparse::Header<'_>], base: usize) -> Self {
        let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
        let span = |h: &httparse::Header<'_>| Span {
            name: at(h.name.as_bytes()),
            value: at(h.value),
        };
        let mut spans = Spans {
            inline: [Span::default(); INLINE_SPANS],
            len: headers.len(),
            spill: Vec::new(),
        };
        if headers.len() > INLINE_SPANS {
            spans.spill = headers.iter().map(span).collect();
        } else {
            for (h, out) in headers.iter().zip(spans.inline.iter_mut()) {
                *out = span(h);
            }
        }
        spans
    }

    fn as_slice(&self) -> &[Span] {
        if self.len > INLINE_SPANS {
            &self.spill
        } else {
            &self.inline[..self.len]
        }
    }
}

/// The header map of a head whose headers are `spans` of `bytes`: values
/// are slices of `bytes` (shared, not copied), names `http`'s constants for
/// the standard ones. `Err`: a name or value `http` does not accept.
pub(super) fn header_map(bytes: &Bytes, spans: &Spans) -> Result<HeaderMap, ()> {
    let spans = spans.as_slice();
    let mut map = HeaderMap::with_capacity(spans.len());
    for s in spans {
        let (n, nl) = s.name;
        let (v, vl) = s.value;
        let name = HeaderName::from_bytes(&bytes[n..n + nl]).map_err(|_| ())?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(v..v + vl)).map_err(|_| ())?;
        map.append(name, value);
    }
    Ok(map)
}

/// Parses one request head from the start of `buf`. `Ok(None)`: not all
/// of it is there yet. On success the head's bytes are split off `buf`.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    // Left uninitialised: httparse writes what it parses (an initialised
    // array would be 3 KiB of zeroes written per request).
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Malformed)?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = range(req.path.unwrap_or("").as_bytes());
    let spans = Spans::of(req.headers, base);
    let bytes = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(bytes.slice(target)).map_err(|_| HeadError::Malformed)?;
    let map = header_map(&bytes, &spans).map_err(|()| HeadError::Malformed)?;
    let framing = framing(&map, version)?;
    let connection = |token: &str| has_token(&map, header::CONNECTION, token);
    let keep_alive = match version {
        Version::HTTP_10 => connection("keep-alive"),
        _ => !connection("close"),
    };
    let expect_continue = version == Version::HTTP_11
        && framing != Framing::Empty
        && map
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade =
        version == Version::HTTP_11 && map.contains_key(header::UPGRADE) && connection("upgrade");
    let te_trailers = has_token(&map, header::TE, "trailers");
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        te_trailers,
    }))
}

fn framing(map: &HeaderMap, version: Version) -> Result<Framing, HeadError> {
    if map.contains_key(header::TRANSFER_ENCODING) {
        // HTTP/1.0 has no transfer codings; with a Content-Length too the
        // two hops could disagree on where the body ends.
        if version == Version::HTTP_10 || map.contains_key(header::CONTENT_LENGTH) {
            return Err(HeadError::Framing);
        }
        return if chunked_last(map) {
            Ok(Framing::Chunked)
        } else {
            Err(HeadError::Framing)
        };
    }
    Ok(
        match content_length(map).map_err(|()| HeadError::Framing)? {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        },
    )
}

/// Whether the last transfer coding is `chunked` (RFC 9112 §6.3).
pub fn chunked_last(map: &HeaderMap) -> bool {
    map.get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|t| !t.is_empty())
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
}

/// The `Content-Length`: every value (and list element) the same run of
/// digits, else an error.
pub fn content_length(map: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut length = None;
    for v in map.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().map_err(|_| ())?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = part.parse().map_err(|_| ())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// Writes header fields as `name: value` lines.
pub fn put_fields<'a>(
    dst: &mut Vec<u8>,
    fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    for (name, value) in fields {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
}

/// Whether a comma-separated header lists `token` (case-insensitive).
pub fn has_token(map: &HeaderMap, name: HeaderName, token: &str) -> bool {
    map.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Nothing follows the head (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes a response head into `dst` and says how its body goes.
/// `exact` is the body's known length; `close` whether the connection
/// ends after this response (then `Connection: close` is said unless the
/// response says it already).
pub fn encode<B>(
    resp: &Response<B>,
    request_method: &Method,
    client: Version,
    exact: Option<u64>,
    keep_alive_10: bool,
    close: &mut bool,
    dst: &mut Vec<u8>,
) -> Out {
    let status = resp.status();
    let headers = resp.headers();
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || *request_method == Method::HEAD;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let out = if bodiless {
        Out::None
    } else if let Some(n) = declared.or(exact) {
        Out::Length(n)
    } else if client == Version::HTTP_11 {
        Out::Chunked
    } else {
        Out::Close
    };
    if out == Out::Close {
        *close = true;
    }
    if has_token(headers, header::CONNECTION, "close") {
        *close = true;
    }
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    dst.extend_from_slice(b"\r\n");
    // The framing is this hop's to decide.
    put_fields(
        dst,
        headers.iter().filter(|(name, _)| {
            *name != header::TRANSFER_ENCODING
                && (*name != header::CONTENT_LENGTH || matches!(out, Out::Length(_) | Out::None))
        }),
    );
    match out {
        Out::Length(n) if declared.is_none() => {
            let _ = write!(dst, "content-length: {n}\r\n");
        }
        Out::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if status != StatusCode::SWITCHING_PROTOCOLS && !headers.contains_key(header::CONNECTION) {
        if *close {
            dst.extend_from_slice(b"connection: close\r\n");
        } else if client == Version::HTTP_10 && keep_alive_10 {
            dst.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !headers.contains_key(header::DATE) {
        dst.extend_from_slice(b"date: ");
        date::append(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    out
}

/// The answer to a head that was refused, after which the connection closes.
pub fn refusal(status: StatusCode) -> Bytes {
    let mut v = Vec::with_capacity(128);
    v.extend_from_slice(b"HTTP/1.1 ");
    v.extend_from_slice(status.as_str().as_bytes());
    v.put_u8(b' ');
    v.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    v.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\ndate: ");
    date::append(&mut v);
    v.extend_from_slice(b"\r\n\r\n");
    v.into()
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub fn append(dst: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let s = httpdate::fmt_http_date(now);
                if s.len() == 29 {
                    c.1.copy_from_slice(s.as_bytes());
                    c.0 = secs;
                } else {
                    dst.extend_from_slice(s.as_bytes());
                    return;
                }
            }
            dst.extend_from_slice(&c.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<Head>, HeadError> {
        let mut b = BytesMut::from(s);
        parse(&mut b)
    }

    #[test]
    fn a_get_is_parsed_and_split_off_the_buffer() {
        let mut b = BytesMut::from("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nGET /next");
        let h = parse(&mut b).unwrap().unwrap();
        assert_eq!(h.request.uri(), "/a?b=1");
        assert_eq!(h.request.headers()["host"], "x");
        assert_eq!(h.request.headers()["x-a"], "1");
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive && !h.upgrade && !h.expect_continue);
        assert_eq!(&b[..], b"GET /next", "a pipelined request stays");
        assert!(parse(&mut b).unwrap().is_none(), "partial");
    }

    #[test]
    fn heads_with_few_and_many_headers() {
        // Up to INLINE_SPANS headers stay on the stack, more spill into a
        // vector; either way every header arrives, in order (a head beyond
        // MAX_HEADERS: `too_many_headers_is_431_and_garbage_400`).
        for n in [0, 1, INLINE_SPANS, INLINE_SPANS + 1, MAX_HEADERS - 1] {
            let mut head = String::from("GET / HTTP/1.1\r\nhost: h\r\n");
            for i in 0..n {
                head.push_str(&format!("x-h{i}: v{i}\r\n"));
            }
            head.push_str("\r\n");
            let h = parse_str(&head).unwrap().unwrap();
            let headers = h.request.headers();
            assert_eq!(headers.len(), n + 1, "{n} headers");
            let values: Vec<_> = headers
                .iter()
                .skip(1)
                .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
                .collect();
            let want: Vec<_> = (0..n)
                .map(|i| (format!("x-h{i}"), format!("v{i}")))
                .collect();
            assert!(
                values
                    .iter()
                    .zip(&want)
                    .all(|((k, v), (wk, wv))| k == wk && v == wv),
                "{n} headers in order"
            );
        }
    }

    #[test]
    fn framing_follows_rfc9112() {
        let f = |s: &str| parse_str(s).map(|h| h.unwrap().framing);
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n"),
            Err(HeadError::Framing)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            Err(HeadError::Framing)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
            Err(HeadError::Framing)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ncontent-length: +3\r\n\r\n"),
            Err(HeadError::Framing)
        );
        assert_eq!(
            f("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n"),
            Err(HeadError::Framing)
        );
    }

    #[test]
    fn keep_alive_upgrade_and_expect() {
        let h = parse_str("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse_str("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse_str("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse_str("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.upgrade);
        let h = parse_str("PUT / HTTP/1.1\r\nExpect: 100-continue\r\ncontent-length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.expect_continue);
    }

    #[test]
    fn too_many_headers_is_431_and_garbage_400() {
        let mut s = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            s.push_str(&format!("x-{i}: 1\r\n"));
        }
        s.push_str("\r\n");
        assert_eq!(parse_str(&s).err(), Some(HeadError::TooLarge));
        assert_eq!(
            parse_str("GET / HTTP/1.1\r\nbad header\r\n\r\n").err(),
            Some(HeadError::Malformed)
        );
        assert_eq!(
            parse_str("GET / HTTP/1.1\r\nbad name: v\r\n\r\n").err(),
            Some(HeadError::Malformed)
        );
    }

    #[test]
    fn response_heads_frame_the_body() {
        let enc = |resp: Response<()>, method: Method, client: Version, exact: Option<u64>| {
            let mut dst = Vec::new();
            let mut close = false;
            let out = encode(&resp, &method, client, exact, false, &mut close, &mut dst);
            (out, close, String::from_utf8(dst).unwrap())
        };
        let (out, close, s) = enc(Response::new(()), Method::GET, Version::HTTP_11, Some(3));
        assert_eq!((out, close), (Out::Length(3), false));
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n") && s.contains("content-length: 3\r\n"));
        let (out, _, s) = enc(Response::new(()), Method::GET, Version::HTTP_11, None);
        assert_eq!(out, Out::Chunked);
        assert!(s.contains("transfer-encoding: chunked\r\n"));
        let (out, close, s) = enc(Response::new(()), Method::GET, Version::HTTP_10, None);
        assert_eq!((out, close), (Out::Close, true));
        assert!(s.contains("connection: close\r\n"));
        let mut r = Response::new(());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let (out, _, s) = enc(r, Method::HEAD, Version::HTTP_11, Some(0));
        assert_eq!(out, Out::None);
        assert!(s.contains("content-length: 10\r\n"), "{s}");
    }
}
