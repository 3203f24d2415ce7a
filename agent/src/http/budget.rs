//! The node-wide bound on memory the agent holds to buffer messages:
//! copies of request bodies kept for retries ([`super::replay`]) and
//! response bodies read to append a `TRACE` block to them
//! (`limits.buffer_memory`).
//!
//! Each request is already capped (`proxy.retry_buffer_bytes`, 1 MiB for a
//! `TRACE` body), but nothing bounded their sum: a pod opening thousands of
//! slow uploads through a retrying route made the agent hold 64 KiB for
//! each, for as long as it liked. With the budget spent, a request is not
//! buffered — it is forwarded as it would be with a body too big to keep:
//! without a retry (as Linkerd does past its replay buffer, and Envoy when
//! a body outgrows its retry buffer: the request goes on, it just cannot be
//! retried), and a `TRACE` response is passed on untouched with the
//! context in a header. Failing the request instead (a 503) would turn
//! memory pressure into errors for requests that would most likely have
//! succeeded at the first try. Each such request is counted with its pod
//! (`waymark_limit_refused_total{pod,limit="buffer_memory"}`).
//!
//! The accounting is a semaphore of one permit per byte: an account takes
//! permits as its copy grows and gives them all back when it is dropped.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics::RefusedLabels;

/// The label of requests left unbuffered because the budget was spent.
pub const LIMIT: &str = "buffer_memory";

/// The bytes every buffered message of the agent may hold together.
pub struct BufferBudget {
    permits: Arc<Semaphore>,
    max: usize,
    /// Bytes held now (`waymark_buffer_memory_bytes`).
    held: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

impl BufferBudget {
    pub fn new(max: usize, held: Gauge, refused: Family<RefusedLabels, Counter>) -> Arc<Self> {
        let max = max.min(Semaphore::MAX_PERMITS);
        Arc::new(BufferBudget {
            permits: Arc::new(Semaphore::new(max)),
            max,
            held,
            refused,
        })
    }

    /// An empty account for one message of `pod`.
    pub fn account(self: &Arc<Self>, pod: &str) -> Account {
        Account {
            budget: self.clone(),
            pod: pod.to_string(),
            permit: None,
            bytes: 0,
        }
    }

    /// Bytes held by every account now.
    pub fn in_use(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// What one message holds of the budget; everything goes back on drop.
pub struct Account {
    budget: Arc<BufferBudget>,
    pod: String,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Account {
    /// Takes `n` more bytes; false (and counted once for the pod) when the
    /// budget has not got them. The caller then stops buffering and drops
    /// what it kept ([`Account::release`]).
    pub fn grow(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let got = u32::try_from(n)
            .ok()
            .and_then(|n| self.budget.permits.clone().try_acquire_many_owned(n).ok());
        match got {
            Some(p) => {
                match &mut self.permit {
                    Some(held) => held.merge(p),
                    None => self.permit = Some(p),
                }
                self.bytes += n;
                self.budget.held.inc_by(n as i64);
                true
            }
            None => {
                self.budget
                    .refused
                    .get_or_create(&RefusedLabels {
                        pod: self.pod.clone(),
                        limit: LIMIT,
                    })
                    .inc();
                tracing::debug!(
                    pod = %self.pod,
                    held = self.budget.in_use(),
                    max = self.budget.max,
                    wanted = n,
                    "limits.buffer_memory spent: the message is not buffered"
                );
                false
            }
        }
    }

    /// Gives back everything this account holds.
    pub fn release(&mut self) {
        if self.permit.take().is_some() {
            self.budget.held.dec_by(self.bytes as i64);
            self.bytes = 0;
        }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: usize) -> Arc<BufferBudget> {
        BufferBudget::new(max, Gauge::default(), Family::default())
    }

    #[test]
    fn accounts_share_the_budget_and_give_it_back() {
        let b = budget(100);
        let mut a = b.account("default/a");
        let mut c = b.account("default/c");
        assert!(a.grow(60));
        assert!(a.grow(0));
        assert!(!c.grow(50), "60 + 50 is over 100");
        assert!(c.grow(40));
        assert_eq!(b.in_use(), 100);
        assert_eq!(b.held.get(), 100);
        drop(a);
        assert_eq!(b.in_use(), 40);
        assert!(c.grow(60));
        c.release();
        assert_eq!((b.in_use(), b.held.get()), (0, 0));
        let refused = b
            .refused
            .get_or_create(&RefusedLabels {
                pod: "default/c".into(),
                limit: LIMIT,
            })
            .get();
        assert_eq!(refused, 1);
    }

    #[test]
    fn more_than_a_semaphore_can_count_is_refused_not_a_panic() {
        let b = budget(usize::MAX);
        let mut a = b.account("p");
        assert!(!a.grow(u32::MAX as usize + 1));
    }
}
