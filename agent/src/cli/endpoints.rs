//! `waymark endpoints [SERVICE]`: every endpoint of a service as the
//! balancer sees it now (the agent's `GET /endpoints`), one row each:
//!
//! ```text
//! SERVICE   ADDRESS            POD              NODE    ZONE   IDENTITY   WEIGHT   EWMA     CONNECT   IN_FLIGHT   OK_1M   FAIL_1M   STATE                                       PATH     LAST_ERROR
//! web       10.2.0.2:8080      default/web-1    node1   -      -          1        0.61ms   0.21ms    0           40      0         ok                                          direct   -
//! web       10.2.0.250:8080    default/web-2    node1   -      -          1        2896ms   -         0           0       5         ejected for 4s: 5 consecutive failures      direct   3s ago: connect to 10.2.0.250:8080: …
//! ```

use anyhow::Result;

use super::Output;
use super::client::{AdminClient, block_on};
use super::table::{ms, render};
use crate::admin::endpoints::{EndpointRow, EndpointsReport};
use crate::http::query;

#[derive(clap::Args, Clone, Debug)]
pub struct EndpointsArgs {
    /// The service (the one pods dial, or a route's backend); every
    /// service without it.
    pub service: Option<String>,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

pub fn run(client: &AdminClient, args: EndpointsArgs) -> Result<()> {
    let path = match &args.service {
        Some(s) => format!("/endpoints?service={}", query::encode(s)),
        None => "/endpoints".to_string(),
    };
    let report: EndpointsReport = block_on(client.get_json(&path))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", table(&report)),
    }
    Ok(())
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_string())
}

/// The estimate, or `new` before the endpoint's first answer (the
/// balancer then prefers it while idle; the prior it shows means nothing).
fn ewma(e: &EndpointRow) -> String {
    if e.new && e.latency_samples == 0 {
        "new".to_string()
    } else {
        ms(Some(e.ewma_ms))
    }
}

fn state(e: &EndpointRow) -> String {
    match e.state.as_str() {
        "ejected" => format!(
            "ejected for {}s: {}",
            e.ejected_for_ms.unwrap_or(0).div_ceil(1000),
            e.ejection_reason.as_deref().unwrap_or("failures")
        ),
        "probation" => "probation (next request probes it)".to_string(),
        s => s.to_string(),
    }
}

pub fn table(report: &EndpointsReport) -> String {
    let ok = format!("OK_{}", window(report.window_s));
    let fail = format!("FAIL_{}", window(report.window_s));
    let rows: Vec<Vec<String>> = report
        .services
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(|e| {
                vec![
                    s.service.clone(),
                    e.addr.clone(),
                    or_dash(&e.pod),
                    or_dash(&e.node),
                    or_dash(&e.zone),
                    or_dash(&e.identity),
                    e.weight.to_string(),
                    ewma(e),
                    ms(e.connect_last_ms),
                    e.in_flight.to_string(),
                    e.recent_successes.to_string(),
                    e.recent_failures.to_string(),
                    state(e),
                    if e.tunnel { "tunnel" } else { "direct" }.to_string(),
                    e.last_error.as_ref().map_or("-".to_string(), |l| {
                        format!("{}s ago: {}", l.ago_ms / 1000, l.error)
                    }),
                ]
            })
        })
        .collect();
    let mut out = render(
        &[
            "SERVICE",
            "ADDRESS",
            "POD",
            "NODE",
            "ZONE",
            "IDENTITY",
            "WEIGHT",
            "EWMA",
            "CONNECT",
            "IN_FLIGHT",
            &ok,
            &fail,
            "STATE",
            "PATH",
            "LAST_ERROR",
        ],
        &rows,
    );
    for s in report.services.iter().filter(|s| s.endpoints.is_empty()) {
        out.push_str(&format!(
            "service {} has no endpoints: requests routed to it are answered 503 by the proxy\n",
            s.service
        ));
    }
    out
}

/// `1M` for 60 s, else `60S`.
fn window(secs: u64) -> String {
    if secs.is_multiple_of(60) {
        format!("{}M", secs / 60)
    } else {
        format!("{secs}S")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::endpoints::{LastError, ServiceEndpoints};

    fn row() -> EndpointRow {
        EndpointRow {
            addr: "10.2.0.250:8080".into(),
            node: Some("node1".into()),
            pod: Some("default/gone-1".into()),
            zone: None,
            identity: None,
            weight: 1,
            ewma_ms: 2896.0,
            latency_samples: 5,
            new: false,
            passed_over: 0,
            connects: 2,
            connect_last_ms: Some(1.5),
            connect_mean_ms: Some(1.0),
            connect_max_ms: Some(1.5),
            in_flight: 0,
            recent_successes: 0,
            recent_failures: 5,
            state: "ejected".into(),
            ejected_until: Some("2023-11-14T22:13:23Z".into()),
            ejected_for_ms: Some(3500),
            ejection_reason: Some("5 consecutive failures".into()),
            ejections_total: 1,
            last_error: Some(LastError {
                at: "2023-11-14T22:13:18Z".into(),
                ago_ms: 2100,
                error: "connect to 10.2.0.250:8080: No route to host".into(),
            }),
            tunnel: false,
            direct_because: Some("same node".into()),
        }
    }

    #[test]
    fn the_table_names_the_endpoint_its_state_and_its_last_error() {
        let report = EndpointsReport {
            window_s: 60,
            services: vec![
                ServiceEndpoints {
                    service: "gone".into(),
                    endpoints: vec![row()],
                },
                ServiceEndpoints {
                    service: "shop-v2".into(),
                    endpoints: vec![],
                },
            ],
        };
        let t = table(&report);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{t}");
        assert!(
            lines[0].contains("OK_1M") && lines[0].contains("FAIL_1M"),
            "{t}"
        );
        assert!(lines[1].starts_with("gone"), "{t}");
        for cell in [
            "10.2.0.250:8080",
            "default/gone-1",
            "node1",
            "2896ms   1.5ms",
            "ejected for 4s: 5 consecutive failures",
            "direct",
            "2s ago: connect to 10.2.0.250:8080: No route to host",
        ] {
            assert!(lines[1].contains(cell), "{cell}: {t}");
        }
        assert_eq!(
            lines[2],
            "service shop-v2 has no endpoints: requests routed to it are answered 503 by the proxy"
        );
        assert_eq!(window(90), "90S");
    }

    #[test]
    fn a_new_endpoint_shows_new_until_it_answers() {
        let mut r = row();
        r.new = true;
        r.latency_samples = 0;
        r.connects = 0;
        r.connect_last_ms = None;
        let report = EndpointsReport {
            window_s: 60,
            services: vec![ServiceEndpoints {
                service: "web".into(),
                endpoints: vec![r.clone()],
            }],
        };
        let t = table(&report);
        assert!(t.lines().nth(1).unwrap().contains(" new "), "{t}");
        r.latency_samples = 1;
        assert_eq!(ewma(&r), "2896ms");
    }
}
