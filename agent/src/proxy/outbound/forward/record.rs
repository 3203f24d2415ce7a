//! Record: what an attempt taught, written down where each reader looks —
//! the balancer's latency estimate and the endpoint's last error (connect
//! time kept apart from latency: see `balance`, "New endpoints"), the
//! connection table (`waymark conns`), tap's `end` event and the trace —
//! and the retry metrics for what was decided after it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::Response;

use super::attempt::{Attempt, Used};
use super::retry::Decision;
use super::{ConnCtx, HttpProxy, Target};
use crate::balance::Pick;
use crate::diagnostics::tap;
use crate::discovery::Endpoint;
use crate::http::body::ProxyBody;
use crate::http::errors::ProxyError;
use crate::http::pool::Key;
use crate::retry::Outcome;
use crate::telemetry::http_metrics::HttpMetrics;
use crate::telemetry::trace;

/// How an attempt ended for the retry stage (`None`: a success) and for
/// the client (the endpoint's response, or the proxy's error and detail).
pub(super) type Recorded = (
    Option<Outcome>,
    Result<Response<ProxyBody>, (ProxyError, String)>,
);

/// Records attempt `outcome` on the endpoint `pick` (reached by `key`),
/// which ran from `started` to `ended` over the connection `used`, for the request whose
/// extensions are `extensions`; completing the pick ends the attempt's
/// in-flight count.
#[allow(clippy::too_many_arguments)] // each is one thing the attempt touched
pub(super) fn attempt(
    proxy: &HttpProxy,
    ctx: &ConnCtx,
    target: Target<'_>,
    pick: Pick<'_, Endpoint>,
    key: &Key,
    used: &Used,
    (started, ended): (Instant, Instant),
    outcome: Attempt,
    extensions: &http::Extensions,
) -> Recorded {
    let addr = key.addr;
    let split =
        (target.backend.name != target.service.name).then_some(target.backend.name.as_str());
    ctx.live.set_upstream(
        split,
        addr,
        key.path.peer_identity(),
        used.local.map(|l| (l, addr)),
    );
    if let Some(l) = used.local {
        tap::upstream_connection(extensions, l, addr, proxy.kernel.as_ref());
        trace::record(extensions, |t| t.upstream = Some((l, addr)));
    }
    // The latency sample starts once a connection is had: setup is
    // recorded on its own.
    let stats = pick.stats();
    let elapsed = ended.saturating_duration_since(started);
    let elapsed = match used.connect {
        Some(took) => {
            stats.record_connect(took);
            elapsed.saturating_sub(took)
        }
        None => elapsed,
    };
    match outcome {
        Attempt::Response(resp) => {
            let observed = observed_in(&resp);
            let status = resp.status();
            trace::record(extensions, |t| {
                t.attempts.push(trace::AttemptRecord {
                    endpoint: addr,
                    result: status.as_u16().to_string(),
                })
            });
            let failed = status.is_server_error();
            if failed {
                let error = format!("the endpoint answered {}", status.as_u16());
                stats.record_error(SystemTime::now(), &error);
            }
            pick.complete(ended, elapsed, !failed);
            (observed, Ok(resp))
        }
        Attempt::Failed {
            error,
            detail,
            observed,
        } => {
            stats.record_error(SystemTime::now(), &detail);
            pick.complete(ended, elapsed, false);
            trace::record(extensions, |t| {
                t.attempts.push(trace::AttemptRecord {
                    endpoint: addr,
                    result: detail.clone(),
                })
            });
            (Some(observed), Err((error, detail)))
        }
    }
}

/// Counts what was decided after attempt `attempt` (`observed`: how it
/// ended) in `waymark_retries_total`.
pub(super) fn decision(
    metrics: &HttpMetrics,
    target: Target<'_>,
    decision: Decision,
    attempt: u32,
    observed: Option<Outcome>,
) {
    let outcome = match decision {
        Decision::Retry => "retried",
        Decision::BudgetExhausted => "budget_exhausted",
        Decision::AttemptsExhausted => "attempts_exhausted",
        Decision::Done if attempt > 1 && observed.is_none() => "recovered",
        Decision::Done => return,
    };
    metrics.retry(&target.service.name, target.route_name, outcome);
}

/// What a response says for retry purposes; `None` is a success.
fn observed_in<B>(resp: &Response<B>) -> Option<Outcome> {
    if let Some(code) = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        && code != 0
    {
        return Some(Outcome::GrpcStatus(code));
    }
    resp.status()
        .is_server_error()
        .then(|| Outcome::Status(resp.status().as_u16()))
}

/// What the kernel counted on the upstream connection (local, peer) of a
/// traced request.
pub(super) fn kernel_line(
    kernel: Option<&Arc<crate::kernel::KernelDiag>>,
    upstream: Option<(SocketAddr, SocketAddr)>,
) -> Option<trace::KernelFlow> {
    let (local, peer) = upstream?;
    let counters = kernel?.flow_counters(local, peer).unwrap_or_default();
    Some(trace::KernelFlow {
        local,
        peer,
        drops: counters.drops,
        retransmits: counters.retransmits,
    })
}
