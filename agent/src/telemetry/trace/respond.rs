//! How a hop answers for itself: a TRACE whose `Max-Forwards` reached 0
//! is reflected here, and every traced response carries this hop's context
//! back (appended to a TRACE's body, a header otherwise). The same in both
//! directions: the outbound agent and the receiving one add their block.

use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::{CONTEXT_HEADER, Hop, Mode};
use crate::http::body::{ProxyBody, full, prefixed};
use crate::http::budget::Account;

/// Largest response body a TRACE block is appended to; a bigger one is
/// passed on untouched with the context in a header instead.
const MAX_TRACE_BODY: usize = 1024 * 1024;

/// Decrements `Max-Forwards` on a TRACE; false when it is already 0 and
/// the request must not be forwarded.
pub fn forwardable<B>(req: &mut Request<B>) -> bool {
    let Some(n) = req
        .headers()
        .get(header::MAX_FORWARDS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return true;
    };
    if n == 0 {
        return false;
    }
    req.headers_mut()
        .insert(header::MAX_FORWARDS, HeaderValue::from(n - 1));
    true
}

/// The final recipient's answer to a TRACE: the request as received.
pub fn reflect<B>(req: &Request<B>) -> Response<ProxyBody> {
    let mut msg = format!("{} {} {:?}\r\n", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        msg.push_str(name.as_str());
        msg.push_str(": ");
        msg.push_str(&String::from_utf8_lossy(value.as_bytes()));
        msg.push_str("\r\n");
    }
    msg.push_str("\r\n");
    let mut resp = Response::new(full(msg));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/http"),
    );
    resp
}

/// Adds this hop's context to a response: appended to the body for TRACE
/// (Content-Length fixed up by rebuilding the body), a header otherwise,
/// and also when the body outgrows [`MAX_TRACE_BODY`] or `account` cannot
/// get its bytes from the node-wide budget.
pub async fn add_context(
    resp: Response<ProxyBody>,
    mode: Mode,
    context: &(impl Hop + Sync),
    mut account: Account,
) -> Response<ProxyBody> {
    let (mut parts, mut body) = resp.into_parts();
    // A body of unknown length (chunked, HTTP/2 without content-length)
    // is read up to the limit too.
    if mode == Mode::Body
        && body
            .size_hint()
            .upper()
            .is_none_or(|n| n <= MAX_TRACE_BODY as u64)
    {
        // Read by hand rather than through `Limited`: its boxed error type
        // trips the compiler's Send inference inside hyper's h2 executor.
        // Trailers, which a TRACE response has no use for, are dropped.
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    let mut over = false;
                    if let Ok(data) = frame.into_data() {
                        over = !account.grow(data.len());
                        bytes.extend_from_slice(&data);
                    }
                    if over || bytes.len() > MAX_TRACE_BODY {
                        // Too big after all, or the node's budget is
                        // spent: what was read goes on first, the rest as
                        // it comes, the context in a header.
                        if let Ok(v) = HeaderValue::from_str(&context.header()) {
                            parts.headers.append(CONTEXT_HEADER, v);
                        }
                        return Response::from_parts(parts, prefixed(bytes.into(), body));
                    }
                }
                Err(e) => {
                    let note =
                        format!("waymark: the response body broke off while tracing it: {e}\n");
                    bytes.extend_from_slice(note.as_bytes());
                    break;
                }
            }
        }
        bytes.extend_from_slice(context.block().as_bytes());
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, full(bytes));
    }
    if let Ok(v) = HeaderValue::from_str(&context.header()) {
        parts.headers.append(CONTEXT_HEADER, v);
    }
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::budget::BufferBudget;
    use crate::telemetry::trace::Context;

    #[tokio::test]
    async fn a_trace_body_the_budget_cannot_hold_passes_with_the_context_in_a_header() {
        let budget = BufferBudget::new(65536, Default::default(), Default::default());
        let context = Context {
            node: "node0".into(),
            direction: "outbound",
            ..Default::default()
        };
        let body = vec![b'x'; 1000];
        // With room: the block is appended to the body.
        let resp = Response::new(full(body.clone()));
        let resp = add_context(resp, Mode::Body, &context, budget.account("p")).await;
        assert!(resp.headers().get(CONTEXT_HEADER).is_none());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(bytes.len() > body.len() && bytes.starts_with(&body));
        assert_eq!(budget.in_use(), 0, "the buffered body is given back");
        // Without: the body passes untouched, the context in a header.
        let mut hog = budget.account("default/hog");
        assert!(hog.grow(65536 - 10));
        let resp = Response::new(full(body.clone()));
        let resp = add_context(resp, Mode::Body, &context, budget.account("p")).await;
        assert!(resp.headers().get(CONTEXT_HEADER).is_some());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], &body[..]);
    }

    #[test]
    fn max_forwards_counts_down_to_the_final_recipient() {
        let mut req = Request::builder()
            .method("TRACE")
            .header("max-forwards", "1")
            .body(())
            .unwrap();
        assert!(forwardable(&mut req));
        assert_eq!(req.headers()["max-forwards"], "0");
        assert!(!forwardable(&mut req), "0: this hop answers");
        let resp = reflect(&req);
        assert_eq!(resp.headers()["content-type"], "message/http");
        let mut no_header = Request::new(());
        assert!(forwardable(&mut no_header));
    }
}
