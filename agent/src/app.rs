//! Wires the agent together and owns its lifecycle: start-up order,
//! readiness, signal handling and the drain.
//!
//! Start-up order matters. The programs attach to the pods' whole cgroup but
//! redirect only enrolled pods, and a pod is enrolled once its listener is
//! bound (see `enrollment`), so the first redirected connect already finds a
//! listener (merbridge #167: a 503 on the first request after enrolment).
//!
//! The kernel side is pinned (`redirect::pin`): a starting agent adopts
//! the maps and links an earlier one left, and when another agent still
//! serves the node this one binds beside it and takes over once ready
//! (`handover`).
//!
//! Shutdown is the reverse: on SIGTERM/SIGINT, or when a successor asks,
//! the agent reports not-ready, stops accepting, then gives open
//! connections `shutdown.drain_grace` to finish (HTTP winds down without
//! failing a request: `http::drain`) before closing them. The programs
//! stay attached through their pinned links (`redirect.on_agent_down =
//! "closed"`: with no agent, pods' connections are refused) unless the
//! config says `"open"`, where they are detached as the drain starts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{AdminServer, AdminState, Readiness};
use crate::config::Config;
use crate::config::OnAgentDown;
use crate::config::mesh::InboundMode;
use crate::data_path::{DataPath, Shared};
use crate::diagnostics::capture::{Captures, PacketHold};
use crate::diagnostics::tap::TapHub;
use crate::discovery::Discovery;
use crate::drain::Drain;
use crate::enrollment::{Enrollment, EnrollmentParts};
use crate::handover::{self, Claim};
use crate::identity::SpiffeId;
use crate::identity::manager::IdentityManager;
use crate::kernel as kernel_diag;
use crate::proxy::inbound::authz::InboundAuthz;
use crate::proxy::inbound::http_stream::InboundHttp;
use crate::proxy::inbound::{Inbound, StrictCollector, TunnelCollector};
use crate::proxy::outbound::kernel_refusals::{KernelRefusals, RefusalCounts};
use crate::proxy::{OriginalDst, ReplyPath};
use crate::redirect::{Pins, Redirect};
use crate::reload::{ReloadMetrics, Reloader, SharedConfig};
use crate::telemetry::LogLevelHandle;
use crate::telemetry::metrics::{MapLabels, Metrics};
use crate::transport::tunnel::{PoolConfig, TunnelPool};
use crate::transport::upstream::{Mesh, Upstreams};

const READY_PROGRAMS: &str = "redirect programs not attached";
const READY_LISTENERS: &str = "pod listeners not bound";
const READY_DRAINING: &str = "draining";
const READY_DISCOVERY: &str = "no full picture of the cluster yet";
const READY_CERTS: &str = "workload certificates missing or expired";
const READY_SUCCESSOR: &str = "a new agent is taking over this node (it answers for itself)";

/// A redirect error with its causes, for the proxy's string errors.
fn chain(e: crate::redirect::RedirectError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// The kernel's original-destination maps behind the proxy's trait. Lookups
/// share a read lock (the map syscall is atomic on its own); only attach
/// and detach take it exclusively.
struct KernelOriginalDst {
    redirect: Arc<RwLock<Redirect>>,
    /// `redirect.reply_shortcut_max_unanswered`.
    max_unanswered: u64,
}

impl OriginalDst for KernelOriginalDst {
    fn take(&self, netns_cookie: u64, client: SocketAddr) -> Result<Option<SocketAddr>, String> {
        let r = self.redirect.read().unwrap_or_else(|e| e.into_inner());
        r.take_original_dst(netns_cookie, client).map_err(chain)
    }

    fn shortcut_replies(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<ReplyPath, String> {
        let r = self.redirect.read().unwrap_or_else(|e| e.into_inner());
        match r.shortcut_replies(netns_cookie, client, socket) {
            Ok(None) => Ok(ReplyPath::Off),
            Ok(Some(false)) => Ok(ReplyPath::Loopback),
            Ok(Some(true)) => Ok(ReplyPath::Sockmap {
                max_unanswered: self.max_unanswered,
                requests: r.request_shortcut_on(),
                delay_acks: r.acks_bounded(),
            }),
            Err(e) => Err(chain(e)),
        }
    }

    fn leave_shortcut(&self, netns_cookie: u64, client: SocketAddr) -> Result<(), String> {
        let r = self.redirect.read().unwrap_or_else(|e| e.into_inner());
        r.leave_shortcut(netns_cookie, client)
            .map(|_| ())
            .map_err(chain)
    }

    fn request_consumed(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        total: u64,
    ) -> Result<(), String> {
        let r = self.redirect.read().unwrap_or_else(|e| e.into_inner());
        r.request_consumed(netns_cookie, client, total)
            .map_err(chain)
    }

    fn forget_request(&self, netns_cookie: u64, client: SocketAddr) {
        let r = self.redirect.read().unwrap_or_else(|e| e.into_inner());
        r.forget_request(netns_cookie, client);
    }
}

/// A pod capture's hold on the reply shortcut: while it runs, the pod's
/// replies are packets again (see [`Redirect::hold_replies_on_packets`]).
struct RepliesOnPackets(Arc<RwLock<Redirect>>);

/// Ends the hold when the capture ends.
struct HeldReplies {
    redirect: Arc<RwLock<Redirect>>,
    netns_cookie: u64,
}

impl PacketHold for RepliesOnPackets {
    fn hold(&self, netns_cookie: u64) -> Box<dyn Send> {
        let r = self.0.read().unwrap_or_else(|e| e.into_inner());
        match r.hold_replies_on_packets(netns_cookie) {
            Ok(taken) => info!(
                netns_cookie,
                connections_taken_off = taken,
                "pod capture: the pod's replies take loopback TCP while it runs (off the reply shortcut)"
            ),
            Err(e) => {
                warn!(netns_cookie, error = %format!("{e:#}"), "pod capture: cannot take the pod's connections off the reply shortcut; their replies are not captured")
            }
        }
        Box::new(HeldReplies {
            redirect: self.0.clone(),
            netns_cookie,
        })
    }
}

impl Drop for HeldReplies {
    fn drop(&mut self) {
        self.redirect
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .release_replies(self.netns_cookie);
    }
}

/// Runs the agent until SIGTERM/SIGINT and the drain are done.
pub fn run(config: Config, path: Option<PathBuf>, log_level: LogLevelHandle) -> Result<()> {
    raise_open_files_limit();
    crate::telemetry::policy::apply(&config.diagnostics);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.workers)
        .thread_name("waymark-worker")
        .enable_all()
        .build()
        .context("cannot start the data-path runtime")?;
    runtime.block_on(run_async(config, path, log_level))
}

/// Where a strict pod accepts new connections from: this node's own
/// addresses (the inbound agent connects from here, and so do the kubelet's
/// probes), this node's pods (they reach each other through this agent,
/// dialling as themselves), and loopback.
fn strict_sources(config: &Config) -> Result<Vec<ipnet::IpNet>> {
    let mut allow: Vec<ipnet::IpNet> = vec![
        "127.0.0.0/8".parse().expect("constant"),
        "::1/128".parse().expect("constant"),
    ];
    let node = nix::ifaddrs::getifaddrs().context("cannot list this node's addresses")?;
    for ifa in node {
        let ip = match ifa.address {
            Some(a) => match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => std::net::IpAddr::V4(v4.ip()),
                (_, Some(v6)) => std::net::IpAddr::V6(v6.ip()),
                _ => continue,
            },
            None => continue,
        };
        allow.push(ipnet::IpNet::from(ip));
    }
    for pod in &config.pods {
        allow.extend(pod.ips.iter().map(|ip| ipnet::IpNet::from(*ip)));
    }
    allow.sort();
    allow.dedup();
    Ok(allow)
}

/// Every proxied connection holds two descriptors (three with its kernel
/// counters' lookups in flight), so the default soft limit (often 1,024)
/// would refuse connections long before the node is busy. The soft limit
/// goes up to the hard one, which only the node's administrator sets.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(
                    from = soft,
                    to = hard,
                    "open files limit raised to the hard limit"
                );
                hard
            }
            Err(e) => {
                warn!(soft, hard, error = %e, "cannot raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => {
            info!(limit = soft, "open files limit (already the hard limit)");
            soft
        }
        Err(e) => {
            warn!(error = %e, "cannot read the open files limit");
            return;
        }
    };
    presize_fd_table(limit);
}

/// Descriptors the table is grown to at most: 512 KiB of the kernel's
/// memory for its pointers.
const PRESIZED_FDS_MAX: u64 = 1 << 16;

/// Grows the process's descriptor table to the open files limit now, while
/// the agent has one thread, instead of while it serves.
///
/// Why: the kernel grows a process's table by doubling it when a new
/// descriptor does not fit (at 1,024, 2,048, 4,096, 8,192, 16,384 open),
/// and in a process with more than one thread it waits for an RCU grace
/// period before it frees the old table (`expand_fdtable`), with the
/// table's lock held against every other thread that opens a descriptor.
/// A pod opening thousands of connections took the agent through those
/// sizes in a few seconds, each time holding up the worker that accepted
/// (and every accept and connect behind it) for the grace period. A table
/// never shrinks, so growing it once at start costs nothing later.
fn presize_fd_table(limit: u64) {
    use nix::fcntl::{FcntlArg, fcntl};
    use std::os::fd::{FromRawFd, OwnedFd};
    let top = limit.min(PRESIZED_FDS_MAX).saturating_sub(1);
    if top < 1024 {
        return;
    }
    let null = match std::fs::File::open("/dev/null") {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "cannot grow the descriptor table at start");
            return;
        }
    };
    // A copy at the lowest free descriptor at or above `top`: the table
    // grows to hold it.
    match fcntl(&null, FcntlArg::F_DUPFD_CLOEXEC(top as i32)) {
        Ok(fd) => {
            // SAFETY: `fd` was just returned to this function and nothing
            // else holds it; dropping the `OwnedFd` closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            tracing::debug!(descriptors = top + 1, "descriptor table grown at start");
        }
        Err(e) => warn!(error = %e, "cannot grow the descriptor table at start"),
    }
}

async fn run_async(config: Config, path: Option<PathBuf>, log_level: LogLevelHandle) -> Result<()> {
    let discovery =
        Arc::new(Discovery::from_config(&config).context("cannot build the service table")?);
    // Who serves this node, decided before anything is bound (see
    // `handover`): a third agent stops here.
    let pinned = claim_node(&config)?;
    let config = Arc::new(config);
    let shared_config: SharedConfig = Arc::new(RwLock::new(config.clone()));
    let readiness = new_readiness(pinned.as_ref().map(|(pins, _)| pins));
    let mut metrics = Metrics::new(
        config.metrics.max_destinations,
        config.metrics.max_stat_edges,
    );
    let captures = Captures::new(&mut metrics.registry);
    // The tunnel's TLS secrets go to the capture's key log only where the
    // config allows key-log captures at all (and even then, only while one
    // runs: the sink formats nothing otherwise).
    let key_log: Option<Arc<dyn rustls::KeyLog>> = (config.capture.enabled
        && config.capture.keylog)
        .then(|| captures.key_log() as Arc<dyn rustls::KeyLog>);
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    // One descriptor budget for the node's connections: pods' outbound
    // ones and the tunnel's inbound streams (see `proxy::descriptors`).
    let descriptors =
        crate::proxy::descriptors::Descriptors::from_config(config.limits.connection_descriptors);
    let streams_per_peer = config
        .limits
        .tunnel_max_streams_per_peer
        .unwrap_or_else(|| {
            crate::proxy::inbound::stream_limits::default_per_peer(descriptors.limit())
        });
    info!(
        budget = descriptors.limit(),
        tunnel_streams_per_peer = streams_per_peer,
        "descriptors for connections and tunnel streams (limits.connection_descriptors; 0: no bound)"
    );
    let buffer_budget = crate::http::budget::BufferBudget::new(
        config.limits.buffer_memory_bytes,
        metrics.tcp.buffer_memory_bytes.clone(),
        metrics.tcp.limit_refused_total.clone(),
    );
    let drain = Drain::default();
    let conns = crate::telemetry::conns::ConnTable::new();
    crate::proxy::listener::migrate_on_close();

    // mTLS: certificates first (a node that cannot get them should not
    // start), then the tunnel client, then the inbound listener.
    let mesh = start_mesh(
        &config,
        &mut metrics,
        MeshInputs {
            key_log: key_log.clone(),
            discovery: discovery.clone(),
            conns: conns.clone(),
            buffer_budget: buffer_budget.clone(),
            descriptors: descriptors.clone(),
            streams_per_peer,
            drain: &drain,
            readiness: readiness.clone(),
            background: &background,
            stop_background: stop_background.clone(),
        },
    )
    .await?;

    let redirect = load_redirect(&config, pinned.as_ref().map(|(pins, _)| pins))?;
    captures.set_packet_hold(Arc::new(RepliesOnPackets(redirect.clone())));
    // Strict inbound's pods by netns cookie, filled when the pods are bound.
    let strict_pods: Arc<RwLock<HashMap<u64, String>>> = Default::default();
    metrics
        .registry
        .register_collector(Box::new(StrictCollector {
            redirect: redirect.clone(),
            pods: strict_pods.clone(),
        }));
    // Every enrolled pod's name by netns cookie, filled as pods are
    // enrolled: what names the kernel's per-pod counts.
    let pod_names: Arc<RwLock<HashMap<u64, String>>> = Default::default();
    let refusal_counts = Arc::new(RefusalCounts::new(
        redirect.clone(),
        pod_names.clone(),
        metrics.tcp.clone(),
    ));
    conns.set_kernel_sockets(crate::telemetry::conns::KernelSockets({
        let counts = refusal_counts.clone();
        Box::new(move || counts.pod_sockets())
    }));
    let before_scrape = scrape_hook(
        &metrics,
        &discovery,
        &redirect,
        mesh.identity.clone(),
        refusal_counts.clone(),
    );
    let kernel = kernel_diag::load_if_enabled(&config.kernel);
    if let Some(k) = &kernel {
        conns.want_flows();
        let replies = redirect.clone();
        k.count_sockmap_replies(Box::new(move || {
            replies
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .shortcut_reply_bytes()
                .map_err(chain)
        }));
        let requests = redirect.clone();
        k.count_sockmap_requests(Box::new(move || {
            requests
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .shortcut_request_bytes()
                .map_err(chain)
        }));
        kernel_diag::register_metrics(&mut metrics.registry, k.clone());
        if let Some(h) = &mesh.inbound_http {
            h.set_kernel(k.clone());
        }
    }
    let reload_metrics = ReloadMetrics::new(&mut metrics.registry);
    let tap = Arc::new(TapHub::new(&mut metrics.registry));
    if let Some(h) = &mesh.inbound_http {
        h.set_tap(tap.clone());
    }
    let kube_status = config
        .kubernetes
        .enabled
        .then(|| crate::kube::Status::new(&mut metrics.registry));
    let registry = Arc::new(std::mem::take(&mut metrics.registry));
    let stop_reload = CancellationToken::new();
    let cluster = match &kube_status {
        Some(status) => {
            readiness.unset(READY_DISCOVERY);
            let client = crate::kube::client(&config.kubernetes).await?;
            info!(kubeconfig = ?config.kubernetes.kubeconfig, "Kubernetes discovery on: waiting for the first full list of every watch");
            Some(crate::kube::start(
                client,
                config.node.name.clone(),
                config.identity.as_ref().map(|i| i.trust_domain.clone()),
                config.kubernetes.clone(),
                status.clone(),
                stop_reload.clone(),
            ))
        }
        None => None,
    };

    let check_redirect = redirect.clone();
    let admin = AdminServer::start(
        &config.admin,
        AdminState {
            readiness: readiness.clone(),
            registry,
            before_scrape,
            config: shared_config.clone(),
            log_level,
            captures: captures.clone(),
            kernel: kernel.clone(),
            stats: metrics.stats.clone(),
            discovery: discovery.clone(),
            config_path: path.clone(),
            redirect_state: Box::new(move || {
                check_redirect
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .verify()
            }),
            // The leaves, issuer and anchors of this node (none without mTLS).
            certificates: {
                let identity = mesh.identity.clone();
                Box::new(move || {
                    identity
                        .as_deref()
                        .map(crate::admin::check::certificates)
                        .unwrap_or_default()
                })
            },
            tap: tap.clone(),
            conns: conns.clone(),
            peer_probe: crate::admin::peers::PeerProbe {
                upstreams: mesh.upstreams.clone(),
            },
            kubernetes: {
                let status = kube_status.clone();
                let latest = cluster.clone();
                Box::new(move || {
                    let status = status.as_deref()?;
                    let latest = latest.as_ref().and_then(|rx| rx.borrow().clone());
                    Some(crate::kube::report(status, latest.as_deref()))
                })
            },
        },
    )?;
    info!(node = %config.node.name, admin = %admin.local_addr, socket = %admin.socket_path.display(), "admin API listening");

    let pods_cgroup = attach_programs(&config, &redirect)?;
    readiness.set(READY_PROGRAMS);
    let stop_kernel = CancellationToken::new();
    if let Some(k) = &kernel {
        k.start(&[], pods_cgroup.as_deref(), &stop_kernel);
    }

    let DataPath {
        pool,
        outbound,
        http: _,
    } = DataPath::new(
        &config,
        Shared {
            metrics: &metrics,
            discovery: discovery.clone(),
            upstreams: mesh.upstreams.clone(),
            original_dst: Arc::new(KernelOriginalDst {
                redirect: redirect.clone(),
                max_unanswered: config.redirect.reply_shortcut_max_unanswered,
            }),
            tap: tap.clone(),
            conns: conns.clone(),
            buffer_budget,
            descriptors,
            kernel: kernel.clone(),
            drain: drain.clone(),
        },
    );
    conns.set_limits(crate::telemetry::conns::OutboundLimits {
        per_pod: outbound.limits.per_pod,
        total: outbound.limits.total,
    });
    info!(
        per_pod = outbound.limits.per_pod,
        total = outbound.limits.total,
        accept_rate_per_pod = outbound.limits.accept_rate.per_second,
        accept_burst_per_pod = outbound.limits.accept_rate.burst,
        "outbound connection limits"
    );
    // The same bounds in the kernel, counted at connect(): a pod at its
    // bound is refused there, before it costs a handshake, an accept and
    // a reset (see `proxy::outbound::kernel_refusals`).
    let refusals = {
        let mut r = redirect.write().unwrap_or_else(|e| e.into_inner());
        r.set_connect_limits(outbound.limits.per_pod, outbound.limits.total)
            .context("cannot give the kernel the connection limits")?;
        r.take_refusals()
            .context("cannot open the kernel's ring of refused connections")?
    };
    let stop_accepting = CancellationToken::new();
    let acceptors = TaskTracker::new();
    let enrollment = Arc::new(Enrollment::new(EnrollmentParts {
        port: config.outbound.port,
        dial_from: config.outbound.dial_from,
        strict: config.inbound.mode == InboundMode::Strict,
        redirect: redirect.clone(),
        outbound: outbound.clone(),
        identity: mesh.identity.clone(),
        kernel: kernel.clone(),
        tap: tap.clone(),
        strict_pods: strict_pods.clone(),
        names: pod_names,
        stop_accepting: stop_accepting.clone(),
        acceptors: acceptors.clone(),
    }));
    // The config file's pods must all come up: a typo there should stop
    // the agent, not leave a pod silently outside the mesh.
    if let Some(e) = enrollment.sync(&config.pod_specs()).into_iter().next() {
        return Err(e).context("cannot enroll the pods of the config file");
    }
    readiness.set(READY_LISTENERS);
    tokio::spawn(
        KernelRefusals {
            counts: refusal_counts,
            ring: refusals,
            tap: tap.clone(),
        }
        .run(stop_background.clone()),
    );
    let reloader = Reloader {
        path,
        base: std::sync::Mutex::new((*config).clone()),
        cluster: Default::default(),
        config: shared_config.clone(),
        discovery: discovery.clone(),
        pool: pool.clone(),
        upstreams: mesh.upstreams.clone(),
        authz: mesh.authz.clone(),
        enrollment: enrollment.clone(),
        on_cluster_synced: {
            let ready = readiness.clone();
            Box::new(move || {
                info!("the cluster's first full picture is in force");
                ready.set(READY_DISCOVERY);
            })
        },
        metrics: reload_metrics,
        keylog_wired: key_log.is_some(),
    };
    tokio::spawn(reloader.run(cluster, stop_reload.clone()));
    info!(
        pods = config.pods.len(),
        services = config.services.len(),
        mtls = mesh.identity.is_some(),
        "waymark agent ready"
    );
    // What starting freed (loading the programs parsed the kernel's BTF)
    // goes back to the kernel now, so an idle agent's RSS is its steady
    // size from the first moment; later bursts are handed back by
    // jemalloc's decay (see `memory`).
    crate::memory::give_back();

    // Held while the agent runs (the serving lock goes with the process).
    let (signal_name, _serving) = serve_until_stopped(pinned, &readiness).await?;
    info!(signal = signal_name, grace = ?config.shutdown.drain_grace, on_agent_down = config.redirect.on_agent_down.as_str(), "shutting down: closing listeners, then draining");
    readiness.unset(READY_DRAINING);
    redirect.write().unwrap_or_else(|e| e.into_inner()).detach();
    stop_kernel.cancel();
    if let Some(k) = &kernel {
        k.detach();
    }
    stop_accepting.cancel();
    stop_reload.cancel();
    captures.shutdown();
    stop_background.cancel();
    acceptors.close();
    acceptors.wait().await;
    drain.run(config.shutdown.drain_grace).await;
    admin.stop();
    info!("waymark agent stopped");
    Ok(())
}

/// With `redirect.cgroup` set (the programs are pinned, see `handover`):
/// whether this agent serves the node now, takes over from a serving one
/// once ready, or must stop (a third agent).
fn claim_node(config: &Config) -> Result<Option<(Pins, Claim)>> {
    if config.redirect.cgroup.is_none() {
        return Ok(None);
    }
    let pins = Pins::open(&config.redirect.pin_path)
        .context("cannot use redirect.pin_path for the redirect's pinned state")?;
    let claim = handover::claim(pins.root(), pins.layout_dir())?;
    if matches!(claim, Claim::Successor { .. }) {
        info!(pin_path = %pins.root().display(), "another agent serves this node; taking over once ready");
    }
    Ok(Some((pins, claim)))
}

/// Readiness as the agent starts: not ready until the programs are attached
/// and the pods' listeners bound.
fn new_readiness(pins: Option<&Pins>) -> Arc<Readiness> {
    let readiness = Arc::new(Readiness::new(&[READY_PROGRAMS, READY_LISTENERS]));
    if let Some(pins) = pins {
        // Both agents of a rollout answer probes on the same admin port
        // (host network, SO_REUSEPORT): while a new agent is starting, the
        // serving one says "not ready", so a probe of the new pod that
        // lands here cannot report it ready before it is.
        let layout = pins.layout_dir().to_owned();
        readiness.add_check(READY_SUCCESSOR, move || {
            !handover::successor_waiting(&layout)
        });
    }
    readiness
}

/// What the mesh part of the agent needs from the rest.
struct MeshInputs<'a> {
    key_log: Option<Arc<dyn rustls::KeyLog>>,
    discovery: Arc<Discovery>,
    conns: Arc<crate::telemetry::conns::ConnTable>,
    buffer_budget: Arc<crate::http::budget::BufferBudget>,
    descriptors: Arc<crate::proxy::descriptors::Descriptors>,
    /// `limits.tunnel_max_streams_per_peer`, or its default.
    streams_per_peer: usize,
    drain: &'a Drain,
    readiness: Arc<Readiness>,
    background: &'a TaskTracker,
    stop_background: CancellationToken,
}

/// The mesh part of the agent: this node's certificates, the ways to
/// upstreams (direct, or the mTLS tunnel client), and the tunnel's
/// receiving side with its authorization. Without `[identity]`, only the
/// direct way.
struct MeshParts {
    identity: Option<Arc<IdentityManager>>,
    upstreams: Arc<Upstreams>,
    authz: Option<Arc<InboundAuthz>>,
    inbound_http: Option<Arc<InboundHttp>>,
}

/// Issues the node's workload certificates (an agent that cannot get them
/// does not start), then builds the tunnel client and starts the inbound
/// listener; keeps the certificates renewed in the background.
async fn start_mesh(
    config: &Config,
    metrics: &mut Metrics,
    inputs: MeshInputs<'_>,
) -> Result<MeshParts> {
    let identity = match &config.identity {
        Some(id) => Some(
            IdentityManager::start(id, local_identities(config), &mut metrics.registry)
                .context("cannot issue this node's workload certificates")?,
        ),
        None => None,
    };
    let mesh = identity.as_ref().map(|m| {
        let pool = TunnelPool::new(
            m.store(),
            m.bundle(),
            PoolConfig {
                connect_timeout: config.outbound.connect_timeout,
                key_log: inputs.key_log.clone(),
                ..Default::default()
            },
        );
        Mesh::new(pool, config)
    });
    let upstreams = Arc::new(Upstreams::new(config, mesh));
    let mut authz = None;
    let mut inbound_stats = None;
    let mut inbound_http = None;
    if let (Some(manager), Some(id)) = (&identity, &config.identity) {
        let node_identity = id
            .node_identity(&config.node.name)
            .context("no valid node identity")?;
        let a = InboundAuthz::new(config, inputs.discovery.clone(), &mut metrics.registry);
        let server = crate::proxy::inbound::ServerConfig {
            handshake_timeout: config.inbound.handshake_timeout,
            max_handshakes: config.limits.tunnel_max_handshakes,
            max_concurrent_streams: config.limits.tunnel_max_concurrent_streams,
            max_streams_per_peer: inputs.streams_per_peer,
            descriptors: Some(inputs.descriptors.clone()),
            idle_timeout: config.limits.idle_timeout,
            connect_timeout: config.outbound.connect_timeout,
            key_log: inputs.key_log.clone(),
            ..Default::default()
        };
        let http_in = InboundHttp::new(
            config,
            metrics.http.clone(),
            metrics.tcp.clone(),
            inputs.discovery.clone(),
            a.clone(),
            inputs.conns.clone(),
            inputs.buffer_budget.clone(),
        );
        inbound_http = Some(http_in.clone());
        let inbound = Arc::new(
            Inbound::start(
                &config.inbound.listen,
                server,
                manager.store(),
                node_identity,
                &manager.bundle(),
                http_in,
                inputs.drain,
            )
            .await?,
        );
        inbound_stats = Some(inbound.stats.clone());
        let up = upstreams.clone();
        manager.on_bundle_change(Box::new(move |bundle| {
            inbound.set_bundle(bundle);
            if let Some(m) = up.mesh() {
                m.pool.set_bundle(bundle.clone());
            }
        }));
        let ready = inputs.readiness.clone();
        inputs.background.spawn(
            manager
                .clone()
                .run(inputs.stop_background.clone(), move |ok| {
                    if ok {
                        ready.set(READY_CERTS);
                    } else {
                        ready.unset(READY_CERTS);
                    }
                }),
        );
        authz = Some(a);
    }
    metrics
        .registry
        .register_collector(Box::new(TunnelCollector {
            inbound: inbound_stats,
            upstreams: upstreams.clone(),
        }));
    Ok(MeshParts {
        identity,
        upstreams,
        authz,
        inbound_http,
    })
}

/// Loads the redirect programs: adopting the pinned state an earlier agent
/// left when the node is pinned, fresh otherwise.
fn load_redirect(config: &Config, pins: Option<&Pins>) -> Result<Arc<RwLock<Redirect>>> {
    let redirect = match pins {
        Some(pins) => Redirect::load_pinned(
            config.outbound.port,
            &config.excludes(),
            pins.clone(),
            config.redirect.on_agent_down == OnAgentDown::Closed,
        ),
        None => Redirect::load(config.outbound.port, &config.excludes()),
    }
    .context("cannot load the redirect programs into the kernel (waymark agent needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN, and a kernel with BTF and cgroup v2)")?;
    let mut redirect = redirect;
    // Where both shortcuts attach the agent's own `sock_ops` program.
    let own_cgroup = agent_cgroup(config);
    if config.redirect.reply_shortcut {
        // An optimisation: without it every reply takes loopback TCP, as
        // it would with the setting off, so a kernel that refuses it does
        // not stop the agent.
        let cgroup = own_cgroup
            .as_ref()
            .inspect_err(|e| warn!(error = %format!("{e:#}"), "the agent's own cgroup is not usable for its sock_ops program; requests to it are acknowledged as they are read"))
            .ok();
        if let Err(e) = redirect.enable_reply_shortcut(cgroup.map(PathBuf::as_path)) {
            warn!(error = %format!("{e:#}"), "the reply shortcut (redirect.reply_shortcut) is not available on this kernel; replies to pods take loopback TCP");
        }
    }
    if config.redirect.request_shortcut {
        // An optimisation too: without it requests take loopback TCP.
        let enabled = own_cgroup
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|cgroup| {
                redirect
                    .enable_request_shortcut(config.redirect.request_shortcut_max_unread, cgroup)
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = enabled {
            warn!(error = %format!("{e:#}"), "the request shortcut (redirect.request_shortcut) is off; pods' requests take loopback TCP");
        }
    }
    Ok(Arc::new(RwLock::new(redirect)))
}

/// What `/metrics` samples just before each scrape: the balancers'
/// estimates, the certificates' lifetimes, the redirect maps' occupancy.
fn scrape_hook(
    metrics: &Metrics,
    discovery: &Arc<Discovery>,
    redirect: &Arc<RwLock<Redirect>>,
    identity: Option<Arc<IdentityManager>>,
    kernel_refusals: Arc<RefusalCounts>,
) -> Box<dyn Fn() + Send + Sync> {
    let tcp = metrics.tcp.clone();
    let balancer_metrics = metrics.balancer.clone();
    let discovery = discovery.clone();
    let redirect = redirect.clone();
    Box::new(move || {
        balancer_metrics.sample(&discovery.current(), Instant::now());
        kernel_refusals.sync();
        if let Some(m) = &identity {
            m.sample(std::time::SystemTime::now());
        }
        let r = redirect.read().unwrap_or_else(|e| e.into_inner());
        match r.occupancy() {
            Ok(o) => {
                tcp.redirect_map_entries
                    .get_or_create(&MapLabels {
                        map: "original_dst_by_cookie",
                    })
                    .set(o.by_cookie as i64);
                tcp.redirect_map_entries
                    .get_or_create(&MapLabels {
                        map: "original_dst_by_flow",
                    })
                    .set(o.by_flow as i64);
            }
            Err(e) => warn!(error = %e, "cannot read redirect map occupancy"),
        }
    })
}

/// Sets strict inbound up when configured and attaches the programs to the
/// pods' cgroup, all of it at once: the kernel redirects only the pods
/// enrolled later, each once its listener is bound. Returns the cgroup
/// (`None`: `redirect.cgroup` unset, nothing attached).
fn attach_programs(config: &Config, redirect: &RwLock<Redirect>) -> Result<Option<PathBuf>> {
    if config.inbound.mode == InboundMode::Strict {
        let allow = strict_sources(config)?;
        redirect
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_strict(&[], &allow)
            .context("cannot set up strict inbound")?;
    }
    let Some(cgroup) = &config.redirect.cgroup else {
        info!(
            "redirect.cgroup is not set: programs loaded but not attached; no pod traffic is redirected"
        );
        return Ok(None);
    };
    let path = resolve_cgroup(cgroup)?;
    redirect
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .attach(&path)
        .with_context(|| format!("cannot attach the redirect programs to {}", path.display()))?;
    info!(cgroup = %path.display(), "redirect programs attached");
    Ok(Some(path))
}

/// Serves until SIGTERM/SIGINT, or until a successor takes the node over.
/// A successor itself first waits until it is ready, then tells the
/// serving agent to go. Returns what ended it, and the serving lock, which
/// is held until the process exits.
async fn serve_until_stopped(
    pinned: Option<(Pins, Claim)>,
    readiness: &Readiness,
) -> Result<(&'static str, Option<nix::fcntl::Flock<std::fs::File>>)> {
    let handed_over = CancellationToken::new();
    let mut serving = None;
    let signal_name = tokio::select! {
        s = wait_for_signal() => s?,
        _ = async {
            if let Some((pins, claim)) = pinned {
                if matches!(claim, Claim::Successor { .. }) {
                    // The old agent is told to go only once this one is
                    // ready: with discovery, not before the cluster's
                    // first full picture is in force. One that never gets
                    // there leaves the old agent serving.
                    wait_until_ready(readiness).await;
                }
                serving = take_over(pins.root(), claim, &handed_over);
            }
            handed_over.cancelled().await;
        } => "handover",
    };
    Ok((signal_name, serving))
}

/// Returns once every readiness condition holds, saying every 10 s what
/// it is still waiting for.
async fn wait_until_ready(readiness: &Readiness) {
    let mut last_said = tokio::time::Instant::now();
    loop {
        let pending = readiness.pending();
        if pending.is_empty() {
            return;
        }
        if last_said.elapsed() >= Duration::from_secs(10) {
            info!(pending = %pending.join(", "), "not taking over yet: this agent is not ready");
            last_said = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves the node from now on: as its sole agent, listening for a
/// successor's request; or, having started beside a serving agent, by
/// telling that one to go now that this one is ready. Returns the serving
/// lock to hold while the agent runs.
fn take_over(
    pin_root: &std::path::Path,
    claim: Claim,
    handed_over: &CancellationToken,
) -> Option<nix::fcntl::Flock<std::fs::File>> {
    match claim {
        Claim::Serving(lock) => {
            handover::listen(pin_root, handed_over.clone());
            Some(lock)
        }
        Claim::Successor { successor, serving } => {
            match handover::request(pin_root) {
                Ok(pid) => info!(previous_pid = %pid, "handover: the previous agent is draining"),
                Err(e) => {
                    warn!(error = %e, "handover: the serving agent did not answer; both serve until it exits")
                }
            }
            handover::await_serving(successor, serving, pin_root.to_owned(), handed_over.clone());
            None
        }
    }
}

/// Every identity this node needs a leaf for: its own (the tunnel server's)
/// and its pods'.
fn local_identities(config: &Config) -> Vec<SpiffeId> {
    let mut ids: Vec<SpiffeId> = Vec::new();
    let node = config
        .identity
        .as_ref()
        .and_then(|i| i.node_identity(&config.node.name));
    let pods = config
        .pods
        .iter()
        .filter_map(|p| p.identity.as_deref()?.parse().ok());
    for id in node.into_iter().chain(pods) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// Waits for open connections up to `grace`, then closes the rest: the
/// pods' own (outbound) and the tunnel's connections and streams from
/// other nodes (inbound: the listener closes and each connection gets a
/// GOAWAY, so peers stop sending new streams here while those in flight
/// finish).
async fn wait_for_signal() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// A relative `redirect.cgroup` is taken under the cgroup2 mount point.
fn resolve_cgroup(cgroup: &std::path::Path) -> Result<PathBuf> {
    let path = if cgroup.is_absolute() {
        cgroup.to_path_buf()
    } else {
        cgroup2_mount()?.join(cgroup)
    };
    anyhow::ensure!(
        path.join("cgroup.procs").exists(),
        "redirect.cgroup {} is not a cgroup v2 directory (no cgroup.procs in it)",
        path.display()
    );
    Ok(path)
}

/// The cgroup v2 directory this process is in, for the request shortcut's
/// `sock_ops` program (see `Redirect::enable_request_shortcut`). Refused:
/// the root cgroup (the program would run on every TCP socket of the
/// machine), and the pods' cgroup or one above it (it would run on every
/// pod's sockets, and the agent belongs beside the pods, not among them).
fn agent_cgroup(config: &Config) -> Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let relative = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
    let relative = relative.trim_start_matches('/');
    anyhow::ensure!(
        !relative.is_empty(),
        "the agent runs in the root cgroup; run it in a cgroup of its own (a pod, a systemd unit)"
    );
    let path = cgroup2_mount()?.join(relative);
    if let Some(pods) = &config.redirect.cgroup {
        let pods = resolve_cgroup(pods)?;
        anyhow::ensure!(
            !pods.starts_with(&path),
            "the agent's cgroup {} holds the pods' cgroup {} (redirect.cgroup); run the agent beside the pods",
            path.display(),
            pods.display()
        );
    }
    Ok(path)
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on most Kubernetes nodes,
/// `/sys/fs/cgroup/unified` on hybrid hosts), read from mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 filesystem is mounted; waymark needs cgroup v2")
}
