//! What the agent tells operators about the traffic it carries: metrics now;
//! tap, traces, kernel counters and capture slot in beside them.

pub mod http_metrics;
pub mod metrics;
pub mod tap;
pub mod trace;
