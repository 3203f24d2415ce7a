//! Retry: whether a failed attempt goes again (before asking the budget),
//! with the request body it needs and the back-off between attempts.
//! Only what the route's policy lists is retried, only while the body can
//! be replayed and the deadline has not passed, and only when repeating is
//! safe: an idempotent method, a connection the endpoint never saw, or a
//! gRPC status the route lists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Body;
use tracing::debug;

use super::timeout::Deadline;
use crate::discovery::RoutePolicy;
use crate::http::body::ProxyBody;
use crate::http::budget::BufferBudget;
use crate::http::replay::ReplayBody;
use crate::retry::{Outcome, is_idempotent};

/// What happens after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// The response (or failure) goes to the client.
    Done,
    Retry,
    /// Retryable, but the service's retry budget is spent.
    BudgetExhausted,
    /// Retryable, but the route's attempts are used up.
    AttemptsExhausted,
}

/// The request body: streamed once, or replayable for retries.
pub(super) enum RequestBody {
    Stream(Option<ProxyBody>),
    Replay(ReplayBody<ProxyBody>),
}

impl RequestBody {
    /// Replayable when the route retries and the body may fit the copy
    /// kept for it (charged to `pod` in the node-wide buffer budget).
    pub fn new(
        route: &RoutePolicy,
        body: ProxyBody,
        limit: usize,
        budget: &Arc<BufferBudget>,
        pod: &str,
    ) -> Self {
        match &route.retry {
            Some(_) if may_fit(&body, limit) => {
                RequestBody::Replay(ReplayBody::new(body, limit, budget.account(pod)))
            }
            _ => RequestBody::Stream(Some(body)),
        }
    }

    /// The body for the next attempt; `None` once a streamed body is sent.
    pub fn next(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Stream(b) => b.take(),
            RequestBody::Replay(b) => Some(b.replay().boxed()),
        }
    }

    /// Whether this body goes out once at most: no copy is kept, so the
    /// request cannot be tried again and its parts need not be kept either.
    pub fn is_single(&self) -> bool {
        matches!(self, RequestBody::Stream(_))
    }

    fn can_replay(&self) -> bool {
        match self {
            RequestBody::Stream(_) => false,
            RequestBody::Replay(b) => b.can_replay(),
        }
    }
}

/// Whether a body may fit the replay buffer: not known to be larger.
fn may_fit(body: &ProxyBody, limit: usize) -> bool {
    body.is_end_stream() || body.size_hint().lower() <= limit as u64
}

/// Whether attempt number `attempt`, which ended as `observed` (`None`: a
/// success), is retried, before asking the budget.
pub(super) fn decide(
    route: &RoutePolicy,
    attempt: u32,
    body: &RequestBody,
    method: &http::Method,
    observed: Option<Outcome>,
    deadline: &Deadline,
) -> Decision {
    let (Some(policy), Some(observed)) = (&route.retry, observed) else {
        return Decision::Done;
    };
    // Every gRPC call is a POST; a gRPC status is the server's own
    // verdict, and a route that lists that code (e.g. `unavailable`)
    // declares the call safe to repeat, as Linkerd's and Envoy's gRPC
    // retry policies do.
    let safe = is_idempotent(method)
        || observed == Outcome::ConnectFailure
        || matches!(observed, Outcome::GrpcStatus(_));
    let retryable = body.can_replay()
        && safe
        && !deadline.passed(Instant::now())
        && policy.on.iter().any(|c| c.applies_to(observed));
    if !retryable {
        Decision::Done
    } else if attempt > policy.attempts {
        Decision::AttemptsExhausted
    } else {
        Decision::Retry
    }
}

/// Waits the policy's back-off before attempt `attempt + 1`, never past
/// the deadline.
pub(super) async fn back_off(
    route: &RoutePolicy,
    attempt: u32,
    deadline: &Deadline,
    observed: Option<Outcome>,
    addr: SocketAddr,
) {
    let Some(policy) = &route.retry else {
        return;
    };
    let delay = deadline.clamp(
        policy.backoff.delay(attempt, rand::random::<f64>()),
        Instant::now(),
    );
    debug!(attempt, ?observed, ?delay, %addr, "retrying");
    tokio::time::sleep(delay).await;
}
