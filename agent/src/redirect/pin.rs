//! The redirect's kernel state pinned in bpffs, so that it outlives the
//! agent (Cilium's way, `pkg/socketlb/cgroup.go`): a cgroup program
//! attached through a `bpf_link` stays attached while the link is pinned,
//! whatever becomes of the process that attached it, and a pinned map keeps
//! its entries.
//!
//! ```text
//! <redirect.pin_path>/            e.g. /sys/fs/bpf/waymark
//!   v1/                           the layout; an agent refuses any other
//!     maps/<MAP>                  every map of the object, by its name
//!     links-<cgroup id>/<PROGRAM> the links attaching the programs to
//!                                 that cgroup (one cgroup per layout)
//! ```
//!
//! A starting agent loads its programs against the pinned maps (so a
//! connection accepted by either of two agents finds its original
//! destination, and nothing recorded is lost), then swaps its programs into
//! the pinned links with `BPF_LINK_UPDATE`: the kernel side is never
//! detached, not even for an instant. Every map in the object is pinned,
//! found by parsing the object rather than from a list, so a map added to
//! the programs later is shared too. A pinned map whose type or sizes
//! differ from this agent's (a layout from another waymark) is refused
//! before anything is loaded, rather than handed to programs that would
//! read it wrongly.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::RedirectError;

/// The layout this agent writes and understands. Bump it when a pinned
/// object changes meaning in a way the size check below cannot see.
pub const LAYOUT: &str = "v1";

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What mounting bpffs takes, for the error that says it is missing.
pub const MOUNT_HINT: &str = "mount -t bpf bpf /sys/fs/bpf (in Kubernetes: a hostPath volume for /sys/fs/bpf, mountPropagation: Bidirectional)";

/// The pinned layout of one agent's redirect state.
#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
    dir: PathBuf,
}

impl Pins {
    /// Opens (creating what is missing) the layout under `root`, which must
    /// be on a bpffs. Refuses a root holding a layout other than
    /// [`LAYOUT`].
    pub fn open(root: &Path) -> Result<Self, RedirectError> {
        let existing = root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            return Err(RedirectError::BpffsNotMounted {
                path: root.to_owned(),
                hint: MOUNT_HINT,
            });
        }
        let dir = root.join(LAYOUT);
        for d in [root.to_path_buf(), dir.clone(), dir.join("maps")] {
            std::fs::create_dir_all(&d).map_err(|source| RedirectError::Pin {
                path: d.clone(),
                source,
            })?;
        }
        let entries = std::fs::read_dir(root).map_err(|source| RedirectError::Pin {
            path: root.to_owned(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != LAYOUT {
                return Err(RedirectError::UnknownLayout {
                    path: root.join(&name),
                    ours: LAYOUT,
                });
            }
        }
        Ok(Self {
            root: root.to_owned(),
            dir,
        })
    }

    /// The root directory (`redirect.pin_path`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The layout directory (`<root>/v1`): what the agent locks.
    pub fn layout_dir(&self) -> &Path {
        &self.dir
    }

    /// Every map of `object` with where it is pinned, after checking that
    /// the maps already pinned there are the ones this object declares.
    /// Sections' own maps (`.rodata`, `.bss`, …) hold per-load values and
    /// stay unpinned.
    pub fn map_paths(&self, object: &[u8]) -> Result<Vec<(String, PathBuf)>, RedirectError> {
        let parsed =
            aya_obj::Object::parse(object).map_err(|e| RedirectError::ObjectMaps(e.to_string()))?;
        let mut out = Vec::new();
        for (name, def) in &parsed.maps {
            if name.starts_with('.') {
                continue;
            }
            let path = self.dir.join("maps").join(name);
            if path.exists() {
                let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| {
                    RedirectError::PinnedMapMismatch {
                        path: path.clone(),
                        detail: format!("cannot read it: {e}"),
                    }
                })?;
                let pinned_type = info.map_type().map(|t| t as u32).ok();
                let want = (
                    Some(def.map_type()),
                    def.key_size(),
                    def.value_size(),
                    def.max_entries(),
                );
                let found = (
                    pinned_type,
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                );
                if want != found {
                    return Err(RedirectError::PinnedMapMismatch {
                        path,
                        detail: format!(
                            "pinned (type, key, value, entries) = {found:?}, this agent's = {want:?}"
                        ),
                    });
                }
            }
            out.push((name.clone(), path));
        }
        out.sort();
        Ok(out)
    }

    /// The links directory for the cgroup `cgroup` (an open directory),
    /// refusing links pinned for another cgroup: one layout redirects one
    /// cgroup, and an agent configured for another would leave those pods
    /// redirected to nobody.
    pub fn links_dir(&self, cgroup: &File, path: &Path) -> Result<PathBuf, RedirectError> {
        // On cgroup v2 the directory's inode number is the cgroup id.
        let id = cgroup
            .metadata()
            .map_err(|source| RedirectError::Pin {
                path: path.to_owned(),
                source,
            })?
            .ino();
        let ours = format!("links-{id}");
        let entries = std::fs::read_dir(&self.dir).map_err(|source| RedirectError::Pin {
            path: self.dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("links-") && name != ours {
                return Err(RedirectError::PinnedForOtherCgroup {
                    path: self.dir.join(name),
                    cgroup: path.to_owned(),
                });
            }
        }
        let dir = self.dir.join(ours);
        std::fs::create_dir_all(&dir).map_err(|source| RedirectError::Pin {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Removes every pin (detaching what only the pins held). For
    /// `on_agent_down = "open"` and for tests.
    #[allow(dead_code, reason = "used by the tests and by `waymark` tooling")]
    pub fn remove(&self) -> io::Result<()> {
        std::fs::remove_dir_all(&self.dir)
    }
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

// The two `bpf(2)` commands aya keeps to itself for cgroup links.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size
    // passed; `c` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut attr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Swaps the program behind a link for `prog` (`BPF_LINK_UPDATE`): one
/// atomic step, no moment without a program attached.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size
    // passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw mut attr,
            size_of::<LinkUpdateAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_is_not_bpffs_is_refused_with_the_mount_instruction() {
        let dir = std::env::temp_dir().join(format!("waymark-pin-test-{}", std::process::id()));
        let err = Pins::open(&dir).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("mount -t bpf bpf"), "{text}");
        assert!(
            !dir.exists(),
            "nothing is created on a filesystem that is not bpffs"
        );
    }
}
