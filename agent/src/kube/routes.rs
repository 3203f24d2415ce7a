//! Gateway API routes for mesh traffic (GAMMA): an HTTPRoute or GRPCRoute
//! whose `parentRef` is a Service routes the requests pods send to that
//! Service — matches, weighted `backendRefs`, timeouts, retries — and
//! becomes waymark routes on the Service's waymark services.
//!
//! Own types for the subset waymark reads (the `gateway-api` crate pulls in
//! kube's derive machinery and schemars for a handful of fields). Unknown
//! fields are ignored, as the API server's own clients do; what waymark
//! cannot honour (a filter, a backend that is not a Service) skips the
//! route with a reason rather than routing differently than written.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::config::services::{
    BackendConfig, GrpcMatchConfig, HeaderMatchConfig, MatchConfig, PathMatchConfig, RetryConfig,
    RouteConfig,
};

/// Annotations for retries where the route's own fields have none
/// (GRPCRoute, and HTTPRoute without the experimental `retry` field):
/// `retry.waymark.dev/on` (`5xx,reset`, gRPC names such as `unavailable`)
/// and `retry.waymark.dev/attempts` (default 2).
pub const RETRY_ON: &str = "retry.waymark.dev/on";
pub const RETRY_ATTEMPTS: &str = "retry.waymark.dev/attempts";

const GROUP: &str = "gateway.networking.k8s.io";

macro_rules! route_kind {
    ($ty:ident, $kind:literal, $plural:literal) => {
        /// A route object as listed: metadata and a spec read leniently.
        #[derive(Clone, Debug, Serialize, Deserialize)]
        pub struct $ty {
            pub metadata: ObjectMeta,
            #[serde(default)]
            pub spec: serde_json::Value,
        }

        impl Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;
            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v1".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

route_kind!(HttpRoute, "HTTPRoute", "httproutes");
route_kind!(GrpcRoute, "GRPCRoute", "grpcroutes");

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    parent_refs: Vec<Ref>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ref {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<Match>,
    #[serde(default)]
    backend_refs: Vec<Ref>,
    #[serde(default)]
    filters: Vec<serde_json::Value>,
    timeouts: Option<Timeouts>,
    retry: Option<Retry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Match {
    path: Option<PathMatch>,
    #[serde(default)]
    headers: Vec<HeaderMatch>,
    method: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct PathMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HeaderMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
struct GrpcMethod {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Timeouts {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Retry {
    #[serde(default)]
    codes: Vec<u16>,
    attempts: Option<u32>,
    backoff: Option<String>,
}

/// A route reduced to what the view needs: its Service parents and the
/// waymark routes it makes, with backends as `(service, port, weight)`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteEntry {
    pub kind: &'static str,
    /// `(namespace/name, port)` of each Service parent.
    pub parents: Vec<(String, Option<u16>)>,
    pub rules: Vec<RuleEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleEntry {
    pub route: RouteConfig,
    /// `(namespace/name, port, weight)`; empty: the parent itself.
    pub backends: Vec<(String, Option<u16>, u32)>,
}

fn duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{what} {s:?}: {e}"))
}

fn is_service(r: &Ref) -> bool {
    r.group.as_deref().unwrap_or("").is_empty()
        && r.kind.as_deref().unwrap_or("Service") == "Service"
}

/// Reads a route's spec; `grpc` for a GRPCRoute.
pub fn route_entry(
    ns: &str,
    name: &str,
    spec: &serde_json::Value,
    annotations: Option<&BTreeMap<String, String>>,
    grpc: bool,
) -> Result<RouteEntry, String> {
    let kind = if grpc { "grpcroute" } else { "httproute" };
    let spec: Spec = serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    let parents: Vec<(String, Option<u16>)> = spec
        .parent_refs
        .iter()
        .filter(|p| is_service(p))
        .map(|p| {
            (
                format!("{}/{}", p.namespace.as_deref().unwrap_or(ns), p.name),
                p.port,
            )
        })
        .collect();
    if parents.is_empty() {
        return Err("no parentRef is a Service (a Gateway's routes are not for the mesh)".into());
    }
    let annotated_retry = annotation_retry(annotations)?;
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let rname = rule
            .name
            .clone()
            .unwrap_or_else(|| format!("{ns}/{name}/rule{i}"));
        if !rule.filters.is_empty() {
            return Err(format!(
                "rule {rname}: filters are not supported by waymark yet"
            ));
        }
        let matches = rule
            .matches
            .iter()
            .map(|m| if grpc { grpc_match(m) } else { http_match(m) })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("rule {rname}: {e}"))?;
        let mut backends = Vec::new();
        for b in &rule.backend_refs {
            if !is_service(b) {
                return Err(format!(
                    "rule {rname}: backendRef {} is not a Service",
                    b.name
                ));
            }
            backends.push((
                format!("{}/{}", b.namespace.as_deref().unwrap_or(ns), b.name),
                b.port,
                b.weight.unwrap_or(1),
            ));
        }
        let (timeout, per_try_timeout) = match &rule.timeouts {
            Some(t) => (
                t.request
                    .as_deref()
                    .map(|s| duration("timeouts.request", s))
                    .transpose()?,
                t.backend_request
                    .as_deref()
                    .map(|s| duration("timeouts.backendRequest", s))
                    .transpose()?,
            ),
            None => (None, None),
        };
        let retry = match &rule.retry {
            Some(r) => Some(field_retry(r)?),
            None => annotated_retry.clone(),
        };
        rules.push(RuleEntry {
            route: RouteConfig {
                name: rname,
                matches,
                backends: Vec::new(),
                timeout,
                per_try_timeout,
                retry,
            },
            backends,
        });
    }
    Ok(RouteEntry {
        kind,
        parents,
        rules,
    })
}

fn http_match(m: &Match) -> Result<MatchConfig, String> {
    let path = match &m.path {
        None => None,
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            Some(match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathMatchConfig::Exact(v),
                "PathPrefix" => PathMatchConfig::Prefix(v),
                "RegularExpression" => PathMatchConfig::Regex(v),
                other => return Err(format!("path match type {other} is not supported")),
            })
        }
    };
    let method = match &m.method {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("method {other} is not a string")),
    };
    Ok(MatchConfig {
        path,
        method,
        headers: headers(&m.headers)?,
        grpc: None,
    })
}

fn grpc_match(m: &Match) -> Result<MatchConfig, String> {
    let grpc = match &m.method {
        None => None,
        Some(v) => {
            let g: GrpcMethod =
                serde_json::from_value(v.clone()).map_err(|e| format!("method: {e}"))?;
            if g.kind.as_deref().is_some_and(|k| k != "Exact") {
                return Err(format!(
                    "gRPC method match type {:?} is not supported",
                    g.kind
                ));
            }
            Some(GrpcMatchConfig {
                service: g.service,
                method: g.method,
            })
        }
    };
    Ok(MatchConfig {
        path: None,
        method: None,
        headers: headers(&m.headers)?,
        grpc,
    })
}

fn headers(hs: &[HeaderMatch]) -> Result<Vec<HeaderMatchConfig>, String> {
    hs.iter()
        .map(|h| {
            let (exact, regex) = match h.kind.as_deref().unwrap_or("Exact") {
                "Exact" => (Some(h.value.clone()), None),
                "RegularExpression" => (None, Some(h.value.clone())),
                other => return Err(format!("header match type {other} is not supported")),
            };
            Ok(HeaderMatchConfig {
                name: h.name.clone(),
                exact,
                regex,
            })
        })
        .collect()
}

/// The experimental HTTPRoute `retry`: waymark retries on conditions, not
/// on single codes, so the codes map to the narrowest condition that
/// covers them (`gateway-error` for 502–504 only, else `5xx`).
fn field_retry(r: &Retry) -> Result<RetryConfig, String> {
    if let Some(c) = r.codes.iter().find(|c| !(500..=599).contains(*c)) {
        return Err(format!("retry code {c}: only 5xx codes can be retried"));
    }
    let on = if !r.codes.is_empty() && r.codes.iter().all(|c| (502..=504).contains(c)) {
        "gateway-error"
    } else {
        "5xx"
    };
    let mut cfg = RetryConfig {
        attempts: r.attempts.unwrap_or(2),
        on: vec![on.into()],
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
    };
    if let Some(b) = &r.backoff {
        cfg.backoff_base = duration("retry.backoff", b)?;
        cfg.backoff_max = cfg.backoff_max.max(cfg.backoff_base);
    }
    Ok(cfg)
}

fn annotation_retry(a: Option<&BTreeMap<String, String>>) -> Result<Option<RetryConfig>, String> {
    let Some(on) = a.and_then(|a| a.get(RETRY_ON)) else {
        return Ok(None);
    };
    let on: Vec<String> = on
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for c in &on {
        c.parse::<crate::retry::RetryOn>()
            .map_err(|e| format!("annotation {RETRY_ON}: {e}"))?;
    }
    let attempts = match a.and_then(|a| a.get(RETRY_ATTEMPTS)) {
        Some(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("annotation {RETRY_ATTEMPTS}: {s:?} is not a number"))?,
        None => 2,
    };
    Ok(Some(RetryConfig {
        attempts,
        on,
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
    }))
}

/// A backend ref as a waymark service name, given the parent's port when
/// the ref names none.
pub fn backend(name: &str, port: Option<u16>, parent_port: u16, weight: u32) -> BackendConfig {
    let (ns, n) = name.split_once('/').unwrap_or(("default", name));
    BackendConfig {
        service: format!("{n}.{ns}:{}", port.unwrap_or(parent_port)),
        weight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_httproute_becomes_waymark_routes() {
        let spec = json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                              "headers": [{"name": "x-canary", "value": "1"}]}],
                 "backendRefs": [{"name": "web-v2", "port": 80, "weight": 1}],
                 "timeouts": {"request": "2s", "backendRequest": "500ms"},
                 "retry": {"codes": [503], "attempts": 3}},
                {"backendRefs": [{"name": "web", "port": 80, "weight": 90},
                                 {"name": "web-v2", "port": 80, "weight": 10}]}
            ]
        });
        let r = route_entry("shop", "split", &spec, None, false).unwrap();
        assert_eq!(r.parents, vec![("shop/web".to_string(), Some(80))]);
        assert_eq!(r.rules.len(), 2);
        let first = &r.rules[0].route;
        assert_eq!(first.name, "shop/split/rule0");
        assert_eq!(
            first.matches[0].path,
            Some(PathMatchConfig::Prefix("/api".into()))
        );
        assert_eq!(first.matches[0].headers[0].exact.as_deref(), Some("1"));
        assert_eq!(first.timeout, Some(Duration::from_secs(2)));
        assert_eq!(first.per_try_timeout, Some(Duration::from_millis(500)));
        let retry = first.retry.as_ref().unwrap();
        assert_eq!(
            (retry.attempts, retry.on.as_slice()),
            (3, &["gateway-error".to_string()][..])
        );
        assert_eq!(
            r.rules[1].backends,
            vec![
                ("shop/web".into(), Some(80), 90),
                ("shop/web-v2".into(), Some(80), 10)
            ]
        );
        assert_eq!(
            backend("shop/web-v2", None, 80, 10).service,
            "web-v2.shop:80"
        );
    }

    #[test]
    fn grpc_routes_take_retries_from_the_annotation() {
        let spec = json!({
            "parentRefs": [{"kind": "Service", "name": "greeter"}],
            "rules": [{"matches": [{"method": {"service": "helloworld.Greeter", "method": "SayHello"}}]}]
        });
        let mut a = BTreeMap::new();
        a.insert(RETRY_ON.to_string(), "unavailable, reset".to_string());
        let r = route_entry("shop", "g", &spec, Some(&a), true).unwrap();
        let m = r.rules[0].route.matches[0].grpc.as_ref().unwrap();
        assert_eq!(m.method.as_deref(), Some("SayHello"));
        assert_eq!(
            r.rules[0].route.retry.as_ref().unwrap().on,
            ["unavailable", "reset"]
        );
        a.insert(RETRY_ON.to_string(), "sometimes".to_string());
        assert!(
            route_entry("shop", "g", &spec, Some(&a), true)
                .unwrap_err()
                .contains("sometimes")
        );
    }

    #[test]
    fn what_waymark_cannot_honour_is_refused() {
        let gateway = json!({"parentRefs": [{"group": GROUP, "kind": "Gateway", "name": "gw"}]});
        assert!(
            route_entry("a", "r", &gateway, None, false)
                .unwrap_err()
                .contains("no parentRef")
        );
        let filter = json!({"parentRefs": [{"name": "web"}],
            "rules": [{"filters": [{"type": "RequestHeaderModifier"}]}]});
        assert!(
            route_entry("a", "r", &filter, None, false)
                .unwrap_err()
                .contains("filters")
        );
        let bucket = json!({"parentRefs": [{"name": "web"}],
            "rules": [{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "b"}]}]});
        assert!(
            route_entry("a", "r", &bucket, None, false)
                .unwrap_err()
                .contains("not a Service")
        );
        let code = json!({"parentRefs": [{"name": "web"}], "rules": [{"retry": {"codes": [404]}}]});
        assert!(
            route_entry("a", "r", &code, None, false)
                .unwrap_err()
                .contains("404")
        );
    }
}
