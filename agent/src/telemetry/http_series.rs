//! The resolved series of each HTTP request label set, so that counting a
//! request does not build owned label sets and hash them into
//! prometheus-client's families every time.
//!
//! A label set (direction, pod, authority, service, route, client id) is
//! resolved once: its `request_total` counter, its edge in `waymark stat`'s
//! windows and, per outcome (status, classification, gRPC status, tls), its
//! `response_total` counter and `response_latency_ms` histogram are cloned
//! out of the families. prometheus-client's metrics are shared handles, so
//! a clone counts into the very series `/metrics` encodes; the families are
//! never cleared, so a handle cannot drift from them. Later requests find
//! their series with one hash lookup of borrowed strings under a read lock.
//!
//! The cache is keyed by the values the request brought, but an entry is
//! only ever stored under the *label* values: an authority or client id
//! admitted by its bounded label is its own label value, so its requests
//! hit; one beyond the cap resolves to `overflow` on every request (a miss,
//! then the `overflow` entry), exactly as before. So the cache holds no more
//! entries than the families hold series.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock, Weak};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::RequestLabels;
use crate::fast_map::FastMap;
use crate::telemetry::metrics::{Direction, TlsLabel};
use crate::telemetry::stats::Edge;

/// What a request brought, borrowed: the cache's lookup key. `authority`
/// is `None` when the request had none (labelled `unknown`).
#[derive(Clone, Copy)]
pub(super) struct Lookup<'a> {
    pub direction: Direction,
    pub pod: &'a str,
    pub authority: Option<&'a str>,
    pub service: &'a str,
    pub route: &'a str,
    pub client_id: Option<&'a str>,
}

type Parts<'a> = (
    Direction,
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a str,
    Option<&'a str>,
);

/// Borrowed form of a key, so a lookup does not allocate.
trait KeyRef {
    fn parts(&self) -> Parts<'_>;
}

impl KeyRef for Lookup<'_> {
    fn parts(&self) -> Parts<'_> {
        (
            self.direction,
            self.pod,
            self.authority,
            self.service,
            self.route,
            self.client_id,
        )
    }
}

/// The stored key: a request's label values (authority `None`: none given).
struct Key {
    direction: Direction,
    pod: String,
    authority: Option<String>,
    service: String,
    route: String,
    client_id: Option<String>,
}

impl KeyRef for Key {
    fn parts(&self) -> Parts<'_> {
        (
            self.direction,
            &self.pod,
            self.authority.as_deref(),
            &self.service,
            &self.route,
            self.client_id.as_deref(),
        )
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Key {}

impl<'a> Borrow<dyn KeyRef + 'a> for Key {
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

/// How a request ended, the part of `response_total`'s labels that the
/// request's own labels do not fix.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct OutcomeKey {
    pub status_code: u16,
    pub classification: &'static str,
    pub grpc_status: Option<u32>,
    pub tls: TlsLabel,
}

/// One outcome's series.
#[derive(Clone)]
pub(super) struct OutcomeSeries {
    pub responses: Counter,
    pub latency: Histogram,
}

/// One request label set's resolved series.
pub(super) struct Series {
    pub labels: RequestLabels,
    pub requests: Counter,
    /// The edge in the stat windows, held weakly so that the windows' idle
    /// sweep can still drop it (see `Stats::revive`); empty for series that
    /// do not feed the windows, and while the edge is not known yet.
    edge: Mutex<Weak<Edge>>,
    /// Few per series (mostly one status), so a scan beats a map.
    outcomes: RwLock<Vec<(OutcomeKey, OutcomeSeries)>>,
}

impl Series {
    pub fn new(labels: RequestLabels, requests: Counter) -> Self {
        Series {
            labels,
            requests,
            edge: Mutex::new(Weak::new()),
            outcomes: RwLock::new(Vec::new()),
        }
    }

    /// The cached edge handle (empty when none is known).
    pub fn edge(&self) -> std::sync::MutexGuard<'_, Weak<Edge>> {
        self.edge.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The series of `key`, resolved with `resolve` the first time.
    pub fn outcome(
        &self,
        key: OutcomeKey,
        resolve: impl FnOnce() -> OutcomeSeries,
    ) -> OutcomeSeries {
        let found = self
            .outcomes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.clone());
        if let Some(s) = found {
            return s;
        }
        let mut outcomes = self.outcomes.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = outcomes.iter().find(|(k, _)| *k == key) {
            return s.clone();
        }
        let s = resolve();
        outcomes.push((key, s.clone()));
        s
    }
}

/// Every resolved request series.
#[derive(Default)]
pub(super) struct SeriesCache {
    map: RwLock<FastMap<Key, Arc<Series>>>,
}

impl SeriesCache {
    /// The series the request's own values name, if they are its labels.
    pub fn get(&self, lookup: &Lookup<'_>) -> Option<Arc<Series>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(lookup as &dyn KeyRef)
            .cloned()
    }

    /// The series of `labels` (a miss on the request's own values), made
    /// with `make` if no request with these labels came before.
    /// `has_authority` is whether the request had an authority at all.
    pub fn get_or_insert(
        &self,
        labels: RequestLabels,
        has_authority: bool,
        make: impl FnOnce(RequestLabels) -> Series,
    ) -> Arc<Series> {
        let lookup = Lookup {
            direction: labels.direction,
            pod: &labels.pod,
            authority: has_authority.then_some(labels.authority.as_str()),
            service: &labels.service,
            route: &labels.route,
            client_id: labels.client_id.as_deref(),
        };
        if let Some(s) = self.get(&lookup) {
            return s;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&lookup as &dyn KeyRef) {
            return s.clone();
        }
        let key = Key {
            direction: labels.direction,
            pod: labels.pod.clone(),
            authority: has_authority.then(|| labels.authority.clone()),
            service: labels.service.clone(),
            route: labels.route.clone(),
            client_id: labels.client_id.clone(),
        };
        let series = Arc::new(make(labels));
        map.insert(key, series.clone());
        series
    }
}
