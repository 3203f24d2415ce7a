//! What the agent tells operators about the traffic it carries: metrics, the
//! sliding windows behind `waymark stat`, diagnostic traces, the kernel's
//! drop/retransmit/reset counters, the table of open connections and packet
//! capture.

pub mod capture;
pub mod conns;
pub mod http_metrics;
pub mod kernel;
pub mod metrics;
pub mod policy;
pub mod stats;
pub mod stats_view;
pub mod tap;
pub mod trace;
