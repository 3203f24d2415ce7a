//! The receiving agent's part of a diagnostic trace: when a traced request
//! arrives through the mTLS tunnel, the inbound side appends its own block
//! (before the outbound agent appends its one, so the innermost hop comes
//! first), or its own `l5d-context` header for other methods.
//!
//! It says what only the receiving side knows: which local pod and address
//! answered, the source identity it verified in the client certificate,
//! the authorization decision that let the stream in, and what the kernel
//! saw on the connection to the pod.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::kernel::FlowCounters;
use crate::telemetry::trace::{Hop, ms};

/// The kernel's view of the agent's connection to the pod.
#[derive(Debug, Clone)]
pub struct KernelLine {
    pub local: SocketAddr,
    pub pod: SocketAddr,
    /// `None`: the kernel saw nothing notable on it (all zero).
    pub counters: Option<FlowCounters>,
}

/// Everything the inbound side records about one request.
#[derive(Debug, Clone, Default)]
pub struct InboundContext {
    pub node: String,
    pub duration: Duration,
    /// The local pod's name, when the target is one of this node's pods.
    pub pod: Option<String>,
    /// The `CONNECT` authority: the endpoint the outbound agent chose.
    pub target: Option<SocketAddr>,
    /// Services the target is an endpoint of.
    pub services: Vec<String>,
    /// The calling pod's address, from the `CONNECT`'s `forwarded: for=`.
    pub client: Option<String>,
    /// The source workload's SPIFFE ID, verified in the client certificate.
    pub peer_identity: Option<String>,
    /// `allow` or `deny`, and the rule that decided.
    pub decision: Option<(&'static str, String)>,
    pub kernel: Option<KernelLine>,
    /// The pod's answer and where its status came from (`200 source=app`,
    /// `503 source=proxy reason=connect_failure (…): …`).
    pub result: Option<String>,
}

impl Hop for InboundContext {
    fn block(&self) -> String {
        let mut b = String::new();
        let _ = writeln!(b, "--- waymark {} inbound ---", self.node);
        let _ = writeln!(b, "request duration: {}", ms(self.duration));
        match (&self.pod, self.target) {
            (Some(p), Some(t)) => {
                let _ = writeln!(b, "destination pod: {p} ({t})");
            }
            (None, Some(t)) => {
                let _ = writeln!(b, "destination pod: unknown ({t})");
            }
            _ => {}
        }
        if !self.services.is_empty() {
            let _ = writeln!(b, "endpoint of: {}", self.services.join(", "));
        }
        if let Some(c) = &self.client {
            let _ = writeln!(b, "client address: {c}");
        }
        let _ = writeln!(
            b,
            "peer identity: {} (verified client certificate)",
            self.peer_identity.as_deref().unwrap_or("none")
        );
        if let Some((decision, rule)) = &self.decision {
            let _ = writeln!(b, "authorization: {decision} (rule {rule})");
        }
        if let Some(r) = &self.result {
            let _ = writeln!(b, "result: {r}");
        }
        if let Some(k) = &self.kernel {
            // The outbound block's form, plus resets when there were any.
            let c = k.counters.unwrap_or_default();
            let resets = if c.resets_sent + c.resets_received > 0 {
                format!(
                    ", {} resets sent, {} received",
                    c.resets_sent, c.resets_received
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                b,
                "kernel: {} drops, {} retransmits{resets} on {}\u{2192}{}",
                c.drops, c.retransmits, k.local, k.pod
            );
        }
        b
    }

    fn header(&self) -> String {
        let mut h = format!(
            "node={}; direction=inbound; duration_ms={:.3}",
            self.node,
            self.duration.as_secs_f64() * 1000.0
        );
        if let Some(p) = &self.pod {
            let _ = write!(h, "; pod={p}");
        }
        if let Some(t) = self.target {
            let _ = write!(h, "; endpoint={t}");
        }
        if let Some(id) = &self.peer_identity {
            let _ = write!(h, "; peer_identity={id}");
        }
        if let Some((decision, rule)) = &self.decision {
            let _ = write!(h, "; authorization={decision}; rule={rule}");
        }
        if let Some(k) = &self.kernel {
            let c = k.counters.unwrap_or_default();
            let _ = write!(
                h,
                "; kernel_drops={}; kernel_retransmits={}",
                c.drops, c.retransmits
            );
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InboundContext {
        InboundContext {
            node: "node-b".into(),
            duration: Duration::from_micros(1500),
            pod: Some("default/web".into()),
            target: Some("10.2.0.2:8080".parse().unwrap()),
            services: vec!["web".into()],
            client: Some("10.1.0.2:40000".into()),
            peer_identity: Some("spiffe://cluster.local/ns/default/sa/client".into()),
            decision: Some(("allow", "default".into())),
            kernel: Some(KernelLine {
                local: "10.2.0.1:50000".parse().unwrap(),
                pod: "10.2.0.2:8080".parse().unwrap(),
                counters: None,
            }),
            result: Some("200 source=app".into()),
        }
    }

    #[test]
    fn block_names_pod_identity_and_decision() {
        assert_eq!(
            sample().block(),
            "--- waymark node-b inbound ---\n\
             request duration: 1.50 ms\n\
             destination pod: default/web (10.2.0.2:8080)\n\
             endpoint of: web\n\
             client address: 10.1.0.2:40000\n\
             peer identity: spiffe://cluster.local/ns/default/sa/client (verified client certificate)\n\
             authorization: allow (rule default)\n\
             result: 200 source=app\n\
             kernel: 0 drops, 0 retransmits on 10.2.0.1:50000\u{2192}10.2.0.2:8080\n"
        );
        let mut c = sample();
        if let Some(k) = c.kernel.as_mut() {
            k.counters = Some(FlowCounters {
                drops: 1,
                retransmits: 2,
                resets_sent: 0,
                resets_received: 3,
            });
        }
        assert!(c.block().contains(
            "kernel: 1 drops, 2 retransmits, 0 resets sent, 3 received on 10.2.0.1:50000\u{2192}10.2.0.2:8080\n"
        ));
    }

    #[test]
    fn header_is_one_valid_line() {
        let h = sample().header();
        assert_eq!(
            h,
            "node=node-b; direction=inbound; duration_ms=1.500; pod=default/web; endpoint=10.2.0.2:8080; peer_identity=spiffe://cluster.local/ns/default/sa/client; authorization=allow; rule=default; kernel_drops=0; kernel_retransmits=0"
        );
        assert!(http::HeaderValue::from_str(&h).is_ok());
    }
}
