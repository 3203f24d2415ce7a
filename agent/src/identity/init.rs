//! `waymark identity init`: a development trust anchor and issuer.
//!
//! Writes `ca.crt` (self-signed root, the trust bundle), `issuer.crt` (an
//! intermediate signed by the root, path length 0) and `issuer.key` (its
//! PKCS#8 key, mode 0600) — the names a cert-manager `Certificate` secret for
//! a CA issuer mounts, so production swaps these files without code changes.
//! The root's key is not written: a development root that is never used again
//! cannot be stolen, and a new issuer means running `init` again.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

use super::issuer::{Issuer, IssuerError};
use super::spiffe::{SpiffeIdError, validate_trust_domain};

pub const CA_CERT_FILE: &str = "ca.crt";
pub const ISSUER_CERT_FILE: &str = "issuer.crt";
pub const ISSUER_KEY_FILE: &str = "issuer.key";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long the development root and issuer stay valid from now. Short
/// values rehearse an issuer rotation (and let `waymark check` be seen
/// warning about one) before a real one is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub root: Duration,
    pub issuer: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            root: ROOT_LIFETIME,
            issuer: ISSUER_LIFETIME,
        }
    }
}

#[derive(Debug, Error)]
pub enum InitError {
    #[error("invalid trust domain: {0}")]
    TrustDomain(#[from] SpiffeIdError),
    #[error("generating the development CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} already exists; pass --force to replace the development CA")]
    Exists { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} lifetime must be at least a minute, not {lifetime:?}")]
    Lifetime {
        what: &'static str,
        lifetime: Duration,
    },
    #[error("the generated CA does not load: {0}")]
    SelfCheck(#[from] IssuerError),
}

/// The files `init` writes, as PEM text.
pub struct DevCa {
    pub trust_domain: String,
    pub ca_cert: String,
    pub issuer_cert: String,
    pub issuer_key: String,
}

/// What `init` did, for the CLI to print.
#[derive(Debug)]
pub struct InitReport {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub files: Vec<PathBuf>,
}

/// Creates the development CA in `dir` (created if missing). Refuses to
/// replace existing files unless `overwrite`.
pub fn run(dir: &Path, trust_domain: &str, overwrite: bool) -> Result<InitReport, InitError> {
    run_with(dir, trust_domain, overwrite, Lifetimes::default())
}

/// [`run`] with chosen root and issuer lifetimes.
pub fn run_with(
    dir: &Path,
    trust_domain: &str,
    overwrite: bool,
    lifetimes: Lifetimes,
) -> Result<InitReport, InitError> {
    let ca = DevCa::generate_with(trust_domain, lifetimes)?;
    // Prove the material works before anything touches the disk.
    ca.issuer()?;
    let files = ca.write(dir, overwrite)?;
    Ok(InitReport {
        dir: dir.to_owned(),
        trust_domain: trust_domain.to_owned(),
        files,
    })
}

impl DevCa {
    pub fn generate(trust_domain: &str) -> Result<Self, InitError> {
        Self::generate_with(trust_domain, Lifetimes::default())
    }

    pub fn generate_with(trust_domain: &str, lifetimes: Lifetimes) -> Result<Self, InitError> {
        validate_trust_domain(trust_domain)?;
        for (what, lifetime) in [("root", lifetimes.root), ("issuer", lifetimes.issuer)] {
            if lifetime < Duration::from_secs(60) {
                return Err(InitError::Lifetime { what, lifetime });
            }
        }
        let now = SystemTime::now();
        // A random tag keeps the names of two development CAs apart: peers
        // pick candidate issuers by name, and two `init` runs with the same
        // names would report a bad signature instead of an unknown CA.
        let tag = format!("{:08x}", rand::random::<u32>());
        let ca_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];

        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = dn(&format!(
            "waymark development root CA {tag} ({trust_domain})"
        ));
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = ca_usages.clone();
        root.not_before = (now - Duration::from_secs(3600)).into();
        root.not_after = (now + lifetimes.root).into();
        let root = rcgen::CertifiedIssuer::self_signed(root, root_key)?;

        let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!(
            "waymark development issuer {tag} ({trust_domain})"
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = ca_usages;
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + lifetimes.issuer).into();
        let issuer_cert = params.signed_by(&issuer_key, &root)?;

        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            ca_cert: root.pem(),
            issuer_cert: issuer_cert.pem(),
            issuer_key: issuer_key.serialize_pem(),
        })
    }

    /// Loads this CA as an [`Issuer`] without touching the disk.
    pub fn issuer(&self) -> Result<Issuer, IssuerError> {
        Issuer::from_pem(
            self.ca_cert.as_bytes(),
            Path::new(CA_CERT_FILE),
            self.issuer_cert.as_bytes(),
            Path::new(ISSUER_CERT_FILE),
            self.issuer_key.as_bytes(),
            Path::new(ISSUER_KEY_FILE),
            &self.trust_domain,
        )
    }

    fn write(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, InitError> {
        std::fs::create_dir_all(dir).map_err(|source| InitError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let files = [
            (CA_CERT_FILE, &self.ca_cert, 0o644),
            (ISSUER_CERT_FILE, &self.issuer_cert, 0o644),
            (ISSUER_KEY_FILE, &self.issuer_key, 0o600),
        ];
        // Check all three first so a refusal leaves no half-written set.
        if !overwrite
            && let Some((name, ..)) = files.iter().find(|(name, ..)| dir.join(name).exists())
        {
            return Err(InitError::Exists {
                path: dir.join(name),
            });
        }
        let mut written = Vec::new();
        for (name, text, mode) in files {
            let path = dir.join(name);
            write_file(&path, text.as_bytes(), mode).map_err(|source| InitError::Write {
                path: path.clone(),
                source,
            })?;
            written.push(path);
        }
        Ok(written)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "waymark");
    dn.push(DnType::CommonName, cn);
    dn
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // `mode` applies only on creation; an overwritten key must tighten too.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "waymark-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_writes_loadable_files_and_refuses_overwrite() {
        let dir = temp_dir("identity-init");
        let report = run(&dir, "cluster.local", false).unwrap();
        assert_eq!(report.files.len(), 3);
        let issuer = Issuer::load(
            &dir.join(CA_CERT_FILE),
            &dir.join(ISSUER_CERT_FILE),
            &dir.join(ISSUER_KEY_FILE),
            "cluster.local",
        )
        .unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        issuer.issue(&id).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(ISSUER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let before = std::fs::read(dir.join(CA_CERT_FILE)).unwrap();
        let err = run(&dir, "cluster.local", false).unwrap_err();
        assert!(matches!(err, InitError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(dir.join(CA_CERT_FILE)).unwrap(), before);
        run(&dir, "cluster.local", true).unwrap();
        assert_ne!(std::fs::read(dir.join(CA_CERT_FILE)).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_lifetimes_too_short_to_use() {
        let short = Lifetimes {
            issuer: Duration::from_secs(1),
            ..Lifetimes::default()
        };
        let err = DevCa::generate_with("cluster.local", short).err().unwrap();
        assert!(err.to_string().contains("issuer lifetime"), "{err}");
    }

    #[test]
    fn rejects_bad_trust_domain() {
        assert!(matches!(
            run(&temp_dir("bad-td"), "Not Valid", false),
            Err(InitError::TrustDomain(_))
        ));
    }
}
