//! What the shipped DaemonSet (deploy/daemonset.yaml, rendered from the
//! Helm chart) grants the agent is enough: agents started with exactly the
//! capabilities its container gets (`drop: [ALL]` plus its `add:` list as
//! the bounding set) load and attach their programs, enroll pods, carry
//! traffic across nodes in the mTLS tunnel and capture packets.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
use waymark_tests::{require_agent_or_skip, with_world, world_name};

/// The `add:` capabilities of the DaemonSet's container, as written in the
/// rendered manifest (`[BPF, NET_ADMIN, …]`).
fn daemonset_capabilities() -> Result<Vec<String>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("add: ["))
        .context("no `add: [...]` capabilities in the DaemonSet")?;
    let caps: Vec<String> = line
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    ensure!(
        text.contains("drop: [ALL]"),
        "the DaemonSet does not drop every other capability"
    );
    Ok(caps)
}

/// The capability numbers of `names` (`BPF`, `NET_ADMIN`, …) as a CapEff mask.
fn mask(names: &[String]) -> Result<u64> {
    const NUMBERS: &[(&str, u32)] = &[
        ("NET_ADMIN", 12),
        ("NET_RAW", 13),
        ("SYS_PTRACE", 19),
        ("SYS_ADMIN", 21),
        ("SYS_RESOURCE", 24),
        ("PERFMON", 38),
        ("BPF", 39),
    ];
    names.iter().try_fold(0u64, |m, n| {
        let (_, bit) = NUMBERS
            .iter()
            .find(|(name, _)| name == n)
            .with_context(|| format!("capability {n} is not known to this test"))?;
        Ok(m | 1 << bit)
    })
}

/// This process's capability bounding set.
fn own_bounding_set() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .context("no CapBnd line")?;
    Ok(u64::from_str_radix(bnd.trim(), 16)?)
}

#[test]
fn the_agent_works_with_only_the_daemonsets_capabilities() {
    require_agent_or_skip!();
    let caps = daemonset_capabilities().unwrap_or_else(|e| panic!("{e:#}"));
    // What this machine can give at all (a sandbox may hold back some, as
    // SYS_RESOURCE here: the agent then runs without raising its limit).
    let ours = own_bounding_set().unwrap_or_else(|e| panic!("{e:#}"));
    let want = mask(&caps).unwrap_or_else(|e| panic!("{e:#}")) & ours;
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("waymark-caps-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("a temporary directory");
    let wrapper = dir.0.join("waymark-daemonset-caps");
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set -all,{} --inh-caps -all -- {} \"$@\"\n",
            bounding.join(","),
            waymark_tests::world::agent::waymark_bin()
                .unwrap_or_else(|e| panic!("{e:#}"))
                .display()
        ),
    )
    .expect("writing the wrapper");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .expect("making the wrapper executable");
    }
    let echo = Service::new("echo", "10.96.0.70:7000")
        .protocol("opaque")
        .endpoint(Endpoint::meshed(1, 0, 7000));
    let b = meshed_pair(world_name!(), 1, &[echo]).agent_bin(&wrapper);
    with_world(b, |world| {
        for node in world.nodes() {
            let pid = node.agent_pid().context("no agent")?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(str::trim)
                .context("no CapEff line")?;
            let eff = u64::from_str_radix(eff, 16)?;
            ensure!(
                eff == want,
                "{}'s agent runs with CapEff {eff:#x}, the DaemonSet's {caps:?} are {want:#x}",
                node.name()
            );
        }
        let _echo = world.pod(1, 0).serve(&mut waymark_tests::testpeer([
            "echo",
            "--listen",
            "0.0.0.0:7000",
        ]))?;
        let out = world.pod(0, 0).run_timeout(
            &mut waymark_tests::testpeer([
                "client",
                "--connect",
                "10.96.0.70:7000",
                "--bytes",
                "100000",
                "--timeout",
                "5s",
            ]),
            Duration::from_secs(20),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("testpeer printed {text}"))?;
        ensure!(
            report["identical"] == true,
            "no traffic across nodes: {report}"
        );
        let tunnelled = waymark_tests::metric(world.node(1), "waymark_tunnel_streams_total", &[])?;
        ensure!(tunnelled >= 1.0, "the exchange did not cross in the tunnel");
        // NET_RAW: a packet capture in the pod's namespace.
        let node = world.node(0);
        let pcap = world.dir().join("caps.pcapng");
        let out = node.run_timeout(
            Command::new(waymark_tests::world::agent::waymark_bin()?)
                .args(["capture", "--admin"])
                .arg(node.admin_socket())
                .args(["--pod", "default/n0p0", "-d", "1s", "-w"])
                .arg(&pcap)
                .stdin(Stdio::null()),
            Duration::from_secs(20),
        )?;
        ensure!(
            out.status.success(),
            "capture failed with the DaemonSet's capabilities: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            std::fs::metadata(&pcap)?.len() > 0,
            "the capture wrote nothing"
        );
        let log = node.agent_log();
        ensure!(
            log.contains("kernel diagnostics programs attached attached=6 of=6"),
            "kernel diagnostics did not attach with the DaemonSet's capabilities:\n{log}"
        );
        Ok(())
    });
}
