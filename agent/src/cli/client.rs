//! A small HTTP/1.1 client for the admin API (hyper over one TCP
//! connection per call; the CLI makes a handful of calls and exits).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long the CLI waits to reach the agent before saying it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of one agent's admin API.
#[derive(Clone, Debug)]
pub struct AdminClient {
    addr: SocketAddr,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> Self {
        AdminClient { addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request and returns the response with its body unread, so
    /// streaming endpoints (tap, drops --follow, capture) can be read as
    /// they arrive.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(|| {
                format!(
                    "cannot reach the agent's admin API at {} (is `waymark agent` running on this node? use --admin to point elsewhere)",
                    self.addr
                )
            })?;
        stream.set_nodelay(true).ok();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("admin API handshake failed")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::USER_AGENT, user_agent())
            .body(Full::new(body))
            .context("cannot build the admin request")?;
        sender
            .send_request(req)
            .await
            .with_context(|| format!("admin request {path_and_query} failed"))
    }

    /// GET returning the whole body as text; a non-2xx status is an error
    /// carrying the agent's explanation.
    pub async fn get_text(&self, path_and_query: &str) -> Result<String> {
        self.text(Method::GET, path_and_query, Bytes::new()).await
    }

    /// Any method, whole body as text, non-2xx is an error.
    pub async fn text(&self, method: Method, path_and_query: &str, body: Bytes) -> Result<String> {
        let rsp = self.send(method, path_and_query, body).await?;
        let status = rsp.status();
        let body = rsp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the response to {path_and_query}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!(
                "agent answered {status} to {path_and_query}: {}",
                text.trim_end()
            );
        }
        Ok(text)
    }

    /// GET returning the body decoded from JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path_and_query: &str,
    ) -> Result<T> {
        let text = self.get_text(path_and_query).await?;
        serde_json::from_str(&text)
            .with_context(|| format!("the agent's answer to {path_and_query} is not the JSON this CLI expects (agent and CLI versions differ?)"))
    }
}

/// Names the CLI and who runs it; the agent logs it with requests that
/// matter (captures).
fn user_agent() -> String {
    let uid = nix::unistd::getuid();
    let user = std::env::var("SUDO_USER")
        .ok()
        .map(|u| format!("{u} via sudo"))
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "-".to_string());
    format!(
        "waymark-cli/{} (user {user}, uid {uid}, pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    )
}

/// Runs one CLI future on a small current-thread runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the CLI runtime")?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_agent_is_a_clear_error() {
        // Port 1 on loopback: nothing listens there.
        let c = AdminClient::new("127.0.0.1:1".parse().unwrap());
        let e = block_on(c.get_text("/live")).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot reach the agent's admin API"),
            "{e:#}"
        );
    }
}
