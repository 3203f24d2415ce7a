//! The waymark node agent and its operator CLI, as a library: the `waymark`
//! binary (`main.rs`) is a thin command-line front end over it, and the
//! benchmarks (`agent/benches`) measure its hot pieces directly.
//!
//! Its documentation is for the people who work on it (`cargo doc
//! --document-private-items`, checked in CI), so a module's doc may point
//! at the private pieces it is made of.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod config;
pub mod data_path;
pub mod diagnostics;
pub mod discovery;
pub mod drain;
pub mod enrollment;
pub mod fast_map;
pub mod fuzzing;
pub mod handover;
pub mod http;
pub mod identity;
mod in_box;
pub mod in_process;
pub mod kernel;
pub mod kube;
pub mod memory;
pub mod proxy;
pub mod redirect;
pub mod reload;
pub mod retry;
pub mod routing;
pub mod telemetry;
pub mod transport;
pub mod wake_gate;
