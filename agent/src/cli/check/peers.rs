//! The `peers` group of `waymark check`: can this node's agent reach every
//! other node's agent over the mTLS tunnel? The agent probes them (`GET
//! /check/peers`: connect and TLS handshake as the tunnel does, identity
//! verified); this judges each answer and says what to look at.

use std::time::Duration;

use super::super::client::{AdminClient, block_on};
use super::Check;
use crate::admin::peers::{PeerFacts, PeersFacts};

pub fn checks(client: &AdminClient, timeout: Duration) -> Vec<Check> {
    let path = format!("/check/peers?timeout_ms={}", timeout.as_millis().max(1));
    match block_on(client.get_json::<PeersFacts>(&path)) {
        Ok(f) => judge(&f),
        Err(e) => vec![Check::skip(format!(
            "peer agents: cannot ask the agent ({e:#})"
        ))],
    }
}

pub fn judge(f: &PeersFacts) -> Vec<Check> {
    if !f.mtls {
        return vec![Check::pass(
            "no mTLS ([identity] is not set): agents talk plaintext, there is no tunnel to probe",
        )];
    }
    if f.peers.is_empty() {
        return vec![Check::pass("no other nodes in [[nodes]]")];
    }
    f.peers.iter().map(|p| peer(p, f.timeout_ms)).collect()
}

fn peer(p: &PeerFacts, timeout_ms: u64) -> Check {
    let who = format!("{} at {}", p.node, p.tunnel);
    if p.reachable {
        return Check::pass(format!(
            "{who}: {} in {:.1} ms",
            p.verified_identity
                .as_deref()
                .unwrap_or("identity verified"),
            p.handshake_ms.unwrap_or_default()
        ));
    }
    let reason = p.reason.as_deref().unwrap_or("error");
    let port = p.tunnel.port();
    let node = &p.node;
    let hint = match reason {
        "refused" => format!(
            "is the agent running on {node}? nothing accepts on {} (its [inbound] listen)",
            p.tunnel
        ),
        "timeout" | "unreachable" | "connect" => format!(
            "is port {port} on {node} reachable from here (routes, firewall, network policy)? is the agent on {node} running? (no answer within {timeout_ms} ms)"
        ),
        "unknown_ca" | "bad_certificate" => format!(
            "do the trust anchors match? {node}'s chain does not lead to this node's trust bundle, or ours to its: give every node the same ca.crt (docs/mtls.md)"
        ),
        "expired" => format!(
            "a certificate in the chain is expired or not yet valid: compare the clocks, and run `waymark check` on {node} for its issuer"
        ),
        "wrong_identity" => format!(
            "{node}'s agent presents another identity than {} expects from [[nodes]]: fix that entry's identity or the agent's node_identity",
            p.expected_identity.as_deref().unwrap_or("this node")
        ),
        "no_local_certificate" => {
            "this agent has no certificate for its node identity: see the certificates check".into()
        }
        _ => format!(
            "is it a waymark agent that answers on {}? see both agents' logs",
            p.tunnel
        ),
    };
    Check::fail(format!("{who}: {reason}"), hint).with_detail(p.error.clone())
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    fn facts(peers: Vec<PeerFacts>) -> PeersFacts {
        PeersFacts {
            mtls: true,
            local_identity: Some("spiffe://cluster.local/ns/waymark-system/sa/node0".into()),
            timeout_ms: 2000,
            peers,
        }
    }

    fn node1(reachable: bool, reason: Option<&str>) -> PeerFacts {
        PeerFacts {
            node: "node1".into(),
            tunnel: "10.200.0.2:15008".parse().unwrap(),
            expected_identity: Some("spiffe://cluster.local/ns/waymark-system/sa/node1".into()),
            reachable,
            handshake_ms: reachable.then_some(1.25),
            verified_identity: reachable
                .then(|| "spiffe://cluster.local/ns/waymark-system/sa/node1".into()),
            reason: reason.map(str::to_string),
            error: reason.map(|r| format!("it failed: {r}")),
        }
    }

    #[test]
    fn without_mtls_the_group_says_so_and_passes() {
        let f = PeersFacts {
            mtls: false,
            ..facts(vec![])
        };
        let c = judge(&f);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, Status::Pass);
        assert!(c[0].what.contains("no mTLS"));
    }

    #[test]
    fn a_reachable_peer_shows_its_identity_and_time() {
        let c = judge(&facts(vec![node1(true, None)]));
        assert_eq!(c[0].status, Status::Pass);
        assert_eq!(
            c[0].what,
            "node1 at 10.200.0.2:15008: spiffe://cluster.local/ns/waymark-system/sa/node1 in 1.2 ms"
        );
    }

    #[test]
    fn each_failure_names_the_node_and_a_hint_for_its_reason() {
        for (reason, hint) in [
            ("refused", "is the agent running on node1?"),
            ("timeout", "is port 15008 on node1 reachable"),
            ("unknown_ca", "do the trust anchors match?"),
            ("wrong_identity", "presents another identity"),
            ("protocol", "is it a waymark agent"),
        ] {
            let c = judge(&facts(vec![node1(false, Some(reason))]));
            assert_eq!(c[0].status, Status::Fail);
            assert_eq!(c[0].what, format!("node1 at 10.200.0.2:15008: {reason}"));
            assert!(
                c[0].hint.as_deref().unwrap().contains(hint),
                "{reason}: {:?}",
                c[0].hint
            );
            assert_eq!(c[0].detail, vec![format!("it failed: {reason}")]);
        }
    }
}
