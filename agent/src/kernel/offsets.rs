//! What the programs need to know about the running kernel, read from its
//! BTF: struct field offsets, which tracepoint arguments exist, and the
//! names of drop and reset reasons.
//!
//! Reason names are never a table in this source: a kernel adds reasons
//! with every release (and renumbers them), so the numbers the programs
//! count are named by the running kernel's own `enum skb_drop_reason` and
//! `enum sk_rst_reason`.

use std::collections::BTreeMap;

use waymark_common::diag::{FLAG_KFREE_SKB_RX_SK, FLAG_SEND_RESET_REASON, KernelOffsets, NO_FIELD};

use super::btf::{Btf, BtfError};

/// Everything resolved from BTF at start-up.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    pub offsets: KernelOffsets,
    pub flags: u32,
    pub drop_reasons: ReasonNames,
    pub reset_reasons: ReasonNames,
    /// Drop reasons below 256 the programs count (see `counted_reasons`).
    pub counted: [u64; 4],
    /// Tracepoints whose arguments are not what the programs expect; their
    /// programs are not attached.
    pub unusable: Vec<(&'static str, String)>,
    /// Fields that were not found (the programs skip what needs them).
    pub missing_fields: Vec<String>,
}

/// Number -> name of one of the kernel's reason enums.
#[derive(Debug, Clone, Default)]
pub struct ReasonNames {
    names: BTreeMap<u32, String>,
}

impl ReasonNames {
    /// The kernel's name without the enum's common prefix (`NO_SOCKET`, as
    /// the tracepoint prints it), or `UNKNOWN_<n>`.
    pub fn name(&self, value: u32) -> String {
        self.names
            .get(&value)
            .cloned()
            .unwrap_or_else(|| format!("UNKNOWN_{value}"))
    }

    /// The value of a name (without prefix).
    #[cfg(test)]
    pub fn value(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .find_map(|(v, n)| (n == name).then_some(*v))
    }

    fn insert(&mut self, value: i64, name: &str, prefixes: &[&str]) {
        let Ok(value) = u32::try_from(value) else {
            return;
        };
        let short = prefixes
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        self.names.entry(value).or_insert_with(|| short.to_string());
    }
}

/// Drop reasons that are not drops worth counting: see `ebpf/kernel/src/diag/drops.rs`.
const NOT_COUNTED: [&str; 4] = [
    "SKB_NOT_DROPPED_YET",
    "SKB_CONSUMED",
    "SKB_DROP_REASON_NOT_SPECIFIED",
    "SKB_DROP_REASON_MAX",
];

/// Arguments the programs read, per tracepoint: (index, C type). A
/// tracepoint whose prototype differs there is not used.
const EXPECTED_ARGS: [(&str, &[(usize, &str)]); 4] = [
    (
        "kfree_skb",
        &[(0, "struct sk_buff *"), (2, "enum skb_drop_reason")],
    ),
    ("tcp_retransmit_skb", &[(0, "struct sock *")]),
    (
        "tcp_send_reset",
        &[(0, "struct sock *"), (1, "struct sk_buff *")],
    ),
    ("tcp_receive_reset", &[(0, "struct sock *")]),
];

impl KernelInfo {
    pub fn resolve(btf: &Btf, count_unspecified: bool) -> Result<Self, BtfError> {
        let mut missing_fields = Vec::new();
        let mut field = |name: &str, path: &[&str]| match btf.member_offset(name, path) {
            Ok(off) => off,
            Err(_) => {
                missing_fields.push(format!("{name}.{}", path.join(".")));
                NO_FIELD
            }
        };
        let offsets = KernelOffsets {
            skb_sk: field("sk_buff", &["sk"]),
            skb_dev: field("sk_buff", &["dev"]),
            skb_head: field("sk_buff", &["head"]),
            skb_network_header: field("sk_buff", &["network_header"]),
            skb_transport_header: field("sk_buff", &["transport_header"]),
            skb_protocol: field("sk_buff", &["protocol"]),
            dev_nd_net: field("net_device", &["nd_net", "net"]),
            net_cookie: field("net", &["net_cookie"]),
            sk_net: field("sock", &["__sk_common", "skc_net", "net"]),
            sk_family: field("sock", &["__sk_common", "skc_family"]),
            sk_state: field("sock", &["__sk_common", "skc_state"]),
            sk_daddr: field("sock", &["__sk_common", "skc_daddr"]),
            sk_rcv_saddr: field("sock", &["__sk_common", "skc_rcv_saddr"]),
            sk_dport: field("sock", &["__sk_common", "skc_dport"]),
            sk_num: field("sock", &["__sk_common", "skc_num"]),
            sk_v6_daddr: field("sock", &["__sk_common", "skc_v6_daddr"]),
            sk_v6_rcv_saddr: field("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
            sk_protocol: field("sock", &["sk_protocol"]),
            sk_cgroup: field("sock", &["sk_cgrp_data", "cgroup"]),
            cgroup_kn: field("cgroup", &["kn"]),
            kn_id: field("kernfs_node", &["id"]),
            inet_sport: field("inet_sock", &["inet_sport"]),
        };
        // Without these nothing can be attributed to a pod.
        for (what, off) in [
            ("net.net_cookie", offsets.net_cookie),
            ("sock_common.skc_net", offsets.sk_net),
        ] {
            if off == NO_FIELD {
                return Err(BtfError::Missing(what.into()));
            }
        }

        let mut unusable = Vec::new();
        let mut flags = 0;
        for (tracepoint, expected) in EXPECTED_ARGS {
            let args = match btf.tracepoint_args(tracepoint) {
                Ok(args) => args,
                Err(e) => {
                    unusable.push((tracepoint, e.to_string()));
                    continue;
                }
            };
            let mismatch = expected
                .iter()
                .find(|(i, ty)| args.get(*i).is_none_or(|a| a != ty));
            if let Some((i, ty)) = mismatch {
                unusable.push((
                    tracepoint,
                    format!("argument {i} is not {ty} (arguments: {})", args.join(", ")),
                ));
                continue;
            }
            match tracepoint {
                "kfree_skb" if args.get(3).is_some_and(|a| a == "struct sock *") => {
                    flags |= FLAG_KFREE_SKB_RX_SK
                }
                "tcp_send_reset" if args.get(2).is_some_and(|a| a == "enum sk_rst_reason") => {
                    flags |= FLAG_SEND_RESET_REASON
                }
                _ => {}
            }
        }

        let drops = btf.enum_members("skb_drop_reason")?;
        let mut drop_reasons = ReasonNames::default();
        for (name, value) in &drops {
            drop_reasons.insert(*value, name, &["SKB_DROP_REASON_", "SKB_"]);
        }
        // Subsystems (mac80211, openvswitch, …) number their own reasons
        // above 0xffff in enums of their own.
        for name in btf.enums_ending_with("_drop_reason") {
            if name == "skb_drop_reason" {
                continue;
            }
            for (member, value) in btf.enum_members(&name)? {
                drop_reasons.insert(value, &member, &[]);
            }
        }
        let mut counted = [0u64; 4];
        for (name, value) in &drops {
            let skip = NOT_COUNTED.contains(&name.as_str())
                && !(count_unspecified && name == "SKB_DROP_REASON_NOT_SPECIFIED");
            if !skip && (0..256).contains(value) {
                counted[(*value >> 6) as usize] |= 1 << (*value & 63);
            }
        }

        let mut reset_reasons = ReasonNames::default();
        if let Ok(members) = btf.enum_members("sk_rst_reason") {
            for (name, value) in members {
                reset_reasons.insert(value, &name, &["SK_RST_REASON_"]);
            }
        }
        Ok(KernelInfo {
            offsets,
            flags,
            drop_reasons,
            reset_reasons,
            counted,
            unusable,
            missing_fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_drop_their_prefix() {
        let mut r = ReasonNames::default();
        r.insert(
            3,
            "SKB_DROP_REASON_NO_SOCKET",
            &["SKB_DROP_REASON_", "SKB_"],
        );
        r.insert(1, "SKB_CONSUMED", &["SKB_DROP_REASON_", "SKB_"]);
        r.insert(-1, "NEGATIVE", &[]);
        assert_eq!(r.name(3), "NO_SOCKET");
        assert_eq!(r.name(1), "CONSUMED");
        assert_eq!(r.name(7), "UNKNOWN_7");
        assert_eq!(r.value("NO_SOCKET"), Some(3));
    }

    /// On the running kernel: every field resolves, the reasons come from
    /// its BTF and the noise reasons are not counted.
    #[test]
    fn resolves_on_the_running_kernel() {
        let Ok(btf) = Btf::vmlinux() else {
            eprintln!("no kernel BTF; skipped");
            return;
        };
        let info = KernelInfo::resolve(&btf, false).unwrap();
        assert!(info.missing_fields.is_empty(), "{:?}", info.missing_fields);
        assert!(info.unusable.is_empty(), "{:?}", info.unusable);
        let no_socket = info.drop_reasons.value("NO_SOCKET").unwrap();
        assert!(info.counted[(no_socket >> 6) as usize] & (1 << (no_socket & 63)) != 0);
        let unspecified = info.drop_reasons.value("NOT_SPECIFIED").unwrap();
        assert!(info.counted[(unspecified >> 6) as usize] & (1 << (unspecified & 63)) == 0);
        assert_eq!(info.reset_reasons.name(1), "NO_SOCKET");
    }
}
