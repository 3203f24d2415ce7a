//! The transport layer, below HTTP and both directions of the proxy: how
//! the agent reaches an upstream ([`upstream`]: a direct TCP connection or
//! a stream through the mTLS [`tunnel`] to the endpoint node's agent, with
//! the tunnel's own connection pool), the byte copy between two
//! connections ([`copy`]) and replaying bytes already read ([`rewind`]). A
//! pod's direct upstream connections are made in the pod's own network
//! namespace ([`netns`]). Nothing here knows about HTTP messages, routes,
//! services' policies or the inbound side: the pooled HTTP connections
//! over these paths speak HTTP, so they are `http::pool`, one layer up.

pub mod coalesce;
pub mod copy;
pub mod delayed_acks;
pub mod h2_refused;
pub mod idle;
pub mod linger;
pub mod netns;
pub mod rewind;
pub mod sock_diag;
pub mod tls_label;
pub mod tunnel;
pub mod upstream;
