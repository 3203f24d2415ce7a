//! The admin API: `/live`, `/ready`, `/metrics`, `/config`, `/log-level`,
//! `/capture`, `/drops`, `/drops/follow`, the sliding-window stats (`/stat`,
//! `/routes`, `/edges`), the balancer's view of each endpoint (`/endpoints`), the facts `waymark check` judges (`/check`, `/check/peers`), and
//! `/tap` (a stream of newline-delimited JSON that lasts as long as the
//! client reads it; see `diagnostics::tap`).
//!
//! It runs on its own single-threaded runtime (as ztunnel's does) so a slow
//! scrape or a large config dump never queues behind proxied traffic, and
//! proxied traffic never starves the operator's view of the agent. It
//! listens on loopback only (the config rejects anything else) because it
//! has no authentication.

mod capture;
pub mod check;
mod drops;
pub mod endpoints;
mod meshed;
pub mod peers;
mod ready;
mod routes;
pub mod stats;

pub use capture::EXCLUDED_HEADER as CAPTURE_EXCLUDED_HEADER;
pub use ready::Readiness;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::telemetry::LogLevelHandle;

/// What the admin API reads from the rest of the agent.
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Called before each scrape to refresh gauges sampled from elsewhere
    /// (e.g. kernel map occupancy).
    pub before_scrape: Box<dyn Fn() + Send + Sync>,
    pub config: crate::reload::SharedConfig,
    pub log_level: LogLevelHandle,
    /// Packet captures (`POST /capture`).
    pub captures: Arc<crate::diagnostics::capture::Captures>,
    /// The kernel diagnostics behind `/drops`, if they loaded.
    pub kernel: Option<Arc<crate::diagnostics::kernel::KernelDiag>>,
    /// The sliding windows behind `/stat`, `/routes` and `/edges`.
    pub stats: Arc<crate::diagnostics::stats::Stats>,
    pub discovery: Arc<crate::discovery::Discovery>,
    /// The config file the agent was started with (`None`: embedded default).
    pub config_path: Option<std::path::PathBuf>,
    /// The redirect programs as the kernel sees them now.
    pub redirect_state: Box<dyn Fn() -> crate::redirect::query::RedirectState + Send + Sync>,
    /// Validity of the workload certificates the agent holds (none until
    /// identities are configured).
    pub certificates: Box<dyn Fn() -> Vec<check::CertFacts> + Send + Sync>,
    pub tap: Arc<crate::diagnostics::tap::TapHub>,
    /// Probes the other nodes' agents (`/check/peers`).
    pub peer_probe: peers::PeerProbe,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the admin runtime: {0}")]
    Runtime(std::io::Error),
}

/// A running admin server; dropping it does not stop it, `stop` does.
pub struct AdminServer {
    pub local_addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` and serves on a dedicated thread.
    pub fn start(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        // SO_REUSEPORT: during a rollout the new agent binds the same
        // address (a DaemonSet on the host network) beside the old one.
        let std_listener: std::net::TcpListener = (|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(128)?;
            Ok(socket.into())
        })()
        .map_err(|source| AdminError::Bind { addr, source })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|source| AdminError::Bind { addr, source })?;
        let local_addr = std_listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("waymark-admin")
            .build()
            .map_err(AdminError::Runtime)?;
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let state = Arc::new(state);
        let thread = std::thread::Builder::new()
            .name("waymark-admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            warn!(error = %e, "admin listener unusable");
                            return;
                        }
                    };
                    loop {
                        let (stream, peer) = tokio::select! {
                            _ = stop2.cancelled() => break,
                            a = listener.accept() => match a {
                                Ok(a) => a,
                                Err(e) => {
                                    // EMFILE and friends: back off instead
                                    // of spinning on the error.
                                    warn!(error = %e, "admin accept failed");
                                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                                    continue;
                                }
                            },
                        };
                        let state = state.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| {
                                let state = state.clone();
                                async move { routes::handle(&state, peer, req).await }
                            });
                            if let Err(e) = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await
                            {
                                debug!(%peer, error = %e, "admin connection ended with an error");
                            }
                        });
                    }
                })
            })
            .map_err(AdminError::Runtime)?;
        Ok(AdminServer {
            local_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and joins the admin thread.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
