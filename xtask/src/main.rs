//! waymark's developer tasks: `cargo xtask <task>`.

mod bench;
mod chart;
mod demo;
mod setup;
mod test;
mod world;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "waymark's developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The network-namespace test world (nodes, pods, agents) on this machine.
    #[command(subcommand)]
    World(world::WorldCmd),
    /// Install what is missing, then run every test (what CI runs).
    Test(test::TestArgs),
    /// Install what is missing, bring up a world with real agents, send
    /// traffic and show what the agents saw.
    Demo,
    /// Benchmark: waymark side by side with the direct path and HAProxy and
    /// nginx, in one run (see bench/README.md).
    Bench(bench::BenchArgs),
    /// Benchmark: Kubernetes discovery at scale (10,000 services, 50,000
    /// endpoints, 20,000 pods by default) against the stand-in API server.
    BenchDiscovery(bench::discovery::DiscoveryArgs),
    /// Render the Helm chart (deploy/charts/waymark) into the plain
    /// manifests (deploy/daemonset.yaml), or check them (--check).
    Chart(chart::ChartArgs),
    /// Benchmark: one pod holding thousands of idle connections through
    /// the agent while another pod's requests run (its p99 idle and
    /// loaded, the agent's memory).
    BenchNoisy(bench::noisy::NoisyArgs),
    /// Install what waymark's builds and tests need (apt packages,
    /// rust-src, bpf-linker).
    Setup {
        /// Also build bpf-linker into an empty temporary root and run it
        /// from there, whatever is installed already: proves the install
        /// step as a new machine runs it (see tests/README.md).
        #[arg(long)]
        from_scratch: bool,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::World(cmd) => world::run(cmd),
        Task::Test(args) => test::run(args),
        Task::Demo => demo::run(),
        Task::Setup { from_scratch } => setup::ensure_all().and_then(|()| {
            if from_scratch {
                setup::bpf_linker_from_scratch()
            } else {
                Ok(())
            }
        }),
        Task::Bench(args) => bench::run(args),
        Task::BenchDiscovery(args) => bench::discovery::run(args),
        Task::Chart(args) => chart::run(args),
        Task::BenchNoisy(args) => bench::noisy::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Expected failures (a missing tool, a failed install, no root)
            // are messages for a person: the chain of causes on one line,
            // never a stack trace, whatever RUST_BACKTRACE says.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
