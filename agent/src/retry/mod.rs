//! When a failed attempt may be tried again: which outcomes count as
//! retryable ([`RetryOn`]), which methods are safe to repeat, how long to
//! wait between tries ([`Backoff`]), and how many retries the service can
//! afford overall ([`RetryBudget`], Linkerd's `retryBudget`).
//!
//! Pure logic: the proxy reads the clock and the randomness and passes them
//! in, so every rule here is tested deterministically.

mod backoff;
mod budget;
mod condition;

pub use backoff::Backoff;
pub use budget::RetryBudget;
pub use condition::{Outcome, RetryOn};

use http::Method;

/// What can be wrong with a retry configuration.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("retry budget ratio {0} is out of range: it must be a number from 0 to 1000")]
    RatioOutOfRange(f64),
    #[error("retry budget ttl {0:?} is out of range: it must be from 1s to 60s")]
    TtlOutOfRange(std::time::Duration),
    #[error(
        "unknown retry condition {0:?}: expected one of 5xx, gateway-error, connect-failure, \
         reset, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"
    )]
    UnknownCondition(String),
}

/// Whether repeating the request is safe without knowing the application:
/// the idempotent methods of RFC 9110 §9.2.2. POST and PATCH are not, and
/// neither is CONNECT; extension methods are unknown, so not either.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&m.parse().unwrap()), "{m}");
        }
    }
}
