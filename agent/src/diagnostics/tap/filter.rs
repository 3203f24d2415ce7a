//! Which requests a tap shows, read from the `/tap` query string.
//!
//! | key | matches |
//! |---|---|
//! | `from` | the source pod by name (`default/web-5d8f-x2`), its workload (`default/web`: pod names are `<workload>-…`), or its IP (a pod of this node's address means that pod); inbound, the peer's verified identity as `<namespace>/<service account>` (same workload rule) or as the whole SPIFFE ID, or the client's IP |
//! | `to` | the destination service (dialled or the route's backend; inbound, a service the pod is an endpoint of), a pod of this node by name, or an IP or IP:port (endpoint or dialled address) |
//! | `direction` | `in` (through the tunnel to a pod of this node) or `out` (from one) |
//! | `authority` | `:authority`/`Host`, exactly (case-insensitive) |
//! | `path` | a prefix of the path |
//! | `method` | the method, exactly |
//! | `status` | `2xx`, `4xx`, `5xx` (any `Nxx`) or one code such as `503` |
//! | `min_latency` | the response head took at least this long (`100ms`) |
//! | `max` | show this many requests, then end the stream |
//! | `duration` | end the stream after this long (`30s`) |
//!
//! Every given key must match. Request-side keys are decided when the
//! request arrives (`to` when its endpoint is picked); `status` and
//! `min_latency` when the response head is there, so a tap with them shows
//! a request's `req` line only then.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The pods of this node by name, with their addresses: the filter names
/// pods, the data path knows a connection's pod by name.
#[derive(Debug, Clone, Default)]
pub struct Pods(pub Vec<(String, Vec<IpAddr>)>);

impl Pods {
    pub fn ips(&self, name: &str) -> Option<&[IpAddr]> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ips)| ips.as_slice())
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, ips)| ips.contains(&ip))
            .map(|(n, _)| n.as_str())
    }
}

pub use crate::telemetry::conns::filter::Direction;

/// A parsed tap filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub from: Option<Source>,
    pub direction: Option<Direction>,
    pub to: Option<To>,
    pub authority: Option<String>,
    pub path: Option<String>,
    pub method: Option<http::Method>,
    pub status: Option<Status>,
    pub min_latency: Option<Duration>,
    pub max: Option<u64>,
    pub duration: Option<Duration>,
}

/// A source, as given.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A pod (by name, or by an address of a pod of this node).
    Pod(String),
    /// A pod, or a workload whose pods are named `<name>-…`; inbound, the
    /// peer identity's `<namespace>/<service account>` by the same rule, or
    /// its whole SPIFFE ID.
    Name(String),
    Ip(IpAddr),
}

/// A destination, as given.
#[derive(Debug, Clone, PartialEq)]
pub enum To {
    Addr(SocketAddr),
    Ip(IpAddr),
    /// A service name, or a pod of this node's name (with its addresses).
    Name {
        name: String,
        pod_ips: Vec<IpAddr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `5xx`: the hundreds digit.
    Class(u16),
    Code(u16),
}

/// Who sent a request or opened a connection.
#[derive(Debug, Clone, Copy)]
pub struct SrcView<'a> {
    /// The pod of this node it came from (outbound).
    pub pod: Option<&'a str>,
    /// The verified peer identity as `<namespace>/<service account>`, and
    /// as its SPIFFE ID (inbound).
    pub workload: Option<&'a str>,
    pub identity: Option<&'a str>,
    pub addr: SocketAddr,
}

impl<'a> SrcView<'a> {
    /// A pod of this node, at `addr`.
    pub fn pod(pod: &'a str, addr: SocketAddr) -> Self {
        SrcView {
            pod: Some(pod),
            workload: None,
            identity: None,
            addr,
        }
    }
}

/// What is known of a request when it arrives.
pub struct RequestView<'a> {
    pub direction: Direction,
    pub src: SrcView<'a>,
    pub method: &'a http::Method,
    pub authority: Option<&'a str>,
    pub path: &'a str,
}

/// Where it went (the endpoint once picked, else where it was dialled).
pub struct DstView<'a> {
    pub addr: SocketAddr,
    pub dialled: SocketAddr,
    pub service: Option<&'a str>,
    pub backend: Option<&'a str>,
    /// The pod of this node it went to, when known by name (inbound).
    pub pod: Option<&'a str>,
    /// Every service the destination is an endpoint of (inbound: the
    /// `CONNECT` names the pod, not the service dialled).
    pub services: &'a [String],
}

/// Keys the `/tap` endpoint accepts.
pub const KEYS: [&str; 10] = [
    "from",
    "to",
    "direction",
    "authority",
    "path",
    "method",
    "status",
    "min_latency",
    "max",
    "duration",
];

impl Filter {
    /// Parses a query string (`from=default/web&status=5xx`); `pod_ips`
    /// gives the addresses of a pod of this node by name, for `to`. Unknown
    /// keys and bad values are errors that say what is accepted.
    pub fn from_query(query: &str, pods: &Pods) -> Result<Filter, String> {
        let mut f = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = crate::http::query::decode(k).map_err(|e| e.to_string())?;
            let v = crate::http::query::decode(v).map_err(|e| e.to_string())?;
            let v = v.trim();
            if v.is_empty() {
                return Err(format!("tap filter {k:?} has no value"));
            }
            match k.as_str() {
                "from" => {
                    f.from = Some(match v.parse::<IpAddr>() {
                        Ok(ip) => match pods.by_ip(ip) {
                            Some(pod) => Source::Pod(pod.to_string()),
                            None => Source::Ip(ip),
                        },
                        Err(_) => Source::Name(v.to_string()),
                    })
                }
                "to" => {
                    f.to = Some(if let Ok(a) = v.parse::<SocketAddr>() {
                        To::Addr(a)
                    } else if let Ok(ip) = v.parse::<IpAddr>() {
                        To::Ip(ip)
                    } else {
                        To::Name {
                            name: v.to_string(),
                            pod_ips: pods.ips(v).map(<[IpAddr]>::to_vec).unwrap_or_default(),
                        }
                    })
                }
                "direction" => f.direction = Some(Direction::parse(v)?),
                "authority" => f.authority = Some(v.to_ascii_lowercase()),
                "path" => {
                    if !v.starts_with('/') {
                        return Err(format!("tap path prefix {v:?} must start with /"));
                    }
                    f.path = Some(v.to_string())
                }
                "method" => {
                    f.method = Some(
                        http::Method::from_bytes(v.to_ascii_uppercase().as_bytes())
                            .map_err(|_| format!("{v:?} is not an HTTP method"))?,
                    )
                }
                "status" => f.status = Some(parse_status(v)?),
                "min_latency" => f.min_latency = Some(parse_duration(&k, v)?),
                "max" => {
                    let n: u64 = v
                        .parse()
                        .map_err(|_| format!("tap max {v:?} is not a count"))?;
                    if n == 0 {
                        return Err("tap max must be at least 1".into());
                    }
                    f.max = Some(n)
                }
                "duration" => f.duration = Some(parse_duration(&k, v)?),
                other => {
                    return Err(format!(
                        "unknown tap filter {other:?}; known: {}",
                        KEYS.join(", ")
                    ));
                }
            }
        }
        Ok(f)
    }

    /// The filter as a query string.
    #[cfg(test)]
    pub fn to_query(&self) -> String {
        let mut q: Vec<String> = Vec::new();
        let mut put =
            |k: &str, v: String| q.push(format!("{k}={}", crate::http::query::encode(&v)));
        if let Some(v) = &self.from {
            put(
                "from",
                match v {
                    Source::Pod(p) | Source::Name(p) => p.clone(),
                    Source::Ip(ip) => ip.to_string(),
                },
            );
        }
        if let Some(v) = &self.to {
            put(
                "to",
                match v {
                    To::Addr(a) => a.to_string(),
                    To::Ip(ip) => ip.to_string(),
                    To::Name { name, .. } => name.clone(),
                },
            );
        }
        if let Some(v) = self.direction {
            put("direction", v.as_str().to_string());
        }
        if let Some(v) = &self.authority {
            put("authority", v.clone());
        }
        if let Some(v) = &self.path {
            put("path", v.clone());
        }
        if let Some(v) = &self.method {
            put("method", v.to_string());
        }
        if let Some(v) = self.status {
            put(
                "status",
                match v {
                    Status::Class(c) => format!("{c}xx"),
                    Status::Code(c) => c.to_string(),
                },
            );
        }
        if let Some(v) = self.min_latency {
            put("min_latency", humantime::format_duration(v).to_string());
        }
        if let Some(v) = self.max {
            put("max", v.to_string());
        }
        if let Some(v) = self.duration {
            put("duration", humantime::format_duration(v).to_string());
        }
        q.join("&")
    }

    /// Whether the request's own properties match (direction, source,
    /// authority, path, method).
    pub fn matches_request(&self, r: &RequestView<'_>) -> bool {
        if self.direction.is_some_and(|d| d != r.direction) {
            return false;
        }
        if let Some(from) = &self.from
            && !matches_source(from, &r.src)
        {
            return false;
        }
        if let Some(a) = &self.authority
            && !r.authority.is_some_and(|x| x.eq_ignore_ascii_case(a))
        {
            return false;
        }
        if let Some(p) = &self.path
            && !r.path.starts_with(p.as_str())
        {
            return false;
        }
        if let Some(m) = &self.method
            && m != r.method
        {
            return false;
        }
        true
    }

    /// Whether the destination matches `to`.
    pub fn matches_dst(&self, d: &DstView<'_>) -> bool {
        match &self.to {
            None => true,
            Some(To::Addr(a)) => d.addr == *a || d.dialled == *a,
            Some(To::Ip(ip)) => d.addr.ip() == *ip || d.dialled.ip() == *ip,
            Some(To::Name { name, pod_ips }) => {
                d.service == Some(name.as_str())
                    || d.backend == Some(name.as_str())
                    || d.pod == Some(name.as_str())
                    || d.services.iter().any(|s| s == name)
                    || pod_ips.contains(&d.addr.ip())
            }
        }
    }

    /// Whether an opaque TCP connection matches: only `from`, `to` and
    /// `direction` can (a filter with an HTTP key takes none).
    pub fn matches_tcp(&self, direction: Direction, src: &SrcView<'_>, dst: &DstView<'_>) -> bool {
        let http_only = self.authority.is_some()
            || self.path.is_some()
            || self.method.is_some()
            || self.status.is_some()
            || self.min_latency.is_some();
        !http_only
            && self.direction.is_none_or(|d| d == direction)
            && self.from.as_ref().is_none_or(|f| matches_source(f, src))
            && self.matches_dst(dst)
    }

    /// Whether the filter needs the response head to decide.
    pub fn needs_response(&self) -> bool {
        self.status.is_some() || self.min_latency.is_some()
    }

    /// Whether the response head matches `status` and `min_latency`.
    pub fn matches_response(&self, status: u16, latency: Duration) -> bool {
        let status_ok = match self.status {
            None => true,
            Some(Status::Class(c)) => status / 100 == c,
            Some(Status::Code(c)) => status == c,
        };
        status_ok && self.min_latency.is_none_or(|m| latency >= m)
    }
}

/// `from`: the pod itself, a workload whose pods are named `<from>-…`, or
/// the source IP. Inbound the peer identity stands for the pod: its
/// `<namespace>/<service account>` by the same rule (a workload's service
/// account is usually named after it), or its whole SPIFFE ID.
fn matches_source(from: &Source, src: &SrcView<'_>) -> bool {
    match from {
        Source::Pod(p) => src.pod == Some(p.as_str()),
        Source::Name(n) if n.starts_with("spiffe://") => src.identity == Some(n.as_str()),
        Source::Name(n) => {
            src.pod.is_some_and(|p| is_named(p, n)) || src.workload.is_some_and(|w| is_named(w, n))
        }
        Source::Ip(ip) => src.addr.ip() == *ip,
    }
}

/// `name` itself, or one of its `<name>-…`.
fn is_named(candidate: &str, name: &str) -> bool {
    candidate == name
        || candidate
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('-'))
}

fn parse_status(v: &str) -> Result<Status, String> {
    let bad = || format!("tap status {v:?}: give a class such as 5xx or a code such as 503");
    let lower = v.to_ascii_lowercase();
    if let Some(d) = lower.strip_suffix("xx") {
        let c: u16 = d.parse().map_err(|_| bad())?;
        if !(1..=5).contains(&c) {
            return Err(bad());
        }
        return Ok(Status::Class(c));
    }
    let c: u16 = v.parse().map_err(|_| bad())?;
    if !(100..=599).contains(&c) {
        return Err(bad());
    }
    Ok(Status::Code(c))
}

fn parse_duration(key: &str, v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v).map_err(|e| format!("tap {key} {v:?}: {e} (e.g. 100ms, 30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Filter {
        Filter::from_query(q, &Pods::default()).unwrap()
    }

    fn req<'a>(pod: &'a str, method: &'a http::Method, path: &'a str) -> RequestView<'a> {
        RequestView {
            direction: Direction::Out,
            src: SrcView::pod(pod, "10.1.0.2:40000".parse().unwrap()),
            method,
            authority: Some("Web.Test"),
            path,
        }
    }

    fn dst(addr: &str, service: &str) -> DstView<'static> {
        DstView {
            addr: addr.parse().unwrap(),
            dialled: "10.96.0.10:80".parse().unwrap(),
            service: Some(Box::leak(service.to_string().into_boxed_str())),
            backend: Some("web-v2"),
            pod: None,
            services: &[],
        }
    }

    #[test]
    fn parses_every_key() {
        let f = parse(
            "from=default%2Fweb&to=web&direction=out&authority=Web.Test&path=/api&method=post&status=5xx&min_latency=100ms&max=10&duration=30s",
        );
        assert_eq!(f.direction, Some(Direction::Out));
        assert_eq!(f.from, Some(Source::Name("default/web".into())));
        assert_eq!(
            f.to,
            Some(To::Name {
                name: "web".into(),
                pod_ips: vec![]
            })
        );
        assert_eq!(f.authority.as_deref(), Some("web.test"));
        assert_eq!(f.path.as_deref(), Some("/api"));
        assert_eq!(f.method, Some(http::Method::POST));
        assert_eq!(f.status, Some(Status::Class(5)));
        assert_eq!(f.min_latency, Some(Duration::from_millis(100)));
        assert_eq!(f.max, Some(10));
        assert_eq!(f.duration, Some(Duration::from_secs(30)));
        assert!(f.needs_response());
        // And back: the CLI's query parses to the same filter.
        assert_eq!(parse(&f.to_query()), f);
        assert_eq!(parse(""), Filter::default());
        assert!(!parse("path=/a").needs_response());
    }

    #[test]
    fn to_takes_addresses_and_pods() {
        assert_eq!(
            parse("to=10.2.0.2:8080").to,
            Some(To::Addr("10.2.0.2:8080".parse().unwrap()))
        );
        assert_eq!(
            parse("to=%5Bfd00%3A2%3A%3A2%5D%3A8080").to,
            Some(To::Addr("[fd00:2::2]:8080".parse().unwrap()))
        );
        assert_eq!(
            parse("to=10.2.0.2").to,
            Some(To::Ip("10.2.0.2".parse().unwrap()))
        );
        let pods = Pods(vec![(
            "default/n1p0".into(),
            vec!["10.2.0.2".parse().unwrap()],
        )]);
        let f = Filter::from_query("to=default/n1p0", &pods).unwrap();
        assert!(f.matches_dst(&dst("10.2.0.2:8080", "other")));
        assert!(!f.matches_dst(&dst("10.2.0.3:8080", "other")));
        // A pod's address as the source means the pod.
        let f = Filter::from_query("from=10.2.0.2", &pods).unwrap();
        assert_eq!(f.from, Some(Source::Pod("default/n1p0".into())));
        let get = http::Method::GET;
        assert!(f.matches_request(&req("default/n1p0", &get, "/")));
        assert!(!f.matches_request(&req("default/n1p0-x", &get, "/")));
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for (q, says) in [
            ("colour=red", "unknown tap filter"),
            ("status=6xx", "class such as 5xx"),
            ("status=abc", "class such as 5xx"),
            ("status=99", "class such as 5xx"),
            ("min_latency=fast", "min_latency"),
            ("max=0", "at least 1"),
            ("max=-1", "not a count"),
            ("method=G%20T", "not an HTTP method"),
            ("path=api", "must start with /"),
            ("from=", "no value"),
            ("path=%zz", "percent-encoding"),
        ] {
            let e = Filter::from_query(q, &Pods::default()).unwrap_err();
            assert!(e.contains(says), "{q}: {e}");
        }
    }

    #[test]
    fn request_keys_all_must_match() {
        let get = http::Method::GET;
        let post = http::Method::POST;
        let f = parse("from=default/web&path=/api&method=GET&authority=web.test");
        assert!(f.matches_request(&req("default/web-5d8f-x2", &get, "/api/users?id=1")));
        assert!(f.matches_request(&req("default/web", &get, "/api")));
        // Another workload that merely shares a prefix.
        assert!(!f.matches_request(&req("default/webhook-1", &get, "/api")));
        assert!(!f.matches_request(&req("default/web-1", &post, "/api")));
        assert!(!f.matches_request(&req("default/web-1", &get, "/home")));
        let mut r = req("default/web-1", &get, "/api");
        r.authority = Some("other");
        assert!(!f.matches_request(&r));
        r.authority = None;
        assert!(!f.matches_request(&r));
        // Source an IP.
        let f = parse("from=10.1.0.2");
        assert!(f.matches_request(&req("default/x", &get, "/")));
        let f = parse("from=10.1.0.3");
        assert!(!f.matches_request(&req("default/x", &get, "/")));
        // The empty filter takes everything.
        assert!(parse("").matches_request(&req("a", &post, "/")));
    }

    #[test]
    fn destination_matches_service_backend_or_address() {
        let d = dst("10.2.0.2:8080", "web");
        assert!(parse("to=web").matches_dst(&d));
        assert!(parse("to=web-v2").matches_dst(&d));
        assert!(!parse("to=api").matches_dst(&d));
        assert!(parse("to=10.2.0.2:8080").matches_dst(&d));
        assert!(parse("to=10.96.0.10:80").matches_dst(&d));
        assert!(!parse("to=10.2.0.2:9090").matches_dst(&d));
        assert!(parse("to=10.2.0.2").matches_dst(&d));
        assert!(parse("").matches_dst(&d));
    }

    #[test]
    fn tcp_connections_match_only_source_and_destination() {
        let src = SrcView::pod("default/a", "10.1.0.2:40000".parse().unwrap());
        let d = DstView {
            addr: "10.2.0.2:7000".parse().unwrap(),
            dialled: "10.2.0.2:7000".parse().unwrap(),
            service: None,
            backend: None,
            pod: None,
            services: &[],
        };
        let out = Direction::Out;
        assert!(parse("").matches_tcp(out, &src, &d));
        assert!(parse("from=default/a&to=10.2.0.2").matches_tcp(out, &src, &d));
        assert!(parse("direction=out").matches_tcp(out, &src, &d));
        assert!(!parse("direction=in").matches_tcp(out, &src, &d));
        assert!(!parse("from=default/b").matches_tcp(out, &src, &d));
        assert!(!parse("to=10.2.0.3").matches_tcp(out, &src, &d));
        assert!(!parse("path=/").matches_tcp(out, &src, &d));
        assert!(!parse("status=2xx").matches_tcp(out, &src, &d));
    }

    /// Inbound, the source is the peer's verified identity (and the
    /// client's address), the destination a pod of this node by name.
    #[test]
    fn inbound_requests_match_by_peer_identity_and_pod() {
        let get = http::Method::GET;
        let inbound = |workload: &'static str| RequestView {
            direction: Direction::In,
            src: SrcView {
                pod: None,
                workload: Some(workload),
                identity: Some(Box::leak(
                    format!(
                        "spiffe://cluster.local/ns/{}",
                        workload.replace('/', "/sa/")
                    )
                    .into_boxed_str(),
                )),
                addr: "10.1.0.2:40000".parse().unwrap(),
            },
            method: &get,
            authority: None,
            path: "/b",
        };
        let r = inbound("default/web");
        assert!(parse("from=default/web").matches_request(&r));
        assert!(parse("from=spiffe://cluster.local/ns/default/sa/web").matches_request(&r));
        assert!(parse("from=10.1.0.2").matches_request(&r));
        assert!(parse("direction=in&path=/b").matches_request(&r));
        assert!(!parse("from=spiffe://cluster.local/ns/default/sa/we").matches_request(&r));
        assert!(!parse("from=default/api").matches_request(&r));
        assert!(!parse("from=10.1.0.3").matches_request(&r));
        assert!(!parse("direction=out").matches_request(&r));
        // A workload's service account, with instance suffixes.
        assert!(parse("from=default/web").matches_request(&inbound("default/web-canary")));
        assert!(!parse("from=default/web").matches_request(&inbound("default/webhook")));
        // Outbound requests have no peer identity to match.
        assert!(
            !parse("from=spiffe://cluster.local/ns/default/sa/web").matches_request(&req(
                "default/web",
                &get,
                "/"
            ))
        );
        assert!(parse("direction=OUT").matches_request(&req("default/web", &get, "/")));

        let pods = Pods(vec![(
            "default/n1p0".into(),
            vec!["10.2.0.2".parse().unwrap()],
        )]);
        let d = DstView {
            addr: "10.2.0.2:8080".parse().unwrap(),
            dialled: "10.2.0.2:8080".parse().unwrap(),
            service: Some("web"),
            backend: None,
            pod: Some("default/n1p0"),
            services: &["web".to_string(), "good".to_string()],
        };
        for q in [
            "to=default/n1p0",
            "to=web",
            "to=10.2.0.2:8080",
            "to=10.2.0.2",
        ] {
            assert!(Filter::from_query(q, &pods).unwrap().matches_dst(&d), "{q}");
            assert!(parse(q).matches_dst(&d), "{q} without the pod list");
        }
        assert!(!parse("to=default/n1p1").matches_dst(&d));
    }

    #[test]
    fn direction_takes_in_or_out() {
        assert_eq!(parse("direction=in").direction, Some(Direction::In));
        assert_eq!(parse("direction=inbound").direction, Some(Direction::In));
        assert_eq!(parse("direction=Out").direction, Some(Direction::Out));
        let e = Filter::from_query("direction=up", &Pods::default()).unwrap_err();
        assert!(e.contains("in or out"), "{e}");
        assert_eq!(
            parse(&parse("direction=in&max=2").to_query()),
            parse("direction=in&max=2")
        );
    }

    #[test]
    fn status_classes_codes_and_latency() {
        let ms = Duration::from_millis;
        let f = parse("status=5xx");
        assert!(f.matches_response(503, ms(1)));
        assert!(f.matches_response(500, ms(1)));
        assert!(!f.matches_response(404, ms(1)));
        assert!(!f.matches_response(200, ms(1)));
        let f = parse("status=2XX");
        assert!(f.matches_response(204, ms(1)));
        let f = parse("status=404");
        assert!(f.matches_response(404, ms(1)));
        assert!(!f.matches_response(403, ms(1)));
        let f = parse("min_latency=100ms&status=2xx");
        assert!(f.matches_response(200, ms(100)));
        assert!(!f.matches_response(200, ms(99)));
        assert!(!f.matches_response(500, ms(500)));
    }

    #[test]
    fn percent_coding() {}
}
