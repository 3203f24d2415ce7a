//! Query strings of the admin API, one way for every endpoint and the CLI
//! that calls them: `&`-separated `key=value` pairs, `+` for a space,
//! `%XX` escapes decoded and encoded by `percent-encoding` (rust-url's
//! crate). Decoding is strict: a malformed
//! escape or bytes that are not UTF-8 are an error naming the component,
//! never a silently different value.

use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("bad percent-encoding in {0:?}")]
    BadEscape(String),
    #[error("{0:?} is not UTF-8 once decoded")]
    NotUtf8(String),
}

/// The pairs of a query string, decoded, in order (empty pairs skipped; a
/// key without `=` has an empty value).
pub fn pairs(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// One decoded component.
pub fn decode(component: &str) -> Result<String, QueryError> {
    let bytes = component.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err(QueryError::BadEscape(component.to_string()));
    }
    let spaced: Cow<'_, str> = if component.contains('+') {
        Cow::Owned(component.replace('+', " "))
    } else {
        Cow::Borrowed(component)
    };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| QueryError::NotUtf8(component.to_string()))
}

/// What [`encode`] leaves as it is: RFC 3986's unreserved characters, and
/// `/` and `:`, which are safe in a query and keep pod names
/// (`default/web`) and addresses (`10.2.0.2:8080`) readable in logs.
const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/')
    .remove(b':');

/// A value encoded for a query string (a space as `%20`).
pub fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, KEPT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus() {
        assert_eq!(decode("a%20b+c%2F%2B").unwrap(), "a b c/+");
        assert_eq!(decode("%C3%A9").unwrap(), "é");
        assert_eq!(decode("plain").unwrap(), "plain");
    }

    #[test]
    fn bad_input_is_an_error_naming_it() {
        for bad in ["%zz", "a%2", "%", "%é"] {
            assert_eq!(decode(bad), Err(QueryError::BadEscape(bad.into())), "{bad}");
        }
        assert_eq!(decode("%e9"), Err(QueryError::NotUtf8("%e9".into())));
        assert_eq!(
            decode("%zz").unwrap_err().to_string(),
            "bad percent-encoding in \"%zz\""
        );
    }

    #[test]
    fn pairs_in_order() {
        assert_eq!(
            pairs("a=1&&b&c=x+y").unwrap(),
            [
                ("a".into(), "1".into()),
                ("b".into(), String::new()),
                ("c".into(), "x y".into())
            ]
        );
        assert!(pairs("a=%zz").is_err());
    }

    #[test]
    fn encode_round_trips() {
        for v in [
            "a b&c=/d:1",
            "ns/pod-1.x~",
            "tcp port 80 and host 10.0.0.1",
            "é+%",
        ] {
            assert_eq!(decode(&encode(v)).unwrap(), v);
        }
        assert_eq!(encode("a b&c=/d:1"), "a%20b%26c%3D/d:1");
        assert_eq!(encode("ns/pod-1.x~"), "ns/pod-1.x~");
    }
}
