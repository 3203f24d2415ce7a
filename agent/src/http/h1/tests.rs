//! The codec against a client written by hand: what crosses the wire.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::http::body::full;

impl Io for DuplexStream {}

const CONFIG: Config = Config {
    max_head: 1024,
    header_read_timeout: Duration::from_secs(5),
};

/// A server whose service echoes the request body (and says the method and
/// path in headers), on one end of a pipe; the other end is returned.
fn server(stop: Arc<Stop>) -> (DuplexStream, tokio::task::JoinHandle<Result<(), Error>>) {
    let (client, srv) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(async move {
        serve(srv, CONFIG, &stop, |req: Request<ProxyBody>| async move {
            let (parts, body) = req.into_parts();
            let collected = body.collect().await;
            let mut resp = match collected {
                Ok(c) => {
                    let trailers = c.trailers().cloned();
                    let bytes = c.to_bytes();
                    let mut r = Response::new(full(bytes));
                    if let Some(t) = trailers {
                        for (k, v) in &t {
                            r.headers_mut().insert(k.clone(), v.clone());
                        }
                    }
                    r
                }
                Err(e) => {
                    let mut r = Response::new(full(format!("body error: {e}")));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            };
            resp.headers_mut()
                .insert("x-path", parts.uri.path().parse().unwrap());
            resp
        })
        .await
    });
    (client, task)
}

async fn read_until_closed(c: &mut DuplexStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_some(c: &mut DuplexStream, want: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(want) {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("timed out")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (mut c, task) = server(Arc::default());
    c.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nPOST /b HTTP/1.1\r\ncontent-length: 3\r\n\r\nxyzGET /c HTTP/1.1\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut c).await;
    let a = got.find("x-path: /a").unwrap();
    let b = got.find("x-path: /b").unwrap();
    let cc = got.find("x-path: /c").unwrap();
    assert!(a < b && b < cc, "{got}");
    assert!(
        got.contains("content-length: 3\r\n") && got.contains("xyz"),
        "{got}"
    );
    assert!(got.contains("connection: close\r\n"), "{got}");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_chunked_upload_with_trailers_reaches_the_service() {
    let (mut c, _task) = server(Arc::default());
    c.write_all(b"PUT /up HTTP/1.1\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let cont = read_some(&mut c, "\r\n\r\n").await;
    assert!(cont.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{cont}");
    c.write_all(b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n")
        .await
        .unwrap();
    let got = read_some(&mut c, "abcde").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("x-sum: 5\r\n"), "{got}");
}

#[tokio::test]
async fn an_http10_client_gets_a_close_delimited_body_and_keep_alive_when_asked() {
    let (client, srv) = tokio::io::duplex(1 << 16);
    let stop = Stop::default();
    let task = tokio::spawn(async move {
        serve(srv, CONFIG, &stop, |_req: Request<ProxyBody>| async move {
            // A body of unknown length.
            let (tx, rx) = body::channel(None);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"streamed"))))
                    .await;
            });
            Response::new(ProxyBody::new(rx))
        })
        .await
    });
    let mut c = client;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut c).await;
    assert!(
        got.contains("connection: close\r\n") && got.ends_with("streamed"),
        "{got}"
    );
    assert!(!got.contains("transfer-encoding"), "{got}");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_chunked_response_carries_trailers_only_to_a_client_that_takes_them() {
    for (te, want) in [("te: trailers\r\n", true), ("", false)] {
        let (client, srv) = tokio::io::duplex(1 << 16);
        let stop = Stop::default();
        tokio::spawn(async move {
            serve(srv, CONFIG, &stop, |_req: Request<ProxyBody>| async move {
                let (tx, rx) = body::channel(None);
                tokio::spawn(async move {
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"hi")))).await;
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    let _ = tx.send(Ok(Frame::trailers(t))).await;
                });
                Response::new(ProxyBody::new(rx))
            })
            .await
        });
        let mut c = client;
        c.write_all(format!("GET / HTTP/1.1\r\n{te}connection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let got = read_until_closed(&mut c).await;
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        assert!(got.contains("2\r\nhi\r\n"), "{got}");
        assert_eq!(got.contains("grpc-status: 0\r\n"), want, "{got}");
        assert!(got.ends_with("\r\n\r\n"), "{got}");
    }
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_refused_with_a_clean_close() {
    let (mut c, task) = server(Arc::default());
    let mut big = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 4096));
    big.extend_from_slice(b"\r\n\r\n");
    c.write_all(&big).await.unwrap();
    c.shutdown().await.unwrap();
    let got = read_until_closed(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
    assert!(task.await.unwrap().is_err());

    let (mut c, _task) = server(Arc::default());
    c.write_all(b"GET /a b HTTP/1.1\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut c).await;
    assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
}

#[tokio::test]
async fn a_graceful_stop_closes_an_idle_connection_and_finishes_one_in_flight() {
    let stop = Arc::<Stop>::default();
    let (mut c, task) = server(stop.clone());
    c.write_all(b"GET /a HTTP/1.1\r\n\r\n").await.unwrap();
    read_some(&mut c, "x-path: /a").await;
    stop.ask();
    task.await.unwrap().unwrap();
    // In flight: the response says it is the last.
    let stop = Arc::<Stop>::default();
    let (mut c, _task) = server(stop.clone());
    c.write_all(b"POST /b HTTP/1.1\r\ncontent-length: 4\r\n\r\nab")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.ask();
    c.write_all(b"cd").await.unwrap();
    let got = read_until_closed(&mut c).await;
    assert!(
        got.contains("connection: close\r\n") && got.ends_with("abcd"),
        "{got}"
    );
}

#[tokio::test]
async fn an_upgrade_hands_the_connection_over_with_what_followed_the_head() {
    let (mut c, srv) = tokio::io::duplex(1 << 16);
    let stop = Stop::default();
    let (got_tx, got_rx) = oneshot::channel();
    let mut got_tx = Some(got_tx);
    tokio::spawn(async move {
        serve(srv, CONFIG, &stop, move |mut req: Request<ProxyBody>| {
            let on = upgrade::on(&mut req);
            let tx = got_tx.take();
            async move {
                tokio::spawn(async move {
                    let mut io = on.await.unwrap();
                    let mut first = [0u8; 5];
                    io.read_exact(&mut first).await.unwrap();
                    io.write_all(b"world").await.unwrap();
                    let _ = tx.unwrap().send(first);
                });
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut()
                    .insert("upgrade", "websocket".parse().unwrap());
                r.headers_mut()
                    .insert("connection", "upgrade".parse().unwrap());
                r
            }
        })
        .await
    });
    c.write_all(b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nhello")
        .await
        .unwrap();
    let got = read_some(&mut c, "world").await;
    assert!(
        got.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{got}"
    );
    assert_eq!(&got_rx.await.unwrap(), b"hello");
}

#[tokio::test]
async fn a_client_that_half_closes_still_gets_its_answer() {
    let (mut c, task) = server(Arc::default());
    c.write_all(b"GET /h HTTP/1.1\r\n\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    let got = read_until_closed(&mut c).await;
    assert!(got.contains("x-path: /h"), "{got}");
    task.await.unwrap().unwrap();
}

/// The client against an endpoint written by hand: a POST with a length,
/// a chunked answer that arrives after its head, and the connection handed
/// back once the body has ended (not before).
#[tokio::test]
async fn the_client_streams_a_late_chunked_body_and_then_recycles_the_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoint = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with("\r\n\r\nhello") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8(got).unwrap()
    });
    let io = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (back_tx, back_rx) = std::sync::mpsc::channel();
    let recycle: client::Recycle<tokio::net::TcpStream> = Box::new(move |c| {
        let _ = back_tx.send(c);
    });
    let req = Request::post("/up")
        .header("host", "x")
        .body(full("hello"))
        .unwrap();
    let resp = client::send(client::ClientConn::new(io), req, recycle)
        .await
        .map_err(|f| f.error)
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        back_rx.try_recv().is_err(),
        "recycled before its body ended"
    );
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-t"], "1");
    assert_eq!(&collected.to_bytes()[..], b"abc");
    assert!(
        back_rx.try_recv().is_ok(),
        "not recycled after its body ended"
    );
    let sent = endpoint.await.unwrap();
    assert!(sent.starts_with("POST /up HTTP/1.1\r\n"), "{sent}");
    assert!(sent.contains("content-length: 5\r\n"), "{sent}");
}
