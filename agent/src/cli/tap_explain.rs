//! Why a tap shows nothing (linkerd2#9406, #5611, #3506: "tap shows
//! nothing"). When a filter has matched nothing for [`EXPLAIN_AFTER`],
//! `waymark tap` asks the agent what it knows (its pods and services,
//! `GET /config`) and what it proxied lately (`GET /edges`) and says, on
//! stderr, why the tap may be empty: no such pod or service on this node,
//! the traffic is opaque TCP (shown as `tcp` events only), no requests at
//! all through this agent (they go through another node's agent, or the
//! pods are not enrolled), or the filter excludes everything seen, with
//! counts of what was seen.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::diagnostics::stats_view::EdgeRow;
use crate::telemetry::stats::OTHER;

/// How long a tap waits for a first event before explaining.
pub const EXPLAIN_AFTER: Duration = Duration::from_secs(5);
/// The recent traffic the explanation looks at (`GET /edges?window=`).
pub const SEEN_WINDOW: &str = "10s";

/// What the agent knows and saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// This node's pods.
    pub pods: Vec<String>,
    pub services: Vec<String>,
    /// Traffic in the last [`SEEN_WINDOW`], by source pod and destination.
    pub edges: Vec<EdgeRow>,
}

/// The part of the filter the explanation looks at.
#[derive(Debug, Default)]
pub struct Asked<'a> {
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    /// `--direction in`: `from` is then a peer identity, not a pod here.
    pub inbound: bool,
}

fn is_addr(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok() || s.parse::<std::net::SocketAddr>().is_ok()
}

/// Whether `name` names `pod` as the tap filter does: the pod, or a
/// workload whose pods are `<workload>-…`.
fn names_pod(name: &str, pod: &str) -> bool {
    pod == name || pod.strip_prefix(name).is_some_and(|r| r.starts_with('-'))
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Why the tap may be empty, most specific first.
pub fn explain(asked: &Asked<'_>, seen: &Seen) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(from) = asked.from
        && !asked.inbound
        && !is_addr(from)
        && !seen.pods.iter().any(|p| names_pod(from, p))
    {
        why.push(format!(
            "no pod {from} on this node (its pods: {}): tap shows a pod's outbound requests on the pod's own node, run it there",
            list(&seen.pods)
        ));
    }
    if let Some(to) = asked.to
        && !is_addr(to)
        && !seen.services.iter().any(|s| s == to)
        && !seen.pods.iter().any(|p| names_pod(to, p))
    {
        why.push(format!(
            "no service or pod {to} known to this agent (services: {})",
            list(&seen.services)
        ));
    }
    let edges: Vec<&EdgeRow> = seen
        .edges
        .iter()
        .filter(|e| e.src != OTHER && e.dst != OTHER)
        .collect();
    let requests: u64 = edges.iter().map(|e| e.golden.requests).sum();
    if let Some(to) = asked.to {
        let tcp: u64 = edges
            .iter()
            .filter(|e| e.dst == to && e.golden.requests == 0)
            .map(|e| e.golden.tcp_opened + e.golden.tcp_open)
            .sum();
        if tcp > 0 && !edges.iter().any(|e| e.dst == to && e.golden.requests > 0) {
            why.push(format!(
                "the traffic to {to} is opaque TCP here ({tcp} connections, no HTTP requests in the last {SEEN_WINDOW}): tap shows it as tcp events when each connection closes, matched by --from, --to and --direction only"
            ));
        }
    }
    if requests == 0 {
        if why.is_empty() {
            why.push(format!(
                "this agent proxied no HTTP requests in the last {SEEN_WINDOW}: the clients may be on another node (tap runs per node: run it where the client pods run), or their pods are not enrolled (`waymark stat pod` shows MESHED)"
            ));
        }
        return why;
    }
    // Traffic there was: say what, so the filter can be compared with it.
    let mut by: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for e in edges.iter().filter(|e| e.golden.requests > 0) {
        *by.entry((e.src.as_str(), e.dst.as_str())).or_default() += e.golden.requests;
    }
    let mut seen_list: Vec<((&str, &str), u64)> = by.into_iter().collect();
    seen_list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let shown: Vec<String> = seen_list
        .iter()
        .take(5)
        .map(|((src, dst), n)| format!("{n} from {src} to {dst}"))
        .collect();
    let more = seen_list.len().saturating_sub(5);
    why.push(format!(
        "the filter excludes everything seen: {requests} requests in the last {SEEN_WINDOW} ({}{})",
        shown.join(", "),
        if more > 0 {
            format!(", and {more} more pairs")
        } else {
            String::new()
        }
    ));
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::stats_view::Golden;

    fn edge(src: &str, dst: &str, requests: u64, tcp: u64) -> EdgeRow {
        EdgeRow {
            src: src.into(),
            dst: dst.into(),
            src_id: None,
            dst_id: None,
            tls: "no_identity".into(),
            golden: Golden {
                requests,
                tcp_opened: tcp,
                ..Golden::default()
            },
        }
    }

    fn seen(edges: Vec<EdgeRow>) -> Seen {
        Seen {
            pods: vec!["default/web-1".into(), "default/db-0".into()],
            services: vec!["web".into(), "db".into()],
            edges,
        }
    }

    #[test]
    fn an_unknown_pod_or_service_is_named() {
        let why = explain(
            &Asked {
                from: Some("default/api"),
                to: Some("nope"),
                inbound: false,
            },
            &seen(vec![]),
        );
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why[0].starts_with(
                "no pod default/api on this node (its pods: default/web-1, default/db-0)"
            ),
            "{why:?}"
        );
        assert!(
            why[1].starts_with("no service or pod nope known to this agent (services: web, db)"),
            "{why:?}"
        );
        // A workload name, a known service, addresses and inbound
        // identities are not "unknown".
        for asked in [
            Asked {
                from: Some("default/web"),
                to: Some("db"),
                inbound: false,
            },
            Asked {
                from: Some("10.1.0.2"),
                to: Some("10.2.0.2:8080"),
                inbound: false,
            },
            Asked {
                from: Some("default/client"),
                to: None,
                inbound: true,
            },
        ] {
            let why = explain(&asked, &seen(vec![]));
            assert_eq!(why.len(), 1, "{asked:?}: {why:?}");
            assert!(
                why[0].starts_with("this agent proxied no HTTP requests"),
                "{why:?}"
            );
        }
    }

    #[test]
    fn opaque_traffic_is_told_apart() {
        let why = explain(
            &Asked {
                from: None,
                to: Some("db"),
                inbound: false,
            },
            &seen(vec![edge("default/web-1", "db", 0, 3)]),
        );
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(
            why[0].starts_with("the traffic to db is opaque TCP here (3 connections"),
            "{why:?}"
        );
    }

    #[test]
    fn what_was_seen_is_counted_when_the_filter_excludes_it() {
        let why = explain(
            &Asked {
                from: Some("default/web"),
                to: Some("web"),
                inbound: false,
            },
            &seen(vec![
                edge("default/web-1", "db", 7, 1),
                edge("default/db-0", "web", 2, 1),
                edge(OTHER, OTHER, 50, 0),
            ]),
        );
        assert_eq!(
            why,
            [
                "the filter excludes everything seen: 9 requests in the last 10s (7 from default/web-1 to db, 2 from default/db-0 to web)"
            ]
        );
    }
}
