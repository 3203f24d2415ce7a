//! The operator's tools: live tap of the requests being proxied ([`tap`]),
//! packet capture on demand ([`capture`]) and the tables `waymark stat`,
//! `routes` and `edges` print ([`stats_view`]). They read what the data
//! path records ([`crate::telemetry`]: metrics, stat windows, the
//! connection table, trace contexts) or hook into it only while an
//! operator asks (a tap costs one atomic load per request when nobody
//! taps). The kernel's drop, retransmit and reset counters come from a
//! second eBPF loader, [`crate::kernel`], beside the redirect's
//! ([`crate::redirect`]).

pub mod capture;
pub mod stats_view;
pub mod tap;
