//! Workload identities and the mTLS between node agents.
//!
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
//! Every node agent holds the trust bundle (the root certificates) and an
//! **issuer** (an intermediate CA certificate and its private key). The agent
//! mints leaves only for the workloads its own node runs, and the tunnel
//! client presents the *source workload's* leaf; the receiving agent checks
//! the chain to the bundle and reads the SPIFFE ID from the URI SAN, then
//! authorizes that identity for the destination.
//!
//! What a compromised node (root on it, or the agent's memory) **can** do:
//! - act as any workload whose leaf it holds, i.e. the workloads on that
//!   node, until those leaves expire (hours: the leaf lifetime);
//! - with the issuer key that every agent holds in the development setup
//!   (`waymark identity init`, one shared issuer), mint a leaf for **any**
//!   identity in the trust domain, and keep doing so until the issuer is
//!   replaced and the old one removed from the bundle. This is the weak point
//!   of a shared issuer and why it is for development only;
//! - read and alter the plaintext of its own pods' traffic (it is their proxy).
//!
//! What it **cannot** do: read or alter traffic between two other nodes (the
//! tunnel is end-to-end between those agents), obtain the root key (never
//! written to disk by `init`, never given to agents), or make a peer accept
//! a leaf from another trust anchor, an expired leaf, or — for the peer-agent
//! check on the client side — a different server identity.
//!
//! What a cluster CA integration changes: agents keep **no** issuer key.
//! Each agent sends a CSR per local workload to a cluster CA (cert-manager's
//! CSR API or an istiod-like CA) that checks, with the Kubernetes API, that
//! the workload's pod is scheduled on the requesting agent's node (node
//! authorization, as ztunnel does). A compromised node can then obtain leaves
//! only for identities of pods on that node, and the blast radius shrinks to
//! "the workloads on this node", which is the floor for a node proxy. The
//! rest of this module is unchanged: [`store::CertStore`] takes leaves from
//! any source, and the verifiers only need the bundle.

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
pub use tls::{TlsConfigError, TlsFailure, client_config, peer_info, server_config};
