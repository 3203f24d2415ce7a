//! rustls configurations for agent-to-agent mTLS: TLS 1.3 only, ALPN `h2`,
//! both ends present the leaf of a SPIFFE identity, both ends verify the
//! peer's chain to the trust bundle and then the peer's SPIFFE ID.
//!
//! Failures keep rustls' own certificate error kinds so the cause stays
//! distinguishable on both ends: the verifying side gets the error itself,
//! the other side gets the alert it maps to (unknown CA → `unknown_ca`,
//! expired → `certificate_expired`, wrong SPIFFE ID → `access_denied`).
//! [`TlsFailure`] folds both views into one label for errors and metrics.

use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, CommonState, DigitallySignedStruct,
    DistinguishedName, ServerConfig, SignatureScheme,
};
use thiserror::Error;

use super::issuer::{CertInfo, TrustBundle, cert_info};
use super::spiffe::SpiffeId;
use super::store::CertStore;

/// The tunnel speaks HTTP/2 only.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, Error)]
pub enum TlsConfigError {
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why a handshake with a peer failed, as seen from either end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The chain does not lead to our trust bundle (another trust anchor).
    UnknownCa,
    /// The certificate is expired or not yet valid.
    Expired,
    /// Chain is fine but the SPIFFE ID is not the one expected (or not in
    /// our trust domain, or missing).
    WrongIdentity,
    /// The peer sent no certificate.
    NoCertificate,
    /// Any other certificate problem (bad encoding, signature, usage).
    BadCertificate,
    /// Not TLS, or a TLS protocol violation (garbage, plaintext HTTP).
    Protocol,
}

impl TlsFailure {
    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::WrongIdentity => "wrong_identity",
            Self::NoCertificate => "no_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::Protocol => "protocol",
        }
    }

    pub fn classify(err: &rustls::Error) -> Self {
        use CertificateError as C;
        match err {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => Self::UnknownCa,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Self::Expired,
                C::ApplicationVerificationFailure => Self::WrongIdentity,
                _ => Self::BadCertificate,
            },
            rustls::Error::NoCertificatesPresented => Self::NoCertificate,
            rustls::Error::AlertReceived(a) => match a {
                AlertDescription::UnknownCA => Self::UnknownCa,
                AlertDescription::CertificateExpired => Self::Expired,
                AlertDescription::AccessDenied => Self::WrongIdentity,
                AlertDescription::CertificateRequired => Self::NoCertificate,
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::DecryptError => Self::BadCertificate,
                _ => Self::Protocol,
            },
            _ => Self::Protocol,
        }
    }

    /// Finds a rustls error anywhere in an error's source chain (it arrives
    /// wrapped in `io::Error`, and further in hyper/h2 errors).
    pub fn find(err: &(dyn StdError + 'static)) -> Option<Self> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                return Some(Self::classify(r));
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                return Some(Self::classify(r));
            }
            // h2 keeps its I/O cause out of `source()`.
            if let Some(io) = e.downcast_ref::<h2::Error>().and_then(h2::Error::get_io)
                && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                return Some(Self::classify(r));
            }
            cur = e.source();
        }
        None
    }
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client side: present `local`'s current leaf, accept only a server whose
/// SPIFFE ID is `expected_peer` (or, if `None`, any ID of the trust domain).
pub fn client_config(
    store: Arc<CertStore>,
    local: SpiffeId,
    bundle: &TrustBundle,
    expected_peer: Option<SpiffeId>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(PeerVerifier {
        bundle: bundle.clone(),
        expected: expected_peer,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(StoreResolver { store, id: local }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption would let a session outlive a rotated or revoked leaf and
    // hide the current certificate from the server; a full handshake per
    // pooled connection is cheap.
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// Server side: present `local`'s current leaf, require a client chain to
/// the bundle with a SPIFFE ID in the trust domain. The caller reads the
/// verified ID with [`peer_info`] after the handshake and authorizes it.
pub fn server_config(
    store: Arc<CertStore>,
    local: SpiffeId,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = client_verifier(bundle)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(StoreResolver { store, id: local }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// What the server side checks a client's chain with: a chain to the
/// bundle, and a SPIFFE ID in its trust domain. Also used to check the
/// peers of open connections again when the bundle changes.
pub fn client_verifier(
    bundle: &TrustBundle,
) -> Result<Arc<dyn ClientCertVerifier>, TlsConfigError> {
    let inner =
        WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider()).build()?;
    Ok(Arc::new(ClientVerifier {
        inner,
        trust_domain: bundle.trust_domain().to_owned(),
    }))
}

/// The same client config, giving its session secrets to `key_log` (the
/// capture's sink, which formats nothing unless an operator runs a capture
/// with `--keylog`). Separate from [`client_config`] so the TLS policy does
/// not depend on diagnostics.
pub fn with_client_key_log(
    config: Arc<ClientConfig>,
    key_log: Option<&Arc<dyn rustls::KeyLog>>,
) -> Arc<ClientConfig> {
    match key_log {
        Some(k) => {
            let mut c = (*config).clone();
            c.key_log = k.clone();
            Arc::new(c)
        }
        None => config,
    }
}

/// The server-side twin of [`with_client_key_log`].
pub fn with_server_key_log(
    config: Arc<ServerConfig>,
    key_log: Option<&Arc<dyn rustls::KeyLog>>,
) -> Arc<ServerConfig> {
    match key_log {
        Some(k) => {
            let mut c = (*config).clone();
            c.key_log = k.clone();
            Arc::new(c)
        }
        None => config,
    }
}

/// The server name the client config is used with. Verification ignores it
/// (peers are named by SPIFFE ID, not DNS), and SNI is off.
pub fn server_name(addr: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// The verified peer's identity, serial and expiry after a handshake.
pub fn peer_info(conn: &CommonState) -> Option<CertInfo> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_info(c).ok())
}

fn wrong_identity() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

fn check_identity(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
    expected: Option<&SpiffeId>,
) -> Result<(), rustls::Error> {
    let info = cert_info(cert).map_err(|e| {
        tracing::warn!(error = %e, "peer certificate carries no usable SPIFFE ID");
        wrong_identity()
    })?;
    let ok = match expected {
        Some(want) => &info.id == want,
        None => info.id.trust_domain() == trust_domain,
    };
    if !ok {
        tracing::warn!(
            presented = %info.id,
            expected = %expected.map_or_else(|| format!("any identity in {trust_domain}"), ToString::to_string),
            "peer SPIFFE ID rejected"
        );
        return Err(wrong_identity());
    }
    Ok(())
}

/// Resolves the current leaf of one identity at every handshake.
#[derive(Debug)]
struct StoreResolver {
    store: Arc<CertStore>,
    id: SpiffeId,
}

impl StoreResolver {
    fn resolve_current(&self) -> Option<Arc<CertifiedKey>> {
        let found = self.store.current(&self.id).map(|c| c.certified.clone());
        if found.is_none() {
            tracing::warn!(identity = %self.id, "no certificate to present for this identity");
        }
        found
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.resolve_current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolve_current()
    }
}

/// Verifies the server: chain to the bundle, then the SPIFFE ID.
#[derive(Debug)]
struct PeerVerifier {
    bundle: TrustBundle,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_identity(
            end_entity,
            self.bundle.trust_domain(),
            self.expected.as_ref(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies clients: rustls' WebPKI client verifier for the chain, then the
/// trust domain of the SPIFFE ID.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.trust_domain, None)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
