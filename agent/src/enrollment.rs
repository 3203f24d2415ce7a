//! The pods this node's agent proxies, enrolled and removed while it runs.
//!
//! Enrolling a pod binds its outbound listener inside its network namespace,
//! starts accepting there, mints its workload certificate, names its netns
//! for the kernel counters and strict inbound, and only then puts its netns
//! cookie in the kernel's `ENROLLED` map: the first redirected `connect()`
//! already finds a listener (merbridge #167: a 503 on the first request
//! after enrolment). Removing a pod reverses that order: the kernel stops
//! redirecting its new connections first, then its listener closes;
//! connections already open finish on their own.
//!
//! Pods come from the config file (`[[pods]]`) and, on a cluster, from
//! Kubernetes discovery; [`Enrollment::sync`] takes the whole wanted set
//! each time, so both sources go through the same path.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::DialFrom;
use crate::diagnostics::tap::TapHub;
use crate::diagnostics::tap::filter::Pods;
use crate::identity::SpiffeId;
use crate::identity::manager::IdentityManager;
use crate::kernel::{KernelDiag, PodNetns as KernelPod};
use crate::proxy::listener::bind_in_netns;
use crate::proxy::outbound::{Outbound, PodInfo};
use crate::redirect::Redirect;
use crate::transport::netns::PodNetns;

/// A pod to enroll: what the config file or the cluster says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// `namespace/name`.
    pub name: String,
    /// Its network namespace (`/var/run/netns/…`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Its workload identity (used when mTLS is on).
    pub identity: Option<SpiffeId>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {pod}: cannot set up its outbound listener: {source}")]
    Listener {
        pod: String,
        source: crate::proxy::listener::ListenerError,
    },
    #[error("pod {pod}: cannot open its network namespace {path}: {source}")]
    Netns {
        pod: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod {pod}: cannot register its listener: {source}")]
    Register { pod: String, source: std::io::Error },
    #[error("pod {pod}: cannot issue its certificate: {source}")]
    Certificate {
        pod: String,
        source: Box<crate::identity::StoreError>,
    },
    #[error("pod {pod}: {source}")]
    Kernel {
        pod: String,
        source: crate::redirect::RedirectError,
    },
}

/// What enrolling needs from the rest of the agent.
pub struct EnrollmentParts {
    pub port: u16,
    pub dial_from: DialFrom,
    /// `inbound.mode = "strict"`: pods with an identity accept new
    /// connections from other nodes only through the tunnel.
    pub strict: bool,
    pub redirect: Arc<RwLock<Redirect>>,
    pub outbound: Arc<Outbound>,
    pub identity: Option<Arc<IdentityManager>>,
    pub kernel: Option<Arc<KernelDiag>>,
    pub tap: Arc<TapHub>,
    /// Strict pods by netns cookie, for the refusal metric.
    pub strict_pods: Arc<RwLock<HashMap<u64, String>>>,
    /// Every enrolled pod by netns cookie, to name what the kernel counts
    /// per pod (its refusals at a connection limit, its sockets).
    pub names: Arc<RwLock<HashMap<u64, String>>>,
    /// Ends every pod's accept loop (shutdown).
    pub stop_accepting: CancellationToken,
    pub acceptors: TaskTracker,
}

struct Enrolled {
    spec: PodSpec,
    cookie: u64,
    stop: CancellationToken,
}

/// The enrolled pods of this node.
pub struct Enrollment {
    parts: EnrollmentParts,
    pods: Mutex<BTreeMap<String, Enrolled>>,
}

impl Enrollment {
    pub fn new(parts: EnrollmentParts) -> Self {
        Self {
            parts,
            pods: Mutex::default(),
        }
    }

    /// Makes the enrolled set `wanted`: new pods are enrolled, pods no
    /// longer wanted are removed, a pod whose spec changed (a new netns or
    /// address) is enrolled again. A pod that cannot be enrolled is left
    /// out and reported; the others go ahead.
    pub fn sync(&self, wanted: &[PodSpec]) -> Vec<EnrollError> {
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        // Not wanted as it is: gone, or changed (enrolled again below).
        let gone: Vec<String> = pods
            .iter()
            .filter(|(_, e)| !wanted.contains(&e.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(e) = pods.remove(&name) {
                self.remove(&e);
            }
        }
        let mut errors = Vec::new();
        for spec in wanted {
            if pods.contains_key(&spec.name) {
                continue;
            }
            match self.enroll(spec) {
                Ok(e) => {
                    pods.insert(spec.name.clone(), e);
                }
                Err(e) => {
                    warn!(pod = %spec.name, error = %e, "pod not enrolled");
                    errors.push(e);
                }
            }
        }
        self.parts.tap.set_pods(Pods(
            pods.values()
                .map(|e| (e.spec.name.clone(), e.spec.ips.clone()))
                .collect(),
        ));
        errors
    }

    /// The enrolled pods, by name.
    pub fn pods(&self) -> Vec<PodSpec> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.spec.clone())
            .collect()
    }

    fn enroll(&self, spec: &PodSpec) -> Result<Enrolled, EnrollError> {
        let p = &self.parts;
        let pod = || spec.name.clone();
        let sockets = bind_in_netns(&spec.netns, p.port)
            .map_err(|source| EnrollError::Listener { pod: pod(), source })?;
        if let Some(e) = &sockets.ipv6_unavailable {
            warn!(pod = %spec.name, error = %e, "no IPv6 loopback in the pod; only IPv4 connections are proxied");
        }
        let cookie = sockets.netns_cookie;
        let netns =
            match p.dial_from {
                DialFrom::Pod => Some(PodNetns::open(&spec.netns, cookie).map_err(|source| {
                    EnrollError::Netns {
                        pod: pod(),
                        path: spec.netns.clone(),
                        source,
                    }
                })?),
                DialFrom::Node => None,
            };
        let identity = match (&p.identity, &spec.identity) {
            (Some(manager), Some(id)) => {
                manager
                    .ensure(id)
                    .map_err(|source| EnrollError::Certificate {
                        pod: pod(),
                        source: Box::new(source),
                    })?;
                Some(id.clone())
            }
            _ => None,
        };
        let mut listeners = Vec::new();
        for l in sockets.listeners {
            listeners.push(
                TcpListener::from_std(l)
                    .map_err(|source| EnrollError::Register { pod: pod(), source })?,
            );
        }
        if p.strict && identity.is_some() {
            let nets: Vec<ipnet::IpNet> = spec.ips.iter().map(|ip| (*ip).into()).collect();
            write(&p.redirect)
                .set_strict(&[cookie], &nets)
                .map_err(|source| EnrollError::Kernel { pod: pod(), source })?;
            write(&p.strict_pods).insert(cookie, spec.name.clone());
        }
        if let Some(k) = &p.kernel
            && let Err(e) = k.add_pod(&KernelPod {
                name: spec.name.clone(),
                netns_cookie: cookie,
            })
        {
            warn!(pod = %spec.name, error = %e, "the kernel counters do not name this pod");
        }
        let info = Arc::new(PodInfo {
            name: spec.name.clone(),
            netns,
            open: Default::default(),
            accept_bucket: Default::default(),
            accept_rate_logged: Default::default(),
            netns_cookie: cookie,
            ips: spec.ips.clone(),
            identity,
        });
        let stop = p.stop_accepting.child_token();
        for l in listeners {
            p.acceptors
                .spawn(p.outbound.clone().serve(info.clone(), l, stop.clone()));
        }
        // Last: from here on the kernel sends the pod's connections to the
        // listeners above.
        if let Err(source) = write(&p.redirect).enroll(cookie) {
            stop.cancel();
            return Err(EnrollError::Kernel { pod: pod(), source });
        }
        write(&p.names).insert(cookie, spec.name.clone());
        info!(pod = %spec.name, netns = %spec.netns.display(), netns_cookie = cookie, port = p.port, "pod enrolled: outbound listener bound");
        Ok(Enrolled {
            spec: spec.clone(),
            cookie,
            stop,
        })
    }

    fn remove(&self, e: &Enrolled) {
        let p = &self.parts;
        if let Err(err) = write(&p.redirect).unenroll(e.cookie) {
            warn!(pod = %e.spec.name, error = %err, "cannot remove the pod from the kernel's enrolled set");
        }
        write(&p.names).remove(&e.cookie);
        if write(&p.strict_pods).remove(&e.cookie).is_some()
            && let Err(err) = write(&p.redirect).unset_strict(e.cookie)
        {
            warn!(pod = %e.spec.name, error = %err, "cannot take the pod out of strict inbound");
        }
        if let Some(k) = &p.kernel {
            k.remove_pod(e.cookie);
        }
        e.stop.cancel();
        info!(pod = %e.spec.name, "pod removed: its listener is closed, open connections finish");
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
