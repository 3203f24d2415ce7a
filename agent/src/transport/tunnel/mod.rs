//! The tunnel between node agents, HBONE-shaped like Istio's ztunnel: mTLS
//! (see `identity::tls`) carrying HTTP/2, one `CONNECT` stream per proxied
//! connection, `:authority` = the target `ip:port`, default port 15008.
//!
//! - the inbound side (accepting TLS, serving HTTP/2, authorizing the
//!   verified peer identity and splicing the stream to the pod) is
//!   `proxy::inbound::server`; it shares this module's wire constants.
//! - [`pool`]: the outbound side. Keeps one HTTP/2 connection per (peer
//!   agent, local identity, expected peer identity), opens many `CONNECT`
//!   streams on it, and replaces it when it closes or when the local leaf
//!   was rotated.
//! - [`probe`]: connect and handshake only, for `waymark check`.
//!
//! Because the wire format is the one ztunnel uses, tshark's HTTP/2
//! dissector shows the streams given the key log.

pub mod pool;
pub mod probe;
mod stream;

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::identity::{SpiffeId, TlsFailure};

pub use pool::{PoolConfig, TunnelError, TunnelPool};
pub use stream::TunnelStream;

/// The inbound tunnel port, as in ztunnel's HBONE.
pub use crate::config::mesh::DEFAULT_TUNNEL_PORT as DEFAULT_PORT;

/// The source workload's SPIFFE ID (must match the client certificate).
pub const SOURCE_WORKLOAD: HeaderName = HeaderName::from_static("x-waymark-source-workload");
/// A request id that follows the connection through both agents' logs.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Why the server refused a stream (403) or could not connect it (5xx).
pub const DENY_REASON: HeaderName = HeaderName::from_static("x-waymark-deny-reason");
pub const ERROR_REASON: HeaderName = HeaderName::from_static("x-waymark-error");

/// The headers the outbound side sends with each `CONNECT`.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    pub source_workload: Option<SpiffeId>,
    /// The source pod's address, sent as `forwarded: for="ip:port"` (RFC 7239).
    pub source_addr: Option<SocketAddr>,
    pub request_id: Option<String>,
}

impl ConnectHeaders {
    pub fn to_header_map(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut put = |name: HeaderName, value: String| {
            // Values built from validated IDs and addresses are always
            // valid; a request id with control characters is dropped.
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        if let Some(id) = &self.source_workload {
            put(SOURCE_WORKLOAD, id.to_string());
        }
        if let Some(addr) = self.source_addr {
            put(http::header::FORWARDED, format!("for=\"{addr}\""));
        }
        if let Some(rid) = &self.request_id {
            put(REQUEST_ID, rid.clone());
        }
        h
    }
}

/// Every TLS handshake failure kind, in the order the counters of both
/// tunnel ends keep them.
pub const FAILURES: [TlsFailure; 6] = [
    TlsFailure::UnknownCa,
    TlsFailure::Expired,
    TlsFailure::WrongIdentity,
    TlsFailure::NoCertificate,
    TlsFailure::BadCertificate,
    TlsFailure::Protocol,
];
