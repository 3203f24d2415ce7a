//! testpeer: a small, real TCP peer for waymark's end-to-end tests.
//!
//! Servers print `listening <addr>` once bound and `accept <peer>` per
//! connection (each line flushed), so a test knows when they are ready and
//! who connected. Clients print one JSON object and never hang: every one has
//! an overall `--timeout`. Exit codes: 0 ok, 1 the echo differed, 2 an error
//! (refused, reset, timeout, …) which is also in the JSON's `error`.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// Connections a server keeps open at once (the process may open 20,000
/// files in all).
const SERVER_MAX_CONNS: usize = 15_000;
/// The largest `--concurrency` of `many`.
const MAX_CONCURRENCY: usize = 10_000;
/// How much of what a client received it shows in `text`.
const TEXT_MAX: usize = 4096;

#[derive(Parser)]
#[command(
    name = "testpeer",
    about = "A small TCP peer for waymark's end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: echoes each connection until EOF, then shuts down its write side.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Writes `peer=<peer addr>` and closes.
    Whoami {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Reads until EOF, then writes `got <n> bytes` and closes.
    HalfcloseServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connects, sends N seeded pseudo-random bytes, half-closes, reads to
    /// EOF and compares; prints a JSON report.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes to send.
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        /// Seed of the pseudo-random bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send nothing (and do not half-close); just read to EOF.
        #[arg(long)]
        read_only: bool,
        /// Overall deadline.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// A stand-in for `waymark agent`, to test the world's agent handling:
    /// serves `/ready`, `/live` and `/metrics` on the config's `admin.listen`
    /// and exits on SIGTERM or SIGINT.
    Agent {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// N echo round trips with C in flight; prints a JSON summary.
    Many {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Bytes per round trip.
        #[arg(long, default_value_t = 64)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Deadline of one round trip.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        conn_timeout: Duration,
        /// Overall deadline.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn say(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the server down.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn describe(e: &std::io::Error) -> String {
    format!("{:?}: {e}", e.kind())
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        match cli.cmd {
            Cmd::Echo { listen } => serve(listen, Kind::Echo).await,
            Cmd::Whoami { listen } => serve(listen, Kind::Whoami).await,
            Cmd::HalfcloseServer { listen } => serve(listen, Kind::Halfclose).await,
            Cmd::Client {
                connect,
                bytes,
                seed,
                read_only,
                timeout,
            } => client(connect, bytes, seed, read_only, timeout).await,
            Cmd::Agent { config } => fake_agent(&config).await,
            Cmd::Many {
                connect,
                count,
                concurrency,
                bytes,
                seed,
                conn_timeout,
                timeout,
            } => {
                many(
                    connect,
                    count,
                    concurrency,
                    bytes,
                    seed,
                    conn_timeout,
                    timeout,
                )
                .await
            }
        }
    });
    std::process::exit(code);
}

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Whoami,
    Halfclose,
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

async fn serve(addr: SocketAddr, kind: Kind) -> i32 {
    let listener = match bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testpeer: cannot listen on {addr}: {e}");
            return 2;
        }
    };
    say(format_args!(
        "listening {}",
        listener.local_addr().unwrap_or(addr)
    ));
    let slots = Arc::new(Semaphore::new(SERVER_MAX_CONNS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of files or a transient error: back off, keep serving.
                eprintln!("testpeer: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        say(format_args!("accept {peer}"));
        tokio::spawn(async move {
            let r = match kind {
                Kind::Echo => echo(sock).await,
                Kind::Whoami => whoami(sock, peer).await,
                Kind::Halfclose => halfclose(sock).await,
            };
            if let Err(e) = r {
                eprintln!("testpeer: connection from {peer}: {e}");
            }
            drop(permit);
        });
    }
}

async fn echo(mut sock: TcpStream) -> std::io::Result<()> {
    let (r, mut w) = sock.split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    tokio::io::copy_buf(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn whoami(mut sock: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    sock.write_all(format!("peer={peer}\n").as_bytes()).await?;
    sock.shutdown().await?;
    // Drain what the client may still send, so closing does not reset.
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while sock.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    Ok(())
}

async fn halfclose(mut sock: TcpStream) -> std::io::Result<()> {
    let mut n: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = sock.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    sock.write_all(format!("got {n} bytes\n").as_bytes())
        .await?;
    sock.shutdown().await
}

/// A seeded stream of pseudo-random bytes (splitmix64).
struct Bytes {
    state: u64,
    buf: [u8; 8],
    pos: usize,
}

impl Bytes {
    fn new(seed: u64) -> Self {
        Bytes {
            state: seed,
            buf: [0; 8],
            pos: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.pos == 8 {
                self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = self.state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                self.buf = (z ^ (z >> 31)).to_le_bytes();
                self.pos = 0;
            }
            *b = self.buf[self.pos];
            self.pos += 1;
        }
    }
}

#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
}

struct Exchange {
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    matched: bool,
    text: Vec<u8>,
}

/// One connection: send `bytes` (unless read-only) and half-close, read to
/// EOF comparing against the same seeded stream.
async fn exchange(
    addr: SocketAddr,
    bytes: u64,
    seed: u64,
    read_only: bool,
    progress: &Progress,
    ex: &mut Exchange,
) -> std::io::Result<()> {
    let mut sock = TcpStream::connect(addr).await?;
    ex.peer = sock.peer_addr().ok();
    ex.local = sock.local_addr().ok();
    let (mut r, mut w) = sock.split();
    let writer = async {
        if read_only {
            return Ok(());
        }
        let mut stream = Bytes::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..k]);
            w.write_all(&buf[..k]).await?;
            progress.sent.fetch_add(k as u64, Ordering::Relaxed);
            left -= k as u64;
        }
        w.shutdown().await
    };
    let mut matched = true;
    let mut text = Vec::new();
    let reader = async {
        let mut stream = Bytes::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        loop {
            let k = r.read(&mut buf).await?;
            if k == 0 {
                return Ok(());
            }
            if text.len() < TEXT_MAX {
                let take = k.min(TEXT_MAX - text.len());
                text.extend_from_slice(&buf[..take]);
            }
            let got = progress.received.fetch_add(k as u64, Ordering::Relaxed);
            if matched {
                let expect = (bytes.saturating_sub(got)).min(k as u64) as usize;
                stream.fill(&mut want[..expect]);
                matched = expect == k && buf[..k] == want[..k];
            }
        }
    };
    let r = tokio::try_join!(writer, reader);
    ex.matched = matched;
    ex.text = text;
    r.map(|_| ())
}

async fn client(
    addr: SocketAddr,
    bytes: u64,
    seed: u64,
    read_only: bool,
    timeout: Duration,
) -> i32 {
    if read_only && bytes > 0 {
        eprintln!("testpeer: --read-only sends nothing; drop --bytes");
        return 2;
    }
    let start = Instant::now();
    let progress = Progress::default();
    let mut ex = Exchange {
        peer: None,
        local: None,
        matched: false,
        text: Vec::new(),
    };
    let error = match tokio::time::timeout(
        timeout,
        exchange(addr, bytes, seed, read_only, &progress, &mut ex),
    )
    .await
    {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(describe(&e)),
        Err(_) => Some(format!("TimedOut: no EOF within {timeout:?}")),
    };
    let sent = progress.sent.load(Ordering::Relaxed);
    let received = progress.received.load(Ordering::Relaxed);
    let identical = error.is_none() && ex.matched && sent == bytes && received == sent;
    say(json!({
        "peer": ex.peer.map(|a| a.to_string()),
        "local": ex.local.map(|a| a.to_string()),
        "sent": sent,
        "received": received,
        "identical": identical,
        "error": error,
        "elapsed_ms": ms(start),
        // What came back, when it is not simply the echo of what was sent
        // (whoami, halfclose-server, an error page, …).
        "text": (!identical).then(|| String::from_utf8_lossy(&ex.text)),
    }));
    if error.is_some() {
        2
    } else if !read_only && !identical {
        1
    } else {
        0
    }
}

async fn many(
    addr: SocketAddr,
    count: u64,
    concurrency: usize,
    bytes: u64,
    seed: u64,
    conn_timeout: Duration,
    timeout: Duration,
) -> i32 {
    if concurrency == 0 || concurrency > MAX_CONCURRENCY {
        eprintln!(
            "testpeer: --concurrency must be 1..={MAX_CONCURRENCY} (the process may open 20,000 files)"
        );
        return 2;
    }
    let start = Instant::now();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(concurrency));
    let run = {
        let (ok, failed, first_error) = (ok.clone(), failed.clone(), first_error.clone());
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..count {
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let (ok, failed, first_error) = (ok.clone(), failed.clone(), first_error.clone());
                tasks.spawn(async move {
                    let progress = Progress::default();
                    let mut ex = Exchange {
                        peer: None,
                        local: None,
                        matched: false,
                        text: Vec::new(),
                    };
                    let s = seed.wrapping_add(i);
                    let err = match tokio::time::timeout(
                        conn_timeout,
                        exchange(addr, bytes, s, false, &progress, &mut ex),
                    )
                    .await
                    {
                        Ok(Ok(()))
                            if ex.matched && progress.received.load(Ordering::Relaxed) == bytes =>
                        {
                            None
                        }
                        Ok(Ok(())) => Some(format!(
                            "echo differed: sent {bytes}, received {}",
                            progress.received.load(Ordering::Relaxed)
                        )),
                        Ok(Err(e)) => Some(describe(&e)),
                        Err(_) => Some(format!("TimedOut: round trip took over {conn_timeout:?}")),
                    };
                    match err {
                        None => ok.fetch_add(1, Ordering::Relaxed),
                        Some(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    };
    if tokio::time::timeout(timeout, run).await.is_err() {
        first_error
            .lock()
            .unwrap()
            .get_or_insert_with(|| format!("TimedOut: not done within {timeout:?}"));
    }
    let ok = ok.load(Ordering::Relaxed);
    let failed = count - ok;
    let first_error = first_error.lock().unwrap().clone();
    say(json!({
        "ok": ok,
        "failed": failed,
        "first_error": first_error,
        "count": count,
        "concurrency": concurrency,
        "elapsed_ms": ms(start),
    }));
    if failed > 0 { 2 } else { 0 }
}

async fn fake_agent(config: &std::path::Path) -> i32 {
    let listen = std::fs::read_to_string(config)
        .map_err(|e| e.to_string())
        .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
        .and_then(|t| {
            t.get("admin")
                .and_then(|a| a.get("listen"))
                .and_then(|l| l.as_str())
                .unwrap_or("127.0.0.1:4191")
                .parse::<SocketAddr>()
                .map_err(|e| e.to_string())
        });
    let listen = match listen {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake agent: bad config {}: {e}", config.display());
            return 2;
        }
    };
    let listener = match bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake agent: cannot listen on {listen}: {e}");
            return 2;
        }
    };
    eprintln!("fake agent: admin on {listen}");
    let served: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            r = listener.accept() => {
                let Ok((mut sock, _)) = r else { continue };
                let served = served.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => n += k,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let body = {
                        let mut m = served.lock().unwrap();
                        *m.entry(path.clone()).or_default() += 1;
                        match path.as_str() {
                            "/ready" | "/live" => Some("ok\n".to_string()),
                            "/metrics" => Some(
                                std::iter::once("# TYPE fake_requests counter\n".to_string())
                                    .chain(m.iter().map(|(p, c)| format!("fake_requests_total{{path=\"{p}\"}} {c}\n")))
                                    .collect(),
                            ),
                            _ => None,
                        }
                    };
                    eprintln!("fake agent: GET {path}");
                    // Chunked, like a streaming server, so clients must decode it.
                    let resp = match body {
                        Some(b) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                            b.len()
                        ),
                        None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string(),
                    };
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        }
    }
    eprintln!("fake agent: stopping");
    0
}

#[cfg(test)]
mod tests {
    use super::Bytes;

    #[test]
    fn byte_stream_is_seeded_and_chunking_does_not_matter() {
        let mut a = Bytes::new(7);
        let mut whole = [0u8; 100];
        a.fill(&mut whole);
        let mut b = Bytes::new(7);
        let mut parts = [0u8; 100];
        b.fill(&mut parts[..3]);
        b.fill(&mut parts[3..50]);
        b.fill(&mut parts[50..]);
        assert_eq!(whole, parts);
        let mut c = Bytes::new(8);
        let mut other = [0u8; 100];
        c.fill(&mut other);
        assert_ne!(whole, other);
    }
}
