//! Logging setup: `tracing` with an `EnvFilter` that can be changed at
//! runtime (through the admin API), plain or JSON lines on stderr.

use std::io::IsTerminal as _;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

/// Default filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "waymark=info,warn";

/// Changes the active log filter without a restart.
#[derive(Clone)]
pub struct LogLevelHandle {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogLevelHandle {
    /// Replaces the filter, e.g. `waymark=debug,h2=trace`. A bad directive is
    /// an error and the old filter stays.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }

    /// The filter in force.
    pub fn get(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_else(|e| format!("unavailable: {e}"))
    }
}

/// Installs the global subscriber. `json` switches to one JSON object a line.
pub fn init(json: bool) -> LogLevelHandle {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .init();
    }
    LogLevelHandle { handle }
}
