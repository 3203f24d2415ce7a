//! `[admin]`: where the admin API listens, and who may use the endpoints
//! that read traffic or change the agent.
//!
//! Two listeners: loopback TCP for what probes and scrapers need (`/live`,
//! `/ready`, `/metrics`; anything in the node's network namespace reaches
//! it, every hostNetwork pod included), and a Unix socket for the rest,
//! whose every connection is checked against the caller's credentials
//! (`SO_PEERCRED`): root, the agent's own user, or a member of
//! `socket_group`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default admin address: loopback only, Linkerd's admin port.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:4191";
/// Default path of the admin socket; the CLI looks here unless told
/// otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/waymark/admin.sock";
/// The longest admin socket path accepted: a Unix socket address holds 107
/// bytes (`sun_path` is 108 with its NUL), and the agent first binds a
/// temporary name, the path and `.<pid>`, then renames it into place (so a
/// new agent takes the socket over from a running one without a moment
/// where it is missing).
pub const MAX_SOCKET_PATH: usize = 96;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the probes' and scrapers' endpoints (`/live`, `/ready`,
    /// `/metrics`). It has no authentication, so it must stay on loopback.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// The Unix socket serving every endpoint, the sensitive ones included
    /// (capture, tap, config, log level, drops, stats, check). Created mode
    /// 0660, owned by the agent's user and `socket_group`.
    #[serde(default = "default_admin_socket")]
    pub socket: PathBuf,
    /// A group (name or numeric id) whose members may use the socket besides
    /// root and the agent's own user. Unset: root only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            socket: default_admin_socket(),
            socket_group: None,
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("constant parses")
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}

/// Resolves `admin.socket_group` to a group id: a number is taken as it is,
/// a name is looked up in the node's group database.
pub fn resolve_group(group: &str) -> Result<u32, String> {
    let group = group.trim();
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "admin.socket_group: no group named {group:?} on this node (give a group name from /etc/group or a numeric gid)"
        )),
        Err(e) => Err(format!(
            "admin.socket_group: cannot look up group {group:?}: {e}"
        )),
    }
}

pub fn validate(c: &AdminConfig, problems: &mut Vec<String>) {
    if !c.listen.ip().is_loopback() {
        problems.push(format!(
            "admin.listen: {} is not a loopback address; the admin API has no authentication and must listen on 127.0.0.1 or ::1",
            c.listen
        ));
    }
    let path = c.socket.as_os_str();
    if !c.socket.is_absolute() {
        problems.push(format!(
            "admin.socket: {} is not an absolute path",
            c.socket.display()
        ));
    } else if path.len() > MAX_SOCKET_PATH {
        problems.push(format!(
            "admin.socket: {} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            c.socket.display(),
            path.len()
        ));
    }
    if let Some(g) = &c.socket_group
        && let Err(e) = resolve_group(g)
    {
        problems.push(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(toml_text: &str) -> Vec<String> {
        let c: AdminConfig = toml::from_str(toml_text).expect("parses");
        let mut p = Vec::new();
        validate(&c, &mut p);
        p
    }

    #[test]
    fn defaults_are_loopback_and_the_run_socket() {
        let c = AdminConfig::default();
        assert_eq!(c.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert!(problems("").is_empty());
    }

    #[test]
    fn groups_are_numbers_or_known_names() {
        assert_eq!(resolve_group("4242"), Ok(4242));
        assert_eq!(resolve_group("root"), Ok(0));
        let e = resolve_group("no-such-group-waymark").unwrap_err();
        assert!(e.contains("no group named"), "{e}");
    }

    #[test]
    fn bad_sockets_are_named() {
        let p = problems("socket = \"admin.sock\"\nsocket_group = \"no-such-group-waymark\"\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("not an absolute path"), "{p:?}");
        let long = format!("socket = \"/{}\"\n", "x".repeat(120));
        let p = problems(&long);
        assert!(p[0].contains("at most 96"), "{p:?}");
    }
}
