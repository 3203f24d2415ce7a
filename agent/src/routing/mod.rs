//! Route selection for L7 requests: Gateway API HTTPRoute/GRPCRoute-style
//! matches (path, method, headers, gRPC service/method) ranked by the Gateway
//! API's precedence rules, and weighted splits across a route's backends.
//!
//! Everything here is pure: the proxy builds a [`RouteTable`] when config
//! changes and asks it for a route per request.

mod matching;
mod table;
mod weighted;

pub use matching::{GrpcMatch, HeaderMatch, PathMatch, RouteMatch, ValueMatch};
pub use table::{Route, RouteTable};
pub use weighted::Weighted;

/// What can be wrong with a route as configured.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("path {path:?} must start with '/'")]
    PathNotAbsolute { path: String },
    #[error(
        "path {path:?} contains {found:?}, so it can never match: only the request path \
         is matched (no query or fragment), and it cannot contain whitespace or controls"
    )]
    PathInvalidChar { path: String, found: char },
    #[error("regular expression {pattern:?} does not compile: {reason}")]
    InvalidRegex {
        pattern: String,
        reason: regex::Error,
    },
    #[error("header name {name:?} is not a valid HTTP header name")]
    InvalidHeaderName { name: String },
    #[error("gRPC {what} name {value:?} must be non-empty and must not contain '/'")]
    InvalidGrpcName { what: &'static str, value: String },
    #[error("weighted backends: the list is empty, give at least one backend")]
    NoBackends,
    #[error("weighted backends: every weight is 0, so no backend could receive traffic")]
    AllWeightsZero,
    #[error("weighted backends: the weights add up to more than {}", u32::MAX)]
    WeightOverflow,
}
