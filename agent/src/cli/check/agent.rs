//! The agent checks of `waymark check`: the agent's own facts (`GET
//! /check`), the kernel's view of its programs asked independently, the
//! config file on disk against the config in force, and the clock.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::super::client::{AdminClient, block_on};
use super::Check;
use crate::admin::check::{AgentFacts, CertFacts, CertKind, unix};
use crate::admin::endpoints::{EndpointsReport, warnings};
use crate::redirect::query::{EXPECTED, program_names};

/// No clock reads earlier than this (2025-01-01T00:00:00Z), when this code
/// was written: such a clock was reset (an RTC-less boot without NTP).
const CLOCK_FLOOR_UNIX: f64 = 1_735_689_600.0;

pub fn checks(client: &AdminClient, expiry_days: u64) -> Vec<Check> {
    let facts: AgentFacts = match block_on(client.get_json("/check")) {
        Ok(f) => f,
        Err(e) => {
            return vec![Check::fail(
                format!("admin API: {e:#}"),
                "start the agent (`waymark agent --config FILE`), or point --admin (WAYMARK_ADMIN) at its admin address",
            )];
        }
    };
    let now = unix(SystemTime::now());
    let config_mtime = facts
        .config_path
        .as_deref()
        .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .map(unix);
    let in_force = block_on(client.get_text("/config"));
    vec![
        Check::pass(format!(
            "admin API reachable: agent of {} (pid {}, version {})",
            facts.node, facts.pid, facts.version
        )),
        ready(&facts),
        programs_by_agent(&facts),
        programs_by_kernel(&facts),
        agent_down(&facts),
        listeners(&facts),
        config(&facts, in_force.map_err(|e| format!("{e:#}")), now),
        discovery(&facts),
        endpoints(block_on(client.get_json("/endpoints")).map_err(|e| format!("{e:#}"))),
        certificates(&facts.certificates, now),
    ]
    .into_iter()
    .chain(kubernetes(facts.kubernetes.as_ref(), now))
    .chain(super::authorities::checks(
        &facts.certificates,
        now,
        expiry_days,
    ))
    .chain([clock(&facts, now, config_mtime, ntp_synchronized())])
    .collect()
}

fn ready(f: &AgentFacts) -> Check {
    if f.pending.is_empty() {
        return Check::pass("agent is ready");
    }
    let hint = if f.pending.iter().any(|p| p == "draining") {
        "the agent is shutting down (it got SIGTERM or SIGINT); a new one must take over"
    } else {
        "the agent has not finished starting; if this stays, its log says what it waits for"
    };
    Check::fail(
        format!("agent is not ready: {}", f.pending.join(", ")),
        hint,
    )
}

/// What `redirect.on_agent_down` means for this node's pods.
fn agent_down(f: &AgentFacts) -> Check {
    let pins = f
        .pin_path
        .as_deref()
        .map_or("the pin directory".into(), |p| p.display().to_string());
    match f.on_agent_down.as_str() {
        "closed" => Check::pass(format!(
            "redirect.on_agent_down = closed: while no agent runs (a crash, a stop without a successor) \
             the programs stay attached through the links pinned in {pins}, so pods' connections are \
             refused at once; none bypasses mTLS or authorization"
        )),
        "open" => Check::warn(
            "redirect.on_agent_down = open: while no agent runs, the programs are detached and pods' \
             connections go direct, without mTLS, authorization or metrics",
            "set redirect.on_agent_down = \"closed\" to refuse them instead (a rollout never detaches either way)",
        ),
        _ => Check::skip("redirect.on_agent_down: this agent does not say (an older version)"),
    }
}

const REATTACH: &str = "pods' connections bypass the proxy while the programs are detached; restart the agent (it attaches them when it starts), and find out who detached them (`bpftool link detach`, or the cgroup was removed and created again)";

fn unset_cgroup() -> Check {
    Check::warn(
        "redirect.cgroup is not set: the programs are attached nowhere and no pod traffic is redirected",
        "set redirect.cgroup to the cgroup v2 directory that holds the node's pods",
    )
}

fn programs_by_agent(f: &AgentFacts) -> Check {
    if f.cgroup_configured.is_none() {
        return unset_cgroup();
    }
    let Some(cgroup) = &f.redirect.cgroup else {
        return Check::fail(
            "the agent's programs are not attached",
            "the agent attaches at start and detaches when it shuts down; see its log",
        );
    };
    let lost: Vec<String> = f
        .redirect
        .programs
        .iter()
        .filter(|p| !p.attached)
        .map(|p| {
            format!(
                "{} ({}, program id {}): {}",
                p.name,
                p.attach_type,
                p.id.map_or("?".into(), |i| i.to_string()),
                p.error.as_deref().unwrap_or("not listed on the cgroup")
            )
        })
        .collect();
    if lost.is_empty() {
        Check::pass(format!(
            "agent: the kernel lists its {} programs on {}",
            f.redirect.programs.len(),
            cgroup.display()
        ))
    } else {
        Check::fail(
            format!(
                "agent: {} of its {} programs {} no longer attached to {}",
                lost.len(),
                f.redirect.programs.len(),
                if lost.len() == 1 { "is" } else { "are" },
                cgroup.display()
            ),
            REATTACH,
        )
        .with_detail(lost)
    }
}

/// Asks the kernel directly which programs are attached to the cgroup,
/// by name, without relying on the agent's account.
fn programs_by_kernel(f: &AgentFacts) -> Check {
    if f.cgroup_configured.is_none() {
        return Check::skip("kernel: no cgroup to look at (redirect.cgroup is not set)");
    }
    let Some(cgroup) = &f.redirect.cgroup else {
        return Check::skip("kernel: the agent reports no attached cgroup");
    };
    let names = program_names();
    let mut missing = Vec::new();
    let mut seen = Vec::new();
    for e in &EXPECTED {
        match e.attached_ids(cgroup) {
            Ok(ids) => {
                let here: Vec<String> = ids
                    .iter()
                    .map(|id| names.get(id).cloned().unwrap_or_else(|| format!("id {id}")))
                    .collect();
                if here.iter().any(|n| n == e.name) {
                    seen.push(e.attach_type);
                } else {
                    missing.push(format!(
                        "{}: {} is not attached (attached: {})",
                        e.attach_type,
                        e.name,
                        if here.is_empty() {
                            "nothing".into()
                        } else {
                            here.join(", ")
                        }
                    ));
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                return Check::warn(
                    format!(
                        "kernel: cannot list the programs on {}: {err}",
                        cgroup.display()
                    ),
                    "BPF_PROG_QUERY needs CAP_NET_ADMIN: run the check as root",
                );
            }
            Err(err) => missing.push(format!("{}: cannot ask the kernel: {err}", e.attach_type)),
        }
    }
    if missing.is_empty() {
        Check::pass(format!(
            "kernel: {} has waymark's {} attached",
            cgroup.display(),
            seen.join(", ")
        ))
    } else {
        Check::fail(
            format!(
                "kernel: {} lacks {} of waymark's {} programs",
                cgroup.display(),
                missing.len(),
                EXPECTED.len()
            ),
            REATTACH,
        )
        .with_detail(missing)
    }
}

fn listeners(f: &AgentFacts) -> Check {
    if f.pods.is_empty() {
        return Check::skip("pod listeners: no pods are configured");
    }
    let mut down = Vec::new();
    let mut no_v6 = Vec::new();
    for p in &f.pods {
        match (&p.error, p.ipv4_listening) {
            (Some(e), _) => down.push(format!("{} ({}): {e}", p.name, p.netns.display())),
            (None, false) => down.push(format!(
                "{}: nothing listens on 127.0.0.1:{} in {}",
                p.name,
                p.port,
                p.netns.display()
            )),
            (None, true) if !p.ipv6_listening => no_v6.push(p.name.clone()),
            _ => {}
        }
    }
    if !down.is_empty() {
        return Check::fail(
            format!("{} of {} pods have no listener", down.len(), f.pods.len()),
            "the agent binds each pod's listener at start, inside the pod's network namespace; if the pod was re-created its namespace is new: restart the agent",
        )
        .with_detail(down);
    }
    if !no_v6.is_empty() {
        return Check::warn(
            format!(
                "{} of {} pods listen on IPv4 only: {}",
                no_v6.len(),
                f.pods.len(),
                no_v6.join(", ")
            ),
            "these pods have no ::1, so their IPv6 connections are not proxied",
        );
    }
    Check::pass(format!(
        "every pod's listener is bound ({}, 127.0.0.1 and ::1)",
        plural(f.pods.len(), "pod")
    ))
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Top-level sections whose values differ between two config documents.
fn differing_sections(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["(whole file)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Sections the agent applies on reload without a restart.
const RELOADABLE: [&str; 2] = ["services", "balancer"];

fn config(f: &AgentFacts, in_force: Result<String, String>, now: f64) -> Check {
    let Some(path) = &f.config_path else {
        return Check::pass("config: the embedded default is in force (no file)");
    };
    let in_force: Value =
        match in_force.and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string())) {
            Ok(v) => v,
            Err(e) => {
                return Check::fail(
                    format!("config: cannot read the config in force: {e}"),
                    "GET /config failed; see the agent's log",
                );
            }
        };
    config_against(path, &in_force, now)
}

fn config_against(path: &Path, in_force: &Value, now: f64) -> Check {
    let shown = path.display();
    let on_disk = match crate::config::Config::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                format!("config: {shown} on disk is invalid; the agent keeps running its previous config"),
                format!("fix the file (`waymark config check {shown}` lists every problem)"),
            )
            .with_detail(e.to_string().lines().map(str::to_string).collect::<Vec<_>>());
        }
    };
    let on_disk = serde_json::to_value(&on_disk).unwrap_or(Value::Null);
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|m| (now - unix(m)).max(0.0))
        .unwrap_or(f64::INFINITY);
    let diff = differing_sections(&on_disk, in_force);
    if diff.is_empty() {
        return Check::pass(format!(
            "config: {shown} is valid and is the config in force (changed {} ago)",
            humantime::format_duration(Duration::from_secs(age as u64))
        ));
    }
    let detail = vec![format!("sections that differ: {}", diff.join(", "))];
    if diff.iter().all(|s| RELOADABLE.contains(&s.as_str())) {
        if age < 3.0 {
            return Check::warn(
                format!("config: {shown} changed {age:.1}s ago and is not applied yet"),
                "the agent looks for changes every second; run the check again",
            )
            .with_detail(detail);
        }
        return Check::fail(
            format!("config: {shown} is valid but not the config in force"),
            "the agent reloads the file when it changes and on SIGHUP; it may have rejected it (building the service table failed): see its log and waymark_config_reloads_total{result=\"failure\"}",
        )
        .with_detail(detail);
    }
    Check::fail(
        format!(
            "config: {shown} differs from the config in force in sections only a restart applies"
        ),
        "restart the agent to apply them (only services and balancer are reloaded live)",
    )
    .with_detail(detail)
}

fn discovery(f: &AgentFacts) -> Check {
    if f.services.is_empty() {
        return Check::pass(
            "discovery: no services (every destination is forwarded as opaque TCP)",
        );
    }
    let mut bad = Vec::new();
    for s in &f.services {
        if s.endpoints == 0 {
            bad.push(format!("{}: no endpoints", s.name));
        } else if s.available == 0 {
            bad.push(format!(
                "{}: all {} endpoints ejected by failure accrual",
                s.name, s.endpoints
            ));
        }
    }
    if bad.is_empty() {
        Check::pass(format!(
            "discovery: endpoints available for every service ({})",
            plural(f.services.len(), "service")
        ))
    } else {
        Check::fail(
            format!("discovery: {} of {} services cannot be served", bad.len(), f.services.len()),
            "a service without endpoints answers 503 (no endpoints): add endpoints to its [[services]] entry; ejected endpoints keep failing: look at them (waymark_endpoint_* metrics, their logs)",
        )
        .with_detail(bad)
    }
}

/// Endpoints the balancer saw fail in the last window, or has ejected,
/// each named (`waymark endpoints` has the rest of the story).
/// A resource's picture older than this without an event or bookmark
/// means the watch is stuck (the API server sends bookmarks about once a
/// minute, and the watcher restarts a watch every five minutes or less).
const STALE_WATCH_S: u64 = 10 * 60;

/// Kubernetes discovery: every watch listed and recent, nothing skipped,
/// no local pod waiting for its sandbox.
fn kubernetes(report: Option<&crate::kube::Report>, now: f64) -> Vec<Check> {
    let Some(r) = report else {
        return vec![Check::skip(
            "kubernetes: discovery is off (pods, services and nodes come from the config file)",
        )];
    };
    let mut out = Vec::new();
    for (resource, w) in &r.watches {
        let age = w.last_sync_unix.map(|t| (now as u64).saturating_sub(t));
        let error = w.last_error.as_deref().unwrap_or("none");
        if !w.synced {
            let hint = if error.contains("403") || error.contains("forbidden") {
                format!(
                    "the agent's service account may not list/watch {resource}: grant it in the agent's ClusterRole (deploy/ has one)"
                )
            } else {
                "the agent keeps retrying; check that the API server is reachable from the node and the agent's credentials (kubeconfig or in-cluster service account)".to_string()
            };
            out.push(
                Check::fail(
                    format!("kubernetes: {resource} not listed yet ({} failed attempts; last error: {error})", w.restarts),
                    hint,
                ),
            );
        } else if age.is_some_and(|a| a > STALE_WATCH_S) {
            out.push(Check::warn(
                format!(
                    "kubernetes: nothing heard about {resource} for {} s (last error: {error}); the agent proxies on its last picture",
                    age.unwrap_or_default()
                ),
                "check that the API server is up and reachable from the node",
            ));
        } else if w.restarts > 0 {
            out.push(Check::warn(
                format!(
                    "kubernetes: {resource} listed ({} objects, last sync {} s ago) after {} watch restarts; last error: {error}",
                    w.objects,
                    age.unwrap_or_default(),
                    w.restarts
                ),
                "the agent kept its last picture while the watch was down and relisted; repeated restarts point at the API server or the network to it",
            ));
        } else {
            out.push(Check::pass(format!(
                "kubernetes: {resource} listed ({} objects, last sync {} s ago)",
                w.objects,
                age.unwrap_or_default()
            )));
        }
    }
    if r.skipped.is_empty() {
        out.push(Check::pass(format!(
            "kubernetes: {} services, {} meshed workload addresses, {} nodes; no object skipped",
            r.services, r.workloads, r.nodes
        )));
    } else {
        out.push(
            Check::warn(
                format!("kubernetes: {} objects skipped", r.skipped.len()),
                "each is left out (the rest works); fix the object or expect its traffic to go direct",
            )
            .with_detail(
                r.skipped
                    .iter()
                    .map(|s| format!("{} {}: {}", s.kind, s.name, s.reason)),
            ),
        );
    }
    if !r.pending_pods.is_empty() {
        out.push(
            Check::warn(
                format!(
                    "kubernetes: {} meshed pods of this node are not enrolled yet",
                    r.pending_pods.len()
                ),
                "a pod is enrolled once its sandbox runs and its network namespace holds its IP; if this stays, is host /proc mounted at kubernetes.proc?",
            )
            .with_detail(r.pending_pods.iter().map(|(p, why)| format!("{p}: {why}"))),
        );
    }
    out
}

fn endpoints(report: Result<EndpointsReport, String>) -> Check {
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            return Check::warn(
                format!("endpoints: cannot read the balancer's view: {e}"),
                "an agent older than this CLI has no /endpoints: upgrade it",
            );
        }
    };
    let total: usize = report.services.iter().map(|s| s.endpoints.len()).sum();
    let bad = warnings(&report);
    if bad.is_empty() {
        Check::pass(format!(
            "endpoints: none ejected or failing in the last {}s ({})",
            report.window_s,
            plural(total, "endpoint")
        ))
    } else {
        Check::warn(
            format!(
                "endpoints: {} of {total} ejected or failing in the last {}s",
                bad.len(),
                report.window_s
            ),
            "`waymark endpoints SERVICE` shows each endpoint's state and last error; an endpoint whose pod is gone keeps failing until it leaves the service's endpoints",
        )
        .with_detail(bad)
    }
}

/// How late a leaf's rotation may be before the check calls it failing.
const ROTATION_GRACE_SECS: f64 = 60.0;

/// The workload leaves (issuer and anchors: [`super::authorities`]).
fn certificates(certs: &[CertFacts], now: f64) -> Check {
    let leaves: Vec<&CertFacts> = certs.iter().filter(|c| c.kind == CertKind::Leaf).collect();
    if leaves.is_empty() {
        return Check::skip("certificates: no workload identities configured");
    }
    let mut bad = Vec::new();
    for c in &leaves {
        let to = c.not_after_unix as f64;
        if let Some(from) = c.not_before_unix.map(|f| f as f64)
            && now < from
        {
            bad.push(format!(
                "{}: not valid until {}: this clock is behind the issuer's",
                c.identity,
                at(from)
            ));
        } else if now >= to {
            bad.push(format!("{}: expired at {}", c.identity, at(to)));
        } else if let Some(r) = c.rotate_after_unix.map(|r| r as f64)
            && now > r + ROTATION_GRACE_SECS
        {
            bad.push(format!(
                "{}: due for rotation since {}, expires at {}: rotation is failing",
                c.identity,
                at(r),
                at(to)
            ));
        }
    }
    if bad.is_empty() {
        Check::pass(format!(
            "certificates: {} valid (workload leaves, rotated on time)",
            leaves.len()
        ))
    } else {
        Check::fail(
            format!("certificates: {} of {} workload leaves need attention", bad.len(), leaves.len()),
            "a leaf whose rotation is overdue or that expired means the agent cannot issue: see its log (and the issuer check below); a certificate not valid yet means this clock is wrong",
        )
        .with_detail(bad)
    }
}

fn at(unix: f64) -> String {
    humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0)),
    )
    .to_string()
}

/// The kernel's word on NTP: `adjtimex` returns TIME_ERROR (5) while the
/// clock is not synchronized.
fn ntp_synchronized() -> Option<bool> {
    // SAFETY: a zeroed timex with modes 0 only reads the state.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::adjtimex(&mut t) };
    (rc >= 0).then_some(rc != libc::TIME_ERROR)
}

/// What is checked: the clock is past a floor no correct clock is before,
/// the agent's clock agrees with this one, and no file the agent depends
/// on is dated in the future; whether NTP disciplines it is the kernel's
/// word. It does not compare with any outside time source.
fn clock(f: &AgentFacts, now: f64, config_mtime: Option<f64>, ntp: Option<bool>) -> Check {
    let mut bad = Vec::new();
    if now < CLOCK_FLOOR_UNIX {
        bad.push(format!(
            "it reads {}, before {}",
            at(now),
            at(CLOCK_FLOOR_UNIX)
        ));
    }
    if (f.now_unix - now).abs() > 5.0 {
        bad.push(format!(
            "the agent's clock reads {} and this one {}",
            at(f.now_unix),
            at(now)
        ));
    }
    if let Some(m) = config_mtime
        && m > now + 1.0
    {
        bad.push(format!("the config file is dated {}, in the future", at(m)));
    }
    let what = format!(
        "clock: {} (after {}, agrees with the agent's, no config file from the future)",
        at(now),
        at(CLOCK_FLOOR_UNIX)
    );
    if !bad.is_empty() {
        return Check::fail(
            "clock: this node's clock is wrong",
            "set the clock and run an NTP client (chrony, systemd-timesyncd): certificates are checked against it",
        )
        .with_detail(bad);
    }
    match ntp {
        Some(false) => Check::warn(
            format!("{what}; the kernel says it is not NTP-synchronized"),
            "run an NTP client (chrony, systemd-timesyncd) so the clock does not drift",
        ),
        _ => Check::pass(what),
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
