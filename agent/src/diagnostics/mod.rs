//! What the agent tells operators about the traffic it carries: metrics,
//! diagnostic traces and packet capture; tap and kernel counters slot in
//! beside them.

pub mod capture;
pub mod http_metrics;
pub mod kernel;
pub mod metrics;
pub mod trace;
