//! Which connections `waymark conns` shows, from the `/conns` query string
//! (the CLI's flags have the same names and are checked by the same code
//! before anything is sent).
//!
//! | key | matches |
//! |---|---|
//! | `pod` | the connection's pod on this node (the client outbound, the destination inbound): `namespace/name`, or a workload `namespace/web` whose pods are `web-…` |
//! | `src` | the client's address: `IP`, `IP:PORT`, `[IPv6]:PORT`, a network `10.1.0.0/16`, or a port `:40112` |
//! | `dst` | the same, against the original destination or the endpoint it went to |
//! | `proto` | `opaque`, `tls`, `http1`, `h2`, `grpc`, `http` (any of the three), `detecting` |
//! | `service` | the service dialled, or the route's backend |
//! | `direction` | `in` or `out` |
//!
//! Every given key must match. A value that cannot mean anything is an
//! error naming the key and what it takes, never a filter that quietly
//! matches nothing.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::ConnRow;

/// Which way a request or connection crosses this agent (tap's and
/// `waymark conns`' `direction=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From another node's agent through the tunnel, to a pod of this node.
    In,
    /// From a pod of this node.
    Out,
}

impl Direction {
    /// `in` or `out`, as events and Linkerd's `proxy=` say it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }

    pub fn parse(v: &str) -> Result<Direction, String> {
        match v.to_ascii_lowercase().as_str() {
            "in" | "inbound" => Ok(Direction::In),
            "out" | "outbound" => Ok(Direction::Out),
            _ => Err(format!("tap direction {v:?}: give in or out")),
        }
    }
}

/// The keys, in the order the CLI documents them.
pub const KEYS: &[&str] = &["pod", "src", "dst", "proto", "service", "direction"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("unknown conns filter {0:?}; the filters are {keys}", keys = KEYS.join(", "))]
    UnknownKey(String),
    #[error("conns filter {key}={value:?}: {why}")]
    Bad {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("conns filter {0} is given twice")]
    Twice(&'static str),
}

/// An address, a network or a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrMatch {
    /// One address or a network, on any port or on one.
    Net { net: IpNet, port: Option<u16> },
    /// Any address, this port.
    Port(u16),
}

const ADDR_FORMS: &str = "give an address (10.2.0.5), an address and port (10.2.0.5:8080 or [fd00::5]:8080), a network (10.2.0.0/16) or a port (:8080)";

impl AddrMatch {
    pub fn parse(key: &'static str, v: &str) -> Result<Self, FilterError> {
        let bad = |why| FilterError::Bad {
            key,
            value: v.to_string(),
            why,
        };
        let t = v.trim();
        if let Some(port) = t.strip_prefix("*:").or_else(|| t.strip_prefix(':')) {
            return Ok(AddrMatch::Port(parse_port(port).ok_or_else(|| {
                bad("the port must be a number from 1 to 65535")
            })?));
        }
        if let Ok(a) = t.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(bad("the port must be a number from 1 to 65535"));
            }
            return Ok(AddrMatch::Net {
                net: IpNet::from(a.ip()),
                port: Some(a.port()),
            });
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(AddrMatch::Net {
                net: IpNet::from(ip),
                port: None,
            });
        }
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(AddrMatch::Net {
                net: net.trunc(),
                port: None,
            });
        }
        Err(bad(ADDR_FORMS))
    }

    pub fn matches(&self, a: SocketAddr) -> bool {
        match self {
            AddrMatch::Port(p) => a.port() == *p,
            AddrMatch::Net { net, port } => {
                net.contains(&a.ip().to_canonical()) && port.is_none_or(|p| a.port() == p)
            }
        }
    }
}

fn parse_port(v: &str) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| *p > 0)
}

/// The protocols `proto` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoMatch {
    One(&'static str),
    /// `http`: http1, h2 or grpc.
    AnyHttp,
}

impl ProtoMatch {
    fn parse(v: &str) -> Result<Self, FilterError> {
        Ok(match v.to_ascii_lowercase().as_str() {
            "http" => ProtoMatch::AnyHttp,
            "opaque" | "tcp" => ProtoMatch::One("opaque"),
            "tls" => ProtoMatch::One("tls"),
            "http1" | "http/1.1" | "h1" => ProtoMatch::One("http1"),
            "h2" | "http2" | "h2c" => ProtoMatch::One("h2"),
            "grpc" => ProtoMatch::One("grpc"),
            "detecting" => ProtoMatch::One("detecting"),
            _ => {
                return Err(FilterError::Bad {
                    key: "proto",
                    value: v.to_string(),
                    why: "give opaque, tls, http1, h2, grpc, http (any HTTP) or detecting",
                });
            }
        })
    }

    fn matches(self, p: &str) -> bool {
        match self {
            ProtoMatch::One(one) => p == one,
            ProtoMatch::AnyHttp => matches!(p, "http1" | "h2" | "grpc"),
        }
    }
}

/// A parsed filter; the default shows everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnFilter {
    pub pod: Option<String>,
    pub src: Option<AddrMatch>,
    pub dst: Option<AddrMatch>,
    pub proto: Option<ProtoMatch>,
    pub service: Option<String>,
    pub direction: Option<Direction>,
}

impl ConnFilter {
    /// From decoded `key=value` pairs (empty values are no filter).
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, FilterError> {
        let mut f = ConnFilter::default();
        for (k, v) in pairs {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            let key = KEYS
                .iter()
                .copied()
                .find(|known| *known == k)
                .ok_or_else(|| FilterError::UnknownKey(k.to_string()))?;
            let fresh = match key {
                "pod" => f.pod.replace(parse_pod(v)?).is_none(),
                "src" => f.src.replace(AddrMatch::parse("src", v)?).is_none(),
                "dst" => f.dst.replace(AddrMatch::parse("dst", v)?).is_none(),
                "proto" => f.proto.replace(ProtoMatch::parse(v)?).is_none(),
                "service" => f.service.replace(v.to_string()).is_none(),
                _ => f
                    .direction
                    .replace(Direction::parse(v).map_err(|_| FilterError::Bad {
                        key: "direction",
                        value: v.to_string(),
                        why: "give in or out",
                    })?)
                    .is_none(),
            };
            if !fresh {
                return Err(FilterError::Twice(key));
            }
        }
        Ok(f)
    }

    pub fn matches(&self, c: &ConnRow) -> bool {
        self.pod
            .as_deref()
            .is_none_or(|want| c.pod.as_deref().is_some_and(|p| is_named(p, want)))
            && self.src.is_none_or(|m| c.src.is_some_and(|a| m.matches(a)))
            && self
                .dst
                .is_none_or(|m| m.matches(c.dst) || c.endpoint.is_some_and(|e| m.matches(e)))
            && self.proto.is_none_or(|m| m.matches(&c.protocol))
            && self
                .service
                .as_deref()
                .is_none_or(|s| c.service.as_deref() == Some(s) || c.backend.as_deref() == Some(s))
            && self.direction.is_none_or(|d| c.direction == d.as_str())
    }
}

/// `namespace/name`: a pod, or the workload its name starts with.
fn parse_pod(v: &str) -> Result<String, FilterError> {
    match v.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(v.to_string())
        }
        _ => Err(FilterError::Bad {
            key: "pod",
            value: v.to_string(),
            why: "give namespace/name (default/web-1), or namespace/workload (default/web) for its pods",
        }),
    }
}

/// `name` itself, or one of its `<name>-…`.
fn is_named(candidate: &str, name: &str) -> bool {
    candidate == name
        || candidate
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<ConnFilter, FilterError> {
        ConnFilter::from_pairs(pairs.iter().copied())
    }

    fn row() -> ConnRow {
        ConnRow {
            id: 1,
            direction: "out".into(),
            pod: Some("default/web-5d8f".into()),
            src: Some("10.1.0.2:40112".parse().unwrap()),
            dst: "10.96.0.10:80".parse().unwrap(),
            protocol: "h2".into(),
            service: Some("shop".into()),
            backend: Some("shop-v2".into()),
            endpoint: Some("10.2.0.7:8080".parse().unwrap()),
            tunnel: true,
            peer_identity: None,
            age_ms: 0,
            idle_ms: 0,
            bytes_out: 0,
            bytes_in: 0,
            requests: 0,
            kernel: None,
        }
    }

    fn shows(pairs: &[(&str, &str)]) -> bool {
        parse(pairs).unwrap().matches(&row())
    }

    #[test]
    fn each_key_narrows() {
        assert!(shows(&[]));
        assert!(shows(&[("pod", "default/web-5d8f")]));
        assert!(shows(&[("pod", "default/web")]), "a workload's pods");
        assert!(!shows(&[("pod", "default/we")]));
        assert!(!shows(&[("pod", "other/web-5d8f")]));
        assert!(shows(&[("src", "10.1.0.2")]));
        assert!(shows(&[("src", "10.1.0.2:40112")]));
        assert!(shows(&[("src", ":40112")]));
        assert!(shows(&[("src", "10.1.0.0/16")]));
        assert!(!shows(&[("src", "10.1.0.2:40113")]));
        assert!(!shows(&[("src", "10.1.0.3")]));
        // The original destination or the endpoint.
        assert!(shows(&[("dst", "10.96.0.10:80")]));
        assert!(shows(&[("dst", "10.2.0.7")]));
        assert!(shows(&[("dst", "*:8080")]));
        assert!(!shows(&[("dst", "10.2.0.8")]));
        assert!(shows(&[("proto", "h2")]));
        assert!(shows(&[("proto", "HTTP")]));
        assert!(!shows(&[("proto", "opaque")]));
        assert!(shows(&[("service", "shop")]));
        assert!(shows(&[("service", "shop-v2")]));
        assert!(!shows(&[("service", "shop-v1")]));
        assert!(shows(&[("direction", "out")]));
        assert!(!shows(&[("direction", "in")]));
        // Every key must match; an empty value is no filter.
        assert!(shows(&[
            ("pod", "default/web"),
            ("dst", ":80"),
            ("src", "")
        ]));
        assert!(!shows(&[("pod", "default/web"), ("dst", ":81")]));
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let m = AddrMatch::parse("dst", "[fd00::5]:8080").unwrap();
        assert!(m.matches("[fd00::5]:8080".parse().unwrap()));
        assert!(!m.matches("[fd00::5]:8081".parse().unwrap()));
        let m = AddrMatch::parse("dst", "fd00::/64").unwrap();
        assert!(m.matches("[fd00::9]:1".parse().unwrap()));
        // An IPv4 client seen on a dual-stack socket.
        let m = AddrMatch::parse("src", "10.1.0.2").unwrap();
        assert!(m.matches("[::ffff:10.1.0.2]:5".parse().unwrap()));
    }

    #[test]
    fn bad_filters_say_what_each_key_takes() {
        let err = |pairs: &[(&str, &str)]| parse(pairs).unwrap_err().to_string();
        let e = err(&[("dst", "10.0.0.300")]);
        assert!(
            e.starts_with("conns filter dst=\"10.0.0.300\": give an address"),
            "{e}"
        );
        assert!(e.contains("(:8080)"), "{e}");
        let e = err(&[("src", ":0")]);
        assert!(e.contains("port must be a number from 1 to 65535"), "{e}");
        let e = err(&[("src", ":http")]);
        assert!(e.contains("port must be"), "{e}");
        let e = err(&[("dst", "10.2.0.5:0")]);
        assert!(e.contains("port must be"), "{e}");
        let e = err(&[("pod", "web-1")]);
        assert!(e.contains("give namespace/name"), "{e}");
        let e = err(&[("pod", "a/b/c")]);
        assert!(e.contains("give namespace/name"), "{e}");
        let e = err(&[("proto", "quic")]);
        assert!(e.contains("give opaque, tls, http1, h2, grpc"), "{e}");
        let e = err(&[("direction", "sideways")]);
        assert!(e.contains("give in or out"), "{e}");
        let e = err(&[("port", "80")]);
        assert_eq!(
            e,
            "unknown conns filter \"port\"; the filters are pod, src, dst, proto, service, direction"
        );
        let e = err(&[("dst", ":80"), ("dst", ":81")]);
        assert_eq!(e, "conns filter dst is given twice");
    }
}
