//! The certificate authorities an agent depends on: its issuer (the CA it
//! signs its leaves with) and the trust anchors peers' chains must end in.
//! Their validity is read once when the files load (they change only on a
//! reload), so `waymark check` can warn before one of them expires and
//! every handshake of the node starts failing at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;

use super::issuer::IssuerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorityKind {
    /// The intermediate CA this agent signs its workload leaves with.
    Issuer,
    /// A root of the trust bundle.
    TrustAnchor,
}

/// One CA certificate's name and validity window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub kind: AuthorityKind,
    /// The subject distinguished name, as RFC 4514 text.
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Authority {
    /// Reads subject and validity from a DER certificate.
    pub fn read(der: &CertificateDer<'_>, kind: AuthorityKind) -> Result<Self, IssuerError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| IssuerError::Invalid {
                what: match kind {
                    AuthorityKind::Issuer => "issuer certificate",
                    AuthorityKind::TrustAnchor => "trust anchor",
                },
                problem: e.to_string(),
            })?;
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            }
        };
        Ok(Self {
            kind,
            subject: cert.subject().to_string(),
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::init::{DevCa, Lifetimes};

    #[test]
    fn the_issuer_and_the_anchor_carry_their_subject_and_validity() {
        let lifetimes = Lifetimes {
            root: Duration::from_secs(30 * 86_400),
            issuer: Duration::from_secs(10 * 86_400),
        };
        let ca = DevCa::generate_with("cluster.local", lifetimes).unwrap();
        let issuer = ca.issuer().unwrap();
        let all = issuer.authorities();
        assert_eq!(all.len(), 2, "{all:?}");
        let now = SystemTime::now();
        let days = |a: &Authority| a.not_after.duration_since(now).unwrap().as_secs() / 86_400;
        let iss = all
            .iter()
            .find(|a| a.kind == AuthorityKind::Issuer)
            .unwrap();
        assert!(
            iss.subject.contains("waymark development issuer"),
            "{iss:?}"
        );
        assert_eq!(days(iss), 9);
        assert!(iss.not_before < now);
        let anchor = all
            .iter()
            .find(|a| a.kind == AuthorityKind::TrustAnchor)
            .unwrap();
        assert!(anchor.subject.contains("root CA"), "{anchor:?}");
        assert_eq!(days(anchor), 29);
    }

    #[test]
    fn garbage_is_an_error_naming_the_certificate() {
        let err = Authority::read(&CertificateDer::from(vec![1, 2, 3]), AuthorityKind::Issuer)
            .unwrap_err();
        assert!(err.to_string().starts_with("issuer certificate: "), "{err}");
    }
}
