//! The data path in userspace: connections the kernel redirected to the
//! agent are accepted here and forwarded.
//!
//! [`outbound`] takes pods' connections, detects the protocol and forwards
//! them along the [`upstream`] path of the chosen endpoint: directly, or
//! through the mTLS tunnel to the endpoint node's agent, whose [`inbound`]
//! side authorizes the source ([`authz`]) and connects to the pod; HTTP on
//! those streams is served by [`inbound_http`] (metrics, trace block, tap).

pub mod authz;
pub mod copy;
pub mod detect;
pub mod inbound;
pub mod inbound_http;
mod inbound_request;
mod inbound_tap;
mod inbound_tcp;
pub mod listener;
pub mod outbound;
mod rewind;
pub mod upstream;

use std::net::SocketAddr;

/// Where the agent learns the destination a redirected connection was
/// originally dialled to. The kernel-backed implementation lives in
/// `redirect`; the proxy only needs this one question answered.
pub trait OriginalDst: Send + Sync + 'static {
    /// The original destination of the connection accepted in the network
    /// namespace `netns_cookie` from `client`; the record is consumed.
    fn take(&self, netns_cookie: u64, client: SocketAddr) -> Result<Option<SocketAddr>, String>;
}
