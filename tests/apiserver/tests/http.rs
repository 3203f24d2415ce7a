//! The server's raw HTTP answers, checked against what the real API server
//! sends: discovery documents, Status errors for bad input, pagination and
//! selectors, and the watch protocol (replay, bookmarks, timeouts, 410,
//! selector transitions, dropped watches, a restart).

mod clients;

use std::time::Duration;

use clients::{WatchStream, call};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use waymark_apiserver::{ApiServer, Fault};

const WAIT: Duration = Duration::from_secs(5);

async fn server() -> ApiServer {
    ApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn pod(name: &str, labels: Value, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
           "status": {"phase": "Running", "podIP": "10.1.0.2"}})
}

#[tokio::test]
async fn discovery_documents() {
    let s = server().await;
    let (code, v) = call(s.addr(), Method::GET, "/version", None).await;
    assert_eq!((code, v["minor"].as_str()), (StatusCode::OK, Some("33")));
    let (_, v) = call(s.addr(), Method::GET, "/api", None).await;
    assert_eq!(
        (v["kind"].as_str(), &v["versions"]),
        (Some("APIVersions"), &json!(["v1"]))
    );
    let (_, v) = call(s.addr(), Method::GET, "/apis", None).await;
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    for g in [
        "discovery.k8s.io",
        "apiextensions.k8s.io",
        "apps",
        "rbac.authorization.k8s.io",
    ] {
        assert!(groups.contains(&g), "{g} in {groups:?}");
    }
    let (_, v) = call(s.addr(), Method::GET, "/apis/discovery.k8s.io/v1", None).await;
    assert_eq!(v["kind"], "APIResourceList");
    assert_eq!(v["resources"][0]["name"], "endpointslices");
    assert_eq!(v["resources"][0]["namespaced"], true);
    let (code, v) = call(
        s.addr(),
        Method::GET,
        "/apis/gateway.networking.k8s.io/v1",
        None,
    )
    .await;
    assert_eq!(
        (code, v["kind"].as_str()),
        (StatusCode::NOT_FOUND, Some("Status"))
    );
}

#[tokio::test]
async fn bad_input_gets_status_errors() {
    let s = server().await;
    let a = s.addr();
    let json = Some(("application/json", "{not json"));
    // (method, path, body, code, reason)
    type Case<'a> = (Method, &'a str, Option<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/api/v1/namespaces/default/pods",
            json,
            400,
            "BadRequest",
        ),
        (Method::GET, "/api/v1/widgets", None, 404, "NotFound"),
        (
            Method::GET,
            "/apis/nope.example/v1/things",
            None,
            404,
            "NotFound",
        ),
        (
            Method::GET,
            "/api/v1/namespaces/default/pods/missing",
            None,
            404,
            "NotFound",
        ),
        (
            Method::GET,
            "/api/v1/pods?labelSelector=app%20in%20web",
            None,
            400,
            "BadRequest",
        ),
        (
            Method::GET,
            "/api/v1/services?fieldSelector=spec.nodeName%3Da",
            None,
            400,
            "BadRequest",
        ),
        (
            Method::GET,
            "/api/v1/pods?limit=1&continue=garbage",
            None,
            400,
            "BadRequest",
        ),
        (
            Method::GET,
            "/api/v1/pods?watch=1&resourceVersion=abc",
            None,
            400,
            "BadRequest",
        ),
        (
            Method::POST,
            "/api/v1/namespaces/nope/pods",
            Some((
                "application/json",
                r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}"#,
            )),
            404,
            "NotFound",
        ),
        (
            Method::POST,
            "/api/v1/namespaces/default/pods",
            Some((
                "application/json",
                r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"x"}}"#,
            )),
            400,
            "BadRequest",
        ),
    ];
    for (method, path, body, code, reason) in cases {
        let (got, v) = call(a, method.clone(), path, body).await;
        assert_eq!(got.as_u16(), code, "{method} {path}: {v}");
        assert_eq!(
            (
                v["kind"].as_str(),
                v["status"].as_str(),
                v["reason"].as_str()
            ),
            (Some("Status"), Some("Failure"), Some(reason)),
            "{path}"
        );
        assert_eq!(v["code"], code);
    }
    let created = s.create(pod("a", json!({}), "n1")).unwrap();
    let body = created.to_string();
    let (code, v) = call(
        a,
        Method::POST,
        "/api/v1/namespaces/default/pods",
        Some(("application/json", &body)),
    )
    .await;
    assert_eq!(
        (code.as_u16(), v["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
    assert_eq!(v["message"], "pods \"a\" already exists");
    let mut stale = created.clone();
    stale["metadata"]["resourceVersion"] = "1".into();
    let (code, v) = call(
        a,
        Method::PUT,
        "/api/v1/namespaces/default/pods/a",
        Some(("application/json", &stale.to_string())),
    )
    .await;
    assert_eq!(
        (code.as_u16(), v["reason"].as_str()),
        (409, Some("Conflict"))
    );
    let (code, v) = call(
        a,
        Method::PATCH,
        "/api/v1/namespaces/default/pods/a",
        Some(("application/x-yaml", "[]")),
    )
    .await;
    assert_eq!(
        (code.as_u16(), v["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    // Bodies of the wrong shape: a Status, never a dropped connection.
    let odd: [(Method, &str, &str, &str, u16); 5] = [
        (
            Method::PUT,
            "/api/v1/namespaces/default/pods/a/status",
            "application/json",
            "[1]",
            400,
        ),
        (
            Method::PUT,
            "/api/v1/namespaces/default/pods/a/status",
            "application/json",
            r#"{"metadata":"x"}"#,
            400,
        ),
        (
            Method::PATCH,
            "/api/v1/namespaces/default/pods/a",
            "application/merge-patch+json",
            "[1]",
            400,
        ),
        (
            Method::PATCH,
            "/api/v1/namespaces/default/pods/a",
            "application/json-patch+json",
            r#"{"op":"add"}"#,
            422,
        ),
        (
            Method::DELETE,
            "/api/v1/namespaces/default/pods/a",
            "application/json",
            "{",
            400,
        ),
    ];
    for (method, path, content_type, body, want) in odd {
        let (code, v) = call(a, method.clone(), path, Some((content_type, body))).await;
        assert_eq!(
            (code.as_u16(), v["kind"].as_str()),
            (want, Some("Status")),
            "{method} {path} {body}: {v}"
        );
    }
    let mut w = WatchStream::open(
        a,
        "/api/v1/pods?watch=1&timeoutSeconds=18446744073709551615",
    )
    .await;
    assert_eq!(
        w.next(WAIT).await.unwrap()["type"],
        "ADDED",
        "a huge timeout is no timeout"
    );
}

#[tokio::test]
async fn writes_over_http() {
    let s = server().await;
    let a = s.addr();
    let body = pod("w", json!({"app": "web"}), "n1").to_string();
    let (code, v) = call(
        a,
        Method::POST,
        "/api/v1/namespaces/default/pods",
        Some(("application/json", &body)),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED);
    let rv: u64 = v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let patch = r#"{"metadata":{"labels":{"app":null,"tier":"front"}}}"#;
    let (code, v) = call(
        a,
        Method::PATCH,
        "/api/v1/namespaces/default/pods/w",
        Some(("application/merge-patch+json", patch)),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["metadata"]["labels"], json!({"tier": "front"}));
    assert!(
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > rv
    );
    let status = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"w","namespace":"default"},"status":{"phase":"Succeeded"}}"#;
    let (code, v) = call(
        a,
        Method::PUT,
        "/api/v1/namespaces/default/pods/w/status",
        Some(("application/json", status)),
    )
    .await;
    assert_eq!(
        (code, v["status"]["phase"].as_str()),
        (StatusCode::OK, Some("Succeeded"))
    );
    assert_eq!(v["spec"]["nodeName"], "n1", "a status write keeps the spec");
    let (code, v) = call(a, Method::DELETE, "/api/v1/namespaces/default/pods/w", None).await;
    assert_eq!(
        (code, v["metadata"]["name"].as_str()),
        (StatusCode::OK, Some("w"))
    );
    let (code, _) = call(a, Method::GET, "/api/v1/namespaces/default/pods/w", None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn lists_with_selectors_and_pages() {
    let s = server().await;
    for i in 0..5 {
        let node = if i % 2 == 0 { "node-a" } else { "node-b" };
        s.create(pod(
            &format!("p{i}"),
            json!({"app": if i < 3 { "web" } else { "db" }}),
            node,
        ))
        .unwrap();
    }
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let a = s.addr();
    let (_, v) = call(
        a,
        Method::GET,
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a",
        None,
    )
    .await;
    assert_eq!(names(&v), ["p0", "p2", "p4"]);
    assert_eq!(v["kind"], "PodList");
    assert!(
        v["items"][0].get("kind").is_none(),
        "typed list items carry no kind"
    );
    let (_, v) = call(
        a,
        Method::GET,
        "/api/v1/namespaces/default/pods?labelSelector=app%20in%20(db),app!%3Dweb",
        None,
    )
    .await;
    assert_eq!(names(&v), ["p3", "p4"]);
    let mut all = Vec::new();
    let mut path = "/api/v1/namespaces/default/pods?limit=2".to_string();
    let mut rv = None;
    loop {
        let (_, v) = call(a, Method::GET, &path, None).await;
        all.extend(names(&v));
        let page_rv = v["metadata"]["resourceVersion"].clone();
        assert_eq!(rv.get_or_insert(page_rv.clone()), &page_rv);
        match v["metadata"]["continue"].as_str() {
            Some(c) => path = format!("/api/v1/namespaces/default/pods?limit=2&continue={c}"),
            None => break,
        }
        s.create(pod(&format!("late{}", all.len()), json!({}), "node-a"))
            .unwrap();
    }
    assert_eq!(all, ["p0", "p1", "p2", "p3", "p4"]);
}

#[tokio::test]
async fn watch_replays_then_streams_with_bookmarks_until_the_timeout() {
    let s = server().await;
    s.set_bookmark_interval(Duration::from_millis(200));
    let from = s.resource_version();
    s.create(pod("a", json!({}), "n1")).unwrap();
    let path = format!(
        "/api/v1/namespaces/default/pods?watch=true&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds=2"
    );
    let started = std::time::Instant::now();
    let mut w = WatchStream::open(s.addr(), &path).await;
    assert_eq!(w.status, StatusCode::OK);
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("a"))
    );
    assert_eq!(ev["object"]["kind"], "Pod");
    s.apply(pod("a", json!({"x": "y"}), "n1")).unwrap();
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(ev["type"], "MODIFIED");
    let bookmark = w.next(WAIT).await.unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    // Only apiVersion, kind and the resourceVersion reached.
    let rv = s.resource_version().to_string();
    assert_eq!(
        bookmark["object"],
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}})
    );
    while let Some(ev) = w.next(WAIT).await {
        assert_eq!(ev["type"], "BOOKMARK");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

#[tokio::test]
async fn watch_from_zero_sends_current_state_and_selectors_turn_into_deletes() {
    let s = server().await;
    s.create(pod("a", json!({"app": "web"}), "n1")).unwrap();
    s.create(pod("b", json!({"app": "db"}), "n1")).unwrap();
    let mut w = WatchStream::open(
        s.addr(),
        "/api/v1/pods?watch=1&resourceVersion=0&labelSelector=app%3Dweb",
    )
    .await;
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("a"))
    );
    s.apply(pod("a", json!({"app": "gone"}), "n1")).unwrap();
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(
        ev["type"], "DELETED",
        "an object that stops matching is deleted for this watcher"
    );
    assert_eq!(
        ev["object"]["metadata"]["labels"]["app"], "web",
        "with its last matching state"
    );
    assert_eq!(
        ev["object"]["metadata"]["resourceVersion"],
        s.resource_version().to_string()
    );
    s.apply(pod("b", json!({"app": "web"}), "n1")).unwrap();
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
}

#[tokio::test]
async fn watch_one_object_by_its_path() {
    let s = server().await;
    s.create(pod("a", json!({}), "n1")).unwrap();
    s.create(pod("b", json!({}), "n1")).unwrap();
    for path in [
        "/api/v1/namespaces/default/pods/b?watch=1&resourceVersion=0",
        "/api/v1/watch/namespaces/default/pods/b?resourceVersion=0",
    ] {
        let mut w = WatchStream::open(s.addr(), path).await;
        let ev = w.next(WAIT).await.unwrap();
        assert_eq!(ev["object"]["metadata"]["name"], "b", "{path}");
        s.apply(pod("a", json!({"x": "1"}), "n1")).unwrap();
        s.apply(pod("b", json!({"x": "1"}), "n1")).unwrap();
        let ev = w.next(WAIT).await.unwrap();
        assert_eq!(
            (
                ev["type"].as_str(),
                ev["object"]["metadata"]["name"].as_str()
            ),
            (Some("MODIFIED"), Some("b")),
            "{path}"
        );
        s.apply(pod("b", json!({}), "n1")).unwrap();
        s.apply(pod("a", json!({}), "n1")).unwrap();
    }
}

#[tokio::test]
async fn send_initial_events_ends_with_a_marked_bookmark() {
    let s = server().await;
    s.create(pod("a", json!({}), "n1")).unwrap();
    let path = "/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true";
    let mut w = WatchStream::open(s.addr(), path).await;
    assert_eq!(w.next(WAIT).await.unwrap()["type"], "ADDED");
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(
        ev["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_an_error_event_410() {
    let s = server().await;
    let from = s.resource_version();
    s.create(pod("a", json!({}), "n1")).unwrap();
    s.compact();
    let mut w = WatchStream::open(
        s.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={from}"),
    )
    .await;
    assert_eq!(
        w.status,
        StatusCode::OK,
        "the watch cache answers 200 and an ERROR event"
    );
    let ev = w.next(WAIT).await.unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(
        (
            ev["object"]["kind"].as_str(),
            ev["object"]["code"].as_u64(),
            ev["object"]["reason"].as_str()
        ),
        (Some("Status"), Some(410), Some("Expired"))
    );
    assert!(
        w.next(WAIT).await.is_none(),
        "the stream ends after the error"
    );
    let (code, v) = call(
        s.addr(),
        Method::GET,
        &format!("/api/v1/pods?resourceVersion={from}&resourceVersionMatch=Exact"),
        None,
    )
    .await;
    assert_eq!(
        (code.as_u16(), v["reason"].as_str()),
        (410, Some("Expired"))
    );
}

#[tokio::test]
async fn faults_dropped_watches_and_a_restart() {
    let mut s = server().await;
    s.fail(Some("pods"), Fault::Forbidden);
    let (code, v) = call(s.addr(), Method::GET, "/api/v1/pods", None).await;
    assert_eq!(
        (code.as_u16(), v["reason"].as_str()),
        (403, Some("Forbidden"))
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cannot list resource \"pods\""),
        "{v}"
    );
    let (code, _) = call(s.addr(), Method::GET, "/api/v1/services", None).await;
    assert_eq!(code, StatusCode::OK, "other resources still answer");
    s.fail(None, Fault::InternalError);
    let (code, v) = call(s.addr(), Method::GET, "/api/v1/services", None).await;
    assert_eq!(
        (code.as_u16(), v["reason"].as_str()),
        (500, Some("InternalError"))
    );
    let (code, _) = call(s.addr(), Method::GET, "/api/v1", None).await;
    assert_eq!(code, StatusCode::OK, "discovery is not failed");
    s.clear_faults();

    // Access reviews (JSON) answer as RBAC would, and are never forbidden
    // themselves.
    s.fail(Some("pods"), Fault::Forbidden);
    let review = |resource: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
               "spec": {"resourceAttributes": {"verb": "watch", "resource": resource}}})
        .to_string()
    };
    let ssar = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
    for (resource, allowed) in [("pods", false), ("services", true)] {
        let body = review(resource);
        let (code, v) = call(
            s.addr(),
            Method::POST,
            ssar,
            Some(("application/json", &body)),
        )
        .await;
        assert_eq!(
            (code, v["status"]["allowed"].as_bool()),
            (StatusCode::CREATED, Some(allowed)),
            "{v}"
        );
        assert_eq!(v["spec"]["resourceAttributes"]["resource"], resource);
    }
    let (code, _) = call(
        s.addr(),
        Method::POST,
        ssar,
        Some(("application/vnd.kubernetes.protobuf", "k8s\0")),
    )
    .await;
    assert_eq!(code.as_u16(), 415);
    let (code, _) = call(s.addr(), Method::GET, ssar, None).await;
    assert_eq!(code.as_u16(), 405);
    s.clear_faults();

    let mut w = WatchStream::open(s.addr(), "/api/v1/pods?watch=1").await;
    s.drop_watches();
    assert!(w.next(WAIT).await.is_none(), "a dropped watch ends cleanly");

    s.create(pod("kept", json!({}), "n1")).unwrap();
    let before = s.resource_version();
    let mut w = WatchStream::open(
        s.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={before}"),
    )
    .await;
    s.stop().await;
    assert!(
        tokio::net::TcpStream::connect(s.addr()).await.is_err(),
        "stopped means refused"
    );
    assert!(
        w.next(WAIT).await.is_none(),
        "the open watch ends when the server stops"
    );
    s.restart().await.unwrap();
    let (code, v) = call(
        s.addr(),
        Method::GET,
        "/api/v1/namespaces/default/pods/kept",
        None,
    )
    .await;
    assert_eq!(
        (code, v["metadata"]["resourceVersion"].as_str()),
        (StatusCode::OK, Some(before.to_string().as_str()))
    );
    let mut w = WatchStream::open(
        s.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={}", before - 1),
    )
    .await;
    assert_eq!(
        w.next(WAIT).await.unwrap()["object"]["code"],
        410,
        "a restart starts a new watch cache"
    );
}

/// A listener made by the caller (as a test makes one inside a network
/// namespace) serves, and is made again on restart.
#[tokio::test]
async fn start_with_a_callers_listener_and_restart_it() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let binds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = binds.clone();
    let mut s = ApiServer::start_with(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::net::TcpListener::bind(addr)
    })
    .await
    .unwrap();
    assert_eq!(s.addr(), addr);
    let (code, _) = call(addr, Method::GET, "/api", None).await;
    assert_eq!(code, StatusCode::OK);
    s.restart().await.unwrap();
    let (code, _) = call(addr, Method::GET, "/api", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(binds.load(std::sync::atomic::Ordering::SeqCst), 2);
}
