//! End-to-end test support for waymark.
//!
//! The [`world`] module builds a small cluster out of network namespaces on
//! this machine (a fabric, nodes, pods with their own cgroups), runs real
//! `waymark agent`s in the nodes and real workloads in the pods, and removes
//! all of it again when the [`World`] is dropped. The `testpeer` binary of this
//! package is the workload the tests run in pods. The [`fixtures`] module
//! holds the worlds and services many tests share. See `tests/README.md`.

pub mod fixtures;
pub mod grpc_unary;
pub mod http_app;
mod macros;
pub mod support;
pub mod world;

pub use nix::sys::signal::Signal;
pub use support::bpf::{bpftool_missing, cgroup_links, detach_link};
pub use support::curl::{Tally, curl, curl_codes, curl_i, curl_many};
pub use support::tap::{tap, tap_events, waymark};
pub use support::{await_metric, fast_http, http_app, metric, nft_in, pod_ip, python, with_world};
pub use world::admin::metric_value;
pub use world::process::{Server, testpeer, testpeer_bin};
pub use world::wait::{DEFAULT_PATIENCE, eventually};
pub use world::{Node, Pod, World, WorldBuilder, skip_reason};
