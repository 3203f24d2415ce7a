//! The running server and the handle tests hold: start on an address,
//! change the world through the store, and inject faults (compaction,
//! dropped watches, 403/500 answers, a stop and a restart on the same port).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;

use crate::resources::split_api_version;
use crate::status::ApiError;
use crate::store::{DEFAULT_HISTORY, Store};
use crate::watch::Stoppers;

/// Errors starting or restarting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding the API server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the API server restarted on {now:?} instead of {was}: clients would lose it")]
    Moved {
        was: SocketAddr,
        now: Option<SocketAddr>,
    },
}

/// An injected failure: every request for the resource is answered with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 403, worded as an RBAC denial.
    Forbidden,
    /// 500 InternalError.
    InternalError,
}

/// State that outlives a stop/restart: the store (like etcd behind a real
/// API server) and the knobs.
pub struct Shared {
    store: Mutex<Store>,
    faults: Mutex<Vec<(Option<String>, Fault)>>,
    drop_watches: signal::Sender<u64>,
    bookmark_interval: Mutex<Duration>,
    watches_started: AtomicU64,
    pub(crate) addr: SocketAddr,
}

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves the store usable for the
        // remaining requests of a test; the panic itself fails the test.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn fault_for(&self, resource: &str) -> Option<Fault> {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults
            .iter()
            .find(|(r, _)| r.as_deref().is_none_or(|r| r == resource))
            .map(|(_, f)| *f)
    }

    pub(crate) fn count_watch(&self) {
        self.watches_started.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stoppers(&self, shutdown: signal::Receiver<bool>) -> Stoppers {
        Stoppers {
            drop_all: self.drop_watches.subscribe(),
            shutdown,
            bookmark_interval: *self
                .bookmark_interval
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        }
    }
}

struct Running {
    shutdown: signal::Sender<bool>,
    task: JoinHandle<()>,
}

/// A stand-in Kubernetes API server on plain HTTP.
pub struct ApiServer {
    shared: Arc<Shared>,
    running: Option<Running>,
    bind: Binder,
}

/// Makes the listening socket, at start and again at each restart.
type Binder = Arc<dyn Fn() -> std::io::Result<std::net::TcpListener> + Send + Sync>;

fn listen(bind: &Binder) -> std::io::Result<TcpListener> {
    let listener = bind()?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Bookmarks every few seconds, well within a client's watch timeout; the
/// real server sends them about once a minute.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

impl ApiServer {
    /// Binds `addr` (port 0 picks one) and starts serving.
    pub async fn start(addr: SocketAddr) -> Result<Self, ServerError> {
        let first = std::net::TcpListener::bind(addr)
            .map_err(|source| ServerError::Bind { addr, source })?;
        let bound = first
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        // The first socket, then the same address (not port 0) on restarts.
        let first = Mutex::new(Some(first));
        Self::start_with(move || match first.lock().ok().and_then(|mut f| f.take()) {
            Some(listener) => Ok(listener),
            None => std::net::TcpListener::bind(bound),
        })
        .await
    }

    /// Starts on whatever socket `bind` makes, and calls it again on each
    /// restart; it must make the same address every time. For a listener
    /// that has to be made elsewhere, such as inside a network namespace of
    /// the test world.
    pub async fn start_with(
        bind: impl Fn() -> std::io::Result<std::net::TcpListener> + Send + Sync + 'static,
    ) -> Result<Self, ServerError> {
        let bind: Binder = Arc::new(bind);
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let listener = listen(&bind).map_err(|source| ServerError::Bind {
            addr: unknown,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: unknown,
            source,
        })?;
        let (drop_watches, _) = signal::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(DEFAULT_HISTORY)),
            faults: Mutex::new(Vec::new()),
            drop_watches,
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            watches_started: AtomicU64::new(0),
            addr,
        });
        let running = Some(serve(shared.clone(), listener));
        tracing::info!(%addr, "stand-in API server listening");
        Ok(ApiServer {
            shared,
            running,
            bind,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig (YAML) for clients: this server, no authentication.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: anonymous\n    namespace: default\ncurrent-context: stand-in\nusers:\n- name: anonymous\n  user: {{}}\n",
            self.url()
        )
    }

    /// Creates an object; its `apiVersion` and `kind` pick the resource.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let (t, ns) = self.resolve(&obj)?;
        self.shared.store().create(&t, ns.as_deref(), obj)
    }

    /// Replaces an object; a `metadata.resourceVersion` in it must be current.
    pub fn replace(&self, obj: Value) -> Result<Value, ApiError> {
        let (t, ns) = self.resolve(&obj)?;
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        self.shared.store().replace(&t, ns.as_deref(), &name, obj)
    }

    /// Creates the object, or replaces whatever is stored under its name.
    pub fn apply(&self, mut obj: Value) -> Result<Value, ApiError> {
        let (t, ns) = self.resolve(&obj)?;
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let mut store = self.shared.store();
        if store.get(&t, ns.as_deref(), &name).is_err() {
            return store.create(&t, ns.as_deref(), obj);
        }
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        store.replace(&t, ns.as_deref(), &name, obj)
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let t = self.kind(api_version, kind)?;
        self.shared.store().get(&t, ns, name)
    }

    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let t = self.kind(api_version, kind)?;
        self.shared.store().delete(&t, ns, name, &Value::Null)
    }

    fn kind(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Result<crate::resources::ResourceType, ApiError> {
        self.shared
            .store()
            .registry
            .by_kind(api_version, kind)
            .cloned()
            .ok_or_else(|| {
                let (group, _) = split_api_version(api_version);
                ApiError::bad_request(format!(
                    "no kind {kind:?} is registered for version {api_version:?} (group {group:?}); create its CustomResourceDefinition first"
                ))
            })
    }

    fn resolve(
        &self,
        obj: &Value,
    ) -> Result<(crate::resources::ResourceType, Option<String>), ApiError> {
        let t = self.kind(
            obj["apiVersion"].as_str().unwrap_or(""),
            obj["kind"].as_str().unwrap_or(""),
        )?;
        let ns = t.namespaced.then(|| {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        });
        Ok((t, ns))
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Forgets the write history: lists and watches from any older
    /// resourceVersion now get 410.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Ends every open watch stream cleanly (clients re-watch).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|n| *n += 1);
    }

    /// Answers every request for `resource` (a plural such as `pods`), or
    /// for every resource when `None`, with `fault`. Discovery still works.
    pub fn fail(&self, resource: Option<&str>, fault: Fault) {
        let mut faults = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.retain(|(r, _)| r.as_deref() != resource);
        faults.push((resource.map(str::to_string), fault));
    }

    pub fn clear_faults(&self) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// How often watches that asked for bookmarks get one.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = every.max(Duration::from_millis(1));
    }

    /// How many watch requests have been started (clients' retries show here).
    pub fn watches_started(&self) -> u64 {
        self.shared.watches_started.load(Ordering::Relaxed)
    }

    /// Stops serving: the listener closes and every connection, watches
    /// included, is cut. The store is kept.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(true);
            let _ = running.task.await;
        }
    }

    /// Stops (if running) and serves again on the same address. Like a real
    /// API server whose watch cache starts afresh, history is compacted, so
    /// clients resuming from an older resourceVersion get 410.
    pub async fn restart(&mut self) -> Result<(), ServerError> {
        self.stop().await;
        self.compact();
        let addr = self.shared.addr;
        let listener = listen(&self.bind).map_err(|source| ServerError::Bind { addr, source })?;
        if listener.local_addr().ok() != Some(addr) {
            return Err(ServerError::Moved {
                was: addr,
                now: listener.local_addr().ok(),
            });
        }
        self.running = Some(serve(self.shared.clone(), listener));
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(true);
            running.task.abort();
        }
    }
}

/// How often terminating namespaces are looked at.
const NAMESPACE_FINALIZE_EVERY: Duration = Duration::from_millis(100);
/// How long a deleted namespace stays `Terminating` with its objects: long
/// enough that `kubectl delete -f` of a namespace and its objects still finds
/// the objects, as it does on a real cluster, where the namespace controller
/// takes seconds.
const NAMESPACE_GRACE: Duration = Duration::from_secs(2);

fn serve(shared: Arc<Shared>, listener: TcpListener) -> Running {
    let (shutdown, mut stop) = signal::channel(false);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        // The namespace controller's part: finish deleting namespaces.
        let mut finalize = tokio::time::interval(NAMESPACE_FINALIZE_EVERY);
        loop {
            let stream = tokio::select! {
                _ = finalize.tick() => {
                    shared.store().finalize_namespaces(NAMESPACE_GRACE);
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let shared = shared.clone();
            let conn_stop = stop.clone();
            let mut conn_stop_wait = stop.clone();
            connections.spawn(async move {
                let svc = service_fn(move |req| {
                    crate::api::handle(shared.clone(), req, conn_stop.clone())
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = conn_stop_wait.changed() => {}
                }
            });
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
        }
        connections.shutdown().await;
    });
    Running { shutdown, task }
}
