use super::super::Status;
use super::*;
use crate::admin::check::{PodFacts, ServiceFacts};
use crate::redirect::query::{ProgramState, RedirectState};

const NOW: f64 = 1_760_000_000.0;

fn facts() -> AgentFacts {
    AgentFacts {
        node: "node0".into(),
        version: "0.1.0".into(),
        pid: 1,
        now_unix: NOW,
        pending: vec![],
        cgroup_configured: Some("/sys/fs/cgroup/pods".into()),
        redirect: RedirectState {
            cgroup: Some("/sys/fs/cgroup/pods".into()),
            programs: EXPECTED
                .iter()
                .enumerate()
                .map(|(i, e)| ProgramState {
                    name: e.name.into(),
                    attach_type: e.attach_type.into(),
                    id: Some(i as u32 + 10),
                    attached: true,
                    error: None,
                })
                .collect(),
        },
        on_agent_down: "closed".into(),
        pin_path: Some("/sys/fs/bpf/waymark".into()),
        pods: vec![PodFacts {
            name: "default/a".into(),
            netns: "/var/run/netns/a".into(),
            port: 15001,
            ipv4_listening: true,
            ipv6_listening: true,
            error: None,
        }],
        config_path: None,
        services: vec![ServiceFacts {
            name: "web".into(),
            endpoints: 2,
            available: 2,
        }],
        certificates: vec![],
        kubernetes: None,
    }
}

#[test]
fn detached_programs_fail_with_the_reattach_hint() {
    let mut f = facts();
    assert_eq!(programs_by_agent(&f).status, Status::Pass);
    f.redirect.programs[1].attached = false;
    let c = programs_by_agent(&f);
    assert_eq!(c.status, Status::Fail);
    assert!(
        c.what.contains("1 of its 6 programs is no longer"),
        "{}",
        c.what
    );
    assert!(c.detail[0].contains("wm_connect4"), "{:?}", c.detail);
    assert!(c.hint.unwrap().contains("restart the agent"));
    f.cgroup_configured = None;
    assert_eq!(programs_by_agent(&f).status, Status::Warn);
}

#[test]
fn pods_without_listeners_fail() {
    let mut f = facts();
    assert_eq!(listeners(&f).status, Status::Pass);
    f.pods[0].ipv6_listening = false;
    assert_eq!(listeners(&f).status, Status::Warn);
    f.pods[0].ipv4_listening = false;
    let c = listeners(&f);
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail[0].contains("127.0.0.1:15001"), "{:?}", c.detail);
}

#[test]
fn services_without_endpoints_fail() {
    let mut f = facts();
    assert_eq!(discovery(&f).status, Status::Pass);
    f.services.push(ServiceFacts {
        name: "empty".into(),
        endpoints: 0,
        available: 0,
    });
    f.services.push(ServiceFacts {
        name: "sick".into(),
        endpoints: 2,
        available: 0,
    });
    let c = discovery(&f);
    assert_eq!(c.status, Status::Fail);
    assert_eq!(c.detail.len(), 2);
    assert!(c.detail[0].contains("empty: no endpoints"));
    assert!(c.detail[1].contains("ejected"));
}

#[test]
fn leaves_expired_fail_and_authorities_are_left_to_their_own_check() {
    assert_eq!(certificates(&[], NOW).status, Status::Skip);
    let cert = |kind, to: f64| CertFacts {
        identity: "spiffe://cluster.local/ns/default/sa/web".into(),
        kind,
        not_before_unix: None,
        not_after_unix: to as i64,
        rotate_after_unix: None,
    };
    let issuer_only = [cert(CertKind::Issuer, NOW - 1.0)];
    assert_eq!(certificates(&issuer_only, NOW).status, Status::Skip);
    let expired = certificates(&[cert(CertKind::Leaf, NOW - 1.0)], NOW);
    assert_eq!(expired.status, Status::Fail);
    assert!(
        expired.detail[0].contains("expired"),
        "{:?}",
        expired.detail
    );
}

#[test]
fn leaves_live_hours_and_must_be_rotated_on_time() {
    let leaf = |rotate: f64, to: f64| CertFacts {
        identity: "spiffe://cluster.local/ns/default/sa/web".into(),
        kind: CertKind::Leaf,
        not_before_unix: None,
        not_after_unix: to as i64,
        rotate_after_unix: Some(rotate as i64),
    };
    let hour = 3600.0;
    // A 24 h leaf, 12 h left: fine although it expires within 7 days.
    assert_eq!(
        certificates(&[leaf(NOW, NOW + 12.0 * hour)], NOW).status,
        Status::Pass
    );
    let overdue = certificates(&[leaf(NOW - hour, NOW + 11.0 * hour)], NOW);
    assert_eq!(overdue.status, Status::Fail);
    assert!(
        overdue.detail[0].contains("rotation is failing"),
        "{:?}",
        overdue.detail
    );
}

#[test]
fn clock_checks_say_what_is_wrong() {
    let f = facts();
    assert_eq!(
        clock(&f, NOW, Some(NOW - 10.0), Some(true)).status,
        Status::Pass
    );
    assert_eq!(clock(&f, NOW, None, Some(false)).status, Status::Warn);
    let future_file = clock(&f, NOW, Some(NOW + 3600.0), Some(true));
    assert_eq!(future_file.status, Status::Fail);
    assert!(future_file.detail[0].contains("in the future"));
    let reset = clock(
        &AgentFacts {
            now_unix: 10.0,
            ..f
        },
        10.0,
        None,
        Some(true),
    );
    assert_eq!(reset.status, Status::Fail);
    assert!(
        reset.detail[0].contains("before 2025"),
        "{:?}",
        reset.detail
    );
}

#[test]
fn the_file_on_disk_is_compared_with_the_config_in_force() {
    let dir = std::env::temp_dir().join(format!("waymark-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.toml");
    let write = |text: &str| std::fs::write(&path, text).unwrap();
    write("[node]\nname = \"n\"\n");
    let cfg = crate::config::Config::from_file(&path).unwrap();
    let in_force = serde_json::to_value(&cfg).unwrap();
    let now = unix(SystemTime::now());
    assert_eq!(config_against(&path, &in_force, now).status, Status::Pass);
    // A comment changes nothing that is in force.
    write("# edited\n[node]\nname = \"n\"\n");
    assert_eq!(config_against(&path, &in_force, now).status, Status::Pass);
    // A restart-only section.
    write("[node]\nname = \"m\"\n");
    let c = config_against(&path, &in_force, now);
    assert_eq!(c.status, Status::Fail);
    assert!(c.detail[0].contains("node"), "{:?}", c.detail);
    assert!(c.hint.unwrap().contains("restart"));
    // A service the agent did not take (long after the change).
    write("[node]\nname = \"n\"\n[[services]]\nname = \"s\"\naddresses = [\"10.96.0.1:80\"]\n");
    let c = config_against(&path, &in_force, now + 60.0);
    assert_eq!(c.status, Status::Fail);
    assert!(c.hint.unwrap().contains("rejected"));
    // Just changed: not applied yet.
    assert_eq!(config_against(&path, &in_force, now).status, Status::Warn);
    // Invalid.
    write("[node]\nname = \"\"\n");
    let c = config_against(&path, &in_force, now);
    assert_eq!(c.status, Status::Fail);
    assert!(c.what.contains("invalid"));
    assert!(
        c.detail.iter().any(|d| d.contains("node.name")),
        "{:?}",
        c.detail
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failing_endpoints_are_warned_about_by_name() {
    use crate::admin::endpoints::{EndpointRow, ServiceEndpoints};
    let row = |addr: &str, failures: u64| EndpointRow {
        addr: addr.into(),
        node: None,
        pod: None,
        zone: None,
        identity: None,
        weight: 1,
        ewma_ms: 1.0,
        latency_samples: 10,
        new: false,
        passed_over: 0,
        connects: 1,
        connect_last_ms: None,
        connect_mean_ms: None,
        connect_max_ms: None,
        in_flight: 0,
        recent_successes: 10,
        recent_failures: failures,
        state: "ok".into(),
        ejected_until: None,
        ejected_for_ms: None,
        ejection_reason: None,
        ejections_total: 0,
        last_error: None,
        tunnel: false,
        direct_because: None,
    };
    let report = |rows| EndpointsReport {
        window_s: 60,
        services: vec![ServiceEndpoints {
            service: "web".into(),
            endpoints: rows,
        }],
    };
    let c = endpoints(Ok(report(vec![row("10.2.0.2:8080", 0)])));
    assert_eq!(c.status, Status::Pass, "{c:?}");
    assert!(c.what.contains("1 endpoint"), "{c:?}");
    let c = endpoints(Ok(report(vec![
        row("10.2.0.2:8080", 0),
        row("10.2.0.250:8080", 1),
    ])));
    assert_eq!(c.status, Status::Warn, "{c:?}");
    assert_eq!(
        c.what,
        "endpoints: 1 of 2 ejected or failing in the last 60s"
    );
    assert_eq!(
        c.detail,
        ["service web endpoint 10.2.0.250:8080 failed 1 of 11 requests in the last 60s"]
    );
    let c = endpoints(Err("404".into()));
    assert_eq!(c.status, Status::Warn, "{c:?}");
}

fn watch(
    synced: bool,
    last: Option<u64>,
    restarts: u64,
    error: Option<&str>,
) -> crate::kube::WatchStatus {
    crate::kube::WatchStatus {
        synced,
        last_sync_unix: last,
        restarts,
        last_error: error.map(str::to_string),
        objects: 3,
    }
}

#[test]
fn kubernetes_discovery_off_is_a_skip_and_each_watch_is_judged() {
    let off = kubernetes(None, NOW);
    assert_eq!(off.len(), 1);
    assert_eq!(off[0].status, Status::Skip);
    let now = NOW as u64;
    let report = crate::kube::Report {
        watches: vec![
            ("pods".into(), watch(true, Some(now - 2), 0, None)),
            (
                "services".into(),
                watch(false, None, 4, Some("403 Forbidden: services is forbidden")),
            ),
            (
                "nodes".into(),
                watch(true, Some(now - 3600), 1, Some("connection refused")),
            ),
            (
                "endpointslices".into(),
                watch(true, Some(now - 5), 2, Some("410 Gone")),
            ),
        ],
        skipped: vec![crate::kube::SkippedReport {
            kind: "service".into(),
            name: "shop/bad".into(),
            reason: "clusterIP \"x\" is not an address".into(),
        }],
        pending_pods: vec![(
            "shop/new".into(),
            "no process of the pod is running yet".into(),
        )],
        services: 1,
        workloads: 2,
        nodes: 2,
    };
    let checks = kubernetes(Some(&report), NOW);
    let statuses: Vec<Status> = checks.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [
            Status::Pass,
            Status::Fail,
            Status::Warn,
            Status::Warn,
            Status::Warn,
            Status::Warn
        ]
    );
    assert!(
        checks[1].hint.as_deref().unwrap().contains("ClusterRole"),
        "{:?}",
        checks[1]
    );
    assert!(checks[2].what.contains("3600 s"), "{}", checks[2].what);
    assert!(checks[3].what.contains("410 Gone"), "{}", checks[3].what);
    assert!(
        checks[4].detail[0].contains("shop/bad"),
        "{:?}",
        checks[4].detail
    );
    assert!(
        checks[5].detail[0].contains("shop/new"),
        "{:?}",
        checks[5].detail
    );
}

#[test]
fn agent_down_mode_says_what_happens_to_pods_without_an_agent() {
    let mut f = facts();
    let closed = agent_down(&f);
    assert_eq!(closed.status, Status::Pass);
    assert!(closed.what.contains("refused"), "{}", closed.what);
    f.on_agent_down = "open".into();
    let open = agent_down(&f);
    assert_eq!(open.status, Status::Warn);
    assert!(open.what.contains("go direct"), "{}", open.what);
    f.on_agent_down = String::new();
    assert_eq!(agent_down(&f).status, Status::Skip);
}
