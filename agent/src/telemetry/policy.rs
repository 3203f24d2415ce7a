//! What the data path's diagnostics may show or add, from
//! `[diagnostics]`: read per request with one relaxed load each, written at
//! start and on every reload, so a change applies to the next request.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{DiagnosticsConfig, TraceContext};

/// What a redacted value is shown as: a credential-like header's value in
/// tap, a query value while `tap_redact_query` is on.
pub const REDACTED: &str = "<redacted>";

static TAP_REDACT_QUERY: AtomicBool = AtomicBool::new(true);
static TRACE_CONTEXT: AtomicBool = AtomicBool::new(true);

/// Puts `config` in force.
pub fn apply(config: &DiagnosticsConfig) {
    TAP_REDACT_QUERY.store(config.tap_redact_query, Ordering::Relaxed);
    TRACE_CONTEXT.store(
        config.trace_context == TraceContext::Allow,
        Ordering::Relaxed,
    );
}

/// Whether tap shows query values redacted.
pub fn tap_redacts_query() -> bool {
    TAP_REDACT_QUERY.load(Ordering::Relaxed)
}

/// Whether requests may ask for the diagnostic context.
pub fn trace_context_allowed() -> bool {
    TRACE_CONTEXT.load(Ordering::Relaxed)
}

/// `path?query` as tap shows it: each query value replaced by
/// `<redacted>` when `redact` (keys kept, so the shape of the request stays
/// readable); unchanged otherwise or without a query.
pub fn shown_path(path_and_query: &str, redact: bool) -> String {
    let Some((path, query)) = path_and_query.split_once('?').filter(|_| redact) else {
        return path_and_query.to_string();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) => format!("{key}={}", REDACTED),
            None if pair.is_empty() => String::new(),
            None => format!("{pair}={}", REDACTED),
        })
        .collect();
    format!("{path}?{}", redacted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_redacted_keys_kept() {
        assert_eq!(
            shown_path("/search?q=secret&page=2", true),
            "/search?q=<redacted>&page=<redacted>"
        );
        assert_eq!(
            shown_path("/search?token", true),
            "/search?token=<redacted>"
        );
        assert_eq!(
            shown_path("/a?x=1&&y=", true),
            "/a?x=<redacted>&&y=<redacted>"
        );
        assert_eq!(shown_path("/plain", true), "/plain");
        assert_eq!(shown_path("/search?q=secret", false), "/search?q=secret");
    }
}
