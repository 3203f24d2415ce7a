use super::*;

#[test]
fn embedded_default_is_valid_and_runs_without_pods() {
    let c = Config::embedded_default();
    assert_eq!(c.admin.listen, "127.0.0.1:4191".parse().unwrap());
    assert_eq!(c.outbound.port, 15001);
    assert!(c.redirect.cgroup.is_none());
    assert!(c.pods.is_empty());
}

#[test]
fn empty_file_gets_defaults() {
    let c = Config::from_toml("", "t").unwrap();
    assert_eq!(c.outbound.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(c.shutdown.drain_grace, DEFAULT_DRAIN_GRACE);
}

#[test]
fn full_file_parses() {
    let c = Config::from_toml(
        r#"
[node]
name = "node0"
[admin]
listen = "127.0.0.1:14191"
[outbound]
port = 15009
connect_timeout = "250ms"
[redirect]
cgroup = "/sys/fs/cgroup/pods"
exclude = [ { net = "10.0.0.0/24", ports = [4191, 15008] }, { net = "fd00::/64" } ]
[shutdown]
drain_grace = "2s"
[[pods]]
name = "default/a"
netns = "/var/run/netns/a"
ips = ["10.1.0.2", "fd00:1::2"]
"#,
        "t",
    )
    .unwrap();
    assert_eq!(c.node.name, "node0");
    assert_eq!(c.outbound.port, 15009);
    assert_eq!(c.outbound.connect_timeout, Duration::from_millis(250));
    assert_eq!(c.redirect.exclude.len(), 2);
    assert_eq!(c.redirect.exclude[0].ports, vec![4191, 15008]);
    assert!(c.redirect.exclude[1].ports.is_empty());
    assert_eq!(c.pods[0].ips.len(), 2);
    assert_eq!(c.shutdown.drain_grace, Duration::from_secs(2));
}

#[test]
fn every_problem_is_reported_at_once_with_its_field() {
    let err = Config::from_toml(
        r#"
[admin]
listen = "0.0.0.0:4191"
[outbound]
port = 0
connect_timeout = "0s"
[redirect]
exclude = [ { net = "10.0.0.1/24", ports = [0] } ]
[[pods]]
name = "default/a"
netns = "relative/path"
ips = ["10.1.0.2"]
[[pods]]
name = "default/a"
netns = "/x"
ips = ["10.1.0.2"]
"#,
        "test.toml",
    )
    .unwrap_err();
    let msg = err.to_string();
    for needle in [
        "test.toml",
        "admin.listen: 0.0.0.0:4191 is not a loopback address",
        "outbound.port: must not be 0",
        "outbound.connect_timeout",
        "redirect.exclude[0].ports: port 0",
        "redirect.exclude[0].net: 10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24",
        "redirect.cgroup: pods are declared but no cgroup",
        "pods[0].netns: relative/path must be an absolute path",
        "pods[1].name: \"default/a\" is declared twice",
        "pods[1].ips: 10.1.0.2 is already the address of pods[0]",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in:\n{msg}");
    }
    match err {
        ConfigError::Invalid { problems, .. } => assert_eq!(problems.len(), 9, "{problems:#?}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn unknown_fields_and_bad_values_name_the_field() {
    let err = Config::from_toml("[outbound]\nprot = 1\n", "t").unwrap_err();
    assert!(err.to_string().contains("prot"), "{err}");
    let err = Config::from_toml("[outbound]\nconnect_timeout = \"soon\"\n", "t").unwrap_err();
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    let err =
        Config::from_toml("[redirect]\nexclude = [{ net = \"10.0.0.0/33\" }]\n", "t").unwrap_err();
    assert!(err.to_string().contains("net"), "{err}");
}

#[test]
fn the_accept_rate_has_defaults_and_can_be_turned_off() {
    let c = Config::from_toml("", "t").unwrap();
    assert_eq!(c.outbound.accept_rate_per_pod, DEFAULT_ACCEPT_RATE_PER_POD);
    assert_eq!(
        c.outbound.accept_burst_per_pod,
        DEFAULT_ACCEPT_BURST_PER_POD
    );
    let c = Config::from_toml("[outbound]\naccept_rate_per_pod = 0\n", "t").unwrap();
    assert_eq!(c.outbound.accept_rate_per_pod, 0);
    let err = Config::from_toml("[outbound]\naccept_rate_per_pod = -1\n", "t").unwrap_err();
    assert!(err.to_string().contains("accept_rate_per_pod"), "{err}");
}

#[test]
fn too_many_exclude_ports_is_rejected() {
    let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
    let text = format!(
        "[redirect]\nexclude = [{{ net = \"10.0.0.0/8\", ports = [{}] }}]\n",
        ports.join(",")
    );
    let err = Config::from_toml(&text, "t").unwrap_err();
    assert!(err.to_string().contains("at most 16 per entry"), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let err = Config::from_file(Path::new("/nonexistent/waymark.toml")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/waymark.toml"),
        "{err}"
    );
}

/// A development CA in a fresh directory; returns the directory.
fn dev_ca() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "waymark-config-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    crate::identity::init::run(&dir, "cluster.local", false).unwrap();
    dir
}

fn identity_section(dir: &Path) -> String {
    format!(
        "[identity]\ntrust_bundle = \"{0}/ca.crt\"\nissuer_cert = \"{0}/issuer.crt\"\nissuer_key = \"{0}/issuer.key\"\nleaf_lifetime = \"1h\"\n",
        dir.display()
    )
}

#[test]
fn mesh_sections_parse_and_default_is_plaintext() {
    let c = Config::embedded_default();
    assert!(c.identity.is_none());
    assert_eq!(c.inbound.listen, vec!["0.0.0.0:15008".parse().unwrap()]);
    let dir = dev_ca();
    let text = format!(
        r#"
[node]
name = "node0"
[redirect]
cgroup = "/sys/fs/cgroup/pods"
{}
[inbound]
listen = ["10.0.0.1:15008", "[fd00::1]:15008"]
[[nodes]]
name = "node1"
tunnel = "10.0.0.2:15008"
[[nodes]]
name = "node2"
tunnel = "10.0.0.3:15008"
identity = "spiffe://cluster.local/ns/waymark-system/sa/agent-2"
[[pods]]
name = "default/web"
netns = "/var/run/netns/web"
ips = ["10.1.0.2"]
identity = "spiffe://cluster.local/ns/default/sa/web"
[[services]]
name = "api"
addresses = ["10.96.0.1:80"]
endpoints = [ {{ addr = "10.2.0.2:8080", node = "node1" }}, {{ addr = "10.1.0.3:8080", node = "node0" }} ]
[authorization]
default = "deny"
[[authorization.rules]]
name = "web-to-api"
action = "allow"
sources = ["spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/ops/sa/*"]
services = ["api"]
ports = [8080]
"#,
        identity_section(&dir)
    );
    let c = Config::from_toml(&text, "t").unwrap();
    let id = c.identity.as_ref().unwrap();
    assert_eq!(id.trust_domain, "cluster.local");
    assert_eq!(id.leaf_lifetime, Duration::from_secs(3600));
    assert_eq!(
        id.node_identity("node0").unwrap().to_string(),
        "spiffe://cluster.local/ns/waymark-system/sa/node0"
    );
    assert_eq!(
        c.nodes[1].identity("cluster.local").unwrap().to_string(),
        "spiffe://cluster.local/ns/waymark-system/sa/agent-2"
    );
    assert_eq!(c.authorization.rules[0].ports, vec![8080]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mesh_problems_are_all_reported() {
    let dir = dev_ca();
    let text = format!(
        r#"
[node]
name = "node0"
[redirect]
cgroup = "/sys/fs/cgroup/pods"
[identity]
trust_bundle = "{0}/ca.crt"
issuer_cert = "{0}/issuer.crt"
issuer_key = "/nonexistent/issuer.key"
leaf_lifetime = "1s"
[inbound]
listen = []
[[nodes]]
name = "node1"
tunnel = "0.0.0.0:15008"
[[nodes]]
name = "node1"
tunnel = "10.0.0.3:0"
[[pods]]
name = "default/web"
netns = "/var/run/netns/web"
identity = "spiffe://other.org/ns/default/sa/web"
[[services]]
name = "api"
endpoints = [ {{ addr = "10.3.0.2:8080", node = "node9" }} ]
[[authorization.rules]]
action = "deny"
sources = ["spiffe://cluster.local/ns/default", "spiffe://other.org/ns/a/sa/*"]
services = ["nope"]
ports = [0]
[[authorization.rules]]
action = "allow"
sources = []
"#,
        dir.display()
    );
    let err = Config::from_toml(&text, "mesh.toml").unwrap_err();
    let msg = err.to_string();
    for needle in [
        "identity: cannot read /nonexistent/issuer.key",
        "identity.leaf_lifetime: 1s is not within 5s..=",
        "inbound.listen: empty",
        "nodes[0].tunnel: 0.0.0.0:15008 is not an address a peer can dial",
        "nodes[1].name: \"node1\" is declared twice",
        "nodes[1].tunnel: 10.0.0.3:0 has port 0",
        "pods[0].identity: spiffe://other.org/ns/default/sa/web is outside the trust domain \"cluster.local\"",
        "services[0] (api).endpoints[0].node: node \"node9\" is not in [[nodes]]",
        "authorization.rules[0].sources[0]:",
        "authorization.rules[0].sources[1]: \"spiffe://other.org/ns/a/sa/*\" is in trust domain \"other.org\"",
        "authorization.rules[0].services[0]: no service named \"nope\"",
        "authorization.rules[0].ports: port 0",
        "authorization.rules[1].sources: empty",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in:\n{msg}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mesh_sections_need_identity() {
    let err = Config::from_toml(
        r#"
[redirect]
cgroup = "/sys/fs/cgroup/pods"
[[nodes]]
name = "node1"
tunnel = "10.0.0.2:15008"
[[pods]]
name = "default/web"
netns = "/x"
identity = "spiffe://cluster.local/ns/default/sa/web"
[authorization]
default = "deny"
"#,
        "t",
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "nodes: declared but there is no [identity] section",
        "authorization: set but there is no [identity] section",
        "pods[0].identity: set but there is no [identity] section",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn endpoint_weight_and_zone() {
    let svc = |endpoints: &str| {
        format!(
            "[[services]]\nname = \"s\"\naddresses = [\"10.96.0.1:80\"]\nendpoints = [{endpoints}]\n"
        )
    };
    let c = Config::from_toml(
        &svc(
            r#"{ addr = "10.1.0.2:80" }, { addr = "10.1.0.3:80", weight = 3, zone = "z1", pod = "default/web-1" }"#,
        ),
        "t",
    )
    .unwrap();
    let eps = &c.services[0].endpoints;
    assert_eq!((eps[0].weight, eps[0].zone.as_deref()), (1, None));
    assert_eq!((eps[1].weight, eps[1].zone.as_deref()), (3, Some("z1")));
    assert_eq!(
        (eps[0].pod.as_deref(), eps[1].pod.as_deref()),
        (None, Some("default/web-1"))
    );

    let e = Config::from_toml(
        &svc(
            r#"{ addr = "10.1.0.2:80", weight = 1000000 }, { addr = "10.1.0.3:80", zone = " ", pod = "" }"#,
        ),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("endpoints[0].weight: 1000000 is above the maximum 10000"),
        "{e}"
    );
    assert!(e.contains("endpoints[1].zone: must not be empty"), "{e}");
    assert!(e.contains("endpoints[1].pod: must not be empty"), "{e}");

    let e = Config::from_toml(&svc(r#"{ addr = "10.1.0.2:80", identity = "web" }"#), "t")
        .unwrap_err()
        .to_string();
    assert!(e.contains("endpoints[0].identity:"), "{e}");
    let c = Config::from_toml(
        &svc(r#"{ addr = "10.1.0.2:80", identity = "spiffe://cluster.local/ns/a/sa/b" }"#),
        "t",
    )
    .unwrap();
    assert_eq!(
        c.services[0].endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/a/sa/b")
    );
}

#[test]
fn link_local_is_left_to_the_pods_unless_configured() {
    let c = Config::from_toml("", "test").unwrap();
    let nets: Vec<String> = c.excludes().iter().map(|e| e.net.to_string()).collect();
    assert_eq!(nets, ["169.254.0.0/16", "fe80::/10"]);
    assert!(c.excludes().iter().all(|e| e.ports.is_empty()));
    let c = Config::from_toml(
        "[redirect]\nproxy_link_local = true\nexclude = [ { net = \"10.9.0.0/16\", ports = [80] } ]\n",
        "test",
    )
    .unwrap();
    let nets: Vec<String> = c.excludes().iter().map(|e| e.net.to_string()).collect();
    assert_eq!(nets, ["10.9.0.0/16"]);
}

#[test]
fn endpoints_of_local_pods_are_named_by_them() {
    let c = Config::from_toml(
        r#"
[redirect]
cgroup = "/sys/fs/cgroup/pods"
[[pods]]
name = "default/web-1"
netns = "/var/run/netns/web-1"
ips = ["10.1.0.2"]
[[services]]
name = "web"
addresses = ["10.96.0.1:80"]
endpoints = [
  { addr = "10.1.0.2:8080" },
  { addr = "10.1.0.2:9090", pod = "default/named" },
  { addr = "10.2.0.2:8080" },
]
"#,
        "test",
    )
    .unwrap();
    let pods: Vec<Option<String>> = c.services_with_local_pods()[0]
        .endpoints
        .iter()
        .map(|e| e.pod.as_deref().map(String::from))
        .collect();
    assert_eq!(
        pods,
        [
            Some("default/web-1".into()),
            Some("default/named".into()),
            None
        ]
    );
    // The config itself is left as written (`/config` shows it so).
    assert_eq!(c.services[0].endpoints[0].pod, None);
}
