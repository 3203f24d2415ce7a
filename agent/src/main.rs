//! `waymark`: the node agent (`waymark agent`) and the operator's CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use waymark_agent::{app, cli, config, identity, memory, telemetry};

/// jemalloc, configured by `memory::JEMALLOC_CONF` (why: `memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol before `main` runs.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: Option<&'static std::ffi::c_char> = memory::JEMALLOC_CONF;

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
        /// Discover pods, services and nodes from the Kubernetes API server
        /// this kubeconfig points at (turns `[kubernetes]` on; in a cluster
        /// set `kubernetes.enabled = true` instead, for in-cluster
        /// credentials).
        #[arg(long, env = "WAYMARK_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Inspect configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Workload identities and their certificates.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Capture packets in a pod's network namespace (or the node's) as
    /// pcapng: `waymark capture --pod ns/name -f 'tcp port 80' -w - | tshark -r -`.
    Capture {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::capture::CaptureArgs,
    },
    /// Read or change the agent's log filter without a restart.
    LogLevel {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(subcommand)]
        cmd: Option<cli::log_level::LogLevelCommand>,
    },
    /// Stream the requests the agent is proxying now (like `linkerd tap`).
    Tap {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::tap::TapArgs,
    },
    /// The busiest request paths now, from the tap stream (like `linkerd
    /// top`): count, best/worst/last latency and success rate per source,
    /// destination, method and path.
    Top {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::top::TopArgs,
    },
    /// Send a diagnostic trace request from a pod (through the kernel
    /// redirect and the agent, as the pod's own traffic goes) and print
    /// what every hop appended.
    Trace {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::trace::TraceArgs,
    },
    /// What the kernel dropped, retransmitted and reset, per pod and drop
    /// reason (`--follow` streams the events).
    Drops {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::drops::DropsArgs,
    },
    /// Success rate, requests per second, latency percentiles, TCP
    /// connections and retries of services or pods, over a sliding window.
    Stat {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::stat::StatArgs,
    },
    /// The same golden metrics per route of one service, `[DEFAULT]` included.
    Routes {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::stat::RoutesArgs,
    },
    /// Every endpoint of a service as the balancer sees it: where it is,
    /// latency estimate, requests in flight, recent successes and failures,
    /// ejected until when and why, last error, direct or tunnel.
    Endpoints {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::endpoints::EndpointsArgs,
    },
    /// The connections the agent carries now, by pod and 5-tuple: original
    /// destination, service and endpoint, protocol, tunnel and peer
    /// identity, age, bytes each way, requests, and the kernel's counters.
    Conns {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::conns::ConnsArgs,
    },
    /// Which pod talks to which service: success rate, requests per second,
    /// open connections and the identity each side proved.
    Edges {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::stat::WindowArgs,
    },
    /// Remove the redirect state an agent leaves pinned in bpffs (links and
    /// maps), detaching its programs: the last step of uninstalling waymark
    /// from a node, once its agent is stopped.
    Cleanup(cli::cleanup::CleanupArgs),
    /// Check that this node can run waymark (--pre) and that its agent works.
    Check {
        #[command(flatten)]
        admin: cli::AdminArgs,
        #[command(flatten)]
        args: cli::check::CheckArgs,
    },
}

fn client(admin: &cli::AdminArgs) -> cli::client::AdminClient {
    cli::client::AdminClient::new(admin.admin.clone())
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
        /// How long the issuer certificate stays valid (e.g. `10d`).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "365d")]
        issuer_lifetime: std::time::Duration,
        /// How long the root (the trust anchor) stays valid.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3650d")]
        root_lifetime: std::time::Duration,
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
        Command::Agent {
            config,
            log_format,
            kubeconfig,
        } => {
            let log = telemetry::init(matches!(log_format, LogFormat::Json));
            let loaded = match &config {
                Some(path) => config::Config::from_file(path),
                None => Ok(config::Config::embedded_default()),
            };
            let loaded = match loaded {
                Ok(mut c) => {
                    if let Some(k) = kubeconfig {
                        c.kubernetes.enabled = true;
                        c.kubernetes.kubeconfig = Some(k);
                    }
                    c
                }
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
            issuer_lifetime,
            root_lifetime,
        }) => match identity::init::run_with(
            &dir,
            &trust_domain,
            force,
            identity::init::Lifetimes {
                root: root_lifetime,
                issuer: issuer_lifetime,
            },
        ) {
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
        Command::Capture { admin, args } => cli_exit(cli::capture::run(
            &cli::client::AdminClient::new(admin.admin.clone()),
            args,
        )),
        Command::LogLevel { admin, cmd } => cli_exit(cli::log_level::run(
            &cli::client::AdminClient::new(admin.admin.clone()),
            cmd,
        )),
        Command::Drops { admin, args } => cli_exit(cli::drops::run(
            &cli::client::AdminClient::new(admin.admin.clone()),
            args,
        )),
        Command::Stat { admin, args } => cli_exit(cli::stat::stat(&client(&admin), args)),
        Command::Routes { admin, args } => cli_exit(cli::stat::routes(&client(&admin), args)),
        Command::Endpoints { admin, args } => cli_exit(cli::endpoints::run(&client(&admin), args)),
        Command::Conns { admin, args } => cli_exit(cli::conns::run(&client(&admin), args)),
        Command::Edges { admin, args } => cli_exit(cli::stat::edges(&client(&admin), args)),
        Command::Cleanup(args) => cli_exit(cli::cleanup::run(args)),
        Command::Check { admin, args } => match cli::check::run(&client(&admin), &args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => cli_exit(Err(e)),
        },
        Command::Tap { admin, args } => cli_exit(cli::tap::run(
            &cli::client::AdminClient::new(admin.admin.clone()),
            args,
        )),
        Command::Top { admin, args } => cli_exit(cli::top::run(&client(&admin), args)),
        Command::Trace { admin, args } => cli_exit(cli::trace::run(
            &cli::client::AdminClient::new(admin.admin.clone()),
            args,
        )),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
    }
}
