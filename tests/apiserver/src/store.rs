//! The object store: every object by (group, resource) and its key
//! (`namespace/name`, or `name` for cluster-scoped kinds), one global
//! resourceVersion bumped on every write, and the history of writes that
//! watches replay and lists at an older resourceVersion are rebuilt from.
//! Compaction forgets history, after which older resourceVersions get 410.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::resources::{CRD_GROUP, CRD_RESOURCE, NAMESPACES, Registry, ResourceType};
use crate::selector::Selectors;
use crate::status::ApiError;
use crate::{meta, pagination};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write. `object` is the state after it (for a delete: the last state,
/// carrying the deletion's resourceVersion); `prev` the state before.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub group: String,
    pub resource: String,
    pub key: String,
    pub object: Value,
    pub prev: Option<Value>,
}

type Objects = BTreeMap<String, Value>;

/// Bounded so that a long test or the scale bench cannot grow it forever;
/// the oldest writes are compacted away first, as etcd compacts.
pub const DEFAULT_HISTORY: usize = 100_000;

pub struct Store {
    rv: u64,
    /// History holds every write with a resourceVersion above this.
    compacted: u64,
    objects: BTreeMap<(String, String), Objects>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    pub registry: Registry,
    events: broadcast::Sender<Arc<Event>>,
    uid_seed: u64,
    /// Namespaces deleted but not yet finalized, and since when.
    terminating: Vec<(String, Instant)>,
}

/// Which page of which list: the request's `limit`, `continue`,
/// `resourceVersion` and `resourceVersionMatch`.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub exact: bool,
}

/// One page of a list: its items, the resourceVersion it was read at, the
/// token for the next page, and (without selectors) how many items follow.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    pub rv: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// What a new watch starts from: the events to send before live ones, and
/// the receiver of live writes (subscribed under the same lock, so nothing
/// falls between the two).
pub struct WatchStart {
    pub replay: Vec<Arc<Event>>,
    /// Current objects to send as ADDED first (resourceVersion "" or "0").
    pub initial: Vec<Value>,
    /// Live writes at or below this were replayed (or are older than the
    /// watch), so the stream skips them.
    pub rv: u64,
    pub live: broadcast::Receiver<Arc<Event>>,
}

pub fn object_key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(65_536);
        let uid_seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut store = Store {
            rv: 0,
            compacted: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            registry: Registry::default(),
            events,
            uid_seed,
            terminating: Vec::new(),
        };
        // The namespaces every cluster starts with.
        let ns_type = store
            .registry
            .lookup("", "v1", NAMESPACES)
            .cloned()
            .expect("namespaces are built in");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            store
                .create(&ns_type, None, obj)
                .expect("a fresh store accepts its namespaces");
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets all history: any older resourceVersion now gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    fn objects(&self, t: &ResourceType) -> Option<&Objects> {
        self.objects.get(&(t.group.clone(), t.plural.clone()))
    }

    pub fn get(&self, t: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects(t)
            .and_then(|o| o.get(&object_key(ns, name)))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&t.group, &t.plural, name))
    }

    fn record(
        &mut self,
        t: &ResourceType,
        kind: EventType,
        key: String,
        object: Value,
        prev: Option<Value>,
    ) {
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            group: t.group.clone(),
            resource: t.plural.clone(),
            key,
            object,
            prev,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    fn next_uid(&mut self) -> String {
        meta::uid(self.uid_seed, self.rv)
    }

    /// Checks apiVersion/kind/namespace of a written body against the URL,
    /// filling what is missing; returns the object's name.
    fn admit(
        &self,
        t: &ResourceType,
        ns: Option<&str>,
        obj: &mut Value,
        url_name: Option<&str>,
    ) -> Result<String, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was in an unknown format - expected a JSON object",
            ));
        }
        let (group, _) =
            crate::resources::split_api_version(obj["apiVersion"].as_str().unwrap_or(""));
        if obj["apiVersion"].is_string()
            && (group != t.group || obj["kind"].as_str() != Some(&t.kind))
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({}) does not match the expected API version ({})",
                obj["apiVersion"].as_str().unwrap_or(""),
                t.api_version(t.preferred_version())
            )));
        }
        obj["kind"] = t.kind.clone().into();
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        if t.namespaced {
            let url_ns = ns.ok_or_else(|| {
                ApiError::bad_request(format!("{} must be created in a namespace", t.kind))
            })?;
            match meta["namespace"].as_str() {
                Some(body_ns) if !body_ns.is_empty() && body_ns != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => meta["namespace"] = url_ns.into(),
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        let name = meta["name"].as_str().unwrap_or("").to_string();
        if let Some(url_name) = url_name
            && name != url_name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({url_name})"
            )));
        }
        Ok(name)
    }

    pub fn create(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        self.admit(t, ns, &mut obj, None)?;
        let mut name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        if name.is_empty() {
            let Some(prefix) = obj["metadata"]["generateName"].as_str().map(str::to_string) else {
                return Err(ApiError::invalid(
                    &t.kind,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            };
            let uid = self.next_uid();
            name = format!("{prefix}{}", &uid[..5]);
            obj["metadata"]["name"] = name.clone().into();
        }
        meta::validate_name(&t.kind, &name)?;
        if let Some(ns) = ns.filter(|_| t.namespaced) {
            let ns_type = self.registry.lookup("", "v1", NAMESPACES).cloned();
            if let Some(ns_type) = ns_type {
                let namespace = self
                    .get(&ns_type, None, ns)
                    .map_err(|_| ApiError::not_found("", NAMESPACES, ns))?;
                if namespace["status"]["phase"] == "Terminating" {
                    return Err(ApiError::new(
                        crate::status::Reason::Forbidden,
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            t.plural
                        ),
                    ));
                }
            }
        }
        let key = object_key(ns.filter(|_| t.namespaced), &name);
        if self.objects(t).is_some_and(|o| o.contains_key(&key)) {
            return Err(ApiError::already_exists(&t.group, &t.plural, &name));
        }
        self.rv += 1;
        let uid = self.next_uid();
        let meta = &mut obj["metadata"];
        meta["uid"] = uid.into();
        meta["creationTimestamp"] = meta::rfc3339_now().into();
        meta["generation"] = 1.into();
        meta["resourceVersion"] = self.rv.to_string().into();
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        self.on_write(t, &mut obj);
        self.objects
            .entry((t.group.clone(), t.plural.clone()))
            .or_default()
            .insert(key.clone(), obj.clone());
        self.record(t, EventType::Added, key, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an object (PUT, or the result of a patch). A resourceVersion
    /// in the body must match the stored one; a body equal to what is stored
    /// is a no-op that keeps the resourceVersion, as on the real server.
    pub fn replace(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        self.admit(t, ns, &mut obj, Some(name))?;
        let key = object_key(ns.filter(|_| t.namespaced), name);
        let current = self.get(t, ns, name)?;
        let meta = &mut obj["metadata"];
        match meta["resourceVersion"].as_str() {
            Some(rv)
                if !rv.is_empty()
                    && Some(rv) != current["metadata"]["resourceVersion"].as_str() =>
            {
                return Err(ApiError::stale(&t.group, &t.plural, name));
            }
            _ => {}
        }
        for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
            meta[field] = current["metadata"][field].clone();
        }
        if let Some(m) = meta.as_object_mut() {
            m.retain(|_, v| !v.is_null());
        }
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), current["apiVersion"].clone());
        }
        self.on_write(t, &mut obj);
        if obj == current {
            return Ok(current);
        }
        if obj.get("spec") != current.get("spec") {
            let g = current["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = (g + 1).into();
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        if let Some(o) = self.objects.get_mut(&(t.group.clone(), t.plural.clone())) {
            o.insert(key.clone(), obj.clone());
        }
        self.record(t, EventType::Modified, key, obj.clone(), Some(current));
        Ok(obj)
    }

    /// Deletes at once (no graceful deletion, no finalizers). A namespace
    /// takes its objects with it; a CRD takes its type and objects.
    pub fn delete(
        &mut self,
        t: &ResourceType,
        ns: Option<&str>,
        name: &str,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
        let current = self.get(t, ns, name)?;
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = preconditions[field].as_str()
                && Some(want) != current["metadata"][field].as_str()
            {
                return Err(ApiError::conflict(
                    &t.group,
                    &t.plural,
                    name,
                    &format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                        current["metadata"][field].as_str().unwrap_or("")
                    ),
                ));
            }
        }
        if t.group.is_empty() && t.plural == NAMESPACES {
            return Ok(self.terminate(t, name, current));
        }
        if t.group == CRD_GROUP
            && t.plural == CRD_RESOURCE
            && let Some(gone) = self.registry.remove_crd(name)
        {
            self.delete_where(|et, _| et.group == gone.group && et.plural == gone.plural);
            self.objects.remove(&(gone.group, gone.plural));
        }
        Ok(self.remove(t, &object_key(ns.filter(|_| t.namespaced), name)))
    }

    /// A deleted namespace first turns `Terminating`; its objects and then
    /// the namespace itself go in [`Store::finalize_namespaces`], which the
    /// server runs shortly after, as the namespace controller would.
    fn terminate(&mut self, t: &ResourceType, name: &str, current: Value) -> Value {
        if current["status"]["phase"] == "Terminating" {
            return current;
        }
        let mut obj = current.clone();
        obj["metadata"]["deletionTimestamp"] = meta::rfc3339_now().into();
        obj["status"]["phase"] = "Terminating".into();
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = self.rv.to_string().into();
        if let Some(o) = self.objects.get_mut(&(t.group.clone(), t.plural.clone())) {
            o.insert(name.to_string(), obj.clone());
        }
        self.record(
            t,
            EventType::Modified,
            name.to_string(),
            obj.clone(),
            Some(current),
        );
        self.terminating.push((name.to_string(), Instant::now()));
        obj
    }

    /// Removes the namespaces that have been terminating for `grace`, with
    /// everything in them.
    pub fn finalize_namespaces(&mut self, grace: Duration) {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.terminating)
            .into_iter()
            .partition(|(_, since)| since.elapsed() >= grace);
        self.terminating = waiting;
        let Some(t) = self.registry.lookup("", "v1", NAMESPACES).cloned() else {
            return;
        };
        for (ns, _) in due {
            self.delete_where(|et, obj| {
                et.namespaced && obj["metadata"]["namespace"] == ns.as_str()
            });
            if self.get(&t, None, &ns).is_ok() {
                self.remove(&t, &ns);
            }
        }
    }

    fn remove(&mut self, t: &ResourceType, key: &str) -> Value {
        let prev = self
            .objects
            .get_mut(&(t.group.clone(), t.plural.clone()))
            .and_then(|o| o.remove(key))
            .unwrap_or(Value::Null);
        self.rv += 1;
        let mut last = prev.clone();
        last["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.record(
            t,
            EventType::Deleted,
            key.to_string(),
            last.clone(),
            Some(prev),
        );
        last
    }

    /// Deletes every object of a served type that `pred` picks.
    fn delete_where(&mut self, pred: impl Fn(&ResourceType, &Value) -> bool) {
        let types: Vec<ResourceType> = self
            .registry
            .group_versions()
            .iter()
            .flat_map(|(g, v)| {
                self.registry
                    .in_group_version(g, v)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut seen = Vec::new();
        for t in types {
            if seen.contains(&(t.group.clone(), t.plural.clone())) {
                continue;
            }
            seen.push((t.group.clone(), t.plural.clone()));
            let keys: Vec<String> = self
                .objects(&t)
                .map(|o| {
                    o.iter()
                        .filter(|(_, v)| pred(&t, v))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            for k in keys {
                self.remove(&t, &k);
            }
        }
    }

    /// What the real server's strategies add on every write, for the kinds
    /// where clients depend on it.
    fn on_write(&mut self, t: &ResourceType, obj: &mut Value) {
        if t.group.is_empty() && t.plural == NAMESPACES && obj["status"]["phase"].is_null() {
            obj["status"] = json!({"phase": "Active"});
        }
        if t.group == CRD_GROUP && t.plural == CRD_RESOURCE {
            self.registry.install_crd(obj);
            let names = obj["spec"]["names"].clone();
            obj["status"] = json!({
                "acceptedNames": names,
                "storedVersions": obj["spec"]["versions"].as_array().map(|vs| vs.iter()
                    .filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()),
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": meta::rfc3339_now()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": meta::rfc3339_now()},
                ],
            });
        }
    }

    /// The objects of a type as they were at `rv`, in key order, borrowed:
    /// the current objects with the writes after `rv` undone (the state
    /// before the oldest such write of each key wins). Only keys under
    /// `prefix` (a namespace's `ns/`) and after `after` (a continue token's
    /// last key) are read.
    fn snapshot<'a>(
        &'a self,
        t: &ResourceType,
        rv: u64,
        prefix: &str,
        after: Option<&str>,
    ) -> Result<Vec<(&'a str, &'a Value)>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::too_old(rv, self.compacted));
        }
        let mut undo: BTreeMap<&str, Option<&Value>> = BTreeMap::new();
        for ev in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if ev.group == t.group
                && ev.resource == t.plural
                && ev.key.starts_with(prefix)
                && after.is_none_or(|a| ev.key.as_str() > a)
            {
                let before = match ev.kind {
                    EventType::Added => None,
                    _ => ev.prev.as_ref(),
                };
                undo.insert(ev.key.as_str(), before);
            }
        }
        let mut objs: Vec<(&str, &Value)> = self
            .objects(t)
            .into_iter()
            .flat_map(|o| {
                let start = match after {
                    Some(a) if a >= prefix => Bound::Excluded(a),
                    _ => Bound::Included(prefix),
                };
                o.range::<str, _>((start, Bound::Unbounded))
            })
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| !undo.contains_key(k.as_str()))
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        objs.extend(undo.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        objs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Ok(objs)
    }

    /// One page of a list.
    pub fn list(
        &self,
        t: &ResourceType,
        ns: Option<&str>,
        sel: &Selectors,
        params: &ListParams,
    ) -> Result<Page, ApiError> {
        let (rv, after) = match &params.continue_token {
            Some(token) if !token.is_empty() => {
                let c = pagination::decode(token)?;
                if c.rv < self.compacted {
                    return Err(pagination::expired());
                }
                (c.rv, Some(c.after))
            }
            _ => match params.resource_version.as_deref() {
                Some(v) if params.exact => {
                    let rv: u64 = v.parse().map_err(|_| bad_rv(v))?;
                    (rv.min(self.rv), None)
                }
                _ => (self.rv, None),
            },
        };
        let prefix = ns
            .filter(|_| t.namespaced)
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        let objs = self.snapshot(t, rv, &prefix, after.as_deref())?;
        let mut matching = objs.iter().filter(|(_, v)| sel.matches(v));
        // resourceVersion=0 is served from the watch cache, which ignores
        // `limit` and returns everything in one page.
        let from_cache = params.resource_version.as_deref() == Some("0") && after.is_none();
        let limit = params
            .limit
            .filter(|l| *l > 0 && !from_cache)
            .unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_key = None;
        for (k, v) in matching.by_ref().take(limit) {
            items.push((*v).clone());
            last_key = Some(k.to_string());
        }
        // The real server counts what follows only when no selector filters
        // the list; otherwise it only knows whether more follow.
        let remaining = sel.is_empty().then(|| matching.clone().count());
        if remaining == Some(0) || matching.next().is_none() {
            return Ok(Page {
                items,
                rv,
                continue_token: None,
                remaining: None,
            });
        }
        let token = pagination::encode(rv, last_key.as_deref().unwrap_or(""));
        Ok(Page {
            items,
            rv,
            continue_token: Some(token),
            remaining,
        })
    }

    /// Starts a watch from the request's resourceVersion: "" or "0" begins
    /// with the current objects as ADDED; a number replays later history,
    /// or fails with 410 if the history no longer reaches back that far.
    pub fn watch(
        &self,
        t: &ResourceType,
        rv: Option<&str>,
        send_initial: bool,
    ) -> Result<WatchStart, ApiError> {
        let live = self.events.subscribe();
        match rv {
            Some(v) if !v.is_empty() && v != "0" && !send_initial => {
                let rv: u64 = v.parse().map_err(|_| bad_rv(v))?;
                if rv < self.compacted {
                    return Err(ApiError::too_old(rv, self.compacted));
                }
                let replay = self
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && e.group == t.group && e.resource == t.plural)
                    .cloned()
                    .collect();
                Ok(WatchStart {
                    replay,
                    initial: Vec::new(),
                    rv: rv.max(self.rv),
                    live,
                })
            }
            _ => Ok(WatchStart {
                replay: Vec::new(),
                initial: self
                    .objects(t)
                    .map(|o| o.values().cloned().collect())
                    .unwrap_or_default(),
                rv: self.rv,
                live,
            }),
        }
    }
}

fn bad_rv(v: &str) -> ApiError {
    ApiError::bad_request(format!("invalid resource version: {v:?}"))
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
