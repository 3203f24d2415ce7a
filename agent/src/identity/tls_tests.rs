//! Handshakes over real loopback sockets: success, and each rejection
//! reason seen from both ends.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::testing::Pki;
use super::tls::{ALPN_H2, server_name};
use super::{CertInfo, SpiffeId, TlsFailure, client_config, peer_info, server_config};

type Outcome = (Result<CertInfo, TlsFailure>, Result<CertInfo, TlsFailure>);

fn failure(e: &std::io::Error) -> TlsFailure {
    TlsFailure::find(e).unwrap_or(TlsFailure::Protocol)
}

/// Runs one handshake; returns (client's view, server's view).
async fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| failure(&e))?;
        let info = peer_info(tls.get_ref().1).expect("verified peer has an identity");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        // In TLS 1.3 the client finishes first; this byte tells it the
        // server accepted its certificate too.
        tls.write_all(b"k").await.map_err(|e| failure(&e))?;
        tls.flush().await.map_err(|e| failure(&e))?;
        Ok(info)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_side = async {
        let mut tls = TlsConnector::from(client)
            .connect(server_name(addr.ip()), tcp)
            .await
            .map_err(|e| failure(&e))?;
        let info = peer_info(tls.get_ref().1).expect("verified peer has an identity");
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| failure(&e))?;
        Ok(info)
    };
    let client_result = client_side.await;
    (client_result, server_side.await.unwrap())
}

struct Setup {
    pki: Pki,
    node_b: SpiffeId,
    server: Arc<rustls::ServerConfig>,
}

fn setup() -> Setup {
    let pki = Pki::new();
    let node_b = pki.identity("waymark-system", "node-b");
    let server = server_config(pki.store.clone(), node_b.clone(), pki.bundle()).unwrap();
    Setup {
        pki,
        node_b,
        server,
    }
}

#[tokio::test]
async fn mutual_auth_reports_both_identities() {
    let s = setup();
    let web = s.pki.identity("default", "web");
    let client = client_config(
        s.pki.store.clone(),
        web.clone(),
        s.pki.bundle(),
        Some(s.node_b.clone()),
    )
    .unwrap();
    let (c, sv) = handshake(client, s.server).await;
    assert_eq!(c.unwrap().id, s.node_b);
    let seen = sv.unwrap();
    assert_eq!(seen.id, web);
    assert_eq!(seen.serial, s.pki.store.current(&web).unwrap().leaf.serial);
}

#[tokio::test]
async fn client_from_another_trust_anchor_is_unknown_ca() {
    let s = setup();
    let other = Pki::new();
    let web = other.identity("default", "web");
    // The client trusts the server's CA, but its own leaf is from `other`.
    let client = client_config(
        other.store.clone(),
        web,
        s.pki.bundle(),
        Some(s.node_b.clone()),
    )
    .unwrap();
    let (c, sv) = handshake(client, s.server).await;
    assert_eq!(sv.unwrap_err(), TlsFailure::UnknownCa);
    assert_eq!(c.unwrap_err(), TlsFailure::UnknownCa);
}

#[tokio::test]
async fn server_from_another_trust_anchor_is_unknown_ca() {
    let s = setup();
    let other = Pki::new();
    let web = other.identity("default", "web");
    let client = client_config(
        other.store.clone(),
        web,
        other.bundle(),
        Some(s.node_b.clone()),
    )
    .unwrap();
    let (c, sv) = handshake(client, s.server).await;
    assert_eq!(c.unwrap_err(), TlsFailure::UnknownCa);
    assert_eq!(sv.unwrap_err(), TlsFailure::UnknownCa);
}

#[tokio::test]
async fn expired_client_certificate_is_expired() {
    let s = setup();
    let web = s.pki.expired_identity("default", "web");
    let client = client_config(
        s.pki.store.clone(),
        web,
        s.pki.bundle(),
        Some(s.node_b.clone()),
    )
    .unwrap();
    let (c, sv) = handshake(client, s.server).await;
    assert_eq!(sv.unwrap_err(), TlsFailure::Expired);
    assert_eq!(c.unwrap_err(), TlsFailure::Expired);
}

#[tokio::test]
async fn wrong_expected_server_identity_is_wrong_identity() {
    let s = setup();
    let web = s.pki.identity("default", "web");
    let node_c = SpiffeId::new(super::testing::TD, "waymark-system", "node-c").unwrap();
    let client = client_config(s.pki.store.clone(), web, s.pki.bundle(), Some(node_c)).unwrap();
    let (c, sv) = handshake(client, s.server).await;
    assert_eq!(c.unwrap_err(), TlsFailure::WrongIdentity);
    assert_eq!(sv.unwrap_err(), TlsFailure::WrongIdentity);
}
