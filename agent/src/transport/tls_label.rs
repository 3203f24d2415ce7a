//! How a connection or request travelled, as Linkerd labels it (`tls`,
//! `no_tls_reason`): decided where the upstream path is chosen, here in the
//! transport layer, and written into the metrics above it.

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

/// Why a connection or request was carried in plaintext, Linkerd's
/// `no_tls_reason`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum NoTlsReason {
    /// This agent has no `[identity]`: mTLS is off.
    Disabled,
    /// The source pod has no identity.
    NoSourceIdentity,
    /// The endpoint runs on this node: no wire between nodes to protect.
    LocalEndpoint,
    /// Discovery does not say which node the endpoint is on (or the
    /// destination is no service), so there is no peer agent to tunnel to.
    NotProvidedByServiceDiscovery,
    /// The proxy answered before any upstream connection was made (no
    /// endpoints, bad request, the client left during detection).
    NoConnection,
}

impl NoTlsReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::NoSourceIdentity => "no_source_identity",
            Self::LocalEndpoint => "local_endpoint",
            Self::NotProvidedByServiceDiscovery => "not_provided_by_service_discovery",
            Self::NoConnection => "no_connection",
        }
    }
}

/// Linkerd's `tls` label (`true`, or `no_identity` with a `no_tls_reason`),
/// plus `per_request` for the TCP series of connections that carry HTTP:
/// each request picks its own endpoint, and `request`/`response` series
/// say which went through the tunnel.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TlsLabel {
    True,
    NoIdentity(NoTlsReason),
    PerRequest,
}

impl TlsLabel {
    pub fn value(self) -> &'static str {
        match self {
            Self::True => "true",
            Self::NoIdentity(_) => "no_identity",
            Self::PerRequest => "per_request",
        }
    }
}

impl EncodeLabelSet for TlsLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeLabel;
        ("tls", self.value()).encode(encoder.encode_label())?;
        if let Self::NoIdentity(reason) = self {
            ("no_tls_reason", reason.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}
