//! The one body type the proxy passes around: a boxed stream of bytes, so a
//! streamed request, a buffered (replayable) one and the proxy's own error
//! bodies share a type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn incoming(body: hyper::body::Incoming) -> ProxyBody {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// `prefix`, then the rest of `body`: for a body whose start was read
/// already (to look at it) and must still go on whole.
pub fn prefixed(prefix: Bytes, rest: ProxyBody) -> ProxyBody {
    Prefixed {
        prefix: Some(prefix),
        rest,
    }
    .boxed()
}

struct Prefixed {
    prefix: Option<Bytes>,
    rest: ProxyBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let n = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + n);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prefixed_body_is_prefix_then_rest() {
        let body = prefixed(Bytes::from_static(b"head "), full("tail"));
        assert_eq!(body.size_hint().exact(), Some(9));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"head tail");
    }
}
