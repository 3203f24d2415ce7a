//! The agent's outbound data path in this process, without the kernel: for
//! tests of routing, balancing, retries, timeouts, budgets and the proxy's
//! errors that run in seconds, without root, eBPF or network namespaces.
//!
//! What the kernel does for a real pod is done here by hand: the pod's
//! listener is bound on `127.0.0.1`, and [`InProcess::connect`] records the
//! destination the client meant (as `sock_ops` records it) before
//! connecting to that listener. Everything from the accept on is the
//! agent's own code, wired by [`DataPath::new`] as `app::run` wires it;
//! upstream connections are made from this process's namespace
//! (`outbound.dial_from = "node"`). The mTLS tunnel, enrollment and the
//! kernel's diagnostics are tested where they run: the world tests.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::data_path::{DataPath, Shared};
use crate::diagnostics::tap::TapHub;
use crate::discovery::Discovery;
use crate::http::budget::BufferBudget;
use crate::proxy::OriginalDst;
use crate::proxy::outbound::PodInfo;
use crate::telemetry::conns::ConnTable;
use crate::telemetry::metrics::Metrics;
use crate::transport::upstream::Upstreams;

/// The name of the one pod an [`InProcess`] agent serves.
pub const POD: &str = "test/client";

/// Original destinations by the client's address, as the kernel keeps them
/// by socket.
#[derive(Default)]
struct Recorded(Mutex<HashMap<SocketAddr, SocketAddr>>);

impl OriginalDst for Recorded {
    fn take(&self, _netns_cookie: u64, client: SocketAddr) -> Result<Option<SocketAddr>, String> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&client))
    }
}

/// An agent's outbound data path serving one pod whose connections are
/// redirected by [`InProcess::connect`]. Stops when dropped.
pub struct InProcess {
    data: DataPath,
    listener: SocketAddr,
    recorded: Arc<Recorded>,
    registry: Registry,
    stop: CancellationToken,
}

impl InProcess {
    /// Builds the data path from `config` (its `[[services]]`, `[proxy]`,
    /// `[outbound]`, `[limits]`, `[balancer]`) and starts serving the pod.
    /// Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Self> {
        let discovery =
            Arc::new(Discovery::from_config(&config).context("cannot build the service table")?);
        let mut metrics = Metrics::new(
            config.metrics.max_destinations,
            config.metrics.max_stat_edges,
        );
        let tap = Arc::new(TapHub::new(&mut metrics.registry));
        let recorded = Arc::new(Recorded::default());
        let data = DataPath::new(
            &config,
            Shared {
                metrics: &metrics,
                discovery,
                upstreams: Arc::new(Upstreams::new(&config, None)),
                original_dst: recorded.clone(),
                tap,
                conns: ConnTable::new(),
                buffer_budget: BufferBudget::new(
                    config.limits.buffer_memory_bytes,
                    metrics.tcp.buffer_memory_bytes.clone(),
                    metrics.tcp.limit_refused_total.clone(),
                ),
                descriptors: crate::proxy::descriptors::Descriptors::for_open_files(),
                kernel: None,
                drain: Default::default(),
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the pod's listener")?;
        let addr = listener.local_addr()?;
        let pod = Arc::new(PodInfo {
            name: POD.into(),
            netns_cookie: 1,
            ips: vec![addr.ip()],
            identity: None,
            netns: None,
            open: Default::default(),
            accept_bucket: Default::default(),
            accept_rate_logged: Default::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(data.outbound.clone().serve(pod, listener, stop.clone()));
        Ok(Self {
            data,
            listener: addr,
            recorded,
            registry: std::mem::take(&mut metrics.registry),
            stop,
        })
    }

    /// A connection from the pod to `dst`, redirected to the agent as the
    /// kernel would redirect it.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse().expect("an address"))?;
        let local = socket.local_addr()?;
        self.recorded
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(local, dst);
        socket.connect(self.listener).await
    }

    /// The agent's metrics, in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The data path's parts, to look inside (the service table, the pool).
    pub fn data_path(&self) -> &DataPath {
        &self.data
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.cancel();
        self.data.outbound.drain.forced().cancel();
    }
}
