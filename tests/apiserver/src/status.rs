//! Errors as the API server reports them: each becomes a `meta.k8s.io/v1`
//! `Status` object with the HTTP code, `reason` and message wording of the
//! real server, so clients branch on them exactly as they would in a cluster.

use serde_json::{Value, json};

/// The reasons this server produces; the string forms are the real
/// `metav1.StatusReason` values clients match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotFound,
    AlreadyExists,
    Conflict,
    BadRequest,
    Invalid,
    Expired,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    UnsupportedMediaType,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotFound => "NotFound",
            Reason::AlreadyExists => "AlreadyExists",
            Reason::Conflict => "Conflict",
            Reason::BadRequest => "BadRequest",
            Reason::Invalid => "Invalid",
            Reason::Expired => "Expired",
            Reason::Forbidden => "Forbidden",
            Reason::InternalError => "InternalError",
            Reason::MethodNotAllowed => "MethodNotAllowed",
            Reason::UnsupportedMediaType => "UnsupportedMediaType",
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Reason::NotFound => 404,
            Reason::AlreadyExists | Reason::Conflict => 409,
            Reason::BadRequest => 400,
            Reason::Invalid => 422,
            Reason::Expired => 410,
            Reason::Forbidden => 403,
            Reason::InternalError => 500,
            Reason::MethodNotAllowed => 405,
            Reason::UnsupportedMediaType => 415,
        }
    }
}

/// A failed request: what the server answers instead of an object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} ({}): {message}", reason.as_str(), reason.code())]
pub struct ApiError {
    pub reason: Reason,
    pub message: String,
    /// `details`: `{name, group, kind}` of the object concerned, where known.
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ApiError {
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, group: &str, resource: &str, name: &str) -> Self {
        let mut d = serde_json::Map::new();
        if !name.is_empty() {
            d.insert("name".into(), name.into());
        }
        if !group.is_empty() {
            d.insert("group".into(), group.into());
        }
        d.insert("kind".into(), resource.into());
        self.details = Some(Value::Object(d));
        self
    }

    /// `resource` is `pods` or `httproutes.gateway.networking.k8s.io`, as
    /// the real server qualifies names outside the core group.
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        ApiError::new(
            Reason::NotFound,
            format!("{} \"{name}\" not found", qualified(group, resource)),
        )
        .with_details(group, resource, name)
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        ApiError::new(
            Reason::AlreadyExists,
            format!("{} \"{name}\" already exists", qualified(group, resource)),
        )
        .with_details(group, resource, name)
    }

    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        ApiError::new(
            Reason::Conflict,
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(group, resource)
            ),
        )
        .with_details(group, resource, name)
    }

    pub fn stale(group: &str, resource: &str, name: &str) -> Self {
        ApiError::conflict(
            group,
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(Reason::BadRequest, message)
    }

    /// 422: `kind` is the object's Kind (`Pod "x" is invalid: …`).
    pub fn invalid(kind: &str, name: &str, cause: &str) -> Self {
        ApiError::new(
            Reason::Invalid,
            format!("{kind} \"{name}\" is invalid: {cause}"),
        )
    }

    /// The server could not route the request at all (unknown group,
    /// version or resource): the real server's generic 404.
    pub fn no_route() -> Self {
        ApiError::new(
            Reason::NotFound,
            "the server could not find the requested resource",
        )
        .with_empty_details()
    }

    fn with_empty_details(mut self) -> Self {
        self.details = Some(json!({}));
        self
    }

    /// 403 as RBAC words it for an anonymous user.
    pub fn forbidden(group: &str, resource: &str, verb: &str, namespace: Option<&str>) -> Self {
        let scope = match namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        ApiError::new(
            Reason::Forbidden,
            format!(
                "{} is forbidden: User \"system:anonymous\" cannot {verb} resource \"{resource}\" in API group \"{group}\"{scope} (RBAC: access denied by a fault injected into the test API server)",
                qualified(group, resource)
            ),
        )
        .with_details(group, resource, "")
    }

    pub fn internal(message: &str) -> Self {
        ApiError::new(
            Reason::InternalError,
            format!("Internal error occurred: {message}"),
        )
        .with_details("", "", "")
    }

    /// 410 for a watch or list from a resourceVersion older than the
    /// compacted history; the watch cache's wording.
    pub fn too_old(requested: u64, oldest: u64) -> Self {
        ApiError::new(
            Reason::Expired,
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// The `Status` object clients receive.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason.as_str(),
            "code": self.reason.code(),
        });
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}

fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_reads_like_the_real_server() {
        let s = ApiError::not_found("", "pods", "web").to_status();
        assert_eq!(s["code"], 404);
        assert_eq!(s["reason"], "NotFound");
        assert_eq!(s["message"], "pods \"web\" not found");
        assert_eq!(s["details"]["kind"], "pods");
        let s = ApiError::not_found("gateway.networking.k8s.io", "httproutes", "r").to_status();
        assert_eq!(
            s["message"],
            "httproutes.gateway.networking.k8s.io \"r\" not found"
        );
        assert_eq!(s["details"]["group"], "gateway.networking.k8s.io");
    }

    #[test]
    fn forbidden_mentions_rbac() {
        let s = ApiError::forbidden("", "pods", "list", Some("default")).to_status();
        assert_eq!(s["code"], 403);
        assert!(s["message"].as_str().unwrap().contains("RBAC"));
    }
}
