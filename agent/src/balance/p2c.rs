//! Power of two choices: sample two endpoints at random and send the request
//! to the cheaper one. Cheap to compute, and it avoids both the herd effect
//! of always choosing the global best and the blindness of pure random.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::BalanceConfig;
use super::stats::{EndpointStats, Role, Snapshot};

/// Random pairs to try before scanning every endpoint: with few endpoints
/// out, a pair of available ones is almost always found at once.
const PAIR_TRIES: usize = 3;
/// Scans to try before giving up on a race over a probe claim.
const SCAN_TRIES: usize = 3;

/// A service's endpoints (`E`: address and whatever else the proxy needs)
/// with their shared statistics. Immutable: a config change builds a new
/// one, reusing the statistics of endpoints that stay.
#[derive(Debug)]
pub struct Balancer<E> {
    endpoints: Vec<(E, Arc<EndpointStats>)>,
    /// Relative capacity per endpoint (same index as `endpoints`), all 1.0
    /// unless [`Balancer::with_weights`] says otherwise.
    weights: Vec<f64>,
    config: BalanceConfig,
}

impl<E> Balancer<E> {
    /// Fresh statistics for every endpoint, stamped with the current time.
    #[cfg(test)]
    pub fn new(endpoints: Vec<E>, config: BalanceConfig) -> Self {
        let now = Instant::now();
        let endpoints = endpoints
            .into_iter()
            .map(|e| (e, Arc::new(EndpointStats::new(now, &config))))
            .collect::<Vec<_>>();
        let weights = vec![1.0; endpoints.len()];
        Self {
            endpoints,
            weights,
            config,
        }
    }

    /// Endpoints with existing statistics (kept from a previous balancer via
    /// [`Balancer::stats_where`]), so estimates and ejections survive a reload.
    /// The new config's decay and prior apply to them from now on.
    pub fn with_stats(endpoints: Vec<(E, Arc<EndpointStats>)>, config: BalanceConfig) -> Self {
        for (_, stats) in &endpoints {
            stats.set_config(&config);
        }
        let weights = vec![1.0; endpoints.len()];
        Self {
            endpoints,
            weights,
            config,
        }
    }

    /// Gives endpoints relative weights, as Linkerd does: the cost P2C
    /// compares is divided by the weight, so an endpoint of weight 2 looks
    /// half as loaded as an equal one of weight 1 and gets about twice the
    /// requests. Weight 0 drains an endpoint: it is picked only when no
    /// weighted endpoint is available (as a last resort, like panic mode).
    pub fn with_weights(mut self, weight: impl Fn(&E) -> u32) -> Self {
        self.weights = self
            .endpoints
            .iter()
            .map(|(e, _)| f64::from(weight(e)))
            .collect();
        self
    }

    /// The weight of endpoint `index` (1 unless set).
    fn weight(&self, index: usize) -> f64 {
        self.weights.get(index).copied().unwrap_or(1.0)
    }

    /// The statistics of an endpoint equal to `endpoint`, to carry over.
    #[cfg(test)]
    pub fn stats_of(&self, endpoint: &E) -> Option<Arc<EndpointStats>>
    where
        E: PartialEq,
    {
        self.stats_where(|e| e == endpoint)
    }

    /// The statistics of the first endpoint `same` accepts (e.g. the same
    /// address, whatever its weight now), to carry over a reload.
    pub fn stats_where(&self, same: impl Fn(&E) -> bool) -> Option<Arc<EndpointStats>> {
        self.endpoints
            .iter()
            .find(|(e, _)| same(e))
            .map(|(_, stats)| Arc::clone(stats))
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &E> {
        self.endpoints.iter().map(|(e, _)| e)
    }

    /// Endpoints with their statistics, for diagnostics.
    pub fn entries(&self) -> impl Iterator<Item = (&E, &Arc<EndpointStats>)> {
        self.endpoints.iter().map(|(e, stats)| (e, stats))
    }

    pub fn config(&self) -> &BalanceConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Endpoints not ejected at `now` (in service or on probation).
    pub fn available(&self, now: Instant) -> usize {
        self.endpoints
            .iter()
            .filter(|(_, stats)| !stats.is_ejected(now))
            .count()
    }

    /// Picks two distinct random available endpoints and returns the one
    /// with the lower cost, `ewma × (in_flight + 1)`. Ejected endpoints are
    /// skipped, except that one whose ejection has expired is on probation:
    /// it may be picked for a single probe request, whose success readmits
    /// it and whose failure ejects it again for twice as long.
    ///
    /// When no endpoint is available this still returns the one whose
    /// ejection ends soonest ("panic mode"): ejection is a guess from recent
    /// failures, and when it has guessed that every endpoint is bad, failing
    /// every request outright is certainly worse than trying the one most
    /// likely to have recovered. `None` only when there are no endpoints.
    pub fn pick(&self, now: Instant) -> Option<Pick<'_, E>> {
        if self.weights.iter().all(|w| *w > 0.0) {
            self.pick_with(now, &mut rand::rng(), &|_| false)
        } else {
            self.pick_avoiding(now, |_| false)
        }
    }

    /// Like [`pick`](Self::pick), but endpoints for which `avoid` is true
    /// are passed over while any other endpoint is available. A retry uses
    /// it to go elsewhere: an endpoint that fails fast (connection refused)
    /// looks cheap to the latency estimate and would otherwise be picked
    /// again for the very retry its failure caused.
    pub fn pick_avoiding(&self, now: Instant, avoid: impl Fn(&E) -> bool) -> Option<Pick<'_, E>> {
        let rng = &mut rand::rng();
        let skip = |i: usize| avoid(&self.endpoints[i].0) || self.weight(i) == 0.0;
        let has_other = self
            .endpoints
            .iter()
            .enumerate()
            .any(|(i, (_, stats))| !skip(i) && !stats.is_ejected(now));
        if has_other {
            self.pick_with(now, rng, &skip)
        } else {
            self.pick_with(now, rng, &|_| false)
        }
    }

    fn pick_with<R: Rng + ?Sized>(
        &self,
        now: Instant,
        rng: &mut R,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<Pick<'_, E>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        if n >= 2 {
            for _ in 0..PAIR_TRIES {
                let a = rng.random_range(..n);
                let b = match rng.random_range(..n - 1) {
                    b if b >= a => b + 1,
                    b => b,
                };
                let (sa, sb) = (self.snapshot(a, now), self.snapshot(b, now));
                if sa.available
                    && sb.available
                    && !skip(a)
                    && !skip(b)
                    && let Some(pick) = self.acquire_cheaper((a, sa), (b, sb), now, rng)
                {
                    return Some(pick);
                }
            }
        }
        // Several endpoints are out: choose among the available ones only.
        let mut fallback = 0;
        for _ in 0..SCAN_TRIES {
            let scan = self.scan(now, rng, skip);
            fallback = scan.soonest;
            let pick = match scan.sample {
                [Some(a), Some(b)] => self.acquire_cheaper(a, b, now, rng),
                [Some((a, _)), None] => self.acquire(a, now),
                _ => return Some(Pick::new(self, scan.soonest, Role::Panic)),
            };
            if pick.is_some() {
                return pick;
            }
        }
        // Only reached when other tasks keep winning the probe claims this
        // task saw as free; serve the request rather than spin.
        Some(Pick::new(self, fallback, Role::Panic))
    }

    fn snapshot(&self, index: usize, now: Instant) -> Snapshot {
        self.endpoints[index].1.snapshot(now)
    }

    fn acquire(&self, index: usize, now: Instant) -> Option<Pick<'_, E>> {
        let role = self.endpoints[index].1.try_acquire(now)?;
        Some(Pick::new(self, index, role))
    }

    /// The cheaper of two candidates, or the other if the cheaper one was
    /// claimed meanwhile (a probe taken by another task). Equal costs are
    /// broken at random so that identical endpoints share load evenly. The
    /// loser is told, so that its estimate counts for less the longer
    /// it is passed over ([`super::stats::LOSSES_TO_HALVE`]).
    fn acquire_cheaper<R: Rng + ?Sized>(
        &self,
        a: (usize, Snapshot),
        b: (usize, Snapshot),
        now: Instant,
        rng: &mut R,
    ) -> Option<Pick<'_, E>> {
        let (cost_a, cost_b) = (
            weighted_cost(a.1.cost, self.weight(a.0)),
            weighted_cost(b.1.cost, self.weight(b.0)),
        );
        let a_first = match cost_a.total_cmp(&cost_b) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => rng.random(),
        };
        let (first, second) = if a_first { (a.0, b.0) } else { (b.0, a.0) };
        match self.acquire(first, now) {
            Some(pick) => {
                self.endpoints[second].1.pass_over();
                Some(pick)
            }
            None => self.acquire(second, now),
        }
    }

    /// One pass over all endpoints: a uniform sample of two available ones
    /// (reservoir sampling, so no allocation per request) and the endpoint
    /// whose ejection ends soonest, ties broken at random.
    fn scan<R: Rng + ?Sized>(
        &self,
        now: Instant,
        rng: &mut R,
        skip: &dyn Fn(usize) -> bool,
    ) -> Scan {
        let mut sample = [None, None];
        let mut available = 0usize;
        let mut soonest: Option<(Option<Instant>, usize)> = None;
        let mut ties = 0u32;
        for (index, (_, stats)) in self.endpoints.iter().enumerate() {
            let snapshot = stats.snapshot(now);
            if snapshot.available && !skip(index) {
                if available < 2 {
                    sample[available] = Some((index, snapshot));
                } else {
                    let slot = rng.random_range(..=available);
                    if slot < 2 {
                        sample[slot] = Some((index, snapshot));
                    }
                }
                available += 1;
            }
            // `None` (in service) sorts before any instant.
            let key = snapshot.ejected_until;
            match soonest {
                Some((best, _)) if key > best => {}
                Some((best, _)) if key == best => {
                    ties += 1;
                    if rng.random_range(..=ties) == 0 {
                        soonest = Some((key, index));
                    }
                }
                _ => {
                    soonest = Some((key, index));
                    ties = 0;
                }
            }
        }
        Scan {
            sample,
            soonest: soonest.map_or(0, |(_, index)| index),
        }
    }
}

/// Cost per unit of capacity; a drained endpoint (weight 0) costs the most.
fn weighted_cost(cost: f64, weight: f64) -> f64 {
    if weight > 0.0 {
        cost / weight
    } else {
        f64::INFINITY
    }
}

struct Scan {
    sample: [Option<(usize, Snapshot)>; 2],
    soonest: usize,
}

/// One request's hold on an endpoint. Counts as in flight from creation to
/// drop; [`Pick::complete`] reports the outcome. Dropping it without
/// completing (the request was cancelled) reports nothing: a cancellation
/// says nothing about the endpoint's health.
#[derive(Debug)]
pub struct Pick<'a, E> {
    balancer: &'a Balancer<E>,
    index: usize,
    role: Role,
    completed: bool,
}

impl<'a, E> Pick<'a, E> {
    fn new(balancer: &'a Balancer<E>, index: usize, role: Role) -> Self {
        balancer.endpoints[index].1.start();
        Self {
            balancer,
            index,
            role,
            completed: false,
        }
    }

    pub fn endpoint(&self) -> &E {
        &self.balancer.endpoints[self.index].0
    }

    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.balancer.endpoints[self.index].1
    }

    /// This request tests an endpoint whose ejection expired.
    pub fn is_probe(&self) -> bool {
        self.role == Role::Probe
    }

    /// Every endpoint was out and this one was chosen anyway.
    pub fn is_panic(&self) -> bool {
        self.role == Role::Panic
    }

    /// Reports how the request went: `latency` feeds the estimate, `success`
    /// the failure accrual.
    pub fn complete(mut self, now: Instant, latency: Duration, success: bool) {
        self.stats()
            .finish(self.role, now, latency, success, &self.balancer.config);
        self.completed = true;
    }
}

impl<E> Drop for Pick<'_, E> {
    fn drop(&mut self) {
        let stats = self.stats();
        if !self.completed {
            stats.cancel(self.role);
        }
        stats.end();
    }
}

#[cfg(test)]
mod tests {
    use super::super::WARMUP_ANSWERS;
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn balancer(n: usize) -> (Balancer<usize>, Instant) {
        let b = Balancer::new((0..n).collect(), BalanceConfig::default());
        (b, Instant::now())
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(0x5eed)
    }

    /// Ejects endpoint `i` at `now` with threshold-many failures.
    fn eject(b: &Balancer<usize>, i: usize, now: Instant) {
        for _ in 0..b.config().failure_threshold {
            b.acquire(i, now).unwrap().complete(now, MS, false);
        }
        assert!(b.endpoints[i].1.is_ejected(now));
    }

    /// Answer times by endpoint and by how many requests it has had
    /// before (0: its first).
    type Latency<'a> = &'a dyn Fn(usize, u32) -> Duration;

    /// `calls` requests one after another (one gRPC channel, nothing in
    /// flight when the next is picked), 1 ms apart after each answer;
    /// returns the requests per endpoint and the instant after the last.
    fn sequential(
        b: &Balancer<usize>,
        t0: Instant,
        rng: &mut StdRng,
        calls: usize,
        latency: Latency<'_>,
    ) -> (Vec<u32>, Instant) {
        let mut counts = vec![0u32; b.len()];
        let mut now = t0;
        for _ in 0..calls {
            let p = b.pick_with(now, rng, &|_| false).unwrap();
            let i = *p.endpoint();
            let took = latency(i, counts[i]);
            counts[i] += 1;
            now += took;
            p.complete(now, took, true);
            now += MS;
        }
        (counts, now)
    }

    /// `calls` requests from `callers` callers that each send the next as
    /// soon as their last is answered; returns the requests per endpoint.
    fn concurrent(
        b: &Balancer<usize>,
        t0: Instant,
        callers: usize,
        calls: usize,
        latency: Latency<'_>,
    ) -> Vec<u32> {
        concurrent_seeded(b, t0, 0x5eed, callers, calls, latency)
    }

    /// [`concurrent`] with P2C's draws from `seed`.
    fn concurrent_seeded(
        b: &Balancer<usize>,
        t0: Instant,
        seed: u64,
        callers: usize,
        calls: usize,
        latency: Latency<'_>,
    ) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut counts = vec![0u32; b.len()];
        let mut out: Vec<(Instant, Duration, Pick<'_, usize>)> = Vec::new();
        let (mut now, mut sent) = (t0, 0);
        while sent < calls || !out.is_empty() {
            while out.len() < callers && sent < calls {
                let p = b.pick_with(now, &mut rng, &|_| false).unwrap();
                let i = *p.endpoint();
                let took = latency(i, counts[i]);
                counts[i] += 1;
                sent += 1;
                out.push((now + took, took, p));
            }
            let first = (0..out.len()).min_by_key(|&k| out[k].0).unwrap();
            let (at, took, p) = out.swap_remove(first);
            now = at;
            p.complete(now, took, true);
        }
        counts
    }

    /// The world: one endpoint on this node, two behind the tunnel.
    fn local_and_remote(local: Duration, remote: Duration) -> impl Fn(usize, u32) -> Duration {
        move |i, _| if i == 0 { local } else { remote }
    }

    #[test]
    fn sequential_calls_reach_every_new_endpoint_at_once() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        let latency = local_and_remote(MS * 3 / 10, MS * 8 / 10);
        // Every endpoint has had a request within the first few calls…
        let (first, t1) = sequential(&b, t0, &mut rng, 6, &latency);
        assert!(first.iter().all(|&c| c > 0), "{first:?}");
        // …and the rest keeps preferring the faster one, on this node.
        let (rest, _) = sequential(&b, t1, &mut rng, 294, &latency);
        assert!(rest[0] > rest[1] + rest[2], "{rest:?}");
    }

    #[test]
    fn an_endpoint_that_appears_later_is_sampled_at_once() {
        let (old, t0) = balancer(2);
        let mut rng = rng();
        let latency = |_: usize, _: u32| MS / 2;
        let (_, t1) = sequential(&old, t0, &mut rng, 100, &latency);
        // A reload adds endpoint 2: fresh statistics, as discovery makes
        // them, seconds after the others were measured.
        let t2 = t1 + 5 * SEC;
        let entries = (0..3)
            .map(|e| {
                let stats = old
                    .stats_of(&e)
                    .unwrap_or_else(|| Arc::new(EndpointStats::new(t2, old.config())));
                (e, stats)
            })
            .collect();
        let new = Balancer::with_stats(entries, BalanceConfig::default());
        let (counts, _) = sequential(&new, t2, &mut rng, 5, &latency);
        assert!(counts[2] >= 1, "{counts:?}");
    }

    /// Answer times by endpoint around `medians_ms`, as real servers give
    /// them: log-normal with shape 0.4 (the 99th percentile about 2.5×
    /// the median, as the world's gRPC servers answer on a loaded debug
    /// build) and one answer in a hundred 4× slower still (a descheduled
    /// thread). The same for the same seed, endpoint and request number.
    fn noisy(seed: u64, medians_ms: &[f64]) -> impl Fn(usize, u32) -> Duration + '_ {
        move |i, nth| {
            let key = splitmix(splitmix(seed) ^ ((i as u64) << 32 | u64::from(nth)));
            let unit = |n: u64| (splitmix(key.wrapping_add(n)) >> 11) as f64 / (1u64 << 53) as f64;
            let (u1, u2) = (unit(1).max(1e-12), unit(2));
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            let spike = if unit(3) < 0.01 { 4.0 } else { 1.0 };
            Duration::from_secs_f64(medians_ms[i] * (0.4 * z).exp() * spike / 1e3)
        }
    }

    /// SplitMix64's finaliser: a well-mixed number from any key, cheaply
    /// (a seeded generator per answer made the noisy tests slow).
    fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// `runs` sequential runs of `calls` over fresh endpoints answering
    /// around `medians_ms`, one seed each.
    fn sequential_runs(runs: u64, calls: usize, medians_ms: &[f64]) -> Vec<Vec<u32>> {
        (0..runs)
            .map(|seed| {
                let b = Balancer::new((0..medians_ms.len()).collect(), BalanceConfig::default());
                let mut rng = StdRng::seed_from_u64(seed);
                sequential(
                    &b,
                    Instant::now(),
                    &mut rng,
                    calls,
                    &noisy(seed, medians_ms),
                )
                .0
            })
            .collect()
    }

    /// The smallest count of endpoint `i` over `runs`.
    fn fewest(runs: &[Vec<u32>], i: usize) -> u32 {
        runs.iter().map(|r| r[i]).min().unwrap_or(0)
    }

    #[test]
    fn one_slow_answer_does_not_take_an_endpoint_out_of_sequential_calls() {
        // Equal endpoints; endpoint 2's third answer is 4× slower (a
        // descheduled server thread). As a peak it is the estimate at
        // once, and it would fade only over `decay` (14 s to get back to
        // 1 ms): it got 2 of 300 calls before. Passed over, it is chosen
        // again after 30 lost comparisons, and its answer puts it back.
        let latency = |i: usize, nth: u32| if i == 2 && nth == 2 { 4 * MS } else { MS };
        let (b, t0) = balancer(3);
        let (counts, _) = sequential(&b, t0, &mut rng(), 300, &latency);
        assert!(counts.iter().all(|&c| c >= 60), "{counts:?}");
    }

    #[test]
    fn noisy_equal_endpoints_share_sequential_calls() {
        // The world's runs before: 20, 13, 24 and 3 of 300 for one of
        // the two equal endpoints behind the tunnel.
        let runs = sequential_runs(100, 300, &[1.0, 1.0, 1.0]);
        for i in 0..3 {
            assert!(fewest(&runs, i) >= 45, "endpoint {i}: {runs:?}");
        }
    }

    #[test]
    fn noisy_locality_keeps_its_preference_and_reaches_every_endpoint() {
        // One endpoint on this node (0.3 ms), two behind the tunnel
        // (0.8 ms): the near one wins the pairs it is in, bar the retries
        // of the others, whatever its own slow answers; each far one
        // keeps a share.
        let runs = sequential_runs(100, 300, &[0.3, 0.8, 0.8]);
        assert!(fewest(&runs, 0) >= 120, "{runs:?}");
        let near: u32 = runs.iter().map(|r| r[0]).sum();
        assert!(near >= 100 * 300 * 55 / 100, "{near} of 30,000");
        assert!(fewest(&runs, 1) >= 24 && fewest(&runs, 2) >= 24, "{runs:?}");
    }

    #[test]
    fn eight_noisy_callers_share_three_equal_endpoints() {
        for seed in 0..50 {
            let b = Balancer::new(vec![0usize, 1, 2], BalanceConfig::default());
            let counts =
                concurrent_seeded(&b, Instant::now(), seed, 8, 3_000, &noisy(seed, &[1.0; 3]));
            assert!(counts.iter().all(|&c| c >= 750), "seed {seed}: {counts:?}");
        }
    }

    #[test]
    fn a_really_slower_endpoint_is_retried_rarely() {
        // 0.3 ms here, 5 ms behind the tunnel: P2C gives the two far ones
        // only the pairs without the near one (a third), bar retries.
        let runs = sequential_runs(20, 3_000, &[0.3, 5.0, 5.0]);
        for r in &runs {
            assert!(r[0] >= 1_800 && r[1] < r[0] / 3 && r[2] < r[0] / 3, "{r:?}");
        }
        // One 10× slower than its two peers: retried, so that a recovery
        // would be seen, at a bounded cost (about 1 % of the calls).
        let runs = sequential_runs(20, 3_000, &[10.0, 1.0, 1.0]);
        for r in &runs {
            assert!((10..=90).contains(&r[0]), "{r:?}");
        }
    }

    #[test]
    fn a_slow_first_answer_does_not_condemn_an_endpoint() {
        // Equal endpoints whose first exchange is 100× slower (a cold
        // connection on the far side, a server's lazy set-up: what a TLS
        // handshake would add if it were timed with the request).
        let cold = |_: usize, nth: u32| if nth == 0 { 50 * MS } else { MS / 2 };
        let (b, t0) = balancer(3);
        let (counts, _) = sequential(&b, t0, &mut rng(), 300, &cold);
        assert!(counts.iter().all(|&c| c >= 60), "{counts:?}");
        let (b, t0) = balancer(3);
        let counts = concurrent(&b, t0, 8, 3_000, &cold);
        assert!(counts.iter().all(|&c| c >= 600), "{counts:?}");
    }

    #[test]
    fn eight_concurrent_callers_share_three_equal_endpoints() {
        let (b, t0) = balancer(3);
        let counts = concurrent(&b, t0, 8, 3_000, &|_, _| MS);
        assert!(counts.iter().all(|&c| c >= 600), "{counts:?}");
    }

    #[test]
    fn locality_is_kept_where_latency_really_differs() {
        let latency = local_and_remote(MS / 5, MS);
        let (b, t0) = balancer(3);
        let (counts, _) = sequential(&b, t0, &mut rng(), 3_000, &latency);
        assert!(counts[0] >= 1_800, "{counts:?}");
        assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
        // Under concurrency in-flight counts spread the load, but the
        // faster endpoint still takes the most.
        let (b, t0) = balancer(3);
        let counts = concurrent(&b, t0, 8, 3_000, &latency);
        assert!(counts[0] > counts[1] && counts[0] > counts[2], "{counts:?}");
        // Equal latencies: no preference (the same runs, the same seeds).
        let (b, t0) = balancer(3);
        let (counts, _) = sequential(&b, t0, &mut rng(), 3_000, &|_, _| MS);
        assert!(counts.iter().all(|&c| c >= 800), "{counts:?}");
    }

    #[test]
    fn a_new_endpoint_gets_one_request_at_a_time_until_it_answers() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        for i in 0..2 {
            for _ in 0..WARMUP_ANSWERS {
                b.acquire(i, t0).unwrap().complete(t0, MS, true);
            }
        }
        // Eight requests held open: endpoint 2 wins its first draw, then
        // costs the 30 ms prior × 2 against 1 ms × (in flight + 1).
        let held: Vec<_> = (0..8)
            .map(|_| b.pick_with(t0, &mut rng, &|_| false).unwrap())
            .collect();
        let to_new = held.iter().filter(|p| *p.endpoint() == 2).count();
        assert_eq!(
            to_new,
            1,
            "{:?}",
            held.iter().map(|p| p.index).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_new_endpoint_that_fails_gets_no_head_start_again() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        let mut counts = [0u32; 3];
        let mut now = t0;
        for _ in 0..300 {
            let p = b.pick_with(now, &mut rng, &|_| false).unwrap();
            let i = *p.endpoint();
            counts[i] += 1;
            // Endpoint 2 refuses connections: an instant failure.
            p.complete(now, MS / 10, i != 2);
            now += 2 * MS;
        }
        assert_eq!(counts[2], 1, "{counts:?}");
        assert!(!b.endpoints[2].1.is_ejected(now));
    }

    #[test]
    fn no_endpoints_no_pick() {
        let (b, now) = balancer(0);
        assert!(b.pick(now).is_none());
        assert!(b.is_empty());
    }

    #[test]
    fn single_endpoint_is_always_picked_even_when_ejected() {
        let (b, now) = balancer(1);
        let p = b.pick(now).unwrap();
        assert_eq!(*p.endpoint(), 0);
        assert!(!p.is_panic());
        drop(p);
        eject(&b, 0, now);
        assert_eq!(b.available(now), 0);
        let p = b.pick(now).unwrap();
        assert!(p.is_panic());
    }

    #[test]
    fn equal_endpoints_share_load_evenly() {
        let (b, t0) = balancer(4);
        let mut rng = rng();
        let mut counts = [0u32; 4];
        for i in 0..10_000 {
            let now = t0 + i * MS / 10;
            let p = b.pick_with(now, &mut rng, &|_| false).unwrap();
            counts[*p.endpoint()] += 1;
            p.complete(now, BalanceConfig::default().default_rtt, true);
        }
        for c in counts {
            assert!((2_250..=2_750).contains(&c), "{counts:?}");
        }
    }

    /// Endpoints faster than the 30 ms prior: each is tried once while
    /// new, then in-flight counts even the load out.
    #[test]
    fn equal_endpoints_under_concurrency_share_load_evenly() {
        let (b, t0) = balancer(4);
        let mut rng = rng();
        let mut counts = [0u32; 4];
        let mut outstanding = std::collections::VecDeque::new();
        for i in 0..10_000 {
            let now = t0 + i * MS / 10;
            if outstanding.len() == 8 {
                let p: Pick<'_, usize> = outstanding.pop_front().unwrap();
                p.complete(now, 10 * MS, true);
            }
            let p = b.pick_with(now, &mut rng, &|_| false).unwrap();
            counts[*p.endpoint()] += 1;
            outstanding.push_back(p);
        }
        for c in counts {
            assert!((2_250..=2_750).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn slow_endpoint_gets_fewer_picks() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        let mut counts = [0u32; 3];
        for i in 0..3_000 {
            let now = t0 + i * MS;
            let p = b.pick_with(now, &mut rng, &|_| false).unwrap();
            let latency = if *p.endpoint() == 0 {
                100 * MS
            } else {
                10 * MS
            };
            counts[*p.endpoint()] += 1;
            p.complete(now, latency, true);
        }
        assert!(counts[0] < 30, "{counts:?}");
        assert!(counts[1] > 1_000 && counts[2] > 1_000, "{counts:?}");
    }

    #[test]
    fn busy_endpoint_gets_fewer_picks() {
        let (b, now) = balancer(3);
        let mut rng = rng();
        let held: Vec<_> = (0..20).map(|_| b.acquire(0, now).unwrap()).collect();
        assert_eq!(b.endpoints[0].1.in_flight(), 20);
        let mut counts = [0u32; 3];
        for _ in 0..1_000 {
            counts[*b.pick_with(now, &mut rng, &|_| false).unwrap().endpoint()] += 1;
        }
        // Endpoint 0 loses every pair it is in: 21× the cost of the other.
        assert_eq!(counts[0], 0, "{counts:?}");
        drop(held);
        assert_eq!(b.endpoints[0].1.in_flight(), 0);
    }

    #[test]
    fn ejected_endpoint_is_skipped_then_probed_then_readmitted() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        eject(&b, 0, t0);
        assert_eq!(b.available(t0), 2);
        // The others answer as slowly as the prior the failures left
        // endpoint 0 with: the probe is P2C's choice, not forced.
        let rtt = b.config().default_rtt;
        for _ in 0..500 {
            let p = b.pick_with(t0 + SEC, &mut rng, &|_| false).unwrap();
            assert_ne!(*p.endpoint(), 0);
            p.complete(t0 + SEC, rtt, true);
        }
        // Expired: endpoint 0 is chosen once as a probe, and not again while
        // that probe is out.
        let t1 = t0 + 5 * SEC;
        let mut probe = None;
        for _ in 0..500 {
            let p = b.pick_with(t1, &mut rng, &|_| false).unwrap();
            if *p.endpoint() == 0 {
                assert!(p.is_probe());
                assert!(probe.is_none(), "second probe while one is out");
                probe = Some(p);
            }
        }
        probe.expect("probe picked").complete(t1, MS, true);
        assert!(!b.endpoints[0].1.is_ejected(t1));
        assert_eq!(b.endpoints[0].1.ejected_until(), None);
        let p = b.acquire(0, t1).unwrap();
        assert!(!p.is_probe() && !p.is_panic());
    }

    #[test]
    fn all_ejected_picks_the_one_back_soonest() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        eject(&b, 1, t0);
        eject(&b, 0, t0 + SEC);
        eject(&b, 2, t0 + 2 * SEC);
        let p = b.pick_with(t0 + 3 * SEC, &mut rng, &|_| false).unwrap();
        assert_eq!(*p.endpoint(), 1);
        assert!(p.is_panic());
        // A success in panic mode readmits it.
        p.complete(t0 + 3 * SEC, MS, true);
        assert_eq!(b.available(t0 + 3 * SEC), 1);
        let p = b.pick_with(t0 + 3 * SEC, &mut rng, &|_| false).unwrap();
        assert_eq!(*p.endpoint(), 1);
        assert!(!p.is_panic());
    }

    #[test]
    fn panic_mode_spreads_over_equal_ejections() {
        let (b, t0) = balancer(3);
        let mut rng = rng();
        for i in 0..3 {
            eject(&b, i, t0);
        }
        let mut seen = [false; 3];
        for _ in 0..100 {
            seen[*b.pick_with(t0, &mut rng, &|_| false).unwrap().endpoint()] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn cancelled_picks_count_neither_way() {
        let (b, now) = balancer(2);
        for _ in 0..4 {
            b.acquire(0, now).unwrap().complete(now, MS, false);
        }
        drop(b.acquire(0, now).unwrap());
        let stats = &b.endpoints[0].1;
        assert_eq!(stats.consecutive_failures(), 4);
        assert_eq!(stats.in_flight(), 0);
        b.acquire(0, now).unwrap().complete(now, MS, false);
        assert!(stats.is_ejected(now));
        // A cancelled probe frees the endpoint for the next probe.
        let t1 = now + 5 * SEC;
        let probe = b.acquire(0, t1).unwrap();
        assert!(probe.is_probe());
        assert!(b.acquire(0, t1).is_none());
        drop(probe);
        assert!(b.acquire(0, t1).unwrap().is_probe());
    }

    #[test]
    fn stats_survive_a_rebuild() {
        let (old, now) = balancer(3);
        eject(&old, 1, now);
        let kept = [1usize, 2, 7];
        let entries = kept
            .iter()
            .map(|e| {
                let stats = old
                    .stats_of(e)
                    .unwrap_or_else(|| Arc::new(EndpointStats::new(now, old.config())));
                (*e, stats)
            })
            .collect();
        let config = BalanceConfig {
            decay: 2 * SEC,
            ..Default::default()
        };
        let new = Balancer::with_stats(entries, config);
        assert!(Arc::ptr_eq(
            &new.stats_of(&1).unwrap(),
            &old.stats_of(&1).unwrap()
        ));
        assert!(new.stats_of(&1).unwrap().is_ejected(now));
        assert_eq!(new.stats_of(&7).unwrap().ejections_total(), 0);
        assert_eq!(new.endpoints().copied().collect::<Vec<_>>(), kept);
        assert_eq!(new.available(now), 2);
    }

    #[test]
    fn weights_share_load_in_proportion() {
        let now = Instant::now();
        let b = Balancer::new(vec![0usize, 1, 2], BalanceConfig::default())
            .with_weights(|e| if *e == 0 { 2 } else { 1 });
        let mut counts = [0u32; 3];
        let mut rng = rng();
        // Hold every pick so in-flight counts drive the choice, as under
        // load; equal latencies, so only the weights differ.
        let mut held = Vec::new();
        for _ in 0..4000 {
            let p = b.pick_with(now, &mut rng, &|_| false).unwrap();
            counts[p.index] += 1;
            held.push(p);
            if held.len() == 8 {
                for p in held.drain(..) {
                    p.complete(now, MS, true);
                }
            }
        }
        let ratio = f64::from(counts[0]) / f64::from(counts[1] + counts[2]) * 2.0;
        assert!((1.6..2.4).contains(&ratio), "weight 2 vs 1: {counts:?}");
    }

    #[test]
    fn weight_zero_drains_unless_nothing_else_is_left() {
        let now = Instant::now();
        let b = Balancer::new(vec![0usize, 1], BalanceConfig::default())
            .with_weights(|e| u32::from(*e != 0));
        for _ in 0..200 {
            assert_eq!(*b.pick(now).unwrap().endpoint(), 1);
        }
        eject(&b, 1, now);
        assert_eq!(*b.pick(now).unwrap().endpoint(), 0, "last resort");
        let alone = Balancer::new(vec![0usize], BalanceConfig::default()).with_weights(|_| 0);
        assert!(alone.pick(now).is_some());
    }

    #[test]
    fn usable_from_many_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Balancer<String>>();
        assert_send_sync::<Pick<'static, String>>();
        let b = Balancer::new((0..5).collect::<Vec<usize>>(), BalanceConfig::default());
        std::thread::scope(|s| {
            for t in 0..4 {
                let b = &b;
                s.spawn(move || {
                    let held: Vec<_> = (0..2_000)
                        .filter_map(|i| {
                            let now = Instant::now();
                            let p = b.pick(now)?;
                            match i % 3 {
                                0 => {
                                    p.complete(now, MS * (t + 1), i % 7 != 0);
                                    None
                                }
                                1 => None,
                                _ => Some(p),
                            }
                        })
                        .collect();
                    drop(held);
                });
            }
        });
        for (_, stats) in b.entries() {
            assert_eq!(stats.in_flight(), 0);
        }
    }

    #[test]
    fn pick_avoiding_goes_elsewhere_while_it_can() {
        let b = Balancer::new(vec![0usize, 1, 2], BalanceConfig::default());
        let now = Instant::now();
        for _ in 0..200 {
            let p = b.pick_avoiding(now, |e| *e == 0).unwrap();
            assert_ne!(*p.endpoint(), 0);
        }
        // Everything avoided: still a pick, never None.
        assert!(b.pick_avoiding(now, |_| true).is_some());
    }
}
