//! Agents that know the cluster only from the API server: no `[[pods]]`,
//! `[[services]]` or `[[nodes]]` in their config. The stand-in API server
//! (`tests/apiserver`) runs in node 0's network namespace; the test writes
//! namespaces, nodes, pods (each with a sandbox process in a `pod<uid>`
//! cgroup, as the kubelet makes them), a Service and its EndpointSlice, and
//! the agents discover the rest: which pods to enroll and where their
//! network namespaces are, the service's endpoints, the other node's
//! tunnel, and the workload table for pods dialled by address.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use waymark_apiserver::ApiServer;
use waymark_tests::fixtures::meshed_pair;
use waymark_tests::support::capture::{Capture, contains};
use waymark_tests::world::agent::TRUST_DOMAIN;
use waymark_tests::{
    DEFAULT_PATIENCE, Pod, Server, World, curl, eventually, http_app, metric, python,
    require_agent_or_skip, waymark, with_world, world_name,
};

const VIP: &str = "10.96.0.20";
const APP_PORT: u16 = 8080;
const API_PORT: u16 = 6443;

/// The test application answering `<name> <path>`; `/slow/<ms>` answers
/// that much later (a request in flight).
fn app(pod: &Pod, name: &str) -> Result<Server> {
    http_app(pod, APP_PORT, name, &[])
}

/// Who answered: the first word of the test application's body.
fn who(body: &str) -> String {
    body.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The stand-in API server, listening on node 0's fabric address inside
/// node 0's network namespace (both agents reach it there).
struct Cluster {
    api: ApiServer,
    // Declared last: the server's tasks stop before the runtime goes.
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(world: &World) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let netns = world.node(0).netns_path();
        let addr = std::net::SocketAddr::new(world.node(0).fabric_ip().into(), API_PORT);
        let api = rt.block_on(ApiServer::start_with(move || {
            waymark_tests::world::net::in_netns(&netns, || std::net::TcpListener::bind(addr))
                .map_err(std::io::Error::other)?
        }))?;
        Ok(Self { api, rt })
    }

    fn create(&self, obj: Value) -> Result<Value> {
        self.api
            .create(obj.clone())
            .map_err(|e| anyhow::anyhow!("creating {obj}: {e:?}"))
    }

    fn apply(&self, obj: Value) -> Result<Value> {
        self.api
            .apply(obj.clone())
            .map_err(|e| anyhow::anyhow!("applying {obj}: {e:?}"))
    }

    /// A pod on `pod`'s node with its address, and its sandbox started in
    /// a cgroup named after the UID the server gave it.
    fn pod(&self, pod: &Pod, ns: &str, name: &str, sa: &str, annotations: Value) -> Result<()> {
        let created = self.create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                         "labels": {"app": sa}},
            "spec": {
                "nodeName": format!("node{}", pod.node_index()),
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "app"}]
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip().to_string(),
                "podIPs": [{"ip": pod.ip().to_string()}]
            }
        }))?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("the server gave the pod no uid")?;
        pod.start_sandbox(uid)?;
        Ok(())
    }

    fn slice(&self, endpoints: &[(&Pod, &str)]) -> Result<()> {
        self.slice_of("web", endpoints)
    }

    /// Installs the CRDs of the Gateway API route kinds and of waymark's
    /// AuthorizationPolicy (only what the stand-in needs to serve them).
    fn crds(&self) -> Result<()> {
        for (group, version, kind, plural) in [
            ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
            ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
            (
                "policy.waymark.dev",
                "v1alpha1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            ),
        ] {
            self.create(json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.{group}")},
                "spec": {
                    "group": group,
                    "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                              "listKind": format!("{kind}List")},
                    "versions": [{"name": version, "served": true, "storage": true,
                        "schema": {"openAPIV3Schema": {"type": "object",
                            "x-kubernetes-preserve-unknown-fields": true}}}]
                }
            }))?;
        }
        Ok(())
    }

    /// The EndpointSlice of Service `service` in `shop`: these pods.
    fn slice_of(&self, service: &str, endpoints: &[(&Pod, &str)]) -> Result<()> {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(pod, name)| {
                json!({
                    "addresses": [pod.ip().to_string()],
                    "conditions": {"ready": true},
                    "nodeName": format!("node{}", pod.node_index()),
                    "zone": format!("zone-{}", pod.node_index()),
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": name}
                })
            })
            .collect();
        self.apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-abc"), "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": APP_PORT, "protocol": "TCP"}],
            "endpoints": eps
        }))?;
        Ok(())
    }
}

/// Who answered `n` requests to `url` from `pod` (failures count as "").
fn answers(pod: &Pod, url: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (code, body) = curl(pod, url, &[])?;
        let who = if code == 200 {
            who(&body)
        } else {
            format!("HTTP {code}")
        };
        *seen.entry(who).or_default() += 1;
    }
    Ok(seen)
}

/// Node 0's endpoints of `service`: "addr node pod zone identity" each.
fn endpoints(world: &World, service: &str) -> Result<Vec<String>> {
    let (code, body) = world.node(0).admin_socket_get("/endpoints")?;
    ensure!(code == 200, "GET /endpoints: {code} {body}");
    let report: Value = serde_json::from_str(&body)?;
    let Some(svc) = report["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == service)
    else {
        return Ok(Vec::new());
    };
    Ok(svc["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            ["addr", "node", "pod", "zone", "identity"]
                .map(|k| e[k].as_str().unwrap_or("-").to_string())
                .join(" ")
        })
        .collect())
}

/// Tunnel streams node 1 authorized for `source` (any service).
fn authorized(world: &World, source: &str) -> Result<f64> {
    metric(
        world.node(1),
        "waymark_inbound_authz_decisions_total",
        &[("decision", "allow"), ("source_identity", source)],
    )
}

/// The cluster of these tests: namespace `shop` in the mesh (pods
/// `shop/client` on node 0, `shop/web-0` and `shop/web-1` on node 1),
/// namespace `plain` outside it (`plain/other` on node 0), Service
/// `shop/web` on [`VIP`]:80 with both web pods behind it, and the agents
/// started with nothing of this in their config; the web pods serve.
/// With `crds` the Gateway API route kinds and AuthorizationPolicy are
/// served. Every pod is labelled `app: <its service account>`.
fn meshed(world: &World, crds: bool) -> Result<(Cluster, [Server; 2])> {
    let cluster = Cluster::start(world)?;
    if crds {
        cluster.crds()?;
    }
    let kubeconfig = world.dir().join("kubeconfig");
    std::fs::write(&kubeconfig, cluster.api.kubeconfig())?;
    for (name, label) in [
        ("shop", json!({"waymark.dev/mesh": "enabled"})),
        ("plain", json!({})),
    ] {
        cluster.create(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": label}}))?;
    }
    for node in world.nodes() {
        cluster.create(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name()},
            "status": {"addresses": [{"type": "InternalIP", "address": node.fabric_ip().to_string()}]}}))?;
    }
    let (client, other) = (world.pod(0, 0), world.pod(0, 1));
    let (web0, web1) = (world.pod(1, 0), world.pod(1, 1));
    cluster.pod(client, "shop", "client", "client", json!({}))?;
    cluster.pod(other, "plain", "other", "default", json!({}))?;
    cluster.pod(web0, "shop", "web-0", "web", json!({}))?;
    cluster.pod(web1, "shop", "web-1", "web", json!({}))?;
    cluster.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": VIP, "clusterIPs": [VIP],
                 "ports": [{"name": "http", "port": 80, "targetPort": APP_PORT, "protocol": "TCP"}]}}))?;
    cluster.slice(&[(web0, "web-0"), (web1, "web-1")])?;

    // Agents with nothing of the cluster in their config.
    for node in world.nodes() {
        node.update_config(|cfg| {
            for section in ["pods", "services", "nodes"] {
                cfg.remove(section);
            }
            let mut k = toml::Table::new();
            k.insert("enabled".into(), true.into());
            k.insert("kubeconfig".into(), kubeconfig.display().to_string().into());
            k.insert("netns_retry".into(), "200ms".into());
            cfg.insert("kubernetes".into(), k.into());
        })?;
        node.start_agent()?;
    }
    let apps = [app(web0, "web-0")?, app(web1, "web-1")?];
    Ok((cluster, apps))
}

#[test]
fn agents_discover_pods_services_and_nodes_from_the_api_server() {
    require_agent_or_skip!();
    with_world(two_nodes(world_name!()), |world| {
        let (cluster, _apps) = meshed(world, false)?;
        let (client, other) = (world.pod(0, 0), world.pod(0, 1));
        let (web0, web1) = (world.pod(1, 0), world.pod(1, 1));
        let url = format!("http://{VIP}/");
        let client_id = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/client");

        // The service, as node 0's balancer has it: both pods, on node 1,
        // in its zone, with the identity of their service account.
        let web_id = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/web");
        eventually(DEFAULT_PATIENCE, || {
            let eps = endpoints(world, "web.shop:80")?;
            let want = vec![
                format!("{}:{APP_PORT} node1 shop/web-0 zone-1 {web_id}", web0.ip()),
                format!("{}:{APP_PORT} node1 shop/web-1 zone-1 {web_id}", web1.ip()),
            ];
            ensure!(eps == want, "{eps:?}");
            Ok(())
        })?;
        // The ClusterIP answers, through the tunnel, as the client's
        // service account.
        eventually(DEFAULT_PATIENCE, || {
            let seen = answers(client, &url, 10)?;
            ensure!(
                seen.iter().all(|(who, _)| who.starts_with("web-")),
                "{seen:?}"
            );
            Ok(())
        })?;
        // HTTP requests share pooled tunnel streams: at least one stream,
        // authorized as the client's identity.
        let through_tunnel = authorized(world, &client_id)?;
        ensure!(
            through_tunnel >= 1.0,
            "node 1 authorized no stream of {client_id}"
        );

        // Scaled down: the removed endpoint gets nothing once the change
        // is in (the agents apply it within a second or so).
        cluster.slice(&[(web0, "web-0")])?;
        eventually(Duration::from_secs(5), || {
            let eps = endpoints(world, "web.shop:80")?;
            ensure!(eps.len() == 1 && eps[0].contains("shop/web-0"), "{eps:?}");
            Ok(())
        })?;
        let seen = answers(client, &url, 30)?;
        ensure!(
            seen.get("web-0") == Some(&30),
            "after the scale-down: {seen:?}"
        );

        // A meshed pod dialled by address (no service) goes through the
        // tunnel too: authorized as the client on node 1, and nothing of
        // the request in plaintext on node 0's link into the fabric.
        let fabric = Capture::start(world.dir().join("fabric.pcap"), "n0", |c| {
            world.spawn_in_fabric(c)
        })?;
        let (tunnelled, direct) = ("wm-pod-ip-tunnelled", "wm-pod-ip-direct");
        let before = authorized(world, &client_id)?;
        let (code, body) = curl(
            client,
            &format!("http://{}:{APP_PORT}/{tunnelled}", web1.ip()),
            &[],
        )?;
        ensure!(code == 200 && who(&body) == "web-1", "{code} {body}");
        let after = authorized(world, &client_id)?;
        ensure!(
            after == before + 1.0,
            "direct pod-IP request: {before} -> {after} authorized streams"
        );

        // The pod outside the mesh is not enrolled: its connections go
        // direct (the ClusterIP, which only the agent knows, does not
        // answer; the pod's address does, without the tunnel, in
        // plaintext on the link: the capture's positive control).
        let (code, _) = curl(
            other,
            &format!("http://{}:{APP_PORT}/{direct}", web1.ip()),
            &[],
        )?;
        ensure!(code == 200, "direct from the pod outside the mesh: {code}");
        let bytes = fabric.finish()?;
        ensure!(
            contains(&bytes, direct),
            "the plaintext request of the pod outside the mesh is not in the capture: does it see anything?"
        );
        ensure!(
            !contains(&bytes, tunnelled),
            "the meshed pod's pod-IP request crossed node 0's link in plaintext"
        );
        if let Some(out) = answered(other, &url)? {
            bail!("the ClusterIP answered a pod outside the mesh: {out}");
        }
        let log = world.node(0).agent_log();
        ensure!(
            log.contains("pod enrolled") && log.contains("shop/client"),
            "{log}"
        );
        ensure!(
            !log.contains("plain/other"),
            "the pod outside the mesh was enrolled: {log}"
        );

        // The local pod was named by discovery in the agent's metrics.
        let by_pod = metric(
            world.node(0),
            "tcp_open_total",
            &[("direction", "outbound"), ("pod", "shop/client")],
        )?;
        ensure!(
            by_pod > 0.0,
            "no outbound connections counted for shop/client"
        );
        Ok(())
    });
}

/// Node 0's discovery metric `name` for `label` = `value`.
fn discovery_metric(world: &World, name: &str, label: &str, value: &str) -> Result<f64> {
    metric(world.node(0), name, &[(label, value)])
}

#[test]
fn discovery_survives_api_faults_and_bad_objects() {
    require_agent_or_skip!();
    with_world(two_nodes(world_name!()), |world| {
        let (mut cluster, _apps) = meshed(world, false)?;
        let (client, web0) = (world.pod(0, 0), world.pod(1, 0));
        let url = format!("http://{VIP}/");
        let ok = |n: usize| -> Result<()> {
            let seen = answers(client, &url, n)?;
            ensure!(
                seen.iter().all(|(who, _)| who.starts_with("web-")),
                "{seen:?}"
            );
            Ok(())
        };
        eventually(DEFAULT_PATIENCE, || ok(5))?;

        // Bad objects are skipped, counted and named by check; nothing
        // else stops working.
        cluster.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}}))?;
        cluster.create(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "orphan", "namespace": "shop"},
            "addressType": "IPv4", "endpoints": []}),
        )?;
        eventually(DEFAULT_PATIENCE, || {
            let svc = discovery_metric(
                world,
                "waymark_discovery_skipped_objects",
                "kind",
                "service",
            )?;
            let slice = discovery_metric(
                world,
                "waymark_discovery_skipped_objects",
                "kind",
                "endpointslice",
            )?;
            ensure!(
                svc == 1.0 && slice == 1.0,
                "skipped: {svc} services, {slice} slices"
            );
            Ok(())
        })?;
        let check = world.node(0).run(waymark().arg("check"))?;
        let out = String::from_utf8_lossy(&check.stdout);
        ensure!(
            out.contains("kubernetes: pods listed")
                && out.contains("2 objects skipped")
                && out.contains("service shop/bad: clusterIP \"10.96.0.300\" is not an address")
                && out.contains("endpointslice shop/orphan: no kubernetes.io/service-name label"),
            "{out}"
        );
        ok(5)?;

        // A compaction and dropped watches: the watches fail with 410 Gone,
        // relist, and say so; traffic never notices.
        cluster.api.compact();
        cluster.api.drop_watches();
        eventually(Duration::from_secs(30), || {
            let r = discovery_metric(
                world,
                "waymark_discovery_watch_restarts_total",
                "resource",
                "pods",
            )?;
            ensure!(r >= 1.0, "pods watch restarts: {r}");
            Ok(())
        })?;
        ok(5)?;

        // The API server down: the agents proxy on their last picture; a
        // change made meanwhile arrives once it is back.
        cluster.rt.block_on(cluster.api.stop());
        ok(10)?;
        cluster.slice(&[(web0, "web-0")])?;
        std::thread::sleep(Duration::from_secs(2));
        ok(5)?;
        cluster.rt.block_on(cluster.api.restart())?;
        eventually(Duration::from_secs(40), || {
            let eps = endpoints(world, "web.shop:80")?;
            ensure!(eps.len() == 1 && eps[0].contains("shop/web-0"), "{eps:?}");
            Ok(())
        })?;
        let seen = answers(client, &url, 10)?;
        ensure!(seen.get("web-0") == Some(&10), "after the relist: {seen:?}");

        // A deleted pod is removed: its listener closes and the kernel no
        // longer redirects it, so the ClusterIP (known only to the agent)
        // stops answering it.
        cluster
            .api
            .delete("v1", "Pod", Some("shop"), "client")
            .map_err(|e| anyhow::anyhow!("deleting the pod: {e:?}"))?;
        eventually(DEFAULT_PATIENCE, || {
            let log = world.node(0).agent_log();
            ensure!(log.contains("pod removed"), "no removal in the log");
            ensure!(
                answered(client, &url)?.is_none(),
                "the deleted pod still reaches the ClusterIP"
            );
            Ok(())
        })?;
        Ok(())
    });
}

#[test]
fn an_httproute_splits_a_service_until_it_is_deleted() {
    require_agent_or_skip!();
    with_world(two_nodes(world_name!()), |world| {
        let (cluster, _apps) = meshed(world, true)?;
        let (client, web0, web1) = (world.pod(0, 0), world.pod(1, 0), world.pod(1, 1));
        let url = format!("http://{VIP}/");
        // web → web-0, web-v2 → web-1.
        cluster.slice(&[(web0, "web-0")])?;
        cluster.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web-v2", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.21", "clusterIPs": ["10.96.0.21"],
                     "ports": [{"name": "http", "port": 80, "targetPort": APP_PORT}]}}))?;
        cluster.slice_of("web-v2", &[(web1, "web-1")])?;
        eventually(DEFAULT_PATIENCE, || {
            let (web, v2) = (
                endpoints(world, "web.shop:80")?,
                endpoints(world, "web-v2.shop:80")?,
            );
            ensure!(
                web.len() == 1 && v2.len() == 1 && v2[0].contains("shop/web-1"),
                "{web:?} {v2:?}"
            );
            Ok(())
        })?;
        cluster.create(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "split", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [
                    {"name": "web", "port": 80, "weight": 90},
                    {"name": "web-v2", "port": 80, "weight": 10}]}]
            }
        }))?;
        // Applied: web-v2 starts answering requests for web.
        eventually(DEFAULT_PATIENCE, || {
            let seen = answers(client, &url, 40)?;
            ensure!(
                seen.contains_key("web-1"),
                "no request went to web-v2 yet: {seen:?}"
            );
            Ok(())
        })?;
        let seen = answers(client, &url, 300)?;
        let v2 = seen.get("web-1").copied().unwrap_or(0);
        let v1 = seen.get("web-0").copied().unwrap_or(0);
        ensure!(
            v1 + v2 == 300,
            "every request answered by web or web-v2: {seen:?}"
        );
        // 10 % of 300 is 30 (binomial sd 5.2): well inside 9..=60.
        ensure!(
            (9..=60).contains(&v2),
            "web-v2 got {v2} of 300 (want about 30): {seen:?}"
        );
        // Deleted: the service's own endpoints again.
        cluster
            .api
            .delete(
                "gateway.networking.k8s.io/v1",
                "HTTPRoute",
                Some("shop"),
                "split",
            )
            .map_err(|e| anyhow::anyhow!("deleting the route: {e:?}"))?;
        eventually(DEFAULT_PATIENCE, || {
            let seen = answers(client, &url, 30)?;
            ensure!(seen.get("web-0") == Some(&30), "{seen:?}");
            Ok(())
        })?;
        Ok(())
    });
}

/// The world of these tests: two nodes of two pods with mTLS, agents not
/// started (the cluster is written first, see [`meshed`]).
fn two_nodes(name: &str) -> waymark_tests::WorldBuilder {
    meshed_pair(name, 2, &[]).agent(false)
}

/// Runs `curl` from `pod` to `url` (a 1 s connect timeout); what it
/// printed when it got an answer, `None` when it could not connect.
fn answered(pod: &Pod, url: &str) -> Result<Option<String>> {
    let out = pod.run(std::process::Command::new("curl").args([
        "-sS",
        "--connect-timeout",
        "1",
        "--max-time",
        "5",
        url,
    ]))?;
    Ok(out
        .status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// One request to `url` from `pod` with `curl -i`: (status, head and body).
fn request(pod: &Pod, url: &str) -> Result<(u16, String)> {
    waymark_tests::curl_i(pod, url, &[])
}

#[test]
fn authorization_policies_deny_and_allow_by_service_account() {
    require_agent_or_skip!();
    with_world(two_nodes(world_name!()), |world| {
        let (cluster, _apps) = meshed(world, true)?;
        let (client, web1) = (world.pod(0, 0), world.pod(1, 1));
        let url = format!("http://{VIP}/");
        let policy = |name: &str, action: &str, from: Value| {
            cluster.apply(json!({
                "apiVersion": "policy.waymark.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": action, "from": from}
            }))
        };
        let delete = |name: &str| {
            cluster
                .api
                .delete(
                    "policy.waymark.dev/v1alpha1",
                    "AuthorizationPolicy",
                    Some("shop"),
                    name,
                )
                .map_err(|e| anyhow::anyhow!("deleting policy {name}: {e:?}"))
        };
        eventually(DEFAULT_PATIENCE, || {
            let (code, out) = request(client, &url)?;
            ensure!(code == 200, "{out}");
            Ok(())
        })?;

        // DENY the client's service account: requests get 403 naming the
        // policy, and a pod-IP connection is refused by the same rule.
        policy(
            "no-client",
            "DENY",
            json!([{"serviceAccounts": ["client"]}]),
        )?;
        eventually(DEFAULT_PATIENCE, || {
            let (code, out) = request(client, &url)?;
            ensure!(
                code == 403 && out.contains("shop/no-client"),
                "{code}: {out}"
            );
            Ok(())
        })?;
        let direct = answered(client, &format!("http://{}:{APP_PORT}/", web1.ip()))?;
        ensure!(
            !direct.as_deref().unwrap_or_default().contains("web-1"),
            "a denied pod-IP connection reached the app: {direct:?}"
        );
        delete("no-client")?;

        // ALLOW only another namespace: the client is denied by "nothing
        // else"; allowing its service account lets it through again.
        policy("ops-only", "ALLOW", json!([{"namespaces": ["ops"]}]))?;
        eventually(DEFAULT_PATIENCE, || {
            let (code, out) = request(client, &url)?;
            ensure!(
                code == 403 && out.contains("allows only its sources"),
                "{code}: {out}"
            );
            Ok(())
        })?;
        policy(
            "ops-only",
            "ALLOW",
            json!([{"namespaces": ["ops"]}, {"serviceAccounts": ["shop/client"]}]),
        )?;
        eventually(DEFAULT_PATIENCE, || {
            let (code, out) = request(client, &url)?;
            ensure!(code == 200, "{code}: {out}");
            Ok(())
        })?;
        Ok(())
    });
}

/// HTTP/1.1 load on a Service address from `threads` keep-alive
/// connections for `seconds`: one line per request, `start end status who`
/// (Unix times), or `start end ERR why`; `started` first, `done` last.
const LOAD: &str = r#"
import http.client, sys, threading, time
host, path, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
end = time.time() + seconds
lock = threading.Lock()
def out(line):
    with lock:
        print(line, flush=True)
def worker():
    c = None
    while time.time() < end:
        t = time.time()
        try:
            if c is None:
                c = http.client.HTTPConnection(host, 80, timeout=10)
            c.request("GET", path)
            r = c.getresponse()
            who = (r.read().decode().split() or [""])[0]
            out("%.3f %.3f %d %s" % (t, time.time(), r.status, who))
        except Exception as e:
            out("%.3f %.3f ERR %r" % (t, time.time(), e))
            c = None
out("started")
ts = [threading.Thread(target=worker) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
out("done")
"#;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[test]
fn a_pod_deleted_under_load_is_drained_without_failures() {
    require_agent_or_skip!();
    with_world(two_nodes(world_name!()), |world| {
        let (cluster, [_app0, mut app1]) = meshed(world, false)?;
        let (client, web0, web1) = (world.pod(0, 0), world.pod(1, 0), world.pod(1, 1));
        let url = format!("http://{VIP}/");
        eventually(DEFAULT_PATIENCE, || {
            let seen = answers(client, &url, 10)?;
            ensure!(
                seen.contains_key("web-0") && seen.contains_key("web-1"),
                "{seen:?}"
            );
            Ok(())
        })?;

        // Load: four connections of 200 ms requests, so requests are in
        // flight on both pods whenever the deletion lands.
        let mut load = client.serve_until(
            python().args(["-u", "-c", LOAD, VIP, "/slow/200", "9", "4"]),
            "started",
            Duration::from_secs(10),
        )?;
        std::thread::sleep(Duration::from_secs(2));
        let (deleted, applied, slow) = std::thread::scope(|s| -> Result<_> {
            // A long request to web-1 by its own address (through the
            // tunnel, as a workload), in flight across the deletion.
            let slow = s.spawn(|| {
                curl(
                    client,
                    &format!("http://{}:{APP_PORT}/slow/4000", web1.ip()),
                    &[],
                )
            });
            std::thread::sleep(Duration::from_millis(500));
            // As Kubernetes deletes a pod: its endpoint leaves the slice,
            // the Pod object goes; the pod serves on through its grace
            // period.
            let deleted = unix_now();
            cluster.slice(&[(web0, "web-0")])?;
            cluster
                .api
                .delete("v1", "Pod", Some("shop"), "web-1")
                .map_err(|e| anyhow::anyhow!("deleting the pod: {e:?}"))?;
            eventually(Duration::from_secs(5), || {
                let eps = endpoints(world, "web.shop:80")?;
                ensure!(eps.len() == 1 && eps[0].contains("shop/web-0"), "{eps:?}");
                Ok(())
            })?;
            let applied = unix_now();
            let slow = slow
                .join()
                .map_err(|_| anyhow::anyhow!("the slow request's thread panicked"))??;
            Ok((deleted, applied, slow))
        })?;
        // The grace period ends: the pod's process goes.
        app1.stop();
        load.wait_line("done", Duration::from_secs(30))?;

        ensure!(
            slow.0 == 200 && who(&slow.1) == "web-1",
            "the request in flight to the deleted pod did not end cleanly: {slow:?}"
        );
        let mut before = BTreeMap::<String, usize>::new();
        let mut in_flight_to_web1 = 0;
        let mut after = BTreeMap::<String, usize>::new();
        for line in load.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(start), Some(end), Some(status)) = (
                f.first().and_then(|v| v.parse::<f64>().ok()),
                f.get(1).and_then(|v| v.parse::<f64>().ok()),
                f.get(2),
            ) else {
                continue;
            };
            ensure!(
                *status == "200",
                "a request failed ({line}); deletion at {deleted:.3}, applied by {applied:.3}"
            );
            let who = f.get(3).copied().unwrap_or_default().to_string();
            // Answered by the deleted pod after its deletion was issued:
            // in flight across it (sent before, or before it was applied).
            if who == "web-1" && end > deleted && start <= applied {
                in_flight_to_web1 += 1;
            }
            if start < deleted {
                *before.entry(who).or_default() += 1;
            } else if start > applied {
                *after.entry(who).or_default() += 1;
            }
        }
        ensure!(
            before.get("web-1").copied().unwrap_or(0) > 0,
            "web-1 took no load before its deletion: {before:?}"
        );
        ensure!(
            in_flight_to_web1 > 0,
            "no balanced request was in flight to web-1 across its deletion: {before:?}"
        );
        let total_after: usize = after.values().sum();
        ensure!(
            total_after >= 20 && after.get("web-0") == Some(&total_after),
            "after the deletion was applied, requests went elsewhere than web-0: {after:?}"
        );
        Ok(())
    });
}

#[test]
fn a_host_network_pod_is_never_redirected() {
    require_agent_or_skip!();
    with_world(two_nodes(world_name!()), |world| {
        let (cluster, _apps) = meshed(world, false)?;
        let (client, web1) = (world.pod(0, 0), world.pod(1, 1));
        let node0 = world.node(0);
        let url = format!("http://{VIP}/");
        // A hostNetwork pod in the meshed namespace (only its host network
        // keeps it out), with the node's address, as a node agent or a CNI
        // daemon runs.
        let created = cluster.create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "host-daemon", "namespace": "shop", "labels": {"app": "host"}},
            "spec": {"nodeName": "node0", "hostNetwork": true, "serviceAccountName": "host",
                     "containers": [{"name": "daemon", "image": "daemon"}]},
            "status": {"phase": "Running", "podIP": node0.fabric_ip().to_string(),
                       "podIPs": [{"ip": node0.fabric_ip().to_string()}]}
        }))?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .context("the server gave the pod no uid")?
            .to_string();
        eventually(DEFAULT_PATIENCE, || {
            let seen = answers(client, &url, 3)?;
            ensure!(
                seen.iter().all(|(who, _)| who.starts_with("web-")),
                "{seen:?}"
            );
            Ok(())
        })?;
        let outbound = || metric(node0, "tcp_open_total", &[("direction", "outbound")]);
        let tunnelled = || metric(world.node(1), "waymark_inbound_authz_decisions_total", &[]);
        let (out_before, tunnel_before) = (outbound()?, tunnelled()?);

        // Its process: in the node's network namespace, in a pod cgroup
        // under the one the redirect programs are attached to.
        let run = |url: &str| -> Result<(bool, String)> {
            let child = node0.spawn_host_network(
                std::process::Command::new("curl")
                    .args(["-sS", "--connect-timeout", "1", "--max-time", "5", url])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped()),
                &uid,
            )?;
            let out = child.wait_with_output()?;
            Ok((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        };
        // A meshed pod's address: answered directly. Redirected, the
        // connection would go to the outbound port on the node's loopback,
        // where nothing listens (the listener exists only in enrolled
        // pods).
        let (ok, out) = run(&format!("http://{}:{APP_PORT}/", web1.ip()))?;
        ensure!(ok && who(&out) == "web-1", "direct to web-1: {out}");
        // The ClusterIP, which only the agent knows: nothing answers.
        let (ok, out) = run(&url)?;
        ensure!(!ok, "the ClusterIP answered a hostNetwork process: {out}");
        // Neither connection went through the agent: no outbound
        // connection opened on node 0, no tunnel stream authorized on node 1.
        let (out_after, tunnel_after) = (outbound()?, tunnelled()?);
        ensure!(
            out_after == out_before,
            "node 0 proxied the hostNetwork process: {out_before} -> {out_after} outbound connections"
        );
        ensure!(
            tunnel_after == tunnel_before,
            "node 1 authorized tunnel streams for it: {tunnel_before} -> {tunnel_after}"
        );
        // Discovery saw the pod and left it out of the mesh.
        let log = node0.agent_log();
        ensure!(
            !log.contains("shop/host-daemon"),
            "the hostNetwork pod was enrolled: {log}"
        );
        Ok(())
    });
}
