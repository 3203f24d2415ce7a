//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, so a
//! proxy removes them, along with any header the `Connection` header names,
//! before forwarding. `TE: trailers` survives towards HTTP/2 upstreams since
//! gRPC requires it.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Headers that are always connection-specific.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
];

/// Removes hop-by-hop headers. `keep_upgrade` keeps `Connection: upgrade`
/// and `Upgrade` for a request being upgraded (WebSocket), which the proxy
/// forwards end to end on purpose.
///
/// This runs twice per proxied request (the request and the response),
/// and most responses carry `Connection: keep-alive`: one pass over the
/// names present decides what goes, comparing them with the hop-by-hop
/// names and the `Connection` tokens as strings, and only names found are
/// removed. (A removal per hop-by-hop name, each hashing its name, and a
/// `HeaderName` made for every `Connection` token, was ~1.5 % of the
/// one-hop path's CPU.)
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // The `Connection` values, found once (not once per name present);
    // walking them again costs no lookup.
    let connection = headers.get_all(header::CONNECTION);
    let named = |name: &str| {
        connection
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(name))
    };
    // Most messages lose one or two names (`Connection`, `Keep-Alive`):
    // kept inline, so stripping them allocates nothing.
    let mut doomed: [Option<HeaderName>; 4] = Default::default();
    let mut more: Vec<HeaderName> = Vec::new();
    let mut count = 0;
    let mut doom = |name: &HeaderName| {
        match doomed.get_mut(count) {
            Some(slot) => *slot = Some(name.clone()),
            None => more.push(name.clone()),
        }
        count += 1;
    };
    for name in headers.keys() {
        let s = name.as_str();
        let always = is_hop_by_hop(s);
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            // Kept (the connection header is rewritten below), unless
            // `Connection` names itself: removed, as any named header.
            if name == header::CONNECTION && named(s) {
                doom(name);
            }
            continue;
        }
        if always || named(s) {
            doom(name);
        }
    }
    if count == 0 && !keep_upgrade {
        return;
    }
    let names = || doomed.iter().flatten().chain(more.iter());
    let te_trailers = names().any(|n| n == header::TE) && lists(headers, header::TE, "trailers");
    for name in names() {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    }
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// The names that are always connection-specific (`name` is lower case,
/// as a `HeaderName` is).
fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_str() == name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// Whether the request asks for a protocol upgrade (HTTP/1.1 only).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && lists(headers, header::CONNECTION, "upgrade")
}

/// Whether a comma-separated list header (`Connection`, `TE`) has `token`
/// in any of its values, compared case-insensitively.
fn lists(headers: &HeaderMap, list: HeaderName, token: &str) -> bool {
    headers
        .get_all(list)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("host", "a"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        // (Removal reorders the names left, as `HeaderMap::remove` does;
        // the order of different names carries no meaning in HTTP.)
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["host", "x-kept"]);
    }

    #[test]
    fn more_named_headers_than_are_kept_inline_all_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-a, x-b"),
            ("connection", "X-C,x-d"),
            ("keep-alive", "timeout=5"),
            ("x-a", "1"),
            ("x-b", "1"),
            ("x-c", "1"),
            ("x-d", "1"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["host", "te"]);
        assert_eq!(h.get("te").unwrap(), "trailers");
    }

    #[test]
    fn te_trailers_survives_other_te_values_do_not() {
        let mut h = map(&[("te", "gzip, trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn upgrade_is_kept_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    /// The removal as first written (a removal per hop-by-hop name): the
    /// one-pass version must leave every map as this one does.
    fn reference(headers: &mut HeaderMap, keep_upgrade: bool) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .collect();
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        for name in named {
            headers.remove(&name);
        }
        for name in HOP_BY_HOP {
            if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
                continue;
            }
            headers.remove(&name);
        }
        for name in ["keep-alive", "proxy-connection"] {
            headers.remove(name);
        }
        if keep_upgrade {
            headers.insert(
                header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
        }
        if te_trailers {
            headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
        }
    }

    const NAMES: [&str; 12] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "host",
        "x-private",
        "content-length",
        "x-kept",
    ];
    const TOKENS: [&str; 9] = [
        "keep-alive",
        "Upgrade",
        " X-Private ",
        "close",
        "connection",
        "host",
        "trailers",
        "bad token",
        "",
    ];

    proptest::proptest! {
        #[test]
        fn one_pass_removes_what_a_removal_per_name_did(
            present in proptest::collection::vec((0..NAMES.len(), 0..TOKENS.len()), 0..10),
            connection in proptest::collection::vec(proptest::collection::vec(0..TOKENS.len(), 1..4), 0..3),
            keep_upgrade: bool,
        ) {
            let mut h = HeaderMap::new();
            for (n, v) in present {
                let value = if NAMES[n] == "te" { "gzip, trailers" } else { TOKENS[v].trim() };
                h.append(HeaderName::from_static(NAMES[n]), value.parse().unwrap());
            }
            for tokens in connection {
                let v: Vec<&str> = tokens.iter().map(|&t| TOKENS[t]).collect();
                h.append(header::CONNECTION, v.join(",").parse().unwrap());
            }
            let mut want = h.clone();
            reference(&mut want, keep_upgrade);
            strip_hop_by_hop(&mut h, keep_upgrade);
            proptest::prop_assert_eq!(h, want);
        }
    }
}
