//! `GET /conns[?pod=&src=&dst=&proto=&service=&direction=]`: the
//! connections the agent carries now (`telemetry::conns`), filtered, each
//! with what the kernel counted on its TCP connections when the kernel
//! diagnostics run. `waymark conns` prints it.

use http::StatusCode;

use super::AdminState;
use super::stats::{Answer, json};
use crate::http::query;
use crate::telemetry::conns::{ConnFilter, ConnsReport};

pub fn report(state: &AdminState, raw: Option<&str>) -> Answer {
    let pairs = query::pairs(raw.unwrap_or(""))
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad query: {e}")))?;
    let filter = ConnFilter::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let all = state.conns.connections();
    let kernel = state.kernel.as_deref();
    let counters = |local, peer| {
        kernel
            .and_then(|k| k.flow_counters(local, peer))
            .unwrap_or_default()
    };
    let connections = all
        .iter()
        .filter_map(|c| {
            let mut row = c.row();
            filter.matches(&row).then(|| {
                if kernel.is_some() {
                    row.kernel = Some(c.kernel_flows(&counters));
                }
                row
            })
        })
        .collect();
    let pod_sockets = state.conns.kernel_sockets().map(|counts| {
        counts
            .into_iter()
            .filter(|(pod, _)| filter.pod.as_ref().is_none_or(|p| p == pod))
            .collect()
    });
    json(&ConnsReport {
        open: all.len(),
        kernel_counters: kernel.is_some(),
        limits: state.conns.limits(),
        pod_sockets,
        connections,
    })
}
