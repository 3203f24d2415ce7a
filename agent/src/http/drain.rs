//! Winding down a served HTTP connection when the agent drains, so that no
//! client sees an error for a request it sends during the drain.
//!
//! HTTP/2 gets a GOAWAY at once: the client opens no new streams here, the
//! streams in flight finish, and a client with more to send opens a new
//! connection (which the kernel hands to the agent that took over).
//!
//! HTTP/1.1 has no such frame, and closing a keep-alive connection races a
//! client that is sending its next request (it reads EOF instead of a
//! response: `wrk` counts a read error, others fail the request). So every
//! response written while draining carries `Connection: close`, after which
//! the client reconnects between requests (RFC 9112 §9.6); only a
//! connection that has carried no request for [`IDLE_CLOSE`] is closed by
//! the agent, since its client is not mid-conversation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderValue, Response, StatusCode, header};
use tokio_util::sync::CancellationToken;

use crate::http::pool::Version;
use crate::wake_gate::Gated;

/// How long an HTTP/1.1 connection must have been without a request, once
/// the drain started, before the agent closes it. Long enough that a client
/// between two requests of a keep-alive exchange has sent the next one (and
/// so gets `Connection: close` with its answer); short enough that idle
/// pooled connections do not hold the drain up.
pub const IDLE_CLOSE: Duration = Duration::from_millis(1000);

/// How often a draining HTTP/1.1 connection checks whether it went idle.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Requests of one served connection: how many are in flight, when the
/// last one arrived, and whether the connection is winding down.
///
/// It carries the agent's drain token and the connection's own reason to
/// wind down (its idle timeout) side by side rather than as a child token
/// of the agent's: a child token is an allocation of its own and an entry
/// in the agent token's list of children, taken and given back under that
/// token's lock, for every connection the agent serves.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds after `base` of the last request's arrival.
    last: AtomicU64,
    /// The agent's drain.
    draining: CancellationToken,
    /// Set once the connection winds down, for either reason (by
    /// [`until_drained`], which watches both). Read per response: a flag of
    /// the connection's own, where asking the agent's token would take its
    /// lock, shared by every connection of the agent, for every response.
    winding_down: AtomicBool,
}

/// A request in flight on its connection (until dropped).
pub struct InFlight(Arc<Activity>);

impl InFlight {
    /// The connection the request came on.
    pub fn activity(&self) -> &Activity {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// A served connection's requests; `draining` is the agent's drain.
    pub fn new(draining: CancellationToken) -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            draining,
            winding_down: AtomicBool::new(false),
        }
    }

    /// Whether the connection is winding down: the agent drains, or the
    /// connection closes of its own accord (idle timeout). Set as soon as
    /// the connection's task sees it; a response that races the start of
    /// the drain goes unmarked, as it would had it been a moment earlier
    /// (the connection is only closed once idle, after a marked response).
    pub fn is_winding_down(&self) -> bool {
        self.winding_down.load(Ordering::Relaxed)
    }

    fn wind_down(&self) {
        self.winding_down.store(true, Ordering::Relaxed);
    }

    /// Counts a request that just arrived.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let now = self.base.elapsed().as_nanos() as u64;
        self.last.store(now, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// How long the connection has been without a request in flight or
    /// arriving; `None` while one is in flight.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        Some(self.base.elapsed().saturating_sub(last))
    }
}

/// Marks an HTTP/1.1 response written while its connection winds down
/// (the agent's drain or the connection's idle timeout) as the connection's
/// last (`Connection: close`: the codec then closes after it, and the client
/// knows to reconnect). HTTP/2 forbids the header (GOAWAY does this job)
/// and a `101` hands the connection over to another protocol.
pub fn mark_last<B>(version: Version, activity: &Activity, resp: &mut Response<B>) {
    if version == Version::Http1
        && activity.is_winding_down()
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Drives a served connection to its end; once the agent drains or
/// `closing` (the connection's own reason to wind down: its idle timeout)
/// resolves, asks it to finish (`shutdown` is its `graceful_shutdown`):
/// HTTP/2 at once (GOAWAY), HTTP/1.1 when it has been idle for
/// [`IDLE_CLOSE`] (until then, [`mark_last`] closes it after its next
/// response).
///
/// The connection is pinned by the caller, so that the caller's future
/// holds it once (a connection's future is the largest part of what an
/// idle connection costs).
///
/// `closing` makes the connection's own reason to wind down. It is made
/// here, where it is polled, rather than passed in made: a future moved
/// through nested `async` blocks keeps a copy in each of their states.
///
/// A plain function returning an `async move` block, not an `async fn`:
/// an `async fn` keeps its arguments twice in its state.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn until_drained<'a, C, T, F, M, S>(
    mut conn: Pin<&'a mut C>,
    version: Version,
    activity: &'a Activity,
    closing: M,
    shutdown: F,
) -> impl Future<Output = T> + 'a
where
    C: Future<Output = T>,
    F: Fn(Pin<&mut C>) + 'a,
    M: FnOnce() -> S + 'a,
    S: Future<Output = ()> + 'a,
    T: 'a,
{
    async move {
        // Both reasons to wind down behind one gate: polled only when one
        // of them fires, not on every wake of the connection (see
        // `crate::wake_gate`), and one gate per connection, not two.
        tokio::select! {
            out = conn.as_mut() => return out,
            _ = Gated::new(async {
                tokio::select! {
                    biased;
                    _ = activity.draining.cancelled() => {}
                    _ = closing() => {}
                }
                activity.wind_down();
            }) => {}
        }
        // Boxed: every served connection waits in the select above for
        // its whole life, and should not carry room for the drain's timer.
        Box::pin(drain(conn, version, activity, shutdown)).await
    }
}

async fn drain<C, T>(
    mut conn: Pin<&mut C>,
    version: Version,
    activity: &Activity,
    shutdown: impl Fn(Pin<&mut C>),
) -> T
where
    C: Future<Output = T>,
{
    if version == Version::Http2 {
        shutdown(conn.as_mut());
        return conn.await;
    }
    loop {
        tokio::select! {
            out = conn.as_mut() => return out,
            _ = tokio::time::sleep(IDLE_POLL) => {
                if activity.idle_for().is_some_and(|idle| idle >= IDLE_CLOSE) {
                    shutdown(conn.as_mut());
                    return conn.await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;

    #[test]
    fn only_http1_responses_while_draining_are_marked_last() {
        let activity = Activity::new(CancellationToken::new());
        let mut resp = Response::new(());
        mark_last(Version::Http1, &activity, &mut resp);
        assert!(resp.headers().get(header::CONNECTION).is_none());
        activity.wind_down();
        mark_last(Version::Http2, &activity, &mut resp);
        assert!(resp.headers().get(header::CONNECTION).is_none());
        mark_last(Version::Http1, &activity, &mut resp);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        let mut upgrade = Response::new(());
        *upgrade.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        mark_last(Version::Http1, &activity, &mut upgrade);
        assert!(upgrade.headers().get(header::CONNECTION).is_none());
    }

    /// Serves a connection that does nothing until asked to stop: not
    /// wound down until `wind` is called, then ended once idle for
    /// `IDLE_CLOSE` (it has been idle since it began), marked draining.
    async fn wound_down_once<M, S>(activity: &Activity, closing: M, wind: impl FnOnce())
    where
        M: FnOnce() -> S,
        S: Future<Output = ()>,
    {
        let stopped = std::cell::Cell::new(false);
        let conn = std::pin::pin!(std::future::poll_fn(|_| {
            if stopped.get() {
                std::task::Poll::Ready("stopped")
            } else {
                std::task::Poll::Pending
            }
        }));
        let served = until_drained(conn, Version::Http1, activity, closing, |_| {
            stopped.set(true)
        });
        let mut served = std::pin::pin!(served);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), served.as_mut())
                .await
                .is_err(),
            "served on while there is no reason to wind down"
        );
        assert!(!activity.is_winding_down());
        wind();
        let out = tokio::time::timeout(IDLE_CLOSE * 5, served).await;
        assert_eq!(out, Ok("stopped"));
        assert!(activity.is_winding_down());
    }

    /// The connection's own reason to close (its idle timeout) drains it
    /// like the agent's drain, and only it: the agent's token stays as it
    /// was, and a connection beside it is not marked.
    #[tokio::test]
    async fn closing_on_its_own_marks_responses_and_ends_an_idle_connection() {
        let agent = CancellationToken::new();
        let (one, other) = (Activity::new(agent.clone()), Activity::new(agent.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let closing = || async {
            let _ = rx.await;
        };
        wound_down_once(&one, closing, || tx.send(()).unwrap()).await;
        assert!(!other.is_winding_down());
        assert!(!agent.is_cancelled());
        let mut resp = Response::new(());
        mark_last(Version::Http1, &one, &mut resp);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }

    /// The agent's drain winds a connection down: its responses are marked
    /// from then on, and an idle one ends.
    #[tokio::test]
    async fn the_agents_drain_marks_responses_and_ends_an_idle_connection() {
        let agent = CancellationToken::new();
        let activity = Activity::new(agent.clone());
        wound_down_once(&activity, pending, || agent.cancel()).await;
        let mut resp = Response::new(());
        mark_last(Version::Http1, &activity, &mut resp);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn a_connection_with_a_request_in_flight_is_not_idle() {
        let activity = Arc::new(Activity::new(CancellationToken::new()));
        let req = activity.begin();
        assert_eq!(activity.idle_for(), None);
        drop(req);
        assert!(activity.idle_for().is_some());
    }
}
