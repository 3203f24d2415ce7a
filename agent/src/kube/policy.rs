//! `AuthorizationPolicy` (`policy.waymark.dev/v1alpha1`, CRD in
//! `deploy/crds/`): which sources may reach the pods a label selector picks
//! in the policy's namespace, by SPIFFE ID, namespace or service account.
//!
//! Policies become `[authorization]` rules after the config file's own, in
//! Istio's order, so operators coming from there read them the same way:
//! every DENY policy first; then every ALLOW policy; then, for each pod an
//! ALLOW policy selects, "nothing else" — once a pod has an ALLOW policy,
//! a source none of them names is denied. A pod no policy selects keeps
//! `authorization.default`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::config::mesh::{Action, AuthzRuleConfig};

/// The object as listed; the spec is read by [`policy_entry`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

impl Resource for AuthorizationPolicy {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "AuthorizationPolicy".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "policy.waymark.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "authorizationpolicies".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Selector,
    action: String,
    #[serde(default)]
    from: Vec<From>,
    #[serde(default)]
    ports: Vec<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct From {
    #[serde(default)]
    spiffe_ids: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    /// `namespace/name`, or `name` in the policy's namespace.
    #[serde(default)]
    service_accounts: Vec<String>,
}

/// A policy, checked and reduced.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyEntry {
    pub action: Action,
    pub selector: BTreeMap<String, String>,
    /// Source patterns in the trust domain's terms, made at view time.
    pub spiffe_ids: Vec<String>,
    pub namespaces: Vec<String>,
    /// `namespace/name`.
    pub service_accounts: Vec<String>,
    pub ports: Vec<u16>,
}

pub fn policy_entry(ns: &str, spec: &serde_json::Value) -> Result<PolicyEntry, String> {
    let spec: Spec = serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    let action = match spec.action.as_str() {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        other => return Err(format!("action {other:?}: use ALLOW or DENY")),
    };
    let mut e = PolicyEntry {
        action,
        selector: spec.selector.match_labels,
        spiffe_ids: Vec::new(),
        namespaces: Vec::new(),
        service_accounts: Vec::new(),
        ports: spec.ports,
    };
    for f in spec.from {
        for id in f.spiffe_ids {
            crate::config::mesh::SourcePattern::parse(&id)
                .map_err(|err| format!("from.spiffeIds {id:?}: {err}"))?;
            e.spiffe_ids.push(id);
        }
        e.namespaces.extend(f.namespaces);
        e.service_accounts
            .extend(f.service_accounts.into_iter().map(|sa| {
                if sa.contains('/') {
                    sa
                } else {
                    format!("{ns}/{sa}")
                }
            }));
    }
    if e.spiffe_ids.is_empty() && e.namespaces.is_empty() && e.service_accounts.is_empty() {
        return Err(
            "from names no source (an ALLOW would allow nothing, a DENY deny nothing)".into(),
        );
    }
    Ok(e)
}

/// The rules of `policies` (by `namespace/name`) for this node's pods,
/// given each pod's labels by name, in trust domain `td`.
pub fn rules(
    policies: &[(&String, &PolicyEntry)],
    pods: &[(&str, &BTreeMap<String, String>)],
    td: &str,
) -> Vec<AuthzRuleConfig> {
    let mut sorted = policies.to_vec();
    sorted.sort_by_key(|(k, p)| (p.action == Action::Allow, (*k).clone()));
    let mut out = Vec::new();
    let mut allow_only = Vec::new();
    for (key, p) in sorted {
        let ns = key.split_once('/').map_or("", |(ns, _)| ns);
        let selected: Vec<String> = pods
            .iter()
            .filter(|(name, labels)| {
                name.split_once('/').is_some_and(|(pns, _)| pns == ns)
                    && p.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|(name, _)| name.to_string())
            .collect();
        if selected.is_empty() {
            // Selects no pod of this node: nothing to decide here (an empty
            // `pods` would mean every pod).
            continue;
        }
        let sources: Vec<String> = p
            .spiffe_ids
            .iter()
            .cloned()
            .chain(
                p.namespaces
                    .iter()
                    .map(|n| format!("spiffe://{td}/ns/{n}/sa/*")),
            )
            .chain(p.service_accounts.iter().filter_map(|sa| {
                let (n, a) = sa.split_once('/')?;
                Some(format!("spiffe://{td}/ns/{n}/sa/{a}"))
            }))
            .collect();
        out.push(AuthzRuleConfig {
            name: Some(key.clone()),
            action: p.action,
            sources,
            services: Vec::new(),
            ports: p.ports.clone(),
            pods: selected.clone(),
        });
        if p.action == Action::Allow {
            allow_only.push(AuthzRuleConfig {
                name: Some(format!("{key} (allows only its sources)")),
                action: Action::Deny,
                sources: vec!["*".into()],
                services: Vec::new(),
                ports: p.ports.clone(),
                pods: selected,
            });
        }
    }
    out.extend(allow_only);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), app.to_string())])
    }

    #[test]
    fn policies_become_rules_in_istio_order() {
        let allow = policy_entry(
            "shop",
            &json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                    "from": [{"namespaces": ["shop"]}, {"serviceAccounts": ["ops/admin"]}]}),
        )
        .unwrap();
        let deny = policy_entry(
            "shop",
            &json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                    "from": [{"serviceAccounts": ["client"]}], "ports": [8080]}),
        )
        .unwrap();
        let (ka, kd) = ("shop/allow".to_string(), "shop/deny".to_string());
        let (web, db) = (labels("web"), labels("db"));
        let pods = [("shop/web-0", &web), ("shop/db", &db), ("other/web", &web)];
        let r = rules(&[(&ka, &allow), (&kd, &deny)], &pods, "td");
        let names: Vec<&str> = r.iter().map(|r| r.name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "shop/deny",
                "shop/allow",
                "shop/allow (allows only its sources)"
            ]
        );
        assert_eq!(r[0].sources, ["spiffe://td/ns/shop/sa/client"]);
        assert_eq!(r[0].ports, [8080]);
        assert_eq!(
            r[0].pods,
            ["shop/web-0"],
            "only pods of the policy's namespace"
        );
        assert_eq!(
            r[1].sources,
            ["spiffe://td/ns/shop/sa/*", "spiffe://td/ns/ops/sa/admin"]
        );
        assert_eq!(
            (r[2].action, r[2].sources.as_slice()),
            (Action::Deny, &["*".to_string()][..])
        );
        // A policy selecting no pod of this node makes no rule.
        let none = rules(&[(&ka, &allow)], &[("shop/db", &db)], "td");
        assert!(none.is_empty());
    }

    #[test]
    fn malformed_policies_are_refused() {
        for (spec, want) in [
            (
                json!({"action": "MAYBE", "from": [{"namespaces": ["a"]}]}),
                "MAYBE",
            ),
            (json!({"action": "ALLOW"}), "names no source"),
            (
                json!({"action": "ALLOW", "from": [{"spiffeIds": ["nope"]}]}),
                "nope",
            ),
            (
                json!({"action": "ALLOW", "from": [{"teams": ["a"]}]}),
                "teams",
            ),
        ] {
            let err = policy_entry("a", &spec).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }
}
