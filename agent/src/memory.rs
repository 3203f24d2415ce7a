//! Giving freed heap memory back to the kernel.
//!
//! glibc's allocator keeps what the program frees: in the main heap below
//! the highest live allocation, and in each thread's arena. Two moments of
//! the agent's life free a lot and would otherwise keep it resident for
//! good:
//!
//! - startup: loading the eBPF objects parses the running kernel's BTF
//!   (several MiB raw, a multiple of that parsed, once per object and once
//!   more for the kernel diagnostics' own offsets). All of it is freed once
//!   the programs are loaded, but the heap stays at its peak — about 20 MiB
//!   of an idle agent's RSS.
//! - a burst of connections or load: buffers, request futures and TLS
//!   records are freed when the burst ends, and stay in the arenas.
//!
//! `malloc_trim(0)` hands every whole free page in every arena back
//! (`MADV_DONTNEED`; the mappings stay, so the next allocation there just
//! faults a fresh page in). The agent calls it once after startup, and then
//! from a thread of its own whenever enough freed memory has piled up. Not
//! blindly on a timer: a trim holds each arena's lock while it walks that
//! arena's free chunks and advises every one of them again, already given
//! back or not — a few milliseconds on a fragmented heap of 10,000
//! connections, during which a worker that allocates waits.

use std::time::Duration;

/// How often the thread looks at the heap. Looking is cheap (one
/// `mallinfo2` and one read of `/proc/self/statm`).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Freed-but-resident memory, estimated since the last trim, that is worth
/// a trim.
const TRIM_WORTH: u64 = 4 * 1024 * 1024;

/// Hands the heap's free pages back to the kernel now.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only takes the allocator's own locks; it is safe
    // to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the heap looks like: resident anonymous memory and the bytes the
/// program has allocated (live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Heap {
    resident: u64,
    in_use: u64,
}

impl Heap {
    fn now() -> Option<Heap> {
        #[cfg(target_env = "gnu")]
        {
            // SAFETY: mallinfo2 only reads the allocator's statistics.
            let info = unsafe { libc::mallinfo2() };
            Some(Heap {
                resident: resident_anon()?,
                in_use: info.uordblks as u64 + info.hblkhd as u64,
            })
        }
        #[cfg(not(target_env = "gnu"))]
        None
    }

    /// Memory freed since `base` that is still resident: what the RSS grew
    /// by beyond what live allocations grew by (negative growth of live
    /// allocations — frees — counts in full).
    fn garbage_since(&self, base: &Heap) -> u64 {
        (self.resident as i128
            - base.resident as i128
            - (self.in_use as i128 - base.in_use as i128))
            .max(0) as u64
    }
}

/// Resident pages that are not file-backed (`/proc/self/statm`: resident
/// minus shared), in bytes.
fn resident_anon() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut f = statm.split_whitespace().skip(1);
    let resident: u64 = f.next()?.parse().ok()?;
    let shared: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(resident.saturating_sub(shared) * u64::try_from(page).ok()?)
}

/// Starts the thread that trims when freed memory has piled up. It lives
/// as long as the process: it holds nothing, so there is nothing to shut
/// down.
pub fn start_trimming() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("waymark-trim".into())
        // It only sleeps, reads two figures and trims: the default 2 MiB
        // stack would be reserved for nothing.
        .stack_size(64 * 1024)
        .spawn(|| {
            let Some(mut base) = Heap::now() else {
                return;
            };
            loop {
                std::thread::sleep(CHECK_INTERVAL);
                let Some(now) = Heap::now() else {
                    return;
                };
                if now.garbage_since(&base) >= TRIM_WORTH {
                    trim();
                    base = Heap::now().unwrap_or(now);
                } else if now.resident < base.resident {
                    // The RSS went down on its own (memory unmapped): judge
                    // from here.
                    base = now;
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn garbage_is_what_was_freed_or_grew_without_live_allocations() {
        let base = Heap {
            resident: 20 * MIB,
            in_use: 10 * MIB,
        };
        // Live memory grew with the RSS: nothing to give back.
        let grown = Heap {
            resident: 30 * MIB,
            in_use: 20 * MIB,
        };
        assert_eq!(grown.garbage_since(&base), 0);
        // Freed, still resident.
        let freed = Heap {
            resident: 20 * MIB,
            in_use: 4 * MIB,
        };
        assert_eq!(freed.garbage_since(&base), 6 * MIB);
        // Grew more than live allocations did.
        let churned = Heap {
            resident: 28 * MIB,
            in_use: 12 * MIB,
        };
        assert_eq!(churned.garbage_since(&base), 6 * MIB);
        // The RSS fell further than live allocations: nothing.
        let shrunk = Heap {
            resident: 10 * MIB,
            in_use: 8 * MIB,
        };
        assert_eq!(shrunk.garbage_since(&base), 0);
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn reads_the_heap_and_trims() {
        let before = Heap::now().expect("glibc and /proc/self/statm");
        assert!(before.resident > 0);
        trim();
    }
}
