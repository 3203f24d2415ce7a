//! What the balancer knows about one endpoint — latency estimate, requests
//! in flight, failure streak and ejection — and the rules that change it
//! when a request to it starts and ends.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
    /// P2C comparisons lost since the endpoint was last chosen: counted by
    /// the winner's pick without taking this endpoint's lock, set aside
    /// when the endpoint is chosen and folded into the estimate at its
    /// answer (see [`LOSSES_TO_HALVE`]). Wrapping after 2^32 losses in a row (a
    /// drained endpoint of a busy service, after days) only restarts the
    /// discount.
    passed_over: AtomicU32,
    ejections_total: AtomicU64,
}

#[derive(Debug)]
struct State {
    ewma: PeakEwma,
    /// Linkerd's prior (`default_rtt`): what a new endpoint is assumed to
    /// cost per request while its first one is out. Kept apart from
    /// `ewma`, which fades, so that the prior means the same whenever the
    /// first request comes.
    prior: Duration,
    /// The endpoint is new (see the module doc of `balance`): preferred
    /// while it has nothing in flight, and its answers set the estimate
    /// rather than compete with a guess. Ends after [`WARMUP_ANSWERS`]
    /// successful answers or at the first failure.
    warming: bool,
    /// Latency samples taken into the estimate, ever (while warming: its
    /// successful answers).
    samples: u64,
    /// Comparisons lost before the endpoint was last chosen, not yet part
    /// of the estimate: its next answer folds them in (see
    /// [`LOSSES_TO_HALVE`]).
    unfolded: u32,
    /// Connections made to the endpoint and how long they took: kept
    /// apart from the latency estimate, which they would distort.
    connects: Connects,
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
    /// Made at the endpoint's first answer or error: most endpoints of a
    /// large cluster are never sent a request by a given node, and the
    /// history is the larger part of an endpoint's statistics.
    history: Option<Box<History>>,
}

impl State {
    fn history(&mut self, now: Instant) -> &mut History {
        self.history
            .get_or_insert_with(|| Box::new(History::new(now)))
    }
}

/// Successful answers after which a new endpoint is judged like any other.
/// Two, not one: the first exchange on a new connection also pays for
/// setup the sending agent cannot see or subtract (the peer agent's
/// protocol detection and its own connection to the pod, the server's
/// per-connection state), so one answer is a poor basis for an estimate
/// that, being a peak, would then only fade over `decay`.
pub const WARMUP_ANSWERS: u32 = 2;

/// P2C comparisons an endpoint must lose in a row for its estimate to
/// count half: after `k` lost comparisons it is compared at
/// `estimate / (1 + k / LOSSES_TO_HALVE)`, a third after 20, and so on
/// (why: "Endpoints P2C passes over" in the module doc of `balance`).
///
/// Hyperbolic rather than exponential, so that retrying an endpoint that
/// really is slower stays cheap however slow it is: `c`× slower than the
/// peer it loses to, it is chosen again after `LOSSES_TO_HALVE × (c − 1)`
/// lost comparisons, and its answer costs `c − 1` peer latencies more —
/// a tenth of a peer's latency per lost comparison at most. Ten: a
/// descheduled thread's 4× answer costs an equal endpoint 30 comparisons,
/// and one 10× slower than its peers gets 1–2 % of sequential calls.
pub const LOSSES_TO_HALVE: u32 = 10;

/// What an estimate passed over `k` times in a row counts for.
fn discount_after(k: u32) -> f64 {
    1.0 / (1.0 + f64::from(k) / f64::from(LOSSES_TO_HALVE))
}

/// Connection setup to an endpoint (TCP connect; through the tunnel, the
/// `CONNECT` exchange and the TLS handshake when a tunnel connection had to
/// be made; the HTTP handshake): what it cost, kept out of the latency
/// estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Connects {
    pub total: u64,
    pub last: Option<Duration>,
    /// The slowest so far (a TLS handshake, typically).
    pub max: Option<Duration>,
    sum: Duration,
}

impl Connects {
    fn record(&mut self, took: Duration) {
        self.total += 1;
        self.last = Some(took);
        self.max = Some(self.max.map_or(took, |m| m.max(took)));
        self.sum = self.sum.saturating_add(took);
    }

    /// The mean setup time, once there has been one.
    pub fn mean(&self) -> Option<Duration> {
        let n = u32::try_from(self.total).ok().filter(|n| *n > 0)?;
        Some(self.sum / n)
    }
}

/// An endpoint as an operator sees it (`waymark endpoints`).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointView {
    /// The latency estimate as P2C compares it now (with the discount for
    /// comparisons lost since it was last chosen).
    pub ewma: Duration,
    /// P2C comparisons lost since it was last chosen.
    pub passed_over: u32,
    /// Latency samples behind `ewma` (0: it is still the prior).
    pub samples: u64,
    /// New: preferred while idle until it has answered
    /// [`WARMUP_ANSWERS`] times.
    pub warming: bool,
    pub connects: Connects,
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
                prior: config.default_rtt,
                warming: true,
                samples: 0,
                unfolded: 0,
                connects: Connects::default(),
                consecutive_failures: 0,
                ejected_until: None,
                level: 0,
                probe_in_flight: false,
                history: None,
            }),
            in_flight: AtomicUsize::new(0),
            passed_over: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
        }
    }

    /// The latency estimate at `now`, as P2C compares it.
    pub fn ewma(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.estimate_ns(&self.lock(), now) as u64)
    }

    /// The estimate at `now`, discounted for the comparisons lost since
    /// the endpoint was last chosen.
    fn estimate_ns(&self, state: &State, now: Instant) -> f64 {
        state.ewma.get_ns(now) * self.discount()
    }

    /// What its estimate counts for now ([`LOSSES_TO_HALVE`]).
    fn discount(&self) -> f64 {
        discount_after(self.passed_over.load(Ordering::Relaxed))
    }

    /// Connections made to the endpoint and their setup times.
    pub fn connects(&self) -> Connects {
        self.lock().connects
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
            ewma: Duration::from_nanos(self.estimate_ns(&state, now) as u64),
            passed_over: self.passed_over.load(Ordering::Relaxed),
            samples: state.samples,
            warming: state.warming,
            connects: state.connects,
            in_flight: self.in_flight(),
            recent: state
                .history
                .as_ref()
                .map_or_else(Recent::default, |h| h.recent(now)),
            ejected_until: state.ejected_until.filter(|u| now < *u),
            on_probation: state.ejected_until.is_some_and(|u| now >= u),
            ejection_reason: state
                .history
                .as_ref()
                .and_then(|h| h.ejection_reason())
                .map(str::to_string),
            ejections_total: self.ejections_total(),
            last_error: state.history.as_ref().and_then(|h| h.last_error()).cloned(),
        }
    }

    /// A connection to the endpoint was made for a request, taking `took`;
    /// that request's latency sample starts after it.
    pub fn record_connect(&self, took: Duration) {
        self.lock().connects.record(took);
    }

    /// Why a request to the endpoint failed (the proxy's detail, or the
    /// endpoint's status), with the wall-clock time, for operators.
    pub fn record_error(&self, at: SystemTime, error: &str) {
        self.lock().history(Instant::now()).error(at, error);
    }

    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn consecutive_failures(&self) -> u32 {
        self.lock().consecutive_failures
    }

    /// A reload's tunables, for endpoints that stay.
    pub(super) fn set_config(&self, config: &BalanceConfig) {
        let mut state = self.lock();
        state.ewma.set_decay(config.decay);
        state.prior = config.default_rtt;
    }

    /// Cost is Linkerd's: estimate × (in flight + 1), so a fast endpoint
    /// that is already busy loses to a slightly slower idle one. A new
    /// endpoint with nothing in flight costs nothing: it wins against any
    /// endpoint that has answered, so P2C sends it a request as soon as it
    /// draws it. With requests in flight it costs its first answer, or,
    /// before that, the prior — one request at a time while peers are
    /// faster than the prior, never a flood. Either estimate is
    /// discounted for the comparisons the endpoint has lost since it was
    /// last chosen ([`LOSSES_TO_HALVE`]).
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot {
        let state = self.lock();
        let in_flight = self.in_flight() as f64;
        let estimate = if state.warming && state.samples == 0 {
            state.prior.as_nanos() as f64
        } else {
            state.ewma.get_ns(now)
        } * self.discount();
        let cost = if state.warming && in_flight == 0.0 {
            0.0
        } else {
            (estimate + COST_FLOOR_NS) * (in_flight + 1.0)
        };
        Snapshot {
            available: state.available(now),
            cost,
            ejected_until: state.ejected_until,
        }
    }

    /// Claims the endpoint for one request if it is available now: in
    /// service (a normal request) or due for its single probe. The
    /// discount it earned by being passed over is set aside until the
    /// answer: meanwhile the endpoint costs its undiscounted estimate (a
    /// request out is a test enough; an endpoint really slower must not
    /// win every comparison until its slow answer arrives), and then the
    /// answer confirms the discounted estimate or, a peak, replaces it.
    pub(super) fn try_acquire(&self, now: Instant) -> Option<Role> {
        let mut state = self.lock();
        let role = match state.ejected_until {
            None => Role::Normal,
            Some(_) if state.available(now) => {
                state.probe_in_flight = true;
                Role::Probe
            }
            Some(_) => return None,
        };
        let k = self.passed_over.swap(0, Ordering::Relaxed);
        state.unfolded = state.unfolded.saturating_add(k);
        Some(role)
    }

    /// P2C chose another endpoint over this one.
    pub(super) fn pass_over(&self) {
        self.passed_over.fetch_add(1, Ordering::Relaxed);
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
        if state.unfolded > 0 {
            let k = std::mem::take(&mut state.unfolded);
            state.ewma.scale(now, discount_after(k));
        }
        state.take_sample(now, latency, success);
        if role == Role::Probe {
            state.probe_in_flight = false;
        }
        state.history(now).record(now, success);
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
                state.history(now).ejected(format!(
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
                    let n = config.failure_threshold;
                    let s = if n == 1 { "" } else { "s" };
                    state
                        .history(now)
                        .ejected(format!("{n} consecutive failure{s}"));
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
    /// Feeds a request's latency to the estimate.
    fn take_sample(&mut self, now: Instant, latency: Duration, success: bool) {
        let sample_ns = latency.as_nanos() as f64;
        if self.warming {
            if success {
                // The lowest answer so far: too low an estimate is
                // corrected by the very next answer (a peak replaces it),
                // too high a one only by `decay` — and only if P2C still
                // picks the endpoint.
                if self.samples == 0 || sample_ns < self.ewma.get_ns(now) {
                    self.ewma.reset(now, latency);
                }
                self.samples += 1;
                self.warming = self.samples < u64::from(WARMUP_ANSWERS);
                return;
            }
            // A failure ends the endpoint's head start: one failed request
            // per new endpoint, not one per draw until failure accrual
            // ejects it. Unanswered, it falls back to the prior as of now.
            self.warming = false;
            if self.samples == 0 {
                self.ewma.reset(now, latency.max(self.prior));
                self.samples += 1;
                return;
            }
        }
        // A fast failure (an instant 503, a refused connection) must not make
        // a broken endpoint look attractive, so failures only count when
        // they raise the estimate — a timeout does, and should.
        if success || sample_ns > self.ewma.get_ns(now) {
            self.ewma.observe(now, latency);
            self.samples += 1;
        }
    }

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
    fn an_ejection_after_one_failure_says_so_in_the_singular() {
        let t0 = Instant::now();
        let c = BalanceConfig {
            failure_threshold: 1,
            ..Default::default()
        };
        let s = EndpointStats::new(t0, &c);
        fail(&s, &c, Role::Normal, t0);
        assert_eq!(
            s.view(t0).ejection_reason.as_deref(),
            Some("1 consecutive failure")
        );
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
    fn a_new_endpoint_is_free_while_idle_and_costs_the_prior_while_busy() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        // Long after it appeared: the prior does not fade away meanwhile.
        let later = t0 + 60 * SEC;
        assert_eq!(s.snapshot(later).cost, 0.0);
        s.start();
        let busy = s.snapshot(later).cost;
        let prior = (c.default_rtt.as_nanos() as f64 + COST_FLOOR_NS) * 2.0;
        assert!((busy - prior).abs() < 1.0, "{busy} vs {prior}");
        // A first answer replaces the prior, however far below it.
        s.finish(Role::Normal, later, MS / 4, true, &c);
        s.end();
        let v = s.view(later);
        assert_eq!((v.ewma, v.samples, v.warming), (MS / 4, 1, true));
        assert_eq!(s.snapshot(later).cost, 0.0, "still new while idle");
        s.start();
        let busy = s.snapshot(later).cost;
        assert!((busy - (250_000.0 + COST_FLOOR_NS) * 2.0).abs() < 1.0);
        s.end();
    }

    #[test]
    fn warm_up_keeps_the_lowest_answer_then_peaks_count() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        // A first exchange paying for a cold server: 20 ms, then 0.5 ms.
        s.finish(Role::Normal, t0, 20 * MS, true, &c);
        s.finish(Role::Normal, t0 + MS, MS / 2, true, &c);
        let v = s.view(t0 + MS);
        assert_eq!((v.ewma, v.samples, v.warming), (MS / 2, 2, false));
        assert!(s.snapshot(t0 + MS).cost > 0.0, "judged like any other");
        // From now on a slower answer is a peak, at once.
        s.finish(Role::Normal, t0 + 2 * MS, 5 * MS, true, &c);
        assert_eq!(s.ewma(t0 + 2 * MS), 5 * MS);
    }

    #[test]
    fn a_failure_ends_the_warm_up_at_the_prior() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        let later = t0 + 30 * SEC;
        // A refused connection: fast, and no answer at all.
        fail(&s, &c, Role::Normal, later);
        let v = s.view(later);
        assert!(!v.warming);
        assert_eq!(v.ewma, c.default_rtt, "the prior as of the failure");
        assert!(s.snapshot(later).cost > 0.0);
        // A slow failure (a timeout) counts in full.
        let (s, c) = stats(t0);
        s.finish(Role::Normal, t0, 2 * SEC, false, &c);
        assert_eq!(s.ewma(t0), 2 * SEC);
        // After a first answer, a fast failure ends the warm-up without
        // lowering anything.
        let (s, c) = stats(t0);
        s.finish(Role::Normal, t0, 3 * MS, true, &c);
        fail(&s, &c, Role::Normal, t0);
        let v = s.view(t0);
        assert_eq!((v.ewma, v.warming), (3 * MS, false));
    }

    #[test]
    fn connection_setup_is_kept_apart_from_latency() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        assert_eq!(s.connects(), Connects::default());
        assert_eq!(s.connects().mean(), None);
        s.record_connect(12 * MS);
        s.record_connect(2 * MS);
        s.finish(Role::Normal, t0, MS / 2, true, &c);
        let v = s.view(t0);
        assert_eq!(v.ewma, MS / 2);
        assert_eq!(v.samples, 1);
        assert_eq!(
            (v.connects.total, v.connects.last, v.connects.max),
            (2, Some(2 * MS), Some(12 * MS))
        );
        assert_eq!(v.connects.mean(), Some(7 * MS));
    }

    #[test]
    fn a_reload_changes_the_prior_of_endpoints_that_stay() {
        let t0 = Instant::now();
        let (s, _) = stats(t0);
        s.set_config(&BalanceConfig {
            default_rtt: 5 * MS,
            ..Default::default()
        });
        s.start();
        let busy = s.snapshot(t0).cost;
        assert!((busy - (5e6 + COST_FLOOR_NS) * 2.0).abs() < 1.0, "{busy}");
        s.end();
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

    /// Answers `WARMUP_ANSWERS` times in `latency`, so the endpoint is
    /// judged like any other from then on.
    fn warm(s: &EndpointStats, c: &BalanceConfig, now: Instant, latency: Duration) {
        for _ in 0..WARMUP_ANSWERS {
            s.finish(Role::Normal, now, latency, true, c);
        }
        assert!(!s.view(now).warming);
    }

    #[test]
    fn a_passed_over_estimate_counts_for_less_until_its_next_answer() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        warm(&s, &c, t0, 4 * MS);
        let full = s.snapshot(t0).cost;
        for _ in 0..LOSSES_TO_HALVE {
            s.pass_over();
        }
        let v = s.view(t0);
        assert_eq!((v.ewma, v.passed_over), (2 * MS, LOSSES_TO_HALVE));
        let halved = s.snapshot(t0).cost;
        assert!(
            (halved - (2e6 + COST_FLOOR_NS)).abs() < 1.0,
            "{halved} vs {full}"
        );
        for _ in 0..LOSSES_TO_HALVE {
            s.pass_over();
        }
        assert_eq!(s.ewma(t0).as_nanos(), 4_000_000 / 3);
        // Chosen: while its request is out it costs the undiscounted
        // estimate, so a really slower endpoint gets one request, not
        // every comparison until its slow answer is in.
        assert_eq!(s.try_acquire(t0), Some(Role::Normal));
        s.start();
        assert_eq!(s.view(t0).passed_over, 0);
        assert!((s.snapshot(t0).cost - full * 2.0).abs() < 1.0);
        // Its answer is weighed against the discounted estimate: lower,
        // it barely moves it (no time has passed) …
        s.finish(Role::Normal, t0, MS, true, &c);
        s.end();
        let after = s.ewma(t0);
        assert!(
            after <= 4 * MS / 3 && after > 4 * MS / 3 - MS / 100,
            "{after:?}"
        );
        // … higher, it is a peak and the estimate at once.
        for _ in 0..3 * LOSSES_TO_HALVE {
            s.pass_over();
        }
        assert_eq!(s.try_acquire(t0), Some(Role::Normal));
        s.finish(Role::Normal, t0, 5 * MS, true, &c);
        assert_eq!(s.ewma(t0), 5 * MS);
    }

    #[test]
    fn an_estimate_c_times_its_peers_is_back_after_ten_c_minus_one_losses() {
        // The rule behind the bounded cost of retrying a slow endpoint.
        let t0 = Instant::now();
        for c in [2u32, 4, 20, 1000] {
            let (s, cfg) = stats(t0);
            warm(&s, &cfg, t0, MS * c);
            let back = LOSSES_TO_HALVE * (c - 1);
            for _ in 0..back - 1 {
                s.pass_over();
            }
            assert!(s.ewma(t0) > MS, "{c}×: back too early");
            s.pass_over();
            assert_eq!(s.ewma(t0), MS, "{c}×");
        }
    }

    #[test]
    fn a_new_endpoint_passed_over_while_busy_is_still_tried_one_request_at_a_time() {
        // Its cost with a request out is the prior, discounted like any
        // estimate: against 1 ms peers a second request needs 590 lost
        // comparisons (the prior × 2 down to 1 ms).
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        s.start();
        for _ in 0..LOSSES_TO_HALVE {
            s.pass_over();
        }
        let half_prior = c.default_rtt.as_nanos() as f64 / 2.0;
        let busy = s.snapshot(t0).cost;
        assert!(
            (busy - (half_prior + COST_FLOOR_NS) * 2.0).abs() < 1.0,
            "{busy}"
        );
        s.end();
        assert_eq!(s.snapshot(t0).cost, 0.0, "idle and new: free");
    }

    #[test]
    fn cost_grows_with_in_flight() {
        let t0 = Instant::now();
        let (s, c) = stats(t0);
        warm(&s, &c, t0, MS);
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
