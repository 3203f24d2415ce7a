//! `waymark log-level [get | set FILTER]`: reads or changes the agent's
//! `tracing` filter at runtime (per target, e.g. `waymark=debug,h2=trace`).

use anyhow::Result;
use bytes::Bytes;
use hyper::Method;

use super::client::{AdminClient, block_on};

#[derive(clap::Subcommand, Clone, Debug)]
pub enum LogLevelCommand {
    /// Print the filter in force.
    Get,
    /// Replace the filter; a bad directive is rejected and the old one stays.
    Set {
        /// `tracing` directives, e.g. `info`, `waymark=debug,h2=trace`.
        filter: String,
    },
}

pub fn run(client: &AdminClient, cmd: Option<LogLevelCommand>) -> Result<()> {
    let text = block_on(async {
        match cmd.unwrap_or(LogLevelCommand::Get) {
            LogLevelCommand::Get => client.get_text("/log-level").await,
            LogLevelCommand::Set { filter } => {
                client
                    .text(Method::PUT, "/log-level", Bytes::from(filter))
                    .await
            }
        }
    })?;
    print!("{text}");
    Ok(())
}
