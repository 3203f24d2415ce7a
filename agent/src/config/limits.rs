//! `[limits]`: what one pod or one peer may hold of the agent, so that a
//! busy or hostile one cannot take the node's proxy from the others:
//! HTTP/2 streams per connection, how long a connection may sit idle, how
//! many TLS handshakes the tunnel port works on at once, and how many bytes
//! all buffered messages may hold together.
//!
//! Connection counts per pod live in `[outbound]` (`max_connections_per_pod`,
//! `max_connections`), next to the listener they bound.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Concurrent streams on one pod's HTTP/2 connection (RFC 9113 recommends
/// at least 100; gRPC clients open one per call).
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Concurrent streams on one tunnel connection: it carries every
/// connection from one peer agent's pods to this node.
pub const DEFAULT_TUNNEL_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// TLS handshakes the tunnel port works on at once. Handshakes cost CPU
/// (signatures, certificate chains) on the data-path threads; a peer
/// cannot make the agent spend more than this many at a time.
pub const DEFAULT_TUNNEL_MAX_HANDSHAKES: usize = 64;
/// A connection with no byte either way for this long is closed: a pod
/// cannot pin sockets, buffers and table entries with connections it
/// forgot. An hour, as Envoy's default TCP idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes every buffered message holds together (retry copies, `TRACE`
/// bodies): 1,024 full 64 KiB retry copies at once, an eighth of the
/// DaemonSet's 512 MiB memory limit.
pub const DEFAULT_BUFFER_MEMORY_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Streams a pod may have open at once on one HTTP/2 connection to the
    /// agent; advertised in SETTINGS, streams beyond it are refused
    /// (`REFUSED_STREAM`, safe for the client to retry).
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
    /// The same for each tunnel connection another node's agent opens to
    /// this one.
    #[serde(default = "default_tunnel_streams")]
    pub tunnel_max_concurrent_streams: u32,
    /// Descriptors pods' outbound connections (two each) and the tunnel's
    /// inbound streams (one each) may hold together; past it a pod's new
    /// connection is refused at accept
    /// (`waymark_outbound_refused_total{limit="descriptors"}`) and a new
    /// stream answered 503. Unset: the open-files limit in force less
    /// 1,024 (kept for listeners, the tunnel, the admin API and the kernel
    /// maps). 0: no bound (the accept loops back off on `EMFILE`).
    #[serde(default)]
    pub connection_descriptors: Option<usize>,
    /// Streams one peer (a workload identity of another node) may have
    /// open at once through the tunnel to this agent, over all its tunnel
    /// connections; past it a new stream is answered 503 and counted
    /// (`waymark_tunnel_streams{direction="inbound",result="limited"}`).
    /// Each stream holds one of the agent's descriptors (its dial to the
    /// pod). Unset: a quarter of the descriptors the agent's open-files
    /// limit leaves (4,744 with 20,000 files), so that one peer cannot take
    /// them from the pods and other peers. 0: no limit.
    #[serde(default)]
    pub tunnel_max_streams_per_peer: Option<usize>,
    /// TLS handshakes in progress at once on the tunnel port; a connection
    /// arriving beyond them is reset at once and counted
    /// (`waymark_tunnel_handshake_failures_total{reason="too_many_handshakes"}`).
    #[serde(default = "default_tunnel_handshakes")]
    pub tunnel_max_handshakes: usize,
    /// Pods' opaque TCP connections and HTTP connections to the agent with
    /// no byte either way for this long are closed (HTTP/2 with a GOAWAY)
    /// and counted (`waymark_idle_closed_total{pod,protocol}`).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Bytes the agent holds at once, over all requests, in copies of
    /// request bodies kept for retries and in `TRACE` response bodies read
    /// to append the context. Once spent, a request is forwarded without a
    /// copy (it cannot be retried) and a `TRACE` answer carries its context
    /// in a header; each is counted in
    /// `waymark_limit_refused_total{pod,limit="buffer_memory"}`.
    #[serde(default = "default_buffer_memory")]
    pub buffer_memory_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            tunnel_max_concurrent_streams: DEFAULT_TUNNEL_MAX_CONCURRENT_STREAMS,
            tunnel_max_streams_per_peer: None,
            connection_descriptors: None,
            tunnel_max_handshakes: DEFAULT_TUNNEL_MAX_HANDSHAKES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            buffer_memory_bytes: DEFAULT_BUFFER_MEMORY_BYTES,
        }
    }
}

fn default_h2_streams() -> u32 {
    DEFAULT_H2_MAX_CONCURRENT_STREAMS
}
fn default_tunnel_streams() -> u32 {
    DEFAULT_TUNNEL_MAX_CONCURRENT_STREAMS
}
fn default_tunnel_handshakes() -> usize {
    DEFAULT_TUNNEL_MAX_HANDSHAKES
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_buffer_memory() -> usize {
    DEFAULT_BUFFER_MEMORY_BYTES
}

pub fn validate(c: &LimitsConfig, problems: &mut Vec<String>) {
    for (key, v) in [
        (
            "limits.h2_max_concurrent_streams",
            c.h2_max_concurrent_streams,
        ),
        (
            "limits.tunnel_max_concurrent_streams",
            c.tunnel_max_concurrent_streams,
        ),
    ] {
        if v == 0 {
            problems.push(format!(
                "{key}: must be at least 1 (0 would refuse every stream)"
            ));
        }
    }
    if c.tunnel_max_handshakes == 0 {
        problems.push(
            "limits.tunnel_max_handshakes: must be at least 1 (0 would refuse every peer)"
                .to_string(),
        );
    }
    if c.idle_timeout < Duration::from_secs(1) {
        problems.push(format!(
            "limits.idle_timeout: {:?} is shorter than a second; connections between requests would be cut",
            c.idle_timeout
        ));
    }
    if c.buffer_memory_bytes < 65536 {
        problems.push(format!(
            "limits.buffer_memory_bytes: {} is under 64 KiB: not even one full retry copy would fit",
            c.buffer_memory_bytes
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_every_problem_at_once() {
        let c: LimitsConfig = toml::from_str("").unwrap();
        assert_eq!(c, LimitsConfig::default());
        let c: LimitsConfig = toml::from_str(
            "h2_max_concurrent_streams = 0\ntunnel_max_concurrent_streams = 0\ntunnel_max_handshakes = 0\nidle_timeout = \"10ms\"\nbuffer_memory_bytes = 100\n",
        )
        .unwrap();
        let mut p = Vec::new();
        validate(&c, &mut p);
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p[3].contains("limits.idle_timeout"), "{p:?}");
        assert!(p[4].contains("limits.buffer_memory_bytes"), "{p:?}");
        let e = toml::from_str::<LimitsConfig>("idle_timeout = \"soon\"").unwrap_err();
        assert!(e.to_string().contains("idle_timeout"), "{e}");
    }
}
