//! The issuer and trust-anchor checks of `waymark check`. Leaves live for
//! hours and the agent rotates them; the issuer and the anchors live for
//! months and only an operator replaces them, so each must stay valid for
//! `--expiry-days` more days. One failing check per certificate, so each
//! hint can say which one, when it expires and what to do.

use std::time::{Duration, SystemTime};

use super::Check;
use crate::admin::check::{CertFacts, CertKind};

const DAY: f64 = 86_400.0;

const ROTATE_ISSUER: &str = "rotate the issuer: put a new issuer.crt and issuer.key, signed by a trust anchor every node has, in place (cert-manager renews its Certificate; `waymark identity init --force` for development); the agent reloads the files and re-issues every leaf (docs/mtls.md, Certificates)";
const ROTATE_ANCHOR: &str = "rotate the trust anchor: add the new root to the trust bundle (ca.crt) of every node first, then move the issuers to it, then remove the old root (docs/mtls.md, Certificates)";

/// Judges the issuer and trust anchors among `certs` at `now` (Unix
/// seconds).
pub fn checks(certs: &[CertFacts], now: f64, expiry_days: u64) -> Vec<Check> {
    let authorities: Vec<&CertFacts> = certs.iter().filter(|c| c.kind.is_authority()).collect();
    if authorities.is_empty() {
        return vec![Check::skip(
            "issuer and trust anchors: no mTLS configured ([identity])",
        )];
    }
    let soon = now + expiry_days as f64 * DAY;
    let mut out = Vec::new();
    for c in &authorities {
        let (name, rotate) = match c.kind {
            CertKind::TrustAnchor => ("trust anchor", ROTATE_ANCHOR),
            _ => ("issuer", ROTATE_ISSUER),
        };
        let to = c.not_after_unix as f64;
        if let Some(from) = c.not_before_unix.map(|f| f as f64)
            && now < from
        {
            out.push(Check::fail(
                format!("{name} \"{}\" is not valid until {}", c.identity, at(from)),
                "this node's clock is behind the CA's, or the CA was made with a start in the future: fix the clock first (see the clock check)",
            ));
        } else if now >= to {
            out.push(
                Check::fail(
                    format!(
                        "{name} \"{}\" expired at {} ({} ago)",
                        c.identity,
                        at(to),
                        span(now - to)
                    ),
                    rotate,
                )
                .with_detail([format!(
                    "every handshake whose chain holds it fails (TLS failure `expired`); {}",
                    match c.kind {
                        CertKind::TrustAnchor => "peers chained to it are rejected",
                        _ => "leaves it signs are rejected by every peer",
                    }
                )]),
            );
        } else if to < soon {
            out.push(Check::fail(
                format!(
                    "{name} \"{}\" expires at {}, in {} (within --expiry-days {expiry_days})",
                    c.identity,
                    at(to),
                    span(to - now)
                ),
                format!("{rotate}; do it before {}", at(to)),
            ));
        }
    }
    if out.is_empty() {
        let first = authorities
            .iter()
            .min_by_key(|c| c.not_after_unix)
            .map(|c| at(c.not_after_unix as f64))
            .unwrap_or_default();
        let anchors = authorities
            .iter()
            .filter(|c| c.kind == CertKind::TrustAnchor)
            .count();
        out.push(Check::pass(format!(
            "issuer and {anchors} trust anchor{} valid for more than {expiry_days} days (the first expires at {first})",
            if anchors == 1 { "" } else { "s" }
        )));
    }
    out
}

fn at(unix: f64) -> String {
    humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0)),
    )
    .to_string()
}

/// A duration in days (one decimal) or, under a day, hours and minutes.
fn span(secs: f64) -> String {
    if secs >= DAY {
        format!("{:.1} days", secs / DAY)
    } else {
        humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64 / 60 * 60)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Status;
    use super::*;

    const NOW: f64 = 1_760_000_000.0;

    fn cert(kind: CertKind, from: f64, to: f64) -> CertFacts {
        CertFacts {
            identity: "O=waymark, CN=waymark issuer".into(),
            kind,
            not_before_unix: Some(from as i64),
            not_after_unix: to as i64,
            rotate_after_unix: None,
        }
    }

    #[test]
    fn without_mtls_the_group_is_skipped() {
        let c = checks(&[], NOW, 7);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, Status::Skip);
    }

    #[test]
    fn valid_for_longer_than_asked_passes() {
        let c = checks(
            &[
                cert(CertKind::Issuer, NOW - DAY, NOW + 30.0 * DAY),
                cert(CertKind::TrustAnchor, NOW - DAY, NOW + 300.0 * DAY),
            ],
            NOW,
            7,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, Status::Pass, "{c:?}");
        assert!(
            c[0].what
                .contains("1 trust anchor valid for more than 7 days")
        );
    }

    #[test]
    fn expiring_within_the_window_fails_naming_the_certificate_and_the_date() {
        let c = checks(
            &[
                cert(CertKind::Issuer, NOW - DAY, NOW + 10.0 * DAY),
                cert(CertKind::TrustAnchor, NOW - DAY, NOW + 300.0 * DAY),
            ],
            NOW,
            30,
        );
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].status, Status::Fail);
        assert!(
            c[0].what
                .starts_with("issuer \"O=waymark, CN=waymark issuer\" expires at ")
                && c[0].what.contains("in 10.0 days (within --expiry-days 30)"),
            "{}",
            c[0].what
        );
        let hint = c[0].hint.as_deref().unwrap();
        assert!(hint.starts_with("rotate the issuer"), "{hint}");
        assert!(hint.contains("docs/mtls.md"), "{hint}");
        assert!(hint.contains(&at(NOW + 10.0 * DAY)), "{hint}");
    }

    #[test]
    fn expired_and_not_yet_valid_fail_with_their_own_hint() {
        let c = checks(
            &[
                cert(CertKind::TrustAnchor, NOW - 9.0 * DAY, NOW - 2.0 * DAY),
                cert(CertKind::Issuer, NOW + DAY, NOW + 90.0 * DAY),
            ],
            NOW,
            7,
        );
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].what.starts_with("trust anchor"), "{}", c[0].what);
        assert!(c[0].what.contains("expired at"), "{}", c[0].what);
        assert!(c[0].what.contains("(2.0 days ago)"), "{}", c[0].what);
        assert!(
            c[0].hint
                .as_deref()
                .unwrap()
                .starts_with("rotate the trust anchor")
        );
        assert!(c[1].what.contains("is not valid until"), "{}", c[1].what);
        assert!(c[1].hint.as_deref().unwrap().contains("clock"));
    }
}
