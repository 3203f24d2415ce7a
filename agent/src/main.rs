//! `waymark`: the node agent (`waymark agent`) and the operator's CLI.

mod admin;
mod app;
mod balance;
mod cli;
mod config;
mod diagnostics;
mod discovery;
mod http;
mod identity;
mod proxy;
mod redirect;
mod reload;
mod retry;
mod routing;
mod telemetry;
mod tunnel;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// waymark: a node-level transparent proxy steered by eBPF.
#[derive(Parser)]
#[command(name = "waymark", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent {
        /// Config file (TOML). Without it the embedded default runs: admin
        /// API on 127.0.0.1:4191, programs loaded but not attached.
        #[arg(long, short, env = "WAYMARK_CONFIG")]
        config: Option<PathBuf>,
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Plain, env = "WAYMARK_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Inspect configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Workload identities and their certificates.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Read or change the agent's log filter without a restart.
    LogLevel {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(subcommand)]
        cmd: Option<cli::log_level::LogLevelCommand>,
    },
}

/// Exit status of a CLI subcommand: errors go to stderr with their context.
fn cli_exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waymark: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Create a development trust anchor and issuer (ca.crt, issuer.crt,
    /// issuer.key). For production, give the agent a cert-manager issuer.
    Init {
        /// Directory for the PEM files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = identity::init::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and report every problem in it.
    Check { file: PathBuf },
    /// Print the embedded default config.
    Default,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { config, log_format } => {
            let log = telemetry::init(matches!(log_format, LogFormat::Json));
            let loaded = match &config {
                Some(path) => config::Config::from_file(path),
                None => Ok(config::Config::embedded_default()),
            };
            let loaded = match loaded {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("waymark: {e}");
                    return ExitCode::from(2);
                }
            };
            match app::run(loaded, config, log) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("waymark: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config(ConfigCommand::Check { file }) => match config::Config::from_file(&file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Identity(IdentityCommand::Init {
            dir,
            trust_domain,
            force,
        }) => match identity::init::run(&dir, &trust_domain, force) {
            Ok(report) => {
                println!(
                    "trust domain {}: wrote in {}: {}",
                    report.trust_domain,
                    report.dir.display(),
                    report
                        .files
                        .iter()
                        .map(|f| f.file_name().unwrap_or(f.as_os_str()).to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("waymark: {e}");
                ExitCode::from(2)
            }
        },
        Command::LogLevel { admin, cmd } => cli_exit(cli::log_level::run(
            &cli::client::AdminClient::new(admin.admin),
            cmd,
        )),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
    }
}
