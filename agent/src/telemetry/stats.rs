//! Sliding-window golden metrics for `waymark stat`, `routes` and `edges`:
//! per edge (source pod → destination service, per route) the requests,
//! successes, retries and latency of the last minutes, and the TCP
//! connections open and opened.
//!
//! Prometheus counters answer "how many since start"; an operator at 3 AM
//! asks "what is the success rate *now*". So the agent keeps, per edge, a
//! ring of [`BUCKET`]-long buckets covering [`MAX_WINDOW`], each with its
//! counters and a log-linear latency histogram, and a query sums the buckets
//! of the window it asks for. A window of `W` covers the buckets that
//! started within the last `W` plus the current, partial one, so it spans
//! between `W` and `W + BUCKET` (capped by the agent's uptime); queries
//! report the span they covered and rates are divided by it.
//!
//! Recording is on the request path: one hash lookup under a read lock when
//! the request starts (the edge handle is then kept), and when it ends one
//! uncontended mutex held for a few additions. Edges are bounded by
//! `metrics.max_stat_edges`; beyond it, new edges are counted under one
//! [`OTHER`] edge, and edges idle for longer than the ring are dropped.
//!
//! Latency percentiles come from the histogram: bins are 1/8 of an octave
//! wide (a value is placed within 12.5 %), the estimate is interpolated
//! inside its bin and clamped to the smallest and largest values seen.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::fast_map::FastMap;

/// Length of one bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// The longest window a query may ask for.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);
/// Buckets in the ring: the windows' full buckets plus the current one.
const SLOTS: u64 = MAX_WINDOW.as_secs() / BUCKET.as_secs() + 1;
/// Name of the edge that counts what no longer fits under the cap.
pub const OTHER: &str = "[other]";

/// Which traffic an edge counts: a source pod, the destination it dialled
/// (a service name, else the address) and, for HTTP, the route. Connection
/// edges (`route: None`) count TCP connections; request edges count HTTP
/// requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeKey {
    pub pod: String,
    pub dst: String,
    pub route: Option<String>,
}

/// Borrowed form of a key, so a lookup does not allocate.
trait KeyRef {
    fn parts(&self) -> (&str, &str, Option<&str>);
}

impl KeyRef for EdgeKey {
    fn parts(&self) -> (&str, &str, Option<&str>) {
        (&self.pod, &self.dst, self.route.as_deref())
    }
}

impl KeyRef for (&str, &str, Option<&str>) {
    fn parts(&self) -> (&str, &str, Option<&str>) {
        *self
    }
}

impl Hash for EdgeKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl<'a> Borrow<dyn KeyRef + 'a> for EdgeKey {
    fn borrow(&self) -> &(dyn KeyRef + 'a) {
        self
    }
}

impl Hash for dyn KeyRef + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl PartialEq for dyn KeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyRef + '_ {}

/// How one request ended, as `response_total` classified it.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub success: bool,
    /// Time to the response head, as `response_latency_ms`.
    pub latency: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// One more attempt was wanted, but the retry budget refused it.
    pub budget_exhausted: bool,
    /// The last attempt went through the mTLS tunnel.
    pub tls: bool,
}

/// One edge's ring of buckets and, for connection edges, its open count.
pub struct Edge {
    open: AtomicI64,
    ring: Mutex<Ring>,
}

struct Ring {
    slots: Box<[Option<Box<Bucket>>]>,
    /// The newest bucket written, for the idle sweep.
    last: u64,
}

/// One bucket's counts.
struct Bucket {
    epoch: u64,
    counts: Counts,
    hist: SparseHist,
}

impl Edge {
    fn new() -> Self {
        Edge {
            open: AtomicI64::new(0),
            ring: Mutex::new(Ring {
                slots: (0..SLOTS).map(|_| None).collect(),
                last: 0,
            }),
        }
    }

    /// The bucket of `epoch`, emptied first if it held an older one.
    fn with_bucket(&self, epoch: u64, f: impl FnOnce(&mut Bucket)) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.last = ring.last.max(epoch);
        let slot = &mut ring.slots[(epoch % SLOTS) as usize];
        let bucket = slot.get_or_insert_with(|| {
            Box::new(Bucket {
                epoch,
                counts: Counts::default(),
                hist: SparseHist::default(),
            })
        });
        if bucket.epoch != epoch {
            bucket.epoch = epoch;
            bucket.counts = Counts::default();
            bucket.hist.clear();
        }
        f(bucket);
    }

    /// Sums the buckets of epochs `from..=to` into `into`.
    fn collect(&self, from: u64, to: u64, into: &mut Summary) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        for bucket in ring.slots.iter().flatten() {
            if (from..=to).contains(&bucket.epoch) {
                into.counts.add(&bucket.counts);
                bucket.hist.add_to(&mut into.latency);
            }
        }
        into.counts.open += self.open.load(Ordering::Relaxed).max(0) as u64;
    }

    fn idle_since(&self, epoch: u64) -> bool {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.last < epoch && self.open.load(Ordering::Relaxed) <= 0
    }
}

/// Counters of a bucket, and of a sum of buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub requests: u64,
    pub successes: u64,
    /// Attempts beyond the first, over all requests.
    pub retries: u64,
    /// Requests that needed more than one attempt.
    pub retried_requests: u64,
    /// Requests the retry budget refused a retry.
    #[serde(default)]
    pub budget_exhausted: u64,
    /// Requests carried by the mTLS tunnel.
    #[serde(default)]
    pub tls_requests: u64,
    /// TCP connections opened.
    pub tcp_opened: u64,
    /// TCP connections open now (not a bucket count: the edge's gauge).
    pub open: u64,
    /// Smallest and largest latency seen, in µs (0 when none).
    #[serde(skip)]
    pub min_us: u64,
    #[serde(skip)]
    pub max_us: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        if o.requests > 0 {
            self.min_us = if self.requests == 0 {
                o.min_us
            } else {
                self.min_us.min(o.min_us)
            };
            self.max_us = self.max_us.max(o.max_us);
        }
        self.requests += o.requests;
        self.successes += o.successes;
        self.retries += o.retries;
        self.retried_requests += o.retried_requests;
        self.budget_exhausted += o.budget_exhausted;
        self.tls_requests += o.tls_requests;
        self.tcp_opened += o.tcp_opened;
        self.open += o.open;
    }
}

/// The counts and latency histogram of some edges over a window.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub counts: Counts,
    pub latency: Histogram,
}

impl Summary {
    pub fn add(&mut self, o: &Summary) {
        self.counts.add(&o.counts);
        self.latency.merge(&o.latency);
    }

    /// Success rate in [0, 1]; `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.counts.requests > 0)
            .then(|| self.counts.successes as f64 / self.counts.requests as f64)
    }

    /// Latency at quantile `q` (0..=1), in milliseconds; `None` without
    /// requests.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.latency
            .quantile_us(q, self.counts.min_us, self.counts.max_us)
            .map(|us| us / 1000.0)
    }
}

/// Latency bins: values below 8 µs exactly, then 8 bins per octave.
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Latencies are capped at 2^36 µs (19 hours).
const MAX_US: u64 = (1 << 36) - 1;

fn bin_of(us: u64) -> usize {
    let us = us.min(MAX_US);
    if us < SUB {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = (us >> shift) & (SUB - 1);
    ((msb - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// `[low, high)` of bin `b`, in µs.
fn bin_range(b: usize) -> (u64, u64) {
    let b = b as u64;
    if b < SUB {
        return (b, b + 1);
    }
    let shift = b / SUB - 1;
    let low = (SUB + b % SUB) << shift;
    (low, low + (1 << shift))
}

/// A bucket's latencies: (bin, count) pairs, as latencies of one edge
/// cluster in a few bins and a dense array per bucket would cost KiBs.
#[derive(Default)]
struct SparseHist(Vec<(u16, u32)>);

impl SparseHist {
    fn record(&mut self, us: u64) {
        let b = bin_of(us) as u16;
        match self.0.iter_mut().find(|(bin, _)| *bin == b) {
            Some((_, n)) => *n = n.saturating_add(1),
            None => self.0.push((b, 1)),
        }
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn add_to(&self, h: &mut Histogram) {
        for &(b, n) in &self.0 {
            h.add_bin(b as usize, n as u64);
        }
    }
}

/// A dense latency histogram, for queries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram(Vec<u64>);

impl Histogram {
    #[cfg(test)]
    pub fn record_us(&mut self, us: u64) {
        self.add_bin(bin_of(us), 1);
    }

    fn add_bin(&mut self, b: usize, n: u64) {
        if self.0.len() <= b {
            self.0.resize(b + 1, 0);
        }
        self.0[b] += n;
    }

    pub fn merge(&mut self, o: &Histogram) {
        for (b, &n) in o.0.iter().enumerate() {
            if n > 0 {
                self.add_bin(b, n);
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The value at quantile `q`, in µs: the rank's bin, interpolated
    /// linearly inside it, clamped to `[min, max]` (the extremes seen, which
    /// the bins cannot place exactly).
    pub fn quantile_us(&self, q: f64, min: u64, max: u64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for (b, &n) in self.0.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let (low, high) = bin_range(b);
                let frac = (rank - below as f64) / n as f64;
                let v = low as f64 + frac * (high - low) as f64;
                let (min, max) = (min as f64, max.max(min) as f64);
                return Some(v.clamp(min, max));
            }
            below += n;
        }
        Some(max as f64)
    }
}

/// Every edge's windows; shared by the data path (recording) and the
/// admin API (queries).
pub struct Stats {
    start: Instant,
    edges: RwLock<FastMap<EdgeKey, Arc<Edge>>>,
    max_edges: usize,
    other_requests: Arc<Edge>,
    other_connections: Arc<Edge>,
    /// Requests and connections counted under [`OTHER`].
    overflowed: AtomicU64,
    /// The same requests again, by the backend service their route chose
    /// (keyed service → backend, per route: `EdgeKey { pod: service, dst:
    /// backend, route }`), for `waymark routes`' per-backend breakdown.
    backends: RwLock<FastMap<EdgeKey, Arc<Edge>>>,
    /// What the backend table has no room for (not reported).
    other_backends: Arc<Edge>,
}

/// A query's result: every edge with traffic in the window.
pub struct Window {
    /// What the window covers (shorter than asked while the agent is younger).
    pub covered: Duration,
    pub edges: Vec<(EdgeKey, Summary)>,
}

impl Stats {
    pub fn new(max_edges: usize) -> Self {
        Self::starting_at(max_edges, Instant::now())
    }

    fn starting_at(max_edges: usize, start: Instant) -> Self {
        Stats {
            start,
            edges: RwLock::new(FastMap::default()),
            max_edges,
            other_requests: Arc::new(Edge::new()),
            other_connections: Arc::new(Edge::new()),
            overflowed: AtomicU64::new(0),
            backends: RwLock::new(FastMap::default()),
            other_backends: Arc::new(Edge::new()),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.start).as_nanos() / BUCKET.as_nanos()) as u64
    }

    /// The edge that counts `pod`'s requests to `service` on `route`; held
    /// for the request and passed to [`Stats::record`] when it ends.
    pub fn request_edge(&self, pod: &str, service: &str, route: &str) -> Arc<Edge> {
        self.edge((pod, service, Some(route)), Instant::now)
    }

    /// The edge that counts requests to `service` on `route` that the route
    /// sent to `backend`; recorded with [`Stats::record`] beside the
    /// request's own edge.
    pub fn backend_edge(&self, service: &str, route: &str, backend: &str) -> Arc<Edge> {
        let key = (service, backend, Some(route));
        self.edge_in(&self.backends, key, Instant::now)
            .unwrap_or_else(|| self.other_backends.clone())
    }

    /// A cached handle of an edge, again, if the table still holds it.
    /// The upgrade runs under the table's read lock, which excludes the
    /// idle sweep (it drops an edge only under the write lock and only when
    /// the table holds the sole strong reference): so an edge revived here
    /// is the one [`Stats::request_edge`] would return, and it stays in the
    /// table while the request holds it.
    pub fn revive(&self, edge: &Weak<Edge>) -> Option<Arc<Edge>> {
        let _table = self.edges.read().unwrap_or_else(|e| e.into_inner());
        edge.upgrade()
    }

    /// Whether `edge` is one of the [`OTHER`] edges. Those are not to be
    /// cached: each request counted there counts as an overflow, and gets
    /// an edge of its own once the sweep has made room.
    pub fn is_other(&self, edge: &Arc<Edge>) -> bool {
        Arc::ptr_eq(edge, &self.other_requests) || Arc::ptr_eq(edge, &self.other_connections)
    }

    /// Counts a request's end.
    pub fn record(&self, edge: &Edge, outcome: Outcome) {
        self.record_at(edge, outcome, Instant::now());
    }

    fn record_at(&self, edge: &Edge, outcome: Outcome, now: Instant) {
        let us = outcome.latency.as_micros().min(MAX_US as u128) as u64;
        edge.with_bucket(self.epoch(now), |b| {
            let c = &mut b.counts;
            c.min_us = if c.requests == 0 {
                us
            } else {
                c.min_us.min(us)
            };
            c.max_us = c.max_us.max(us);
            c.requests += 1;
            c.successes += outcome.success as u64;
            c.retries += outcome.retries as u64;
            c.retried_requests += (outcome.retries > 0) as u64;
            c.budget_exhausted += outcome.budget_exhausted as u64;
            c.tls_requests += outcome.tls as u64;
            b.hist.record(us);
        });
    }

    /// Counts a TCP connection from `pod` to `dst` (a service name, else
    /// the address); it counts as open until the guard is dropped.
    pub fn connection(&self, pod: &str, dst: &str) -> OpenConnection {
        self.connection_at(pod, dst, Instant::now())
    }

    fn connection_at(&self, pod: &str, dst: &str, now: Instant) -> OpenConnection {
        let edge = self.edge((pod, dst, None), || now);
        edge.open.fetch_add(1, Ordering::Relaxed);
        edge.with_bucket(self.epoch(now), |b| b.counts.tcp_opened += 1);
        OpenConnection { edge }
    }

    fn edge(&self, key: (&str, &str, Option<&str>), now: impl FnOnce() -> Instant) -> Arc<Edge> {
        self.edge_in(&self.edges, key, now).unwrap_or_else(|| {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            match key.2 {
                Some(_) => self.other_requests.clone(),
                None => self.other_connections.clone(),
            }
        })
    }

    /// The edge of `key` in `table`, made if there is room (after dropping
    /// idle edges); `None` when the table is full. `now` is read only when
    /// the table is full (the clock is not read per request).
    fn edge_in(
        &self,
        table: &RwLock<FastMap<EdgeKey, Arc<Edge>>>,
        key: (&str, &str, Option<&str>),
        now: impl FnOnce() -> Instant,
    ) -> Option<Arc<Edge>> {
        let found = table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key as &dyn KeyRef)
            .cloned();
        if let Some(edge) = found {
            return Some(edge);
        }
        let mut edges = table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(edge) = edges.get(&key as &dyn KeyRef) {
            return Some(edge.clone());
        }
        if edges.len() >= self.max_edges {
            let idle_before = self.epoch(now()).saturating_sub(SLOTS);
            edges.retain(|_, e| Arc::strong_count(e) > 1 || !e.idle_since(idle_before));
        }
        if edges.len() >= self.max_edges {
            return None;
        }
        let (pod, dst, route) = key;
        let edge = Arc::new(Edge::new());
        edges.insert(
            EdgeKey {
                pod: pod.to_string(),
                dst: dst.to_string(),
                route: route.map(str::to_string),
            },
            edge.clone(),
        );
        Some(edge)
    }

    /// Requests and connections that were counted under [`OTHER`].
    #[cfg(test)]
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Every edge with traffic (or open connections) in the last `window`.
    pub fn window(&self, window: Duration, now: Instant) -> Window {
        let edges: Vec<(EdgeKey, Arc<Edge>)> = {
            let map = self.edges.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, e)| (k.clone(), e.clone())).collect()
        };
        let others = [
            (Some(OTHER.to_string()), &self.other_requests),
            (None, &self.other_connections),
        ];
        let others = others.into_iter().map(|(route, e)| {
            let key = EdgeKey {
                pod: OTHER.to_string(),
                dst: OTHER.to_string(),
                route,
            };
            (key, e.clone())
        });
        self.sum(edges.into_iter().chain(others), window, now)
    }

    /// The backend edges ([`Stats::backend_edge`]) with traffic in the
    /// last `window`: `pod` is the service, `dst` the backend.
    pub fn backend_window(&self, window: Duration, now: Instant) -> Window {
        let edges: Vec<(EdgeKey, Arc<Edge>)> = {
            let map = self.backends.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, e)| (k.clone(), e.clone())).collect()
        };
        self.sum(edges.into_iter(), window, now)
    }

    fn sum(
        &self,
        edges: impl Iterator<Item = (EdgeKey, Arc<Edge>)>,
        window: Duration,
        now: Instant,
    ) -> Window {
        let window = window.clamp(Duration::from_secs(1), MAX_WINDOW);
        let cur = self.epoch(now);
        let full = window.as_nanos().div_ceil(BUCKET.as_nanos()) as u64;
        let from = cur.saturating_sub(full);
        let from_time = self.start + Duration::from_secs(from * BUCKET.as_secs());
        let covered = now.saturating_duration_since(from_time);
        let mut out = Vec::new();
        for (key, edge) in edges {
            let mut s = Summary::default();
            edge.collect(from, cur, &mut s);
            if s.counts.requests > 0 || s.counts.tcp_opened > 0 || s.counts.open > 0 {
                out.push((key, s));
            }
        }
        Window {
            covered,
            edges: out,
        }
    }
}

/// An open TCP connection of an edge; dropping it closes it in the counts.
pub struct OpenConnection {
    edge: Arc<Edge>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.edge.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parses a window such as `1m`, `30s` or `10m`: between 1 s and
/// [`MAX_WINDOW`].
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("window {s:?} is not a duration such as 30s, 1m or 10m: {e}"))?;
    if d < Duration::from_secs(1) || d > MAX_WINDOW {
        return Err(format!(
            "window {s:?} is out of range: use 1s to {}",
            humantime::format_duration(MAX_WINDOW)
        ));
    }
    Ok(d)
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
