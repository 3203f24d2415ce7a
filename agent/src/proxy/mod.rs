//! The data path in userspace: connections the kernel redirected to the
//! agent are accepted here and forwarded.
//!
//! Today every connection is forwarded as opaque TCP to the destination the
//! pod dialled. Protocol detection (HTTP/1, HTTP/2, gRPC, TLS) hooks into
//! [`outbound::Outbound::serve`] between learning the original destination
//! and choosing how to forward.

pub mod copy;
pub mod detect;
pub mod listener;
pub mod outbound;

use std::net::SocketAddr;

/// Where the agent learns the destination a redirected connection was
/// originally dialled to. The kernel-backed implementation lives in
/// `redirect`; the proxy only needs this one question answered.
pub trait OriginalDst: Send + Sync + 'static {
    /// The original destination of the connection accepted in the network
    /// namespace `netns_cookie` from `client`; the record is consumed.
    fn take(&self, netns_cookie: u64, client: SocketAddr) -> Result<Option<SocketAddr>, String>;
}
