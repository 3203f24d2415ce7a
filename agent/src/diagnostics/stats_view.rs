//! The tables `waymark stat`, `routes` and `edges` print, computed from a
//! [`Window`] of the sliding-window stats: rows grouped by service, pod,
//! route or edge. The admin API serves them as JSON and the CLI reads the
//! same types back, so the two cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::telemetry::stats::{EdgeKey, Summary, Window};

/// The TLS column of an edge until node-to-node mTLS carries identities:
/// Linkerd's reason for a connection without one.
pub const NO_IDENTITY: &str = "no_identity";

/// How `stat` groups its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// By destination service, over every source pod.
    Service,
    /// By source pod, over every destination (or the one `to` names).
    Pod,
}

impl std::str::FromStr for By {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "service" | "services" | "svc" => Ok(By::Service),
            "pod" | "pods" | "po" => Ok(By::Pod),
            _ => Err(format!("by={s:?}: use service or pod")),
        }
    }
}

/// The golden metrics of one row, for any grouping.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Golden {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    /// `successes / requests`, absent without requests.
    pub success_rate: Option<f64>,
    /// Requests per second over the window.
    pub rps: f64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// Attempts beyond the first.
    pub retries: u64,
    /// Requests that took more than one attempt.
    pub retried_requests: u64,
    /// Requests whose retry the retry budget refused: the budget ran out.
    #[serde(default)]
    pub budget_exhausted: u64,
    /// TCP connections open now.
    pub tcp_open: u64,
    /// TCP connections opened in the window.
    pub tcp_opened: u64,
}

impl Golden {
    fn of(s: &Summary, seconds: f64) -> Golden {
        let c = &s.counts;
        Golden {
            requests: c.requests,
            successes: c.successes,
            failures: c.requests - c.successes,
            success_rate: s.success_rate(),
            rps: if seconds > 0.0 {
                c.requests as f64 / seconds
            } else {
                0.0
            },
            latency_ms_p50: s.latency_ms(0.5),
            latency_ms_p95: s.latency_ms(0.95),
            latency_ms_p99: s.latency_ms(0.99),
            retries: c.retries,
            retried_requests: c.retried_requests,
            budget_exhausted: c.budget_exhausted,
            tcp_open: c.open,
            tcp_opened: c.tcp_opened,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatRow {
    pub name: String,
    /// Meshed/total pods: for a pod `1/1` or `0/1`, for a service its
    /// endpoints whose traffic an agent proxies (see `admin::meshed`).
    pub meshed: Option<String>,
    #[serde(flatten)]
    pub golden: Golden,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatReport {
    pub by: By,
    /// The `--to` filter, if any.
    pub to: Option<String>,
    /// The window asked for, e.g. `1m`.
    pub window: String,
    /// The span the counts cover (see the stats module).
    pub window_seconds: f64,
    pub rows: Vec<StatRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteRow {
    pub route: String,
    pub service: String,
    #[serde(flatten)]
    pub golden: Golden,
    /// The route's requests by the backend service it sent them to
    /// (Linkerd's per-leaf stats of a traffic split): every declared
    /// backend, and any other that had traffic in the window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendRow>,
}

/// One backend of a route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRow {
    pub backend: String,
    /// Its weight in the route (absent for a backend no longer declared).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Its share of the route's requests in the window.
    #[serde(default)]
    pub share: Option<f64>,
    /// The backend has no endpoints (or is no service): the proxy answers
    /// its requests 503.
    #[serde(default)]
    pub no_endpoints: bool,
    #[serde(flatten)]
    pub golden: Golden,
}

/// A route's declared backend: its name, weight, and whether it has no
/// endpoints.
pub struct DeclaredBackend {
    pub name: String,
    pub weight: u32,
    pub no_endpoints: bool,
}

/// The backend rows of `service`'s `route` from a backend window
/// ([`crate::telemetry::stats::Stats::backend_window`]).
pub fn route_backends(
    w: &Window,
    service: &str,
    route: &str,
    declared: &[DeclaredBackend],
) -> Vec<BackendRow> {
    let seconds = w.covered.as_secs_f64();
    let mut sums = group(w, std::iter::empty::<String>(), |k| {
        (k.pod == service && k.route.as_deref() == Some(route)).then(|| k.dst.clone())
    });
    let total: u64 = sums.values().map(|s| s.counts.requests).sum();
    let named: Vec<_> = declared
        .iter()
        .map(|d| {
            let s = sums.remove(&d.name).unwrap_or_default();
            (d.name.clone(), Some(d.weight), d.no_endpoints, s)
        })
        .collect();
    let mut rows: Vec<BackendRow> = named
        .into_iter()
        .chain(sums.into_iter().map(|(name, s)| (name, None, false, s)))
        .map(|(backend, weight, no_endpoints, s)| BackendRow {
            backend,
            weight,
            share: (total > 0).then(|| s.counts.requests as f64 / total as f64),
            no_endpoints,
            golden: Golden::of(&s, seconds),
        })
        .collect();
    rows.sort_by(|a, b| {
        b.weight
            .cmp(&a.weight)
            .then_with(|| a.backend.cmp(&b.backend))
    });
    rows
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutesReport {
    pub service: String,
    pub window: String,
    pub window_seconds: f64,
    pub rows: Vec<RouteRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeRow {
    pub src: String,
    pub dst: String,
    /// The source pod's workload identity (when mTLS is configured) and
    /// the destination's (the identity its endpoints declare, when they
    /// all declare the same one).
    pub src_id: Option<String>,
    pub dst_id: Option<String>,
    /// How the window's requests travelled: `true` (all through the mTLS
    /// tunnel), `no_identity` (none), or `partial` (some).
    pub tls: String,
    #[serde(flatten)]
    pub golden: Golden,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgesReport {
    pub window: String,
    pub window_seconds: f64,
    pub rows: Vec<EdgeRow>,
}

/// Sums the window's edges under the names `group` gives them (`None`
/// leaves an edge out), adding `always` with zero counts when absent.
fn group<K: Ord + Clone>(
    w: &Window,
    always: impl IntoIterator<Item = K>,
    group: impl Fn(&EdgeKey) -> Option<K>,
) -> BTreeMap<K, Summary> {
    let mut out: BTreeMap<K, Summary> = always
        .into_iter()
        .map(|k| (k, Summary::default()))
        .collect();
    for (key, s) in &w.edges {
        if let Some(k) = group(key) {
            out.entry(k).or_default().add(s);
        }
    }
    out
}

/// `stat`: one row per service (every service in `services` and every
/// destination with traffic) or per pod (every pod in `pods` and every
/// source with traffic), limited to traffic to `to` when given.
pub fn stat(
    w: &Window,
    by: By,
    to: Option<&str>,
    services: &[String],
    pods: &[String],
) -> Vec<StatRow> {
    let seconds = w.covered.as_secs_f64();
    let wanted = |k: &EdgeKey| to.is_none_or(|t| k.dst == t);
    let rows = match by {
        By::Service => group(
            w,
            services
                .iter()
                .filter(|s| to.is_none_or(|t| *s == t))
                .cloned(),
            |k| wanted(k).then(|| k.dst.clone()),
        ),
        By::Pod => group(w, pods.iter().cloned(), |k| {
            wanted(k).then(|| k.pod.clone())
        }),
    };
    rows.into_iter()
        .map(|(name, s)| StatRow {
            meshed: (by == By::Pod)
                .then(|| if pods.contains(&name) { "1/1" } else { "-" }.to_string()),
            name,
            golden: Golden::of(&s, seconds),
        })
        .collect()
}

/// `routes`: one row per route of `service` (those in `routes`, which
/// lists the declared ones and `[DEFAULT]`, then any other with traffic).
pub fn routes(w: &Window, service: &str, routes: &[String]) -> Vec<RouteRow> {
    let seconds = w.covered.as_secs_f64();
    let mut sums = group(w, std::iter::empty::<String>(), |k| {
        (k.dst == service).then(|| k.route.clone()).flatten()
    });
    let declared: Vec<(String, Summary)> = routes
        .iter()
        .map(|r| (r.clone(), sums.remove(r).unwrap_or_default()))
        .collect();
    declared
        .into_iter()
        .chain(sums)
        .map(|(route, s)| RouteRow {
            route,
            service: service.to_string(),
            golden: Golden::of(&s, seconds),
            backends: Vec::new(),
        })
        .collect()
}

/// `edges`: one row per source pod and destination with traffic in the
/// window (requests over every route, and TCP connections). `identity`
/// names a pod's or a destination's workload identity, if it has one.
pub fn edges(w: &Window, identity: impl Fn(&str) -> Option<String>) -> Vec<EdgeRow> {
    let seconds = w.covered.as_secs_f64();
    group(w, std::iter::empty(), |k| {
        Some((k.pod.clone(), k.dst.clone()))
    })
    .into_iter()
    .map(|((src, dst), s)| {
        let c = &s.counts;
        let tls = if c.requests > 0 && c.tls_requests == c.requests {
            "true"
        } else if c.tls_requests > 0 {
            "partial"
        } else {
            NO_IDENTITY
        };
        EdgeRow {
            src_id: identity(&src),
            dst_id: identity(&dst),
            src,
            dst,
            tls: tls.to_string(),
            golden: Golden::of(&s, seconds),
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::stats::{Outcome, Stats};
    use std::time::{Duration, Instant};

    /// A 10 ms request, plaintext, no retries.
    fn out(success: bool) -> Outcome {
        Outcome {
            success,
            latency: Duration::from_millis(10),
            retries: 0,
            budget_exhausted: false,
            tls: false,
        }
    }

    fn world() -> Window {
        let stats = Stats::new(64);
        for (pod, svc, route, n, fail) in [
            ("a", "web", "api", 6, 1),
            ("a", "web", "[DEFAULT]", 4, 0),
            ("b", "web", "api", 10, 5),
            ("b", "db", "[DEFAULT]", 2, 0),
        ] {
            let e = stats.request_edge(pod, svc, route);
            for i in 0..n {
                stats.record(&e, out(i >= fail));
            }
        }
        let conn = stats.connection("a", "web");
        std::mem::forget(conn);
        stats.window(Duration::from_secs(60), Instant::now())
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stat_by_service_sums_every_source() {
        let w = world();
        let services = names(&["web", "db", "idle"]);
        let rows = stat(&w, By::Service, None, &services, &[]);
        let get = |n: &str| rows.iter().find(|r| r.name == n).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(get("web").golden.requests, 20);
        assert_eq!(get("web").golden.failures, 6);
        assert_eq!(get("web").golden.tcp_open, 1);
        assert_eq!(get("web").meshed, None);
        assert_eq!(get("db").golden.requests, 2);
        assert_eq!(get("idle").golden.requests, 0);
        assert_eq!(get("idle").golden.success_rate, None);
    }

    #[test]
    fn stat_by_pod_filters_by_destination() {
        let w = world();
        let pods = names(&["a", "b"]);
        let rows = stat(&w, By::Pod, Some("web"), &[], &pods);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "a");
        assert_eq!(rows[0].golden.requests, 10);
        assert_eq!(rows[0].meshed.as_deref(), Some("1/1"));
        assert_eq!(rows[1].golden.requests, 10);
        assert_eq!(rows[1].golden.success_rate, Some(0.5));
    }

    #[test]
    fn routes_list_declared_routes_first_then_others() {
        let w = world();
        let declared = names(&["api", "idle", "[DEFAULT]"]);
        let rows = routes(&w, "web", &declared);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.route.as_str(), r.golden.requests))
            .collect();
        assert_eq!(got, [("api", 16), ("idle", 0), ("[DEFAULT]", 4)]);
    }

    #[test]
    fn edges_join_requests_and_connections() {
        let w = world();
        let rows = edges(&w, |name| {
            (name == "a").then(|| "spiffe://cluster.local/ns/default/sa/a".to_string())
        });
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.src.as_str(),
                    r.dst.as_str(),
                    r.golden.requests,
                    r.golden.tcp_open,
                )
            })
            .collect();
        assert_eq!(
            got,
            [("a", "web", 10, 1), ("b", "db", 2, 0), ("b", "web", 10, 0)]
        );
        assert!(rows.iter().all(|r| r.tls == NO_IDENTITY));
        assert_eq!(
            rows[0].src_id.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/a")
        );
        assert_eq!(rows[1].src_id, None);
    }

    #[test]
    fn backends_of_a_route_have_shares_and_the_empty_one_is_marked() {
        let stats = Stats::new(64);
        for i in 0..10 {
            let (backend, ok) = if i < 7 {
                ("shop-v1", true)
            } else {
                ("shop-v2", false)
            };
            stats.record(&stats.backend_edge("shop", "split", backend), out(ok));
        }
        // Another route's traffic, and an old backend no longer declared.
        stats.record(&stats.backend_edge("shop", "[DEFAULT]", "shop"), out(true));
        stats.record(&stats.backend_edge("shop", "split", "shop-v0"), out(true));
        let w = stats.backend_window(Duration::from_secs(60), Instant::now());
        let declared = [
            DeclaredBackend {
                name: "shop-v1".into(),
                weight: 90,
                no_endpoints: false,
            },
            DeclaredBackend {
                name: "shop-v2".into(),
                weight: 10,
                no_endpoints: true,
            },
            DeclaredBackend {
                name: "shop-v3".into(),
                weight: 0,
                no_endpoints: false,
            },
        ];
        let rows = route_backends(&w, "shop", "split", &declared);
        let view: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.backend.as_str(),
                    r.weight,
                    r.golden.requests,
                    r.share.map(|s| (s * 100.0).round() as u32),
                    r.golden.success_rate,
                    r.no_endpoints,
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                ("shop-v1", Some(90), 7, Some(64), Some(1.0), false),
                ("shop-v2", Some(10), 3, Some(27), Some(0.0), true),
                ("shop-v3", Some(0), 0, Some(0), None, false),
                ("shop-v0", None, 1, Some(9), Some(1.0), false),
            ]
        );
    }
}
