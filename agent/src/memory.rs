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
//! faults a fresh page in). The agent calls it once after startup and then
//! from a thread of its own every [`TRIM_INTERVAL`]. A trim walks the free
//! chunks of each arena under that arena's lock: on a heap of tens of MiB it
//! takes well under a millisecond, and it runs on no data-path thread.

use std::time::Duration;

/// How often freed memory is handed back. Often enough that the RSS
/// follows the load down within seconds; rare enough that memory a busy
/// agent frees and reuses at once is not given back and faulted in again
/// many times a second.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(2);

/// Hands the heap's free pages back to the kernel now.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only takes the allocator's own locks; it is safe
    // to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts the thread that trims every [`TRIM_INTERVAL`]. It lives as long
/// as the process: it holds nothing, so there is nothing to shut down.
pub fn start_trimming() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("waymark-trim".into())
        // It only sleeps and calls malloc_trim: the default 2 MiB stack
        // would be reserved for nothing.
        .stack_size(64 * 1024)
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_INTERVAL);
                trim();
            }
        })
        .map(drop)
}
