//! The tunnel end to end in one process: real sockets on loopback, real
//! TLS 1.3, a real HTTP/2 `CONNECT` to a local echo server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::identity::testing::{Pki, TD};
use crate::identity::{CertInfo, SpiffeId, TlsFailure, server_config};
use crate::transport::tunnel::*;

/// Aborts the spawned server when the test ends.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn echo_server() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, Task(task))
}

/// Waits for a condition the server updates on its own tasks.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Seen = Arc<Mutex<Vec<CertInfo>>>;

struct World {
    pki: Pki,
    node_b: SpiffeId,
    server: SocketAddr,
    stats: Arc<ServerStats>,
    tls: Arc<ServerTls>,
    echo: SocketAddr,
    seen: Seen,
    _tasks: Vec<Task>,
}

impl World {
    fn pool(&self) -> TunnelPool {
        TunnelPool::new(
            self.pki.store.clone(),
            self.pki.bundle().clone(),
            PoolConfig::default(),
        )
    }

    async fn open(&self, pool: &TunnelPool, local: &SpiffeId) -> Result<TunnelStream, TunnelError> {
        let headers = ConnectHeaders {
            source_workload: Some(local.clone()),
            source_addr: Some("10.0.0.7:43210".parse().unwrap()),
            request_id: Some("req-1".into()),
        };
        pool.open(
            local,
            self.server,
            &self.node_b,
            self.echo,
            headers.to_header_map(),
            None,
        )
        .await
    }
}

/// A server that denies `ns/default/sa/denied` and records who it let in.
async fn world(config: super::ServerConfig) -> World {
    let pki = Pki::new();
    let node_b = pki.identity("waymark-system", "node-b");
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let authorizer = move |req: &ConnectInfo<'_>| {
        if req.peer.id.service_account() == "denied" {
            return Err(DenyReason(format!(
                "{} may not reach {}",
                req.peer.id, req.target
            )));
        }
        assert_eq!(req.headers.get(REQUEST_ID).unwrap(), "req-1");
        assert_eq!(
            req.headers.get(http::header::FORWARDED).unwrap(),
            "for=\"10.0.0.7:43210\""
        );
        record.lock().unwrap().push(req.peer.clone());
        Ok(())
    };
    let tls = server_config(pki.store.clone(), node_b.clone(), pki.bundle()).unwrap();
    let server = TunnelServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        Arc::new(authorizer),
        config,
    )
    .await
    .unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let tls = server.tls();
    let (echo, echo_task) = echo_server().await;
    World {
        pki,
        node_b,
        server: addr,
        stats,
        tls,
        echo,
        seen,
        _tasks: vec![Task(tokio::spawn(server.serve())), echo_task],
    }
}

/// Writes `data` and reads the echo concurrently; returns what came back.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(stream: S, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut out = Vec::with_capacity(data.len());
        r.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn mib_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_round_trip_is_byte_identical() {
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let pool = w.pool();
    let data = pattern(16 << 20);

    let started = Instant::now();
    let stream = w.open(&pool, &web).await.unwrap();
    let back = round_trip(stream, &data).await;
    let tunnel = started.elapsed();
    assert!(
        back == data,
        "tunnel corrupted the stream ({} bytes back)",
        back.len()
    );

    let started = Instant::now();
    let back = round_trip(TcpStream::connect(w.echo).await.unwrap(), &data).await;
    let direct = started.elapsed();
    assert!(back == data);
    eprintln!(
        "16 MiB echo round trip: tunnel {:.0} MiB/s ({tunnel:?}), plain TCP {:.0} MiB/s ({direct:?})",
        mib_per_s(data.len(), tunnel),
        mib_per_s(data.len(), direct)
    );
    assert_eq!(w.seen.lock().unwrap()[0].id, web);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_streams_share_few_connections() {
    let w = Arc::new(world(Default::default()).await);
    let web = w.pki.identity("default", "web");
    let pool = Arc::new(w.pool());
    let barrier = Arc::new(tokio::sync::Barrier::new(500));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let (w, pool, web, barrier) = (w.clone(), pool.clone(), web.clone(), barrier.clone());
        tasks.spawn(async move {
            let stream = w.open(&pool, &web).await.unwrap();
            // All 500 streams are open at the same time past this point.
            barrier.wait().await;
            let msg = format!("stream {i}").repeat(100);
            assert_eq!(round_trip(stream, msg.as_bytes()).await, msg.as_bytes());
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let established = w
        .stats
        .tls_established
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (1..=2).contains(&established),
        "{established} TLS connections for 500 streams"
    );
    assert!(pool.connections_opened() <= 2);
    assert_eq!(
        w.stats
            .streams_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        500
    );
}

#[tokio::test]
async fn client_from_another_trust_anchor_is_rejected_as_unknown_ca() {
    let w = world(Default::default()).await;
    let other = Pki::new();
    let web = other.identity("default", "web");
    // Trusts the server's CA but presents a leaf of another trust anchor.
    let pool = TunnelPool::new(
        other.store.clone(),
        w.pki.bundle().clone(),
        PoolConfig::default(),
    );
    let err = w.open(&pool, &web).await.unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::UnknownCa), "{err}");
    eventually("the server to count the failure", || {
        w.stats.handshake_failures(TlsFailure::UnknownCa) == 1
    })
    .await;
}

#[tokio::test]
async fn expired_client_certificate_is_rejected_as_expired() {
    let w = world(Default::default()).await;
    let web = w.pki.expired_identity("default", "web");
    let err = w.open(&w.pool(), &web).await.unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::Expired), "{err}");
    eventually("the server to count the failure", || {
        w.stats.handshake_failures(TlsFailure::Expired) == 1
    })
    .await;
}

#[tokio::test]
async fn wrong_expected_peer_identity_is_rejected() {
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let node_c = SpiffeId::new(TD, "waymark-system", "node-c").unwrap();
    let err = w
        .pool()
        .open(&web, w.server, &node_c, w.echo, HeaderMap::new(), None)
        .await
        .unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::WrongIdentity), "{err}");
    eventually("the server to count the failure", || {
        w.stats.handshake_failures(TlsFailure::WrongIdentity) == 1
    })
    .await;
}

#[tokio::test]
async fn authorization_denies_one_source_and_allows_another() {
    let w = world(Default::default()).await;
    let pool = w.pool();
    let denied = w.pki.identity("default", "denied");
    let allowed = w.pki.identity("default", "web");
    match w.open(&pool, &denied).await.unwrap_err() {
        TunnelError::Denied { reason, target, .. } => {
            assert_eq!(target, w.echo);
            assert!(reason.contains("sa/denied may not reach"), "{reason}");
        }
        other => panic!("expected a denial, got {other}"),
    }
    let stream = w.open(&pool, &allowed).await.unwrap();
    assert_eq!(round_trip(stream, b"hello").await, b"hello");
    assert_eq!(
        w.stats
            .streams_denied
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn source_header_must_match_the_certificate() {
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let mut headers = ConnectHeaders {
        request_id: Some("req-1".into()),
        ..Default::default()
    }
    .to_header_map();
    headers.insert(
        SOURCE_WORKLOAD,
        "spiffe://cluster.local/ns/default/sa/admin"
            .parse()
            .unwrap(),
    );
    let err = w
        .pool()
        .open(&web, w.server, &w.node_b, w.echo, headers, None)
        .await
        .unwrap_err();
    assert!(matches!(err, TunnelError::Denied { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_target_is_503() {
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let headers = ConnectHeaders {
        request_id: Some("req-1".into()),
        source_addr: Some("10.0.0.7:43210".parse().unwrap()),
        ..Default::default()
    };
    let err = w
        .pool()
        .open(
            &web,
            w.server,
            &w.node_b,
            closed,
            headers.to_header_map(),
            None,
        )
        .await
        .unwrap_err();
    match err {
        TunnelError::Refused { status, .. } => {
            assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE)
        }
        other => panic!("expected 503, got {other}"),
    }
}

/// A peer holding `limits.tunnel_max_streams_per_peer` streams has its
/// next one answered 503 naming the limit, over any of its connections,
/// while another peer's streams go through; a stream that ends gives its
/// place back. The descriptor budget bounds all peers together the same
/// way.
#[tokio::test]
async fn a_peers_streams_are_bounded_and_so_are_the_agents_descriptors() {
    let fds = crate::proxy::descriptors::Descriptors::new(3);
    let w = world(super::ServerConfig {
        max_streams_per_peer: 2,
        descriptors: Some(fds.clone()),
        ..Default::default()
    })
    .await;
    let (web, api) = (
        w.pki.identity("default", "web"),
        w.pki.identity("default", "api"),
    );
    let refused_for = |err: TunnelError, limit: &str| match err {
        TunnelError::Refused { status, reason, .. } => {
            assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
            assert!(reason.contains(limit), "{reason}");
        }
        other => panic!("expected a 503 naming {limit}, got {other}"),
    };
    let first = w.open(&w.pool(), &web).await.unwrap();
    // A second pool: its own tunnel connection, the same peer.
    let second = w.open(&w.pool(), &web).await.unwrap();
    refused_for(
        w.open(&w.pool(), &web).await.unwrap_err(),
        "limits.tunnel_max_streams_per_peer",
    );
    let other = w.open(&w.pool(), &api).await.unwrap();
    assert_eq!(fds.used(), 3);
    // Every descriptor of the budget is held: api is under its own bound
    // but there is no descriptor left for it.
    refused_for(w.open(&w.pool(), &api).await.unwrap_err(), "descriptor");
    assert_eq!(
        w.stats
            .streams_limited
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(round_trip(first, b"first").await, b"first");
    eventually("the ended stream's descriptor back", || fds.used() == 2).await;
    let third = w.open(&w.pool(), &web).await.unwrap();
    assert_eq!(round_trip(third, b"third").await, b"third");
    assert_eq!(round_trip(second, b"second").await, b"second");
    assert_eq!(round_trip(other, b"other").await, b"other");
    eventually("every descriptor back", || fds.used() == 0).await;
}

async fn read_until_closed(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server did not close the connection");
}

#[tokio::test]
async fn garbage_and_plaintext_fail_cleanly_and_the_server_keeps_serving() {
    let w = world(Default::default()).await;
    for junk in [
        &b"\x00\x01garbage\xff\xfe not TLS at all\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(w.server).await.unwrap();
        s.write_all(junk).await.unwrap();
        read_until_closed(s).await;
    }
    eventually("two protocol failures", || {
        w.stats.handshake_failures(TlsFailure::Protocol) == 2
    })
    .await;
    let web = w.pki.identity("default", "web");
    let stream = w.open(&w.pool(), &web).await.unwrap();
    assert_eq!(round_trip(stream, b"still here").await, b"still here");
}

#[tokio::test]
async fn a_client_stalled_mid_handshake_is_dropped() {
    let config = super::ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let w = world(config).await;
    let mut s = TcpStream::connect(w.server).await.unwrap();
    // The first bytes of a TLS record header, then silence.
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    read_until_closed(s).await;
    eventually("a handshake timeout", || {
        w.stats
            .handshake_timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let web = w.pki.identity("default", "web");
    assert!(w.open(&w.pool(), &web).await.is_ok());
}

#[tokio::test]
async fn oversized_connect_headers_are_rejected() {
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let pool = w.pool();
    // Establish the connection first so the client knows the server's limit
    // and the rejection is about this stream, not the handshake.
    drop(w.open(&pool, &web).await.unwrap());
    let mut headers = ConnectHeaders {
        request_id: Some("req-1".into()),
        ..Default::default()
    }
    .to_header_map();
    headers.insert("x-padding", "a".repeat(64 * 1024).parse().unwrap());
    let err = pool
        .open(&web, w.server, &w.node_b, w.echo, headers, None)
        .await
        .unwrap_err();
    eprintln!("oversized CONNECT headers: {err}");
    assert_eq!(
        w.stats
            .streams_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let stream = w.open(&pool, &web).await.unwrap();
    assert_eq!(round_trip(stream, b"after").await, b"after");
}

#[tokio::test]
async fn rotation_new_streams_present_the_new_certificate() {
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let pool = w.pool();
    let first = w.open(&pool, &web).await.unwrap();
    let old = w.pki.store.current(&web).unwrap().leaf.serial.clone();

    let rotated = w.pki.store.rotate(&w.pki.issuer, &web).unwrap();
    assert_ne!(rotated.leaf.serial, old);
    let second = w.open(&pool, &web).await.unwrap();
    assert_eq!(round_trip(second, b"new").await, b"new");
    // The stream opened before the rotation still works on its connection.
    assert_eq!(round_trip(first, b"old").await, b"old");

    let serials: Vec<String> = w
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.serial.clone())
        .collect();
    assert_eq!(serials, vec![old, rotated.leaf.serial.clone()]);
    assert_eq!(pool.connections_opened(), 2);
}

#[tokio::test]
async fn a_probe_handshakes_verifies_the_peer_and_opens_no_stream() {
    let w = world(Default::default()).await;
    let pool = w.pool();
    let web = w.pki.identity("default", "web");
    let timeout = Duration::from_secs(5);
    let ok = pool
        .probe(&web, w.server, &w.node_b, timeout)
        .await
        .unwrap();
    assert_eq!(ok.identity.as_ref(), Some(&w.node_b));
    assert!(ok.handshake < timeout);
    eventually("the server to count the connection", || {
        w.stats
            .tls_established
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    assert_eq!(
        w.stats
            .streams_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(pool.connections_opened(), 0, "a probe pools nothing");

    // Another identity than the expected one.
    let node_c = SpiffeId::new(TD, "waymark-system", "node-c").unwrap();
    let err = pool
        .probe(&web, w.server, &node_c, timeout)
        .await
        .unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::WrongIdentity), "{err}");

    // Our certificate from another trust anchor: the server's verdict,
    // read after our side of the handshake.
    let other = Pki::new();
    let foreign = TunnelPool::new(
        other.store.clone(),
        w.pki.bundle().clone(),
        PoolConfig::default(),
    );
    let stranger = other.identity("default", "web");
    let err = foreign
        .probe(&stranger, w.server, &w.node_b, timeout)
        .await
        .unwrap_err();
    assert_eq!(err.tls_failure(), Some(TlsFailure::UnknownCa), "{err}");

    // Nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = pool
        .probe(&web, closed, &w.node_b, timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TunnelError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err}"
    );
}

#[tokio::test]
async fn a_connection_without_streams_for_the_idle_timeout_is_closed_and_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let w = world(super::ServerConfig {
        idle_timeout: Duration::from_millis(400),
        ..Default::default()
    })
    .await;
    let web = w.pki.identity("default", "web");
    let pool = w.pool();
    let stream = w.open(&pool, &web).await.unwrap();
    // An open stream keeps its connection however quiet it is.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(w.stats.idle_closed.load(Relaxed), 0, "a stream is open");
    assert_eq!(round_trip(stream, b"still here").await, b"still here");
    // Without one, the server sends GOAWAY after the timeout.
    eventually("the idle connection to be closed", || {
        w.stats.idle_closed.load(Relaxed) == 1
    })
    .await;
    // The next stream gets a new connection.
    let stream = w.open(&pool, &web).await.unwrap();
    assert_eq!(round_trip(stream, b"again").await, b"again");
    assert_eq!(pool.connections_opened(), 2);
    assert_eq!(w.stats.tls_established.load(Relaxed), 2);
}

#[tokio::test]
async fn a_bundle_that_drops_the_peers_issuer_closes_its_connection() {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncWriteExt as _;
    let w = world(Default::default()).await;
    let web = w.pki.identity("default", "web");
    let pool = w.pool();
    let mut stream = w.open(&pool, &web).await.unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before");
    // The same bundle again: the peer is still trusted.
    w.tls
        .set_trust(crate::identity::tls::client_verifier(w.pki.bundle()).unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(w.stats.untrusted_closed.load(Relaxed), 0);
    stream.write_all(b"still").await.unwrap();
    let mut got = [0u8; 5];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still");
    // A bundle of another CA only: the peer's issuer is gone.
    let other = Pki::new();
    w.tls
        .set_trust(crate::identity::tls::client_verifier(other.bundle()).unwrap());
    eventually("the untrusted connection to be closed", || {
        w.stats.untrusted_closed.load(Relaxed) == 1
    })
    .await;
    // The open stream went with it.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(b"after").await;
        stream.read_to_end(&mut rest).await
    })
    .await
    .expect("the stream must end with its connection");
    assert!(ended.is_err() || rest.is_empty(), "{ended:?} {rest:?}");
}

/// A target that sends `len` bytes at once and closes (a download).
async fn sender(len: usize) -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&pattern(len)).await;
                let _ = s.shutdown().await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    (addr, Task(task))
}

/// A TCP relay to `to` that passes what the client sends at once and what
/// comes back at about 4 MB/s, through a small receive buffer: a peer that
/// takes its data slowly (a busy agent), so that what the server has
/// written waits in the server's own send queue.
async fn slow_relay(to: SocketAddr) -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(32 << 10).unwrap();
                let Ok(server) = socket.connect(to).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let mut buf = vec![0; 16 << 10];
                    loop {
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(4)).await;
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, Task(task))
}

/// A stream whose target has sent everything and closed while the peer
/// is still reading: the drain waits for the stream, and the bytes still
/// on their way when the connection ends (in the TLS and TCP buffers) all
/// arrive. Before, the connection's socket was closed with the peer's
/// `WINDOW_UPDATE`s unread, and the kernel answered that with a reset that
/// threw away what was still queued (a rollout test lost the last 380 KB
/// of a 256 MiB transfer that way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_delivers_every_byte_of_a_finished_stream() {
    const LEN: usize = 8 << 20;
    let pki = Pki::new();
    let node_b = pki.identity("waymark-system", "node-b");
    let tls = server_config(pki.store.clone(), node_b.clone(), pki.bundle()).unwrap();
    let drain = crate::drain::Drain::default();
    let server = TunnelServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        Arc::new(|_: &ConnectInfo<'_>| Ok(())),
        Default::default(),
    )
    .await
    .unwrap()
    .with_drain(drain.clone());
    let addr = server.local_addr().unwrap();
    let _server = Task(tokio::spawn(server.serve()));
    let (addr, _relay) = slow_relay(addr).await;
    let (target, _sender) = sender(LEN).await;
    let pool = TunnelPool::new(
        pki.store.clone(),
        pki.bundle().clone(),
        PoolConfig::default(),
    );
    let web = pki.identity("default", "web");
    let mut stream = pool
        .open(&web, addr, &node_b, target, HeaderMap::new(), None)
        .await
        .unwrap();
    // Nothing to send (as a client that has sent all it had), then read
    // slowly: most of the download is still on its way when the target is
    // done and the drain starts.
    stream.shutdown().await.unwrap();
    let mut got = 0;
    let mut buf = vec![0; 16 << 10];
    let n = stream.read(&mut buf).await.unwrap();
    got += n;
    let draining = tokio::spawn(async move { drain.run(Duration::from_secs(20)).await });
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("the stream failed after {got} of {LEN} bytes: {e}"),
        }
    }
    assert_eq!(got, LEN);
    draining.await.unwrap();
}
