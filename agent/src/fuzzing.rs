//! Fuzz targets for the parsers that read untrusted input: protocol
//! detection and HTTP/1 heads (a pod's bytes), the tunnel's `CONNECT`
//! target (a peer agent's request), the config file and the tap filter (an
//! operator's input, still never a reason to crash the agent).
//!
//! Each target takes arbitrary bytes, runs the real code and panics only if
//! an invariant breaks; the code under test must answer every input with a
//! value or a clear error. They run two ways: as bounded property tests in
//! every `cargo test` (below), and with `cargo fuzz` on a nightly toolchain
//! (`fuzz/`), which calls these same functions.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::diagnostics::tap::filter::{Filter, Pods};
use crate::http::headers::{strip_hop_by_hop, wants_upgrade};
use crate::proxy::detect::{Verdict, classify};
use crate::proxy::inbound::server::connect_target;
use crate::proxy::outbound::http_server::{HEADER_READ_TIMEOUT, MAX_H1_HEAD};

/// Protocol detection: every prefix gets a verdict, and a decided prefix
/// keeps its verdict when more bytes arrive.
pub fn detect(data: &[u8]) {
    let full = classify(data);
    for cut in 0..data.len().min(600) {
        if let Verdict::Is(p) = classify(&data[..cut]) {
            assert_eq!(
                full,
                Verdict::Is(p),
                "prefix of {cut} bytes decided otherwise"
            );
        }
    }
}

/// An HTTP/1 connection whose client sends `data` and closes, served with
/// the agent's own limits; each request the parser accepts has its
/// hop-by-hop headers stripped as the proxy does. The server answers with
/// an HTTP/1.1 response or nothing, and no header `Connection` named
/// survives the strip.
pub fn http1_head(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let svc = service_fn(
            |mut req: hyper::Request<hyper::body::Incoming>| async move {
                let named: Vec<String> = req
                    .headers()
                    .get_all(hyper::header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty() && n != "upgrade")
                    .collect();
                let upgrade = wants_upgrade(req.headers());
                strip_hop_by_hop(req.headers_mut(), upgrade);
                for n in named {
                    assert!(
                        !req.headers().contains_key(n.as_str()),
                        "{n} is named in Connection but was kept"
                    );
                }
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
            },
        );
        let serve = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_H1_HEAD)
            .serve_connection(TokioIo::new(server), svc);
        let send = async {
            // The server may stop reading (a bad head): not an error here.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(serve, send);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 "),
            "not an HTTP/1.1 answer: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(64)])
        );
    });
}

/// The tunnel's `CONNECT` target: the first byte picks the method, the
/// rest is the request target. An accepted target is the socket address
/// the authority spells; everything else is 405 or 400 with a reason.
pub fn tunnel_connect(data: &[u8]) {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = match m % 4 {
        0 | 1 => http::Method::CONNECT,
        2 => http::Method::GET,
        _ => http::Method::from_bytes(rest.get(..3).unwrap_or(b"X")).unwrap_or(http::Method::PUT),
    };
    let Ok(uri) = http::Uri::try_from(rest) else {
        return;
    };
    match connect_target(&method, &uri) {
        Ok(addr) => {
            assert_eq!(method, http::Method::CONNECT);
            let authority = uri.authority().expect("accepted without an authority");
            assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(addr));
        }
        Err((status, why)) => {
            assert!(status.is_client_error(), "{status}");
            assert!(!why.is_empty());
        }
    }
}

/// The config file: valid TOML or not, a config is accepted whole (and
/// can be shown by the admin API's `/config`) or refused with a message
/// naming the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, "fuzz.toml") {
        Ok(c) => {
            serde_json::to_string(&c).expect("an accepted config is shown by /config");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz.toml"),
                "the error must name the file: {msg}"
            );
        }
    }
}

/// The tap filter (`/tap?…`): a filter or a message saying what is wrong.
pub fn tap_filter(data: &[u8]) {
    let query = String::from_utf8_lossy(data);
    let pods = Pods(vec![(
        "default/web".to_string(),
        vec![IpAddr::from([10, 1, 0, 2])],
    )]);
    if let Err(e) = Filter::from_query(&query, &pods) {
        assert!(!e.trim().is_empty(), "an empty error for {query:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bounded: these run in every `cargo test`; `cargo fuzz` runs longer.
    fn cases(n: u32) -> ProptestConfig {
        ProptestConfig::with_cases(n)
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    /// A request line and headers built from header-ish pieces, so the
    /// parser gets past the first line more often than random bytes do.
    fn http1_heads() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![
                Just("GET".to_string()),
                Just("POST".to_string()),
                Just("CONNECT".to_string()),
                "[A-Z]{1,8}"
            ],
            "[ -~]{0,40}",
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("connection".to_string()),
                        Just("upgrade".to_string()),
                        Just("te".to_string()),
                        Just("transfer-encoding".to_string()),
                        Just("content-length".to_string()),
                        "[!-~&&[^:]]{1,16}"
                    ],
                    "[ -~\t]{0,60}",
                ),
                0..12,
            ),
            bytes(64),
        )
            .prop_map(|(method, target, headers, tail)| {
                let mut h = format!("{method} /{target} HTTP/1.1\r\n").into_bytes();
                for (k, v) in headers {
                    h.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
                }
                h.extend_from_slice(b"\r\n");
                h.extend_from_slice(&tail);
                h
            })
    }

    /// TOML in waymark's shape with values of any type, so parsing reaches
    /// the typed fields and `validate`.
    fn configs() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            "-?[0-9]{1,12}".prop_map(|s| s),
            "\"[ -!#-~]{0,24}\"".prop_map(|s| s),
            Just("true".to_string()),
            Just("[]".to_string()),
            Just("\"0.0.0.0:1\"".to_string()),
            Just("\"10ms\"".to_string()),
        ];
        let section = prop_oneof![
            Just("admin"),
            Just("outbound"),
            Just("limits"),
            Just("proxy"),
            Just("redirect"),
            Just("capture"),
            Just("kernel"),
            Just("inbound"),
            Just("diagnostics"),
        ];
        let key = prop_oneof![
            Just("listen".to_string()),
            Just("socket".to_string()),
            Just("socket_group".to_string()),
            Just("port".to_string()),
            Just("connect_timeout".to_string()),
            Just("idle_timeout".to_string()),
            Just("tunnel_max_handshakes".to_string()),
            Just("max_connections_per_pod".to_string()),
            Just("accept_rate_per_pod".to_string()),
            Just("retry_buffer_bytes".to_string()),
            Just("enabled".to_string()),
            Just("mode".to_string()),
            "[a-z_]{1,12}",
        ];
        proptest::collection::vec(
            (section, proptest::collection::vec((key, value), 0..4)),
            0..4,
        )
        .prop_map(|sections| {
            let mut t = String::new();
            for (s, kvs) in sections {
                t.push_str(&format!("[{s}]\n"));
                for (k, v) in kvs {
                    t.push_str(&format!("{k} = {v}\n"));
                }
            }
            t
        })
    }

    proptest! {
        #![proptest_config(cases(256))]

        #[test]
        fn detection_never_panics_or_changes_its_mind(data in bytes(700)) {
            detect(&data);
        }

        #[test]
        fn http1_heads_of_any_bytes_are_answered_or_refused(data in bytes(512)) {
            http1_head(&data);
        }

        #[test]
        fn http1_heads_with_any_headers_are_stripped_right(data in http1_heads()) {
            http1_head(&data);
        }

        #[test]
        fn tunnel_connect_targets_are_ip_port_or_refused(data in bytes(80)) {
            tunnel_connect(&data);
        }

        #[test]
        fn tunnel_connect_authorities(host in "[0-9a-f:.\\[\\]]{0,40}", port in "[0-9]{0,6}") {
            let mut data = vec![0u8];
            data.extend_from_slice(format!("{host}:{port}").as_bytes());
            tunnel_connect(&data);
        }

        #[test]
        fn config_text_of_any_bytes_is_accepted_or_refused_with_its_name(data in bytes(400)) {
            config(&data);
        }

        #[test]
        fn config_in_waymarks_shape_is_accepted_or_refused_with_its_name(text in configs()) {
            config(text.as_bytes());
        }

        #[test]
        fn tap_filters_of_any_bytes_parse_or_say_why(data in bytes(200)) {
            tap_filter(&data);
        }

        #[test]
        fn tap_filters_in_query_shape_parse_or_say_why(
            q in "(([a-z_]{1,10})=([a-zA-Z0-9%/._:*-]{0,20})&?){0,6}"
        ) {
            tap_filter(q.as_bytes());
        }
    }

    #[test]
    fn the_targets_accept_what_they_should() {
        // Sanity: the invariants are not vacuous.
        assert_eq!(
            connect_target(&http::Method::CONNECT, &"10.1.0.2:80".parse().unwrap()),
            Ok("10.1.0.2:80".parse().unwrap())
        );
        assert!(Config::from_toml("[limits]\nidle_timeout = \"2s\"\n", "x").is_ok());
        assert!(Filter::from_query("colour=red", &Pods::default()).is_err());
    }
}
