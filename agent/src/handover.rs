//! Two agents on one node, as a DaemonSet with `maxSurge: 1` runs them
//! during a rollout: the new agent binds every listener beside the old one
//! (`SO_REUSEPORT`), adopts the pinned kernel state, becomes ready, and
//! only then tells the old one to go, which closes its listeners (the
//! kernel moves its queued connections to the new agent's) and drains.
//!
//! Who serves is settled with two `flock`s on the pin directory (bpffs
//! holds no regular files, but its directories can be locked, and a lock
//! goes with its process, also on a crash):
//!
//! - the *serving* lock on `<pin_path>`: held by the agent that serves the
//!   node;
//! - the *successor* lock on `<pin_path>/<layout>`: held by the one agent
//!   taking over. A third agent finds both taken and refuses to start,
//!   saying so: two agents never silently split a node's traffic, and a
//!   stray agent cannot queue up behind a rollout.
//!
//! The old agent is told to go over an abstract Unix socket named after the
//! pin directory (both agents share the node's network namespace, and no
//! pid namespace needs to be shared): the successor sends `handover <pid>`,
//! the server answers `draining <pid>` and starts its drain as on SIGTERM.
//! A successor that never becomes ready never sends it, so the old agent
//! keeps serving (the rollout stalls, the node does not break).

use std::fs::File;
use std::io::{self, BufRead as _, Read as _, Write as _};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long the successor waits for the serving agent's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot open {path} to lock it")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another agent is already taking over this node from the agent that serves it \
         (both locks on {path} are held); refusing to start a third. If no rollout is under \
         way, stop the stray agent"
    )]
    SuccessorRunning { path: PathBuf },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the serving agent did not accept the handover on {socket}")]
    Refused {
        socket: String,
        #[source]
        source: io::Error,
    },
}

/// This agent's place on the node.
pub enum Claim {
    /// No other agent serves the node: this one does.
    Serving(Flock<File>),
    /// Another agent serves the node; this one takes over once ready.
    Successor {
        successor: Flock<File>,
        serving: PathBuf,
    },
}

/// Takes this agent's place: serving, or the one successor.
pub fn claim(pin_root: &Path, layout_dir: &Path) -> Result<Claim, HandoverError> {
    match try_lock(pin_root)? {
        Some(lock) => Ok(Claim::Serving(lock)),
        None => match try_lock(layout_dir)? {
            Some(successor) => Ok(Claim::Successor {
                successor,
                serving: pin_root.to_owned(),
            }),
            None => Err(HandoverError::SuccessorRunning {
                path: pin_root.to_owned(),
            }),
        },
    }
}

fn open_dir(path: &Path) -> Result<File, HandoverError> {
    File::open(path).map_err(|source| HandoverError::Open {
        path: path.to_owned(),
        source,
    })
}

fn try_lock(path: &Path) -> Result<Option<Flock<File>>, HandoverError> {
    match Flock::lock(open_dir(path)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::Error::EWOULDBLOCK)) => Ok(None),
        Err((_, source)) => Err(HandoverError::Lock {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Whether another process holds the successor lock on `layout_dir`: a
/// new agent has started beside this one and is not serving yet.
///
/// Read from `/proc/locks` rather than by trying the lock, which would hold
/// it for an instant and could make a starting successor take itself for a
/// third agent and refuse to start. `/proc/locks` shows pids in the
/// reader's pid namespace (0 for a holder outside it, as the other agent's
/// container is in a DaemonSet without `hostPID`): either way not ours.
pub fn successor_waiting(layout_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(layout_dir) else {
        return false;
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return false;
    };
    let dev = meta.dev();
    let file = (
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino(),
    );
    flock_held_by_other(&locks, file, std::process::id())
}

/// Whether `/proc/locks` text shows a `flock` on `file` (major, minor,
/// inode) held by a process other than `own_pid` (waiters, shown with
/// `->`, do not hold it).
fn flock_held_by_other(locks: &str, file: (u64, u64, u64), own_pid: u32) -> bool {
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END"
        let [_, kind, _, _, pid, id, ..] = fields.as_slice() else {
            return false;
        };
        if *kind != "FLOCK" || pid.parse::<u32>().ok() == Some(own_pid) {
            return false;
        }
        let mut parts = id.split(':');
        let (Some(maj), Some(min), Some(ino)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        u64::from_str_radix(maj, 16).ok() == Some(file.0)
            && u64::from_str_radix(min, 16).ok() == Some(file.1)
            && ino.parse::<u64>().ok() == Some(file.2)
    })
}

/// The abstract socket of the agent serving the pin directory `pin_root`.
///
/// An abstract name holds at most 107 bytes; a longer pin path is named by
/// a hash of it (FNV-1a: stable across builds, so two agent versions agree).
fn socket_name(pin_root: &Path) -> String {
    const MAX: usize = 107;
    let full = format!("waymark-handover:{}", pin_root.display());
    if full.len() <= MAX {
        return full;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pin_root.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("waymark-handover:#{h:016x}")
}

/// Asks the serving agent to go (it answers, then drains); returns its pid
/// as it said.
pub fn request(pin_root: &Path) -> Result<String, HandoverError> {
    let name = socket_name(pin_root);
    let refused = |source| HandoverError::Refused {
        socket: name.clone(),
        source,
    };
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).map_err(refused)?;
    let mut s = UnixStream::connect_addr(&addr).map_err(refused)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(refused)?;
    s.write_all(format!("handover {}\n", std::process::id()).as_bytes())
        .map_err(refused)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(refused)?;
    match answer.trim().strip_prefix("draining ") {
        Some(pid) => Ok(pid.to_string()),
        None => Err(refused(io::Error::other(format!(
            "unexpected answer {:?}",
            answer.trim()
        )))),
    }
}

/// Becomes the serving agent once the old one has exited (its lock goes
/// with it), then releases the successor lock and listens for the next
/// successor; runs on its own thread.
pub fn await_serving(
    successor: Flock<File>,
    serving: PathBuf,
    pin_root: PathBuf,
    go: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let lock = match File::open(&serving) {
            Ok(f) => Flock::lock(f, FlockArg::LockExclusive),
            Err(e) => {
                warn!(path = %serving.display(), error = %e, "cannot open the pin directory to take the serving lock");
                return;
            }
        };
        match lock {
            Ok(lock) => {
                info!("the previous agent has exited; this agent serves the node alone");
                drop(successor);
                // Held until this process exits.
                std::mem::forget(lock);
                listen(&pin_root, go);
            }
            Err((_, e)) => warn!(error = %e, "cannot take the serving lock"),
        }
    })
}

/// Listens for a successor's request while this agent serves; cancels
/// `go` when one arrives (after answering it). Retries binding for a
/// while: right after a handover the previous agent may still hold the
/// name for an instant.
pub fn listen(pin_root: &Path, go: CancellationToken) {
    let name = socket_name(pin_root);
    std::thread::Builder::new()
        .name("waymark-handover".into())
        .spawn(move || {
            let listener = (0..50).find_map(|_| {
                let addr = UnixAddr::from_abstract_name(name.as_bytes()).ok()?;
                match UnixListener::bind_addr(&addr) {
                    Ok(l) => Some(l),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        None
                    }
                }
            });
            let Some(listener) = listener else {
                warn!(socket = %name, "cannot listen for handover requests; a new agent will not be able to take over from this one");
                return;
            };
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(ANSWER_TIMEOUT));
                let mut line = String::new();
                let _ = io::BufReader::new((&conn).take(128)).read_line(&mut line);
                let text = line.trim().to_string();
                let Some(pid) = text.strip_prefix("handover ") else {
                    warn!(request = %text, "ignoring a malformed handover request");
                    continue;
                };
                info!(successor_pid = %pid, "a new agent is ready and takes over this node; draining");
                // Free the name for the successor before answering.
                drop(listener);
                let _ = conn.write_all(format!("draining {}\n", std::process::id()).as_bytes());
                go.cancel();
                return;
            }
        })
        .map(|_| ())
        .unwrap_or_else(|e| warn!(error = %e, "cannot start the handover listener"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_fit_an_abstract_address() {
        let short = socket_name(Path::new("/sys/fs/bpf/waymark"));
        assert_eq!(short, "waymark-handover:/sys/fs/bpf/waymark");
        let long_a = socket_name(&Path::new("/run").join("x".repeat(120)).join("a"));
        let long_b = socket_name(&Path::new("/run").join("x".repeat(120)).join("b"));
        for n in [&long_a, &long_b] {
            assert!(n.len() <= 107, "{n}");
            assert!(UnixAddr::from_abstract_name(n.as_bytes()).is_ok(), "{n}");
        }
        assert_ne!(long_a, long_b);
    }

    #[test]
    fn proc_locks_lines_are_matched_by_file_and_holder() {
        let locks = "1: FLOCK  ADVISORY  WRITE 14692 fe:00:10060036 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 999 00:2d:77 0 EOF\n\
                     3: POSIX  ADVISORY  WRITE 888 00:2d:77 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 42 00:2d:77 0 EOF\n";
        // Held by pid 42: another process for us, ourselves for 42.
        assert!(flock_held_by_other(locks, (0, 0x2d, 77), 7));
        assert!(!flock_held_by_other(locks, (0, 0x2d, 77), 42));
        // A waiter (->) and a POSIX lock do not count; other files neither.
        assert!(!flock_held_by_other(
            "2: -> FLOCK  ADVISORY  WRITE 999 00:2d:77 0 EOF\n3: POSIX  ADVISORY  WRITE 888 00:2d:77 0 EOF\n",
            (0, 0x2d, 77),
            7
        ));
        assert!(flock_held_by_other(locks, (0xfe, 0, 10060036), 7));
        assert!(!flock_held_by_other(locks, (0xfe, 0, 1), 7));
        assert!(!flock_held_by_other("garbage\n\n1: FLOCK\n", (0, 0, 0), 7));
    }

    #[test]
    fn a_third_agent_is_refused_while_one_serves_and_one_takes_over() {
        let root = std::env::temp_dir().join(format!("waymark-handover-{}", std::process::id()));
        let layout = root.join("v1");
        std::fs::create_dir_all(&layout).unwrap();
        let first = claim(&root, &layout).unwrap();
        assert!(matches!(first, Claim::Serving(_)));
        let second = claim(&root, &layout).unwrap();
        assert!(matches!(second, Claim::Successor { .. }));
        let third = claim(&root, &layout).err().expect("refused");
        assert!(
            third.to_string().contains("refusing to start a third"),
            "{third}"
        );
        drop(second);
        assert!(matches!(
            claim(&root, &layout).unwrap(),
            Claim::Successor { .. }
        ));
        drop(first);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_serving_agent_answers_and_is_told_to_go() {
        let root =
            std::env::temp_dir().join(format!("waymark-handover-sock-{}", std::process::id()));
        let go = CancellationToken::new();
        listen(&root, go.clone());
        let pid = (0..50)
            .find_map(|_| match request(&root) {
                Ok(pid) => Some(pid),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    None
                }
            })
            .expect("an answer");
        assert_eq!(pid, std::process::id().to_string());
        assert!(go.is_cancelled());
    }
}
