//! The operator's CLI: subcommands that talk to an agent's admin API.
//!
//! The admin API listens on loopback only, so the CLI runs on the node (or
//! in the node's network namespace) next to the agent it asks. Every
//! subcommand takes `--admin ADDR` (default `127.0.0.1:4191`, or
//! `WAYMARK_ADMIN`).

pub mod capture;
pub mod check;
pub mod client;
pub mod drops;
pub mod endpoints;
pub mod log_level;
pub mod stat;
pub mod table;
pub mod tap;
pub mod tap_explain;
pub mod top;
pub mod trace;

use std::net::SocketAddr;

/// Where the agent's admin API is, shared by every CLI subcommand.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminArgs {
    /// The agent's admin API address.
    #[arg(
        long,
        env = "WAYMARK_ADMIN",
        default_value = "127.0.0.1:4191",
        global = true
    )]
    pub admin: SocketAddr,
}

/// Output format of the table-printing subcommands.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document (or one JSON object a line when streaming) for scripts.
    Json,
}
