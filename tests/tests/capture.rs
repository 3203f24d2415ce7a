//! End-to-end tests of packet capture (`waymark capture`, admin `POST
//! /capture`) against real agents: the capture of a pod holds its HTTP
//! exchange and nothing the filter or the pod's namespace excludes, limits
//! stop it, bad requests are refused with their reason, and the concurrency
//! bound holds. The files are read back with Debian's tshark. See
//! tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use waymark_tests::fixtures::{Endpoint, Service, meshed_pair};
use waymark_tests::world::agent::waymark_bin;
use waymark_tests::{
    Node, Pod, Server, World, await_metric, eventually, http_app, metric, require_agent_or_skip,
    testpeer, with_world, world_name,
};

/// The test application answering `got <path>`.
fn http_server(pod: &Pod, port: u16) -> Result<Server> {
    http_app(pod, port, "got", &[])
}

/// One GET with curl from `pod`; the body.
fn curl(pod: &Pod, url: &str) -> Result<String> {
    pod.run_ok(Command::new("curl").args(["-sS", "--max-time", "5", url]))
}

/// A `waymark capture` running on a node, writing to a file.
struct Capture {
    child: Child,
    file: PathBuf,
    stderr: PathBuf,
}

fn capture(world: &World, node: &Node, tag: &str, args: &[&str]) -> Result<Capture> {
    let file = world.dir().join(format!("{tag}.pcapng"));
    let stderr = world.dir().join(format!("{tag}.stderr"));
    let mut cmd = Command::new(waymark_bin()?);
    cmd.args([
        "capture",
        "--admin",
        &node.admin_socket().display().to_string(),
    ])
    .args(args)
    .arg("-w")
    .arg(&file)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&stderr)?);
    let child = node.spawn(&mut cmd)?;
    Ok(Capture {
        child,
        file,
        stderr,
    })
}

impl Capture {
    /// Waits until the agent has opened the socket (the stream's section
    /// header is in the file).
    fn started(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::metadata(&self.file).is_ok_and(|m| m.len() > 0) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "capture exited ({status}) before starting: {}",
                    self.stderr_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "capture did not start: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the CLI to exit on its own; its status and stderr.
    fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, String, PathBuf)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.stderr_text(), self.file.clone()));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!(
                    "capture still running after {timeout:?}: {}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// Runs `waymark capture ARGS -w FILE` on `node` to completion.
fn capture_once(
    world: &World,
    node: &Node,
    tag: &str,
    args: &[&str],
) -> Result<(ExitStatus, String)> {
    let (status, stderr, _) = capture(world, node, tag, args)?.finish(Duration::from_secs(30))?;
    Ok((status, stderr))
}

/// `tshark -r FILE ARGS…`: stdout lines.
fn tshark(file: &Path, args: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .context("running tshark (apt-get install tshark)")?;
    ensure!(
        out.status.success(),
        "tshark -r {} {args:?} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The capture of a pod holds the HTTP request it served (tshark decodes
/// it), on the pod's own interface; the filter keeps other ports out, and
/// the same traffic to another pod is absent (the capture is scoped to the
/// pod's namespace).
#[test]
fn a_pod_capture_holds_its_http_exchange_and_nothing_else() {
    require_agent_or_skip!();
    let builder = World::builder(world_name!()).nodes(1).pods_per_node(3);
    with_world(builder, |world| {
        let node = world.node(0);
        let (client, server, other) = (world.pod(0, 0), world.pod(0, 1), world.pod(0, 2));
        let _web = http_server(server, 8080)?;
        let _other_web = http_server(other, 8080)?;
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:9090"]))?;

        let mut cap = capture(
            world,
            node,
            "http",
            &[
                "--pod",
                server.name(),
                "--filter",
                "tcp port 8080",
                "--duration",
                "8s",
            ],
        )?;
        cap.started()?;
        let body = curl(
            client,
            &format!("http://{}:8080/capture-marker-1", server.ip()),
        )?;
        ensure!(body.contains("got /capture-marker-1"), "curl got {body:?}");
        // Same port, another pod: outside the capture's namespace.
        curl(
            client,
            &format!("http://{}:8080/other-pod-marker", other.ip()),
        )?;
        // The captured pod, another port: outside the filter.
        let out = client.run_ok(&mut testpeer([
            "client",
            "--connect",
            &format!("{}:9090", server.ip()),
            "--bytes",
            "100",
        ]))?;
        ensure!(out.contains("\"identical\":true"), "echo: {out}");
        let (status, stderr, file) = cap.finish(Duration::from_secs(20))?;
        ensure!(status.success(), "capture failed: {stderr}");
        ensure!(stderr.contains("stopped: duration"), "summary: {stderr}");
        ensure!(
            stderr.contains(&format!("pod {}", server.name())),
            "summary: {stderr}"
        );

        let uris = tshark(
            &file,
            &[
                "-Y",
                "http.request",
                "-T",
                "fields",
                "-e",
                "http.request.uri",
            ],
        )?;
        ensure!(
            uris == ["/capture-marker-1"],
            "HTTP requests in the capture: {uris:?}"
        );
        let ports = tshark(
            &file,
            &["-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport"],
        )?;
        ensure!(ports.len() >= 6, "too few packets: {ports:?}");
        ensure!(
            ports
                .iter()
                .all(|p| p.split('\t').any(|port| port == "8080")),
            "a packet outside the filter: {ports:?}"
        );
        let hosts = tshark(&file, &["-T", "fields", "-e", "ip.dst"])?;
        ensure!(
            !hosts.iter().any(|h| h == &other.ip().to_string()),
            "a packet to the other pod: {hosts:?}"
        );
        // Interfaces are named in the file.
        let ifaces = tshark(&file, &["-T", "fields", "-e", "frame.interface_name"])?;
        ensure!(ifaces.iter().all(|i| i == "eth0"), "interfaces: {ifaces:?}");
        Ok(())
    });
}

/// `--max-packets` stops the capture, and `-w -` streams into a pipe that
/// tshark reads. In the node's namespace this time.
#[test]
fn max_packets_stops_a_node_capture_streamed_to_tshark() {
    require_agent_or_skip!();
    let builder = World::builder(world_name!()).nodes(1).pods_per_node(2);
    with_world(builder, |world| {
        let node = world.node(0);
        let (client, server) = (world.pod(0, 0), world.pod(0, 1));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let script = format!(
            "{} capture --admin {} --node --filter 'tcp port 7000' --max-packets 5 --duration 20s -w - | tshark -r - -T fields -e frame.number -e tcp.dstport",
            waymark_bin()?.display(),
            node.admin_socket().display()
        );
        std::thread::scope(|s| -> Result<()> {
            let piped = s.spawn(|| {
                node.run_timeout(
                    Command::new("sh").args(["-c", &script]),
                    Duration::from_secs(30),
                )
            });
            await_metric(node, "waymark_captures_active", &[], 1.0)?;
            let out = client.run_ok(&mut testpeer([
                "client",
                "--connect",
                &format!("{}:7000", server.ip()),
                "--bytes",
                "5000",
            ]))?;
            ensure!(out.contains("\"identical\":true"), "echo: {out}");
            let out = piped.join().expect("capture thread")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(out.status.success(), "pipeline failed: {stderr}");
            let frames: Vec<&str> = stdout.lines().collect();
            ensure!(
                frames.len() == 5,
                "expected 5 packets, tshark read {frames:?}; stderr {stderr}"
            );
            ensure!(
                stderr.contains("5 packets") && stderr.contains("stopped: max_packets"),
                "summary: {stderr}"
            );
            Ok(())
        })?;
        await_metric(node, "waymark_captures_active", &[], 0.0)?;
        ensure!(metric(node, "waymark_captures_started_total", &[("scope", "node")])? >= 1.0);
        Ok(())
    });
}

/// An invalid filter and an unknown pod are refused with their reason; a
/// third concurrent capture gets 429; a client that goes away ends its
/// capture; every capture is in the agent's log.
#[test]
fn bad_requests_and_a_third_capture_are_refused() {
    require_agent_or_skip!();
    let builder = World::builder(world_name!()).nodes(1).pods_per_node(1);
    with_world(builder, |world| {
        let node = world.node(0);
        let pod = world.pod(0, 0).name().to_string();

        let (status, stderr) = capture_once(
            world,
            node,
            "bad-filter",
            &["--pod", &pod, "--filter", "tcp prot 80"],
        )?;
        ensure!(!status.success(), "an invalid filter was accepted");
        ensure!(
            !world.dir().join("bad-filter.pcapng").exists(),
            "a refused capture left a file behind"
        );
        ensure!(
            stderr.contains("400")
                && stderr.contains("invalid filter \"tcp prot 80\"")
                && stderr.contains("syntax error"),
            "{stderr}"
        );

        let (status, stderr) = capture_once(world, node, "bad-pod", &["--pod", "default/nope"])?;
        ensure!(!status.success(), "an unknown pod was accepted");
        ensure!(
            stderr.contains("400")
                && stderr.contains("unknown pod \"default/nope\"")
                && stderr.contains(&pod),
            "{stderr}"
        );

        let mut first = capture(world, node, "first", &["--pod", &pod, "--duration", "20s"])?;
        let mut second = capture(world, node, "second", &["--node", "--duration", "20s"])?;
        first.started()?;
        second.started()?;
        let (status, stderr) = capture_once(world, node, "third", &["--pod", &pod])?;
        ensure!(!status.success(), "a third capture was accepted");
        ensure!(
            stderr.contains("429") && stderr.contains("2 captures are already running"),
            "{stderr}"
        );
        ensure!(
            metric(
                node,
                "waymark_captures_refused_total",
                &[("reason", "busy")]
            )? == 1.0
        );
        ensure!(
            metric(
                node,
                "waymark_captures_refused_total",
                &[("reason", "invalid")]
            )? == 2.0
        );

        // The clients go away: the agent ends both captures.
        for mut c in [first, second] {
            c.child.kill()?;
            c.child.wait()?;
        }
        await_metric(node, "waymark_captures_active", &[], 0.0)?;
        // A slot is free again.
        let (status, stderr) =
            capture_once(world, node, "again", &["--pod", &pod, "--duration", "1s"])?;
        ensure!(
            status.success() && stderr.contains("stopped: duration"),
            "{stderr}"
        );

        eventually(Duration::from_secs(5), || {
            let log = node.agent_log();
            ensure!(log.matches("packet capture started").count() == 3, "{log}");
            ensure!(
                log.matches("reason=client_disconnected").count() == 2,
                "{log}"
            );
            // Refusals are logged with their reason too.
            ensure!(log.matches("packet capture refused").count() == 3, "{log}");
            ensure!(log.contains("invalid filter \"tcp prot 80\""), "{log}");
            ensure!(
                log.contains("waymark-cli/"),
                "the user agent is not logged: {log}"
            );
            Ok(())
        })
        .with_context(|| "agent log".to_string())?;
        Ok(())
    });
}

/// An unfiltered node capture (the simplest use) never holds its own
/// stream: the admin connection that carries the pcapng to the CLI is left
/// out in the kernel, so the capture runs its duration instead of filling
/// `max_bytes` with copies of itself, and it still holds the node's other
/// traffic.
#[test]
fn an_unfiltered_node_capture_leaves_out_the_admin_api() {
    require_agent_or_skip!();
    let builder = World::builder(world_name!()).nodes(1).pods_per_node(1);
    with_world(builder, |world| {
        let node = world.node(0);
        let pod = world.pod(0, 0);
        let _server = http_server(pod, 7100)?;
        let url = format!("http://{}:7100/through-the-node", pod.ip());
        let mut cap = capture(world, node, "unfiltered", &["--node", "--duration", "2s"])?;
        cap.started()?;
        // Traffic the node does see: the node's own requests to the pod.
        for _ in 0..5 {
            node.run_ok(Command::new("curl").args(["-sS", "--max-time", "5", &url]))?;
        }
        let (status, stderr, file) = cap.finish(Duration::from_secs(30))?;
        ensure!(
            status.success() && stderr.contains("stopped: duration"),
            "an unfiltered node capture must run its 2 s: {stderr}"
        );
        ensure!(
            stderr.contains("left out: the agent's admin API connections"),
            "the summary must say what was left out: {stderr}"
        );
        let admin_port = node.admin_addr().port().to_string();
        let ports = tshark(
            &file,
            &["-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport"],
        )?;
        ensure!(
            ports
                .iter()
                .any(|l| l.split_whitespace().any(|p| p == "7100")),
            "the node's own traffic to the pod is missing: {ports:?}"
        );
        let admin: Vec<&String> = ports
            .iter()
            .filter(|l| l.split_whitespace().any(|p| p == admin_port))
            .collect();
        ensure!(
            admin.is_empty(),
            "{} packets of the admin port {admin_port} were captured: {:?}",
            admin.len(),
            admin.iter().take(5).collect::<Vec<_>>()
        );
        Ok(())
    });
}

/// A reload that turns capture off takes effect: the next capture is
/// refused as disabled (before, the agent kept capturing while reporting
/// the reload a success); turned on again, captures work again. Turning
/// key-log captures on needs a restart, and the agent says so.
#[test]
fn a_reload_of_the_capture_section_takes_effect() {
    require_agent_or_skip!();
    let builder = World::builder(world_name!()).nodes(1).pods_per_node(1);
    with_world(builder, |world| {
        let node = world.node(0);
        let pod = world.pod(0, 0).name().to_string();
        let set = |enabled: bool, keylog: bool| {
            node.update_config(|c| {
                let mut t = toml::Table::new();
                t.insert("enabled".into(), enabled.into());
                t.insert("keylog".into(), keylog.into());
                c.insert("capture".into(), toml::Value::Table(t));
            })
        };
        let reloads = |n: usize| {
            eventually(Duration::from_secs(10), || {
                let log = node.agent_log();
                ensure!(log.matches("config reloaded").count() >= n, "{log}");
                Ok(())
            })
        };
        let (status, stderr) =
            capture_once(world, node, "before", &["--pod", &pod, "--duration", "1s"])?;
        ensure!(status.success(), "{stderr}");

        set(false, false)?;
        reloads(1)?;
        let (status, stderr) = capture_once(
            world,
            node,
            "disabled",
            &["--pod", &pod, "--duration", "1s"],
        )?;
        ensure!(
            !status.success(),
            "a capture ran after capture was turned off"
        );
        ensure!(
            stderr.contains("403") && stderr.contains("capture.enabled = false"),
            "{stderr}"
        );

        set(true, true)?;
        reloads(2)?;
        let (status, stderr) =
            capture_once(world, node, "again", &["--pod", &pod, "--duration", "1s"])?;
        ensure!(status.success(), "{stderr}");
        let (status, stderr) = capture_once(
            world,
            node,
            "keylog",
            &["--node", "--keylog", "--duration", "1s"],
        )?;
        ensure!(
            !status.success() && stderr.contains("keylog captures are disabled"),
            "key-log captures must stay off until a restart: {stderr}"
        );
        ensure!(
            node.agent_log().contains("section=\"capture.keylog\""),
            "the agent must say capture.keylog needs a restart: {}",
            node.agent_log()
        );
        Ok(())
    });
}

/// A node capture with `--keylog` of the node-to-node tunnel carries the TLS
/// secrets the agent derived while it ran: tshark decrypts the TLS 1.3
/// between the agents and shows the HTTP/2 `CONNECT` stream to the server
/// pod. The same traffic captured without `--keylog` stays opaque.
#[test]
fn a_keylog_capture_of_the_tunnel_is_decrypted_by_tshark() {
    require_agent_or_skip!();
    const VIP: &str = "10.96.0.40:80";
    let server_ip = waymark_tests::pod_ip(1, 0);
    let web = Service::new("web", VIP)
        .protocol("http1")
        .endpoint(Endpoint::meshed(1, 0, 8080));
    let builder =
        meshed_pair(world_name!(), 1, &[web]).agent_config_extra("[capture]\nkeylog = true\n");
    with_world(builder, |world| {
        let (node, client) = (world.node(0), world.pod(0, 0));
        let _web = http_server(world.pod(1, 0), 8080)?;
        let connect_streams = |tag: &str, keylog: bool| -> Result<Vec<String>> {
            let mut args = vec!["--node", "--filter", "tcp port 15008", "--duration", "4s"];
            if keylog {
                args.push("--keylog");
            }
            let mut cap = capture(world, node, tag, &args)?;
            cap.started()?;
            let body = curl(client, &format!("http://{VIP}/{tag}-marker"))?;
            ensure!(
                body.contains(&format!("got /{tag}-marker")),
                "curl got {body:?}"
            );
            let (status, stderr, file) = cap.finish(Duration::from_secs(20))?;
            ensure!(status.success(), "capture failed: {stderr}");
            tshark(
                &file,
                &[
                    "-Y",
                    "http2.headers.method == \"CONNECT\"",
                    "-T",
                    "fields",
                    "-e",
                    "http2.headers.authority",
                ],
            )
        };
        // The tunnel connection is opened (and its secrets derived) while
        // the key-log capture runs: the first request across nodes.
        let seen = connect_streams("keylog", true)?;
        let want = format!("{server_ip}:8080");
        ensure!(
            seen.iter().any(|l| l.contains(&want)),
            "tshark should decrypt a CONNECT to {want} with the embedded secrets; got {seen:?}"
        );
        // Without the secrets the same tunnel is opaque. Restarting nothing:
        // the pooled connection is reused, so no handshake is captured, and
        // no stream may be decoded.
        let seen = connect_streams("plain", false)?;
        ensure!(
            seen.is_empty(),
            "without --keylog the tunnel must stay opaque; tshark decoded {seen:?}"
        );
        Ok(())
    });
}

/// With the reply shortcut (on by default) the agent's replies to a pod's
/// application are not packets; a capture of the pod must see them anyway.
/// While it runs, the pod's connections are off the shortcut: one opened
/// before the capture (taken off when it starts) and one opened during it
/// both show their replies on the pod's `lo`, each in order. Afterwards new
/// connections take the shortcut again.
#[test]
fn a_pod_capture_sees_replies_the_shortcut_would_carry() {
    require_agent_or_skip!();
    capture_sees_shortcut_traffic(World::builder(world_name!()).nodes(1).pods_per_node(2));
}

/// The same with the request shortcut on too (`redirect.request_shortcut`):
/// the requests of the connection opened before the capture, and those of
/// the one opened during it, are packets on the pod's `lo` while it runs.
#[test]
fn a_pod_capture_sees_requests_the_shortcut_would_carry() {
    require_agent_or_skip!();
    capture_sees_shortcut_traffic(
        World::builder(world_name!())
            .nodes(1)
            .pods_per_node(2)
            .agent_config_extra("[redirect]\nrequest_shortcut = true\n"),
    );
}

fn capture_sees_shortcut_traffic(builder: waymark_tests::WorldBuilder) {
    with_world(builder, |world| {
        let node = world.node(0);
        let (client, server) = (world.pod(0, 0), world.pod(0, 1));
        let _echo = server.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
        let go = world.dir().join("shortcut-go");
        let out = world.dir().join("shortcut-client.out");
        let script = format!(
            r#"
import os, socket, time
def exchange(s, m):
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        chunk = s.recv(65536)
        assert chunk, "closed early"
        got += chunk
    assert got == m, got
a = socket.create_connection(("{ip}", 7000), timeout=10)
exchange(a, b"before-the-capture " * 20)
deadline = time.time() + 20
while not os.path.exists("{go}") and time.time() < deadline:
    time.sleep(0.02)
exchange(a, b"EXISTING-CONN-MARK " * 20)
b = socket.create_connection(("{ip}", 7000), timeout=10)
exchange(b, b"NEW-CONN-MARK " * 20)
a.close(); b.close()
print("done", flush=True)
"#,
            ip = server.ip(),
            go = go.display()
        );
        let mut py = client.spawn(
            Command::new("/usr/bin/python3")
                .args(["-c", &script])
                .stdout(std::fs::File::create(&out)?)
                .stderr(Stdio::inherit()),
        )?;
        let path = |p| [("path", p)];
        await_metric(
            node,
            "waymark_outbound_reply_path_total",
            &path("sockmap"),
            1.0,
        )?;
        let mut cap = capture(
            world,
            node,
            "shortcut",
            &["--pod", client.name(), "--duration", "4s"],
        )?;
        cap.started()?;
        std::fs::write(&go, b"go")?;
        eventually(Duration::from_secs(15), || {
            ensure!(py.try_wait()?.is_some(), "client still running");
            Ok(())
        })?;
        let said = std::fs::read_to_string(&out)?;
        ensure!(said.trim() == "done", "client said {said:?}");
        ensure!(
            metric(node, "waymark_outbound_reply_path_total", &path("loopback"))? == 1.0,
            "the connection opened during the capture should have replied over loopback"
        );
        let (status, stderr, file) = cap.finish(Duration::from_secs(20))?;
        ensure!(status.success(), "capture failed: {stderr}");

        // Both directions of each marked exchange crossed the pod's lo.
        for mark in ["EXISTING-CONN-MARK", "NEW-CONN-MARK"] {
            let frames = tshark(
                &file,
                &[
                    "-Y",
                    &format!("frame.interface_name == \"lo\" && frame contains \"{mark}\""),
                    "-T",
                    "fields",
                    "-e",
                    "tcp.srcport",
                    "-e",
                    "tcp.dstport",
                ],
            )?;
            let flows: std::collections::BTreeSet<&String> = frames.iter().collect();
            ensure!(
                flows.len() == 2,
                "{mark}: expected the request and its reply on lo, got {frames:?}"
            );
        }

        // Capture over: a new connection takes the shortcut again. (One
        // that stays open until its reply is read: a client that shuts
        // down its side before the agent accepts gets TCP replies.)
        let again = format!(
            "import socket\ns = socket.create_connection((\"{}\", 7000), timeout=10)\ns.sendall(b\"x\" * 1000)\ngot = b\"\"\nwhile len(got) < 1000:\n    got += s.recv(65536)\nprint(len(got))",
            server.ip()
        );
        let echoed = client.run_ok(Command::new("/usr/bin/python3").args(["-c", &again]))?;
        ensure!(echoed.trim() == "1000", "echo: {echoed}");
        await_metric(
            node,
            "waymark_outbound_reply_path_total",
            &path("sockmap"),
            2.0,
        )?;
        Ok(())
    });
}
