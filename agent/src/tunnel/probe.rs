//! A reachability probe of a peer agent for `waymark check`: TCP connect
//! and the TLS 1.3 handshake with the tunnel client's own config (same
//! certificate, same verification of the peer's node identity), then the
//! server's verdict on our certificate (its first record), and nothing
//! more: no HTTP/2 connection, no `CONNECT` stream, nothing pooled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::pool::{TunnelError, TunnelPool};
use crate::identity::tls::server_name;
use crate::identity::{SpiffeId, TlsFailure, peer_info};

/// What a successful probe saw.
#[derive(Debug, Clone)]
pub struct Probed {
    /// TCP connect through the server's first record after the handshake.
    pub handshake: Duration,
    /// The SPIFFE ID in the peer's verified certificate.
    pub identity: Option<SpiffeId>,
}

impl TunnelPool {
    /// Probes the agent at `peer`: presents `local`'s leaf, requires
    /// `expected`, and gives up after `timeout` in all.
    pub async fn probe(
        &self,
        local: &SpiffeId,
        peer: SocketAddr,
        expected: &SpiffeId,
        timeout: Duration,
    ) -> Result<Probed, TunnelError> {
        let started = Instant::now();
        let attempt = async {
            let tcp = TcpStream::connect(peer)
                .await
                .map_err(|source| TunnelError::Connect { peer, source })?;
            let config = self.tls_config(local, expected)?;
            let tls = TlsConnector::from(config)
                .connect(server_name(peer.ip()), tcp)
                .await
                .map_err(|e| TunnelError::Tls {
                    peer,
                    failure: TlsFailure::find(&e).unwrap_or(TlsFailure::Protocol),
                    detail: e.to_string(),
                })?;
            let identity = peer_info(tls.get_ref().1).map(|i| i.id);
            // In TLS 1.3 the server judges our certificate after our side
            // of the handshake is done: its first record is the verdict.
            let (mut tls, _) = self.server_verdict(peer, tls).await?;
            let handshake = started.elapsed();
            // close_notify, so the peer sees a clean end, not a reset.
            let _ = tls.shutdown().await;
            Ok(Probed {
                handshake,
                identity,
            })
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| TunnelError::Timeout {
                peer,
                what: "connect and TLS handshake",
            })?
    }
}
