//! The kernel's view of what is attached to a cgroup (`BPF_PROG_QUERY`),
//! for `waymark check`: the agent compares it with its own programs, and the
//! CLI reads it on its own, without trusting the agent's word.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CONNECT4, CONNECT6, PEERNAME4, PEERNAME6, Redirect, SOCK_OPS, SOCK_RELEASE};

/// `bpf(2)` command numbers and attach types (`include/uapi/linux/bpf.h`).
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;

/// Most programs one query returns; a cgroup with more is not ours to judge.
const MAX_QUERY: usize = 64;

/// One of the agent's programs: its name, where it hooks and as what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub name: &'static str,
    /// bpftool's name for the attach type.
    pub attach_type: &'static str,
    attach: u32,
}

/// The programs the agent attaches to the pods' cgroup.
pub const EXPECTED: [Expected; 6] = [
    Expected {
        name: SOCK_OPS,
        attach_type: "sock_ops",
        attach: BPF_CGROUP_SOCK_OPS,
    },
    Expected {
        name: CONNECT4,
        attach_type: "connect4",
        attach: BPF_CGROUP_INET4_CONNECT,
    },
    Expected {
        name: CONNECT6,
        attach_type: "connect6",
        attach: BPF_CGROUP_INET6_CONNECT,
    },
    Expected {
        name: PEERNAME4,
        attach_type: "getpeername4",
        attach: BPF_CGROUP_INET4_GETPEERNAME,
    },
    Expected {
        name: PEERNAME6,
        attach_type: "getpeername6",
        attach: BPF_CGROUP_INET6_GETPEERNAME,
    },
    // Without it nothing is misrouted, but the entries of connects that
    // fail before their SYN stay in the node-wide cookie map until the
    // LRU evicts them: a pod churning such connects fills it.
    Expected {
        name: SOCK_RELEASE,
        attach_type: "sock_release",
        attach: BPF_CGROUP_INET_SOCK_RELEASE,
    },
];

/// `BPF_PROG_QUERY`'s part of `union bpf_attr` (kernel 4.15+; the fields
/// after `prog_cnt` stay zero, which every kernel accepts).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

impl Expected {
    /// IDs of the programs attached to `cgroup` itself (not inherited from
    /// its ancestors) at this program's hook.
    pub fn attached_ids(&self, cgroup: &Path) -> io::Result<Vec<u32>> {
        let dir = File::open(cgroup)?;
        let mut ids = [0u32; MAX_QUERY];
        let mut attr = QueryAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_type: self.attach,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: MAX_QUERY as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid BPF_PROG_QUERY argument of the size
        // given; `prog_ids` points to `prog_cnt` writable u32s that outlive
        // the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                std::mem::size_of::<QueryAttr>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ids[..(attr.prog_cnt as usize).min(MAX_QUERY)].to_vec())
    }
}

/// Names of loaded programs by ID (the kernel keeps 15 bytes of a name).
pub fn program_names() -> std::collections::HashMap<u32, String> {
    aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("").to_string()))
        .collect()
}

/// One program of the agent as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramState {
    pub name: String,
    pub attach_type: String,
    /// The program's kernel ID.
    pub id: Option<u32>,
    /// Whether the kernel lists this very program on the cgroup.
    pub attached: bool,
    /// Why it could not be checked.
    pub error: Option<String>,
}

/// What the agent's redirect programs look like from the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectState {
    /// The cgroup the agent attached to; `None` when not attached.
    pub cgroup: Option<PathBuf>,
    pub programs: Vec<ProgramState>,
}

impl Redirect {
    /// Checks with the kernel that each program the agent attached is
    /// still attached to its cgroup: the agent's links may have been
    /// detached behind its back (`bpftool link detach`, a cgroup removed).
    pub fn verify(&self) -> RedirectState {
        let Some(attached) = &self.attached else {
            return RedirectState {
                cgroup: None,
                programs: Vec::new(),
            };
        };
        let programs = EXPECTED
            .iter()
            .map(|e| {
                let id = self
                    .ebpf
                    .program(e.name)
                    .ok_or_else(|| format!("no program {} in the object", e.name))
                    .and_then(|p| p.info().map_err(|err| err.to_string()))
                    .map(|info| info.id());
                let listed = e.attached_ids(&attached.cgroup).map_err(|err| {
                    format!("BPF_PROG_QUERY on {}: {err}", attached.cgroup.display())
                });
                let (id, attached, error) = match (id, listed) {
                    (Ok(id), Ok(ids)) => (Some(id), ids.contains(&id), None),
                    (Ok(id), Err(err)) => (Some(id), false, Some(err)),
                    (Err(err), _) => (None, false, Some(err)),
                };
                ProgramState {
                    name: e.name.to_string(),
                    attach_type: e.attach_type.to_string(),
                    id,
                    attached,
                    error,
                }
            })
            .collect();
        RedirectState {
            cgroup: Some(attached.cgroup.clone()),
            programs,
        }
    }
}
