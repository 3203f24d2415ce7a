//! The kernel's original-destination maps cannot be filled by one pod:
//! connects that fail before their SYN leaves (here: a 4-tuple already in
//! use, `EADDRNOTAVAIL`) leave no entry behind, and another pod's
//! connections keep finding theirs. They need root and eBPF; see
//! tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use anyhow::{Context, ensure};
use serde_json::Value;
use waymark_tests::{
    DEFAULT_PATIENCE, World, eventually, metric, python, require_agent_or_skip, testpeer,
    with_world, world_name,
};

/// Holds one redirected connection from `<pod ip>:40000`, then makes
/// `count` more sockets bound to the same address and port connect to the
/// same destination: each is redirected by connect4 (which records its
/// destination) and then fails with EADDRNOTAVAIL before any SYN, because
/// the 4-tuple to the agent's listener is taken. Prints the failures.
const CHURN: &str = r#"
import errno, socket, sys
src, dst, count = sys.argv[1], (sys.argv[2], int(sys.argv[3])), int(sys.argv[4])
def sock():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((src, 40000))
    return s
held = sock()
held.connect(dst)
failed = 0
for _ in range(count):
    s = sock()
    try:
        s.connect(dst)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            raise
        failed += 1
    s.close()
print("failed", failed, flush=True)
"#;

const BY_COOKIE: [(&str, &str); 1] = [("map", "original_dst_by_cookie")];

#[test]
fn failing_connects_leave_no_cookie_entries_and_other_pods_are_unaffected() {
    require_agent_or_skip!();
    const CHURNS: usize = 5000;
    let b = World::builder(world_name!()).nodes(1).pods_per_node(3);
    with_world(b, |world| {
        let node = world.node(0);
        let (churner, victim, server) = (world.pod(0, 0), world.pod(0, 1), world.pod(0, 2));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let before = metric(node, "waymark_redirect_map_entries", &BY_COOKIE)?;

        let out = churner.run_ok(python().args([
            "-c",
            CHURN,
            &churner.ip().to_string(),
            &server.ip().to_string(),
            "7000",
            &CHURNS.to_string(),
        ]))?;
        ensure!(
            out.trim() == format!("failed {CHURNS}"),
            "every churned connect must fail before its SYN: {out}"
        );
        // The failed sockets are gone, and so are their entries.
        eventually(DEFAULT_PATIENCE, || {
            let entries = metric(node, "waymark_redirect_map_entries", &BY_COOKIE)?;
            ensure!(
                entries <= before + 10.0,
                "{entries} cookie entries after {CHURNS} failed connects (before: {before})"
            );
            Ok(())
        })?;

        let out = victim.run_ok(&mut testpeer([
            "many",
            "--connect",
            &format!("{}:7000", server.ip()),
            "--count",
            "1000",
            "--concurrency",
            "50",
        ]))?;
        let report: Value = serde_json::from_str(out.trim()).context(out.clone())?;
        ensure!(report["ok"] == 1000, "{report}");
        let lost = metric(
            node,
            "waymark_outbound_no_original_dst_total",
            &[("pod", victim.name())],
        )?;
        ensure!(
            lost == 0.0,
            "{lost} of the other pod's connections lost their destination"
        );
        Ok(())
    });
}
