//! Budget: retries cost the endpoints load exactly when they are least able
//! to take it, so each service allows retries only up to a share of its
//! requests (Linkerd's retry budget: `retry_ratio` of recent requests plus
//! `min_retries_per_second`). Every request deposits; each retry withdraws.

use std::time::Instant;

use super::retry::Decision;
use crate::discovery::Service;

/// A request of `service` started at `now`: the budget earns its share.
pub(super) fn deposit(service: &Service, now: Instant) {
    service.budget.deposit(now);
}

/// The retry stage's `decision`, unless it is a retry the service's
/// budget cannot pay for: then [`Decision::BudgetExhausted`].
pub(super) fn allow(decision: Decision, service: &Service, now: Instant) -> Decision {
    match decision {
        Decision::Retry if !service.budget.try_withdraw(now) => Decision::BudgetExhausted,
        d => d,
    }
}
