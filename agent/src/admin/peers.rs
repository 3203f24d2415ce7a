//! `GET /check/peers`: can this agent reach every other node's agent? For
//! each node of `[[nodes]]` it probes the tunnel port — TCP connect and
//! the TLS 1.3 handshake with the tunnel client's own config, so the peer
//! must present exactly the node identity the tunnel would require — in
//! parallel (at most [`PARALLEL`] at a time), each within a timeout. The
//! facts only; `waymark check` judges them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span};

use crate::config::Config;
use crate::identity::SpiffeId;
use crate::transport::tunnel::TunnelError;
use crate::transport::upstream::Upstreams;

/// Each probe's budget unless the request asks otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest budget a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);
/// Probes in flight at once: a large cluster is probed in waves rather
/// than with thousands of sockets at once.
pub const PARALLEL: usize = 32;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeersFacts {
    /// `false` without `[identity]`: agents talk plaintext, no tunnel.
    pub mtls: bool,
    /// The identity this agent presented.
    pub local_identity: Option<String>,
    pub timeout_ms: u64,
    pub peers: Vec<PeerFacts>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerFacts {
    pub node: String,
    pub tunnel: SocketAddr,
    /// The node identity its agent must present; `None` when the config's
    /// identity for it does not parse.
    pub expected_identity: Option<String>,
    pub reachable: bool,
    /// Connect through the peer's acceptance of our certificate.
    pub handshake_ms: Option<f64>,
    pub verified_identity: Option<String>,
    /// Why not: `refused`, `unreachable`, `timeout`, a TLS failure
    /// (`unknown_ca`, `expired`, `wrong_identity`, …) or `error`.
    pub reason: Option<String>,
    pub error: Option<String>,
}

/// What the probe needs from the agent: the tunnel client lives in the
/// upstreams' mesh (absent without mTLS).
#[derive(Clone)]
pub struct PeerProbe {
    pub upstreams: Arc<Upstreams>,
}

impl PeerProbe {
    /// Probes every other node of `config`'s `[[nodes]]`.
    pub async fn run(&self, config: &Config, timeout: Duration) -> PeersFacts {
        let timeout = timeout.min(MAX_TIMEOUT);
        let local = config
            .identity
            .as_ref()
            .and_then(|i| i.node_identity(&config.node.name));
        let mut facts = PeersFacts {
            mtls: config.identity.is_some(),
            local_identity: local.as_ref().map(ToString::to_string),
            timeout_ms: timeout.as_millis() as u64,
            peers: Vec::new(),
        };
        let (Some(identity), Some(local)) = (&config.identity, local) else {
            return facts;
        };
        let gate = Arc::new(Semaphore::new(PARALLEL));
        let mut probes = JoinSet::new();
        for (i, node) in config
            .nodes
            .iter()
            .filter(|n| n.name != config.node.name)
            .enumerate()
        {
            let expected = node.identity(&identity.trust_domain);
            let mut peer = PeerFacts {
                node: node.name.clone(),
                tunnel: node.tunnel,
                expected_identity: expected.as_ref().map(ToString::to_string),
                reachable: false,
                handshake_ms: None,
                verified_identity: None,
                reason: None,
                error: None,
            };
            let (upstreams, gate, local) = (self.upstreams.clone(), gate.clone(), local.clone());
            let span = info_span!("peer_probe", node = %node.name, tunnel = %node.tunnel);
            probes.spawn(
                async move {
                    let _permit = gate.acquire_owned().await;
                    probe_one(&upstreams, &local, expected, timeout, &mut peer).await;
                    (i, peer)
                }
                .instrument(span),
            );
        }
        let mut done = Vec::new();
        while let Some(r) = probes.join_next().await {
            match r {
                Ok(p) => done.push(p),
                Err(e) => tracing::warn!(error = %e, "a peer probe failed to run"),
            }
        }
        done.sort_by_key(|(i, _)| *i);
        facts.peers = done.into_iter().map(|(_, p)| p).collect();
        facts
    }
}

async fn probe_one(
    upstreams: &Upstreams,
    local: &SpiffeId,
    expected: Option<SpiffeId>,
    timeout: Duration,
    peer: &mut PeerFacts,
) {
    let Some(expected) = expected else {
        peer.reason = Some("error".into());
        peer.error = Some("its identity in [[nodes]] is not a valid SPIFFE ID".into());
        return;
    };
    let Some(mesh) = upstreams.mesh() else {
        peer.reason = Some("error".into());
        peer.error = Some("the agent started without mTLS; restart it to apply [identity]".into());
        return;
    };
    match mesh
        .pool
        .probe(local, peer.tunnel, &expected, timeout)
        .await
    {
        Ok(p) => {
            debug!(handshake = ?p.handshake, "peer agent reachable");
            peer.reachable = true;
            peer.handshake_ms = Some(p.handshake.as_secs_f64() * 1000.0);
            peer.verified_identity = p.identity.map(|i| i.to_string());
        }
        Err(e) => {
            debug!(error = %e, "peer agent unreachable");
            peer.reason = Some(reason(&e).to_string());
            peer.error = Some(e.to_string());
        }
    }
}

/// A short, stable name for why a probe failed.
fn reason(e: &TunnelError) -> &'static str {
    use std::io::ErrorKind as K;
    match e {
        TunnelError::Connect { source, .. } => match source.kind() {
            K::ConnectionRefused => "refused",
            K::HostUnreachable | K::NetworkUnreachable => "unreachable",
            K::TimedOut => "timeout",
            _ => "connect",
        },
        TunnelError::Timeout { .. } => "timeout",
        TunnelError::Tls { failure, .. } => failure.as_str(),
        TunnelError::NoCertificate(_) => "no_local_certificate",
        _ => "error",
    }
}

/// `timeout_ms=N` from a query string, else the default.
pub fn timeout_from_query(query: Option<&str>) -> Result<Duration, String> {
    let Some(v) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("timeout_ms="))
    else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match v.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms).min(MAX_TIMEOUT)),
        _ => Err(format!(
            "timeout_ms must be a positive number of milliseconds, not {v:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_comes_from_the_query_and_is_bounded() {
        assert_eq!(timeout_from_query(None), Ok(DEFAULT_TIMEOUT));
        assert_eq!(timeout_from_query(Some("x=1")), Ok(DEFAULT_TIMEOUT));
        assert_eq!(
            timeout_from_query(Some("timeout_ms=250")),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            timeout_from_query(Some("timeout_ms=99999")),
            Ok(MAX_TIMEOUT)
        );
        assert!(timeout_from_query(Some("timeout_ms=soon")).is_err());
        assert!(timeout_from_query(Some("timeout_ms=0")).is_err());
    }

    #[test]
    fn failures_get_a_short_reason() {
        let peer: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let refused = TunnelError::Connect {
            peer,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(reason(&refused), "refused");
        let tls = TunnelError::Tls {
            peer,
            failure: crate::identity::TlsFailure::UnknownCa,
            detail: String::new(),
        };
        assert_eq!(reason(&tls), "unknown_ca");
        let slow = TunnelError::Timeout { peer, what: "x" };
        assert_eq!(reason(&slow), "timeout");
    }
}
