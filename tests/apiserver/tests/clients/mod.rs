//! What the client tests share: finding kubectl 1.33 and the Python venv
//! (skipping without them, failing under CI), a scratch directory, and a
//! small HTTP client that shows the server's raw answers.

#![allow(dead_code)] // Each test file uses a different part.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// Where `cargo xtask setup` creates the venv with the pinned Python
/// `kubernetes` and `kubernetes-validate` packages.
pub const DEFAULT_KUBE_VENV: &str = "/var/cache/waymark/kube-venv";

/// Returns `Some(path)` if present; otherwise prints SKIPPED and returns
/// `None`, or panics when `CI` is set (CI must run every test).
fn required(test: &str, what: &str, path: Option<PathBuf>, fix: &str) -> Option<PathBuf> {
    if let Some(p) = path.filter(|p| p.exists()) {
        return Some(p);
    }
    let msg = format!("{test}: {what} not found; {fix}");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set, so this test fails instead of skipping)");
    }
    eprintln!("SKIPPED {msg}");
    None
}

/// kubectl 1.33: `$WAYMARK_KUBECTL`, else the `kubectl.1.33` that the
/// Debian `kubectl` package installs (`dpkg -L kubectl`).
pub fn kubectl(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("WAYMARK_KUBECTL")
        .map(PathBuf::from)
        .or_else(|| {
            let out = Command::new("dpkg").args(["-L", "kubectl"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.ends_with("/kubectl.1.33"))
                .map(PathBuf::from)
        });
    required(
        test,
        "kubectl 1.33 (kubectl.1.33 from the kubectl package)",
        path,
        "install the kubectl package (apt-get install kubectl) or set WAYMARK_KUBECTL",
    )
}

/// Every `kubectl.1.<minor>` the `kubectl` package installs, as (minor, path).
pub fn kubectl_versions() -> Vec<(u32, PathBuf)> {
    let Ok(out) = Command::new("dpkg").args(["-L", "kubectl"]).output() else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let minor = l.rsplit_once("/kubectl.1.")?.1.parse().ok()?;
            Some((minor, PathBuf::from(l)))
        })
        .filter(|(_, p)| p.exists())
        .collect();
    found.sort();
    found
}

/// The venv's python: `$WAYMARK_KUBE_PYTHON`, else the venv setup creates.
pub fn python(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("WAYMARK_KUBE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(DEFAULT_KUBE_VENV).join("bin/python"));
    required(
        test,
        "the Python kubernetes client's venv",
        Some(path),
        "run `cargo xtask setup` (it creates the venv) or set WAYMARK_KUBE_PYTHON",
    )
}

/// This crate's directory (fixtures, Python scripts).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("waymark-apiserver-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One HTTP/1.1 request; the answer's status and JSON body.
pub async fn call(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: Option<(&str, &str)>,
) -> (StatusCode, Value) {
    let (code, bytes) = call_raw(addr, method, path, body).await;
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: the answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (code, json)
}

pub async fn call_raw(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: Option<(&str, &str)>,
) -> (StatusCode, Bytes) {
    let resp = send(addr, method, path, body).await;
    let code = resp.status();
    let bytes = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body arrives within 10 s")
        .expect("reading the body")
        .to_bytes();
    (code, bytes)
}

async fn send(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: Option<(&str, &str)>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connecting to the API server");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some((content_type, _)) = body {
        req = req.header("content-type", content_type);
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(|(_, b)| b.to_string()).unwrap_or_default(),
        )))
        .expect("a valid request");
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("an answer within 10 s")
        .expect("sending the request")
}

/// An open watch: its events one at a time.
pub struct WatchStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    pub status: StatusCode,
}

impl WatchStream {
    pub async fn open(addr: std::net::SocketAddr, path: &str) -> Self {
        let resp = send(addr, Method::GET, path, None).await;
        WatchStream {
            status: resp.status(),
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next event; `None` when the stream ended. Panics after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.next_inner())
            .await
            .unwrap_or_else(|_| panic!("no watch event within {wait:?}"))
    }

    async fn next_inner(&mut self) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("each line is one JSON event"));
            }
            // A cut connection ends the stream as a clean end does.
            let Some(Ok(frame)) = self.body.frame().await else {
                return None;
            };
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}
