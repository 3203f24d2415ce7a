//! Idle timeouts: a connection with no byte either way for
//! `limits.idle_timeout` is closed, so a pod cannot pin the agent's sockets,
//! buffers and table entries with connections it forgot.
//!
//! [`Activity`] is one timestamp per connection, touched where bytes move
//! (the opaque copy, or [`IdleIo`] under hyper); [`expired`] sleeps until it
//! is older than the timeout. No timer per read: the watcher wakes once per
//! timeout period at most.
//!
//! The same place counts the bytes each way: the connection table
//! (`waymark conns`) reads them while the connection runs, for the price
//! of one relaxed add beside the timestamp the idle timeout already needed.
//! And it bounds what the reply shortcut may leave unread ([`ReplyBudget`])
//! and keeps the client's socket acknowledging sparingly ([`Rearm`]).

use std::io;
use std::net::SocketAddr;

use crate::transport::delayed_acks::Rearm;
use crate::transport::netns::PodNetns;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection started and last moved a byte, and how many it moved
/// each way.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    /// Milliseconds after `base`.
    last: AtomicU64,
    /// From the client towards its destination.
    outward: AtomicU64,
    /// From the destination back to the client.
    inward: AtomicU64,
    /// Set while the replies take the reply shortcut.
    replies: OnceLock<ReplyBudget>,
}

/// What the reply shortcut may leave unread in a client's socket.
///
/// Replies moved socket to socket skip TCP's flow control: the kernel
/// queues them in the client's socket whether or not the application
/// reads, so the agent's writes never wait and it keeps reading from the
/// upstream. A client that stopped reading a large download would have all
/// of it queued in its socket. TCP would have held it at the client's
/// receive window. The agent cannot see the client's reads, only its
/// sends: in a request/response exchange each request follows the reply
/// before it. So once the agent has sent `limit` bytes without the client
/// sending any, the connection leaves the shortcut for good
/// ([`ShortcutExit::leave`]): its later replies take loopback TCP, behind
/// what was delivered, and TCP's window holds the rest back. Taken off
/// once; never put back (bytes redirected after TCP bytes would be read
/// first).
///
/// A client that keeps sending without reading (pipelined requests it never
/// reads the answers to) resets that count every time. Its TCP window
/// cannot tell (TCP never shrinks a window it offered, and no TCP data
/// reaches that socket to close it); its socket's receive memory can (the
/// kernel counts the queued replies there, as `ss -tm` shows). So after
/// every [`UNREAD_CHECK_EVERY`] bytes sent, the next time the client
/// speaks, the agent asks the kernel how much sits in the client's socket
/// ([`ShortcutExit::unread`], `sock_diag` in the pod's netns) and leaves
/// when it is over `limit` too.
///
/// Per connection it is a few counters and the connection's key, inline in
/// its [`Activity`] (no closure, no allocation: 10,000 idle connections on
/// the shortcut are 10,000 of these); what acts is shared ([`ShortcutExit`]).
pub struct ReplyBudget {
    limit: u64,
    /// Bytes sent to the client since it last sent any.
    unanswered: AtomicU64,
    /// Bytes sent to the client since its socket was last looked at.
    since_check: AtomicU64,
    left: AtomicBool,
    netns_cookie: u64,
    client: SocketAddr,
    /// Where the client's socket can be asked about: the pod's network
    /// namespace and the agent's end of the connection (the pod listener's
    /// address). `None` when the agent does not hold the namespace
    /// (`outbound.dial_from = "node"`): only the unanswered count applies.
    unread_at: Option<(PodNetns, SocketAddr)>,
    /// The request shortcut may carry the client's requests: what is read
    /// is told to the kernel ([`ShortcutExit::consumed`]), and reads go
    /// until the socket says it is drained ([`ReadWhole`]).
    requests: bool,
    /// Request bytes read from the client as last told to the kernel
    /// (the request shortcut's bound).
    reported: AtomicU64,
    /// The client's socket is kept in the kernel's interactive mode
    /// (fewer bare ACKs): put back after each quiet spell.
    acks: Option<Rearm>,
    exit: Arc<dyn ShortcutExit>,
}

/// Bytes sent between two looks at the client's socket: rare enough to
/// cost nothing in request/response traffic (a netlink round trip per
/// 256 KiB of replies), often enough that a client that does not read is
/// found soon after it holds `limit`.
pub const UNREAD_CHECK_EVERY: u64 = 256 << 10;

/// What takes connections off the reply shortcut: one for all
/// connections.
pub trait ShortcutExit: Send + Sync {
    /// Takes the connection of `client` in the pod netns `netns_cookie` off
    /// the shortcut for good.
    fn leave(&self, netns_cookie: u64, client: SocketAddr);

    /// Bytes sitting unread in the client's socket (`client` → `server`) in
    /// the pod's network namespace, if the kernel says.
    fn unread(&self, netns: &PodNetns, client: SocketAddr, server: SocketAddr) -> Option<u64>;

    /// The agent has read `total` bytes from the client so far: what
    /// bounds the requests the kernel may redirect into the agent's socket
    /// unread (the request shortcut). Told every [`UNREAD_CHECK_EVERY`].
    fn consumed(&self, netns_cookie: u64, client: SocketAddr, total: u64);

    /// The connection ended after [`ShortcutExit::consumed`] was told.
    fn forget(&self, netns_cookie: u64, client: SocketAddr);
}

impl std::fmt::Debug for ReplyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyBudget")
            .field("limit", &self.limit)
            .field("unanswered", &self.unanswered)
            .field("left", &self.left)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl ReplyBudget {
    pub fn new(
        limit: u64,
        requests: bool,
        netns_cookie: u64,
        client: SocketAddr,
        unread_at: Option<(PodNetns, SocketAddr)>,
        exit: Arc<dyn ShortcutExit>,
    ) -> Self {
        ReplyBudget {
            limit,
            unanswered: AtomicU64::new(0),
            since_check: AtomicU64::new(0),
            left: AtomicBool::new(false),
            netns_cookie,
            client,
            unread_at,
            requests,
            reported: AtomicU64::new(0),
            acks: None,
            exit,
        }
    }

    /// Keeps the client's socket `fd` in the interactive mode the agent
    /// put it in ([`Rearm`]). `fd` must be the connection's accepted
    /// socket: [`Activity::moved_out`] uses it while its caller holds it.
    pub fn keeping_acks_delayed(mut self, fd: RawFd) -> Self {
        self.acks = Some(Rearm::new(fd));
        self
    }

    /// The client has sent, at `now_us` on the connection's clock; `total`
    /// bytes from it so far.
    fn heard_from_client(&self, total: u64, now_us: u64) {
        self.unanswered.store(0, Ordering::Relaxed);
        if let Some(acks) = &self.acks {
            acks.heard(now_us);
        }
        let reported = self.reported.load(Ordering::Relaxed);
        if self.requests && total - reported.min(total) >= UNREAD_CHECK_EVERY {
            self.reported.store(total, Ordering::Relaxed);
            self.exit.consumed(self.netns_cookie, self.client, total);
        }
        if self.since_check.load(Ordering::Relaxed) >= UNREAD_CHECK_EVERY
            && !self.left.load(Ordering::Relaxed)
            && let Some((netns, server)) = &self.unread_at
        {
            self.since_check.store(0, Ordering::Relaxed);
            if self
                .exit
                .unread(netns, self.client, *server)
                .is_some_and(|unread| unread > self.limit)
            {
                self.take_off();
            }
        }
    }

    fn sent_to_client(&self, n: u64) {
        self.since_check.fetch_add(n, Ordering::Relaxed);
        let total = self.unanswered.fetch_add(n, Ordering::Relaxed) + n;
        if total > self.limit {
            self.take_off();
        }
    }

    fn take_off(&self) {
        if !self.left.swap(true, Ordering::Relaxed) {
            self.exit.leave(self.netns_cookie, self.client);
        }
    }

    /// Whether the connection has left the shortcut.
    pub fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    /// Whether the request shortcut may carry the client's requests.
    pub fn carries_requests(&self) -> bool {
        self.requests
    }
}

impl Drop for ReplyBudget {
    fn drop(&mut self) {
        if *self.reported.get_mut() > 0 {
            self.exit.forget(self.netns_cookie, self.client);
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
            outward: AtomicU64::new(0),
            inward: AtomicU64::new(0),
            replies: OnceLock::new(),
        }
    }

    /// Bounds the connection's replies while they take the reply shortcut
    /// (see [`ReplyBudget`]). Set once, before the first reply.
    pub fn bound_replies(&self, budget: ReplyBudget) {
        let _ = self.replies.set(budget);
    }

    /// The reply budget, if the replies took the shortcut.
    pub fn reply_budget(&self) -> Option<&ReplyBudget> {
        self.replies.get()
    }

    /// Whether the client's socket may hold requests the request shortcut
    /// redirected, so that a short read proves nothing and it is read
    /// whole (see [`ReadWhole`]).
    pub fn reads_whole(&self) -> bool {
        self.reply_budget()
            .is_some_and(ReplyBudget::carries_requests)
    }

    pub fn touch(&self) {
        self.touch_at(self.base.elapsed());
    }

    fn touch_at(&self, since_base: Duration) {
        self.last
            .fetch_max(since_base.as_millis() as u64, Ordering::Relaxed);
    }

    /// `n` bytes went from the client towards its destination.
    ///
    /// Called by the code that reads the client's socket, while it holds
    /// it (what [`ReplyBudget::keeping_acks_delayed`] relies on).
    pub fn moved_out(&self, n: u64) {
        let total = self.outward.fetch_add(n, Ordering::Relaxed) + n;
        let now = self.base.elapsed();
        if let Some(b) = self.replies.get() {
            b.heard_from_client(total, now.as_micros() as u64);
        }
        self.touch_at(now);
    }

    /// `n` bytes came back to the client.
    pub fn moved_in(&self, n: u64) {
        self.inward.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = self.replies.get() {
            b.sent_to_client(n);
        }
        self.touch();
    }

    /// Bytes (out, in) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.outward.load(Ordering::Relaxed),
            self.inward.load(Ordering::Relaxed),
        )
    }

    /// Since the connection started (since this was made).
    pub fn age(&self) -> Duration {
        self.base.elapsed()
    }

    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// Resolves once nothing has moved for `timeout`.
pub async fn expired(activity: &Activity, timeout: Duration) {
    loop {
        let idle = activity.idle_for();
        if idle >= timeout {
            return;
        }
        tokio::time::sleep(timeout - idle).await;
    }
}

/// The streams open on a multiplexed connection (a tunnel connection), and
/// since when it has had none. Bytes are no measure of idleness there:
/// HTTP/2 PINGs keep them flowing on a connection that carries nothing.
#[derive(Debug, Default)]
pub struct Streams {
    open: std::sync::atomic::AtomicUsize,
    /// Touched when a stream opens or ends.
    changed: Activity,
}

/// One open stream of [`Streams`], until dropped.
pub struct OpenStream(Arc<Streams>);

impl Streams {
    pub fn begin(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.changed.touch();
        OpenStream(self.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.touch();
    }
}

/// Resolves once the connection has had no stream open for `timeout`.
pub async fn streams_expired(streams: &Streams, timeout: Duration) {
    loop {
        let idle = streams.changed.idle_for();
        if streams.open.load(Ordering::Relaxed) == 0 && idle >= timeout {
            return;
        }
        // A stream still open: look again a timeout later at most.
        tokio::time::sleep(timeout.saturating_sub(idle).max(timeout / 4)).await;
    }
}

/// Reads that take only `EAGAIN` as proof that a socket is drained.
///
/// tokio takes a read that did not fill the buffer as that proof and
/// forgets the socket's readiness until epoll's next edge, which saves a
/// `recv` per burst and holds for TCP. A socket the request shortcut may
/// redirect into has two queues, the redirected messages and TCP's, and
/// one read takes from one of them: once the kernel has moved the
/// connection's requests back to TCP (over its bound, or a capture holds
/// its pod), a short read of the first leaves bytes in the second that
/// arrived before it, their edge already spent; if the client then waits
/// (its window full, or for an answer), the connection waits for ever.
/// (A FIN behind redirected bytes is safe either way: tokio never forgets
/// a read-closed readiness.) So such a socket is read with `try_io`, which
/// keeps the readiness until a read answers `EAGAIN`: one more `recv`
/// after each burst.
pub trait ReadWhole: AsyncRead + Unpin {
    /// As `poll_read`, keeping the readiness after a short read. The
    /// default is `poll_read`, for streams with one queue.
    fn poll_read_whole(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }
}

impl ReadWhole for tokio::net::TcpStream {
    fn poll_read_whole(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use std::os::fd::AsRawFd as _;
        let fd = self.as_raw_fd();
        loop {
            std::task::ready!(self.poll_read_ready(cx))?;
            // SAFETY: the kernel writes at most `len` bytes into the
            // uninitialised tail and says how many; only those are marked
            // initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            let read = self.try_io(tokio::io::Interest::READABLE, || {
                // SAFETY: a live socket and a writable region of `len` bytes.
                let n = unsafe { libc::recv(fd, unfilled.as_mut_ptr().cast(), unfilled.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match read {
                Ok(n) => {
                    // SAFETY: `recv` initialised the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // `try_io` has cleared the readiness: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl ReadWhole for tokio::io::DuplexStream {}

/// A client's byte stream that touches its [`Activity`] whenever bytes
/// pass: what is read from it went out, what is written to it came in.
pub struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Read with [`ReadWhole::poll_read_whole`]: the request shortcut may
    /// redirect into it.
    whole: bool,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        let whole = activity.reads_whole();
        IdleIo {
            inner,
            activity,
            whole,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: ReadWhole> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = if self.whole {
            self.inner.poll_read_whole(cx, buf)
        } else {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        };
        let n = buf.filled().len() - before;
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            self.activity.moved_out(n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.moved_in(n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.moved_in(n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts leaves; reports the unread bytes it is told.
    #[derive(Default)]
    struct Exit {
        left: AtomicU64,
        looks: AtomicU64,
        unread: AtomicU64,
        consumed: std::sync::Mutex<Vec<u64>>,
        forgotten: AtomicU64,
    }

    impl ShortcutExit for Exit {
        fn leave(&self, _: u64, _: SocketAddr) {
            self.left.fetch_add(1, Ordering::Relaxed);
        }
        fn unread(&self, _: &PodNetns, _: SocketAddr, _: SocketAddr) -> Option<u64> {
            self.looks.fetch_add(1, Ordering::Relaxed);
            Some(self.unread.load(Ordering::Relaxed))
        }
        fn consumed(&self, _: u64, _: SocketAddr, total: u64) {
            self.consumed.lock().unwrap().push(total);
        }
        fn forget(&self, _: u64, _: SocketAddr) {
            self.forgotten.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn what_the_agent_read_is_told_every_256_kib_and_forgotten_at_the_end() {
        let exit = Arc::new(Exit::default());
        let a = Activity::new();
        a.bound_replies(budget(4 << 20, &exit));
        // Small requests: nothing to tell yet.
        for _ in 0..100 {
            a.moved_out(1000);
        }
        assert!(exit.consumed.lock().unwrap().is_empty());
        // An upload: told at each 256 KiB step, with the total read.
        for _ in 0..64 {
            a.moved_out(16 << 10);
        }
        let told = exit.consumed.lock().unwrap().clone();
        assert_eq!(told.len(), 4, "{told:?}");
        assert!(told.windows(2).all(|w| w[1] - w[0] >= UNREAD_CHECK_EVERY));
        assert_eq!(told[0], 100_000 + 10 * (16 << 10));
        assert_eq!(exit.forgotten.load(Ordering::Relaxed), 0);
        drop(a);
        assert_eq!(exit.forgotten.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_connection_never_told_is_not_forgotten() {
        let exit = Arc::new(Exit::default());
        let a = Activity::new();
        a.bound_replies(budget(4 << 20, &exit));
        a.moved_out(1000);
        drop(a);
        assert_eq!(exit.forgotten.load(Ordering::Relaxed), 0);
    }

    fn budget(limit: u64, exit: &Arc<Exit>) -> ReplyBudget {
        // Any namespace will do: the stand-in exit does not enter it.
        let netns = PodNetns::open(std::path::Path::new("/proc/self/ns/net"), 7).unwrap();
        ReplyBudget::new(
            limit,
            true,
            7,
            "127.0.0.1:40000".parse().unwrap(),
            Some((netns, "127.0.0.1:15001".parse().unwrap())),
            exit.clone(),
        )
    }

    #[test]
    fn replies_leave_the_shortcut_once_the_client_is_unanswered_too_long() {
        let exit = Arc::new(Exit::default());
        let a = Activity::new();
        a.bound_replies(budget(1000, &exit));
        // Request/response: the client speaks between replies.
        for _ in 0..50 {
            a.moved_out(10);
            a.moved_in(900);
        }
        assert_eq!(
            exit.left.load(Ordering::Relaxed),
            0,
            "every reply was answered"
        );
        // A download: replies and nothing from the client.
        a.moved_in(600);
        a.moved_in(600);
        assert_eq!(exit.left.load(Ordering::Relaxed), 1);
        assert!(a.reply_budget().unwrap().has_left());
        // Once, for good.
        a.moved_out(10);
        a.moved_in(5000);
        assert_eq!(exit.left.load(Ordering::Relaxed), 1);
        // Bytes are counted as before.
        assert_eq!(a.bytes(), (510, 50 * 900 + 6200));
    }

    #[test]
    fn a_client_that_sends_but_does_not_read_leaves_by_its_unread_bytes() {
        let exit = Arc::new(Exit::default());
        let a = Activity::new();
        a.bound_replies(budget(1 << 20, &exit));
        // Pipelined requests, 64 KiB answers, read: the unanswered count
        // never reaches the limit; the socket is looked at every 256 KiB.
        for _ in 0..16 {
            a.moved_out(100);
            a.moved_in(64 << 10);
        }
        assert_eq!(exit.left.load(Ordering::Relaxed), 0);
        assert_eq!(
            exit.looks.load(Ordering::Relaxed),
            3,
            "one look per 256 KiB sent"
        );
        // The answers pile up unread: the next look takes it off.
        exit.unread.store(2 << 20, Ordering::Relaxed);
        for _ in 0..4 {
            a.moved_out(100);
            a.moved_in(64 << 10);
        }
        a.moved_out(100);
        assert_eq!(exit.left.load(Ordering::Relaxed), 1);
        let looks = exit.looks.load(Ordering::Relaxed);
        for _ in 0..8 {
            a.moved_out(100);
            a.moved_in(64 << 10);
        }
        assert_eq!(
            exit.looks.load(Ordering::Relaxed),
            looks,
            "no look once off"
        );
    }

    #[tokio::test]
    async fn a_connection_is_idle_once_its_last_stream_has_ended_for_the_timeout() {
        let streams = Arc::new(Streams::default());
        let timeout = Duration::from_millis(300);
        let open = streams.begin();
        let watch = tokio::spawn({
            let streams = streams.clone();
            async move {
                streams_expired(&streams, timeout).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!watch.is_finished(), "a stream is open");
        let ended = Instant::now();
        drop(open);
        let closed = watch.await.unwrap();
        assert!(closed - ended >= timeout, "{:?}", closed - ended);
    }

    #[tokio::test]
    async fn bytes_either_way_reset_the_clock() {
        let activity = Arc::new(Activity::new());
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = IdleIo::new(a, activity.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(activity.idle_for() >= Duration::from_millis(300));
        io.write_all(b"x").await.unwrap();
        assert!(activity.idle_for() < Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.write_all(b"y").await.unwrap();
        let mut one = [0u8; 1];
        io.read_exact(&mut one).await.unwrap();
        assert!(activity.idle_for() < Duration::from_millis(300));
        // Read from the client: out; written to it: in.
        assert_eq!(activity.bytes(), (1, 1));
        // Already idle longer than a zero timeout: resolves at once.
        expired(&activity, Duration::ZERO).await;
    }
}
