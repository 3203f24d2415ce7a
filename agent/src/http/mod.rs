//! HTTP plumbing shared by both directions of the data path, with no
//! routing in it: the body type every proxied message travels in
//! ([`body`]), RFC 9110's hop-by-hop rules ([`headers`]), the upstream copy
//! of a request and the response on its way back ([`message`]), winding served
//! connections down without failing a request ([`drain`]), the proxy's own
//! answers ([`errors`]), request bodies kept for retries ([`replay`]), the
//! node-wide bound on buffered bytes ([`budget`]) and
//! the admin API's query strings ([`query`]), the HTTP/1.1 codec pods'
//! connections are served with and endpoints are spoken to ([`h1`]), and
//! the pool of upstream HTTP connections over `transport`'s paths
//! ([`pool`]). Serving and routing requests is `proxy::outbound`
//! (`http_server`, `forward`) and `proxy::inbound`.

pub mod body;
pub mod budget;
pub mod drain;
pub mod errors;
pub mod h1;
pub mod headers;
pub mod message;
pub mod pool;
pub mod query;
pub mod replay;
