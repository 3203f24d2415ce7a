//! Processes in pods and on nodes: placing them, tracking them, ending them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::net::{pids_in_netns, process_netns_inode};
use super::wait::wait_until;

/// Where a process goes: a network namespace, and for pod processes also a
/// cgroup (entered first, while the process still sees the host's cgroup2
/// mount).
pub(crate) struct Placement<'a> {
    pub netns: &'a Path,
    pub cgroup: Option<&'a Path>,
    /// Start a new session (so the process outlives a terminal that closes).
    pub new_session: bool,
}

/// Spawns `cmd` placed as `place` says. The command's pre-exec hook uses
/// file descriptors opened here, and hooks add up, so build a new `Command`
/// for every spawn: spawning one again elsewhere fails (each hook checks that
/// its descriptors still are the files it opened) instead of writing to
/// whatever now has those descriptor numbers.
pub(crate) fn spawn_placed(cmd: &mut Command, place: &Placement<'_>) -> Result<Child> {
    let ns = File::open(place.netns)
        .with_context(|| format!("opening network namespace {}", place.netns.display()))?;
    let ns_id = identity(&ns)?;
    let cg = match place.cgroup {
        Some(dir) => {
            let procs = dir.join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&procs)
                .with_context(|| format!("opening {}", procs.display()))?;
            let id = identity(&f)?;
            Some((f, id))
        }
        None => None,
    };
    let ns_fd = ns.as_raw_fd();
    let cg_fd = cg.as_ref().map(|(f, id)| (f.as_raw_fd(), *id));
    let new_session = place.new_session;
    // SAFETY: the hook runs between fork and exec and only makes
    // async-signal-safe system calls (fstat, write, setns, setsid) on
    // descriptors that stay open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((fd, id)) = cg_fd {
                check_identity(fd, id)?;
                // Into the pod's cgroup first: "0" means the writing process.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check_identity(ns_fd, ns_id)?;
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    if let Err(e) = &child
        && e.raw_os_error() == Some(libc::ESTALE)
    {
        bail!(
            "{:?}: a Command placed in a world namespace was spawned twice; build a new Command for every spawn",
            cmd.get_program()
        );
    }
    let child = child.with_context(|| {
        format!(
            "spawning {:?} in {}{}",
            cmd.get_program(),
            place.netns.display(),
            place
                .cgroup
                .map(|c| format!(" (cgroup {})", c.display()))
                .unwrap_or_default()
        )
    })?;
    drop(ns);
    drop(cg);
    Ok(child)
}

/// Spawns `cmd` in the network namespace at `netns`, after placing it in the
/// cgroup directory `cgroup` if given (for tools such as `cargo xtask world
/// exec`; tests use [`Pod::spawn`](crate::Pod::spawn) and
/// [`Node::spawn`](crate::Node::spawn), which also track the process).
pub fn spawn_in(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) -> Result<Child> {
    spawn_placed(
        cmd,
        &Placement {
            netns,
            cgroup,
            new_session: false,
        },
    )
}

fn identity(f: &File) -> Result<(u64, u64)> {
    let md = f.metadata()?;
    Ok((md.dev(), md.ino()))
}

/// Fails if `fd` is no longer the file it was when the hook was made (a
/// reused `Command` whose descriptors were closed and their numbers reused).
fn check_identity(fd: i32, (dev, ino): (u64, u64)) -> std::io::Result<()> {
    // SAFETY: fstat into a zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_dev != dev || st.st_ino != ino {
        // Only the errno crosses back to the parent; spawn_placed explains it.
        return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
    }
    Ok(())
}

/// The processes a world started, by pid, and the namespaces that are its.
#[derive(Default)]
pub(crate) struct Tracker {
    pids: Mutex<Vec<i32>>,
    netns: Mutex<HashSet<u64>>,
}

impl Tracker {
    pub fn track(&self, pid: i32) {
        self.pids.lock().unwrap().push(pid);
    }

    pub fn add_netns(&self, inode: u64) {
        self.netns.lock().unwrap().insert(inode);
    }

    pub fn netns_inodes(&self) -> HashSet<u64> {
        self.netns.lock().unwrap().clone()
    }

    pub fn pids(&self) -> Vec<i32> {
        self.pids.lock().unwrap().clone()
    }

    /// Whether `pid` is (still) a process of this world: alive in one of its
    /// namespaces. A pid whose process ended and whose number was reused by
    /// someone else's process is not.
    pub fn owns(&self, pid: i32) -> bool {
        let inodes = self.netns.lock().unwrap();
        process_netns_inode(pid).is_some_and(|i| inodes.contains(&i))
    }

    /// Ends the given processes: SIGTERM, up to `grace` to exit, then
    /// SIGKILL. Only pids that are still this world's are signalled.
    pub fn terminate(&self, pids: &[i32], grace: Duration) {
        let live: Vec<i32> = pids.iter().copied().filter(|&p| self.owns(p)).collect();
        for &pid in &live {
            signal(pid, libc::SIGTERM);
        }
        let gone = |tracker: &Tracker, pid: i32| {
            reap(pid);
            !tracker.owns(pid)
        };
        if !wait_until(grace, || live.iter().all(|&p| gone(self, p))) {
            for &pid in &live {
                if self.owns(pid) {
                    signal(pid, libc::SIGKILL);
                }
            }
            wait_until(Duration::from_secs(5), || {
                live.iter().all(|&p| gone(self, p))
            });
        }
        for &pid in &live {
            reap(pid);
        }
    }

    /// Kills whatever still lives in the world's namespaces (children of its
    /// processes, leftovers of a crashed run) and waits for it to be gone.
    pub fn sweep(&self) -> bool {
        sweep_netns(&self.netns_inodes())
    }
}

/// SIGKILLs every process in the given network namespaces and waits up to
/// 5 s for them to be gone.
pub(crate) fn sweep_netns(inodes: &HashSet<u64>) -> bool {
    wait_until(Duration::from_secs(5), || {
        let left = pids_in_netns(inodes);
        for &pid in &left {
            signal(pid, libc::SIGKILL);
            reap(pid);
        }
        left.is_empty()
    })
}

pub(crate) fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain kill(2) on a positive pid.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Reaps `pid` if it is an exited child of this process.
pub(crate) fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on one specific pid, without blocking.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Waits for a child with a deadline, collecting its output; kills it if the
/// deadline passes.
pub(crate) fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Result<Output> {
    let out_reader = child.stdout.take().map(spawn_reader);
    let err_reader = child.stderr.take().map(spawn_reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_reader
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    let stderr = err_reader
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} did not finish within {timeout:?}; killed it. stdout: {} stderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Turns an `Output` into its stdout, failing with stderr on a non-zero exit.
pub(crate) fn output_ok(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): stderr: {} stdout: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The directory holding this build's binaries (`target/<profile>`), found
/// from the running executable (tests run from `target/<profile>/deps/`).
pub fn bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Finds a binary of this workspace: `$ENV_VAR` if set, else
/// `target/<profile>/NAME` next to the running executable.
pub(crate) fn find_bin(name: &str, env_var: &str, build_hint: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env_var}={} does not name a file", p.display());
        }
        return Ok(p);
    }
    let dir = bin_dir().ok_or_else(|| anyhow!("cannot tell where the running executable is"))?;
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "`{name}` binary not found at {}: run `{build_hint}` (with the same CARGO_TARGET_DIR), or set {env_var}",
            p.display()
        )
    }
}

/// The `testpeer` binary (env `TESTPEER_BIN`, else next to the running test).
pub fn testpeer_bin() -> Result<PathBuf> {
    find_bin(
        "testpeer",
        "TESTPEER_BIN",
        "cargo build -p waymark-tests --bin testpeer",
    )
}

/// A `Command` for `testpeer ARGS…`.
///
/// Panics if the binary cannot be found (cargo builds it before it runs this
/// package's integration tests).
pub fn testpeer<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let bin = testpeer_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = Command::new(bin);
    c.args(args);
    c
}

/// A long-running process (typically a server) whose stdout is read line by
/// line in the background. Killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    /// The world's tracker: the process is only signalled while it is
    /// still the world's (not after the world ended and reaped it).
    tracker: Arc<Tracker>,
    pid: i32,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    stderr: Arc<Mutex<Vec<u8>>>,
    what: String,
}

impl Server {
    /// Takes a spawned child whose stdout and stderr are piped, and waits for
    /// a stdout line starting with `ready_prefix`.
    pub(crate) fn start(
        mut child: Child,
        tracker: Arc<Tracker>,
        what: String,
        ready_prefix: &str,
        timeout: Duration,
    ) -> Result<Server> {
        let pid = child.id() as i32;
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    lines.0.lock().unwrap().push(line);
                    lines.1.notify_all();
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let mut s = Server {
            child: Some(child),
            tracker,
            pid,
            lines,
            stderr,
            what,
        };
        s.wait_line(ready_prefix, timeout)?;
        Ok(s)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// All stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().clone()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The address from the first `listening ADDR` line, if any.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.lines()
            .iter()
            .find_map(|l| l.strip_prefix("listening ")?.trim().parse().ok())
    }

    /// Waits for a stdout line that starts with `prefix`; returns it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.starts_with(prefix)) {
                return Ok(l.clone());
            }
            let exited = match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => Some(st.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            let now = Instant::now();
            if exited.is_some() || now >= deadline {
                let seen = lines.join("\n");
                drop(lines);
                // Let the readers catch up with what a dead process wrote.
                std::thread::sleep(Duration::from_millis(50));
                bail!(
                    "{}: no stdout line starting with {prefix:?} {}; stdout so far: [{seen}] stderr: [{}]",
                    self.what,
                    match exited {
                        Some(st) => format!("(it exited: {st})"),
                        None => format!("within {timeout:?}"),
                    },
                    self.stderr().trim()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            lines = cv.wait_timeout(lines, wait).unwrap().0;
        }
    }

    /// Whether the process has exited (and how).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("already stopped"),
        }
    }

    /// Sends a signal without waiting.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.tracker.owns(self.pid) {
            signal(self.pid, sig as i32);
        }
    }

    /// SIGKILLs the process and waits for it.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(st),
            // Still running and still the world's.
            Ok(None) if self.tracker.owns(self.pid) => {
                let _ = c.kill();
                c.wait().ok()
            }
            // Reaped by the world's shutdown already (or not ours any more).
            _ => None,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the tail of a text file (the last `lines` lines).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Starts a `Server` for `cmd` (stdout and stderr piped) with `spawn`.
pub(crate) fn serve_with(
    cmd: &mut Command,
    tracker: Arc<Tracker>,
    spawn: impl FnOnce(&mut Command) -> Result<Child>,
    ready_prefix: &str,
    timeout: Duration,
) -> Result<Server> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{:?}", cmd);
    let child = spawn(cmd)?;
    Server::start(child, tracker, what, ready_prefix, timeout)
}
