//! Object metadata the server fills in or checks: uids, timestamps, and the
//! name rule most kinds share.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::status::ApiError;

/// A version-4-shaped UUID, derived (splitmix64) from a per-process seed
/// and the resourceVersion of the write that creates the object, so every
/// object gets a distinct one without a random number generator.
pub fn uid(seed: u64, rv: u64) -> String {
    let mix = |x: u64| {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(seed ^ rv);
    let b = mix(a ^ 0x5555);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a & 0xfff,
        ((b >> 48) as u16 & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// RFC 1123 subdomain, the rule most kinds apply to `metadata.name`.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    // RBAC and a few other kinds allow path segment names (`system:x`).
    let rbac_ok = kind.starts_with("Cluster") || kind.starts_with("Role");
    if ok || (rbac_ok && !name.is_empty() && !name.contains('/')) {
        return Ok(());
    }
    Err(ApiError::invalid(
        kind,
        name,
        &format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ),
    ))
}

/// Seconds-precision UTC, the form of every Kubernetes timestamp.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn uids_differ_per_write() {
        let (a, b) = (uid(7, 1), uid(7, 2));
        assert_ne!(a, b);
        assert_eq!((a.len(), &a[14..15]), (36, "4"));
    }

    #[test]
    fn names() {
        assert!(validate_name("Pod", "web-0.a").is_ok());
        assert!(validate_name("Pod", "Web").is_err());
        assert!(validate_name("Pod", "-a").is_err());
        assert!(validate_name("ClusterRole", "system:node").is_ok());
    }
}
