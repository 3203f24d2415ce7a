//! A stand-in Kubernetes API server for waymark's tests.
//!
//! No real API server can be installed on the project's machines, so this
//! crate serves the parts of the Kubernetes API that waymark and its
//! manifests use — discovery, list with resourceVersion, selectors and
//! pagination, watch with bookmarks and 410 Gone, create/replace/patch/delete,
//! CustomResourceDefinitions — over plain HTTP on loopback. Its tests drive
//! it with clients nobody here wrote (kubectl 1.33 and the Python
//! `kubernetes` client) to show it behaves like the real thing. The handle
//! changes the world directly and injects faults.

mod api;
mod meta;
mod openapi;
pub mod pagination;
mod patch;
pub mod resources;
pub mod selector;
mod server;
pub mod status;
pub mod store;
mod watch;

pub use server::{ApiServer, DEFAULT_BOOKMARK_INTERVAL, Fault, ServerError};
pub use status::{ApiError, Reason};
