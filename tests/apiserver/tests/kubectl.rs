//! kubectl 1.33 against the stand-in: `apply -f` (create, update,
//! unchanged), `get -A -o json`, a CRD and an object of it, `get -w
//! --output-watch-events` seeing writes made through the library, errors,
//! and `delete -f`. kubectl was written against the real API server, so
//! whatever it accepts here the server answered faithfully.

mod clients;

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clients::Scratch;
use serde_json::{Value, json};
use waymark_apiserver::{ApiServer, Fault};

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(bin: PathBuf, scratch: &Scratch, server: &ApiServer) -> Self {
        let kubeconfig = scratch.path("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
        Kubectl {
            bin,
            kubeconfig,
            cache: scratch.path("cache"),
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--request-timeout=10s")
            .args(args)
            .kill_on_drop(true)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl; (success, stdout, stderr).
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within 60 s"))
            .expect("running kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs kubectl and returns its stdout; panics with its stderr if it failed.
    async fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args).await;
        assert!(ok, "kubectl {args:?} failed:\n{err}\n{out}");
        out
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all).await).expect("kubectl -o json prints JSON")
    }
}

fn fixture(name: &str) -> String {
    clients::crate_dir()
        .join("fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

async fn setup(test: &str) -> Option<(ApiServer, Kubectl, Scratch)> {
    let bin = clients::kubectl(test)?;
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let scratch = Scratch::new(test);
    let kubectl = Kubectl::new(bin, &scratch, &server);
    Some((server, kubectl, scratch))
}

#[tokio::test]
async fn kubectl_applies_gets_and_deletes() {
    let Some((server, k, scratch)) = setup("kubectl_applies_gets_and_deletes").await else {
        return;
    };
    let core = [
        "01-namespace.yaml",
        "02-pods.yaml",
        "03-service.yaml",
        "04-endpointslice.yaml",
    ]
    .map(fixture);
    let mut args = vec!["apply"];
    for f in &core {
        args.extend(["-f", f.as_str()]);
    }
    let out = k.ok(&args).await;
    for line in [
        "namespace/shop created",
        "pod/web-0 created",
        "pod/db-0 created",
        "service/web created",
        "endpointslice.discovery.k8s.io/web-abc12 created",
    ] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    // A CRD, then (in a second apply, as kubectl needs the type to exist
    // before it can map the object) an object of it.
    let crd = fixture("05-crd-authorizationpolicy.yaml");
    let policy = fixture("06-authorizationpolicy.yaml");
    let out = k.ok(&["apply", "-f", &crd]).await;
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.policy.waymark.dev created"), "{out}");
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/authorizationpolicies.policy.waymark.dev",
        "--timeout=10s",
    ])
    .await;
    let out = k.ok(&["apply", "-f", &policy]).await;
    assert!(
        out.contains("authorizationpolicy.policy.waymark.dev/web-from-shop created"),
        "{out}"
    );

    let pods = k.json(&["get", "pods", "-A"]).await;
    let items = pods["items"].as_array().unwrap();
    let summary: Vec<(String, String, String)> = items
        .iter()
        .map(|p| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            (
                s(&p["metadata"]["namespace"]),
                s(&p["metadata"]["name"]),
                s(&p["spec"]["nodeName"]),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("shop".into(), "db-0".into(), "node-b".into()),
            ("shop".into(), "web-0".into(), "node-a".into())
        ]
    );
    assert_eq!(
        items[1]["metadata"]["labels"],
        json!({"app": "web", "tier": "front"})
    );
    let slices = k.json(&["get", "endpointslices", "-A"]).await;
    assert_eq!(
        slices["items"][0]["endpoints"][0]["addresses"],
        json!(["10.1.0.2"])
    );
    let by_short_name = k.json(&["get", "wmap", "-n", "shop"]).await;
    assert_eq!(by_short_name["items"][0]["spec"]["action"], "ALLOW");
    let stored = server
        .get(
            "policy.waymark.dev/v1alpha1",
            "AuthorizationPolicy",
            Some("shop"),
            "web-from-shop",
        )
        .unwrap();
    assert_eq!(stored["spec"]["from"][0]["namespaces"], json!(["shop"]));
    let described = k.ok(&["describe", "pod", "-n", "shop", "web-0"]).await;
    assert!(
        described.contains("node-a") && described.contains("Events:"),
        "{described}"
    );
    let everything = k.ok(&["get", "all", "-n", "shop"]).await;
    assert!(
        everything.contains("pod/web-0") && everything.contains("service/web"),
        "{everything}"
    );

    // Apply again: one pod changed (a strategic merge patch), one not.
    let changed = scratch.path("pods.yaml");
    let text = std::fs::read_to_string(fixture("02-pods.yaml")).unwrap();
    std::fs::write(&changed, text.replace("web:1.0", "web:2.0")).unwrap();
    let rv_db =
        server.get("v1", "Pod", Some("shop"), "db-0").unwrap()["metadata"]["resourceVersion"]
            .clone();
    let out = k.ok(&["apply", "-f", changed.to_str().unwrap()]).await;
    assert!(
        out.contains("pod/web-0 configured") && out.contains("pod/db-0 unchanged"),
        "{out}"
    );
    let web = server.get("v1", "Pod", Some("shop"), "web-0").unwrap();
    assert_eq!(
        web["spec"]["containers"][0]["image"],
        "registry.example/web:2.0"
    );
    assert_eq!(
        web["spec"]["containers"][0]["ports"][0]["containerPort"],
        8080
    );
    assert_eq!(web["metadata"]["generation"], 2);
    let db = server.get("v1", "Pod", Some("shop"), "db-0").unwrap();
    assert_eq!(
        db["metadata"]["resourceVersion"], rv_db,
        "unchanged means no write"
    );

    // Delete: the policy, its CRD (its kind stops being served), the rest.
    k.ok(&["delete", "-f", &policy]).await;
    k.ok(&["delete", "-f", &crd]).await;
    let (ok, _, err) = k.run(&["get", "authorizationpolicies", "-A"]).await;
    // Fresh discovery says the type is gone; kubectl's cached discovery
    // still maps it and the list gets the server's 404.
    assert!(
        !ok && (err.contains("the server doesn't have a resource type")
            || err.contains("the server could not find the requested resource")),
        "{err}"
    );
    let mut args = vec!["delete"];
    for f in &core {
        args.extend(["-f", f.as_str()]);
    }
    let out = k.ok(&args).await;
    assert!(
        out.contains("namespace \"shop\" deleted") && out.contains("pod \"web-0\" deleted"),
        "{out}"
    );
    assert!(
        server.get("v1", "Namespace", None, "shop").is_err(),
        "kubectl delete waits until it is gone"
    );
    let left = k.json(&["get", "pods,services,endpointslices", "-A"]).await;
    assert_eq!(left["items"], json!([]));
}

/// A kubectl child killed when the test ends, however it ends.
struct Watcher {
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Watcher {
    fn start(k: &Kubectl, args: &[&str]) -> Self {
        let mut child = std::process::Command::new(&k.bin)
            .arg("--kubeconfig")
            .arg(&k.kubeconfig)
            .arg("--cache-dir")
            .arg(&k.cache)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting kubectl get -w");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, events) = mpsc::channel();
        // `-o json` prints one pretty-printed JSON document per event.
        std::thread::spawn(move || {
            for v in
                serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>()
            {
                let Ok(v) = v else { break };
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Watcher { child, events }
    }

    /// The next event as (type, name).
    fn next(&self) -> (String, String) {
        let ev = tokio::task::block_in_place(|| self.events.recv_timeout(Duration::from_secs(20)))
            .expect("kubectl prints the next watch event within 20 s");
        (
            ev["type"].as_str().unwrap_or("").to_string(),
            ev["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
           "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]}})
}

// Multi-threaded: reading kubectl's output blocks a thread while the
// server answers kubectl on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_sees_library_writes() {
    let Some((server, k, _scratch)) = setup("kubectl_watch_sees_library_writes").await else {
        return;
    };
    server.create(pod("a", "web")).unwrap();
    let all = Watcher::start(
        &k,
        &[
            "get",
            "pods",
            "-n",
            "default",
            "-w",
            "--output-watch-events",
            "-o",
            "json",
        ],
    );
    let web = Watcher::start(
        &k,
        &[
            "get",
            "pods",
            "-A",
            "-l",
            "app=web",
            "-w",
            "--output-watch-events",
            "-o",
            "json",
        ],
    );
    let ev = |t: &str, n: &str| (t.to_string(), n.to_string());
    assert_eq!(all.next(), ev("ADDED", "a"));
    assert_eq!(web.next(), ev("ADDED", "a"));
    // Writes only after both watches have listed.
    server.create(pod("b", "web")).unwrap();
    let mut a = pod("a", "web");
    a["metadata"]["labels"]["tier"] = "front".into();
    server.apply(a).unwrap();
    server.apply(pod("b", "db")).unwrap();
    server.delete("v1", "Pod", Some("default"), "a").unwrap();
    let seen: Vec<_> = (0..4).map(|_| all.next()).collect();
    assert_eq!(
        seen,
        [
            ev("ADDED", "b"),
            ev("MODIFIED", "a"),
            ev("MODIFIED", "b"),
            ev("DELETED", "a")
        ]
    );
    // Relabelled away from app=web, b leaves the selector's view.
    let seen: Vec<_> = (0..4).map(|_| web.next()).collect();
    assert_eq!(
        seen,
        [
            ev("ADDED", "b"),
            ev("MODIFIED", "a"),
            ev("DELETED", "b"),
            ev("DELETED", "a")
        ]
    );
}

#[tokio::test]
async fn kubectl_reports_forbidden_and_server_errors() {
    let Some((server, k, _scratch)) = setup("kubectl_reports_forbidden_and_server_errors").await
    else {
        return;
    };
    server.fail(Some("pods"), Fault::Forbidden);
    let (ok, _, err) = k.run(&["get", "pods"]).await;
    assert!(!ok, "a 403 fails the command");
    assert!(
        err.contains("Error from server (Forbidden)")
            && err.contains("cannot list resource \"pods\""),
        "{err}"
    );
    // kubectl sends access reviews as protobuf, which is not served.
    let (ok, _, err) = k.run(&["auth", "can-i", "list", "pods"]).await;
    assert!(!ok && err.contains("UnsupportedMediaType"), "{err}");
    server.fail(None, Fault::InternalError);
    let (ok, _, err) = k.run(&["get", "services"]).await;
    assert!(
        !ok && err.contains("Error from server (InternalError)"),
        "{err}"
    );
    server.clear_faults();
    k.ok(&["get", "pods"]).await;
    // Invalid input through kubectl gets the server's validation answer.
    let bad = clients::crate_dir().join("fixtures/01-namespace.yaml");
    let text = std::fs::read_to_string(&bad)
        .unwrap()
        .replace("name: shop", "name: Not_Valid");
    let scratch = Scratch::new("kubectl_reports_forbidden_and_server_errors-bad");
    let path: &Path = &scratch.path("bad.yaml");
    std::fs::write(path, text).unwrap();
    let (ok, _, err) = k.run(&["apply", "-f", path.to_str().unwrap()]).await;
    assert!(!ok && err.contains("is invalid"), "{err}");
}

#[tokio::test]
async fn kubectl_applies_the_deploy_manifest_and_patches() {
    let Some((server, k, _scratch)) =
        setup("kubectl_applies_the_deploy_manifest_and_patches").await
    else {
        return;
    };
    let manifest = clients::crate_dir().join("../../deploy/daemonset.yaml");
    let manifest = manifest.to_str().unwrap();
    let out = k.ok(&["apply", "-f", manifest]).await;
    // Rendered from the Helm chart in install order: the namespace first.
    for created in [
        "namespace/waymark-system created",
        "serviceaccount/waymark created",
        "configmap/waymark-config created",
        "daemonset.apps/waymark created",
    ] {
        assert!(out.contains(created), "{created}: {out}");
    }
    assert!(
        out.contains("clusterrole.rbac.authorization.k8s.io/waymark created"),
        "{out}"
    );
    let out = k.ok(&["apply", "-f", manifest]).await;
    assert!(out.contains("daemonset.apps/waymark unchanged"), "{out}");
    // The shipped CRD, and a policy of it.
    let crd = clients::crate_dir().join("../../deploy/authorizationpolicy-crd.yaml");
    let out = k.ok(&["apply", "-f", crd.to_str().unwrap()]).await;
    assert!(
        out.contains("authorizationpolicies.policy.waymark.dev created"),
        "{out}"
    );
    k.ok(&["apply", "-f", &fixture("01-namespace.yaml")]).await;
    let out = k
        .ok(&["apply", "-f", &fixture("06-authorizationpolicy.yaml")])
        .await;
    assert!(
        out.contains("authorizationpolicy.policy.waymark.dev/web-from-shop created"),
        "{out}"
    );
    let ds = k.json(&["get", "ds", "-A"]).await;
    assert_eq!(ds["items"][0]["metadata"]["namespace"], "waymark-system");
    // Server-side apply (kubectl sends the object as JSON).
    let ns = fixture("01-namespace.yaml");
    let out = k.ok(&["apply", "--server-side", "-f", &ns]).await;
    assert!(out.contains("namespace/shop serverside-applied"), "{out}");
    // JSON patch and merge patch.
    k.ok(&[
        "patch",
        "ns",
        "shop",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels/team","value":"a"}]"#,
    ])
    .await;
    k.ok(&[
        "patch",
        "ns",
        "shop",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"labels":{"waymark.dev/mesh":null}}}"#,
    ])
    .await;
    let shop = server.get("v1", "Namespace", None, "shop").unwrap();
    assert_eq!(shop["metadata"]["labels"], json!({"team": "a"}));
    let (ok, _, err) = k
        .run(&[
            "patch",
            "ns",
            "shop",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/metadata/name","value":"x"}]"#,
        ])
        .await;
    assert!(!ok && err.contains("test failed"), "{err}");
    let out = k.ok(&["delete", "-f", manifest]).await;
    assert!(out.contains("daemonset.apps \"waymark\" deleted"), "{out}");
}

/// Older kubectl versions from the same package: apply, re-apply, read and
/// delete work from 1.29 on; 1.27 and 1.28 ask for field-validation support
/// through the protobuf `/openapi/v2`, which is not served, so they need
/// `--validate=false`.
#[tokio::test]
async fn older_kubectl_versions_apply_and_delete() {
    let test = "older_kubectl_versions_apply_and_delete";
    if clients::kubectl(test).is_none() {
        return;
    }
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    let pods = fixture("02-pods.yaml");
    let scratch = Scratch::new(test);
    let changed = scratch.path("pods.yaml");
    let text = std::fs::read_to_string(&pods).unwrap();
    std::fs::write(&changed, text.replace("web:1.0", "web:2.0")).unwrap();
    let changed = changed.to_str().unwrap();
    let versions = clients::kubectl_versions();
    assert!(versions.iter().any(|(m, _)| *m == 33), "{versions:?}");
    for (minor, bin) in versions {
        let k = Kubectl {
            bin,
            kubeconfig: scratch.path("kubeconfig"),
            cache: scratch.path(&format!("cache-{minor}")),
        };
        std::fs::write(&k.kubeconfig, server.kubeconfig()).unwrap();
        let validate = if minor <= 28 {
            "--validate=false"
        } else {
            "--validate=true"
        };
        let out = k.ok(&["apply", validate, "-f", &pods]).await;
        assert!(out.contains("pod/web-0 created"), "1.{minor}: {out}");
        let out = k.ok(&["apply", validate, "-f", changed]).await;
        assert!(
            out.contains("pod/web-0 configured") && out.contains("pod/db-0 unchanged"),
            "1.{minor}: {out}"
        );
        let images = k
            .ok(&[
                "get",
                "pods",
                "-n",
                "shop",
                "-o",
                "jsonpath={.items[*].spec.containers[0].image}",
            ])
            .await;
        assert_eq!(
            images, "registry.example/db:1.0 registry.example/web:2.0",
            "1.{minor}"
        );
        let out = k.ok(&["delete", "-f", &pods]).await;
        assert!(out.contains("pod \"db-0\" deleted"), "1.{minor}: {out}");
    }
}

/// The binary, as someone uses it by hand: it prints a kubeconfig for the
/// address it bound, and kubectl works with it.
#[tokio::test]
async fn the_binary_prints_a_working_kubeconfig() {
    let test = "the_binary_prints_a_working_kubeconfig";
    let Some(bin) = clients::kubectl(test) else {
        return;
    };
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_waymark-apiserver"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting waymark-apiserver");
    let mut stdout = server.stdout.take().unwrap();
    let mut kubeconfig = String::new();
    let mut buf = [0u8; 4096];
    // The kubeconfig ends with the user entry.
    while !kubeconfig.contains("user: {}") {
        use tokio::io::AsyncReadExt as _;
        let n = tokio::time::timeout(Duration::from_secs(20), stdout.read(&mut buf))
            .await
            .expect("the kubeconfig within 20 s")
            .unwrap();
        assert!(n > 0, "the server exited: {kubeconfig}");
        kubeconfig.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        !kubeconfig.contains(":0\n"),
        "the bound port, not 0: {kubeconfig}"
    );
    let scratch = Scratch::new(test);
    let k = Kubectl {
        bin,
        kubeconfig: scratch.path("kubeconfig"),
        cache: scratch.path("cache"),
    };
    std::fs::write(&k.kubeconfig, kubeconfig).unwrap();
    let out = k.ok(&["get", "namespaces", "-o", "name"]).await;
    assert!(out.contains("namespace/default"), "{out}");
}
