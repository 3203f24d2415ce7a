//! Per-request load balancing across a service's endpoints: power of two
//! choices over a peak-EWMA latency estimate weighted by in-flight requests
//! (Linkerd's balancer), plus failure accrual that ejects an endpoint after
//! consecutive failures, backs off exponentially and readmits it by probing.
//!
//! Plain synchronous types, shared across tasks behind `Arc`; the caller
//! passes the time in, so every rule here is tested deterministically.
//!
//! ## New endpoints
//!
//! A peak-EWMA balancer has to say what an endpoint costs before it has
//! answered. Linkerd starts it at a default RTT of 30 ms that fades over the
//! decay time (10 s). Against endpoints that answer in a millisecond that
//! prior loses every comparison, so with sequential calls (one gRPC channel,
//! nothing in flight to even things out) a third endpoint got no call at
//! all until the prior had faded — 0 of 300 calls in every run. Linkerd
//! also balances only over endpoints whose connection is ready, which
//! keeps connection setup out of its estimate; a first sample that
//! included a TLS handshake condemned an endpoint here the same way, since
//! a peak replaces the estimate and then only fades.
//!
//! waymark's answer, from Finagle's P2C-peak-EWMA, where an endpoint with
//! no latency yet costs nothing unless it has a request outstanding:
//!
//! - A new endpoint with nothing in flight costs 0, so P2C sends it a
//!   request the first time it draws it (within about n/2 picks over n
//!   endpoints). With a request in flight it costs the prior × (in flight +
//!   1), Linkerd's rule, so it gets one request at a time while its peers
//!   are faster than the prior — a slow or broken newcomer is tried, not
//!   flooded.
//! - Its answers replace the guess instead of being compared with it: the
//!   first sets the estimate, the next lowers it if lower. The endpoint
//!   stays new for [`stats::WARMUP_ANSWERS`] answers, because a first
//!   exchange also pays setup the sender cannot see (the peer agent's
//!   detection, its connection to the pod, the server's per-connection
//!   state). An estimate too low is corrected by the next answer — a peak
//!   replaces it at once — while one too high would only fade, so the warm
//!   up errs low.
//! - The first failure ends it: the endpoint falls back to the prior (or
//!   the failure's latency, if longer), as before. One failed request per
//!   new endpoint, not one per draw until failure accrual ejects it.
//! - Connection setup is never a latency sample: the proxy starts the
//!   clock after a connection is had and records setup separately
//!   ([`EndpointStats::record_connect`], shown by `waymark endpoints`).
//!
//! The alternatives: seeding a newcomer with its peers' mean estimate also
//! gets it sampled, but only in the pairs where it meets a peer slower than
//! that mean, and it needs a fallback when no peer has answered either; a
//! separate probe request would need a request the endpoint understands (a
//! gRPC service has no safe generic call), where the real request that P2C
//! sends it anyway measures exactly what the balancer compares. Envoy's slow start ramps a new host's weight up
//! over a window to protect cold servers: the opposite concern, and for a
//! per-node proxy that sees only its node's share of the traffic a
//! newcomer's first few requests are not a threat.
//!
//! ## Endpoints P2C passes over
//!
//! Getting a new endpoint its first requests is not enough: peak EWMA
//! makes any slow answer the estimate at once and lets it fade only over
//! `decay`, and with nothing in flight (sequential calls, a few callers)
//! P2C then sends the endpoint nothing, so nothing refreshes the number
//! either. On freshly started agents (release build) one of two equal
//! endpoints behind the tunnel got 2, 3, 12, 12 and 21 of 300 sequential
//! calls in five runs of eight after a slow answer, and once the endpoint
//! on the client's node, the fastest, got 4 after one of its own; in
//! simulation 8 callers over three equal noisy endpoints left one with
//! 19 % (linkerd2 #14086 is the same complaint about Linkerd).
//!
//! So an endpoint's estimate also loses weight with every P2C comparison
//! it loses: passed over `k` times since it was last chosen, it is
//! compared at `estimate / (1 + k / 10)` ([`stats::LOSSES_TO_HALVE`]).
//! Time is the wrong clock for this, since its peers gather evidence at
//! the rate of the traffic; comparisons are that rate. One answer `c`×
//! slower than its peers costs an endpoint about `10 × (c − 1)` lost
//! comparisons (a descheduled thread, 4×: 30), after which it is tried
//! again; its answer is then weighed against the discounted estimate, so
//! an ordinary one keeps it in, and a slow one, a peak, is the estimate
//! again at once. The discount is hyperbolic rather than exponential so
//! that retrying stays cheap however slow the endpoint is: each retry of
//! a `c`× slower endpoint costs `c − 1` peer latencies and comes once per
//! `10 × (c − 1)` comparisons it loses, a tenth of a peer's latency per
//! comparison at most (in simulation, one endpoint 10× slower than two
//! peers gets 1–2 % of sequential calls and raises their mean latency
//! by about a tenth; Linkerd sends it nothing until `decay` has worn its
//! estimate down, 23 s for 10×). While the retry is out the endpoint costs its
//! undiscounted estimate, so a really slower one gets one request, not
//! every comparison until its slow answer arrives. Where latency really
//! differs locality stays: 0.3 ms here against 5 ms behind the tunnel
//! keeps the near endpoint on every pair it is in bar the retries; where
//! it differs by 2.7× (0.3 against 0.8 ms, noisy answers, simulated) the
//! near one still takes 58 % of sequential calls on average, and at least
//! 45 % in every run, where the peak alone had let it fall to 6 %.

mod ewma;
mod history;
mod p2c;
mod stats;

use std::time::Duration;

pub use history::{Recent, WINDOW as RECENT_WINDOW};
pub use p2c::{Balancer, Pick};
pub use stats::{Connects, EndpointStats, EndpointView, LOSSES_TO_HALVE, WARMUP_ANSWERS};

/// Linkerd's decay time constant for the latency estimate.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Cost basis of a new endpoint with a request out (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
pub const DEFAULT_EJECT_BASE: Duration = Duration::from_secs(5);
pub const DEFAULT_EJECT_MAX: Duration = Duration::from_secs(60);

/// Tunables of one balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Time constant of the latency estimate: how fast it forgets. Zero means
    /// no smoothing (the last sample is the estimate).
    pub decay: Duration,
    /// What a new endpoint is assumed to cost per request while its first
    /// request is out (an idle new endpoint costs nothing; see "New
    /// endpoints" above), and where one whose first request failed starts.
    pub default_rtt: Duration,
    /// Consecutive failures that eject an endpoint; 0 never ejects.
    pub failure_threshold: u32,
    /// Length of a first ejection; each failed probe doubles it.
    pub eject_base: Duration,
    /// Cap on the ejection length.
    pub eject_max: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            decay: DEFAULT_DECAY,
            default_rtt: DEFAULT_RTT,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            eject_base: DEFAULT_EJECT_BASE,
            eject_max: DEFAULT_EJECT_MAX,
        }
    }
}

impl BalanceConfig {
    /// Cross-field rules for config files. The balancer itself copes with
    /// any values (a zero base only limits a failing endpoint to one probe
    /// at a time), so this is about telling the operator, not safety.
    pub fn validate(&self) -> Result<(), BalanceError> {
        if self.eject_base.is_zero() {
            return Err(BalanceError::ZeroEjection);
        }
        if self.eject_max < self.eject_base {
            return Err(BalanceError::EjectMaxBelowBase {
                base: self.eject_base,
                max: self.eject_max,
            });
        }
        Ok(())
    }

    /// How long the ejection numbered `level` lasts (0 = first):
    /// `eject_base × 2^level`, capped at `eject_max`.
    fn ejection(&self, level: u32) -> Duration {
        2u32.checked_pow(level)
            .and_then(|factor| self.eject_base.checked_mul(factor))
            .map_or(self.eject_max, |d| d.min(self.eject_max))
    }
}

/// What can be wrong with a balancer configuration.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("eject_base is 0: failing endpoints would never be kept out; use e.g. 5s")]
    ZeroEjection,
    #[error("eject_max ({max:?}) is below eject_base ({base:?}); raise eject_max")]
    EjectMaxBelowBase { base: Duration, max: Duration },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_linkerds_and_valid() {
        let c = BalanceConfig::default();
        assert_eq!(c.decay, Duration::from_secs(10));
        assert_eq!(c.default_rtt, Duration::from_millis(30));
        assert_eq!(c.failure_threshold, 5);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validate_names_the_bad_fields() {
        let c = BalanceConfig {
            eject_max: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("eject_max (1s)")
        );
        let c = BalanceConfig {
            eject_base: Duration::ZERO,
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(BalanceError::ZeroEjection)));
    }

    #[test]
    fn ejection_doubles_then_caps() {
        let c = BalanceConfig::default();
        let secs: Vec<u64> = (0..7).map(|l| c.ejection(l).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(c.ejection(u32::MAX), c.eject_max);
    }
}
