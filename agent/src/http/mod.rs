//! The HTTP data path: serving a pod's HTTP/1.1 or HTTP/2 connection
//! (gRPC included), routing each request to a service's endpoint chosen per
//! request, with timeouts, retries under a budget, and errors that say they
//! came from the proxy.
//!
//! One file per stage: [`server`] accepts the downstream connection,
//! [`forward`] routes and sends each request, [`pool`] keeps upstream
//! connections, [`headers`] applies RFC 9110's hop-by-hop rules,
//! [`errors`] renders the proxy's own answers.

pub mod body;
pub mod errors;
pub mod forward;
pub mod headers;
pub mod pool;
pub mod replay;
pub mod server;
