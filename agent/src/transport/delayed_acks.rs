//! Fewer bare ACKs on a socket whose replies take the reply shortcut.
//!
//! Once replies go socket to socket, the agent's accepted socket sends no
//! TCP data that its acknowledgements could ride on, and the kernel
//! acknowledges each request the moment it is read: a bare ACK down the
//! pod's loopback, delivered on the agent's CPU, about one per request.
//! `TCP_QUICKACK` off puts the socket in the kernel's interactive
//! ("pingpong") mode, where a read acknowledges only every second small
//! segment and the delayed-ACK timer (bounded to a few ms by
//! `wm_agent_sock_ops`) does the rest: measured on one hop, 1.2 → 0.64
//! bare ACKs per request.
//!
//! The kernel leaves that mode the first time the timer fires: the client
//! was quiet for longer than the bound. A socket that sends data is put
//! back by the kernel itself; this one sends none, so one pause (a client
//! between bursts, or descheduled for a few ms on a busy node) cost the
//! connection its fewer ACKs for the rest of its life. [`Rearm`] puts it
//! back: when the client speaks after a quiet spell, it asks the kernel
//! whether the socket is still in the mode, and if not, sets it again.
//!
//! Not for every client: one with Nagle's algorithm on holds its next
//! small request until the last one is acknowledged, so in this mode each
//! of its requests after the first of a burst would wait for the timer
//! (2 ms at `HZ=1000`, 8 ms at 250). The kernel's leaving the mode is what
//! spares it, after one wait. Seen from here that client is the one that
//! lets the timer fire on its second request after the mode was set (or
//! its third after the mode was set again: the request read when it is
//! set was acknowledged at once), within a timer's length. Such a
//! connection is never put back. Neither is one that slow anyway: the
//! timer acknowledges each of its requests, in the mode or not.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use socket2::SockRef;

/// Quiet time after which the kernel is asked whether the socket is still
/// in the mode. Below the smallest bound, so that no firing of the timer is
/// missed: at `HZ=1000` the 2 ms bound is two ticks, the first of which may
/// be nearly over. A connection this quiet sends at most 1,000 requests a
/// second, so the call is noise.
pub const LOOK_AFTER_US: u64 = 1_000;

/// Longest quiet spell that may be a client held by Nagle's algorithm
/// waiting for the timer: above the largest bound the kernel takes (20 ms
/// at `HZ=100`), with room for a busy node. A longer one is the client
/// having had nothing to send.
pub const HELD_AT_MOST_US: u64 = 50_000;

/// Puts the socket in the kernel's interactive mode (`TCP_QUICKACK` off).
pub fn delay(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_tcp_quickack(false)
}

/// Whether the socket is in the interactive mode (`TCP_QUICKACK` reads 0
/// exactly then).
pub fn delaying(fd: BorrowedFd<'_>) -> io::Result<bool> {
    SockRef::from(&fd).tcp_quickack().map(|quick| !quick)
}

/// Puts a connection's accepted socket back in the interactive mode when
/// the client speaks after a quiet spell (see the module).
///
/// It keeps the socket's descriptor, not the socket: a connection's
/// bookkeeping ([`super::idle::Activity`]) must not hold its socket open
/// (the connection table keeps it after the connection ends). So
/// [`Rearm::heard`] may be called only by the code that reads the client's
/// socket, while it holds that socket: the descriptor is then open and
/// still this socket's.
#[derive(Debug)]
pub struct Rearm {
    fd: RawFd,
    /// When the client last sent, in µs on the connection's clock.
    last_us: AtomicU64,
    state: AtomicU8,
}

/// The mode was just set: at accept, before any request, or after a read
/// that was acknowledged at once. Either way the client's next request
/// cannot have been held by Nagle's algorithm.
const SET: u8 = 0;
/// The client's last request was read in the mode: if the timer fires
/// before the next one, the client may be waiting for it.
const ON_TRIAL: u8 = 1;
/// The mode has held across at least one request since it was set.
const HELD: u8 = 2;
/// Never put back again (see the module).
const GAVE_UP: u8 = 3;

impl Rearm {
    /// For a socket put in the mode at accept.
    pub fn new(fd: RawFd) -> Self {
        Rearm {
            fd,
            last_us: AtomicU64::new(u64::MAX),
            state: AtomicU8::new(SET),
        }
    }

    /// The client sent bytes, read at `now_us` on the connection's clock.
    pub fn heard(&self, now_us: u64) {
        let last = self.last_us.swap(now_us, Ordering::Relaxed);
        let state = self.state.load(Ordering::Relaxed);
        if state == GAVE_UP {
            return;
        }
        let quiet = now_us.saturating_sub(last);
        // SAFETY: the caller holds the client's socket (see the type), so
        // `fd` is open and that socket's while this call runs.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        // Back to back, the timer cannot have fired; after a pause, the
        // kernel says (an error: the socket is closing, nothing to keep).
        let kept = quiet < LOOK_AFTER_US || delaying(fd).unwrap_or(true);
        let next = if kept {
            if state == SET { ON_TRIAL } else { HELD }
        } else if state == ON_TRIAL && quiet < HELD_AT_MOST_US {
            GAVE_UP
        } else {
            let _ = delay(fd);
            SET
        };
        if next != state {
            self.state.store(next, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsFd, AsRawFd};

    fn accepted() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// What the kernel does when the delayed-ACK timer fires in the
    /// interactive mode; `TCP_QUICKACK` on is the one way to do it at will.
    fn leave(s: &TcpStream) {
        SockRef::from(s).set_tcp_quickack(true).unwrap();
        assert!(!delaying(s.as_fd()).unwrap());
    }

    /// A socket put in the mode at accept, and its `Rearm`.
    fn armed() -> (TcpStream, TcpStream, Rearm) {
        let (c, s) = accepted();
        delay(s.as_fd()).unwrap();
        assert!(delaying(s.as_fd()).unwrap());
        let rearm = Rearm::new(s.as_raw_fd());
        (c, s, rearm)
    }

    /// The client's sends, read at these µs; before each, whether the
    /// delayed-ACK timer fired (the kernel left the mode) in between.
    fn reads(s: &TcpStream, rearm: &Rearm, reads: &[(bool, u64)]) {
        for &(fired, t) in reads {
            if fired {
                leave(s);
            }
            rearm.heard(t);
        }
    }

    #[test]
    fn a_busy_client_that_pauses_is_put_back() {
        let (_c, s, rearm) = armed();
        // Back to back, then the timer fires in a 9 ms pause (between two
        // bursts, or a client descheduled): back in the mode.
        reads(&s, &rearm, &[(false, 100), (false, 300), (false, 500)]);
        reads(&s, &rearm, &[(true, 9_500)]);
        assert!(delaying(s.as_fd()).unwrap());
        // And after every such pause.
        reads(
            &s,
            &rearm,
            &[(false, 9_700), (false, 9_900), (true, 30_000)],
        );
        assert!(delaying(s.as_fd()).unwrap());
        reads(&s, &rearm, &[(false, 30_200), (true, 900_000)]);
        assert!(delaying(s.as_fd()).unwrap());
        // Back to back nothing is asked or set: left by hand, it stays so.
        reads(&s, &rearm, &[(true, 900_200)]);
        assert!(!delaying(s.as_fd()).unwrap());
    }

    #[test]
    fn a_pause_the_timer_did_not_fire_in_changes_nothing() {
        let (_c, s, rearm) = armed();
        // 3 ms between requests, shorter than this kernel's timer: the
        // mode holds, which counts for the client; then the timer fires
        // in a longer pause, and the socket is put back.
        reads(&s, &rearm, &[(false, 100), (false, 3_100), (true, 12_000)]);
        assert!(delaying(s.as_fd()).unwrap());
    }

    #[test]
    fn a_client_held_by_nagle_is_left_out() {
        // Its second request waited for the timer: left out, and after
        // that never put back, not even after a long pause.
        let (_c, s, rearm) = armed();
        reads(&s, &rearm, &[(false, 100), (true, 8_300), (false, 8_500)]);
        reads(&s, &rearm, &[(true, 900_000), (false, 900_200)]);
        assert!(!delaying(s.as_fd()).unwrap());
        // Put back after a long pause, then its third request waited for
        // the timer (the second was acknowledged when the mode was set):
        // left out from then on.
        let (_c, s, rearm) = armed();
        reads(&s, &rearm, &[(false, 100), (false, 300), (true, 900_000)]);
        assert!(delaying(s.as_fd()).unwrap());
        reads(&s, &rearm, &[(false, 900_300), (true, 908_600)]);
        reads(&s, &rearm, &[(false, 908_800), (true, 990_000)]);
        assert!(!delaying(s.as_fd()).unwrap());
    }

    #[test]
    fn a_pooled_connection_first_used_after_a_wait_is_put_back() {
        // One request, then idle in a pool for a second (the timer fired),
        // then busy.
        let (_c, s, rearm) = armed();
        reads(&s, &rearm, &[(false, 100), (true, 1_000_100)]);
        assert!(delaying(s.as_fd()).unwrap());
    }
}
