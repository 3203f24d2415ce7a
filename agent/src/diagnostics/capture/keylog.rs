//! TLS session secrets for captures of the node-to-node tunnel.
//!
//! [`KeyLogSink`] is a `rustls::KeyLog` that does nothing (and tells rustls
//! so through `will_log`, so no secret is even formatted) unless a capture
//! with `keylog=1` is running; while one is, each secret rustls derives is
//! forwarded as an NSS key log line (`LABEL <client random> <secret>`, hex)
//! to that capture, which writes it into its pcapng stream as a Decryption
//! Secrets Block. Wireshark then decrypts the tunnel's TLS in the file with
//! no key log file on the side.
//!
//! How the tunnel plugs in: the agent owns one sink (`Captures::key_log()`),
//! and the tunnel's rustls configs take it before they are shared:
//!
//! ```text
//! let mut client = ClientConfig::builder_with_provider(provider)…;
//! client.key_log = captures.key_log();          // Arc<KeyLogSink> as Arc<dyn KeyLog>
//! let mut server = ServerConfig::builder_with_provider(provider)…;
//! server.key_log = captures.key_log();
//! ```
//!
//! i.e. `identity::tls::{client_config, server_config}` gain a
//! `key_log: Arc<dyn rustls::KeyLog>` argument that the tunnel pool and the
//! tunnel server pass from the agent's `Captures`. Only TLS 1.3 labels occur
//! (the tunnel allows nothing older). Secrets leave the agent only through
//! a capture the operator asked for on the loopback admin API, and only
//! when `capture.keylog = true` in the config; every such capture is logged
//! at warn level.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

/// Lines a capture may fall behind by before new ones are dropped (and
/// counted): the secrets of a few hundred handshakes.
const QUEUE: usize = 4096;

/// Forwards TLS secrets to the key-log captures running, if any.
#[derive(Default)]
pub struct KeyLogSink {
    subscribers: Mutex<Vec<(u64, SyncSender<String>)>>,
    active: AtomicUsize,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

impl fmt::Debug for KeyLogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLogSink")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A capture's share of the key log; it stops receiving when dropped.
pub struct KeyLogSubscription {
    sink: Arc<KeyLogSink>,
    id: u64,
    lines: Receiver<String>,
}

impl KeyLogSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether any capture is taking secrets now.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Lines dropped because a capture fell behind (all captures).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Starts forwarding secrets to a new subscriber.
    pub fn subscribe(self: &Arc<Self>) -> KeyLogSubscription {
        let (tx, rx) = sync_channel(QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.push((id, tx));
        self.active.store(subs.len(), Ordering::Release);
        KeyLogSubscription {
            sink: self.clone(),
            id,
            lines: rx,
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|(i, _)| *i != id);
        self.active.store(subs.len(), Ordering::Release);
    }
}

impl KeyLogSubscription {
    /// Lines the sink dropped because a capture fell behind.
    pub fn dropped(&self) -> u64 {
        self.sink.dropped()
    }

    /// Every line received so far (each ends in a newline), or an empty
    /// string.
    pub fn drain(&self) -> String {
        let mut out = String::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push_str(&line);
        }
        out
    }
}

impl Drop for KeyLogSubscription {
    fn drop(&mut self) {
        self.sink.unsubscribe(self.id);
    }
}

impl rustls::KeyLog for KeyLogSink {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        if !self.is_active() {
            return;
        }
        let line = format!("{label} {} {}\n", hex(client_random), hex(secret));
        let subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, tx) in subs.iter() {
            match tx.try_send(line.clone()) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn will_log(&self, _label: &str) -> bool {
        self.is_active()
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::KeyLog;

    #[test]
    fn nothing_is_logged_without_a_capture() {
        let sink = KeyLogSink::new();
        assert!(!sink.will_log("CLIENT_TRAFFIC_SECRET_0"));
        sink.log("CLIENT_TRAFFIC_SECRET_0", &[1, 2], &[3, 4]);
        let sub = sink.subscribe();
        // What was logged before the capture started is not delivered.
        assert_eq!(sub.drain(), "");
    }

    #[test]
    fn a_capture_gets_nss_lines_while_it_runs() {
        let sink = KeyLogSink::new();
        let a = sink.subscribe();
        let b = sink.subscribe();
        assert!(sink.will_log("SERVER_HANDSHAKE_TRAFFIC_SECRET"));
        sink.log("SERVER_HANDSHAKE_TRAFFIC_SECRET", &[0xab, 0x01], &[0xff]);
        assert_eq!(a.drain(), "SERVER_HANDSHAKE_TRAFFIC_SECRET ab01 ff\n");
        assert_eq!(b.drain(), "SERVER_HANDSHAKE_TRAFFIC_SECRET ab01 ff\n");
        drop(a);
        assert!(sink.is_active());
        drop(b);
        assert!(!sink.is_active());
        assert!(!sink.will_log("EXPORTER_SECRET"));
    }

    #[test]
    fn a_capture_that_falls_behind_loses_lines_not_memory() {
        let sink = KeyLogSink::new();
        let sub = sink.subscribe();
        for _ in 0..QUEUE + 10 {
            sink.log("L", &[1], &[2]);
        }
        assert_eq!(sink.dropped(), 10);
        assert_eq!(sub.drain().lines().count(), QUEUE);
    }
}
