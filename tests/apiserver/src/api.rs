//! The REST surface: turns a request's method, path and query into a store
//! operation, a discovery document or a watch, and every failure into a
//! `Status` response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch as signal;

use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::server::{Fault, Shared};
use crate::status::{ApiError, Reason};
use crate::store::ListParams;
use crate::{openapi, patch, watch};

pub type ResponseBody = BoxBody<Bytes, Infallible>;

const MAX_BODY: usize = 32 << 20;

/// The parsed query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean parameter as Go's `strconv.ParseBool` reads it (the Python
    /// client sends `watch=True`).
    fn flag(&self, name: &str) -> bool {
        matches!(
            self.get(name),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }
}

/// Where a resource request points.
struct Target {
    resource: ResourceType,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    watch_path: bool,
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    shutdown: signal::Receiver<bool>,
) -> Result<Response<ResponseBody>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    tracing::debug!(%method, %path, query = req.uri().query().unwrap_or(""), "request");
    let result = route(&shared, req, &path, &query, shutdown).await;
    Ok(match result {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(%method, %path, %err, "request failed");
            json_response(
                StatusCode::from_u16(err.reason.code())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &err.to_status(),
            )
        }
    })
}

pub fn json_response(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(body: &Value) -> Result<Response<ResponseBody>, ApiError> {
    Ok(json_response(StatusCode::OK, body))
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: &str,
    query: &Query,
    shutdown: signal::Receiver<bool>,
) -> Result<Response<ResponseBody>, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_get = req.method() == Method::GET;
    match segs.as_slice() {
        ["version"] if is_get => ok(&json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0",
            "gitCommit": "waymark-apiserver", "gitTreeState": "clean",
            "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
            "compiler": "gc", "platform": "linux/amd64",
        })),
        ["healthz" | "readyz" | "livez"] if is_get => Ok(text_response("ok")),
        ["api"] if is_get => ok(&json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
        })),
        ["apis"] if is_get => ok(&shared.store().registry.api_group_list()),
        ["apis", group] if is_get => shared
            .store()
            .registry
            .api_group(group)
            .ok_or_else(ApiError::no_route)
            .and_then(|g| ok(&g)),
        ["api", version] if is_get => discovery(shared, "", version),
        ["apis", group, version] if is_get => discovery(shared, group, version),
        ["openapi", "v3"] if is_get => ok(&openapi::root(&shared.store().registry)),
        ["openapi", "v3", "api", version] if is_get => openapi_doc(shared, "", version),
        ["openapi", "v3", "apis", group, version] if is_get => openapi_doc(shared, group, version),
        ["api", version, rest @ ..] => {
            let target = target(shared, "", version, rest)?;
            resource(shared, req, target, query, shutdown).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = target(shared, group, version, rest)?;
            resource(shared, req, target, query, shutdown).await
        }
        _ => Err(ApiError::no_route()),
    }
}

fn text_response(text: &'static str) -> Response<ResponseBody> {
    Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed())
}

fn discovery(
    shared: &Shared,
    group: &str,
    version: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let doc = shared.store().registry.api_resource_list(group, version);
    doc.ok_or_else(ApiError::no_route).and_then(|d| ok(&d))
}

fn openapi_doc(
    shared: &Shared,
    group: &str,
    version: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let doc = openapi::group_version(&shared.store().registry, group, version);
    doc.ok_or_else(ApiError::no_route).and_then(|d| ok(&d))
}

/// Resolves `[watch/]<plural>[/<name>[/<sub>]]` or
/// `[watch/]namespaces/<ns>/<plural>[/<name>[/<sub>]]`.
fn target(shared: &Shared, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let store = shared.store();
    let registry = &store.registry;
    let namespaced = |plural: &str| {
        registry
            .lookup(group, version, plural)
            .filter(|t| t.namespaced)
            .cloned()
    };
    let (resource, namespace, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced(plural).is_some() => (
            namespaced(plural).expect("checked by the guard"),
            Some(ns.to_string()),
            tail,
        ),
        [plural, tail @ ..] => (
            registry
                .lookup(group, version, plural)
                .cloned()
                .ok_or_else(ApiError::no_route)?,
            None,
            tail,
        ),
        [] => return Err(ApiError::no_route()),
    };
    let (name, subresource) = match tail {
        [] => (None, None),
        [name] => (Some(name.to_string()), None),
        [name, "status"] => (Some(name.to_string()), Some("status".to_string())),
        _ => return Err(ApiError::no_route()),
    };
    Ok(Target {
        resource,
        version: version.to_string(),
        namespace,
        name,
        subresource,
        watch_path,
    })
}

fn verb(method: &Method, t: &Target, watching: bool) -> &'static str {
    match (method.as_str(), &t.name) {
        ("GET", _) if watching => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", None) => "deletecollection",
        ("DELETE", Some(_)) => "delete",
        _ => "unknown",
    }
}

async fn resource(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    t: Target,
    query: &Query,
    shutdown: signal::Receiver<bool>,
) -> Result<Response<ResponseBody>, ApiError> {
    let method = req.method().clone();
    let watching = t.watch_path || query.flag("watch");
    let verb = verb(&method, &t, watching);
    let (group, plural) = (&t.resource.group, &t.resource.plural);
    match shared.fault_for(plural) {
        // Every user may ask what they may do; only the answer changes.
        Some(Fault::Forbidden) if t.resource.answered => {}
        Some(Fault::Forbidden) => {
            return Err(ApiError::forbidden(
                group,
                plural,
                verb,
                t.namespace.as_deref(),
            ));
        }
        Some(Fault::InternalError) => {
            return Err(ApiError::internal(
                "a fault injected into the test API server",
            ));
        }
        None => {}
    }
    let ns = t.namespace.as_deref();
    let rt = &t.resource;
    if rt.answered {
        if verb != "create" || t.name.is_some() {
            return Err(ApiError::new(
                Reason::MethodNotAllowed,
                format!("{plural} can only be created"),
            ));
        }
        let review = read_json(req).await?;
        let answer = access_review(shared, review)?;
        return Ok(json_response(StatusCode::CREATED, &answer));
    }
    match (verb, t.name.as_deref()) {
        ("watch", _) => start_watch(shared, &t, query, shutdown),
        ("list", _) => list(shared, &t, query),
        ("get", Some(name)) => {
            let obj = shared.store().get(rt, ns, name)?;
            ok(&render(obj, rt, &t.version))
        }
        ("create", None) => {
            let body = read_json(req).await?;
            let obj = shared.store().create(rt, ns, body)?;
            Ok(json_response(
                StatusCode::CREATED,
                &render(obj, rt, &t.version),
            ))
        }
        ("update", Some(name)) => {
            let mut body = read_json(req).await?;
            let mut store = shared.store();
            if t.subresource.is_some() {
                // Only the status changes; the resourceVersion precondition holds.
                if !body.is_object()
                    || !(body["metadata"].is_object() || body["metadata"].is_null())
                {
                    return Err(ApiError::bad_request(
                        "the body of the request was in an unknown format - expected a JSON object with object metadata",
                    ));
                }
                let mut current = store.get(rt, ns, name)?;
                let take = |body: &mut Value, at: &str| body.pointer_mut(at).map(Value::take);
                current["status"] = take(&mut body, "/status").unwrap_or(Value::Null);
                current["metadata"]["resourceVersion"] =
                    take(&mut body, "/metadata/resourceVersion").unwrap_or(Value::Null);
                body = current;
            }
            let obj = store.replace(rt, ns, name, body)?;
            ok(&render(obj, rt, &t.version))
        }
        ("patch", Some(name)) => {
            let content_type = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let body = read_json(req).await?;
            apply_patch(shared, &t, name, &content_type, &body)
        }
        ("delete", Some(name)) => {
            let opts = read_json_or_empty(req).await?;
            let obj = shared
                .store()
                .delete(rt, ns, name, &opts["preconditions"])?;
            ok(&render(obj, rt, &t.version))
        }
        ("deletecollection", None) => {
            let sel = selectors(&t, query)?;
            read_json_or_empty(req).await?;
            delete_collection(shared, &t, &sel)
        }
        _ => Err(ApiError::new(
            Reason::MethodNotAllowed,
            format!(
                "the server does not allow this method on the requested resource ({method} {verb})"
            ),
        )),
    }
}

/// Answers a SelfSubjectAccessReview: allowed unless a Forbidden fault
/// covers the resource it asks about, so an agent's permission check sees
/// the same RBAC denial its requests would get.
fn access_review(shared: &Shared, mut review: Value) -> Result<Value, ApiError> {
    if !review.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request was in an unknown format - expected a SelfSubjectAccessReview",
        ));
    }
    let attrs = &review["spec"]["resourceAttributes"];
    let resource = attrs["resource"].as_str().unwrap_or("");
    let denied = !resource.is_empty() && shared.fault_for(resource) == Some(Fault::Forbidden);
    review["apiVersion"] = "authorization.k8s.io/v1".into();
    review["kind"] = "SelfSubjectAccessReview".into();
    review["metadata"] = json!({"creationTimestamp": null});
    review["status"] = if denied {
        json!({"allowed": false, "reason": "RBAC: access denied by a fault injected into the test API server"})
    } else {
        json!({"allowed": true})
    };
    Ok(review)
}

fn apply_patch(
    shared: &Shared,
    t: &Target,
    name: &str,
    content_type: &str,
    body: &Value,
) -> Result<Response<ResponseBody>, ApiError> {
    let (rt, ns) = (&t.resource, t.namespace.as_deref());
    let mut store = shared.store();
    let current = match store.get(rt, ns, name) {
        Ok(obj) => obj,
        // Server-side apply creates what does not exist yet.
        Err(e)
            if content_type == "application/apply-patch+yaml" && e.reason == Reason::NotFound =>
        {
            let obj = store.create(rt, ns, body.clone())?;
            return Ok(json_response(
                StatusCode::CREATED,
                &render(obj, rt, &t.version),
            ));
        }
        Err(e) => return Err(e),
    };
    let mut obj = current;
    match content_type {
        "application/merge-patch+json" | "application/apply-patch+yaml" => {
            patch::merge_patch(&mut obj, body)
        }
        "application/strategic-merge-patch+json" => patch::strategic_merge_patch(&mut obj, body),
        "application/json-patch+json" => patch::json_patch(&mut obj, body).map_err(|why| {
            ApiError::new(
                Reason::Invalid,
                format!("the JSON patch cannot be applied: {why}"),
            )
        })?,
        other => {
            return Err(ApiError::new(
                Reason::UnsupportedMediaType,
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other:?})"
                ),
            ));
        }
    }
    let obj = store.replace(rt, ns, name, obj)?;
    ok(&render(obj, rt, &t.version))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    // Protobuf (kubectl sends some built-in kinds that way) and CBOR are
    // refused as a server without them refuses them.
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        return Err(ApiError::new(
            Reason::UnsupportedMediaType,
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?}; this server reads JSON only)"
            ),
        ));
    }
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json (this server reads JSON only): {e}"
        ))
    })
}

async fn read_json_or_empty(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = read_body(req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the DeleteOptions body is not JSON: {e}")))
}

/// An object as served in `version`.
fn render(mut obj: Value, rt: &ResourceType, version: &str) -> Value {
    obj["apiVersion"] = rt.api_version(version).into();
    obj["kind"] = rt.kind.clone().into();
    obj
}

fn selectors(t: &Target, query: &Query) -> Result<Selectors, ApiError> {
    let mut fields = query.get("fieldSelector").unwrap_or("").to_string();
    // A watch on an object's own path watches that one object.
    if let Some(name) = &t.name {
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={name}"));
    }
    Ok(Selectors {
        labels: LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(&fields, &t.resource.kind)?,
    })
}

/// Deletes every object the selectors pick; answers with the list of them.
fn delete_collection(
    shared: &Shared,
    t: &Target,
    sel: &Selectors,
) -> Result<Response<ResponseBody>, ApiError> {
    let rt = &t.resource;
    let mut store = shared.store();
    let doomed = store.list(rt, t.namespace.as_deref(), sel, &ListParams::default())?;
    let mut deleted = Vec::new();
    for obj in doomed.items {
        let name = obj["metadata"]["name"].as_str().unwrap_or("");
        let ns = obj["metadata"]["namespace"].as_str();
        deleted.push(store.delete(rt, ns, name, &Value::Null)?);
    }
    ok(&json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(&t.version),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": deleted,
    }))
}

fn list(shared: &Shared, t: &Target, query: &Query) -> Result<Response<ResponseBody>, ApiError> {
    let sel = selectors(t, query)?;
    let limit = match query.get("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
        ),
        None => None,
    };
    let params = ListParams {
        limit,
        continue_token: query.get("continue").map(str::to_string),
        resource_version: query.get("resourceVersion").map(str::to_string),
        exact: query.get("resourceVersionMatch") == Some("Exact"),
    };
    let rt = &t.resource;
    let page = shared
        .store()
        .list(rt, t.namespace.as_deref(), &sel, &params)?;
    let items: Vec<Value> = page
        .items
        .into_iter()
        .map(|mut obj| {
            // Typed lists leave apiVersion and kind out of their items;
            // custom resources (unstructured) keep them.
            if rt.crd.is_none()
                && let Some(m) = obj.as_object_mut()
            {
                m.remove("apiVersion");
                m.remove("kind");
                obj
            } else {
                render(obj, rt, &t.version)
            }
        })
        .collect();
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(token) = page.continue_token {
        meta["continue"] = token.into();
    }
    if let Some(n) = page.remaining {
        meta["remainingItemCount"] = n.into();
    }
    ok(&json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(&t.version),
        "metadata": meta,
        "items": items,
    }))
}

fn start_watch(
    shared: &Arc<Shared>,
    t: &Target,
    query: &Query,
    shutdown: signal::Receiver<bool>,
) -> Result<Response<ResponseBody>, ApiError> {
    shared.count_watch();
    let selectors = selectors(t, query)?;
    let timeout = match query.get("timeoutSeconds") {
        Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds: {s:?}"))
        })?)),
        None => None,
    };
    let send_initial = query.flag("sendInitialEvents");
    let started = shared
        .store()
        .watch(&t.resource, query.get("resourceVersion"), send_initial);
    let body = match started {
        Ok(start) => {
            let req = watch::WatchRequest {
                resource: t.resource.clone(),
                version: t.version.clone(),
                namespace: t.namespace.clone(),
                selectors,
                bookmarks: query.flag("allowWatchBookmarks"),
                send_initial,
                timeout,
            };
            watch::stream(req, start, shared.stoppers(shutdown)).boxed()
        }
        Err(e) if e.reason == Reason::Expired => watch::error_body(&e).boxed(),
        Err(e) => return Err(e),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
