//! Patch bodies: JSON merge patch (RFC 7386) and the part of strategic merge
//! patch that `kubectl apply` produces.
//!
//! Strategic merge patch is a simplification here: without the schema, a
//! list is merged by key only where the patch carries a
//! `$setElementOrder/<field>` directive (kubectl always emits one for the
//! keyed lists it changes), and its key is the one field its entries name.
//! `$patch: delete` entries, `$deleteFromPrimitiveList/<field>` and
//! `$retainKeys` are honoured or dropped; every other list is replaced, as in
//! a merge patch.
//!
//! JSON patch (RFC 6902) is complete: add, remove, replace, move, copy, test.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Applies a strategic merge patch as described in the module doc.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut clean = patch.clone();
        strip_directives(&mut clean);
        *target = clean;
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(gone)) = (t.get_mut(field), v.as_array()) {
                items.retain(|i| !gone.contains(i));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let order = p
            .get(&format!("$setElementOrder/{k}"))
            .and_then(Value::as_array);
        match (v, order) {
            (Value::Array(items), Some(order)) => {
                let merged = merge_keyed_list(t.get(k), items, order);
                t.insert(k.clone(), merged);
            }
            (Value::Object(_), _) => {
                strategic_merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
            _ => {
                let mut clean = v.clone();
                strip_directives(&mut clean);
                t.insert(k.clone(), clean);
            }
        }
    }
    // A keyed list only reordered (no entry changed) appears as a directive alone.
    for (k, order) in p {
        if let Some(field) = k.strip_prefix("$setElementOrder/")
            && !p.contains_key(field)
            && let Some(order) = order.as_array()
        {
            let merged = merge_keyed_list(t.get(field), &[], order);
            t.insert(field.to_string(), merged);
        }
    }
}

/// The merge key of a keyed list: the single field each
/// `$setElementOrder` entry names.
fn merge_key(order: &[Value]) -> Option<String> {
    let first = order.first()?.as_object()?;
    (first.len() == 1)
        .then(|| first.keys().next().cloned())
        .flatten()
}

fn merge_keyed_list(current: Option<&Value>, patch: &[Value], order: &[Value]) -> Value {
    let Some(key) = merge_key(order) else {
        // A list of primitives with merge semantics: the order is the list.
        return Value::Array(order.to_vec());
    };
    let current = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let find = |list: &[Value], id: &Value| list.iter().find(|e| e.get(&key) == Some(id)).cloned();
    let mut out = Vec::new();
    for wanted in order {
        let Some(id) = wanted.get(&key) else { continue };
        let patch_entry = find(patch, id);
        if patch_entry
            .as_ref()
            .and_then(|e| e.get("$patch"))
            .and_then(Value::as_str)
            == Some("delete")
        {
            continue;
        }
        let mut entry = find(&current, id).unwrap_or_else(|| wanted.clone());
        if let Some(pe) = patch_entry {
            strategic_merge_patch(&mut entry, &pe);
        }
        out.push(entry);
    }
    Value::Array(out)
}

/// RFC 6902. The error says which operation failed and why.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for (i, op) in ops.iter().enumerate() {
        apply_op(target, op).map_err(|why| format!("operation {i} ({op}): {why}"))?;
    }
    Ok(())
}

fn apply_op(target: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"].as_str().ok_or("missing path")?;
    let value = || op.get("value").cloned().ok_or("missing value");
    let from = || op["from"].as_str().ok_or("missing from");
    match op["op"].as_str().ok_or("missing op")? {
        "add" => add(target, path, value()?),
        "remove" => remove(target, path).map(drop),
        "replace" => {
            let slot = target.pointer_mut(path).ok_or("path does not exist")?;
            *slot = value()?;
            Ok(())
        }
        "move" => {
            let moved = remove(target, from()?)?;
            add(target, path, moved)
        }
        "copy" => {
            let copied = target
                .pointer(from()?)
                .cloned()
                .ok_or("from does not exist")?;
            add(target, path, copied)
        }
        "test" => match target.pointer(path) {
            Some(v) if *v == value()? => Ok(()),
            _ => Err("test failed".into()),
        },
        other => Err(format!("unknown op {other:?}")),
    }
}

/// Splits a JSON pointer into its parent pointer and unescaped last token.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or("the path must start with '/'")?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, key) = split_pointer(path)?;
    match target
        .pointer_mut(parent)
        .ok_or("the parent does not exist")?
    {
        Value::Object(m) => {
            m.insert(key, value);
            Ok(())
        }
        Value::Array(a) => {
            let at = if key == "-" {
                a.len()
            } else {
                key.parse().map_err(|_| "bad array index")?
            };
            if at > a.len() {
                return Err("array index out of range".into());
            }
            a.insert(at, value);
            Ok(())
        }
        _ => Err("the parent is neither an object nor an array".into()),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, key) = split_pointer(path)?;
    match target
        .pointer_mut(parent)
        .ok_or("the parent does not exist")?
    {
        Value::Object(m) => m
            .remove(&key)
            .ok_or_else(|| "path does not exist".to_string()),
        Value::Array(a) => {
            let at: usize = key.parse().map_err(|_| "bad array index")?;
            (at < a.len())
                .then(|| a.remove(at))
                .ok_or_else(|| "array index out of range".to_string())
        }
        _ => Err("the parent is neither an object nor an array".into()),
    }
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut t,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            t,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
    }

    #[test]
    fn strategic_patch_merges_containers_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "app", "image": "a:1", "ports": [{"containerPort": 80}]},
            {"name": "side", "image": "s:1"},
        ]}, "metadata": {"finalizers": ["x", "y"]}});
        // What kubectl apply sends when one container's image changes, one
        // container is removed and a finalizer is dropped.
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["y"]},
            "spec": {
                "$setElementOrder/containers": [{"name": "app"}],
                "containers": [{"name": "app", "image": "a:2"}, {"$patch": "delete", "name": "side"}],
            }
        });
        strategic_merge_patch(&mut pod, &patch);
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "app", "image": "a:2", "ports": [{"containerPort": 80}]},
            ]}, "metadata": {"finalizers": ["x"]}})
        );
    }

    #[test]
    fn json_patch_operations() {
        let mut t = json!({"metadata": {"labels": {"a/b": "1"}}, "l": [1, 2]});
        let patch = json!([
            {"op": "add", "path": "/metadata/labels/x", "value": "y"},
            {"op": "remove", "path": "/metadata/labels/a~1b"},
            {"op": "add", "path": "/l/-", "value": 3},
            {"op": "add", "path": "/l/0", "value": 0},
            {"op": "replace", "path": "/l/1", "value": 9},
            {"op": "copy", "from": "/l", "path": "/c"},
            {"op": "move", "from": "/c", "path": "/m"},
            {"op": "test", "path": "/m/0", "value": 0},
        ]);
        json_patch(&mut t, &patch).unwrap();
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"x": "y"}}, "l": [0, 9, 2, 3], "m": [0, 9, 2, 3]})
        );
        let err = json_patch(&mut t, &json!([{"op": "test", "path": "/l/0", "value": 5}]));
        assert!(err.unwrap_err().contains("test failed"));
        assert!(json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut t, &json!({"op": "add"})).is_err());
    }

    #[test]
    fn strategic_patch_without_directives_is_a_merge_patch() {
        let mut t = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        strategic_merge_patch(
            &mut t,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}}),
        );
        assert_eq!(t, json!({"metadata": {"labels": {"b": "2", "c": "3"}}}));
    }
}
