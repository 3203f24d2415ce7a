//! Per-request load balancing across a service's endpoints: power of two
//! choices over a peak-EWMA latency estimate weighted by in-flight requests
//! (Linkerd's balancer), plus failure accrual that ejects an endpoint after
//! consecutive failures, backs off exponentially and readmits it by probing.
//!
//! Plain synchronous types, shared across tasks behind `Arc`; the caller
//! passes the time in, so every rule here is tested deterministically.

mod ewma;
mod history;
mod p2c;
mod stats;

use std::time::Duration;

pub use history::{Recent, WINDOW as RECENT_WINDOW};
pub use p2c::Balancer;
pub use stats::{EndpointStats, EndpointView};

/// Linkerd's decay time constant for the latency estimate.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Estimate for an endpoint that has not answered yet (Linkerd's default).
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
    /// Initial estimate for a new endpoint.
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
