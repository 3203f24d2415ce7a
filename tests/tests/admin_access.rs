//! Who may use the admin API: the loopback TCP port answers probes and
//! scrapers only, and the Unix socket serves everything to root and the
//! members of `admin.socket_group`, checked by the caller's credentials.
//! Real agents, real clients (curl, the `waymark` CLI), callers with other
//! user and group ids made with util-linux's `setpriv`. They need root and
//! eBPF; see tests/README.md.

// Children spawned through a world are reaped by the world when it shuts down.
#![allow(clippy::zombie_processes)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};

use anyhow::{Result, ensure};
use waymark_tests::world::agent::waymark_bin;
use waymark_tests::{Node, World, require_agent_or_skip, with_world, world_name};

/// A user and a group no process of the test machine runs as.
const OTHER_UID: &str = "4243";
const ADMIN_GID: u32 = 4242;

/// Runs `cmd…` on `node` as uid `OTHER_UID` with primary group `gid` and
/// the supplementary `groups` (none: cleared).
fn as_user(node: &Node, gid: &str, groups: &[u32], cmd: &[&str]) -> Result<Output> {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", OTHER_UID, "--regid", gid]);
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.args(["--groups", &list.join(",")]);
    }
    c.arg("--").args(cmd);
    node.run(&mut c)
}

/// `curl` over the admin socket: (HTTP status, body); status 0 when curl
/// could not connect.
fn curl_socket(node: &Node, gid: &str, groups: &[u32], path: &str) -> Result<(u16, String)> {
    let socket = node.admin_socket().display().to_string();
    let url = format!("http://localhost{path}");
    let out = as_user(
        node,
        gid,
        groups,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            &socket,
            &url,
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        return Ok((0, String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    Ok((code, body.to_string()))
}

/// The TCP port serves `/live`, `/ready` and `/metrics` and answers the
/// paths that read traffic or change the agent with a 403 naming the
/// socket; the CLI pointed at the port says the same; over the socket (as
/// root) the same requests are served.
#[test]
fn the_tcp_port_refuses_tap_capture_and_config() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).nodes(1).pods_per_node(1);
    with_world(b, |world| {
        let node = world.node(0);
        let socket = node.admin_socket().display().to_string();
        for path in ["/live", "/ready", "/metrics"] {
            let (status, body) = node.admin_get(path)?;
            ensure!(status == 200, "GET {path} on TCP: {status} {body}");
        }
        for path in ["/tap", "/config", "/log-level", "/drops/follow", "/stat"] {
            let (status, body) = node.admin_get(path)?;
            ensure!(
                status == 403 && body.contains(&socket),
                "GET {path} on TCP must be refused, pointing at {socket}: {status} {body}"
            );
        }
        // A real client, the method the CLI uses for a capture.
        let admin = node.admin_addr();
        let out = node.run(Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            "-X",
            "POST",
            "-w",
            "\n%{http_code}",
            &format!("http://{admin}/capture?node=1&duration=1s"),
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.ends_with("\n403") && text.contains(&socket),
            "POST /capture on TCP must be refused: {text}"
        );
        let out = node.run(Command::new(waymark_bin()?).args([
            "tap",
            "--admin",
            &admin.to_string(),
            "--max",
            "1",
        ]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("403") && stderr.contains(&socket),
            "waymark tap against the TCP port must fail naming the socket: {stderr}"
        );
        // The socket, as root, serves them; the CLI finds it by default.
        let (status, body) = node.admin_socket_get("/config")?;
        ensure!(
            status == 200 && body.contains("\"admin\""),
            "{status} {body}"
        );
        let level = node.run_ok(Command::new(waymark_bin()?).args(["log-level", "get"]))?;
        ensure!(!level.trim().is_empty(), "log-level get printed nothing");
        Ok(())
    });
}

/// A user who is neither root, the agent's user nor in the socket's group
/// cannot connect (the file is 0660), and if the file's mode is loosened the
/// agent still refuses it by its credentials, with a 403 saying who may.
#[test]
fn a_non_root_user_is_refused_on_the_socket() {
    require_agent_or_skip!();
    let b = World::builder(world_name!()).nodes(1).pods_per_node(1);
    with_world(b, |world| {
        let node = world.node(0);
        let socket = node.admin_socket();
        let meta = std::fs::metadata(&socket)?;
        ensure!(
            meta.mode() & 0o777 == 0o660,
            "socket mode {:o}",
            meta.mode()
        );

        let (status, text) = curl_socket(node, OTHER_UID, &[], "/config")?;
        ensure!(
            status == 0,
            "uid {OTHER_UID} must not be able to connect: {status} {text}"
        );
        let out = as_user(
            node,
            OTHER_UID,
            &[],
            &[&waymark_bin()?.display().to_string(), "log-level", "get"],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("admin.socket_group"),
            "the CLI must say who may use the socket: {stderr}"
        );

        // Behind the file's mode, the credentials check.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
        for path in ["/config", "/tap", "/live"] {
            let (status, body) = curl_socket(node, OTHER_UID, &[], path)?;
            ensure!(
                status == 403 && body.contains(&format!("uid {OTHER_UID}")),
                "GET {path} by uid {OTHER_UID} through a loosened socket: {status} {body}"
            );
        }
        ensure!(
            node.agent_log().contains("admin socket caller refused"),
            "the refusal must be logged"
        );
        Ok(())
    });
}

/// With `admin.socket_group`, the socket belongs to that group and its
/// members (as their primary or a supplementary group) may use it, the CLI
/// included; others still may not.
#[test]
fn a_member_of_the_socket_group_is_allowed() {
    require_agent_or_skip!();
    let b = World::builder(world_name!())
        .nodes(1)
        .pods_per_node(1)
        .agent_config_extra(format!("[admin]\nsocket_group = \"{ADMIN_GID}\"\n"));
    with_world(b, |world| {
        let node = world.node(0);
        let meta = std::fs::metadata(node.admin_socket())?;
        ensure!(
            meta.gid() == ADMIN_GID && meta.mode() & 0o777 == 0o660,
            "socket gid {} mode {:o}",
            meta.gid(),
            meta.mode()
        );
        let (status, body) = curl_socket(node, OTHER_UID, &[ADMIN_GID], "/config")?;
        ensure!(
            status == 200 && body.contains(&ADMIN_GID.to_string()),
            "a supplementary member: {status} {body}"
        );
        let (status, body) = curl_socket(node, &ADMIN_GID.to_string(), &[], "/log-level")?;
        ensure!(status == 200, "a primary member: {status} {body}");
        let out = as_user(
            node,
            OTHER_UID,
            &[ADMIN_GID],
            &[&waymark_bin()?.display().to_string(), "log-level", "get"],
        )?;
        ensure!(
            out.status.success(),
            "the CLI as a member: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (status, _) = curl_socket(node, OTHER_UID, &[], "/config")?;
        ensure!(status == 0, "a non-member must still be kept out: {status}");
        Ok(())
    });
}
