//! The one body type the proxy passes around: a boxed stream of bytes, so a
//! streamed request, a buffered (replayable) one and the proxy's own error
//! bodies share a type.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

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
