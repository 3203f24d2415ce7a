//! The agent's drain, one concept with one owner: what "this agent is
//! stopping" means to every connection it carries, pods' (outbound) and
//! other agents' (the inbound tunnel) alike.
//!
//! Three steps, in this order, all driven from here:
//! 1. **Started**: listeners stop accepting (the kernel hands new
//!    connections to the agent that takes over, or to nobody); served HTTP
//!    winds down without failing a request (`http::drain`: `Connection:
//!    close` on HTTP/1.1, GOAWAY on HTTP/2 and on tunnel connections);
//!    opaque connections go on.
//! 2. **Waited for**: every connection and tunnel stream is tracked; the
//!    drain waits for them up to `shutdown.drain_grace`.
//! 3. **Forced**: pods' connections still open when the grace is over are
//!    closed; inbound tunnel streams end with the process.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Shared by everything that serves connections; clones are the same
/// drain.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    started: CancellationToken,
    forced: CancellationToken,
    outbound: TaskTracker,
    inbound: TaskTracker,
}

impl Drain {
    /// Cancelled when the drain starts.
    pub fn started(&self) -> &CancellationToken {
        &self.started
    }

    /// Cancelled when the grace period is over: close what is still open.
    pub fn forced(&self) -> &CancellationToken {
        &self.forced
    }

    /// Pods' connections through the agent.
    pub fn outbound(&self) -> &TaskTracker {
        &self.outbound
    }

    /// Tunnel connections from other agents, and their streams.
    pub fn inbound(&self) -> &TaskTracker {
        &self.inbound
    }

    /// Starts the drain, waits up to `grace` for every connection, then
    /// closes pods' connections still open.
    pub async fn run(&self, grace: Duration) {
        self.started.cancel();
        self.outbound.close();
        self.inbound.close();
        let open = || self.outbound.len() + self.inbound.len();
        if open() == 0 {
            return;
        }
        info!(
            outbound = self.outbound.len(),
            inbound = self.inbound.len(),
            "waiting for open connections to finish"
        );
        let all = async {
            self.outbound.wait().await;
            self.inbound.wait().await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            // Inbound streams still open end with the process.
            warn!(
                open = open(),
                "drain grace period over; closing the remaining connections"
            );
            self.forced.cancel();
            self.outbound.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_connections_then_forces_the_rest() {
        let drain = Drain::default();
        // One connection that ends when the drain starts, one that only a
        // forced close ends, one inbound stream that ends on its own.
        let d = drain.clone();
        drain
            .outbound()
            .spawn(async move { d.started().cancelled().await });
        let d = drain.clone();
        drain
            .outbound()
            .spawn(async move { d.forced().cancelled().await });
        drain
            .inbound()
            .spawn(tokio::time::sleep(Duration::from_millis(50)));
        let start = tokio::time::Instant::now();
        drain.run(Duration::from_millis(200)).await;
        assert!(drain.forced().is_cancelled(), "the stuck one was forced");
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "forced before the grace was over"
        );
        assert_eq!(drain.outbound().len() + drain.inbound().len(), 0);
    }

    #[tokio::test]
    async fn a_drain_whose_connections_finish_forces_nothing() {
        let drain = Drain::default();
        let d = drain.clone();
        drain
            .outbound()
            .spawn(async move { d.started().cancelled().await });
        drain.run(Duration::from_secs(5)).await;
        assert!(drain.started().is_cancelled());
        assert!(!drain.forced().is_cancelled());
    }
}
