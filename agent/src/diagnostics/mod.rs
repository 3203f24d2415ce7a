//! What the agent tells operators about the traffic it carries: metrics and
//! the sliding windows behind `waymark stat`;
//! tap, traces, kernel counters and capture slot in beside them.

pub mod http_metrics;
pub mod metrics;
pub mod stats;
pub mod stats_view;
pub mod trace;
