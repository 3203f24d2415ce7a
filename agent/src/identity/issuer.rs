//! The issuer: loads the trust bundle and the issuer certificate and key
//! (cert-manager compatible PEM files) and mints short-lived leaf
//! certificates whose only name is the workload's SPIFFE ID (URI SAN).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

use super::authority::{Authority, AuthorityKind};
use super::spiffe::{SpiffeId, SpiffeIdError};

/// Default leaf lifetime: short, so a stolen key is useful only briefly;
/// rotation starts at half of it.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaves start this far in the past so a peer whose clock is slightly behind
/// still accepts a freshly minted certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Errors loading issuer material or minting leaves.
#[derive(Debug, Error)]
pub enum IssuerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Pem { path: PathBuf, problem: String },
    #[error("{what}: {problem}")]
    Invalid { what: &'static str, problem: String },
    #[error("minting a certificate for {id}: {source}")]
    Mint {
        id: SpiffeId,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate has no valid SPIFFE ID: {0}")]
    Identity(#[from] SpiffeIdError),
}

/// The set of trust anchors peers' chains must end in, and the trust domain
/// whose identities this node accepts.
#[derive(Clone)]
pub struct TrustBundle {
    pub(crate) roots: Arc<RootCertStore>,
    trust_domain: String,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("anchors", &self.roots.len())
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl TrustBundle {
    /// Builds a bundle from PEM text holding one or more CA certificates.
    pub fn from_pem(pem: &[u8], trust_domain: &str, origin: &Path) -> Result<Self, IssuerError> {
        super::spiffe::validate_trust_domain(trust_domain)?;
        let certs = parse_certs(pem, origin)?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| IssuerError::Pem {
                path: origin.to_owned(),
                problem: format!("not a usable trust anchor: {e}"),
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// A minted leaf: the chain presented in handshakes (leaf, then issuer), its
/// key, and the facts rotation and metrics need.
pub struct Leaf {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When it was minted. `not_before` is backdated by the clock-skew
    /// allowance, so rotation is timed from here, not from `not_before`.
    pub issued_at: SystemTime,
    /// Hex serial number: what a peer logs, and how tests tell leaves apart.
    pub serial: String,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("Leaf")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Leaf {
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Signs leaf certificates with the node's issuer key.
pub struct Issuer {
    bundle: TrustBundle,
    issuer_cert: CertificateDer<'static>,
    signer: rcgen::Issuer<'static, KeyPair>,
    lifetime: Duration,
    /// The issuer certificate's and the anchors' validity, read at load.
    authorities: Vec<Authority>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("bundle", &self.bundle)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads `ca.crt`-style bundle, issuer certificate and issuer key files.
    pub fn load(
        bundle: &Path,
        cert: &Path,
        key: &Path,
        trust_domain: &str,
    ) -> Result<Self, IssuerError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| IssuerError::Read {
                path: p.to_owned(),
                source,
            })
        };
        Self::from_pem(
            &read(bundle)?,
            bundle,
            &read(cert)?,
            cert,
            &read(key)?,
            key,
            trust_domain,
        )
    }

    /// Same as [`Issuer::load`] with the file contents already in memory;
    /// the paths only label errors.
    #[allow(clippy::too_many_arguments)]
    pub fn from_pem(
        bundle_pem: &[u8],
        bundle_path: &Path,
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
        trust_domain: &str,
    ) -> Result<Self, IssuerError> {
        let bundle = TrustBundle::from_pem(bundle_pem, trust_domain, bundle_path)?;
        let mut certs = parse_certs(cert_pem, cert_path)?;
        // Only the first certificate signs; any others are its own chain.
        let issuer_cert = certs.swap_remove(0);
        let mut authorities = vec![Authority::read(&issuer_cert, AuthorityKind::Issuer)?];
        for anchor in parse_certs(bundle_pem, bundle_path)? {
            authorities.push(Authority::read(&anchor, AuthorityKind::TrustAnchor)?);
        }
        let key_text = std::str::from_utf8(key_pem).map_err(|_| IssuerError::Pem {
            path: key_path.to_owned(),
            problem: "not PEM text".into(),
        })?;
        let key = KeyPair::from_pem(key_text).map_err(|e| IssuerError::Pem {
            path: key_path.to_owned(),
            problem: format!("no usable private key (PKCS#8, SEC1 EC or PKCS#1 RSA expected): {e}"),
        })?;
        let signer =
            rcgen::Issuer::from_ca_cert_der(&issuer_cert, key).map_err(|e| IssuerError::Pem {
                path: cert_path.to_owned(),
                problem: format!("not a usable issuer certificate: {e}"),
            })?;
        // A key that does not belong to the certificate would mint leaves no
        // peer accepts; say so at load time rather than at the first handshake.
        let spki = x509_parser::parse_x509_certificate(&issuer_cert)
            .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
            .map_err(|e| IssuerError::Pem {
                path: cert_path.to_owned(),
                problem: e.to_string(),
            })?;
        if spki != signer.key().public_key_raw() {
            return Err(IssuerError::Pem {
                path: key_path.to_owned(),
                problem: format!(
                    "key does not match the certificate in {}",
                    cert_path.display()
                ),
            });
        }
        Ok(Self {
            bundle,
            issuer_cert,
            signer,
            lifetime: DEFAULT_LEAF_LIFETIME,
            authorities,
        })
    }

    /// Sets the lifetime of leaves minted from now on.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The issuer certificate, then every trust anchor, as loaded.
    pub fn authorities(&self) -> &[Authority] {
        &self.authorities
    }

    /// Mints a leaf valid from a little before now for the configured lifetime.
    pub fn issue(&self, id: &SpiffeId) -> Result<Leaf, IssuerError> {
        let now = SystemTime::now();
        self.issue_with_validity(id, now - CLOCK_SKEW_ALLOWANCE, now + self.lifetime)
    }

    /// Mints a leaf with an explicit validity window (tests use a window in
    /// the past to get an expired certificate).
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, IssuerError> {
        if id.trust_domain() != self.bundle.trust_domain() {
            return Err(IssuerError::Invalid {
                what: "leaf identity",
                problem: format!(
                    "{id} is outside the trust domain {}",
                    self.bundle.trust_domain()
                ),
            });
        }
        let mint = |source| IssuerError::Mint {
            id: id.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(mint)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(mint)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every agent dials and accepts, so every leaf serves both ends.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.signer).map_err(mint)?;
        let der = cert.der().clone();
        let serial = cert_serial(&der).unwrap_or_default();
        let issued_at = SystemTime::now().clamp(not_before, not_after.max(not_before));
        Ok(Leaf {
            id: id.clone(),
            chain: vec![der, self.issuer_cert.clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before: truncate_to_secs(not_before),
            not_after: truncate_to_secs(not_after),
            issued_at,
            serial,
        })
    }
}

/// Positive 128-bit serial: RFC 5280 wants unique, positive, ≤ 20 bytes.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn parse_certs(pem: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, IssuerError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IssuerError::Pem {
            path: origin.to_owned(),
            problem: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IssuerError::Pem {
            path: origin.to_owned(),
            problem: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub id: SpiffeId,
    /// `id` as text (`spiffe://…`), formatted once per connection: it
    /// labels every request that arrives on it.
    pub id_text: String,
    pub serial: String,
    pub not_after: SystemTime,
}

/// Reads the SPIFFE ID (exactly one URI SAN, per the X509-SVID spec), serial
/// and expiry from a DER certificate.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, IssuerError> {
    let bad = |problem: String| IssuerError::Invalid {
        what: "peer certificate",
        problem,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no subject alternative name".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or_else(|| bad("no URI SAN".into()))?;
    if uris.next().is_some() {
        return Err(bad("more than one URI SAN".into()));
    }
    let id: SpiffeId = uri.parse()?;
    let secs = cert.validity().not_after.timestamp().max(0) as u64;
    Ok(CertInfo {
        id_text: id.to_string(),
        id,
        serial: hex(cert.raw_serial()),
        not_after: UNIX_EPOCH + Duration::from_secs(secs),
    })
}

fn cert_serial(der: &CertificateDer<'_>) -> Option<String> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| hex(c.raw_serial()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::init::DevCa;

    fn issuer() -> Issuer {
        DevCa::generate("cluster.local").unwrap().issuer().unwrap()
    }

    #[test]
    fn leaf_carries_spiffe_id_and_validity() {
        let issuer = issuer().with_lifetime(Duration::from_secs(3600));
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let leaf = issuer.issue(&id).unwrap();
        assert_eq!(leaf.chain.len(), 2);
        let info = cert_info(&leaf.chain[0]).unwrap();
        assert_eq!(info.id, id);
        assert_eq!(info.serial, leaf.serial);
        assert_eq!(info.not_after, leaf.not_after);
        let skew = SystemTime::now().duration_since(leaf.not_before).unwrap();
        assert!(skew >= CLOCK_SKEW_ALLOWANCE - Duration::from_secs(2));
        assert_ne!(issuer.issue(&id).unwrap().serial, leaf.serial);
    }

    #[test]
    fn refuses_foreign_trust_domain() {
        let id: SpiffeId = "spiffe://other.org/ns/default/sa/web".parse().unwrap();
        assert!(matches!(
            issuer().issue(&id),
            Err(IssuerError::Invalid { .. })
        ));
    }

    #[test]
    fn load_errors_name_the_file() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let p = |s: &str| PathBuf::from(s);
        let err = Issuer::from_pem(
            b"junk",
            &p("ca.crt"),
            ca.issuer_cert.as_bytes(),
            &p("issuer.crt"),
            ca.issuer_key.as_bytes(),
            &p("issuer.key"),
            "cluster.local",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("ca.crt: "), "{err}");
        let err = Issuer::from_pem(
            ca.ca_cert.as_bytes(),
            &p("ca.crt"),
            ca.issuer_cert.as_bytes(),
            &p("issuer.crt"),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            &p("issuer.key"),
            "cluster.local",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("issuer.key: "), "{err}");
        let other = DevCa::generate("cluster.local").unwrap();
        let err = Issuer::from_pem(
            ca.ca_cert.as_bytes(),
            &p("ca.crt"),
            ca.issuer_cert.as_bytes(),
            &p("issuer.crt"),
            other.issuer_key.as_bytes(),
            &p("issuer.key"),
            "cluster.local",
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let err =
            Issuer::load(&p("/nonexistent/ca.crt"), &p("b"), &p("c"), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    }
}
