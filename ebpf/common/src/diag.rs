//! Types of the kernel diagnostics programs (`waymark-diag` object): drop,
//! retransmit and reset counters, per-pod traffic, and the event ring.
//!
//! Pods are identified in the kernel by a *slot*: the agent gives every
//! configured pod a small number and writes `netns cookie -> slot` into
//! [`MAX_POD_SLOTS`]-sized maps; slot [`NODE_SLOT`] is the agent's own
//! (node) network namespace. Counters are indexed by slot, so their size is
//! bounded by the number of pods, not by traffic.

/// Slot of the node itself: the agent's own network namespace, and traffic
/// of the pods' cgroup whose netns is no configured pod's.
pub const NODE_SLOT: u32 = 0;
/// Slots 1.. are pods; at most this many slots in all.
pub const MAX_POD_SLOTS: u32 = 512;
/// Distinct (slot, drop reason) counters; far more than slots times the
/// reasons a kernel has, so the LRU never evicts a live counter in practice.
pub const MAX_DROP_KEYS: u32 = 16384;
/// Flows whose drops, retransmits and resets are kept (LRU).
pub const MAX_FLOWS: u32 = 16384;
/// Size of the event ring buffer in bytes (a power of two, page multiple).
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// Bits of [`DiagConfig::flags`].
/// `kfree_skb`'s 4th argument is `rx_sk` (6.11+).
pub const FLAG_KFREE_SKB_RX_SK: u32 = 1;
/// `tcp_send_reset`'s 3rd argument is the reset reason (6.10+).
pub const FLAG_SEND_RESET_REASON: u32 = 2;

/// [`Event::kind`] values.
pub const EVENT_DROP: u16 = 1;
pub const EVENT_RESET_SENT: u16 = 2;
pub const EVENT_RESET_RECEIVED: u16 = 3;

/// Byte offsets of the kernel struct fields the programs read, resolved by
/// the agent from the running kernel's BTF (a userspace stand-in for CO-RE:
/// the programs never hard-code a layout). An offset of [`NO_FIELD`] means
/// the running kernel has no such field; the programs then skip what needs
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sk_buff
    pub skb_sk: u32,
    pub skb_dev: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    // struct net_device
    pub dev_nd_net: u32,
    // struct net
    pub net_cookie: u32,
    // struct sock_common (at offset 0 of every socket kind)
    pub sk_net: u32,
    pub sk_family: u32,
    pub sk_state: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    // struct sock
    pub sk_protocol: u32,
    // struct sock -> sk_cgrp_data.cgroup -> kn -> id
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `struct inet_sock.inet_sport`: a full socket's local port, which
    /// outlives `skc_num` (zeroed when the port is released at close).
    pub inet_sport: u32,
}

/// Marks a field the running kernel does not have.
pub const NO_FIELD: u32 = u32::MAX;

/// Everything the programs need from the agent, in a one-slot array map.
/// Until the agent has written it (`offsets_ready == 0`) every program does
/// nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiagConfig {
    pub offsets: KernelOffsets,
    /// Drop reasons below 256 that are counted, one bit each (the agent
    /// clears "not dropped", "consumed" and "not specified"). Subsystem
    /// reasons (256 and up) are always counted.
    pub counted_reasons: [u64; 4],
    /// Events each CPU may put in the ring per second, and the burst it may
    /// save up; 0 disables events.
    pub events_per_sec: u32,
    pub events_burst: u32,
    pub flags: u32,
    pub offsets_ready: u32,
}

/// Counters of one drop reason in one slot (per-CPU LRU hash key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub slot: u32,
    pub reason: u32,
}

/// Per-slot counters (per-CPU array value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    pub retransmits: u64,
    /// Retransmitted SYNs (`SYN_SENT`): connection attempts not answered.
    pub syn_retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub packets_out: u64,
}

/// A flow from one end's point of view. For events with a socket it is the
/// socket's (local -> remote); for a packet without one it is the packet's
/// (source -> destination). Addresses in network byte order (IPv4 in
/// `saddr[0]`, v4-mapped IPv6 stored as IPv4), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u16,
    /// IP protocol number (6 for TCP).
    pub proto: u8,
    pub _pad: u8,
}

/// Per-flow counters (LRU hash value, updated with atomic adds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub drops: u64,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Slot of the pod the flow belongs to.
    pub slot: u32,
    pub _pad: u32,
}

/// One event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub netns_cookie: u64,
    /// cgroup v2 id of the socket's cgroup; 0 without a socket.
    pub cgroup_id: u64,
    pub flow: FlowTuple,
    /// `EVENT_*`.
    pub kind: u16,
    /// TCP state of the socket (0 without one).
    pub state: u16,
    /// `enum skb_drop_reason` for drops, `enum sk_rst_reason` for resets sent.
    pub reason: u32,
    pub slot: u32,
    pub _pad: u32,
}

/// Per-CPU state of the event rate limit, and what it held back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub last_ns: u64,
    /// Tokens in thousandths of an event.
    pub tokens_milli: u64,
    /// Events not emitted because the budget was spent.
    pub suppressed: u64,
    /// Events the ring had no room for.
    pub lost: u64,
}

const _: () = {
    assert!(core::mem::size_of::<KernelOffsets>() == 22 * 4);
    assert!(core::mem::size_of::<DiagConfig>() == 88 + 32 + 16);
    assert!(core::mem::size_of::<DropKey>() == 8);
    assert!(core::mem::size_of::<PodStats>() == 64);
    assert!(core::mem::size_of::<FlowTuple>() == 40);
    assert!(core::mem::size_of::<FlowStats>() == 40);
    assert!(core::mem::size_of::<Event>() == 24 + 40 + 16);
    assert!(core::mem::size_of::<EventBudget>() == 32);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, `Copy`, without implicit padding
    // (asserted above), and valid for any bit pattern.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::DiagConfig {}
    unsafe impl aya::Pod for super::DropKey {}
    unsafe impl aya::Pod for super::PodStats {}
    unsafe impl aya::Pod for super::FlowTuple {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::EventBudget {}
}
