//! The resource types the server knows: the built-in kinds waymark and its
//! manifests use, plus every kind a stored CustomResourceDefinition declares.
//! Discovery documents are derived from this one table.

use serde_json::{Value, json};

/// One served resource (a plural name in a group), in all its served versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    pub group: String,
    /// Served versions; the first is the preferred one. Objects are stored
    /// once per resource and shown in whichever version was asked for (the
    /// `None` conversion strategy of a CRD).
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Discovery categories (`all` makes `kubectl get all` include it).
    pub categories: Vec<String>,
    /// Set for CRD-defined types: the CRD's name (`plural.group`).
    pub crd: Option<String>,
    /// Created objects are answered, never stored (access reviews).
    pub answered: bool,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        short: &[&str],
    ) -> Self {
        ResourceType {
            group: group.into(),
            versions: vec![version.into()],
            plural: plural.into(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: match plural {
                "pods" | "services" | "daemonsets" | "deployments" => vec!["all".into()],
                _ => Vec::new(),
            },
            crd: None,
            answered: false,
        }
    }

    /// `v1` or `apps/v1`.
    pub fn api_version(&self, version: &str) -> String {
        group_version(&self.group, version)
    }

    pub fn preferred_version(&self) -> &str {
        &self.versions[0]
    }

    /// Reads a CRD object's spec; `None` when the spec lacks what serving
    /// needs (such a CRD is stored but serves nothing, like one the real
    /// server would not mark Established).
    pub fn from_crd(crd: &Value) -> Option<Self> {
        let spec = &crd["spec"];
        let names = &spec["names"];
        let plural = names["plural"].as_str()?.to_string();
        let kind = names["kind"].as_str()?.to_string();
        let group = spec["group"].as_str()?.to_string();
        let mut versions: Vec<String> = Vec::new();
        let mut storage = None;
        for v in spec["versions"].as_array()? {
            let name = v["name"].as_str()?;
            if v["served"].as_bool().unwrap_or(false) {
                versions.push(name.to_string());
            }
            if v["storage"].as_bool().unwrap_or(false) {
                storage = Some(name.to_string());
            }
        }
        if versions.is_empty() {
            return None;
        }
        // The storage version is preferred, as discovery reports it.
        if let Some(s) = storage
            && let Some(pos) = versions.iter().position(|v| *v == s)
        {
            let v = versions.remove(pos);
            versions.insert(0, v);
        }
        Some(ResourceType {
            crd: Some(format!("{plural}.{group}")),
            answered: false,
            singular: names["singular"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| kind.to_ascii_lowercase()),
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            group,
            versions,
            plural,
            kind,
        })
    }

    fn discovery_entry(&self) -> Value {
        let mut r = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": if self.answered {
                json!(["create"])
            } else {
                json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"])
            },
        });
        if !self.short_names.is_empty() {
            r["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            r["categories"] = json!(self.categories);
        }
        r
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// Splits `apps/v1` into (`apps`, `v1`) and `v1` into (``, `v1`).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Every type served right now: built-ins first, then CRD-defined ones.
#[derive(Debug, Clone)]
pub struct Registry {
    types: Vec<ResourceType>,
}

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const CRD_RESOURCE: &str = "customresourcedefinitions";
pub const NAMESPACES: &str = "namespaces";

impl Default for Registry {
    fn default() -> Self {
        let b = ResourceType::builtin;
        Registry {
            types: vec![
                b("", "v1", NAMESPACES, "Namespace", false, &["ns"]),
                b("", "v1", "pods", "Pod", true, &["po"]),
                b("", "v1", "services", "Service", true, &["svc"]),
                b("", "v1", "endpoints", "Endpoints", true, &["ep"]),
                b("", "v1", "nodes", "Node", false, &["no"]),
                b("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
                b("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
                b("", "v1", "secrets", "Secret", true, &[]),
                b("", "v1", "events", "Event", true, &["ev"]),
                b(
                    "discovery.k8s.io",
                    "v1",
                    "endpointslices",
                    "EndpointSlice",
                    true,
                    &[],
                ),
                b(
                    CRD_GROUP,
                    "v1",
                    CRD_RESOURCE,
                    "CustomResourceDefinition",
                    false,
                    &["crd", "crds"],
                ),
                b("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"]),
                b("apps", "v1", "deployments", "Deployment", true, &["deploy"]),
                b(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "clusterroles",
                    "ClusterRole",
                    false,
                    &[],
                ),
                b(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "clusterrolebindings",
                    "ClusterRoleBinding",
                    false,
                    &[],
                ),
                b(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "roles",
                    "Role",
                    true,
                    &[],
                ),
                b(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "rolebindings",
                    "RoleBinding",
                    true,
                    &[],
                ),
                b(
                    "scheduling.k8s.io",
                    "v1",
                    "priorityclasses",
                    "PriorityClass",
                    false,
                    &["pc"],
                ),
                b("coordination.k8s.io", "v1", "leases", "Lease", true, &[]),
                b("events.k8s.io", "v1", "events", "Event", true, &["ev"]),
                ResourceType {
                    answered: true,
                    ..b(
                        "authorization.k8s.io",
                        "v1",
                        "selfsubjectaccessreviews",
                        "SelfSubjectAccessReview",
                        false,
                        &[],
                    )
                },
            ],
        }
    }
}

impl Registry {
    /// The type served at `group/version/plural`.
    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| {
            t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
        })
    }

    /// The type of an object given its `apiVersion` and `kind`.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        let (group, version) = split_api_version(api_version);
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
    }

    /// Serves (or re-serves, after an update) what a CRD declares. A CRD
    /// whose names clash with a built-in type is ignored.
    pub fn install_crd(&mut self, crd: &Value) {
        let Some(t) = ResourceType::from_crd(crd) else {
            return;
        };
        self.types.retain(|x| x.crd != t.crd);
        if self
            .types
            .iter()
            .any(|x| x.group == t.group && x.plural == t.plural)
        {
            return;
        }
        self.types.push(t);
    }

    /// Stops serving a CRD's type; returns it so its objects can be removed.
    pub fn remove_crd(&mut self, crd_name: &str) -> Option<ResourceType> {
        let pos = self
            .types
            .iter()
            .position(|t| t.crd.as_deref() == Some(crd_name))?;
        Some(self.types.remove(pos))
    }

    /// Groups in order of first appearance, each with its served versions.
    fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for t in &self.types {
            let entry = match groups.iter_mut().find(|(g, _)| *g == t.group) {
                Some(e) => e,
                None => {
                    groups.push((t.group.clone(), Vec::new()));
                    groups.last_mut().expect("just pushed")
                }
            };
            for v in &t.versions {
                if !entry.1.contains(v) {
                    entry.1.push(v.clone());
                }
            }
        }
        groups
    }

    /// Every served group/version as (group, version).
    pub fn group_versions(&self) -> Vec<(String, String)> {
        self.groups()
            .into_iter()
            .flat_map(|(g, vs)| vs.into_iter().map(move |v| (g.clone(), v)))
            .collect()
    }

    /// Types served in one group/version.
    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a ResourceType> + 'a {
        self.types
            .iter()
            .filter(move |t| t.group == group && t.versions.iter().any(|v| v == version))
    }

    /// `/apis`: an `APIGroupList` of every named group.
    pub fn api_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .into_iter()
            .filter(|(g, _)| !g.is_empty())
            .map(|(g, vs)| api_group(&g, &vs))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `/apis/<group>`: one `APIGroup`.
    pub fn api_group(&self, group: &str) -> Option<Value> {
        self.groups()
            .into_iter()
            .find(|(g, _)| g == group && !g.is_empty())
            .map(|(g, vs)| {
                let mut v = api_group(&g, &vs);
                v["kind"] = "APIGroup".into();
                v["apiVersion"] = "v1".into();
                v
            })
    }

    /// `/api/v1` or `/apis/<group>/<version>`: an `APIResourceList`.
    pub fn api_resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for t in self.in_group_version(group, version) {
            resources.push(t.discovery_entry());
            if t.answered {
                continue;
            }
            // Clients look for the status subresource before writing status.
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if resources.is_empty() {
            return None;
        }
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version(group, version),
            "resources": resources,
        }))
    }
}

fn api_group(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": vs,
        "preferredVersion": vs[0],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "httproutes.gateway.networking.k8s.io"},
            "spec": {
                "group": "gateway.networking.k8s.io",
                "names": {"plural": "httproutes", "kind": "HTTPRoute", "singular": "httproute"},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false},
                    {"name": "v1", "served": true, "storage": true},
                ],
            }
        })
    }

    #[test]
    fn a_crd_is_served_with_its_storage_version_preferred() {
        let mut r = Registry::default();
        r.install_crd(&route_crd());
        let t = r
            .lookup("gateway.networking.k8s.io", "v1beta1", "httproutes")
            .unwrap();
        assert_eq!(t.preferred_version(), "v1");
        assert!(t.namespaced);
        let g = r.api_group("gateway.networking.k8s.io").unwrap();
        assert_eq!(g["preferredVersion"]["version"], "v1");
        assert!(
            r.remove_crd("httproutes.gateway.networking.k8s.io")
                .is_some()
        );
        assert!(
            r.lookup("gateway.networking.k8s.io", "v1", "httproutes")
                .is_none()
        );
    }

    #[test]
    fn discovery_lists_core_and_groups() {
        let r = Registry::default();
        let core = r.api_resource_list("", "v1").unwrap();
        assert_eq!(core["groupVersion"], "v1");
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"pods") && names.contains(&"namespaces"));
        let groups = r.api_group_list();
        assert!(
            groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["name"] != "")
        );
        assert!(r.api_resource_list("nope", "v1").is_none());
    }
}
