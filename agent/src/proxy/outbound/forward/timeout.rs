//! Timeout: each attempt is bounded by the route's per-try timeout and by
//! what is left of the route's timeout (the deadline of the whole request,
//! retries and back-off included). An attempt cut short fails as a timeout
//! naming the timeout as configured, which the retry stage may retry.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use super::attempt::Attempt;
use crate::discovery::RoutePolicy;
use crate::http::errors::ProxyError;
use crate::retry::Outcome;

/// The route's timeouts, started for one request.
pub(super) struct Deadline {
    /// When the whole request must be answered (the route's `timeout`).
    at: Option<Instant>,
    route: Option<Duration>,
    per_try: Option<Duration>,
}

impl Deadline {
    pub fn new(route: &RoutePolicy, start: Instant) -> Self {
        Deadline {
            at: route.timeout.map(|t| start + t),
            route: route.timeout,
            per_try: route.per_try_timeout,
        }
    }

    /// Whether the route's deadline has passed at `now`.
    pub fn passed(&self, now: Instant) -> bool {
        self.at.is_some_and(|d| now >= d)
    }

    /// `delay`, or less so as not to sleep past the deadline.
    pub fn clamp(&self, delay: Duration, now: Instant) -> Duration {
        match self.at {
            Some(d) => delay.min(d.saturating_duration_since(now)),
            None => delay,
        }
    }

    /// Runs one attempt to `addr` started at `now` within the shorter of
    /// the per-try timeout and what is left of the deadline.
    ///
    /// The attempt is borrowed pinned, not taken by value: an attempt's
    /// future is kilobytes, and owning it here would size this future for
    /// it twice (as the argument and inside the timeout) and copy it in
    /// twice, for every request (`-Zprint-type-sizes`: 7,304 bytes owned,
    /// 3,528 for the attempt itself).
    pub async fn bound<F: Future<Output = Attempt>>(
        &self,
        now: Instant,
        addr: SocketAddr,
        attempt: Pin<&mut F>,
    ) -> Attempt {
        let remaining = self.at.map(|d| d.saturating_duration_since(now));
        let limit = match (self.per_try, remaining) {
            (Some(p), Some(r)) => Some(p.min(r)),
            (p, r) => p.or(r),
        };
        let Some(limit) = limit else {
            return attempt.await;
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(o) => o,
            Err(_) => Attempt::Failed {
                error: ProxyError::Timeout,
                detail: timeout_detail(addr, self.per_try, self.route, remaining),
                observed: Outcome::Timeout,
            },
        }
    }
}

/// Why an attempt timed out, naming the timeout as configured (`1s`), not
/// what was left of it when the attempt started: the per-try timeout when
/// it was the shorter, else the route's.
fn timeout_detail(
    addr: SocketAddr,
    per_try: Option<Duration>,
    total: Option<Duration>,
    remaining: Option<Duration>,
) -> String {
    let shown = |d: Duration| humantime::format_duration(d).to_string();
    match (per_try, total) {
        (Some(p), _) if remaining.is_none_or(|r| p <= r) => {
            format!(
                "no response from {addr} within the per-try timeout {}",
                shown(p)
            )
        }
        (_, Some(t)) => format!(
            "no response from {addr} within the route's timeout {}",
            shown(t)
        ),
        (Some(p), None) => {
            format!(
                "no response from {addr} within the per-try timeout {}",
                shown(p)
            )
        }
        (None, None) => format!("no response from {addr}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_as_configured() {
        let addr: SocketAddr = "10.2.0.2:8080".parse().unwrap();
        let s = Duration::from_secs;
        // The route's 1s, with 999.990589ms of it left when the try began.
        let left = Some(Duration::from_nanos(999_990_589));
        assert_eq!(
            timeout_detail(addr, None, Some(s(1)), left),
            "no response from 10.2.0.2:8080 within the route's timeout 1s"
        );
        assert_eq!(
            timeout_detail(addr, Some(Duration::from_millis(250)), Some(s(1)), left),
            "no response from 10.2.0.2:8080 within the per-try timeout 250ms"
        );
        // A later try cut short by the route's deadline names the route's.
        assert_eq!(
            timeout_detail(
                addr,
                Some(Duration::from_millis(250)),
                Some(s(1)),
                Some(Duration::from_millis(100))
            ),
            "no response from 10.2.0.2:8080 within the route's timeout 1s"
        );
        assert_eq!(
            timeout_detail(addr, Some(Duration::from_millis(1500)), None, None),
            "no response from 10.2.0.2:8080 within the per-try timeout 1s 500ms"
        );
    }

    #[tokio::test]
    async fn an_attempt_gets_the_shorter_of_per_try_and_what_is_left() {
        let addr: SocketAddr = "10.2.0.2:80".parse().unwrap();
        let route = RoutePolicy {
            match_descriptions: vec![],
            backends: crate::routing::Weighted::new(vec![("b".to_string(), 1)])
                .expect("one backend"),
            timeout: Some(Duration::from_secs(1)),
            per_try_timeout: Some(Duration::from_millis(40)),
            retry: None,
        };
        let start = Instant::now();
        let d = Deadline::new(&route, start);
        let never = || async {
            std::future::pending::<()>().await;
            unreachable!("never answers")
        };
        // Early on, the per-try timeout is the shorter.
        let Attempt::Failed { detail, error, .. } =
            d.bound(start, addr, std::pin::pin!(never())).await
        else {
            panic!("a timeout is a failure");
        };
        assert_eq!(error, ProxyError::Timeout);
        assert!(detail.contains("per-try timeout 40ms"), "{detail}");
        // 980 ms into the request only 20 ms are left of the route's 1 s:
        // the attempt is cut at the deadline and names the route's timeout.
        let late = start + Duration::from_millis(980);
        let Attempt::Failed { detail, .. } = d.bound(late, addr, std::pin::pin!(never())).await
        else {
            panic!("a timeout is a failure");
        };
        assert!(detail.contains("route's timeout 1s"), "{detail}");
        assert!(d.passed(start + Duration::from_secs(1)));
        assert!(!d.passed(late));
        assert_eq!(
            d.clamp(Duration::from_secs(5), late),
            Duration::from_millis(20)
        );
        assert_eq!(
            d.clamp(Duration::from_millis(5), late),
            Duration::from_millis(5)
        );
    }
}
