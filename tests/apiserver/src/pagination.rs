//! `limit`/`continue` tokens. A token carries the resourceVersion of the
//! list's first page and the key of the last item returned, in the real
//! server's shape (base64 of `{"v":"meta.k8s.io/v1","rv":N,"start":"key\0"}`),
//! so every page is read from the same snapshot.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use serde::{Deserialize, Serialize};

use crate::status::ApiError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Token {
    v: String,
    rv: u64,
    start: String,
}

/// A decoded continue token: list at `rv`, items with keys after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continue {
    pub rv: u64,
    pub after: String,
}

const TOKEN_VERSION: &str = "meta.k8s.io/v1";

pub fn encode(rv: u64, last_key: &str) -> String {
    let token = Token {
        v: TOKEN_VERSION.into(),
        rv,
        // The next key that can exist after `last_key`.
        start: format!("{last_key}\0"),
    };
    URL_SAFE.encode(serde_json::to_vec(&token).expect("a token serializes"))
}

pub fn decode(text: &str) -> Result<Continue, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let bytes = URL_SAFE
        .decode(text)
        .map_err(|_| bad("the token is not base64"))?;
    let token: Token = serde_json::from_slice(&bytes).map_err(|_| bad("the token is not JSON"))?;
    if token.v != TOKEN_VERSION {
        return Err(bad(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let after = token
        .start
        .strip_suffix('\0')
        .ok_or_else(|| bad("the start key is malformed"))?
        .to_string();
    Ok(Continue {
        rv: token.rv,
        after,
    })
}

/// The 410 for a token whose snapshot the history no longer holds.
pub fn expired() -> ApiError {
    ApiError::new(
        crate::status::Reason::Expired,
        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = encode(42, "default/web-1");
        assert_eq!(
            decode(&t).unwrap(),
            Continue {
                rv: 42,
                after: "default/web-1".into()
            }
        );
    }

    #[test]
    fn garbage_is_400() {
        for bad in [
            "%%%",
            "bm90IGpzb24=",
            &URL_SAFE.encode(br#"{"v":"x","rv":1,"start":"a\u0000"}"#),
        ] {
            assert_eq!(decode(bad).unwrap_err().reason.code(), 400, "{bad}");
        }
    }
}
