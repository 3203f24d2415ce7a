//! The Python `kubernetes` client (from PyPI, in the venv `cargo xtask
//! setup` makes) against the stand-in: `watch.Watch().stream` receives the
//! library's writes as typed events, a 410 after a forced compaction makes
//! it retry once and then raise, and its list/create/patch/delete calls with
//! selectors and pages get what they expect. Also: `kubernetes-validate`
//! over every fixture and manifest.

mod clients;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use waymark_apiserver::ApiServer;

fn script(name: &str) -> PathBuf {
    clients::crate_dir().join("tests/python").join(name)
}

fn command(python: &PathBuf, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a script to its end and parses the last line of its output.
async fn run_json(python: &PathBuf, args: &[&str]) -> Value {
    let out = tokio::time::timeout(Duration::from_secs(60), command(python, args).output())
        .await
        .unwrap_or_else(|_| panic!("python {args:?} did not finish within 60 s"))
        .expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

async fn start() -> ApiServer {
    ApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn pod(name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
           "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]}})
}

#[tokio::test]
async fn python_watch_stream_receives_library_writes() {
    let Some(python) = clients::python("python_watch_stream_receives_library_writes") else {
        return;
    };
    let server = start().await;
    server.create(pod("before", "web")).unwrap();
    let s = script("kube_client.py");
    let mut child = command(
        &python,
        &[s.to_str().unwrap(), "watch", &server.url(), "default"],
    )
    .spawn()
    .expect("starting python");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the script lists within 30 s")
        .unwrap()
        .unwrap_or_default();
    assert!(first.starts_with("WATCHING "), "{first}");
    server.create(pod("p", "web")).unwrap();
    server.apply(pod("p", "db")).unwrap();
    server.delete("v1", "Pod", Some("default"), "p").unwrap();
    let last = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the script sees the delete within 30 s")
        .unwrap()
        .unwrap_or_default();
    let result: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(
        result["events"],
        json!([
            ["ADDED", "p", {"app": "web"}],
            ["MODIFIED", "p", {"app": "db"}],
            ["DELETED", "p", {"app": "db"}],
        ])
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "{status:?}");
}

#[tokio::test]
async fn python_watch_gets_410_after_compaction_and_retries_once() {
    let Some(python) = clients::python("python_watch_gets_410_after_compaction_and_retries_once")
    else {
        return;
    };
    let server = start().await;
    let old = server.resource_version().to_string();
    server.create(pod("p", "web")).unwrap();
    server.compact();
    let s = script("kube_client.py");
    let s = s.to_str().unwrap();
    let url = server.url();

    // Without timeout_seconds the client resumes once from the same
    // version, gets 410 again, and raises ApiException(410).
    let before = server.watches_started();
    let out = run_json(&python, &[s, "gone", &url, "default", &old]).await;
    assert_eq!(out["status"], 410, "{out}");
    assert!(
        out["reason"]
            .as_str()
            .unwrap()
            .starts_with("Expired: too old resource version"),
        "{out}"
    );
    assert_eq!(
        server.watches_started() - before,
        2,
        "one watch and one retry"
    );

    // With timeout_seconds it does not retry.
    let before = server.watches_started();
    let out = run_json(&python, &[s, "gone", &url, "default", &old, "--timeout"]).await;
    assert_eq!(out["status"], 410, "{out}");
    assert_eq!(server.watches_started() - before, 1, "no retry");
}

#[tokio::test]
async fn python_client_creates_lists_pages_patches_and_deletes() {
    let Some(python) = clients::python("python_client_creates_lists_pages_patches_and_deletes")
    else {
        return;
    };
    let server = start().await;
    server.fail(Some("secrets"), waymark_apiserver::Fault::Forbidden);
    let s = script("kube_client.py");
    let out = run_json(
        &python,
        &[s.to_str().unwrap(), "crud", &server.url(), "default"],
    )
    .await;
    // Access reviews answer as the (injected) RBAC denial would.
    assert_eq!(out["may_watch"], json!({"pods": true, "secrets": false}));
    assert_eq!(out["duplicate"], json!([409, "AlreadyExists"]));
    assert_eq!(out["web"], json!(["py0", "py1"]));
    assert_eq!(out["not_web"], json!(["py2"]));
    assert_eq!(out["on_a"], json!(["py0", "py2"]));
    assert_eq!(out["pages"], json!([["py0", "py1"], ["py2"]]));
    assert_eq!(out["patched"], json!({"app": "db"}));
    assert_eq!(out["deleted"], json!([404, "pods \"py1\" not found"]));
    assert_eq!(out["after_delete_collection"], json!(["py0"]));
}

#[tokio::test]
async fn python_client_creates_a_crd_and_watches_its_objects() {
    let Some(python) = clients::python("python_client_creates_a_crd_and_watches_its_objects")
    else {
        return;
    };
    let server = start().await;
    let s = script("kube_client.py");
    let fixtures = clients::crate_dir().join("fixtures");
    let crd = fixtures.join("05-crd-authorizationpolicy.yaml");
    let policy = fixtures.join("06-authorizationpolicy.yaml");
    server
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    let out = run_json(
        &python,
        &[
            s.to_str().unwrap(),
            "crd",
            &server.url(),
            "shop",
            crd.to_str().unwrap(),
            policy.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out["created_uid"], true);
    assert_eq!(out["list_kind"], "AuthorizationPolicyList");
    assert_eq!(
        out["items"],
        json!([[
            "policy.waymark.dev/v1alpha1",
            "AuthorizationPolicy",
            "web-from-shop"
        ]])
    );
    assert_eq!(out["events"], json!([["ADDED", "web-from-shop"]]));
}

#[tokio::test]
async fn fixtures_and_manifests_validate_against_kubernetes_1_33() {
    let Some(python) = clients::python("fixtures_and_manifests_validate_against_kubernetes_1_33")
    else {
        return;
    };
    let fixtures = clients::crate_dir().join("fixtures");
    let deploy = clients::crate_dir().join("../../deploy");
    let s = script("validate_fixtures.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        command(
            &python,
            &[
                s.to_str().unwrap(),
                "1.33.0",
                fixtures.to_str().unwrap(),
                deploy.to_str().unwrap(),
            ],
        )
        .output(),
    )
    .await
    .expect("validation finishes within 120 s")
    .expect("running kubernetes-validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checked = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    let fixture_files = std::fs::read_dir(&fixtures).unwrap().count();
    assert!(
        checked >= fixture_files,
        "every fixture file was checked: {stdout}"
    );
}
