//! `GET /endpoints[?service=NAME]`: every endpoint of a service as the
//! balancer sees it right now (Linkerd's `diagnostics endpoints`, plus
//! what the balancer knows): where it is (address, node, pod, zone,
//! identity), how it is reached (directly or through the mTLS tunnel), its
//! weight, latency estimate and requests in flight, its recent successes
//! and failures, whether and why it is ejected and until when, and its last
//! error with the time. `waymark endpoints` prints it; `waymark check`
//! warns about the endpoints it shows failing or ejected.
//!
//! The agent serializes and the CLI parses the same types.

use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::AdminState;
use super::stats::{Answer, Query, json};
use crate::balance::{EndpointView, RECENT_WINDOW};
use crate::config::Config;
use crate::discovery::Endpoint;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointsReport {
    /// How far back `recent_*` counts reach, seconds.
    pub window_s: u64,
    pub services: Vec<ServiceEndpoints>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceEndpoints {
    pub service: String,
    pub endpoints: Vec<EndpointRow>,
}

/// The last error of an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    /// RFC 3339, seconds.
    pub at: String,
    /// How long before the report, ms.
    pub ago_ms: u64,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub addr: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub pod: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub identity: Option<String>,
    pub weight: u32,
    pub ewma_ms: f64,
    /// Latency samples behind `ewma_ms`; 0: no answer yet, and `ewma_ms`
    /// is the prior, which the balancer does not use while `new`.
    #[serde(default)]
    pub latency_samples: u64,
    /// New: P2C prefers it while it has nothing in flight, until it has
    /// answered twice or failed once (docs/endpoints.md).
    #[serde(default)]
    pub new: bool,
    /// P2C comparisons it lost since it was last chosen; `ewma_ms` is
    /// divided by `1 + passed_over / 10` for them (docs/endpoints.md).
    #[serde(default)]
    pub passed_over: u32,
    /// Connections made to it for requests. Their setup (TCP connect;
    /// through the tunnel, the `CONNECT` exchange and any TLS handshake;
    /// the HTTP handshake) is timed here and never counted in `ewma_ms`.
    #[serde(default)]
    pub connects: u64,
    /// Setup time of the last connection, ms.
    #[serde(default)]
    pub connect_last_ms: Option<f64>,
    #[serde(default)]
    pub connect_mean_ms: Option<f64>,
    /// The slowest setup so far (a TLS handshake, typically), ms.
    #[serde(default)]
    pub connect_max_ms: Option<f64>,
    pub in_flight: usize,
    pub recent_successes: u64,
    pub recent_failures: u64,
    /// `ok`, `ejected` (out until `ejected_until`) or `probation` (the
    /// ejection expired; the next request to it is a probe).
    pub state: String,
    /// RFC 3339, seconds; only while ejected.
    #[serde(default)]
    pub ejected_until: Option<String>,
    /// Time left of the ejection, ms.
    #[serde(default)]
    pub ejected_for_ms: Option<u64>,
    /// Why it was last ejected (kept after it came back).
    #[serde(default)]
    pub ejection_reason: Option<String>,
    pub ejections_total: u64,
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// Reached through the mTLS tunnel (for sources with an identity).
    pub tunnel: bool,
    /// Why not, when `tunnel` is false.
    #[serde(default)]
    pub direct_because: Option<String>,
}

pub fn report(state: &AdminState, q: &Query) -> Answer {
    q.only(&["service"])?;
    let table = state.discovery.current();
    let config = state
        .config
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // One service is looked up, not found in a sorted list of all: a
    // cluster has thousands, and tools poll one while a change lands.
    let services: Vec<_> = match q.get("service") {
        Some(name) => table.by_name(name).into_iter().collect(),
        None => {
            let mut all: Vec<_> = table.services().collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            all
        }
    };
    if let Some(name) = q.get("service")
        && services.is_empty()
    {
        let mut known: Vec<&str> = table.services().map(|s| s.name.as_str()).collect();
        known.sort_unstable();
        return Err((
            http::StatusCode::NOT_FOUND,
            format!(
                "no service {name:?} on this agent; its services: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    let (now, wall) = (Instant::now(), SystemTime::now());
    let report = EndpointsReport {
        window_s: RECENT_WINDOW.as_secs(),
        services: services
            .iter()
            .map(|s| ServiceEndpoints {
                service: s.name.clone(),
                endpoints: s
                    .balancer
                    .entries()
                    .map(|(e, stats)| row(e, &stats.view(now), now, wall, path(&config, e)))
                    .collect(),
            })
            .collect(),
    };
    json(&report)
}

/// Whether a source with an identity reaches `e` through the tunnel, and
/// why not otherwise (the rule of `transport::upstream`).
fn path(config: &Config, e: &Endpoint) -> Result<(), &'static str> {
    if config.identity.is_none() {
        return Err("mTLS is off");
    }
    match e.node.as_deref() {
        None => Err("its node is unknown"),
        Some(n) if n == config.node.name => Err("same node"),
        Some(n) if config.nodes.iter().any(|x| x.name == n) => Ok(()),
        Some(_) => Err("its node is not in [[nodes]]"),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn fractional_ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn row(
    e: &Endpoint,
    v: &EndpointView,
    now: Instant,
    wall: SystemTime,
    path: Result<(), &'static str>,
) -> EndpointRow {
    let left = v.ejected_until.map(|u| u.saturating_duration_since(now));
    EndpointRow {
        addr: e.addr.to_string(),
        node: e.node.as_deref().map(String::from),
        pod: e.pod.as_deref().map(String::from),
        zone: e.zone.as_deref().map(String::from),
        identity: e.identity.as_deref().map(String::from),
        weight: e.weight,
        ewma_ms: fractional_ms(v.ewma),
        latency_samples: v.samples,
        new: v.warming,
        passed_over: v.passed_over,
        connects: v.connects.total,
        connect_last_ms: v.connects.last.map(fractional_ms),
        connect_mean_ms: v.connects.mean().map(fractional_ms),
        connect_max_ms: v.connects.max.map(fractional_ms),
        in_flight: v.in_flight,
        recent_successes: v.recent.successes,
        recent_failures: v.recent.failures,
        state: match (left, v.on_probation) {
            (Some(_), _) => "ejected",
            (None, true) => "probation",
            (None, false) => "ok",
        }
        .to_string(),
        ejected_until: left.map(|l| rfc3339(wall + l)),
        ejected_for_ms: left.map(millis),
        ejection_reason: v.ejection_reason.clone(),
        ejections_total: v.ejections_total,
        last_error: v.last_error.as_ref().map(|(at, error)| LastError {
            at: rfc3339(*at),
            ago_ms: wall.duration_since(*at).map(millis).unwrap_or(0),
            error: error.clone(),
        }),
        tunnel: path.is_ok(),
        direct_because: path.err().map(str::to_string),
    }
}

/// What `waymark check` warns about: endpoints ejected now, or that failed
/// in the last window, each named with its service and last error.
pub fn warnings(report: &EndpointsReport) -> Vec<String> {
    let mut out = Vec::new();
    for s in &report.services {
        for e in &s.endpoints {
            let who = match &e.pod {
                Some(p) => format!("service {} endpoint {} (pod {p})", s.service, e.addr),
                None => format!("service {} endpoint {}", s.service, e.addr),
            };
            let last = e
                .last_error
                .as_ref()
                .map(|l| format!("; last error {}s ago: {}", l.ago_ms / 1000, l.error))
                .unwrap_or_default();
            if e.state == "ejected" {
                out.push(format!(
                    "{who} is ejected for {}s more ({}){last}",
                    e.ejected_for_ms.unwrap_or(0).div_ceil(1000),
                    e.ejection_reason.as_deref().unwrap_or("failures")
                ));
            } else if e.recent_failures > 0 {
                out.push(format!(
                    "{who} failed {} of {} requests in the last {}s{last}",
                    e.recent_failures,
                    e.recent_failures + e.recent_successes,
                    report.window_s
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::{BalanceConfig, EndpointStats};

    fn endpoint() -> Endpoint {
        Endpoint {
            addr: "10.2.0.250:8080".parse().unwrap(),
            node: Some("node1".into()),
            weight: 1,
            zone: Some("z1".into()),
            identity: None,
            pod: Some("default/gone-1".into()),
        }
    }

    #[test]
    fn a_failing_endpoint_is_shown_ejected_with_its_last_error_and_warned_about() {
        let t0 = Instant::now();
        let config = BalanceConfig::default();
        let stats = EndpointStats::new(t0, &config);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // Five connect failures (through the public surface: a balancer of
        // one endpoint).
        let balancer = crate::balance::Balancer::with_stats(
            vec![(endpoint(), std::sync::Arc::new(stats))],
            config,
        );
        for _ in 0..5 {
            let pick = balancer.pick(t0).unwrap();
            pick.stats()
                .record_error(wall - Duration::from_secs(2), "no route to host");
            pick.complete(t0, Duration::from_millis(3000), false);
        }
        let (e, stats) = balancer.entries().next().unwrap();
        let now = t0 + Duration::from_secs(2);
        let r = row(e, &stats.view(now), now, wall, Err("same node"));
        assert_eq!(r.addr, "10.2.0.250:8080");
        assert_eq!(r.pod.as_deref(), Some("default/gone-1"));
        assert_eq!((r.recent_successes, r.recent_failures), (0, 5));
        assert_eq!(r.state, "ejected");
        assert_eq!(r.ejected_for_ms, Some(3000));
        assert_eq!(r.ejected_until.as_deref(), Some("2023-11-14T22:13:23Z"));
        assert_eq!(r.ejection_reason.as_deref(), Some("5 consecutive failures"));
        let last = r.last_error.clone().unwrap();
        assert_eq!(
            (last.at.as_str(), last.ago_ms, last.error.as_str()),
            ("2023-11-14T22:13:18Z", 2000, "no route to host")
        );
        assert!(!r.tunnel);
        assert_eq!(r.direct_because.as_deref(), Some("same node"));

        let report = EndpointsReport {
            window_s: 60,
            services: vec![ServiceEndpoints {
                service: "gone".into(),
                endpoints: vec![r.clone()],
            }],
        };
        let back: EndpointsReport =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back, report);
        assert_eq!(
            warnings(&report),
            [
                "service gone endpoint 10.2.0.250:8080 (pod default/gone-1) is ejected for 3s more (5 consecutive failures); last error 2s ago: no route to host"
            ]
        );
        // Back in service but failing lately: still named.
        let mut failing = r;
        failing.state = "ok".into();
        failing.pod = None;
        failing.last_error = None;
        failing.recent_successes = 15;
        let report = EndpointsReport {
            window_s: 60,
            services: vec![ServiceEndpoints {
                service: "gone".into(),
                endpoints: vec![failing],
            }],
        };
        assert_eq!(
            warnings(&report),
            ["service gone endpoint 10.2.0.250:8080 failed 5 of 20 requests in the last 60s"]
        );
    }

    #[test]
    fn a_healthy_endpoint_is_ok_and_not_warned_about() {
        let t0 = Instant::now();
        let stats = EndpointStats::new(t0, &BalanceConfig::default());
        let r = row(&endpoint(), &stats.view(t0), t0, SystemTime::now(), Ok(()));
        assert_eq!(
            (r.state.as_str(), r.tunnel, r.last_error.clone()),
            ("ok", true, None)
        );
        let report = EndpointsReport {
            window_s: 60,
            services: vec![ServiceEndpoints {
                service: "web".into(),
                endpoints: vec![r],
            }],
        };
        assert!(warnings(&report).is_empty());
    }
}
