//! Store unit tests: writes and their errors, lists at a snapshot,
//! pagination, watch replay and 410 after compaction.

use super::*;
use crate::selector::LabelSelector;

fn pods(store: &Store) -> ResourceType {
    store.registry.lookup("", "v1", "pods").cloned().unwrap()
}

fn pod(name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "labels": {"app": app}},
           "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]}})
}

#[test]
fn create_fills_metadata_and_refuses_duplicates() {
    let mut s = Store::new(100);
    let t = pods(&s);
    let rv0 = s.resource_version();
    let p = s.create(&t, Some("default"), pod("a", "web")).unwrap();
    assert_eq!(p["metadata"]["namespace"], "default");
    assert_eq!(p["metadata"]["resourceVersion"], (rv0 + 1).to_string());
    assert_eq!(p["metadata"]["generation"], 1);
    assert_eq!(p["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(
        p["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let e = s.create(&t, Some("default"), pod("a", "web")).unwrap_err();
    assert_eq!((e.reason.code(), e.reason.as_str()), (409, "AlreadyExists"));
    let e = s.create(&t, Some("nope"), pod("b", "web")).unwrap_err();
    assert_eq!(e.message, "namespaces \"nope\" not found");
    let e = s
        .create(&t, Some("default"), pod("Bad_Name", "web"))
        .unwrap_err();
    assert_eq!(e.reason.code(), 422);
    let e = s.create(&t, Some("default"), json!([1])).unwrap_err();
    assert_eq!(e.reason.code(), 400);
}

#[test]
fn replace_checks_the_resource_version_and_skips_no_ops() {
    let mut s = Store::new(100);
    let t = pods(&s);
    let p = s.create(&t, Some("default"), pod("a", "web")).unwrap();
    let same = s.replace(&t, Some("default"), "a", p.clone()).unwrap();
    assert_eq!(
        same["metadata"]["resourceVersion"],
        p["metadata"]["resourceVersion"]
    );
    let mut changed = p.clone();
    changed["spec"]["nodeName"] = "node-b".into();
    let new = s
        .replace(&t, Some("default"), "a", changed.clone())
        .unwrap();
    assert_eq!(new["metadata"]["generation"], 2);
    assert_eq!(new["metadata"]["uid"], p["metadata"]["uid"]);
    let e = s.replace(&t, Some("default"), "a", changed).unwrap_err();
    assert_eq!((e.reason.code(), e.reason.as_str()), (409, "Conflict"));
    let e = s
        .replace(&t, Some("default"), "zz", pod("zz", "x"))
        .unwrap_err();
    assert_eq!(e.reason.code(), 404);
}

#[test]
fn lists_page_through_one_snapshot() {
    let mut s = Store::new(1000);
    let t = pods(&s);
    for i in 0..5 {
        s.create(&t, Some("default"), pod(&format!("p{i}"), "web"))
            .unwrap();
    }
    let all = Selectors::default();
    let params = ListParams {
        limit: Some(2),
        ..Default::default()
    };
    let first = s.list(&t, Some("default"), &all, &params).unwrap();
    let (page1, rv, token) = (first.items, first.rv, first.continue_token);
    assert_eq!(page1.len(), 2);
    assert_eq!(first.remaining, Some(3));
    // Writes between pages do not show in later pages.
    s.create(&t, Some("default"), pod("p9", "web")).unwrap();
    s.delete(&t, Some("default"), "p3", &Value::Null).unwrap();
    s.replace(&t, Some("default"), "p4", pod("p4", "changed"))
        .unwrap();
    s.replace(&t, Some("default"), "p4", pod("p4", "again"))
        .unwrap();
    s.create(&t, Some("kube-system"), pod("p5", "web")).unwrap();
    let mut names: Vec<String> = page1
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().into())
        .collect();
    let mut apps = Vec::new();
    let mut token = token;
    while let Some(tok) = token {
        let params = ListParams {
            limit: Some(2),
            continue_token: Some(tok),
            ..Default::default()
        };
        let page = s.list(&t, Some("default"), &all, &params).unwrap();
        assert_eq!(page.rv, rv);
        let next = page.continue_token;
        names.extend(
            page.items
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_string()),
        );
        apps.extend(
            page.items
                .iter()
                .map(|p| p["metadata"]["labels"]["app"].clone()),
        );
        token = next;
    }
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
    assert_eq!(
        apps,
        ["web", "web", "web"],
        "p4 as it was at the first page"
    );
    // After compaction the snapshot is gone: 410.
    let token = s
        .list(&t, Some("default"), &all, &params)
        .unwrap()
        .continue_token;
    s.create(&t, Some("default"), pod("p10", "web")).unwrap();
    s.compact();
    let params = ListParams {
        continue_token: token,
        ..Default::default()
    };
    let e = s.list(&t, Some("default"), &all, &params).unwrap_err();
    assert_eq!((e.reason.code(), e.reason.as_str()), (410, "Expired"));
}

#[test]
fn list_filters_by_namespace_and_labels() {
    let mut s = Store::new(100);
    let t = pods(&s);
    s.create(&t, Some("default"), pod("a", "web")).unwrap();
    s.create(&t, Some("kube-system"), pod("b", "web")).unwrap();
    s.create(&t, Some("default"), pod("c", "db")).unwrap();
    let sel = Selectors {
        labels: LabelSelector::parse("app=web").unwrap(),
        ..Default::default()
    };
    let all_ns = s.list(&t, None, &sel, &ListParams::default()).unwrap();
    assert_eq!(all_ns.items.len(), 2);
    let one_ns = s.list(&t, Some("default"), &sel, &ListParams::default());
    assert_eq!(one_ns.unwrap().items.len(), 1);
}

#[test]
fn watch_replays_history_and_expires_after_compaction() {
    let mut s = Store::new(100);
    let t = pods(&s);
    let start = s.resource_version();
    s.create(&t, Some("default"), pod("a", "web")).unwrap();
    s.delete(&t, Some("default"), "a", &Value::Null).unwrap();
    let w = s.watch(&t, Some(&start.to_string()), false).unwrap();
    let kinds: Vec<EventType> = w.replay.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventType::Added, EventType::Deleted]);
    assert_eq!(
        w.replay[1].object["metadata"]["resourceVersion"],
        s.resource_version().to_string()
    );
    let w = s.watch(&t, Some("0"), false).unwrap();
    assert!(w.initial.is_empty() && w.replay.is_empty());
    s.compact();
    let e = s.watch(&t, Some(&start.to_string()), false).err().unwrap();
    assert_eq!((e.reason.code(), e.reason.as_str()), (410, "Expired"));
    assert!(e.message.starts_with("too old resource version"));
    // The current resourceVersion is still fine.
    assert!(
        s.watch(&t, Some(&s.resource_version().to_string()), false)
            .is_ok()
    );
}

#[test]
fn history_limit_compacts_the_oldest() {
    let mut s = Store::new(3);
    let t = pods(&s);
    let start = s.resource_version();
    for i in 0..5 {
        s.create(&t, Some("default"), pod(&format!("p{i}"), "web"))
            .unwrap();
    }
    assert!(s.watch(&t, Some(&start.to_string()), false).is_err());
    assert!(
        s.watch(&t, Some(&(s.resource_version() - 2).to_string()), false)
            .is_ok()
    );
}

#[test]
fn deleting_a_namespace_or_crd_takes_its_objects() {
    let mut s = Store::new(100);
    let t = pods(&s);
    let ns = s.registry.lookup("", "v1", "namespaces").cloned().unwrap();
    s.create(&ns, None, json!({"metadata": {"name": "team"}}))
        .unwrap();
    s.create(&t, Some("team"), pod("a", "web")).unwrap();
    let gone = s.delete(&ns, None, "team", &Value::Null).unwrap();
    assert_eq!(gone["status"]["phase"], "Terminating");
    let e = s.create(&t, Some("team"), pod("b", "web")).unwrap_err();
    assert_eq!(e.reason.code(), 403);
    assert!(s.get(&t, Some("team"), "a").is_ok());
    s.finalize_namespaces(std::time::Duration::from_secs(60));
    assert!(s.get(&t, Some("team"), "a").is_ok(), "not yet");
    s.finalize_namespaces(std::time::Duration::ZERO);
    assert!(s.get(&t, Some("team"), "a").is_err());
    assert!(s.get(&ns, None, "team").is_err());

    let crds = s
        .registry
        .lookup(CRD_GROUP, "v1", CRD_RESOURCE)
        .cloned()
        .unwrap();
    let crd = json!({"metadata": {"name": "widgets.example.com"}, "spec": {
        "group": "example.com", "scope": "Namespaced",
        "names": {"plural": "widgets", "kind": "Widget"},
        "versions": [{"name": "v1", "served": true, "storage": true}]}});
    let stored = s.create(&crds, None, crd).unwrap();
    assert_eq!(stored["status"]["conditions"][1]["type"], "Established");
    let w = s
        .registry
        .lookup("example.com", "v1", "widgets")
        .cloned()
        .unwrap();
    s.create(
        &w,
        Some("default"),
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
    )
    .unwrap();
    s.delete(&crds, None, "widgets.example.com", &Value::Null)
        .unwrap();
    assert!(s.registry.lookup("example.com", "v1", "widgets").is_none());
    assert!(s.get(&w, Some("default"), "w").is_err());
}
