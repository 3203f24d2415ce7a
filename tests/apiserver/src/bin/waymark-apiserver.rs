//! Runs the stand-in API server by hand: `waymark-apiserver --listen
//! 127.0.0.1:6443`, then point kubectl at the kubeconfig it prints.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use waymark_apiserver::ApiServer;

/// A stand-in Kubernetes API server (plain HTTP, no authentication; for tests).
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = ApiServer::start(args.listen)
        .await
        .context("starting the stand-in API server")?;
    server.set_bookmark_interval(std::time::Duration::from_secs(args.bookmark_seconds.max(1)));
    print!("{}", server.kubeconfig());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
