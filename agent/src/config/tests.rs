use super::*;

#[test]
fn embedded_default_is_valid_and_runs_without_pods() {
    let c = Config::embedded_default();
    assert_eq!(c.admin.listen, "127.0.0.1:4191".parse().unwrap());
    assert_eq!(c.outbound.port, 15001);
    assert!(c.redirect.cgroup.is_none());
    assert!(c.pods.is_empty());
    assert_eq!(c.capture, CaptureConfig::default());
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

#[test]
fn endpoint_weight_and_zone() {
    let svc = |endpoints: &str| {
        format!(
            "[[services]]\nname = \"s\"\naddresses = [\"10.96.0.1:80\"]\nendpoints = [{endpoints}]\n"
        )
    };
    let c = Config::from_toml(
        &svc(r#"{ addr = "10.1.0.2:80" }, { addr = "10.1.0.3:80", weight = 3, zone = "z1" }"#),
        "t",
    )
    .unwrap();
    let eps = &c.services[0].endpoints;
    assert_eq!((eps[0].weight, eps[0].zone.as_deref()), (1, None));
    assert_eq!((eps[1].weight, eps[1].zone.as_deref()), (3, Some("z1")));

    let e = Config::from_toml(
        &svc(r#"{ addr = "10.1.0.2:80", weight = 1000000 }, { addr = "10.1.0.3:80", zone = " " }"#),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("endpoints[0].weight: 1000000 is above the maximum 10000"),
        "{e}"
    );
    assert!(e.contains("endpoints[1].zone: must not be empty"), "{e}");
}
