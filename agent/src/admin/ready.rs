//! Readiness: the agent is ready only when every condition holds, and
//! `/ready` says which ones do not.

use std::sync::Mutex;

/// Conditions that must all hold for `/ready` to answer 200.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<Vec<&'static str>>,
}

impl Readiness {
    /// Starts with every condition pending.
    pub fn new(conditions: &[&'static str]) -> Self {
        Readiness {
            pending: Mutex::new(conditions.to_vec()),
        }
    }

    /// Marks a condition as met.
    pub fn set(&self, condition: &'static str) {
        self.lock().retain(|c| *c != condition);
    }

    /// Marks a condition as not met (e.g. `draining`).
    pub fn unset(&self, condition: &'static str) {
        let mut p = self.lock();
        if !p.contains(&condition) {
            p.push(condition);
        }
    }

    /// The conditions not met; empty means ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<&'static str>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_conditions_hold() {
        let r = Readiness::new(&["a", "b"]);
        assert_eq!(r.pending(), vec!["a", "b"]);
        r.set("a");
        assert_eq!(r.pending(), vec!["b"]);
        r.set("b");
        assert!(r.pending().is_empty());
        r.unset("draining");
        r.unset("draining");
        assert_eq!(r.pending(), vec!["draining"]);
    }
}
