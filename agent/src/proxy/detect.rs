//! Protocol detection on an accepted connection, by peeking (`MSG_PEEK`) at
//! the first bytes the client sends, without consuming them: whatever is
//! chosen next reads the connection from its first byte.
//!
//! The peek is bounded twice: in bytes (enough for an HTTP request line) and
//! in time. A client that sends nothing — a server-speaks-first protocol
//! such as MySQL or SMTP — is treated as opaque TCP once the timeout passes,
//! so it is delayed by at most the timeout, never stalled.

use std::time::Duration;

use tokio::net::TcpStream;

/// What the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface (h2c; gRPC without TLS).
    Http2,
    /// A TLS ClientHello: forwarded as opaque bytes (the proxy does not
    /// terminate the application's TLS).
    Tls,
    /// Anything else, including a client that said nothing in time.
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1",
            Protocol::Http2 => "h2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

/// What the connection table shows for a detected protocol (it has
/// states detection does not: still detecting, gRPC once a request says so).
impl From<Protocol> for crate::telemetry::conns::ConnProtocol {
    fn from(p: Protocol) -> Self {
        use crate::telemetry::conns::ConnProtocol;
        match p {
            Protocol::Http1 => ConnProtocol::Http1,
            Protocol::Http2 => ConnProtocol::Http2,
            Protocol::Tls => ConnProtocol::Tls,
            Protocol::Opaque => ConnProtocol::Opaque,
        }
    }
}

/// Why detection ended where it did (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Detected,
    /// The client sent nothing (or too little to tell) within the timeout.
    Timeout,
    /// The client closed before sending anything.
    Closed,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest request line looked at; a longer one is not treated as HTTP.
pub const MAX_PEEK: usize = 8 * 1024;
/// The first peek: most request lines fit.
const FIRST_PEEK: usize = 512;

/// A verdict on the bytes seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    NeedMore,
}

/// Classifies a prefix of the client's first bytes. Pure, so it can be
/// tested and fuzzed without sockets.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // The preface starts with "PRI * HTTP/2.0", which also looks like an
    // HTTP/1 request line; check it first.
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // TLS record: handshake (22), version 3.x.
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Is(Protocol::Tls),
            Some(_) => Verdict::Is(Protocol::Opaque),
        };
    }
    classify_http1(buf)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3).
fn classify_http1(buf: &[u8]) -> Verdict {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(i) => &buf[..i],
        None if buf.len() >= MAX_PEEK => return Verdict::Is(Protocol::Opaque),
        None => buf,
    };
    // The method: a token of at most 32 characters (longer ones exist in
    // no registry) followed by a space.
    let method_len = line.iter().take_while(|&&b| is_tchar(b)).count();
    if method_len == 0 || method_len > 32 {
        return Verdict::Is(Protocol::Opaque);
    }
    match line.get(method_len) {
        None => return Verdict::NeedMore,
        Some(b' ') => {}
        Some(_) => return Verdict::Is(Protocol::Opaque),
    }
    let complete = line_end.is_some();
    // A CR only at the end of the line (it may be the last byte so far).
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // No control characters in a request line.
    let printable = |b: &u8| *b == b'\t' || (0x20..0x7f).contains(b) || *b >= 0x80;
    if !line[method_len + 1..].iter().all(printable) {
        return Verdict::Is(Protocol::Opaque);
    }
    if !complete {
        return Verdict::NeedMore;
    }
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Verdict::Is(Protocol::Http1)
    } else {
        Verdict::Is(Protocol::Opaque)
    }
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How long to wait between peeks when the client has sent a partial first
/// segment: the socket stays readable, so waiting for readiness would spin.
const REPEEK_INTERVAL: Duration = Duration::from_millis(2);

/// Peeks at the client's first bytes until the protocol is known, the
/// timeout passes, or the client closes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> (Protocol, Outcome) {
    let deadline = tokio::time::Instant::now() + timeout;
    // Start small and grow only for a long request line: the buffer is
    // zeroed (`peek` needs initialised memory), so a full-size one would
    // touch 8 KiB per connection, which the allocator then hands on, dirty,
    // to the connection's long-lived HTTP buffers.
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0usize;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return (Protocol::Opaque, Outcome::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return (Protocol::Opaque, Outcome::Closed),
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Verdict::Is(p) => return (p, Outcome::Detected),
            Verdict::NeedMore if n >= MAX_PEEK => return (Protocol::Opaque, Outcome::Detected),
            Verdict::NeedMore if n == buf.len() => {
                // Full: there is more to look at already.
                buf.resize((buf.len() * 4).min(MAX_PEEK), 0);
                seen = n;
            }
            Verdict::NeedMore => {
                if n == seen {
                    if tokio::time::Instant::now() >= deadline {
                        return (Protocol::Opaque, Outcome::Timeout);
                    }
                    tokio::time::sleep(REPEEK_INTERVAL).await;
                }
                seen = n;
            }
        }
    }
}

#[cfg(test)]
mod tests;
