//! The redirect programs against the real kernel, in a network namespace
//! and a cgroup this test creates and removes. Needs root: without it the
//! test is skipped with a message, unless `CI` is set, where it fails.
//!
//! Clients run as separate processes (this test binary again, entering
//! [`redirect_client_process`]) that join the test cgroup and then the test
//! netns before they create any socket, as a pod's processes would: cgroup
//! hooks act on the cgroup a socket was created in. The "agent" is this
//! process, listening inside the netns on 127.0.0.1 and ::1.
//!
//! Nothing outside the created netns and cgroup is touched; every resource
//! has a guard that removes it, also when an assertion fails.

use std::{
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    mem::size_of,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use super::{Exclude, MapOccupancy, Redirect, RedirectError, netns_cookie};

const PORT: u16 = 15001;
const CLIENT_ENV: &str = "WM_REDIR_CLIENT";
/// The test that runs a client process (see `World::client_spec`).
const CLIENT_TEST: &str = "redirect::tests::redirect_client_process";
const RESULT_PREFIX: &str = "WMRESULT ";
const PATIENCE: Duration = Duration::from_secs(5);
const ECONNREFUSED: i32 = libc::ECONNREFUSED;

#[test]
fn redirects_pod_tcp_to_in_pod_listener() {
    if !running_as_root() {
        return;
    }
    // Declared first so it is dropped last: programs detach before their
    // cgroup and netns go, also when an assertion fails.
    let world: World;
    let excludes = [
        exclude("10.99.0.2/32", &[80]),
        exclude("10.97.0.0/16", &[]),
        exclude("fd00:98::/64", &[]),
    ];
    let mut redirect = match Redirect::load(PORT, &excludes) {
        Err(RedirectError::StubObject) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: agent built with WAYMARK_EBPF_STUB=1");
            return;
        }
        other => other.expect("load redirect programs"),
    };
    world = World::create();
    assert!(!redirect.is_attached());
    let not_cgroup = redirect.attach(Path::new("/proc")).unwrap_err();
    assert!(
        matches!(not_cgroup, RedirectError::NotCgroup2 { .. }),
        "{not_cgroup}"
    );
    redirect.attach(&world.cgroup.path).expect("attach");
    assert!(redirect.is_attached());
    let again = redirect.attach(&world.cgroup.path).unwrap_err();
    assert!(
        matches!(again, RedirectError::AlreadyAttached { .. }),
        "{again}"
    );

    let t = Agent {
        redirect: &redirect,
        world: &world,
    };
    // Attached, but the pod is not enrolled: its connects go direct.
    t.not_redirected_tcp("10.99.0.2:81");
    let cookie = netns_cookie(world.listener(Listener::V4).as_fd()).unwrap();
    redirect.enroll(cookie).expect("enroll the pod");
    assert_eq!(redirect.enrolled(), vec![cookie]);
    let t = Agent {
        redirect: &redirect,
        world: &world,
    };
    // Redirected, with the original destination recovered on both sides.
    t.redirected("10.99.0.1:80", Listener::V4, "10.99.0.1:80");
    t.redirected("[fd00:99::1]:443", Listener::V6, "[fd00:99::1]:443");
    // A dual-stack socket dialling IPv4 reaches the IPv4 listener; the
    // original destination comes back as plain IPv4.
    t.redirected("[::ffff:10.99.0.1]:80", Listener::V4, "10.99.0.1:80");
    // Excluded on port 80 only.
    t.redirected("10.99.0.2:81", Listener::V4, "10.99.0.2:81");
    t.not_redirected_tcp("10.99.0.2:80");
    // Excluded on all ports, v4 and v6.
    t.not_redirected_tcp("10.97.0.2:80");
    t.not_redirected_tcp("[fd00:98::2]:80");
    // Loopback is the pod's own.
    t.not_redirected_tcp("127.0.0.1:9");
    t.not_redirected_tcp("[::1]:9");
    t.not_redirected_tcp("[::ffff:127.0.0.1]:9");
    // UDP is never redirected.
    t.not_redirected_udp("10.99.0.1:53");
    t.not_redirected_udp("[fd00:99::1]:53");
    // A client that writes and closes before the agent accepts.
    // Clients that are gone before the agent accepts, and an agent that
    // gives up on a connection.
    t.closed_before_accept("10.99.0.1:80");
    t.reset_before_accept("10.99.0.1:80");
    t.closed_by_agent_without_take("10.99.0.1:80");

    t.eventually_empty();
    connect_limits_refuse_before_a_syn(&mut redirect, &world, cookie);
    stale_flow_entry_is_never_used(&mut redirect, &world);
    // Unenrolled (the pod was deleted or left the mesh): direct again.
    redirect.unenroll(cookie).expect("unenroll the pod");
    redirect
        .unenroll(cookie)
        .expect("unenrolling twice is no error");
    assert!(redirect.enrolled().is_empty());
    let t = Agent {
        redirect: &redirect,
        world: &world,
    };
    t.not_redirected_tcp("10.99.0.2:81");
    redirect.enroll(cookie).expect("enroll the pod again");
    redirect.detach();
    redirect.detach(); // idempotent
    assert!(!redirect.is_attached());
    let t = Agent {
        redirect: &redirect,
        world: &world,
    };
    t.not_redirected_tcp("10.99.0.2:81");
}

/// On a kernel without `bpf_set_retval` for cgroup programs (before 5.18)
/// the programs load all the same, and a `connect()` past the limit fails
/// with the kernel's `EPERM` instead of `ECONNREFUSED`, still before a SYN;
/// without the current-process helpers (before 6.1) the refusal is
/// reported without its process.
#[test]
fn without_set_retval_a_refused_connect_fails_with_eperm() {
    if !running_as_root() {
        return;
    }
    let world: World;
    let mut redirect = match Redirect::load_without_set_retval(PORT) {
        Err(RedirectError::StubObject) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: agent built with WAYMARK_EBPF_STUB=1");
            return;
        }
        other => other.expect("load redirect programs"),
    };
    world = World::create_as("-eperm");
    redirect.attach(&world.cgroup.path).expect("attach");
    let cookie = netns_cookie(world.listener(Listener::V4).as_fd()).unwrap();
    redirect.enroll(cookie).expect("enroll the pod");
    redirect.set_connect_limits(1, 0).unwrap();
    let dial: SocketAddr = "10.99.0.1:80".parse().unwrap();
    let mut held = world.client("tcp", dial);
    assert!(
        matches!(held.outcome(), Outcome::Connected { .. }),
        "within the limit: {:?}",
        held.outcome
    );
    let (stream, _) = accept_within(world.listener(Listener::V4), PATIENCE).expect("accepted");
    let mut refused = world.client("tcp", dial);
    match refused.outcome() {
        Outcome::Error { errno } => assert_eq!(errno, libc::EPERM),
        other => panic!("past the limit: expected EPERM, got {other:?}"),
    }
    refused.finish();
    assert!(accept_within(world.listener(Listener::V4), Duration::ZERO).is_none());
    // Reported all the same, without the process (its helpers are left
    // out as they would be on 5.15).
    let mut ring = redirect.take_refusals().expect("the refusal ring");
    let mut events = Vec::new();
    super::drain_refusals(&mut ring, |r| events.push(r));
    assert_eq!(
        events,
        [super::ConnectRefused {
            netns_cookie: cookie,
            dst: dial,
            limit: "pod_connections",
            process: None,
        }]
    );
    held.finish();
    drop(stream);
    redirect.detach();
}

/// With connection limits in the kernel, a pod's `connect()` past its
/// bound fails at once with `ECONNREFUSED` and reaches no listener; the
/// refusal is counted with the pod and put on the ring with the process
/// that made it; a released socket
/// gives its room back; the node-wide bound holds the same way.
fn connect_limits_refuse_before_a_syn(redirect: &mut Redirect, world: &World, cookie: u64) {
    let mut ring = redirect.take_refusals().expect("the refusal ring");
    let dial: SocketAddr = "10.99.0.1:80".parse().unwrap();
    let pod = |redirect: &Redirect| {
        redirect
            .pod_sockets()
            .into_iter()
            .find(|(c, _)| *c == cookie)
            .map(|(_, counts)| counts)
            .unwrap_or_default()
    };
    let eventually_open = |redirect: &Redirect, n: i64| {
        let deadline = Instant::now() + PATIENCE;
        while pod(redirect).open != n {
            assert!(
                Instant::now() < deadline,
                "the pod's count stayed {:?}, not {n} open",
                pod(redirect)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Connects (and accepts, taking the destination) one held connection.
    let hold = |redirect: &Redirect| {
        let client = world.client("tcp", dial);
        assert!(
            matches!(client.outcome(), Outcome::Connected { .. }),
            "within the limit: {:?}",
            client.outcome
        );
        let listener = world.listener(Listener::V4);
        let (stream, from) = accept_within(listener, PATIENCE).expect("accepted");
        let original = redirect.take_original_dst(cookie, from).unwrap();
        assert_eq!(original, Some(dial));
        (client, stream)
    };
    // Returns the refused process: its id and its threads' names.
    let refused = || {
        let mut client = world.client("tcp", dial);
        match client.outcome() {
            Outcome::Error { errno } => assert_eq!(errno, ECONNREFUSED),
            other => panic!("past the limit: expected ECONNREFUSED, got {other:?}"),
        }
        let process = client.process();
        client.finish();
        for on in [Listener::V4, Listener::V6] {
            let got = accept_within(world.listener(on), Duration::ZERO);
            assert!(got.is_none(), "a refused connect reached {on:?}: {got:?}");
        }
        process
    };
    // The ring names the process that called `connect()` where the kernel
    // tells cgroup programs (6.1 and later).
    let by = |(pid, threads): &(u32, Vec<String>), event: &super::ConnectRefused| {
        if !super::kernel_version::at_least(super::kernel_version::PROCESS_INFO_SINCE) {
            return event.process.is_none();
        }
        event
            .process
            .as_ref()
            .is_some_and(|p| p.pid == *pid && threads.contains(&p.thread))
    };

    redirect.set_connect_limits(2, 0).unwrap();
    let mut held = vec![hold(redirect), hold(redirect)];
    eventually_open(redirect, 2);
    let callers = [refused(), refused()];
    assert_eq!(pod(redirect).refused_pod, 2);
    assert_eq!(pod(redirect).refused_total, 0);
    let mut events = Vec::new();
    super::drain_refusals(&mut ring, |r| events.push(r));
    assert_eq!(events.len(), 2, "{events:?}");
    for (event, caller) in events.iter().zip(&callers) {
        assert_eq!(
            (event.netns_cookie, event.dst, event.limit),
            (cookie, dial, "pod_connections")
        );
        assert!(by(caller, event), "{event:?} was not made by {caller:?}");
    }
    // One released: room for exactly one more.
    let (mut client, stream) = held.pop().unwrap();
    client.finish();
    drop(stream);
    eventually_open(redirect, 1);
    held.push(hold(redirect));
    refused();
    assert_eq!(pod(redirect).refused_pod, 3);

    // The node-wide bound, with no per-pod one.
    redirect.set_connect_limits(0, 2).unwrap();
    refused();
    assert_eq!(pod(redirect).refused_total, 1);
    events.clear();
    super::drain_refusals(&mut ring, |r| events.push(r));
    assert_eq!(
        events.iter().map(|e| e.limit).collect::<Vec<_>>(),
        ["pod_connections", "agent_connections"]
    );

    // No limit: nothing refused, and nothing more counted (the sockets
    // counted before still leave the count when released).
    redirect.set_connect_limits(0, 0).unwrap();
    held.push(hold(redirect));
    for (mut client, stream) in held {
        client.finish();
        drop(stream);
    }
    eventually_open(redirect, 0);
    let t = Agent { redirect, world };
    t.eventually_empty();
}

/// A flow entry left behind by an earlier connection from the same netns
/// and port must never route a new connection that has no original
/// destination of its own (here: the pod dials the listener itself, which
/// is not redirected): `sock_ops` deletes it when the connection is
/// established, so the agent finds nothing rather than the old destination.
fn stale_flow_entry_is_never_used(redirect: &mut Redirect, world: &World) {
    let listener = world.listener(Listener::V4);
    let cookie = netns_cookie(listener.as_fd()).unwrap();
    let port = 47123;
    let client: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    redirect.plant_flow(cookie, client, "10.99.0.7:80".parse().unwrap());
    assert_eq!(redirect.occupancy().unwrap().by_flow, 1);
    let target: SocketAddr = format!("127.0.0.1:{PORT}").parse().unwrap();
    let mut c = world.client_spec(&format!("tcp-from {port} {target}"));
    let Outcome::Connected { local, .. } = c.outcome() else {
        panic!("the direct client did not connect: {:?}", c.outcome);
    };
    assert_eq!(local, client);
    let (stream, from) =
        accept_within(listener, PATIENCE).expect("the direct connection reached the listener");
    assert_eq!(from, client);
    let original = redirect.take_original_dst(cookie, from).unwrap();
    assert_eq!(
        original, None,
        "a stale flow entry routed a connection that was never redirected"
    );
    c.finish();
    drop(stream);
}

/// Entry point of the client processes; a no-op when run as a test.
#[test]
fn redirect_client_process() {
    let Some(spec) = std::env::var_os(CLIENT_ENV) else {
        return;
    };
    let spec = spec.into_string().expect("UTF-8 client spec");
    let (mode, addr) = spec.split_once(' ').expect("client spec: MODE ADDR");
    if mode == "tcp-from" {
        // `PORT ADDR`: connect from 127.0.0.1:PORT, hold until stdin closes.
        let (port, addr) = addr.split_once(' ').expect("tcp-from PORT ADDR");
        let addr: SocketAddr = addr.parse().expect("client address");
        let result = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .and_then(|s| {
                s.set_reuse_address(true)?;
                let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                s.bind(&local.into())?;
                s.connect_timeout(&addr.into(), PATIENCE)?;
                let stream = TcpStream::from(s);
                report(&format!(
                    "connected {} {}",
                    stream.local_addr()?,
                    stream.peer_addr()?
                ));
                let _ = io::stdin().read_to_end(&mut Vec::new());
                Ok(())
            });
        if let Err(err) = result {
            report(&format!("error {}", err.raw_os_error().unwrap_or(-1)));
        }
        return;
    }
    let addr: SocketAddr = addr.parse().expect("client address");
    let result = match mode {
        "tcp" => TcpStream::connect_timeout(&addr, PATIENCE).map(|stream| {
            let line = format!(
                "connected {} {}",
                stream.local_addr().unwrap(),
                stream.peer_addr().unwrap()
            );
            report(&line);
            // Hold the connection until the test says so (closes stdin).
            let _ = io::stdin().read_to_end(&mut Vec::new());
            drop(stream);
        }),
        // `tcp-from PORT ADDR` is parsed below: bound to 127.0.0.1:PORT.
        "tcp-from" => unreachable!("handled before"),
        "tcp-close" => TcpStream::connect_timeout(&addr, PATIENCE).map(|mut stream| {
            stream.write_all(b"x").unwrap();
            drop(stream);
            report("closed");
        }),
        "tcp-reset" => TcpStream::connect_timeout(&addr, PATIENCE).map(|stream| {
            // SO_LINGER with a zero timeout: close() sends RST.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid socket and option buffer of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
            drop(stream);
            report("closed");
        }),
        "udp" => {
            let bind: SocketAddr = match addr {
                SocketAddr::V4(_) => "0.0.0.0:0",
                SocketAddr::V6(_) => "[::]:0",
            }
            .parse()
            .unwrap();
            UdpSocket::bind(bind).and_then(|socket| {
                socket.connect(addr)?;
                report(&format!(
                    "connected {} {}",
                    socket.local_addr()?,
                    socket.peer_addr()?
                ));
                Ok(())
            })
        }
        other => panic!("unknown client mode {other}"),
    };
    if let Err(err) = result {
        report(&format!("error {}", err.raw_os_error().unwrap_or(-1)));
    }
}

fn report(line: &str) {
    println!("{RESULT_PREFIX}{line}");
}

/// What a client process reported.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Connected { local: SocketAddr, peer: SocketAddr },
    Closed,
    Error { errno: i32 },
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let addr = |i: usize| -> Result<SocketAddr, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("bad client report {line:?}"))
        };
        match words[0] {
            "connected" => Ok(Self::Connected {
                local: addr(1)?,
                peer: addr(2)?,
            }),
            "closed" => Ok(Self::Closed),
            "error" => Ok(Self::Error {
                errno: words
                    .get(1)
                    .and_then(|w| w.parse().ok())
                    .ok_or_else(|| format!("bad client report {line:?}"))?,
            }),
            _ => Err(format!("bad client report {line:?}")),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Listener {
    V4,
    V6,
}

/// The test's stand-in for the agent.
struct Agent<'a> {
    redirect: &'a Redirect,
    world: &'a World,
}

impl Agent<'_> {
    fn redirected(&self, dial: &str, on: Listener, want_original: &str) {
        let dial: SocketAddr = dial.parse().unwrap();
        let want: SocketAddr = want_original.parse().unwrap();
        let mut client = self.world.client("tcp", dial);
        let Outcome::Connected { local, peer } = client.outcome() else {
            panic!("{dial}: client did not connect: {:?}", client.outcome);
        };
        assert_eq!(peer, dial, "{dial}: getpeername must show what was dialled");

        let listener = self.world.listener(on);
        let (stream, client_addr) = accept_within(listener, PATIENCE)
            .unwrap_or_else(|| panic!("{dial}: nothing reached the {on:?} listener"));
        assert_eq!(client_addr.ip().to_canonical(), local.ip().to_canonical());
        assert_eq!(client_addr.port(), local.port());
        let occupancy = self.redirect.occupancy().unwrap();
        assert_eq!(
            occupancy,
            MapOccupancy {
                by_cookie: 1,
                by_flow: 1
            },
            "{dial}"
        );

        let cookie = netns_cookie(listener.as_fd()).unwrap();
        let wrong_netns = self.redirect.take_original_dst(cookie ^ 1, client_addr);
        assert_eq!(
            wrong_netns.unwrap(),
            None,
            "{dial}: key must include the netns"
        );
        let original = self
            .redirect
            .take_original_dst(cookie, client_addr)
            .unwrap();
        assert_eq!(original, Some(want), "{dial}");
        let again = self
            .redirect
            .take_original_dst(cookie, client_addr)
            .unwrap();
        assert_eq!(again, None, "{dial}: take must remove the entry");

        client.finish();
        drop(stream);
        self.eventually_empty();
    }

    fn not_redirected_tcp(&self, dial: &str) {
        let dial: SocketAddr = dial.parse().unwrap();
        let mut client = self.world.client("tcp", dial);
        match client.outcome() {
            Outcome::Error { errno } => assert_eq!(errno, ECONNREFUSED, "{dial}"),
            other => panic!("{dial}: expected connection refused, got {other:?}"),
        }
        client.finish();
        self.assert_nothing_accepted(dial);
        assert_eq!(
            self.redirect.occupancy().unwrap(),
            MapOccupancy::default(),
            "{dial}"
        );
    }

    fn not_redirected_udp(&self, dial: &str) {
        let dial: SocketAddr = dial.parse().unwrap();
        let mut client = self.world.client("udp", dial);
        match client.outcome() {
            Outcome::Connected { peer, .. } => assert_eq!(peer, dial),
            other => panic!("{dial}: UDP connect failed: {other:?}"),
        }
        client.finish();
        assert_eq!(
            self.redirect.occupancy().unwrap(),
            MapOccupancy::default(),
            "{dial}"
        );
    }

    /// The client is gone (its socket fully closed) before the agent
    /// accepts; the agent still needs the original destination to deliver
    /// the bytes it sent.
    fn closed_before_accept(&self, dial: &str) {
        let dial: SocketAddr = dial.parse().unwrap();
        let mut client = self.world.client("tcp-close", dial);
        let Outcome::Closed = client.outcome() else {
            panic!("{dial}: client did not connect: {:?}", client.outcome);
        };
        client.finish();
        // Wait until the kernel has fully closed the client's socket (its
        // cookie entry goes at TCP_CLOSE); only then accept.
        let deadline = Instant::now() + PATIENCE;
        while self.redirect.occupancy().unwrap().by_cookie != 0 {
            assert!(Instant::now() < deadline, "client socket never closed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(self.redirect.occupancy().unwrap().by_flow, 1);
        let listener = self.world.listener(Listener::V4);
        let (mut stream, client_addr) =
            accept_within(listener, PATIENCE).expect("connection in the accept queue");
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        let cookie = netns_cookie(listener.as_fd()).unwrap();
        let original = self
            .redirect
            .take_original_dst(cookie, client_addr)
            .unwrap();
        assert_eq!(
            original,
            Some(dial),
            "original destination after early close"
        );
        drop(stream);
        self.eventually_empty();
    }

    /// The agent accepts and closes without taking the entry (as it would
    /// after failing early): the client's close removes it.
    fn closed_by_agent_without_take(&self, dial: &str) {
        let dial: SocketAddr = dial.parse().unwrap();
        let mut client = self.world.client("tcp", dial);
        let listener = self.world.listener(Listener::V4);
        let (stream, _) = accept_within(listener, PATIENCE).expect("accepted");
        assert_eq!(self.redirect.occupancy().unwrap().by_flow, 1);
        drop(stream);
        client.finish();
        self.eventually_empty();
    }

    /// The client resets the connection before the agent accepts it: the
    /// entry goes with it, and the agent finds nothing to route.
    fn reset_before_accept(&self, dial: &str) {
        let dial: SocketAddr = dial.parse().unwrap();
        let mut client = self.world.client("tcp-reset", dial);
        let Outcome::Closed = client.outcome() else {
            panic!("{dial}: client did not connect: {:?}", client.outcome);
        };
        client.finish();
        self.eventually_empty();
        let listener = self.world.listener(Listener::V4);
        if let Some((_, client_addr)) = accept_within(listener, Duration::ZERO) {
            let cookie = netns_cookie(listener.as_fd()).unwrap();
            let original = self
                .redirect
                .take_original_dst(cookie, client_addr)
                .unwrap();
            assert_eq!(original, None, "{dial}: entry of a reset connection");
        }
    }

    fn assert_nothing_accepted(&self, dial: SocketAddr) {
        for on in [Listener::V4, Listener::V6] {
            let got = accept_within(self.world.listener(on), Duration::ZERO);
            assert!(
                got.is_none(),
                "{dial}: reached the {on:?} listener: {got:?}"
            );
        }
    }

    /// Every socket closed: both maps must drain (closes are processed
    /// asynchronously, hence the patience).
    fn eventually_empty(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let occupancy = self.redirect.occupancy().unwrap();
            if occupancy == MapOccupancy::default() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "maps did not drain: {occupancy:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn exclude(net: &str, ports: &[u16]) -> Exclude {
    Exclude {
        net: net.parse().unwrap(),
        ports: ports.to_vec(),
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the redirect kernel test needs root and CI is set"
    );
    eprintln!("skipping redirect kernel test: needs root (under CI it fails instead)");
    false
}

/// Waits up to `patience` for a connection; `None` if none came.
fn accept_within(listener: &TcpListener, patience: Duration) -> Option<(TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = patience.as_millis().try_into().unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout) };
    assert!(ready >= 0, "poll: {}", io::Error::last_os_error());
    (ready == 1).then(|| listener.accept().expect("accept"))
}

/// The test's pod: a netns with lo and a veth pair, a cgroup, and the
/// agent's listeners inside the netns.
struct World {
    // Field order is drop order: listeners, then cgroup, then netns.
    listener4: TcpListener,
    listener6: TcpListener,
    cgroup: CgroupDir,
    netns: Netns,
}

impl World {
    fn create() -> Self {
        Self::create_as("")
    }

    /// A world of its own for another test of this process (`suffix`
    /// tells their netns and cgroup apart).
    fn create_as(suffix: &str) -> Self {
        let name = format!("wm-redir-test-{}{suffix}", std::process::id());
        let netns = Netns::create(&name);
        let cgroup = CgroupDir::create(&cgroup2_mount().join(&name));
        for args in [
            "link set lo up",
            // Both ends stay in the namespace; wm0 carries the addresses
            // the non-redirected cases dial.
            "link add wm0 type veth peer name wm1",
            "link set wm1 up",
            "link set wm0 up",
            "addr add 10.99.0.2/24 dev wm0",
            "addr add 10.97.0.2/16 dev wm0",
            "-6 addr add fd00:99::2/64 dev wm0 nodad",
            "-6 addr add fd00:98::2/64 dev wm0 nodad",
        ] {
            netns.ip(args);
        }
        let (listener4, listener6) = netns.run(|| {
            (
                TcpListener::bind(("127.0.0.1", PORT)).expect("bind 127.0.0.1"),
                TcpListener::bind(("::1", PORT)).expect("bind ::1"),
            )
        });
        let cookies = [&listener4, &listener6].map(|l| netns_cookie(l.as_fd()).unwrap());
        assert_eq!(cookies[0], cookies[1], "both listeners live in one netns");
        let here = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_ne!(netns_cookie(here.as_fd()).unwrap(), cookies[0]);
        Self {
            listener4,
            listener6,
            cgroup,
            netns,
        }
    }

    fn listener(&self, which: Listener) -> &TcpListener {
        match which {
            Listener::V4 => &self.listener4,
            Listener::V6 => &self.listener6,
        }
    }

    /// Starts a client process inside the pod: first into the cgroup, then
    /// into the netns, then it runs `mode` against `addr`.
    fn client(&self, mode: &str, addr: SocketAddr) -> Client {
        self.client_spec(&format!("{mode} {addr}"))
    }

    /// A client process given its whole spec (`MODE ARGS…`).
    fn client_spec(&self, spec: &str) -> Client {
        let procs = File::options()
            .write(true)
            .open(self.cgroup.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let netns = File::open(&self.netns.path).expect("open netns");
        let (procs_fd, netns_fd) = (procs.as_raw_fd(), netns.as_raw_fd());
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                CLIENT_TEST,
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ])
            .env(CLIENT_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: between fork and exec the closure only makes raw syscalls
        // on descriptors opened above (async-signal-safe, no allocation).
        unsafe {
            command.pre_exec(move || {
                // "0" moves the writing process. Cgroup first, as a pod's
                // processes are placed before they enter the netns.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn client process");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut client = Client {
            child,
            stdout,
            outcome: None,
        };
        client.read_outcome(spec);
        client
    }
}

/// A client process; killed and reaped on drop.
struct Client {
    child: Child,
    stdout: BufReader<ChildStdout>,
    outcome: Option<Outcome>,
}

impl Client {
    fn read_outcome(&mut self, spec: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "client {spec} exited without a report");
            if let Some(report) = line.trim_end().strip_prefix(RESULT_PREFIX) {
                self.outcome = Some(report.parse().unwrap());
                return;
            }
        }
    }

    /// The process's id and the names its threads may have had: those it
    /// has now, and the test harness's thread that ran the client (named
    /// after the test, cut to the kernel's 15 bytes), gone by now.
    fn process(&self) -> (u32, Vec<String>) {
        let pid = self.child.id();
        let mut threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the client's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim_end().to_string())
            .collect();
        threads.push(CLIENT_TEST[..15].to_string());
        (pid, threads)
    }

    fn outcome(&self) -> Outcome {
        self.outcome.expect("read by World::client")
    }

    /// Lets the client close its socket and exit, and reaps it.
    fn finish(&mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "client process failed: {status}");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    fn create(name: &str) -> Self {
        run("ip", &["netns", "add", name]);
        Self {
            name: name.to_owned(),
            path: Path::new("/var/run/netns").join(name),
        }
    }

    /// `ip -n NAME ARGS...`: only ever inside this namespace.
    fn ip(&self, args: &str) {
        let mut argv = vec!["-n", &self.name];
        argv.extend(args.split(' '));
        run("ip", &argv);
    }

    /// Runs `f` on a thread that has entered the namespace (sockets made
    /// there stay in it); this thread's namespace is untouched.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(&self.path).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory this test created; removed on drop (its client
/// processes are reaped by then).
struct CgroupDir {
    path: PathBuf,
}

impl CgroupDir {
    fn create(path: &Path) -> Self {
        fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        // A reaped process can linger in cgroup.procs for a moment.
        let deadline = Instant::now() + PATIENCE;
        while let Err(err) = fs::remove_dir(&self.path) {
            if Instant::now() > deadline {
                eprintln!("could not remove {}: {err}", self.path.display());
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (field 5 is the
/// mount point; the filesystem type follows the " - " separator).
fn cgroup2_mount() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            (rest.split(' ').next()? == "cgroup2").then(|| fields.split(' ').nth(4))?
        })
        .map(PathBuf::from)
        .expect("no cgroup2 mount in /proc/self/mountinfo")
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status();
    match status {
        Ok(status) if status.success() => {}
        other => panic!("{program} {}: {other:?}", args.join(" ")),
    }
}
