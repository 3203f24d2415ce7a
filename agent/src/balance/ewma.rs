//! Peak-EWMA latency estimate: jumps up at once when an endpoint slows,
//! comes down gradually when it recovers, and fades while it is idle.

use std::time::{Duration, Instant};

/// One endpoint's latency estimate, in nanoseconds, advanced only by the
/// instants callers pass in.
#[derive(Debug, Clone)]
pub(super) struct PeakEwma {
    estimate_ns: f64,
    /// When `estimate_ns` was last set.
    stamp: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    pub fn new(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: initial.as_nanos() as f64,
            stamp: now,
            decay_ns: decay.as_nanos() as f64,
        }
    }

    pub fn set_decay(&mut self, decay: Duration) {
        self.decay_ns = decay.as_nanos() as f64;
    }

    /// The estimate at `now`. Between samples it decays toward zero: an
    /// endpoint that P2C has stopped choosing because it looked slow gets
    /// cheaper over time until it is chosen again and measured afresh, so
    /// one bad spell cannot starve it forever.
    pub fn get_ns(&self, now: Instant) -> f64 {
        match self.weight(now) {
            Some(w) => self.estimate_ns * w,
            None => self.estimate_ns,
        }
    }

    /// Adds a response latency observed at `now`. A sample above the current
    /// estimate replaces it (the "peak": react to slowness at once); one
    /// below pulls the (faded) estimate toward it by `1 - e^(-Δt/decay)`, Δt
    /// being the time since the last update, so recovery takes time (about
    /// `decay` / 2 under steady traffic) however many samples arrive.
    pub fn observe(&mut self, now: Instant, latency: Duration) {
        let sample = latency.as_nanos() as f64;
        let current = self.get_ns(now);
        self.estimate_ns = match self.weight(now) {
            Some(w) if sample <= current => current * w + sample * (1.0 - w),
            _ => sample,
        };
        // Out-of-order instants from racing tasks must not move the stamp back.
        self.stamp = self.stamp.max(now);
    }

    /// Makes `sample` the estimate outright, as of `now`: for an endpoint's
    /// first answers, where what is being replaced is a guess (the prior,
    /// or a first exchange's one-off costs), not a measurement to smooth.
    pub fn reset(&mut self, now: Instant, sample: Duration) {
        self.estimate_ns = sample.as_nanos() as f64;
        self.stamp = self.stamp.max(now);
    }

    /// Multiplies the estimate as of `now` by `factor` (below 1): the
    /// balancer's discount of an estimate it kept passing over (see
    /// `stats::LOSSES_TO_HALVE`), made part of the estimate at the
    /// endpoint's next answer, so that the answer is weighed against what
    /// P2C believed when it chose the endpoint, not against the stale peak
    /// it discounted.
    pub fn scale(&mut self, now: Instant, factor: f64) {
        self.estimate_ns = self.get_ns(now) * factor;
        self.stamp = self.stamp.max(now);
    }

    /// `e^(-Δt/decay)`: how much of the previous estimate survives to
    /// `now`; `None` when no decay is configured, which means "no
    /// smoothing": the last sample is the estimate and does not fade.
    fn weight(&self, now: Instant) -> Option<f64> {
        if self.decay_ns <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        Some((-elapsed / self.decay_ns).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const DECAY: Duration = Duration::from_secs(10);

    fn ms(ns: f64) -> f64 {
        ns / 1e6
    }

    #[test]
    fn starts_at_the_default() {
        let t0 = Instant::now();
        let e = PeakEwma::new(30 * MS, DECAY, t0);
        assert_eq!(ms(e.get_ns(t0)), 30.0);
    }

    #[test]
    fn a_peak_replaces_the_estimate_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(30 * MS, DECAY, t0);
        e.observe(t0 + MS, 500 * MS);
        assert_eq!(ms(e.get_ns(t0 + MS)), 500.0);
    }

    #[test]
    fn lower_samples_pull_it_down_by_elapsed_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(100 * MS, DECAY, t0);
        // A sample 1 ms later barely moves it: recovery is gradual.
        e.observe(t0 + MS, 10 * MS);
        let after_1ms = ms(e.get_ns(t0 + MS));
        assert!(after_1ms > 99.9 && after_1ms < 100.0, "{after_1ms}");
        // After one time constant of steady 10 ms samples it has come most
        // of the way down, monotonically.
        let mut last = after_1ms;
        for i in 2..=10_000 {
            let now = t0 + i * MS;
            e.observe(now, 10 * MS);
            let v = ms(e.get_ns(now));
            assert!(v <= last && v >= 10.0, "{v} after {last}");
            last = v;
        }
        assert!(last < 30.0, "{last}");
    }

    #[test]
    fn fades_while_idle_and_a_fresh_sample_dominates() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(30 * MS, DECAY, t0);
        e.observe(t0, 1000 * MS);
        let later = t0 + DECAY;
        let faded = ms(e.get_ns(later));
        assert!(
            (faded - 1000.0 / std::f64::consts::E).abs() < 0.01,
            "{faded}"
        );
        // 30 s idle: even a modest new sample is above what is left.
        e.observe(t0 + 3 * DECAY, 80 * MS);
        assert_eq!(ms(e.get_ns(t0 + 3 * DECAY)), 80.0);
    }

    #[test]
    fn reset_replaces_even_a_higher_estimate_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(30 * MS, DECAY, t0);
        // `observe` would barely move 30 ms toward 0.2 ms in 1 ms.
        e.reset(t0 + MS, MS / 5);
        assert_eq!(ms(e.get_ns(t0 + MS)), 0.2);
        // And it fades from there like any estimate.
        assert!(ms(e.get_ns(t0 + MS + DECAY)) < 0.1);
    }

    #[test]
    fn scale_discounts_the_faded_estimate_from_now_on() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(8 * MS, DECAY, t0);
        e.scale(t0 + DECAY, 0.5);
        let t1 = t0 + DECAY;
        let scaled = ms(e.get_ns(t1));
        assert!(
            (scaled - 4.0 / std::f64::consts::E).abs() < 1e-9,
            "{scaled}"
        );
        // It fades from there, as of the scaling.
        let later = ms(e.get_ns(t1 + DECAY));
        assert!(
            (later - scaled / std::f64::consts::E).abs() < 1e-9,
            "{later}"
        );
        // A higher answer is a peak as before; a lower one is smoothed.
        e.observe(t1, 3 * MS);
        assert_eq!(ms(e.get_ns(t1)), 3.0);
        e.observe(t1 + MS, MS);
        assert!(ms(e.get_ns(t1 + MS)) > 2.99);
    }

    #[test]
    fn zero_decay_means_last_sample() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(30 * MS, Duration::ZERO, t0);
        e.observe(t0 + MS, 5 * MS);
        assert_eq!(ms(e.get_ns(t0 + MS)), 5.0);
        e.observe(t0 + 2 * MS, 3 * MS);
        assert_eq!(ms(e.get_ns(t0 + 2 * MS)), 3.0);
        assert_eq!(ms(e.get_ns(t0 + 3 * DECAY)), 3.0);
    }

    #[test]
    fn out_of_order_instants_do_not_rewind() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(30 * MS, DECAY, t0 + DECAY);
        e.observe(t0, 10 * MS);
        // An earlier instant acts like "no time passed".
        assert!(ms(e.get_ns(t0 + DECAY)) >= 10.0);
        assert_eq!(e.stamp, t0 + DECAY);
    }
}
