use super::*;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

#[test]
fn http1_request_lines() {
    for line in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"POST /api/v1/x?y=1 HTTP/1.0\r\n",
        b"TRACE /hello HTTP/1.1\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"GET http://example/ HTTP/1.1\n",
    ] {
        assert_eq!(
            classify(line),
            Verdict::Is(Protocol::Http1),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn partial_request_lines_need_more() {
    for p in [&b"G"[..], b"GET", b"GET ", b"GET /index.html HTTP/1."] {
        assert_eq!(
            classify(p),
            Verdict::NeedMore,
            "{:?}",
            String::from_utf8_lossy(p)
        );
    }
}

#[test]
fn h2_preface_wins_over_http1_lookalike() {
    assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
    assert_eq!(classify(&H2_PREFACE[..10]), Verdict::NeedMore);
    let mut more = H2_PREFACE.to_vec();
    more.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(classify(&more), Verdict::Is(Protocol::Http2));
}

#[test]
fn tls_client_hello() {
    assert_eq!(
        classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
        Verdict::Is(Protocol::Tls)
    );
    assert_eq!(classify(&[0x16]), Verdict::NeedMore);
}

#[test]
fn other_bytes_are_opaque() {
    for p in [
        &b"\x00\x01\x02"[..],
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"GET / SPDY/3\r\n",
        b"GET\x01/ HTTP/1.1\r\n",
        b"HELO example.com\r\n",
        b"*1\r\n$4\r\nPING\r\n",
    ] {
        assert_eq!(
            classify(p),
            Verdict::Is(Protocol::Opaque),
            "{:?}",
            String::from_utf8_lossy(p)
        );
    }
}

#[test]
fn overlong_method_or_line_is_opaque() {
    let long_method = vec![b'A'; 40];
    assert_eq!(classify(&long_method), Verdict::Is(Protocol::Opaque));
    let mut long_line = b"GET /".to_vec();
    long_line.resize(MAX_PEEK, b'a');
    assert_eq!(classify(&long_line), Verdict::Is(Protocol::Opaque));
}

proptest! {
    // Any input gets an answer without panicking, and a decided prefix
    // never changes its mind when more bytes arrive.
    #[test]
    fn classify_is_total_and_stable(bytes in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
        let full = classify(&bytes);
        let cut = cut.min(bytes.len());
        if let Verdict::Is(p) = classify(&bytes[..cut]) {
            prop_assert_eq!(full, Verdict::Is(p));
        }
    }
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

#[tokio::test]
async fn silent_client_is_opaque_after_the_timeout() {
    let (_client, server) = pair().await;
    let (p, o) = detect(&server, Duration::from_millis(50)).await;
    assert_eq!((p, o), (Protocol::Opaque, Outcome::Timeout));
}

#[tokio::test]
async fn request_line_split_across_segments_is_http1() {
    let (mut client, server) = pair().await;
    let writer = tokio::spawn(async move {
        client.write_all(b"GET /sl").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .write_all(b"ow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        client
    });
    let (p, o) = detect(&server, Duration::from_secs(2)).await;
    assert_eq!((p, o), (Protocol::Http1, Outcome::Detected));
    // Nothing was consumed: the full request is still there to read.
    let mut buf = [0u8; 64];
    let n = server.peek(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"GET /slow HTTP/1.1"));
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn closed_client_is_reported() {
    let (client, server) = pair().await;
    drop(client);
    let (p, o) = detect(&server, Duration::from_secs(2)).await;
    assert_eq!((p, o), (Protocol::Opaque, Outcome::Closed));
}

#[tokio::test]
async fn request_line_longer_than_the_first_peek_is_http1() {
    let (mut client, server) = pair().await;
    let line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(5000));
    client.write_all(line.as_bytes()).await.unwrap();
    let (p, o) = detect(&server, Duration::from_secs(2)).await;
    assert_eq!((p, o), (Protocol::Http1, Outcome::Detected));
}

#[tokio::test]
async fn request_line_longer_than_the_peek_limit_is_opaque() {
    let (mut client, server) = pair().await;
    let line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_PEEK));
    client.write_all(line.as_bytes()).await.unwrap();
    let (p, o) = detect(&server, Duration::from_secs(2)).await;
    assert_eq!((p, o), (Protocol::Opaque, Outcome::Detected));
}
