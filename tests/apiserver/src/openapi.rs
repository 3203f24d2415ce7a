//! The smallest OpenAPI v3 that lets `kubectl apply` validate on the
//! server: kubectl (1.27+) reads `/openapi/v3`, then the document of the
//! object's group/version, and looks for a PATCH operation tagged with the
//! object's group/version/kind that accepts the `fieldValidation` query
//! parameter. Finding it, kubectl leaves validation to the server instead of
//! downloading schemas. No schemas are served, so kubectl builds its patches
//! from its compiled-in types (built-in kinds) or as JSON merge patches
//! (custom resources), exactly as it does against a server without them.
//! This server accepts `fieldValidation` and does not check fields.

use serde_json::{Map, Value, json};

use crate::resources::Registry;

fn path_key(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A short content hash, so clients that cache documents by `hash=` see a
/// new one when the served kinds change.
fn hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// `/openapi/v3`: where each group/version's document is.
pub fn root(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, v) in registry.group_versions() {
        let doc = group_version(registry, &g, &v)
            .map(|d| d.to_string())
            .unwrap_or_default();
        let key = path_key(&g, &v);
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={}", hash(&doc))}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut paths = Map::new();
    for t in registry.in_group_version(group, version) {
        let base = format!("/{}", path_key(group, version));
        let path = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{base}/{}/{{name}}", t.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "operationId": format!("patch{}", t.kind),
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": t.kind},
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                ],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_patch_operation_with_field_validation() {
        let r = Registry::default();
        let root = root(&r);
        assert!(
            root["paths"]["api/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/api/v1?hash=")
        );
        let doc = group_version(&r, "apps", "v1").unwrap();
        let op = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"]["patch"];
        assert_eq!(op["x-kubernetes-group-version-kind"]["kind"], "DaemonSet");
        assert_eq!(op["parameters"][0]["name"], "fieldValidation");
        assert!(group_version(&r, "nope", "v1").is_none());
    }
}
