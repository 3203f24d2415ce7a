//! The admin API's Unix socket, and who may use it.
//!
//! Loopback TCP cannot tell callers apart: every process in the node's
//! network namespace (each hostNetwork pod) reaches it. A Unix socket can:
//! the kernel records the credentials of the process that connected
//! (`SO_PEERCRED`, `SO_PEERGROUPS`), so the endpoints that read traffic or
//! change the agent are served only here and only to root, the agent's own
//! user, or a member of `admin.socket_group`. The file's mode (0660, group
//! `socket_group`) keeps others from connecting at all; the credential check
//! holds even if someone loosens the mode or the directory.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixStream;

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups of the process
/// that connected, as the kernel saw them at `connect`. The value is the
/// same on every architecture Linux runs waymark on (x86_64, aarch64);
/// the libc crate only exports it for a few.
const SO_PEERGROUPS: libc::c_int = 59;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the admin socket's directory {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("cannot bind the admin socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot give the admin socket {path} mode 0660 and group {gid}: {source}")]
    Permissions {
        path: PathBuf,
        gid: u32,
        source: io::Error,
    },
}

/// Who may use the socket.
#[derive(Clone, Debug)]
pub struct Access {
    /// The agent's effective user (root in a DaemonSet).
    pub agent_uid: u32,
    /// `admin.socket_group`, resolved.
    pub group: Option<u32>,
}

impl Access {
    pub fn allows(&self, peer: &Peer) -> bool {
        peer.uid == 0
            || peer.uid == self.agent_uid
            || self
                .group
                .is_some_and(|g| peer.gid == g || peer.groups.contains(&g))
    }

    /// Says who is allowed, for the refusal's body.
    pub fn describe(&self) -> String {
        match self.group {
            Some(g) => format!(
                "root, uid {} (the agent) and members of group {g} (admin.socket_group)",
                self.agent_uid
            ),
            None => format!(
                "root and uid {} (the agent); set admin.socket_group to let a group in",
                self.agent_uid
            ),
        }
    }
}

/// The credentials of the process at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub groups: Vec<u32>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        Ok(())
    }
}

/// Reads the peer's credentials as the kernel recorded them at `connect`.
pub fn peer(stream: &UnixStream) -> io::Result<Peer> {
    let cred = stream.peer_cred()?;
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        groups: peer_groups(stream)?,
    })
}

fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of initialised gid_t; the
        // kernel writes at most `len` bytes and sets `len` to what it wrote
        // (or, with ERANGE, to what it needs).
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 65536 {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// A bound admin socket; `remove` unlinks it unless another agent has
/// taken its path over since.
pub struct BoundSocket {
    pub listener: std::os::unix::net::UnixListener,
    pub path: PathBuf,
    /// Device and inode of the socket file we created, to recognise it.
    id: (u64, u64),
}

/// Binds `path` mode 0660 (group `group` when given). A socket already
/// there, a previous agent's, is replaced atomically: the new one is bound
/// under a temporary name and renamed over it, so during a handover the
/// CLI always finds an agent.
pub fn bind(path: &Path, group: Option<u32>) -> Result<BoundSocket, SocketError> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| SocketError::Dir {
                dir: dir.to_path_buf(),
                source,
            })?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let bind_err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // A temporary name left by a killed agent that had our pid.
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(bind_err)?;
    let perm_err = |source| SocketError::Permissions {
        path: path.to_path_buf(),
        gid: group.unwrap_or(0),
        source,
    };
    let secure = || -> io::Result<()> {
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = secure() {
        let _ = std::fs::remove_file(&tmp);
        return Err(perm_err(e));
    }
    let meta = std::fs::metadata(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
    })
}

impl BoundSocket {
    /// Unlinks the socket file if it is still the one this agent bound (a
    /// newer agent may have renamed its own over it).
    pub fn remove(path: &Path, id: (u64, u64)) {
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && (meta.dev(), meta.ino()) == id
        {
            let _ = std::fs::remove_file(path);
        }
    }

    pub fn id(&self) -> (u64, u64) {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_the_agent_and_the_group_are_allowed() {
        let a = Access {
            agent_uid: 0,
            group: Some(4242),
        };
        assert!(a.allows(&peer(0, 0, &[])));
        assert!(a.allows(&peer(1000, 4242, &[])));
        assert!(a.allows(&peer(1000, 1000, &[27, 4242])));
        assert!(!a.allows(&peer(1000, 1000, &[27])));
        let a = Access {
            agent_uid: 999,
            group: None,
        };
        assert!(a.allows(&peer(999, 999, &[])));
        assert!(!a.allows(&peer(1000, 4242, &[4242])));
        assert!(a.describe().contains("admin.socket_group"));
    }

    #[tokio::test]
    async fn binding_replaces_an_earlier_socket_and_reads_our_credentials() {
        let dir = std::env::temp_dir().join(format!("waymark-admin-sock-{}", std::process::id()));
        let path = dir.join("sub/admin.sock");
        let first = bind(&path, None).unwrap();
        let second = bind(&path, None).unwrap();
        assert_ne!(first.id(), second.id());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // The first agent going away leaves the second one's socket alone.
        BoundSocket::remove(&path, first.id());
        assert!(path.exists());

        let listener = tokio::net::UnixListener::from_std(second.listener).unwrap();
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let p = super::peer(&server).unwrap();
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(p.pid, Some(std::process::id() as i32));
        drop(client);
        BoundSocket::remove(&path, second.id);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
