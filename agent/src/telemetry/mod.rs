//! What the data path records as it carries traffic, for whoever reads it
//! later: Prometheus metrics ([`metrics`], [`http_metrics`]), the sliding
//! windows behind `waymark stat`, `routes` and `edges` ([`stats`]), the
//! table of open connections behind `waymark conns` ([`conns`]), a traced
//! request's context ([`trace`]), what the configuration lets the data
//! path's diagnostics show ([`policy`]), and the agent's own logs
//! ([`logging`]).
//!
//! The operator's tools that read it, or that reach into the data path on
//! request (tap, packet capture, the stat tables), are
//! [`crate::diagnostics`]; the kernel's counters come from
//! [`crate::kernel`]. Nothing here imports either, so the data path
//! (`transport`, `http`, `proxy`) can record without depending on the
//! tools.

pub mod conns;
pub mod http_metrics;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod stats;
pub mod trace;

pub use logging::{LogLevelHandle, init};
