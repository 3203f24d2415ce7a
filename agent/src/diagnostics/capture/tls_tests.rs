//! A keylog capture end to end: a real rustls client and server (the
//! tunnel's own TLS configs, with the sink plugged in as the tunnel will)
//! talk HTTP/1.1 over TLS 1.3 on loopback inside a fresh network namespace
//! while a capture runs there; tshark must decrypt the request using only
//! the Decryption Secrets Blocks in the stream. Needs root (a network
//! namespace, a packet socket) and tshark; skipped without them unless `CI`
//! is set.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::testing::Pki;
use crate::identity::tls::server_name;
use crate::identity::{client_config, server_config};

fn skip(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("tshark_decrypts_a_keylog_capture needs {why} (CI is set: a failure, not a skip)");
    }
    eprintln!("SKIPPED tshark_decrypts_a_keylog_capture: needs {why}");
    true
}

/// Brings `lo` up in the current thread's network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain syscalls on a socket we own, with an ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0
        };
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if ok { Ok(()) } else { Err(e) }
    }
}

/// One HTTP/1.1 exchange over TLS on 127.0.0.1:443 with the sink as both
/// sides' key log.
async fn tls_exchange(key_log: Arc<keylog::KeyLogSink>) {
    let pki = Pki::new();
    let node_a = pki.identity("waymark-system", "node-a");
    let node_b = pki.identity("waymark-system", "node-b");
    // How the tunnel plugs the sink in: on its configs, before sharing them.
    let mut server =
        (*server_config(pki.store.clone(), node_b.clone(), pki.bundle()).unwrap()).clone();
    server.key_log = key_log.clone();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut client =
        (*client_config(pki.store.clone(), node_a, pki.bundle(), Some(node_b)).unwrap()).clone();
    client.key_log = key_log;
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    let listener = TcpListener::bind("127.0.0.1:443").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(Arc::new(server))
            .accept(tcp)
            .await
            .unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "request cut short");
            req.extend_from_slice(&buf[..n]);
        }
        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            .await
            .unwrap();
        tls.shutdown().await.unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(client))
        .connect(server_name(addr.ip()), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /secret-marker HTTP/1.1\r\nhost: node-b\r\n\r\n")
        .await
        .unwrap();
    let mut rsp = Vec::new();
    let _ = tls.read_to_end(&mut rsp).await;
    assert!(rsp.ends_with(b"ok\n"), "{}", String::from_utf8_lossy(&rsp));
    serve.await.unwrap();
}

fn request_uris(file: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args([
            "-Y",
            "http.request",
            "-T",
            "fields",
            "-e",
            "http.request.uri",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn tshark_decrypts_a_keylog_capture() {
    if !nix::unistd::geteuid().is_root() && skip("root") {
        return;
    }
    if std::process::Command::new("tshark")
        .arg("--version")
        .output()
        .is_err()
        && skip("tshark")
    {
        return;
    }
    let bytes = std::thread::spawn(|| {
        // Only this thread (and the threads it starts) enter the namespace.
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare a network namespace");
        loopback_up().expect("bring lo up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let captures = Captures::new(&mut Registry::default());
            let limits = CaptureConfig {
                keylog: true,
                ..CaptureConfig::default()
            };
            let params = CaptureParams {
                target: Target::Node {
                    name: "test".into(),
                },
                filter: "tcp port 443".into(),
                duration: Duration::from_secs(2),
                max_packets: None,
                max_bytes: 1 << 20,
                snaplen: MAX_SNAPLEN,
                keylog: true,
                excluded: None,
            };
            let filter = filter::compile(&params.filter, params.snaplen).unwrap();
            let who = Requester {
                peer: "127.0.0.1:1".into(),
                user_agent: "tls_tests".into(),
            };
            let body = captures
                .start(params, filter, &limits, who)
                .await
                .expect("capture starts");
            let collect = tokio::spawn(async move { body.collect().await.unwrap().to_bytes() });
            tls_exchange(captures.key_log()).await;
            collect.await.unwrap()
        })
    })
    .join()
    .expect("capture thread");

    let mut summary = pcapng::StreamSummary::default();
    summary.feed(&bytes);
    assert!(summary.packets >= 8, "{summary:?}");
    assert!(summary.secrets_blocks >= 1, "{summary:?}");
    let dir = std::env::temp_dir().join(format!("waymark-keylog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tls.pcapng");
    std::fs::write(&file, &bytes).unwrap();
    let uris = request_uris(&file);
    // Without the secrets blocks the same packets stay encrypted.
    let stripped = dir.join("stripped.pcapng");
    let editcap = std::process::Command::new("editcap")
        .arg("--discard-all-secrets")
        .arg(&file)
        .arg(&stripped)
        .output();
    let stripped_uris = match editcap {
        Ok(o) if o.status.success() => Some(request_uris(&stripped)),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        uris,
        ["/secret-marker"],
        "tshark did not decrypt the capture"
    );
    if let Some(u) = stripped_uris {
        assert!(u.is_empty(), "decrypted without secrets? {u:?}");
    }
}
