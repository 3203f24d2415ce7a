//! Bounds on the tunnel's inbound streams, per peer and in descriptors.
//!
//! Every stream another node's agent opens here holds one of this agent's
//! descriptors for as long as it lasts (the dial to the local pod). The
//! streams of one tunnel connection are bounded by HTTP/2's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, but a peer may open several
//! connections, and many peers come at once; without a bound over them, a
//! busy or hostile workload elsewhere could hold every descriptor the
//! agent has and stall this node's own pods. So each peer identity may
//! hold `limits.tunnel_max_streams_per_peer` streams at once, and every
//! stream takes its descriptor from the budget the pods' outbound
//! connections share (`proxy::descriptors`). A stream past either is
//! answered `503` with the reason in `x-waymark-error`: the peer's agent
//! sees a refused connect, the same as for a pod that refuses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::proxy::descriptors::{Descriptors, Held};

/// A peer's default share of the descriptor budget
/// (`limits.tunnel_max_streams_per_peer` unset): a quarter, as a pod's
/// outbound share is a quarter of it (half of the connections, at two
/// descriptors each), so that one peer, like one pod, leaves the rest to
/// the others.
pub fn default_per_peer(budget: usize) -> usize {
    budget / 4
}

/// Streams open per peer identity.
#[derive(Debug, Default)]
pub struct PeerStreams {
    open: Mutex<HashMap<Arc<str>, usize>>,
}

/// One admitted stream's place: given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    peers: Arc<PeerStreams>,
    peer: Arc<str>,
    _fd: Option<Held>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Why a stream was refused, for the 503's reason and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamLimit {
    PerPeer,
    Descriptors,
}

impl StreamLimit {
    pub fn reason(self) -> &'static str {
        match self {
            Self::PerPeer => {
                "the peer's streams reached limits.tunnel_max_streams_per_peer on the destination's agent"
            }
            Self::Descriptors => {
                "the destination's agent holds every descriptor its open-files limit leaves"
            }
        }
    }
}

impl PeerStreams {
    /// A place for one more stream of `peer`: at most `per_peer` at once
    /// (0: no bound), and one descriptor of `descriptors` if given.
    pub fn admit(
        self: &Arc<Self>,
        peer: &str,
        per_peer: usize,
        descriptors: Option<&Arc<Descriptors>>,
    ) -> Result<StreamSlot, StreamLimit> {
        let peer: Arc<str> = Arc::from(peer);
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(peer.clone()).or_default();
            if per_peer > 0 && *n >= per_peer {
                return Err(StreamLimit::PerPeer);
            }
            *n += 1;
        }
        // From here the slot gives the place back on every path.
        let mut slot = StreamSlot {
            peers: self.clone(),
            peer,
            _fd: None,
        };
        if let Some(budget) = descriptors {
            slot._fd = Some(budget.take(1).ok_or(StreamLimit::Descriptors)?);
        }
        Ok(slot)
    }

    /// Streams `peer` holds now.
    #[cfg(test)]
    pub fn open(&self, peer: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(peer).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_share_and_gets_it_back() {
        let peers = Arc::new(PeerStreams::default());
        let a1 = peers.admit("a", 2, None).unwrap();
        let _a2 = peers.admit("a", 2, None).unwrap();
        assert_eq!(peers.admit("a", 2, None).unwrap_err(), StreamLimit::PerPeer);
        let _b = peers
            .admit("b", 2, None)
            .expect("another peer has its own share");
        drop(a1);
        assert_eq!(peers.open("a"), 1);
        let _a3 = peers.admit("a", 2, None).expect("room again");
        assert!(peers.admit("c", 0, None).is_ok(), "0: no bound");
    }

    #[test]
    fn the_descriptor_budget_bounds_all_peers_together() {
        let peers = Arc::new(PeerStreams::default());
        let fds = Descriptors::new(2);
        let _a = peers.admit("a", 0, Some(&fds)).unwrap();
        let _b = peers.admit("b", 0, Some(&fds)).unwrap();
        assert_eq!(
            peers.admit("c", 0, Some(&fds)).unwrap_err(),
            StreamLimit::Descriptors
        );
        assert_eq!(peers.open("c"), 0, "a refused stream holds no place");
        assert_eq!(fds.used(), 2);
    }
}
