//! The operator's CLI: subcommands that talk to an agent's admin API.
//!
//! The CLI runs on the node next to the agent it asks, as root or a member
//! of the agent's `admin.socket_group`: every endpoint but `/live`, `/ready`
//! and `/metrics` is served only on the agent's Unix socket. Every
//! subcommand takes `--admin PATH|ADDR` (default `/run/waymark/admin.sock`,
//! or `WAYMARK_ADMIN`); an `IP:port` reaches the loopback TCP port, which
//! answers the probes' endpoints only.

pub mod capture;
pub mod check;
pub mod cleanup;
pub mod client;
pub mod conns;
pub mod drops;
pub mod endpoints;
pub mod log_level;
pub mod stat;
pub mod table;
pub mod tap;
pub mod tap_explain;
pub mod top;
pub mod trace;

/// Where the agent's admin API is, shared by every CLI subcommand.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminArgs {
    /// The agent's admin socket (a path), or its loopback TCP address
    /// (IP:port), which serves /live, /ready and /metrics only.
    #[arg(
        long,
        env = "WAYMARK_ADMIN",
        default_value = crate::config::DEFAULT_ADMIN_SOCKET,
        global = true
    )]
    pub admin: client::AdminTarget,
}

/// Output format of the table-printing subcommands.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people. `wide` (kubectl's and Linkerd's word)
    /// is the same: these tables always show every column, the per-backend
    /// rows of `routes` included.
    #[default]
    #[value(alias = "wide")]
    Table,
    /// One JSON document (or one JSON object a line when streaming) for scripts.
    Json,
}

#[cfg(test)]
mod output_tests {
    use clap::ValueEnum as _;

    use super::Output;

    #[test]
    fn wide_is_the_table() {
        assert_eq!(Output::from_str("wide", false), Ok(Output::Table));
        assert_eq!(Output::from_str("json", false), Ok(Output::Json));
        assert!(Output::from_str("yaml", false).is_err());
    }
}
