//! Tests of the test world itself, without the waymark agent (except the
//! last one, which checks that real agents start in it).
//! They need root; see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use waymark_tests::world::{cgroup, cleanup, net, state};
use waymark_tests::{
    Pod, Signal, World, metric_value, require_agent_or_skip, require_root_or_skip, testpeer,
    testpeer_bin, world_name,
};

/// Runs `testpeer client ARGS…` in `pod` and parses its JSON report.
fn client(pod: &Pod, args: &[&str]) -> Result<Value> {
    let out = pod.run(&mut testpeer(["client"].iter().chain(args)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "testpeer client said {stdout:?} ({}), stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn no_world_left(netns_prefix: &str, cgroup_root: &Path, dir: &Path, pids: &[i32]) -> Result<()> {
    let left = net::list_netns(netns_prefix);
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    ensure!(
        !cgroup_root.exists(),
        "cgroup left: {}",
        cgroup_root.display()
    );
    ensure!(!dir.exists(), "world dir left: {}", dir.display());
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie nobody reaped yet (holds no namespace).
        ensure!(
            stat.is_empty() || stat.contains(") Z "),
            "process {pid} still alive: {stat}"
        );
    }
    Ok(())
}

#[test]
fn pods_reach_pods_across_nodes_v4_and_v6() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let world = World::builder("pods_reach_across_nodes")
        .agent(false)
        .build()?;
    let (a, b, b2) = (world.pod(0, 0), world.pod(1, 0), world.pod(1, 1));
    let echo = b.serve(&mut testpeer(["echo", "--listen", "[::]:7000"]))?;

    for target in [format!("{}:7000", b.ip()), format!("[{}]:7000", b.ip6())] {
        let r = client(
            a,
            &["--connect", &target, "--bytes", "300000", "--seed", "42"],
        )?;
        ensure!(
            r["error"].is_null() && r["identical"] == true,
            "{target}: {r}"
        );
        ensure!(r["received"] == 300000, "{r}");
        ensure!(
            r["peer"] == target.as_str(),
            "no address translation expected: {r}"
        );
    }
    // Same node, through the node's bridge.
    let r = client(
        b2,
        &["--connect", &format!("{}:7000", b.ip()), "--bytes", "1000"],
    )?;
    ensure!(r["identical"] == true, "{r}");

    // The server saw the client's own addresses.
    let lines = echo.lines();
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("accept [::ffff:{}]:", a.ip()))),
        "{lines:?}"
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("accept [{}]:", a.ip6()))),
        "{lines:?}"
    );

    // whoami, read-only.
    let _who = b2.serve(&mut testpeer(["whoami", "--listen", "0.0.0.0:7001"]))?;
    let r = client(
        a,
        &["--connect", &format!("{}:7001", b2.ip()), "--read-only"],
    )?;
    ensure!(r["error"].is_null(), "{r}");
    ensure!(
        r["text"].as_str().unwrap_or_default().trim()
            == format!("peer={}", r["local"].as_str().unwrap()),
        "{r}"
    );
    Ok(())
}

#[test]
fn testpeer_halfclose_many_and_errors() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let world = World::builder("testpeer_modes")
        .nodes(2)
        .pods_per_node(1)
        .agent(false)
        .build()?;
    let (a, b) = (world.pod(0, 0), world.pod(1, 0));
    let _hc = b.serve(&mut testpeer([
        "halfclose-server",
        "--listen",
        "0.0.0.0:7002",
    ]))?;
    let r = client(
        a,
        &["--connect", &format!("{}:7002", b.ip()), "--bytes", "5000"],
    )?;
    ensure!(r["error"].is_null() && r["sent"] == 5000, "{r}");
    ensure!(r["text"] == "got 5000 bytes\n", "{r}");

    let _echo = b.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
    let out = a.run_ok(&mut testpeer([
        "many",
        "--connect",
        &format!("{}:7000", b.ip()),
        "--count",
        "300",
        "--concurrency",
        "30",
        "--bytes",
        "2000",
    ]))?;
    let r: Value = serde_json::from_str(out.trim())?;
    ensure!(
        r["ok"] == 300 && r["failed"] == 0 && r["first_error"].is_null(),
        "{r}"
    );

    // Refused: an error in the JSON and exit code 2, quickly.
    let out = a.run(&mut testpeer([
        "client",
        "--connect",
        &format!("{}:7999", b.ip()),
        "--bytes",
        "10",
    ]))?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        r["error"].as_str().unwrap_or_default().contains("refused"),
        "{r}"
    );
    // Nobody there at all: the overall timeout ends it.
    let out = a.run(&mut testpeer([
        "client",
        "--connect",
        "10.2.0.99:7000",
        "--timeout",
        "300ms",
    ]))?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        r["error"].as_str().unwrap_or_default().contains("TimedOut"),
        "{r}"
    );
    Ok(())
}

#[test]
fn processes_land_in_their_cgroup_and_netns() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let root_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?;
    let world = World::builder(world_name!())
        .nodes(2)
        .pods_per_node(2)
        .agent(false)
        .build()?;
    let mount = cgroup::cgroup2_mount()?;
    // The name is the test's, with `-TAG` when WAYMARK_WORLD_TAG is set.
    let name = world.name().to_string();
    ensure!(name.starts_with("processes_land_in_their_cgroup_and_netns"));
    ensure!(world.cgroup_root() == mount.join(format!("waymark-{name}")));

    let pod = world.pod(1, 1);
    let child = pod.spawn(Command::new("sleep").arg("60"))?;
    let pid = child.id() as i32;
    let cg = cgroup::process_cgroup(pid).context("no cgroup line")?;
    ensure!(
        cg == format!("/waymark-{name}/node1/pod1"),
        "pod process in cgroup {cg}"
    );
    ensure!(mount.join(cg.trim_start_matches('/')) == pod.cgroup_path());
    ensure!(cgroup::procs(pod.cgroup_path()).contains(&pid));
    ensure!(
        net::process_netns_inode(pid) == net::netns_inode(&pod.netns_path()),
        "pod process netns"
    );
    ensure!(pod.netns_name() == format!("wm{}-n1p1", world.id()));
    // A Command placed in one pod cannot be spawned again in another one
    // (its hook still points at the first pod's files).
    let mut once = Command::new("true");
    world.pod(0, 0).run_ok(&mut once)?;
    let e = pod
        .spawn(&mut once)
        .err()
        .context("a reused Command must fail")?;
    ensure!(format!("{e:#}").contains("spawned twice"), "{e:#}");

    // On the node: its netns, the caller's cgroup.
    let node = world.node(0);
    let child = node.spawn(Command::new("sleep").arg("60"))?;
    let npid = child.id() as i32;
    ensure!(
        net::process_netns_inode(npid) == net::netns_inode(&node.netns_path()),
        "node process netns"
    );
    ensure!(cgroup::process_cgroup(npid) == cgroup::process_cgroup(std::process::id() as i32));

    // The pod sees the cgroup2 mount (no /sys remount) and its own links.
    let out = pod.run_ok(Command::new("cat").arg("/proc/self/cgroup"))?;
    ensure!(
        out.contains(&format!("0::/waymark-{name}/node1/pod1")),
        "{out}"
    );
    ensure!(mount.join("cgroup.procs").exists());
    let links = net::interfaces_in(&pod.netns_path())?;
    ensure!(links == ["eth0", "lo"], "{links:?}");
    let links = net::interfaces_in(&node.netns_path())?;
    ensure!(links == ["eth0", "lo", "p0", "p1", "pods"], "{links:?}");

    // Forwarding is on inside the nodes, not in pods, and the host is untouched.
    for (ns, want) in [(node.netns_path(), "1"), (pod.netns_path(), "0")] {
        ensure!(net::read_sysctl_in(&ns, "net.ipv4.ip_forward")? == want);
        ensure!(net::read_sysctl_in(&ns, "net.ipv6.conf.all.forwarding")? == want);
    }
    ensure!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")? == root_forward);
    Ok(())
}

#[test]
fn world_is_removed_after_drop_and_root_netns_is_untouched() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let before = net::interfaces_here();
    let world = World::builder("removed_after_drop").agent(false).build()?;
    ensure!(
        net::interfaces_here() == before,
        "the world added interfaces to the root netns"
    );
    let prefix = state::netns_prefix(world.id());
    ensure!(
        net::list_netns(&prefix).len() == 1 + 2 + 4,
        "{:?}",
        net::list_netns(&prefix)
    );
    let (cg, dir) = (world.cgroup_root().to_path_buf(), world.dir().to_path_buf());
    ensure!(cg.is_dir() && dir.join("state.json").is_file());

    let mut pids = Vec::new();
    // A child that ignores SIGTERM, and one that leaves a grandchild behind.
    let c = world
        .pod(0, 1)
        .spawn(Command::new("sh").args(["-c", "trap '' TERM; sleep 60 & wait"]))?;
    pids.push(c.id() as i32);
    let c = world.node(1).spawn(
        Command::new("sh")
            .args(["-c", "sleep 61 & echo $!; sleep 60"])
            .stdout(std::process::Stdio::piped()),
    )?;
    pids.push(c.id() as i32);
    let mut line = String::new();
    BufReader::new(c.stdout.unwrap()).read_line(&mut line)?;
    pids.push(line.trim().parse()?);
    let echo = world
        .pod(1, 0)
        .serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
    pids.push(echo.pid());
    // The Server outlives the world: dropping it afterwards must be harmless.
    drop(world);
    no_world_left(&prefix, &cg, &dir, &pids)?;
    drop(echo);
    ensure!(
        net::interfaces_here() == before,
        "root netns interfaces changed"
    );
    Ok(())
}

#[test]
fn world_is_removed_when_a_test_panics() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let mut seen: Option<(String, String, PathBuf, PathBuf, i32)> = None;
    let r = catch_unwind(AssertUnwindSafe(|| {
        let world = World::builder("removed_after_panic")
            .nodes(1)
            .pods_per_node(1)
            .agent(false)
            .build()
            .unwrap();
        let c = world
            .pod(0, 0)
            .spawn(Command::new("sleep").arg("60"))
            .unwrap();
        seen = Some((
            world.name().to_string(),
            state::netns_prefix(world.id()),
            world.cgroup_root().to_path_buf(),
            world.dir().to_path_buf(),
            c.id() as i32,
        ));
        panic!("a test fails while its world runs");
    }));
    ensure!(r.is_err());
    let (name, prefix, cg, dir, pid) = seen.context("the closure did not get far")?;
    // The directory (with logs) is kept after a failure; everything else goes.
    ensure!(dir.exists(), "logs should be kept after a panic");
    ensure!(!dir.join("state.json").exists());
    cleanup::remove_world(&name, Duration::from_secs(1))?;
    no_world_left(&prefix, &cg, &dir, &[pid])
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let world = World::builder("crashed_run")
        .nodes(1)
        .pods_per_node(1)
        .agent(false)
        .build()?;
    let c = world.pod(0, 0).spawn(Command::new("sleep").arg("60"))?;
    let old_pid = c.id() as i32;
    // The name with `-TAG` when WAYMARK_WORLD_TAG is set.
    let name = world.name().to_string();
    world.detach(); // as if the test process had been killed
    ensure!(!net::list_netns(&state::netns_prefix(&state::world_id(&name))).is_empty());

    // The next world of the same name clears them first.
    let world = World::builder("crashed_run")
        .nodes(1)
        .pods_per_node(2)
        .agent(false)
        .build()?;
    ensure!(
        net::process_netns_inode(old_pid).is_none(),
        "old pod process survived"
    );
    ensure!(world.node(0).pods().len() == 2);
    let (prefix, cg, dir) = (
        state::netns_prefix(world.id()),
        world.cgroup_root().to_path_buf(),
        world.dir().to_path_buf(),
    );
    world.detach();

    // And `xtask world down`'s way: twice, the second time nothing to do.
    ensure!(!cleanup::remove_world(&name, Duration::from_secs(1))?.is_empty());
    ensure!(cleanup::remove_world(&name, Duration::from_secs(1))?.is_empty());
    no_world_left(&prefix, &cg, &dir, &[old_pid])
}

#[test]
fn admin_client_talks_from_inside_the_node_netns() -> Result<()> {
    require_root_or_skip!(Ok(()));
    let world = World::builder("admin_client")
        .nodes(1)
        .pods_per_node(0)
        .agent(false)
        .build()?;
    let node = world.node(0);
    // A listener on the node's loopback: not reachable from the root netns.
    let listener = node.in_netns(|| TcpListener::bind(node.admin_addr()))??;
    let server = std::thread::spawn(move || -> Result<String> {
        let (mut s, _) = listener.accept()?;
        let mut req = String::new();
        let mut r = BufReader::new(s.try_clone()?);
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 || l == "\r\n" {
                break;
            }
            req.push_str(&l);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")?;
        s.write_all(b"f\r\nx_total{a=\"b\"} \r\n2\r\n7\n\r\n0\r\n\r\n")?;
        Ok(req)
    });
    let (status, body) = node.admin_get("/metrics")?;
    let req = server.join().unwrap()?;
    ensure!(
        req.starts_with("GET /metrics HTTP/1.1\r\n")
            && req.to_ascii_lowercase().contains("connection: close\r\n"),
        "{req}"
    );
    ensure!(status == 200, "{status}");
    ensure!(
        metric_value(&body, "x_total", &[("a", "b")]) == Some(7.0),
        "{body:?}"
    );
    Ok(())
}

#[test]
fn agents_are_started_stopped_and_restarted() -> Result<()> {
    require_root_or_skip!(Ok(()));
    // `testpeer agent` stands in for `waymark agent` here.
    let world = World::builder("agent_handling")
        .nodes(2)
        .pods_per_node(1)
        .agent_bin(testpeer_bin()?)
        .agent_config_extra("[admin]\nlisten = \"127.0.0.1:4999\"\n")
        .agent_config(|i, cfg| {
            cfg.insert("test_node_index".into(), toml::Value::Integer(i as i64));
        })
        .build()?;
    let node = world.node(1);
    let cfg: toml::Table = std::fs::read_to_string(node.config_path())?.parse()?;
    ensure!(cfg["admin"]["listen"].as_str() == Some("127.0.0.1:4999"));
    ensure!(cfg["test_node_index"].as_integer() == Some(1));
    ensure!(cfg["node"]["name"].as_str() == Some("node1"));
    ensure!(cfg["redirect"]["cgroup"].as_str() == Some(node.cgroup_path().to_str().unwrap()));
    ensure!(
        cfg["pods"][0]["netns"].as_str() == Some(world.pod(1, 0).netns_path().to_str().unwrap())
    );
    ensure!(cfg["pods"][0]["ips"][0].as_str() == Some("10.2.0.2"));

    let pid = node.agent_pid().context("agent not running")?;
    ensure!(net::process_netns_inode(pid) == net::netns_inode(&node.netns_path()));
    let body = node.metrics()?;
    ensure!(
        metric_value(&body, "fake_requests_total", &[("path", "/ready")]).unwrap_or(0.0) >= 1.0,
        "{body}"
    );
    ensure!(node.admin_get("/nope")?.0 == 404);
    ensure!(node.agent_log().contains("fake agent: GET /ready"));

    let st = node.stop_agent(Signal::SIGTERM)?;
    ensure!(st.success(), "{st}");
    ensure!(node.agent_pid().is_none());
    ensure!(node.admin_get("/ready").is_err());
    node.start_agent()?;
    ensure!(node.agent_pid().is_some_and(|p| p != pid));
    ensure!(
        node.agent_log()
            .matches("==== waymark-tests: starting")
            .count()
            == 2
    );
    ensure!(world.node(0).agent_pid().is_some());

    // An agent that exits at once fails the build, with its log.
    let e = World::builder("agent_exits")
        .nodes(1)
        .pods_per_node(0)
        .agent_bin("/bin/false")
        .build();
    let msg = format!(
        "{:#}",
        e.err().context("a failing agent must fail the build")?
    );
    ensure!(
        msg.contains("exited") && msg.contains("before it was ready"),
        "{msg}"
    );
    ensure!(net::list_netns(&state::netns_prefix(&state::world_id("agent_exits"))).is_empty());
    Ok(())
}

#[test]
fn real_agents_get_ready() -> Result<()> {
    require_agent_or_skip!(Ok(()));
    let world = World::builder("real_agents").build()?;
    for node in world.nodes() {
        let (status, body) = node.admin_get("/ready")?;
        if status != 200 {
            bail!("{}: /ready {status} {body}", node.name());
        }
        node.metrics()?;
    }
    Ok(())
}
