//! A small HTTP/1.1 client for the admin API (hyper over one connection
//! per call, to the agent's Unix socket or its loopback TCP port; the CLI
//! makes a handful of calls and exits).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

/// How long the CLI waits to reach the agent before saying it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the CLI reaches an agent: its Unix socket (every endpoint, for
/// root and `admin.socket_group`) or its loopback TCP port (`/live`,
/// `/ready`, `/metrics` only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminTarget {
    Socket(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is neither an IP:port address nor a path to the agent's admin socket (e.g. /run/waymark/admin.sock)"
)]
pub struct BadTarget(String);

impl FromStr for AdminTarget {
    type Err = BadTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            Ok(AdminTarget::Tcp(a))
        } else if s.contains('/') {
            Ok(AdminTarget::Socket(PathBuf::from(s)))
        } else {
            Err(BadTarget(s.to_string()))
        }
    }
}

impl fmt::Display for AdminTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminTarget::Socket(p) => write!(f, "{}", p.display()),
            AdminTarget::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A client of one agent's admin API.
#[derive(Clone, Debug)]
pub struct AdminClient {
    target: AdminTarget,
}

impl AdminClient {
    pub fn new(target: AdminTarget) -> Self {
        AdminClient { target }
    }

    pub fn target(&self) -> &AdminTarget {
        &self.target
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
        let mut sender = match &self.target {
            AdminTarget::Tcp(addr) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out"))
                    .and_then(|r| r.map_err(anyhow::Error::from))
                    .with_context(|| {
                        format!(
                            "cannot reach the agent's admin API at {addr} (is `waymark agent` running on this node? use --admin to point elsewhere)"
                        )
                    })?;
                stream.set_nodelay(true).ok();
                handshake(stream).await?
            }
            AdminTarget::Socket(path) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out"))
                    .and_then(|r| r.map_err(socket_error))
                    .with_context(|| {
                        format!("cannot reach the agent's admin socket {}", path.display())
                    })?;
                handshake(stream).await?
            }
        };
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, self.host())
            .header(hyper::header::USER_AGENT, user_agent())
            .body(Full::new(body))
            .context("cannot build the admin request")?;
        sender
            .send_request(req)
            .await
            .with_context(|| format!("admin request {path_and_query} failed"))
    }

    /// The Host header: the address, or `localhost` over the socket.
    fn host(&self) -> String {
        match &self.target {
            AdminTarget::Tcp(a) => a.to_string(),
            AdminTarget::Socket(_) => "localhost".to_string(),
        }
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

async fn handshake<S>(stream: S) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin API handshake failed")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Says what to do about the usual reasons a socket cannot be reached.
fn socket_error(e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            "is `waymark agent` running on this node? its admin.socket may be elsewhere: pass --admin PATH or set WAYMARK_ADMIN"
        }
        std::io::ErrorKind::PermissionDenied => {
            "the admin socket is open to root and the members of the agent's admin.socket_group only"
        }
        _ => "",
    };
    if hint.is_empty() {
        anyhow::Error::from(e)
    } else {
        anyhow::anyhow!("{e} ({hint})")
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
        let c = AdminClient::new("/nonexistent/waymark/admin.sock".parse().unwrap());
        let e = format!("{:#}", block_on(c.get_text("/live")).unwrap_err());
        assert!(e.contains("cannot reach the agent's admin socket"), "{e}");
        assert!(e.contains("--admin PATH"), "{e}");
    }

    #[test]
    fn targets_are_addresses_or_socket_paths() {
        assert_eq!(
            "127.0.0.1:4191".parse::<AdminTarget>().unwrap(),
            AdminTarget::Tcp("127.0.0.1:4191".parse().unwrap())
        );
        assert_eq!(
            "/run/waymark/admin.sock".parse::<AdminTarget>().unwrap(),
            AdminTarget::Socket("/run/waymark/admin.sock".into())
        );
        assert_eq!(
            "./admin.sock".parse::<AdminTarget>().unwrap(),
            AdminTarget::Socket("./admin.sock".into())
        );
        let e = "localhost".parse::<AdminTarget>().unwrap_err().to_string();
        assert!(e.contains("neither an IP:port address nor a path"), "{e}");
    }
}
