//! Inbound tap: the requests this agent serves on tunnel streams for its
//! own pods (`proxy/inbound_request.rs`) show as `proxy=in` events, so a
//! tap on the receiving node sees what crossed to it, as `linkerd viz tap`
//! shows both sides.
//!
//! What the receiving side knows differs from the outbound side: the
//! source is the peer workload's identity, verified in the tunnel's client
//! certificate, and the calling pod's address as the sending agent named
//! it when it opened the stream (`forwarded: for=`; requests of one source
//! workload share pooled streams, so the port may be that of an earlier
//! connection of the same pod); the destination is known on arrival (the
//! `CONNECT` target, a pod of this node), so the `req` line is shown at
//! once. Every inbound request came through mTLS: `tls=true`.
//!
//! Opaque streams (not HTTP, or kept opaque by config) are one `tcp` event
//! when they close ([`TapHub::inbound_tcp_closed`]).
//!
//! The cost when nobody taps is the outbound one: one relaxed load.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::event::{self, Dst, Event, Meta, Src};
use super::filter::{Direction, DstView, SrcView};
use super::{TapHub, TapRequest, micros};
use crate::identity::SpiffeId;

/// What the tunnel stream tells of a request that arrived on it.
pub struct InboundArrival<'a> {
    /// The source workload, verified in the tunnel's client certificate.
    pub peer: &'a SpiffeId,
    /// The calling pod's address as the sending agent named it (the
    /// `CONNECT`'s `forwarded: for=` value).
    pub client: Option<&'a str>,
    /// The pod address the stream is for.
    pub target: SocketAddr,
    /// The pod's name, when the target is a pod of this node.
    pub pod: Option<&'a str>,
    /// The services the target is an endpoint of (events show the first;
    /// `to` matches any).
    pub services: &'a [String],
}

/// An opaque tunnel stream to a pod of this node that ended.
pub struct InboundTcp<'a> {
    pub arrival: InboundArrival<'a>,
    pub duration: Duration,
    /// Bytes from the client to the pod, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// `eof`, or `error` (then `error` says what broke).
    pub close: &'static str,
    pub error: Option<&'a str>,
}

impl InboundArrival<'_> {
    /// The source as filters see it, from the identity's two spellings.
    fn src<'a>(&self, identity: &'a str, workload: &'a str) -> SrcView<'a> {
        SrcView {
            pod: None,
            workload: Some(workload),
            identity: Some(identity),
            addr: client_addr(self.client),
        }
    }

    fn meta(&self, id: u64, identity: &str) -> Meta {
        Meta {
            id,
            proxy: event::INBOUND.into(),
            src: Src {
                addr: client_addr(self.client),
                pod: None,
                identity: Some(identity.to_string()),
            },
            dst: Dst {
                addr: self.target,
                dialled: self.target,
                service: self.services.first().cloned(),
                backend: None,
                pod: self.pod.map(str::to_string),
            },
            tls: event::TLS_TRUE.into(),
        }
    }

    /// The peer identity as its SPIFFE ID and as `<namespace>/<service
    /// account>`.
    fn identity(&self) -> (String, String) {
        (
            self.peer.to_string(),
            format!("{}/{}", self.peer.namespace(), self.peer.service_account()),
        )
    }
}

impl TapHub {
    /// An opaque stream through the tunnel closed; `conn` is only called
    /// while a tap is open.
    #[inline]
    pub fn inbound_tcp_closed<'a>(&self, conn: impl FnOnce() -> InboundTcp<'a>) {
        if self.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.tapped_inbound_tcp(conn());
    }

    #[cold]
    fn tapped_inbound_tcp(&self, c: InboundTcp<'_>) {
        let a = &c.arrival;
        let (identity, workload) = a.identity();
        let dst = DstView {
            addr: a.target,
            dialled: a.target,
            service: None,
            backend: None,
            pod: a.pod,
            services: a.services,
        };
        self.send_tcp(Direction::In, &a.src(&identity, &workload), &dst, |id| {
            Event::Tcp {
                meta: a.meta(id, &identity),
                bytes_out: c.bytes_out,
                bytes_in: c.bytes_in,
                duration_us: micros(c.duration),
                close: c.close.to_string(),
                error: c.error.map(str::to_string),
                source: None,
                reason: None,
            }
        });
    }

    /// A request arrived through the tunnel for a pod of this node. Returns
    /// its tap when an open tap may want it; with no tap open this is one
    /// relaxed load. Pass the result to [`super::response`].
    #[inline]
    pub fn inbound_request<B>(
        &self,
        arrival: &InboundArrival<'_>,
        req: &mut http::Request<B>,
    ) -> Option<Arc<TapRequest>> {
        if self.active.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.tapped_inbound(arrival, req)
    }

    #[cold]
    fn tapped_inbound<B>(
        &self,
        a: &InboundArrival<'_>,
        req: &mut http::Request<B>,
    ) -> Option<Arc<TapRequest>> {
        let (identity, workload) = a.identity();
        let src = a.src(&identity, &workload);
        let tap = self.start(Direction::In, src, req, || a.meta(0, &identity))?;
        tap.arrived(a.services);
        Some(tap)
    }
}

/// The client's address from `forwarded: for=` (`ip:port`, quotes already
/// taken off; `[v6]:port` too). A sending agent that named none, or
/// named it in a form this agent does not read, shows as `0.0.0.0:0`: the
/// verified identity still says who called.
fn client_addr(forwarded_for: Option<&str>) -> SocketAddr {
    forwarded_for
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use prometheus_client::registry::Registry;

    use super::super::event::Event;
    use super::super::filter::{Filter, Pods};
    use super::super::{TapStream, response};
    use super::*;
    use crate::http::body::full;

    fn hub() -> Arc<TapHub> {
        Arc::new(TapHub::new(&mut Registry::default()))
    }

    fn peer(sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap()
    }

    /// One inbound request through the hooks, as `proxy/inbound_tap.rs`
    /// calls them.
    async fn serve(hub: &TapHub, sa: &str, path: &str, status: u16) {
        let peer = peer(sa);
        let services = ["web".to_string(), "good".to_string()];
        let arrival = InboundArrival {
            peer: &peer,
            client: Some("10.1.0.2:40000"),
            target: "10.2.0.2:8080".parse().unwrap(),
            pod: Some("default/n1p0"),
            services: &services,
        };
        let mut req = http::Request::builder()
            .uri(path)
            .header("host", "web")
            .header("authorization", "Bearer s3cr3t")
            .body(())
            .unwrap();
        let tap = hub.inbound_request(&arrival, &mut req);
        let mut resp = http::Response::new(full("hello"));
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
        let resp = response(tap, resp);
        resp.into_body().collect().await.unwrap();
    }

    async fn drain(stream: &mut TapStream) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(Some(frame)) =
            tokio::time::timeout(Duration::from_millis(50), stream.frame()).await
        {
            let data = frame.unwrap().into_data().unwrap();
            out.push(serde_json::from_slice(&data).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn nothing_is_built_while_no_tap_is_open() {
        let hub = hub();
        let peer = peer("web");
        let arrival = InboundArrival {
            peer: &peer,
            client: None,
            target: "10.2.0.2:8080".parse().unwrap(),
            pod: None,
            services: &[],
        };
        let mut req = http::Request::new(());
        assert!(hub.inbound_request(&arrival, &mut req).is_none());
        assert!(req.extensions().get::<Arc<TapRequest>>().is_none());
    }

    #[tokio::test]
    async fn inbound_requests_are_req_rsp_end_with_the_peer_and_the_pod() {
        let hub = hub();
        let mut stream = hub.open(Filter::default()).unwrap();
        serve(&hub, "client", "/a?x=1", 200).await;
        let events = drain(&mut stream).await;
        assert_eq!(events.len(), 3, "{events:?}");
        let Event::Req {
            meta,
            path,
            headers,
            ..
        } = &events[0]
        else {
            panic!("{events:?}")
        };
        // Query values are redacted by default (`diagnostics.tap_redact_query`).
        assert_eq!(path, "/a?x=<redacted>");
        assert_eq!(meta.proxy, "in");
        assert_eq!(meta.tls, "true");
        assert_eq!(meta.src.addr, "10.1.0.2:40000".parse().unwrap());
        assert_eq!(
            meta.src.identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(meta.src.pod, None);
        assert_eq!(meta.dst.addr, "10.2.0.2:8080".parse().unwrap());
        assert_eq!(meta.dst.pod.as_deref(), Some("default/n1p0"));
        assert_eq!(meta.dst.service.as_deref(), Some("web"));
        let auth = headers.iter().find(|h| h.name == "authorization").unwrap();
        assert_eq!(auth.value, "Bearer <redacted>");
        assert!(matches!(&events[1], Event::Rsp { status: 200, meta, .. } if meta.proxy == "in"));
        assert!(matches!(
            &events[2],
            Event::End {
                response_bytes: 5,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn filters_select_inbound_requests() {
        let hub = hub();
        let pods = Pods(vec![(
            "default/n1p0".into(),
            vec!["10.2.0.2".parse().unwrap()],
        )]);
        let open = |q: &str| hub.open(Filter::from_query(q, &pods).unwrap()).unwrap();
        let mut by_path = open("path=/b&direction=in");
        let mut outbound_only = open("direction=out");
        let mut by_peer = open("from=default/client&to=default/n1p0");
        let mut by_second_service = open("to=good&max=1");
        let mut other_service = open("to=api");
        let mut other_peer = open("from=default/other");
        let mut failures = open("status=5xx&max=1");
        serve(&hub, "client", "/a", 200).await;
        serve(&hub, "client", "/b", 500).await;
        serve(&hub, "client", "/b", 503).await;
        let paths = |events: Vec<Event>| -> Vec<String> {
            events
                .into_iter()
                .filter_map(|e| match e {
                    Event::Req { path, .. } => Some(path),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(paths(drain(&mut by_path).await), ["/b", "/b"]);
        assert!(drain(&mut outbound_only).await.is_empty());
        assert_eq!(paths(drain(&mut by_peer).await), ["/a", "/b", "/b"]);
        assert!(drain(&mut other_peer).await.is_empty());
        assert_eq!(paths(drain(&mut by_second_service).await), ["/a"]);
        assert!(drain(&mut other_service).await.is_empty());
        let ev = drain(&mut failures).await;
        assert_eq!(ev.len(), 3, "one request, req/rsp/end: {ev:?}");
        assert!(matches!(&ev[1], Event::Rsp { status: 500, .. }));
    }

    #[tokio::test]
    async fn opaque_streams_are_one_tcp_event() {
        let hub = hub();
        let mut all = hub.open(Filter::default()).unwrap();
        let mut http_only = hub
            .open(Filter::from_query("path=/", &Pods::default()).unwrap())
            .unwrap();
        let mut outbound = hub
            .open(Filter::from_query("direction=out", &Pods::default()).unwrap())
            .unwrap();
        let peer = peer("client");
        hub.inbound_tcp_closed(|| InboundTcp {
            arrival: InboundArrival {
                peer: &peer,
                client: Some("10.1.0.2:40000"),
                target: "10.2.0.2:7000".parse().unwrap(),
                pod: Some("default/n1p0"),
                services: &[],
            },
            duration: Duration::from_millis(3),
            bytes_out: 100,
            bytes_in: 200,
            close: "eof",
            error: None,
        });
        let events = drain(&mut all).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let Event::Tcp {
            meta,
            bytes_out,
            bytes_in,
            duration_us,
            close,
            ..
        } = &events[0]
        else {
            panic!("{events:?}")
        };
        assert_eq!((meta.proxy.as_str(), meta.tls.as_str()), ("in", "true"));
        assert_eq!(
            meta.src.identity.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/client")
        );
        assert_eq!(meta.dst.pod.as_deref(), Some("default/n1p0"));
        assert_eq!((*bytes_out, *bytes_in, *duration_us), (100, 200, 3000));
        assert_eq!(close, "eof");
        assert!(drain(&mut http_only).await.is_empty());
        assert!(drain(&mut outbound).await.is_empty());
    }

    #[test]
    fn the_client_address_is_read_from_forwarded_for() {
        assert_eq!(
            client_addr(Some("10.1.0.2:1234")),
            "10.1.0.2:1234".parse().unwrap()
        );
        assert_eq!(
            client_addr(Some("[fd00:1::2]:1234")),
            "[fd00:1::2]:1234".parse().unwrap()
        );
        assert_eq!(client_addr(Some("unknown")), "0.0.0.0:0".parse().unwrap());
        assert_eq!(client_addr(None), "0.0.0.0:0".parse().unwrap());
    }
}
