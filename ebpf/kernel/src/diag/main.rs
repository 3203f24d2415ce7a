//! waymark's kernel diagnostics: what the kernel did to pods' packets.
//!
//! A separate object from the redirection programs (`src/main.rs`): it is
//! loaded, attached and allowed to fail on its own, so a kernel without one
//! of these tracepoints still proxies.
//!
//! * [`drops`]: `kfree_skb` counts dropped packets by the kernel's own drop
//!   reason, per pod and per flow.
//! * [`tcp_events`]: `tcp_retransmit_skb`, `tcp_send_reset` and
//!   `tcp_receive_reset` count retransmits (SYNs separately: connection
//!   attempts nobody answered) and resets, per pod and per flow.
//! * [`traffic`]: `cgroup_skb` ingress/egress on the pods' cgroup count bytes
//!   and packets per pod. They always let the packet through.
//! * [`events`]: drops and resets also go to a ring buffer, behind a per-CPU
//!   rate limit, so a drop storm costs the node a counter increment per
//!   packet and nothing more.
//!
//! Pods are found by network namespace: the agent writes every configured
//! pod's netns cookie (and its own, the node's) into `POD_SLOTS`. A packet
//! belongs to the netns of its socket when it has one (`rx_sk`, else
//! `skb->sk`), else to that of its device. The tracepoints see the whole
//! machine, so events in a netns that is neither a pod's nor the node's are
//! somebody else's and are ignored.
//!
//! The tracepoints are raw (`BPF_PROG_TYPE_RAW_TRACEPOINT`): no record is
//! formatted, the programs get the tracepoint's own arguments. Kernel structs
//! are read with `bpf_probe_read_kernel` at offsets the agent resolved from
//! the running kernel's BTF ([`kmem`]), the userspace equivalent of CO-RE.
#![no_std]
#![no_main]
// Atomic adds for the shared per-flow counters (see `flow::bump`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod config;
mod drops;
mod events;
mod flow;
mod kmem;
mod maps;
mod tcp_events;
mod traffic;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here.
    loop {}
}

/// `bpf_probe_read_kernel`, which every tracepoint program here needs, is
/// GPL-only: the kernel refuses it to an object without a GPL-compatible
/// licence string. The crate is `MIT OR GPL-2.0-only`, which the kernel
/// spells "Dual MIT/GPL".
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
