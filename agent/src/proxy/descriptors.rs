//! The agent's file descriptors, one budget for every connection that
//! holds some.
//!
//! A pod's proxied connection holds two (the pod's side and the upstream),
//! a stream another node's agent opens through the tunnel holds one (the
//! dial to the local pod). Bounded apart, the outbound connections alone
//! may use every descriptor the open-files limit leaves (that is how their
//! default bound is derived), and the tunnel's streams from other nodes
//! come on top: pods of several nodes dialling pods of this one could then
//! run the agent into `EMFILE`, and every pod's new connections would wait.
//! Counted together, the agent never holds more than its limit less
//! [`RESERVED_FDS`]: past it a new outbound connection is refused at accept
//! (`limit="descriptors"`) and a new tunnel stream answered 503, while what
//! is open goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors kept out of the connections' share of the open-files
/// limit: listeners (two per enrolled pod), the tunnel, the admin API, the
/// kernel maps and the log.
pub const RESERVED_FDS: usize = 1024;

/// The smallest budget, for an agent held to fewer files than the reserve:
/// some connections still go through (the accept loops back off on
/// `EMFILE` if the files run out first).
const MIN_BUDGET: usize = 128;

/// Descriptors held by connections, against a limit.
#[derive(Debug)]
pub struct Descriptors {
    used: AtomicUsize,
    /// 0: no limit.
    limit: usize,
}

/// Descriptors taken from a [`Descriptors`] budget, given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Descriptors>,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

impl Descriptors {
    /// A budget of `limit` descriptors (0: no limit).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// `limits.connection_descriptors`: as configured, or (unset) what the
    /// open-files limit leaves.
    pub fn from_config(configured: Option<usize>) -> Arc<Self> {
        match configured {
            Some(limit) => Self::new(limit),
            None => Self::for_open_files(),
        }
    }

    /// The budget the open-files limit in force leaves: read after the
    /// agent raised its soft limit to the hard one.
    pub fn for_open_files() -> Arc<Self> {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(8192 + RESERVED_FDS as u64);
        Self::new(Self::budget_for_open_files(soft))
    }

    /// What a connection may hold of `open_files`: all but the reserve.
    pub fn budget_for_open_files(open_files: u64) -> usize {
        let fds = usize::try_from(open_files).unwrap_or(usize::MAX);
        fds.saturating_sub(RESERVED_FDS).max(MIN_BUDGET)
    }

    /// Takes `n` descriptors, or `None` if that would pass the limit.
    pub fn take(self: &Arc<Self>, n: usize) -> Option<Held> {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        let held = Held {
            budget: self.clone(),
            n,
        };
        if self.limit > 0 && before + n > self.limit {
            return None; // `held` gives them back
        }
        Some(held)
    }

    /// Descriptors held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit (0: none).
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_taken_is_given_back_and_the_limit_holds() {
        let b = Descriptors::new(5);
        let two = b.take(2).expect("2 of 5");
        let three = b.take(3).expect("5 of 5");
        assert!(b.take(1).is_none(), "a 6th of 5");
        assert_eq!(b.used(), 5, "a refused take leaves nothing taken");
        drop(two);
        assert_eq!(b.used(), 3);
        let _again = b.take(2).expect("room again");
        drop(three);
        assert_eq!(b.used(), 2);
        let unlimited = Descriptors::new(0);
        assert!(unlimited.take(usize::MAX / 2).is_some());
    }

    #[test]
    fn the_budget_is_the_open_files_less_the_reserve() {
        assert_eq!(Descriptors::budget_for_open_files(20_000), 18_976);
        assert_eq!(Descriptors::budget_for_open_files(1_000), MIN_BUDGET);
        assert!(Descriptors::budget_for_open_files(u64::MAX) > 1 << 40);
    }
}
