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
    /// Opens N connections (with `--http`, one HTTP/1.1 GET on each, kept
    /// alive), prints `holding <ok> failed <n>` and keeps them open, idle,
    /// until killed or `--hold` passes. For measuring a proxy's memory per
    /// idle connection.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Send `GET / HTTP/1.1` on each connection and read the response
        /// first, so that an HTTP proxy has an upstream side too.
        #[arg(long)]
        http: bool,
        /// Send one `GET /` over HTTP/2 with prior knowledge (h2c) on each
        /// connection instead, and keep the HTTP/2 connection open.
        #[arg(long, conflicts_with = "http")]
        h2: bool,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Connections started per second at most (0: as fast as
        /// `--concurrency` allows), to open them at the pace a proxy's
        /// accept rate would.
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// How long to keep them open (then exit 0).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        hold: Duration,
    },
    /// The test application: an HTTP/1.1 server whose answer the request
    /// chooses (`/status/<n>`, `/slow/<ms>`, `?sleep=<ms>`, `/fail`,
    /// `/bytes/<n>`, `/chunked`, TRACE); see `waymark_tests::http_app`.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        /// Says who answered: the body's first word and `x-pod`.
        #[arg(long, default_value = "app")]
        name: String,
        /// Answer 503 to every request (`all`) or every other (`alternate`).
        #[arg(long, value_enum, default_value = "none")]
        fail: waymark_tests::http_app::Fail,
        /// Answer 503 to every n-th request.
        #[arg(long, default_value_t = 0)]
        fail_every: u64,
        /// Wait this long before every answer.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        delay: Duration,
        /// Print no line per request (for load).
        #[arg(long)]
        quiet: bool,
        /// `<path prefix>=<status>`: paths under the prefix get that status
        /// (repeatable; the first match wins).
        #[arg(long = "status", value_parser = waymark_tests::http_app::parse_status)]
        statuses: Vec<(String, hyper::StatusCode)>,
    },
    /// gRPC unary responder over h2c: every call's message is echoed back
    /// with `grpc-status: 0` (a body that is not one message: 3).
    Grpc {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Constant-rate (open-loop) HTTP/1.1 load: `--rate` GET requests per
    /// second in all, spread over `--conns` keep-alive connections, for
    /// `--duration`. Latency is measured from when each request was *due*
    /// (corrected for coordinated omission, like wrk2), so a path that
    /// falls behind shows it. Prints one JSON object.
    HttpRate {
        #[arg(long)]
        connect: SocketAddr,
        /// Requests per second, all connections together.
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "/")]
        path: String,
        /// Deadline of one response.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Also count the requests slower than this many µs (from when
        /// they were due): a p99 target as a share of requests.
        #[arg(long)]
        over_us: Option<u32>,
        /// Write every request to this file, one line each (`conn due_us
        /// latency_us service_us`, `due_us` from the start), after a
        /// header with the start on `CLOCK_MONOTONIC` (the clock `perf
        /// record -k CLOCK_MONOTONIC` stamps events with): when in the run
        /// the slow ones fell, and what the machine did then.
        #[arg(long)]
        samples: Option<std::path::PathBuf>,
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
            Cmd::Grpc { listen } => waymark_tests::grpc_unary::run(listen).await,
            Cmd::Http {
                listen,
                name,
                fail,
                fail_every,
                delay,
                quiet,
                statuses,
            } => {
                let Some(listener) = listen_and_say(listen) else {
                    return 2;
                };
                let options = waymark_tests::http_app::Options {
                    name,
                    fail,
                    fail_every,
                    delay,
                    quiet,
                    statuses,
                };
                waymark_tests::http_app::serve(listener, options).await;
                0
            }
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
            Cmd::Hold {
                connect,
                count,
                http,
                h2,
                concurrency,
                rate,
                hold,
            } => {
                let mode = match (http, h2) {
                    (_, true) => HoldMode::H2,
                    (true, false) => HoldMode::Http1,
                    (false, false) => HoldMode::Tcp,
                };
                hold_conns(connect, count, mode, concurrency, rate, hold).await
            }
            Cmd::HttpRate {
                connect,
                rate,
                conns,
                duration,
                path,
                timeout,
                over_us,
                samples,
            } => http_rate::run(
                connect,
                rate,
                conns,
                duration,
                &path,
                timeout,
                over_us,
                samples.as_deref(),
            ),
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

/// Binds `addr` and says `listening <addr>` (what tests wait for), or
/// says why not on stderr.
fn listen_and_say(addr: SocketAddr) -> Option<TcpListener> {
    match bind(addr) {
        Ok(l) => {
            say(format_args!("listening {}", l.local_addr().unwrap_or(addr)));
            Some(l)
        }
        Err(e) => {
            eprintln!("testpeer: cannot listen on {addr}: {e}");
            None
        }
    }
}

async fn serve(addr: SocketAddr, kind: Kind) -> i32 {
    let Some(listener) = listen_and_say(addr) else {
        return 2;
    };
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

/// One `GET / HTTP/1.1` and its response on a fresh connection.
async fn http_get_once(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut sock = TcpStream::connect(addr).await?;
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    sock.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the response ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        match http_rate::response_len(&buf) {
            Ok(Some((len, status))) if buf.len() >= len => {
                if !(200..300).contains(&status) {
                    return Err(std::io::Error::other(format!("HTTP status {status}")));
                }
                return Ok(sock);
            }
            Ok(_) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
}

/// What `hold` does on each connection before leaving it idle.
#[derive(Clone, Copy)]
enum HoldMode {
    Tcp,
    Http1,
    H2,
}

/// A connection `hold` keeps open.
enum Held {
    Tcp(#[allow(dead_code)] TcpStream),
    H2(
        #[allow(dead_code)]
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
        #[allow(dead_code)] tokio::task::JoinHandle<()>,
    ),
}

/// An h2c connection (prior knowledge) that has carried one `GET /`.
async fn h2_get_once(addr: SocketAddr) -> std::io::Result<Held> {
    use http_body_util::BodyExt;
    let sock = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(sock),
    )
    .await
    .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::new())
        .map_err(std::io::Error::other)?;
    let resp = tx.send_request(req).await.map_err(std::io::Error::other)?;
    if !resp.status().is_success() {
        return Err(std::io::Error::other(format!(
            "HTTP status {}",
            resp.status()
        )));
    }
    resp.into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?;
    Ok(Held::H2(tx, task))
}

async fn hold_conns(
    addr: SocketAddr,
    count: usize,
    mode: HoldMode,
    concurrency: usize,
    rate: u32,
    hold: Duration,
) -> i32 {
    if count > MAX_CONCURRENCY || concurrency == 0 {
        eprintln!("testpeer: --count must be at most {MAX_CONCURRENCY}, --concurrency at least 1");
        return 2;
    }
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut pace =
        (rate > 0).then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate))));
    let mut held = Vec::with_capacity(count);
    let mut first_error = None;
    // Connects refused outright (`ECONNREFUSED`): by a destination, or by
    // the kernel at a pod's connection limit.
    let mut refused = 0usize;
    // Each finished connect is taken as it finishes, not all at the end:
    // thousands of finished tasks drained at once are a burst of this
    // client's own CPU (12 ms for 9,000 here) that the machine's other
    // pods would pay for, which a proxy under test would be blamed for.
    let mut collect = |r: Result<std::io::Result<Held>, tokio::task::JoinError>| match r {
        Ok(Ok(sock)) => held.push(sock),
        Ok(Err(e)) => {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                refused += 1;
            }
            first_error.get_or_insert_with(|| describe(&e));
        }
        Err(e) => {
            first_error.get_or_insert_with(|| e.to_string());
        }
    };
    for _ in 0..count {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        tasks.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                match mode {
                    HoldMode::H2 => h2_get_once(addr).await,
                    HoldMode::Http1 => http_get_once(addr).await.map(Held::Tcp),
                    HoldMode::Tcp => TcpStream::connect(addr).await.map(Held::Tcp),
                }
            })
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            drop(permit);
            r
        });
        while let Some(r) = tasks.try_join_next() {
            collect(r);
        }
    }
    while let Some(r) = tasks.join_next().await {
        collect(r);
    }
    let failed = count - held.len();
    if let Some(e) = &first_error {
        eprintln!("testpeer: hold: first error: {e}");
    }
    say(format_args!(
        "holding {} failed {failed} refused {refused}",
        held.len()
    ));
    tokio::time::sleep(hold).await;
    drop(held);
    0
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

/// `testpeer http-rate`: constant-rate HTTP/1.1 GETs on blocking sockets,
/// one OS thread per connection, so that sends leave on time (a 1 ms timer
/// wheel would add up to 1 ms to every sample).
mod http_rate {
    use std::fmt::Write as _;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    use serde_json::json;

    /// Most samples kept per connection (a bound on memory).
    const MAX_SAMPLES: usize = 2_000_000;

    /// From the bytes of a response received so far: `Some((head + body
    /// length, status))` once the head is complete. Needs `Content-Length`
    /// (chunked responses are not supported: the servers here do not send
    /// them for a fixed body).
    pub fn response_len(buf: &[u8]) -> Result<Option<(usize, u16)>, String> {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 64 * 1024 {
                return Err("response head over 64 KiB".into());
            }
            return Ok(None);
        };
        let head = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut len = None;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                    return Err("chunked responses are not supported".into());
                }
            }
        }
        let len = len.ok_or("response without Content-Length")?;
        Ok(Some((end + 4 + len, status)))
    }

    #[derive(Default)]
    struct ConnResult {
        /// Due → response complete, µs.
        latency: Vec<u32>,
        /// Sent → response complete, µs.
        service: Vec<u32>,
        /// When each `latency` sample was due, µs from the start.
        due: Vec<u64>,
        ok: u64,
        non_2xx: u64,
        errors: u64,
        reconnects: u64,
        /// Requests sent more than 1 ms after they were due.
        late: u64,
        first_error: Option<String>,
    }

    /// `at`, a past instant, on `CLOCK_MONOTONIC` in ns (`Instant` is that
    /// clock on Linux, but does not say its value).
    fn monotonic_ns(at: Instant) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
        now - at.elapsed().as_nanos() as i128
    }

    fn us(d: Duration) -> u32 {
        d.as_micros().min(u32::MAX as u128) as u32
    }

    fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    }

    /// One request on `sock`; returns the status.
    fn exchange(sock: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<u16, String> {
        sock.write_all(req).map_err(|e| format!("write: {e}"))?;
        buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = sock.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed mid-response".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some((len, status)) = response_len(buf)?
                && buf.len() >= len
            {
                return Ok(status);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn conn_loop(
        addr: SocketAddr,
        start: Instant,
        first: Duration,
        interval: Duration,
        end: Duration,
        timeout: Duration,
        req: &[u8],
    ) -> ConnResult {
        // Precise wake-ups: the default 50 µs timer slack would show up in
        // every sample.
        // SAFETY: prctl(PR_SET_TIMERSLACK) on the calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut r = ConnResult::default();
        let mut sock: Option<TcpStream> = None;
        let mut buf = Vec::with_capacity(1024);
        let mut k: u32 = 0;
        loop {
            let due_off = first + interval * k;
            if due_off >= end {
                break;
            }
            k += 1;
            let due = start + due_off;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let sent = Instant::now();
            if sent.duration_since(due) > Duration::from_millis(1) {
                r.late += 1;
            }
            if sock.is_none() {
                match connect(addr, timeout) {
                    Ok(s) => sock = Some(s),
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| format!("connect: {e}"));
                        continue;
                    }
                }
                if r.ok + r.non_2xx + r.errors > 0 {
                    r.reconnects += 1;
                }
            }
            let s = sock.as_mut().expect("connected above");
            match exchange(s, req, &mut buf) {
                Ok(status) => {
                    let done = Instant::now();
                    if (200..300).contains(&status) {
                        r.ok += 1;
                    } else {
                        r.non_2xx += 1;
                    }
                    if r.latency.len() < MAX_SAMPLES {
                        r.latency.push(us(done - due));
                        r.service.push(us(done - sent));
                        r.due.push(due_off.as_micros() as u64);
                    }
                }
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert(e);
                    sock = None;
                }
            }
        }
        r
    }

    /// The `q` quantile of sorted, non-empty samples (nearest rank).
    fn quantile(sorted: &[u32], q: f64) -> u32 {
        sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
    }

    fn percentiles(v: &mut [u32]) -> serde_json::Value {
        if v.is_empty() {
            return serde_json::Value::Null;
        }
        v.sort_unstable();
        let at = |q: f64| quantile(v, q);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        json!({
            "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999),
            "max": v[v.len() - 1], "mean": (mean * 10.0).round() / 10.0,
        })
    }

    /// Each second of the run (by when its requests were due): requests,
    /// p99 and the slowest, in µs — when in the run the slow ones fell.
    fn per_second(latency: &[u32], due_us: &[u64]) -> serde_json::Value {
        let mut by: Vec<Vec<u32>> = Vec::new();
        for (&l, &due) in latency.iter().zip(due_us) {
            let s = (due / 1_000_000) as usize;
            if by.len() <= s {
                by.resize_with(s + 1, Vec::new);
            }
            by[s].push(l);
        }
        by.into_iter()
            .map(|mut v| {
                v.sort_unstable();
                let p99 = if v.is_empty() { 0 } else { quantile(&v, 0.99) };
                json!({ "requests": v.len(), "p99": p99, "max": v.last().copied().unwrap_or(0) })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn run(
        addr: SocketAddr,
        rate: u64,
        conns: usize,
        duration: Duration,
        path: &str,
        timeout: Duration,
        over_us: Option<u32>,
        samples: Option<&std::path::Path>,
    ) -> i32 {
        if rate == 0 || conns == 0 || conns > 1000 || rate > 1_000_000 {
            eprintln!("testpeer: --rate must be 1..=1000000 and --conns 1..=1000");
            return 2;
        }
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: testpeer\r\n\r\n");
        // Each connection sends every `interval`; connection i starts i/conns
        // of an interval later, so the sends of all are evenly spread.
        let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
        let start = Instant::now() + Duration::from_millis(20);
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                let req = req.clone().into_bytes();
                let first = interval.mul_f64(i as f64 / conns as f64);
                std::thread::spawn(move || {
                    conn_loop(addr, start, first, interval, duration, timeout, &req)
                })
            })
            .collect();
        let mut all = ConnResult::default();
        let mut lines = String::new();
        for (conn, h) in handles.into_iter().enumerate() {
            let r = h.join().unwrap_or_else(|_| ConnResult {
                errors: 1,
                first_error: Some("a connection thread panicked".into()),
                ..Default::default()
            });
            if samples.is_some() {
                for ((due, lat), svc) in r.due.iter().zip(&r.latency).zip(&r.service) {
                    let _ = writeln!(lines, "{conn} {due} {lat} {svc}");
                }
            }
            all.latency.extend(r.latency);
            all.service.extend(r.service);
            all.due.extend(r.due);
            all.ok += r.ok;
            all.non_2xx += r.non_2xx;
            all.errors += r.errors;
            all.reconnects += r.reconnects;
            all.late += r.late;
            if all.first_error.is_none() {
                all.first_error = r.first_error;
            }
        }
        if let Some(file) = samples {
            let header = format!(
                "# start_monotonic_ns={} rate={rate} conns={conns}\n# conn due_us latency_us service_us\n",
                monotonic_ns(start)
            );
            if let Err(e) = std::fs::write(file, header + &lines) {
                eprintln!("testpeer: cannot write {}: {e}", file.display());
                return 2;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let done = all.ok + all.non_2xx;
        let by_second = per_second(&all.latency, &all.due);
        let over = over_us.map(|us| {
            let count = all.latency.iter().filter(|&&l| l > us).count();
            json!({ "us": us, "count": count })
        });
        super::say(json!({
            "target_rate": rate,
            "conns": conns,
            "duration_s": duration.as_secs_f64(),
            "requests": done,
            "ok": all.ok,
            "non_2xx": all.non_2xx,
            "errors": all.errors,
            "reconnects": all.reconnects,
            "late_sends": all.late,
            "achieved_rate": (done as f64 / elapsed.max(1e-9)).round(),
            "latency_us": percentiles(&mut all.latency),
            "service_us": percentiles(&mut all.service),
            "per_second_us": by_second,
            "over": over,
            "first_error": all.first_error,
        }));
        if all.errors > 0 || all.non_2xx > 0 {
            2
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bytes;
    use super::http_rate::response_len;

    #[test]
    fn response_length_from_the_head() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello";
        assert_eq!(response_len(&r[..10]), Ok(None));
        assert_eq!(response_len(r), Ok(Some((r.len(), 200))));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(response_len(chunked).is_err());
        assert!(response_len(b"HTTP/1.1 204 No Content\r\n\r\n").is_err());
    }

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
