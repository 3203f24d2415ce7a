//! Errors of the redirect module: loading, configuring and attaching the
//! kernel programs, and reading their maps.

use std::{io, path::PathBuf};

use ipnet::IpNet;

/// What went wrong, with the input that caused it.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// The agent was compiled with `WAYMARK_EBPF_STUB=1`.
    #[error(
        "this agent was built with WAYMARK_EBPF_STUB=1 and embeds no eBPF programs; \
         rebuild without it (bpf-linker required) to enable redirection"
    )]
    StubObject,

    /// The embedded object could not be parsed or its maps created.
    #[error("loading the eBPF object failed")]
    Load(#[source] Box<aya::EbpfError>),

    /// The verifier (or the kernel) rejected a program.
    #[error("loading eBPF program {program} failed")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// A program or map the agent expects is not in the object: the object
    /// and the agent were built from different sources.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },

    /// A map operation failed.
    #[error("eBPF map {name}: {op} failed")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// A raw map syscall failed (one aya does not wrap).
    #[error("eBPF map {name}: {op} failed")]
    MapSyscall {
        name: &'static str,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// Port 0 cannot be a listener; the kernel side would redirect nothing.
    #[error("outbound port must not be 0")]
    InvalidOutboundPort,

    /// An exclusion lists more ports than one map entry holds.
    #[error("exclusion {net} lists {count} ports, at most {max} are supported")]
    TooManyPorts {
        net: IpNet,
        count: usize,
        max: usize,
    },

    /// More exclusions of one address family than the map holds.
    #[error("{count} {family} exclusions configured, at most {max} are supported")]
    TooManyExcludes {
        family: &'static str,
        count: usize,
        max: u32,
    },

    /// The cgroup directory could not be opened.
    #[error("opening cgroup {path}")]
    CgroupOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The path is not a directory of a cgroup v2 hierarchy.
    #[error("{path} is not a cgroup v2 directory (programs attach to cgroup v2 only)")]
    NotCgroup2 { path: PathBuf },

    /// The request shortcut runs on the sockets the reply shortcut files.
    #[error("the request shortcut needs the reply shortcut on (redirect.reply_shortcut)")]
    RequestShortcutWithoutReplies,

    /// A cgroup directory could not be opened.
    #[error("opening cgroup {cgroup}")]
    Cgroup {
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `attach` was called while the programs are attached.
    #[error("redirect programs are already attached to {cgroup}")]
    AlreadyAttached { cgroup: PathBuf },

    /// The kernel refused to attach a program to the cgroup.
    #[error("attaching eBPF program {program} to cgroup {cgroup}")]
    Attach {
        cgroup: PathBuf,
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// The pin directory is not on a bpffs.
    #[error(
        "{path} is not on a bpffs, so the redirect's links and maps cannot be pinned; mount one: {hint}"
    )]
    BpffsNotMounted { path: PathBuf, hint: &'static str },

    /// The pin directory holds a layout this agent does not write.
    #[error(
        "{path}: a pinned layout this agent does not understand (it writes {ours}); \
         it was left by another waymark version. Run that version, or remove the directory \
         (this detaches whatever it still holds from the pods) and start again"
    )]
    UnknownLayout { path: PathBuf, ours: &'static str },

    /// A pinned map differs from the map this agent's programs declare.
    #[error(
        "pinned map {path} does not match this agent's programs ({detail}); refusing to adopt it \
         rather than corrupt it. Run the waymark version that pinned it, or remove the pin directory"
    )]
    PinnedMapMismatch { path: PathBuf, detail: String },

    /// Links are pinned for a cgroup other than the configured one.
    #[error(
        "{path} holds links attached to another cgroup than redirect.cgroup = {cgroup}; \
         two configurations share one redirect.pin_path. Give each agent its own pin_path, \
         or remove the stale directory"
    )]
    PinnedForOtherCgroup { path: PathBuf, cgroup: PathBuf },

    /// The object's maps could not be listed.
    #[error("listing the maps of the eBPF object: {0}")]
    ObjectMaps(String),

    /// A bpffs operation failed.
    #[error("pinning at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
