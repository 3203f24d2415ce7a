//! Readiness: the agent is ready only when every condition holds, and
//! `/ready` says which ones do not.

use std::sync::Mutex;

/// A condition computed each time readiness is asked (true: it holds).
type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// Conditions that must all hold for `/ready` to answer 200.
#[derive(Default)]
pub struct Readiness {
    pending: Mutex<Vec<&'static str>>,
    /// Conditions that depend on something outside the agent (another
    /// agent's lock), so they are looked at when asked rather than set.
    checks: Mutex<Vec<(&'static str, Check)>>,
}

impl Readiness {
    /// Starts with every condition pending.
    pub fn new(conditions: &[&'static str]) -> Self {
        Readiness {
            pending: Mutex::new(conditions.to_vec()),
            checks: Mutex::default(),
        }
    }

    /// Adds a condition that `holds` computes whenever readiness is asked.
    pub fn add_check(
        &self,
        condition: &'static str,
        holds: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((condition, Box::new(holds)));
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
        let mut out = self.lock().clone();
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(checks.iter().filter(|(_, holds)| !holds()).map(|(c, _)| *c));
        out
    }

    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
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

    #[test]
    fn checks_are_computed_when_asked() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let r = Readiness::new(&[]);
        let holds = Arc::new(AtomicBool::new(true));
        let h = holds.clone();
        r.add_check("successor", move || h.load(Ordering::Relaxed));
        assert!(r.is_ready());
        holds.store(false, Ordering::Relaxed);
        assert_eq!(r.pending(), vec!["successor"]);
        assert!(!r.is_ready());
    }
}
