//! `GET /stat`, `/routes` and `/edges`: the sliding-window golden metrics
//! as JSON, for `waymark stat`, `routes` and `edges` and for scripts.
//!
//! - `/stat?by=service|pod[&to=SERVICE][&window=1m]`
//! - `/routes?service=NAME[&window=1m]`
//! - `/edges[?window=1m]`

use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde::Serialize;

use super::AdminState;
use crate::diagnostics::stats_view::{
    self, By, DeclaredBackend, EdgesReport, RoutesReport, StatReport,
};
use crate::discovery::DEFAULT_ROUTE;
use crate::telemetry::stats::parse_window;

/// The window when a query names none.
pub const DEFAULT_WINDOW: &str = "1m";

/// A handler's answer: JSON, or a status with a message.
pub type Answer = Result<String, (StatusCode, String)>;

/// Query parameters, percent-decoded (`+` is a space).
pub struct Query(Vec<(String, String)>);

impl Query {
    /// A bad escape is the caller's error (400), never a silently
    /// different value.
    pub fn parse(query: Option<&str>) -> Result<Query, (StatusCode, String)> {
        crate::http::query::pairs(query.unwrap_or(""))
            .map(Query)
            .map_err(|e| bad(format!("query: {e}")))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Rejects parameters the endpoint does not know (a typo would
    /// otherwise silently widen the answer).
    pub(super) fn only(&self, known: &[&str]) -> Result<(), (StatusCode, String)> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(bad(format!(
                "unknown parameter {k:?}; this endpoint takes {}",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }

    fn window(&self) -> Result<(String, Duration), (StatusCode, String)> {
        let w = self.get("window").unwrap_or(DEFAULT_WINDOW);
        parse_window(w).map(|d| (w.to_string(), d)).map_err(bad)
    }
}

fn bad(msg: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, msg)
}

pub(super) fn json(v: &impl Serialize) -> Answer {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode: {e}"),
            )
        })
}

fn pods(state: &AdminState) -> Vec<String> {
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    config.pods.iter().map(|p| p.name.clone()).collect()
}

pub fn stat(state: &AdminState, q: &Query) -> Answer {
    q.only(&["by", "to", "window"])?;
    let by: By = q.get("by").unwrap_or("service").parse().map_err(bad)?;
    let (window, d) = q.window()?;
    let to = q.get("to").filter(|t| !t.is_empty());
    let w = state.stats.window(d, Instant::now());
    let services: Vec<String> = state
        .discovery
        .current()
        .services()
        .map(|s| s.name.clone())
        .collect();
    let mut rows = stats_view::stat(&w, by, to, &services, &pods(state));
    super::meshed::fill(state, by, &mut rows);
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    json(&StatReport {
        by,
        to: to.map(str::to_string),
        window,
        window_seconds: w.covered.as_secs_f64(),
        rows,
    })
}

pub fn routes(state: &AdminState, q: &Query) -> Answer {
    q.only(&["service", "window"])?;
    let (window, d) = q.window()?;
    let Some(service) = q.get("service").filter(|s| !s.is_empty()) else {
        return Err(bad("name a service: /routes?service=NAME".into()));
    };
    let table = state.discovery.current();
    let w = state.stats.window(d, Instant::now());
    let declared: Vec<String> = match table.by_name(service) {
        Some(s) => s
            .routes
            .routes()
            .iter()
            .map(|r| r.name.clone())
            .chain([DEFAULT_ROUTE.to_string()])
            .collect(),
        None if w.edges.iter().any(|(k, _)| k.dst == service) => Vec::new(),
        None => {
            let mut known: Vec<_> = table.services().map(|s| s.name.as_str()).collect();
            known.sort_unstable();
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "no service {service:?} and no traffic to it; services: {}",
                    known.join(", ")
                ),
            ));
        }
    };
    let mut rows = stats_view::routes(&w, service, &declared);
    let by_backend = state.stats.backend_window(d, Instant::now());
    for row in &mut rows {
        let policy = table.by_name(service).and_then(|s| {
            if row.route == DEFAULT_ROUTE {
                Some(&s.default_route)
            } else {
                s.routes
                    .routes()
                    .iter()
                    .find(|r| r.name == row.route)
                    .map(|r| &r.value)
            }
        });
        let declared: Vec<DeclaredBackend> = policy
            .map(|p| {
                p.backends
                    .iter()
                    .map(|(name, weight)| DeclaredBackend {
                        name: name.clone(),
                        weight,
                        no_endpoints: table.by_name(name).is_none_or(|b| b.balancer.is_empty()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        row.backends = stats_view::route_backends(&by_backend, service, &row.route, &declared);
    }
    json(&RoutesReport {
        service: service.to_string(),
        window,
        window_seconds: w.covered.as_secs_f64(),
        rows,
    })
}

pub fn edges(state: &AdminState, q: &Query) -> Answer {
    q.only(&["window"])?;
    let (window, d) = q.window()?;
    let w = state.stats.window(d, Instant::now());
    json(&EdgesReport {
        window,
        window_seconds: w.covered.as_secs_f64(),
        rows: stats_view::edges(&w, |name| identity_of(state, name)),
    })
}

/// The workload identity of a pod (from the config, when mTLS is on) or of
/// a service (the identity all its endpoints declare, if they agree).
fn identity_of(state: &AdminState, name: &str) -> Option<String> {
    let config = state.config.read().unwrap_or_else(|e| e.into_inner());
    config.identity.as_ref()?;
    if let Some(pod) = config.pods.iter().find(|p| p.name == name) {
        return pod.identity.clone();
    }
    let svc = config.services.iter().find(|s| s.name == name)?;
    let first = svc.endpoints.first()?.identity.as_deref()?;
    svc.endpoints
        .iter()
        .all(|e| e.identity.as_deref() == Some(first))
        .then(|| first.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let q = Query::parse(Some("service=web%2Dv2&window=30s&x=a+b")).unwrap();
        assert_eq!(q.get("service"), Some("web-v2"));
        assert_eq!(q.get("window"), Some("30s"));
        assert_eq!(q.get("x"), Some("a b"));
        assert!(q.only(&["service"]).is_err());
        assert_eq!(Query::parse(None).unwrap().get("a"), None);
        let (status, msg) = Query::parse(Some("service=%zz")).err().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(msg.contains("bad percent-encoding in \"%zz\""), "{msg}");
    }
}
