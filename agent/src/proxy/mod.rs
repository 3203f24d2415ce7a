//! The data path in userspace, on top of [`crate::transport`] and
//! [`crate::http`]: connections the kernel redirected to the agent are
//! accepted here and forwarded.
//!
//! [`outbound`] takes pods' connections, detects the protocol and forwards
//! them (HTTP request by request, in [`outbound::forward`]) along the
//! upstream path of the chosen endpoint: directly, or through the mTLS
//! tunnel to the endpoint node's agent, whose [`inbound`] side accepts the
//! tunnel, authorizes the source and connects to the pod.

pub mod descriptors;
pub mod detect;
pub mod inbound;
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

    /// Puts the accepted socket on the kernel's reply shortcut when its
    /// client is on it (`redirect.reply_shortcut`). `None`: the shortcut is
    /// off; `Some(false)`: on, but this connection replies over loopback.
    /// Called before the first byte is written to the socket.
    fn shortcut_replies(
        &self,
        _netns_cookie: u64,
        _client: SocketAddr,
        _socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<ReplyPath, String> {
        Ok(ReplyPath::Off)
    }

    /// Takes the connection off the reply shortcut for good: its later
    /// replies take loopback TCP, behind what was already delivered.
    fn leave_shortcut(&self, _netns_cookie: u64, _client: SocketAddr) -> Result<(), String> {
        Ok(())
    }

    /// The agent has read `total` request bytes of the connection (the
    /// request shortcut's bound; a no-op with it off).
    fn request_consumed(
        &self,
        _netns_cookie: u64,
        _client: SocketAddr,
        _total: u64,
    ) -> Result<(), String> {
        Ok(())
    }

    /// The connection has ended: forget what `request_consumed` wrote.
    fn forget_request(&self, _netns_cookie: u64, _client: SocketAddr) {}
}

/// How the agent's replies to a pod's application reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyPath {
    /// The reply shortcut is off: loopback TCP, nothing counted.
    Off,
    /// On, but this connection replies over loopback TCP.
    Loopback,
    /// Socket to socket, until the agent has sent `max_unanswered` bytes
    /// without the client sending any (then loopback TCP).
    ///
    /// `requests`: the request shortcut is on, so the kernel may move this
    /// connection's requests socket to socket too (it decides at the
    /// client's first send), and reads from the socket must not take a
    /// short read as proof that it is drained (see
    /// [`crate::transport::idle::ReadWhole`]).
    ///
    /// `delay_acks`: the kernel bounds the socket's delayed-ACK timer (see
    /// `Redirect::acks_bounded`), so it may go in the interactive mode
    /// that acknowledges fewer requests with bare ACKs.
    Sockmap {
        max_unanswered: u64,
        requests: bool,
        delay_acks: bool,
    },
}
