//! HTTP on the receiving agent: what arrives through a tunnel stream is
//! looked at before it reaches the pod, so a traced request gets this
//! hop's block too, and inbound requests are counted.
//!
//! Per admitted stream:
//! - the target port is in `proxy.opaque_ports`, or a service the target
//!   is an endpoint of says `protocol = "opaque"`: bytes are spliced, as
//!   without this module;
//! - otherwise the first bytes the outbound agent sends are read (bounded
//!   by [`detect::MAX_PEEK`] and `proxy.detect_timeout`) and classified as
//!   the outbound side does. HTTP/1.x is served with the proxy's own codec
//!   ([`crate::http::h1`]), HTTP/2 prior knowledge with hyper
//!   ([`crate::proxy::inbound::request`] forwards each request to the
//!   pod); anything else is spliced, the bytes read so far first, so opaque
//!   traffic stays byte-exact.
//!
//! A server-speaks-first protocol (SMTP, MySQL) would otherwise wait out
//! the detection timeout a second time here: the pod's greeting arriving
//! before any client byte ends detection at once as opaque — unless it is
//! an HTTP/2 server's SETTINGS frame (h2 servers send theirs on accept), or
//! a service of the target declares HTTP.

use std::collections::HashMap;
use std::future::pending;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;
use tracing::{Instrument, debug};

use crate::config::Config;
use crate::config::services::ProtocolHint;
use crate::diagnostics::tap::TapHub;
use crate::discovery::Discovery;
use crate::http::body::{ProxyBody, incoming};
use crate::http::drain::{self, Activity};
use crate::http::h1;
use crate::http::pool::Version;
use crate::kernel::KernelDiag;
use crate::proxy::detect::{self, Protocol, Verdict};
use crate::proxy::inbound::authz::InboundAuthz;
use crate::proxy::inbound::request::{PodConn, StreamCtx};
use crate::proxy::inbound::tap::forwarded_for;
use crate::proxy::inbound::tcp::{Counted, InboundConn};
use crate::proxy::inbound::{Admitted, HandleFuture, StreamHandler};
use crate::proxy::outbound::http_server::{
    HEADER_READ_TIMEOUT, MAX_H1_HEAD, MAX_H2_HEADER_LIST, MAX_H2_STREAMS,
};
use crate::telemetry::conns::{ConnProtocol, ConnTable, NewConn};
use crate::telemetry::http_metrics::HttpMetrics;
use crate::telemetry::metrics::TcpMetrics;
use crate::transport::coalesce::Coalesce;
use crate::transport::rewind::Rewind;

/// The inbound HTTP side, shared by every tunnel stream.
pub struct InboundHttp {
    pub(super) node: String,
    pub(super) metrics: Arc<HttpMetrics>,
    discovery: Arc<Discovery>,
    pub(super) authz: Arc<InboundAuthz>,
    /// This node's pods by address (pods change with a restart only).
    pub(super) pods: HashMap<IpAddr, String>,
    opaque_ports: Vec<u16>,
    detect_timeout: Duration,
    pub(super) connect_timeout: Duration,
    /// Set once the kernel diagnostics are loaded (after the listener).
    pub(super) kernel: OnceLock<Arc<KernelDiag>>,
    /// Set once the tap hub exists (`crate::proxy::inbound::tap`).
    pub(super) tap: OnceLock<Arc<TapHub>>,
    /// `tcp_*{direction="inbound"}`: one connection per admitted stream.
    tcp: Arc<TcpMetrics>,
    /// Every open connection (`waymark conns`); each admitted stream is one.
    conns: Arc<ConnTable>,
    /// Node-wide bound on buffered bytes (`TRACE` bodies here).
    pub(super) buffer_budget: Arc<crate::http::budget::BufferBudget>,
}

impl InboundHttp {
    pub fn new(
        config: &Config,
        metrics: Arc<HttpMetrics>,
        tcp: Arc<TcpMetrics>,
        discovery: Arc<Discovery>,
        authz: Arc<InboundAuthz>,
        conns: Arc<ConnTable>,
        buffer_budget: Arc<crate::http::budget::BufferBudget>,
    ) -> Arc<Self> {
        let pods = config
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| (*ip, p.name.clone())))
            .collect();
        Arc::new(Self {
            node: config.node.name.clone(),
            metrics,
            discovery,
            authz,
            pods,
            opaque_ports: config.proxy.opaque_ports.clone(),
            detect_timeout: config.proxy.detect_timeout,
            connect_timeout: config.outbound.connect_timeout,
            kernel: OnceLock::new(),
            tcp,
            tap: OnceLock::new(),
            conns,
            buffer_budget,
        })
    }

    /// Lets `waymark tap` show the requests served here (`proxy=in`).
    pub fn set_tap(&self, tap: Arc<TapHub>) {
        let _ = self.tap.set(tap);
    }

    /// Lets traces carry the kernel's view of the connection to the pod.
    pub fn set_kernel(&self, kernel: Arc<KernelDiag>) {
        let _ = self.kernel.set(kernel);
    }

    /// Whether the config says never to look at this target's bytes.
    fn opaque_by_config(&self, target: SocketAddr, services: &[String]) -> bool {
        if self.opaque_ports.contains(&target.port()) {
            return true;
        }
        let table = self.discovery.current();
        services.iter().any(|s| {
            table
                .by_name(s)
                .is_some_and(|s| s.protocol == ProtocolHint::Opaque)
        })
    }

    /// Whether a service of the target declares HTTP (then the pod's first
    /// bytes, an HTTP/2 server's SETTINGS say, are no greeting).
    fn http_by_config(&self, services: &[String]) -> bool {
        let table = self.discovery.current();
        services.iter().any(|s| {
            table.by_name(s).is_some_and(|s| {
                matches!(
                    s.protocol,
                    ProtocolHint::Http1 | ProtocolHint::Http2 | ProtocolHint::Grpc
                )
            })
        })
    }

    async fn serve(self: Arc<Self>, stream: Admitted) {
        // The generation the stream was admitted under (read before the
        // admission's decision could be stale by more than one reload).
        let admitted_under = self.authz.generation();
        let Admitted {
            peer,
            target,
            headers,
            stop,
            tunnel,
            upstream,
        } = stream;
        let mut opened = InboundConn::open(
            self.tcp.clone(),
            self.pods.get(&target.ip()).map(String::as_str),
            target,
        );
        let services = self
            .discovery
            .current()
            .services_of_endpoint(&target)
            .to_vec();
        let live = self.conns.open(NewConn {
            direction: crate::diagnostics::tap::filter::Direction::In,
            pod: self.pods.get(&target.ip()).cloned(),
            src: forwarded_for(&headers).and_then(|f| f.parse().ok()),
            dst: target,
            client_flow: None,
            protocol: ConnProtocol::Detecting,
        });
        // The pod's side is a TCP connection of its own: the kernel's
        // counters join on it (one getsockname, only while they count).
        let pod_flow = self
            .conns
            .flows_wanted()
            .then(|| upstream.local_addr().ok().map(|l| (l, target)))
            .flatten();
        live.set_inbound(services.first().map(String::as_str), &peer.id, pod_flow);
        let mut tunnel = Counted::new(tunnel, opened.byte_counters())
            .with_activity(Some(live.activity().clone()));
        if self.opaque_by_config(target, &services) {
            debug!("opaque by config; splicing");
            live.set_protocol(ConnProtocol::Opaque);
            if self
                .splice(&peer, &headers, target, &services, tunnel, upstream)
                .await
            {
                opened.failed("error");
            }
            return;
        }
        let watch_pod = !self.http_by_config(&services);
        let (protocol, prefix) =
            first_bytes(&mut tunnel, &upstream, self.detect_timeout, watch_pod).await;
        debug!(protocol = protocol.as_str(), "inbound protocol detected");
        live.set_protocol(protocol.into());
        let tunnel = Rewind::new(prefix.freeze(), tunnel);
        let version = match protocol {
            Protocol::Http1 => Version::Http1,
            Protocol::Http2 => Version::Http2,
            Protocol::Tls | Protocol::Opaque => {
                if self
                    .splice(&peer, &headers, target, &services, tunnel, upstream)
                    .await
                {
                    opened.failed("error");
                }
                return;
            }
        };
        let client = forwarded_for(&headers).map(str::to_string);
        let ctx = Arc::new(StreamCtx {
            peer,
            target,
            pod: self.pods.get(&target.ip()).cloned(),
            service: services.first().cloned(),
            services,
            client,
            version,
            authz_generation: admitted_under.into(),
        });
        let conn = Arc::new(PodConn::new(
            target,
            version,
            upstream,
            self.connect_timeout,
        ));
        let this = self.clone();
        let activity = Arc::new(Activity::new(stop));
        let svc_activity = activity.clone();
        let live = Arc::new(live);
        let svc_live = live.clone();
        let handle = move |req: Request<ProxyBody>| {
            let this = this.clone();
            let ctx = ctx.clone();
            let conn = conn.clone();
            svc_live.request(ctx.version == Version::Http2 && crate::http::message::is_grpc(&req));
            let in_flight = svc_activity.begin();
            // Boxed: see `outbound::http_server` (the connection's future
            // holds no room for a request while idle), allocated before the
            // future is made (`in_box`).
            crate::in_box::in_box!(
                async move {
                    let mut resp = this.request(&ctx, &conn, req).await;
                    drain::mark_last(ctx.version, in_flight.activity(), &mut resp);
                    drop(in_flight);
                    resp
                }
                .in_current_span(),
            )
        };
        let result = match version {
            Version::Http1 => {
                let config = h1::Config {
                    max_head: MAX_H1_HEAD,
                    header_read_timeout: HEADER_READ_TIMEOUT,
                };
                let codec_stop = h1::Stop::default();
                let conn = std::pin::pin!(h1::serve(tunnel, config, &codec_stop, handle));
                drain::until_drained(conn, version, &activity, pending, |_| codec_stop.ask())
                    .await
                    .map_err(|e| e.to_string())
            }
            Version::Http2 => {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let resp = handle(req.map(incoming));
                    async move { Ok::<_, std::convert::Infallible>(resp.await) }
                });
                let conn = std::pin::pin!(
                    http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(MAX_H2_STREAMS)
                        .max_header_list_size(MAX_H2_HEADER_LIST)
                        .serve_connection(TokioIo::new(Coalesce::new(tunnel)), svc)
                );
                drain::until_drained(conn, version, &activity, pending, |c| c.graceful_shutdown())
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "inbound HTTP stream ended with an error");
            opened.failed("error");
        }
    }
}

/// A tunnel stream has no readiness to wait on without reading: an idle
/// stream waits in a read (of the codec's small head buffer).
impl h1::Io for Rewind<Counted<TokioIo<hyper::upgrade::Upgraded>>> {}

impl StreamHandler for InboundHttp {
    fn handle(self: Arc<Self>, stream: Admitted) -> HandleFuture {
        Box::pin(self.serve(stream))
    }
}

/// Reads the client's first bytes until they say what protocol this is,
/// the pod speaks first, the client closes, or `timeout` passes. Returns
/// the verdict and every byte read (to be replayed). `watch_pod` false:
/// the pod is known to speak HTTP, whatever it sends first.
async fn first_bytes<T>(
    tunnel: &mut T,
    upstream: &TcpStream,
    timeout: Duration,
    mut watch_pod: bool,
) -> (Protocol, BytesMut)
where
    T: tokio::io::AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if buf.len() >= detect::MAX_PEEK {
            return (Protocol::Opaque, buf);
        }
        tokio::select! {
            read = tunnel.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return (Protocol::Opaque, buf),
                Ok(_) => match detect::classify(&buf) {
                    Verdict::Is(p) => return (p, buf),
                    Verdict::NeedMore => {}
                },
            },
            ready = upstream.ready(Interest::READABLE), if watch_pod => {
                if ready.is_err() {
                    return (Protocol::Opaque, buf);
                }
                match pod_said(upstream) {
                    PodSaid::Nothing => {}
                    PodSaid::Greeting => return (Protocol::Opaque, buf),
                    // An HTTP/2 server sends its SETTINGS at once; that is
                    // no greeting, the client still speaks first.
                    PodSaid::H2Settings => watch_pod = false,
                    PodSaid::TooShort => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
            _ = tokio::time::sleep_until(deadline) => return (Protocol::Opaque, buf),
        }
    }
}

/// What the pod sent before the client said anything.
#[derive(Debug, PartialEq, Eq)]
enum PodSaid {
    /// Nothing yet (readiness can be spurious).
    Nothing,
    /// A server-speaks-first greeting (or it closed).
    Greeting,
    /// The start of an HTTP/2 server preface (a SETTINGS frame).
    H2Settings,
    /// Too little to tell yet.
    TooShort,
}

/// Peeks (without consuming) at what the pod sent.
fn pod_said(upstream: &TcpStream) -> PodSaid {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 9];
    let peeked = upstream.try_io(Interest::READABLE, || {
        nix::sys::socket::recv(
            upstream.as_raw_fd(),
            &mut b,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)
    });
    match peeked {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => PodSaid::Nothing,
        Err(_) | Ok(0) => PodSaid::Greeting,
        Ok(n) => classify_pod_bytes(&b[..n]),
    }
}

/// A frame header of type SETTINGS (4) on stream 0 is an HTTP/2 server's
/// preface (RFC 9113 §3.4); anything else is a greeting.
fn classify_pod_bytes(b: &[u8]) -> PodSaid {
    match b.get(3) {
        None => PodSaid::TooShort,
        Some(4) if b.len() < 9 => PodSaid::TooShort,
        Some(4) if b[5..9] == [0, 0, 0, 0] => PodSaid::H2Settings,
        Some(_) => PodSaid::Greeting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn http1_request_line_is_detected_and_kept() {
        let (mut client_end, mut tunnel) = tokio::io::duplex(1024);
        let (upstream, _pod) = pair().await;
        client_end.write_all(b"GET / HT").await.unwrap();
        let task = tokio::spawn(async move {
            first_bytes(&mut tunnel, &upstream, Duration::from_secs(5), true).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client_end
            .write_all(b"TP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let (p, buf) = task.await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert!(buf.starts_with(b"GET / HTTP/1.1\r\n"), "{buf:?}");
    }

    #[tokio::test]
    async fn pod_speaking_first_ends_detection_as_opaque() {
        let (_client_end, mut tunnel) = tokio::io::duplex(1024);
        let (upstream, mut pod) = pair().await;
        pod.write_all(b"220 smtp ready\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let (p, buf) = first_bytes(&mut tunnel, &upstream, Duration::from_secs(5), true).await;
        assert_eq!(p, Protocol::Opaque);
        assert!(buf.is_empty());
        assert!(started.elapsed() < Duration::from_secs(4));
        // Nothing of the greeting was consumed.
        let mut got = [0u8; 16];
        upstream.peek(&mut got).await.unwrap();
        assert_eq!(&got[..3], b"220");
    }

    #[tokio::test]
    async fn an_h2_server_preface_is_no_greeting() {
        let (mut client_end, mut tunnel) = tokio::io::duplex(1024);
        let (upstream, mut pod) = pair().await;
        // An empty SETTINGS frame, as HTTP/2 servers send on accept.
        pod.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client_end.write_all(detect::H2_PREFACE).await.unwrap();
        let (p, buf) = first_bytes(&mut tunnel, &upstream, Duration::from_secs(5), true).await;
        assert_eq!(p, Protocol::Http2);
        assert_eq!(&buf[..], detect::H2_PREFACE);
    }

    #[test]
    fn pod_bytes_are_classified() {
        assert_eq!(classify_pod_bytes(b"22"), PodSaid::TooShort);
        assert_eq!(classify_pod_bytes(b"220 smtp"), PodSaid::Greeting);
        assert_eq!(classify_pod_bytes(&[0, 0, 6, 4, 0]), PodSaid::TooShort);
        assert_eq!(
            classify_pod_bytes(&[0, 0, 6, 4, 0, 0, 0, 0, 0]),
            PodSaid::H2Settings
        );
        // SETTINGS on a stream other than 0 is no preface.
        assert_eq!(
            classify_pod_bytes(&[0, 0, 6, 4, 0, 0, 0, 0, 1]),
            PodSaid::Greeting
        );
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_timeout() {
        let (_client_end, mut tunnel) = tokio::io::duplex(1024);
        let (upstream, _pod) = pair().await;
        let (p, buf) = first_bytes(&mut tunnel, &upstream, Duration::from_millis(50), true).await;
        assert_eq!(p, Protocol::Opaque);
        assert!(buf.is_empty());
    }
}
