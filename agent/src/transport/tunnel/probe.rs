//! A reachability probe of a peer agent for `waymark check`: TCP connect
//! and the TLS 1.3 handshake with the tunnel client's own config (same
//! certificate, same verification of the peer's node identity), then the
//! server's verdict on our certificate (its first record), and nothing
//! more: no HTTP/2 connection, no `CONNECT` stream, nothing pooled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::tls::server_name;
use crate::identity::{SpiffeId, TlsFailure, peer_info};
use crate::transport::tunnel::pool::{TunnelError, TunnelPool};

/// The HTTP/2 client preface, an empty SETTINGS frame, the ACK of the
/// server's SETTINGS (its first record, read as the verdict) and a GOAWAY
/// (last stream 0, NO_ERROR): a connection that opened no stream and ends
/// cleanly (RFC 9113 §3.4, §6.5, §6.8).
const GOODBYE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
    \x00\x00\x00\x04\x00\x00\x00\x00\x00\
    \x00\x00\x00\x04\x01\x00\x00\x00\x00\
    \x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
/// How long the peer gets to close after the goodbye.
const GOODBYE_WAIT: Duration = Duration::from_millis(500);

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
            let (tls, _) = self.server_verdict(peer, tls).await?;
            let handshake = started.elapsed();
            Ok::<_, TunnelError>((
                tls,
                Probed {
                    handshake,
                    identity,
                },
            ))
        };
        let (tls, probed) =
            tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| TunnelError::Timeout {
                    peer,
                    what: "connect and TLS handshake",
                })??;
        goodbye(tls).await;
        Ok(probed)
    }
}

/// Ends the connection as an HTTP/2 client that opened no stream would,
/// and lets the peer close first, so its log shows an ended connection,
/// not a broken one. Bounded: the probe's verdict is already made.
async fn goodbye<T: AsyncRead + AsyncWrite + Unpin>(mut tls: T) {
    let polite = async {
        tls.write_all(GOODBYE).await?;
        tls.flush().await?;
        let mut sink = [0u8; 4096];
        while tls.read(&mut sink).await? > 0 {}
        tls.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(GOODBYE_WAIT, polite)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!(error = %e, "peer probe: the goodbye did not complete");
    }
}
