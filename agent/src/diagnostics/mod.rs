//! What the agent tells operators about the traffic it carries: metrics, the
//! sliding windows behind `waymark stat`, diagnostic traces, the table of
//! open connections and packet capture. The kernel's drop, retransmit and
//! reset counters come from a second eBPF loader, `crate::kernel`, which
//! sits beside the redirect's (`crate::redirect`).

pub mod capture;
pub mod conns;
pub mod http_metrics;
pub mod metrics;
pub mod policy;
pub mod stats;
pub mod stats_view;
pub mod tap;
pub mod trace;
