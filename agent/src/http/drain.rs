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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Requests of one served connection: how many are in flight and when the
/// last one arrived.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds after `base` of the last request's arrival.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        }
    }
}

/// A request in flight on its connection (until dropped).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
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

/// Marks an HTTP/1.1 response written while draining as the connection's
/// last (`Connection: close`: hyper then closes after it, and the client
/// knows to reconnect). HTTP/2 forbids the header (GOAWAY does this job)
/// and a `101` hands the connection over to another protocol.
pub fn mark_last<B>(version: Version, draining: &CancellationToken, resp: &mut Response<B>) {
    if version == Version::Http1
        && draining.is_cancelled()
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Drives a served connection to its end; once `draining` is cancelled,
/// asks it to finish (`shutdown` is its `graceful_shutdown`): HTTP/2 at
/// once (GOAWAY), HTTP/1.1 when it has been idle for [`IDLE_CLOSE`] (until
/// then, [`mark_last`] closes it after its next response).
///
/// The connection is pinned by the caller, so that the caller's future
/// holds it once (a connection's future is the largest part of what an
/// idle connection costs).
///
/// A plain function returning an `async move` block, not an `async fn`:
/// an `async fn` keeps its arguments twice in its state.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn until_drained<'a, C, T, F>(
    mut conn: Pin<&'a mut C>,
    version: Version,
    activity: &'a Activity,
    draining: &'a CancellationToken,
    shutdown: F,
) -> impl Future<Output = T> + 'a
where
    C: Future<Output = T>,
    F: Fn(Pin<&mut C>) + 'a,
    T: 'a,
{
    async move {
        // Gated: polled only when the drain starts, not on every wake of
        // the connection (see `crate::wake_gate`).
        tokio::select! {
            out = conn.as_mut() => return out,
            _ = Gated::new(draining.cancelled()) => {}
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

    #[test]
    fn only_http1_responses_while_draining_are_marked_last() {
        let draining = CancellationToken::new();
        let mut resp = Response::new(());
        mark_last(Version::Http1, &draining, &mut resp);
        assert!(resp.headers().get(header::CONNECTION).is_none());
        draining.cancel();
        mark_last(Version::Http2, &draining, &mut resp);
        assert!(resp.headers().get(header::CONNECTION).is_none());
        mark_last(Version::Http1, &draining, &mut resp);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        let mut upgrade = Response::new(());
        *upgrade.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        mark_last(Version::Http1, &draining, &mut upgrade);
        assert!(upgrade.headers().get(header::CONNECTION).is_none());
    }

    #[test]
    fn a_connection_with_a_request_in_flight_is_not_idle() {
        let activity = Arc::new(Activity::default());
        let req = activity.begin();
        assert_eq!(activity.idle_for(), None);
        drop(req);
        assert!(activity.idle_for().is_some());
    }
}
