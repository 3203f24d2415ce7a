//! SPIFFE IDs for workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Only the Kubernetes-shaped path is accepted: it is the one Istio, Linkerd
//! and cert-manager's SPIFFE tooling agree on, and a fixed shape lets
//! authorization compare identities field by field instead of by prefix.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps an ID at 2048 bytes.
const MAX_LEN: usize = 2048;

/// A validated workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a waymark SPIFFE ID.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("SPIFFE ID is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("SPIFFE ID {0:?} must have the path /ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error(
        "path segment {0:?} is invalid: use letters, digits, '.', '-' and '_' (not empty, not '.' or '..')"
    )]
    Segment(String),
}

impl SpiffeId {
    /// Builds an ID from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    // Authorization matches whole IDs or namespaces today.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// Checks a trust domain name (the host part of a SPIFFE ID).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.to_owned()))
    }
}

fn validate_segment(seg: &str) -> Result<(), SpiffeIdError> {
    let ok = !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment(seg.to_owned()))
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(s.to_owned()))?;
        validate_trust_domain(td)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(SpiffeIdError::Path(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/default/sa/web-1";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web-1");
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "Scheme"),
            ("spiffe://Cluster.local/ns/a/sa/b", "TrustDomain"),
            ("spiffe:///ns/a/sa/b", "TrustDomain"),
            ("spiffe://cluster.local", "Path"),
            ("spiffe://cluster.local/ns/a", "Path"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "Path"),
            ("spiffe://cluster.local/ns//sa/b", "Segment"),
            ("spiffe://cluster.local/ns/../sa/b", "Segment"),
            ("spiffe://cluster.local/ns/a/sa/b%20", "Segment"),
        ];
        for (input, kind) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err();
            assert!(format!("{err:?}").starts_with(kind), "{input}: {err:?}");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(MAX_LEN));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }
}
