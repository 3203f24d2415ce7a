//! Workload identities and the mTLS between node agents.
//!
//! - [`authority`]: subject and validity of the issuer and trust anchors.
//! - [`spiffe`]: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` identities.
//! - [`init`]: `waymark identity init`, a development trust anchor + issuer.
//! - [`issuer`]: loads the trust bundle and issuer (cert-manager compatible
//!   PEM files) and mints short-lived EC P-256 leaves whose only name is the
//!   workload's SPIFFE ID.
//! - [`store`]: the current leaf per identity, rotated at half-life and
//!   swapped atomically so only new handshakes see the new leaf.
//! - [`manager`]: mints every local leaf at start, renews them, reloads
//!   the bundle and issuer files when they change.
//! - [`tls`]: rustls client/server configs (TLS 1.3, ALPN h2, mutual auth,
//!   SPIFFE ID checks) and the classification of handshake failures.
//!
//! # Trust model
//!
//! Every agent holds the trust bundle and an issuer, mints leaves for its
//! own workloads and node, and the tunnel client presents the *source
//! workload's* leaf; the receiver verifies the chain, reads the SPIFFE ID
//! from the certificate and authorizes it. A compromised node can act as
//! its own workloads, and — with the shared development issuer — mint any
//! identity of the trust domain until the issuer is replaced; it cannot
//! read traffic between other nodes or obtain the root key. A cluster CA
//! that checks pod placement before signing (ztunnel's node authorization)
//! removes the issuer key from agents. The full model, the configuration
//! and the metrics: `docs/mtls.md`.

pub mod authority;
pub mod init;
pub mod issuer;
pub mod manager;
pub mod spiffe;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
#[cfg(test)]
mod tls_tests;

pub use issuer::{CertInfo, Issuer, IssuerError, TrustBundle};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use store::{CertStore, StoreError};
pub use tls::{
    TlsConfigError, TlsFailure, client_config, peer_info, server_config, with_client_key_log,
    with_server_key_log,
};
