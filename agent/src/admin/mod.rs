//! The admin API: `/live`, `/ready`, `/metrics`, `/config`, `/log-level`,
//! `/capture`, `/drops`, `/drops/follow`, the sliding-window stats (`/stat`,
//! `/routes`, `/edges`), the balancer's view of each endpoint (`/endpoints`),
//! the open connections (`/conns`), the facts `waymark check` judges
//! (`/check`, `/check/peers`), and
//! `/tap` (a stream of newline-delimited JSON that lasts as long as the
//! client reads it; see `diagnostics::tap`).
//!
//! It runs on its own single-threaded runtime (as ztunnel's does) so a slow
//! scrape or a large config dump never queues behind proxied traffic, and
//! proxied traffic never starves the operator's view of the agent.
//!
//! Two listeners: loopback TCP (`admin.listen`) answers only `/live`,
//! `/ready` and `/metrics`, for probes and scrapers, because anything in the
//! node's network namespace can reach it; the Unix socket (`admin.socket`)
//! answers everything, to callers whose credentials pass `socket::Access`.

mod capture;
pub mod check;
mod conns;
mod drops;
pub mod endpoints;
mod meshed;
pub mod peers;
mod ready;
mod routes;
pub mod socket;
pub mod stats;

pub use capture::EXCLUDED_HEADER as CAPTURE_EXCLUDED_HEADER;
pub use ready::Readiness;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::AdminConfig;
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
    pub kernel: Option<Arc<crate::kernel::KernelDiag>>,
    /// The sliding windows behind `/stat`, `/routes` and `/edges`.
    pub stats: Arc<crate::telemetry::stats::Stats>,
    pub discovery: Arc<crate::discovery::Discovery>,
    /// The config file the agent was started with (`None`: embedded default).
    pub config_path: Option<std::path::PathBuf>,
    /// The redirect programs as the kernel sees them now.
    pub redirect_state: Box<dyn Fn() -> crate::redirect::query::RedirectState + Send + Sync>,
    /// Validity of the workload certificates the agent holds (none until
    /// identities are configured).
    pub certificates: Box<dyn Fn() -> Vec<check::CertFacts> + Send + Sync>,
    pub tap: Arc<crate::diagnostics::tap::TapHub>,
    /// The open connections behind `/conns`.
    pub conns: Arc<crate::telemetry::conns::ConnTable>,
    /// Probes the other nodes' agents (`/check/peers`).
    pub peer_probe: peers::PeerProbe,
    /// Kubernetes discovery's state for `/check` (`None`: off).
    pub kubernetes: Box<dyn Fn() -> Option<crate::kube::Report> + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("{0}")]
    Group(String),
    #[error("cannot start the admin runtime: {0}")]
    Runtime(std::io::Error),
}

/// Who is on the other end of an admin connection; the routes serve the
/// sensitive endpoints only to a [`Caller::Socket`] (whose credentials the
/// accept loop has already checked).
#[derive(Clone, Debug)]
pub enum Caller {
    Tcp(SocketAddr),
    Socket(socket::Peer),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Tcp(a) => write!(f, "{a}"),
            Caller::Socket(p) => write!(f, "admin socket, {p}"),
        }
    }
}

/// What every connection's handler shares.
struct Served {
    state: AdminState,
    /// The socket's path, named in the TCP side's refusals.
    socket: std::path::PathBuf,
}

/// A running admin server; dropping it does not stop it, `stop` does.
pub struct AdminServer {
    pub local_addr: SocketAddr,
    pub socket_path: std::path::PathBuf,
    socket_id: (u64, u64),
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `admin.listen` and `admin.socket` and serves both on a
    /// dedicated thread.
    pub fn start(config: &AdminConfig, state: AdminState) -> Result<Self, AdminError> {
        let addr = config.listen;
        let group = config
            .socket_group
            .as_deref()
            .map(crate::config::admin::resolve_group)
            .transpose()
            .map_err(AdminError::Group)?;
        let access = socket::Access {
            agent_uid: nix::unistd::geteuid().as_raw(),
            group,
        };
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
        let bound = socket::bind(&config.socket, group)?;
        let (socket_path, socket_id) = (bound.path.clone(), bound.id());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("waymark-admin")
            .build()
            .map_err(AdminError::Runtime)?;
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let served = Arc::new(Served {
            state,
            socket: socket_path.clone(),
        });
        let thread = std::thread::Builder::new()
            .name("waymark-admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let tcp = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            warn!(error = %e, "admin listener unusable");
                            return;
                        }
                    };
                    let unix = match UnixListener::from_std(bound.listener) {
                        Ok(l) => l,
                        Err(e) => {
                            warn!(error = %e, "admin socket unusable");
                            return;
                        }
                    };
                    tokio::join!(
                        serve_tcp(tcp, served.clone(), stop2.clone()),
                        serve_unix(unix, access, served, stop2),
                    );
                })
            })
            .map_err(AdminError::Runtime)?;
        Ok(AdminServer {
            local_addr,
            socket_path,
            socket_id,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, joins the admin thread and removes the socket (unless
    /// a newer agent has put its own at the path).
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        socket::BoundSocket::remove(&self.socket_path, self.socket_id);
    }
}

/// How long an accept loop waits after a failed accept (EMFILE and
/// friends) instead of spinning on the error.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

async fn serve_tcp(listener: TcpListener, served: Arc<Served>, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, Caller::Tcp(peer), served.clone()));
    }
}

async fn serve_unix(
    listener: UnixListener,
    access: socket::Access,
    served: Arc<Served>,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let peer = match socket::peer(&stream) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the admin socket caller's credentials; closing");
                continue;
            }
        };
        if access.allows(&peer) {
            tokio::spawn(serve_connection(
                stream,
                Caller::Socket(peer),
                served.clone(),
            ));
        } else {
            // Answer in HTTP so the CLI can say why, then close.
            warn!(%peer, "admin socket caller refused");
            let body = format!(
                "{peer} may not use the admin socket; it is open to {}\n",
                access.describe()
            );
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(routes::text(
                            hyper::StatusCode::FORBIDDEN,
                            body,
                        ))
                    }
                });
                let _ = http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

async fn serve_connection<S>(stream: S, caller: Caller, served: Arc<Served>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let who = caller.clone();
    let svc = service_fn(move |req| {
        let served = served.clone();
        let caller = caller.clone();
        async move { routes::handle(&served.state, &served.socket, &caller, req).await }
    });
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        debug!(caller = %who, error = %e, "admin connection ended with an error");
    }
}
