//! Label and field selectors: the query syntax of `labelSelector` and
//! `fieldSelector`, parsed the way apimachinery parses them, and matched
//! against stored objects.

use serde_json::Value;

use crate::status::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelReq {
    key: String,
    op: LabelOp,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<LabelReq>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_requirement(part).map_err(|why| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {why} (in labelSelector {text:?})"
                ))
            })?);
        }
        Ok(LabelSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.reqs.iter().all(|r| {
            let value = labels.get(&r.key).and_then(Value::as_str);
            match (&r.op, value) {
                (LabelOp::Exists, v) => v.is_some(),
                (LabelOp::NotExists, v) => v.is_none(),
                (LabelOp::Eq(want), Some(v)) => v == want,
                (LabelOp::NotEq(want), v) => v != Some(want.as_str()),
                (LabelOp::In(set), Some(v)) => set.iter().any(|s| s == v),
                (LabelOp::NotIn(set), v) => v.is_none_or(|v| set.iter().all(|s| s != v)),
                (LabelOp::Gt(n), Some(v)) => v.parse::<i64>().is_ok_and(|x| x > *n),
                (LabelOp::Lt(n), Some(v)) => v.parse::<i64>().is_ok_and(|x| x < *n),
                (_, None) => false,
            }
        })
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<LabelReq, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelReq {
            key: valid_key(key.trim())?,
            op: LabelOp::NotExists,
        });
    }
    for (sym, make) in [
        ("!=", LabelOp::NotEq as fn(String) -> LabelOp),
        ("==", LabelOp::Eq),
        ("=", LabelOp::Eq),
    ] {
        if let Some((k, v)) = part.split_once(sym) {
            return Ok(LabelReq {
                key: valid_key(k.trim())?,
                op: make(valid_value(v.trim())?),
            });
        }
    }
    for (sym, gt) in [(">", true), ("<", false)] {
        if let Some((k, v)) = part.split_once(sym) {
            let n: i64 = v
                .trim()
                .parse()
                .map_err(|_| format!("for '{sym}' operator, the value must be an integer"))?;
            return Ok(LabelReq {
                key: valid_key(k.trim())?,
                op: if gt { LabelOp::Gt(n) } else { LabelOp::Lt(n) },
            });
        }
    }
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    let rest = words.next().map(str::trim).unwrap_or_default();
    if rest.is_empty() {
        return Ok(LabelReq {
            key: valid_key(key)?,
            op: LabelOp::Exists,
        });
    }
    let (op, set) = if let Some(s) = rest.strip_prefix("notin") {
        (false, s)
    } else if let Some(s) = rest.strip_prefix("in") {
        (true, s)
    } else {
        return Err(format!(
            "found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
        ));
    };
    let set = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| "found ..., expected: '(' … ')'".to_string())?;
    let values = set
        .split(',')
        .map(|v| valid_value(v.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().all(String::is_empty) {
        return Err("for 'in', 'notin' operators, values set can't be empty".into());
    }
    Ok(LabelReq {
        key: valid_key(key)?,
        op: if op {
            LabelOp::In(values)
        } else {
            LabelOp::NotIn(values)
        },
    })
}

fn valid_key(key: &str) -> Result<String, String> {
    let name = key.rsplit('/').next().unwrap_or_default();
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("invalid label key {key:?}"));
    }
    Ok(key.to_string())
}

fn valid_value(v: &str) -> Result<String, String> {
    if v.len() > 63
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("invalid label value: {v:?}"));
    }
    Ok(v.to_string())
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`,
/// joined by commas. Only the fields the real server indexes for the kind
/// are accepted; others are refused as it refuses them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

/// Fields every kind can be selected by, and those per kind.
fn supported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "Namespace" => &["status.phase"],
        "Node" => &["spec.unschedulable"],
        "Secret" => &["type"],
        // What `kubectl describe` asks for an object's events.
        "Event" => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        _ => &[],
    }
}

impl FieldSelector {
    pub fn parse(text: &str, kind: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace")
                && !supported_fields(kind).contains(&field)
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs
            .iter()
            .all(|(field, eq, want)| (field_value(obj, field) == *want) == *eq)
    }
}

/// A field's value as the server's field sets render it: strings as they
/// are, booleans as `true`/`false`, absent as empty.
fn field_value(obj: &Value, field: &str) -> String {
    let mut v = obj;
    for part in field.split('.') {
        v = &v[part];
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ if field == "spec.hostNetwork" || field == "spec.unschedulable" => "false".into(),
        _ => String::new(),
    }
}

/// Both selectors of one request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: &str, phase: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels},
               "spec": {"nodeName": node}, "status": {"phase": phase}})
    }

    fn m(sel: &str, obj: &Value) -> bool {
        LabelSelector::parse(sel).unwrap().matches(obj)
    }

    #[test]
    fn label_operators() {
        let o = pod(
            json!({"app": "web", "tier": "front", "n": "5"}),
            "a",
            "Running",
        );
        assert!(m("", &o));
        assert!(m("app=web", &o) && m("app==web", &o) && !m("app=db", &o));
        assert!(m("app!=db", &o) && !m("app!=web", &o) && m("missing!=x", &o));
        assert!(m("app in (db, web)", &o) && !m("app in (db)", &o));
        assert!(m("app notin (db)", &o) && !m("app notin (web,db)", &o));
        assert!(m("missing notin (x)", &o) && !m("missing in (x)", &o));
        assert!(m("app", &o) && !m("!app", &o) && m("!missing", &o) && !m("missing", &o));
        assert!(m("app=web,tier in (front,back),!missing", &o));
        assert!(!m("app=web,tier=back", &o));
        assert!(m("n>4", &o) && !m("n<5", &o));
        assert!(m("example.com/x notin (y)", &o));
    }

    #[test]
    fn bad_label_selectors_are_400() {
        for bad in ["app in db", "app=we b", "app in ()", "a b", "=x"] {
            let e = LabelSelector::parse(bad).unwrap_err();
            assert_eq!(e.reason.code(), 400, "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let o = pod(json!({}), "node-a", "Running");
        let f = |s: &str| FieldSelector::parse(s, "Pod").unwrap().matches(&o);
        assert!(f("spec.nodeName=node-a") && !f("spec.nodeName=node-b"));
        assert!(f("spec.nodeName!=node-b,status.phase=Running"));
        assert!(f("metadata.name=p,metadata.namespace==ns"));
        assert!(!f("status.phase!=Running"));
        let e = FieldSelector::parse("spec.nodeName=x", "Service").unwrap_err();
        assert_eq!(e.message, "field label not supported: spec.nodeName");
        let unscheduled = pod(json!({}), "", "Pending");
        assert!(
            FieldSelector::parse("spec.nodeName=", "Pod")
                .unwrap()
                .matches(&unscheduled)
        );
    }
}
