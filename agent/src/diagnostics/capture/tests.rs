use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn config(extra: &str) -> Config {
    Config::from_toml(
        &format!(
            r#"
[node]
name = "n1"
[redirect]
cgroup = "/sys/fs/cgroup/pods"
[[pods]]
name = "default/web"
netns = "/var/run/netns/web"
{extra}
"#
        ),
        "test",
    )
    .unwrap()
}

fn parse(q: &str) -> Result<CaptureParams, RequestError> {
    CaptureParams::from_query(q, &config(""))
}

#[test]
fn a_pod_capture_with_every_parameter() {
    let p = parse("pod=default%2Fweb&filter=tcp+port%208080&duration=2s&max_packets=10&max_bytes=5000&snaplen=128")
        .unwrap();
    assert_eq!(
        p,
        CaptureParams {
            target: Target::Pod {
                name: "default/web".into(),
                netns: PathBuf::from("/var/run/netns/web")
            },
            filter: "tcp port 8080".into(),
            duration: Duration::from_secs(2),
            max_packets: Some(10),
            max_bytes: 5000,
            snaplen: 128,
            keylog: false,
            excluded: None,
        }
    );
    assert_eq!(p.kernel_expression(), "tcp port 8080");
}

#[test]
fn a_node_capture_never_holds_the_admin_api_connections() {
    let p = parse("node=1").unwrap();
    assert_eq!(
        p.excluded.as_deref(),
        Some("tcp and host 127.0.0.1 and port 4191")
    );
    assert_eq!(
        p.kernel_expression(),
        "not (tcp and host 127.0.0.1 and port 4191)"
    );
    let p = parse("node=1&filter=tcp+or+udp").unwrap();
    // The user's filter keeps its own precedence.
    assert_eq!(
        p.kernel_expression(),
        "(tcp or udp) and not (tcp and host 127.0.0.1 and port 4191)"
    );
    // Both compile, so the kernel runs them.
    filter::compile(&p.kernel_expression(), 128).unwrap();
    let c = config("[admin]\nlisten = \"[::1]:5000\"\n");
    let p = CaptureParams::from_query("node=1", &c).unwrap();
    assert_eq!(
        p.kernel_expression(),
        "not (tcp and host ::1 and port 5000)"
    );
    filter::compile(&p.kernel_expression(), 128).unwrap();
}

#[test]
fn defaults_are_bounded() {
    let p = parse("node=1").unwrap();
    assert_eq!(p.target, Target::Node { name: "n1".into() });
    assert_eq!(p.duration, DEFAULT_DURATION);
    assert_eq!(p.max_bytes, DEFAULT_MAX_BYTES);
    assert_eq!(p.snaplen, MAX_SNAPLEN);
    assert_eq!(p.max_packets, None);
    // A smaller configured bound lowers the defaults.
    let c = config("[capture]\nmax_duration = \"10s\"\nmax_bytes = 10000\n");
    let p = CaptureParams::from_query("node=1", &c).unwrap();
    assert_eq!(p.duration, Duration::from_secs(10));
    assert_eq!(p.max_bytes, 10000);
}

#[test]
fn bad_requests_say_what_is_wrong() {
    let cases = [
        ("", "say where to capture"),
        ("pod=default/web&node=1", "not both"),
        (
            "pod=default/nope",
            "unknown pod \"default/nope\": it is not on node n1 (pods here: default/web)",
        ),
        ("node=1&duration=1h", "duration 1h is out of range"),
        ("node=1&duration=soon", "duration \"soon\""),
        (
            "node=1&max_bytes=999999999999",
            "max_bytes 999999999999 is out of range",
        ),
        ("node=1&max_packets=0", "max_packets must be at least 1"),
        ("node=1&snaplen=0", "snaplen 0 is out of range"),
        (
            "node=1&max_packets=ten",
            "max_packets: \"ten\" is not a whole number",
        ),
        ("node=1&colour=blue", "unknown parameter \"colour\""),
        ("pod=default/web&keylog=1", "keylog=1 needs node=1"),
        ("node=1&filter=%zz", "bad percent-encoding"),
    ];
    for (q, want) in cases {
        let e = parse(q).unwrap_err();
        assert!(!e.forbidden, "{q}");
        assert!(e.message.contains(want), "{q}: {}", e.message);
    }
}

#[test]
fn the_config_can_forbid_captures_and_secrets() {
    let e = parse("node=1&keylog=1").unwrap_err();
    assert!(e.forbidden);
    assert!(e.message.contains("capture.keylog = true"), "{}", e.message);
    let c = config("[capture]\nkeylog = true\n");
    assert!(
        CaptureParams::from_query("node=1&keylog=1", &c)
            .unwrap()
            .keylog
    );
    let c = config("[capture]\nenabled = false\n");
    let e = CaptureParams::from_query("node=1", &c).unwrap_err();
    assert!(
        e.forbidden && e.message.contains("disabled"),
        "{}",
        e.message
    );
}

#[test]
fn capture_limits_are_validated() {
    let e = Config::from_toml(
        "[capture]\nmax_concurrent = 0\nmax_duration = \"2h\"\nmax_bytes = 1\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("capture.max_concurrent"), "{e}");
    assert!(e.contains("capture.max_duration"), "{e}");
    assert!(e.contains("capture.max_bytes"), "{e}");
}

#[test]
fn the_concurrency_bound_holds_and_frees() {
    let mut registry = Registry::default();
    let c = Captures::new(&mut registry);
    let a = c.reserve(2).unwrap();
    let b = c.reserve(2).unwrap();
    assert!(c.reserve(2).is_none());
    drop(a);
    let _c = c.reserve(2).unwrap();
    drop(b);
    assert_eq!(c.active.load(Ordering::Relaxed), 1);
    assert_eq!(c.active_gauge.get(), 1);
}
