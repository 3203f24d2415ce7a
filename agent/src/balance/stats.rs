//! What the balancer knows about one endpoint — latency estimate, requests
//! in flight, failure streak and ejection — and the rules that change it
//! when a request to it starts and ends.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::BalanceConfig;
use super::ewma::PeakEwma;
use super::history::{History, Recent};

/// Shared (behind `Arc`) by every balancer that contains the endpoint, so it
/// survives a config reload for endpoints that stay.
#[derive(Debug)]
pub struct EndpointStats {
    /// Touched once when a request is picked and once when it ends; the
    /// critical sections are a few arithmetic operations.
    state: Mutex<State>,
    in_flight: AtomicUsize,
    ejections_total: AtomicU64,
}

#[derive(Debug)]
struct State {
    ewma: PeakEwma,
    consecutive_failures: u32,
    /// `Some` from ejection until readmission, including the probation after
    /// the instant has passed.
    ejected_until: Option<Instant>,
    /// Ejections in a row without a success between them (0 = the first);
    /// sets the length of the next one.
    level: u32,
    /// A probe request is out: no second one until it ends, so a recovering
    /// endpoint is tested by one request, not flooded by many.
    probe_in_flight: bool,
    /// For operators only: recent outcomes, the last error, why ejected.
    history: History,
}

/// An endpoint as an operator sees it (`waymark endpoints`).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointView {
    pub ewma: Duration,
    pub in_flight: usize,
    /// Outcomes in the last [`super::RECENT_WINDOW`].
    pub recent: Recent,
    /// Out of service until then (in the future).
    pub ejected_until: Option<Instant>,
    /// The ejection has expired and a probe will decide.
    pub on_probation: bool,
    /// Why it was last ejected (kept after readmission).
    pub ejection_reason: Option<String>,
    pub ejections_total: u64,
    pub last_error: Option<(SystemTime, String)>,
}

/// On what terms a request was sent to the endpoint; decides what its
/// outcome may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The endpoint was in service.
    Normal,
    /// The endpoint's ejection had expired: this request tests it.
    Probe,
    /// Every endpoint was out; this one was sent to anyway.
    Panic,
}

/// One endpoint as P2C sees it at a given instant.
#[derive(Debug, Clone, Copy)]
pub(super) struct Snapshot {
    /// In service, or ready to be probed.
    pub available: bool,
    pub cost: f64,
    pub ejected_until: Option<Instant>,
}

/// Added to every estimate so that an endpoint whose estimate has faded to
/// nothing still ranks by its in-flight count (0 × anything is 0).
const COST_FLOOR_NS: f64 = 1_000.0;

impl EndpointStats {
    /// Starts at `config.default_rtt`, stamped `now`; like any estimate it
    /// fades until the first response arrives.
    pub fn new(now: Instant, config: &BalanceConfig) -> Self {
        Self {
            state: Mutex::new(State {
                ewma: PeakEwma::new(config.default_rtt, config.decay, now),
                consecutive_failures: 0,
                ejected_until: None,
                level: 0,
                probe_in_flight: false,
                history: History::new(now),
            }),
            in_flight: AtomicUsize::new(0),
            ejections_total: AtomicU64::new(0),
        }
    }

    /// The latency estimate at `now`.
    pub fn ewma(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.lock().ewma.get_ns(now) as u64)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Out of service at `now`. An endpoint whose ejection has expired is
    /// not ejected any more — it is on probation until a probe decides.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.lock().ejected_until.is_some_and(|until| now < until)
    }

    /// When the current ejection ends (or ended, while on probation).
    #[cfg(test)]
    pub fn ejected_until(&self) -> Option<Instant> {
        self.lock().ejected_until
    }

    /// What an operator is shown, at `now`.
    pub fn view(&self, now: Instant) -> EndpointView {
        let state = self.lock();
        EndpointView {
            ewma: Duration::from_nanos(state.ewma.get_ns(now) as u64),
            in_flight: self.in_flight(),
            recent: state.history.recent(now),
            ejected_until: state.ejected_until.filter(|u| now < *u),
            on_probation: state.ejected_until.is_some_and(|u| now >= u),
            ejection_reason: state.history.ejection_reason().map(str::to_string),
            ejections_total: self.ejections_total(),
            last_error: state.history.last_error().cloned(),
        }
    }

    /// Why a request to the endpoint failed (the proxy's detail, or the
    /// endpoint's status), with the wall-clock time, for operators.
    pub fn record_error(&self, at: SystemTime, error: &str) {
        self.lock().history.error(at, error);
    }

    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn consecutive_failures(&self) -> u32 {
        self.lock().consecutive_failures
    }

    pub(super) fn set_decay(&self, decay: Duration) {
        self.lock().ewma.set_decay(decay);
    }

    /// Cost is Linkerd's: estimate × (in flight + 1), so a fast endpoint
    /// that is already busy loses to a slightly slower idle one.
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot {
        let state = self.lock();
        let in_flight = self.in_flight() as f64;
        Snapshot {
            available: state.available(now),
            cost: (state.ewma.get_ns(now) + COST_FLOOR_NS) * (in_flight + 1.0),
            ejected_until: state.ejected_until,
        }
    }

    /// Claims the endpoint for one request if it is available now: in
    /// service (a normal request) or due for its single probe.
    pub(super) fn try_acquire(&self, now: Instant) -> Option<Role> {
        let mut state = self.lock();
        match state.ejected_until {
            None => Some(Role::Normal),
            Some(_) if state.available(now) => {
                state.probe_in_flight = true;
                Some(Role::Probe)
            }
            Some(_) => None,
        }
    }

    pub(super) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A request ended without an outcome (cancelled by the client, say): it
    /// says nothing about the endpoint, so only a probe claim is released.
    pub(super) fn cancel(&self, role: Role) {
        if role == Role::Probe {
            self.lock().probe_in_flight = false;
        }
    }

    /// Applies a request's outcome.
    pub(super) fn finish(
        &self,
        role: Role,
        now: Instant,
        latency: Duration,
        success: bool,
        config: &BalanceConfig,
    ) {
        let mut state = self.lock();
        // A fast failure (an instant 503, a refused connection) must not make
        // a broken endpoint look attractive, so failures only count when
        // they raise the estimate — a timeout does, and should.
        let sample_ns = latency.as_nanos() as f64;
        if success || sample_ns > state.ewma.get_ns(now) {
            state.ewma.observe(now, latency);
        }
        if role == Role::Probe {
            state.probe_in_flight = false;
        }
        state.history.record(now, success);
        match (state.ejected_until.is_some(), role, success) {
            // The probe (or a request sent in panic) worked: back in service
            // with a clean slate, backoff included.
            (true, Role::Probe | Role::Panic, true) => {
                state.ejected_until = None;
                state.level = 0;
                state.consecutive_failures = 0;
            }
            // The probe failed: out again, for twice as long (capped).
            (true, Role::Probe, false) => {
                state.level = state.level.saturating_add(1);
                state.ejected_until = Some(now + config.ejection(state.level));
                self.ejections_total.fetch_add(1, Ordering::Relaxed);
                let in_a_row = state.level + 1;
                state.history.ejected(format!(
                    "its probe failed after an ejection ({in_a_row} in a row)"
                ));
            }
            // Requests that started before the ejection, and failures sent
            // in panic, do not move it: the endpoint is already out.
            (true, _, _) => {}
            (false, _, true) => state.consecutive_failures = 0,
            (false, _, false) => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                if config.failure_threshold > 0
                    && state.consecutive_failures >= config.failure_threshold
                {
                    state.consecutive_failures = 0;
                    state.level = 0;
                    state.ejected_until = Some(now + config.ejection(0));
                    self.ejections_total.fetch_add(1, Ordering::Relaxed);
                    state
                        .history
                        .ejected(format!("{} consecutive failures", config.failure_threshold));
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent field by field, so a
        // panic while the lock was held is no reason to stop balancing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn available(&self, now: Instant) -> bool {
        match self.ejected_until {
            None => true,
            Some(until) => now >= until && !self.probe_in_flight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn stats(t0: Instant) -> (EndpointStats, BalanceConfig) {
        let config = BalanceConfig::default();
        (EndpointStats::new(t0, &config), config)
    }

    fn fail(s: &EndpointStats, c: &BalanceConfig, role: Role, now: Instant) {
        s.finish(role, now, MS, false, c);
    }

    #[test]
    fn ejects_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        for _ in 0..4 {
            fail(&s, &c, Role::Normal, t0);
        }
        s.finish(Role::Normal, t0, MS, true, &c);
        assert_eq!(s.consecutive_failures(), 0, "a success breaks the streak");
        for i in 1..=5 {
            assert!(!s.is_ejected(t0), "ejected after {i} failures");
            fail(&s, &c, Role::Normal, t0);
        }
        assert!(s.is_ejected(t0));
        assert_eq!(s.ejected_until(), Some(t0 + 5 * SEC));
        assert_eq!(s.ejections_total(), 1);
        assert!(!s.is_ejected(t0 + 5 * SEC), "on probation once expired");
    }

    #[test]
    fn the_view_says_what_happened_and_why_it_is_out() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        s.finish(Role::Normal, t0, MS, true, &c);
        let v = s.view(t0);
        assert_eq!((v.recent.successes, v.recent.failures), (1, 0));
        assert_eq!(
            (v.ejected_until, v.ejection_reason, v.last_error),
            (None, None, None)
        );
        let at = SystemTime::now();
        for _ in 0..5 {
            fail(&s, &c, Role::Normal, t0);
            s.record_error(at, "connect to 10.2.0.9:8080: No route to host");
        }
        let v = s.view(t0 + SEC);
        assert_eq!((v.recent.successes, v.recent.failures), (1, 5));
        assert_eq!(v.ejected_until, Some(t0 + 5 * SEC));
        assert!(!v.on_probation);
        assert_eq!(v.ejection_reason.as_deref(), Some("5 consecutive failures"));
        assert_eq!(
            v.last_error,
            Some((at, "connect to 10.2.0.9:8080: No route to host".to_string()))
        );
        let v = s.view(t0 + 5 * SEC);
        assert_eq!((v.ejected_until, v.on_probation), (None, true));
        // A failed probe says so.
        fail(&s, &c, Role::Probe, t0 + 5 * SEC);
        let v = s.view(t0 + 5 * SEC);
        assert_eq!(v.ejected_until, Some(t0 + 15 * SEC));
        assert_eq!(v.ejections_total, 2);
        assert!(v.ejection_reason.unwrap().starts_with("its probe failed"));
    }

    #[test]
    fn threshold_zero_never_ejects() {
        let t0 = Instant::now();
        let c = BalanceConfig {
            failure_threshold: 0,
            ..Default::default()
        };
        let s = EndpointStats::new(t0, &c);
        for _ in 0..100 {
            fail(&s, &c, Role::Normal, t0);
        }
        assert!(!s.is_ejected(t0));
    }

    #[test]
    fn one_probe_at_a_time_and_its_outcome_decides() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        for _ in 0..5 {
            fail(&s, &c, Role::Normal, t0);
        }
        assert_eq!(s.try_acquire(t0 + SEC), None, "still ejected");
        let t1 = t0 + 5 * SEC;
        assert_eq!(s.try_acquire(t1), Some(Role::Probe));
        assert_eq!(s.try_acquire(t1), None, "second probe while one is out");
        s.cancel(Role::Probe);
        assert_eq!(
            s.try_acquire(t1),
            Some(Role::Probe),
            "cancel frees the claim"
        );
        s.finish(Role::Probe, t1, MS, true, &c);
        assert_eq!(s.ejected_until(), None);
        assert_eq!(s.try_acquire(t1), Some(Role::Normal));
    }

    #[test]
    fn failed_probes_double_the_ejection_up_to_the_cap() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        for _ in 0..5 {
            fail(&s, &c, Role::Normal, t0);
        }
        let mut now = t0;
        let mut lengths = vec![];
        for _ in 0..6 {
            let until = s.ejected_until().unwrap();
            lengths.push((until - now).as_secs());
            now = until;
            assert_eq!(s.try_acquire(now), Some(Role::Probe));
            fail(&s, &c, Role::Probe, now);
        }
        assert_eq!(lengths, [5, 10, 20, 40, 60, 60]);
        assert_eq!(s.ejections_total(), 7);
        // A successful probe resets the backoff for the next ejection.
        let until = s.ejected_until().unwrap();
        assert_eq!(s.try_acquire(until), Some(Role::Probe));
        s.finish(Role::Probe, until, MS, true, &c);
        for _ in 0..5 {
            fail(&s, &c, Role::Normal, until);
        }
        assert_eq!(s.ejected_until(), Some(until + 5 * SEC));
    }

    #[test]
    fn stale_outcomes_do_not_move_an_ejection() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        for _ in 0..5 {
            fail(&s, &c, Role::Normal, t0);
        }
        // Requests picked before the ejection, finishing after it.
        s.finish(Role::Normal, t0 + MS, MS, true, &c);
        fail(&s, &c, Role::Normal, t0 + MS);
        // A failure sent in panic mode does not extend it either.
        fail(&s, &c, Role::Panic, t0 + MS);
        assert_eq!(s.ejected_until(), Some(t0 + 5 * SEC));
        // But a success in panic mode proves the endpoint works.
        s.finish(Role::Panic, t0 + SEC, MS, true, &c);
        assert!(!s.is_ejected(t0 + SEC));
    }

    #[test]
    fn failures_only_ever_raise_the_estimate() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        s.finish(Role::Normal, t0, 30 * MS, true, &c);
        fail(&s, &c, Role::Normal, t0);
        assert_eq!(s.ewma(t0), 30 * MS, "a fast failure is not a fast answer");
        s.finish(Role::Normal, t0, 2 * SEC, false, &c);
        assert_eq!(s.ewma(t0), 2 * SEC, "a slow failure counts");
    }

    #[test]
    fn cost_grows_with_in_flight() {
        let t0 = Instant::now();
        let (s, _) = stats(t0);
        let idle = s.snapshot(t0).cost;
        s.start();
        s.start();
        let busy = s.snapshot(t0).cost;
        assert!((busy / idle - 3.0).abs() < 1e-9);
        s.end();
        s.end();
        assert_eq!(s.in_flight(), 0);
    }
}
