//! The agent's allocator, and giving freed memory back to the kernel.
//!
//! The agent runs on jemalloc (the `waymark` binary's global allocator),
//! for two reasons measured with `cargo xtask bench` (bench/README.md, "The
//! allocator: jemalloc"):
//!
//! - cost per request: every request allocates its head, header map,
//!   future and body frames and frees them a few microseconds later, and
//!   jemalloc serves that churn cheaper than glibc: on the one-hop L7 path
//!   the agent's CPU per request went from a median 1.50× HAProxy's in
//!   the same run to 1.31× (six interleaved pairs of runs of one commit
//!   built both ways), and on two hops with mTLS by 16–21 %.
//! - giving memory back without stalls. With glibc the agent ran a thread
//!   that called `mallinfo2` every 2 s to decide whether to `malloc_trim`.
//!   Both hold each arena's lock while they walk its free chunks: with 9,000
//!   connections open `mallinfo2` alone took 3.4 ms and a trim 12 ms (`perf
//!   probe` on `cargo xtask bench-noisy`), and every worker that allocated
//!   meanwhile waited. jemalloc returns unused pages from a background
//!   thread of its own, a little at a time on a decay curve
//!   (`dirty_decay_ms`), without a global walk.
//!
//! Startup frees a lot at once and hands it back at once ([`give_back`],
//! when the agent is ready): loading the eBPF objects parsed the running
//! kernel's BTF (several MiB raw, a multiple of that parsed; about 20 MiB
//! of an idle agent's RSS for the first second otherwise, until the decay
//! gets to it).

use std::ffi::c_char;

/// jemalloc's options (`malloc_conf`), read before `main`:
/// - `background_thread:true`: a thread of jemalloc's returns unused
///   pages, so no data-path thread pays for it in an allocation;
/// - `dirty_decay_ms:1000`: freed pages go back within about a second,
///   close to what the agent did with glibc (a look every 2 s), so the RSS
///   after a burst of connections falls again quickly;
/// - `muzzy_decay_ms:0`: pages are handed back with `MADV_DONTNEED`, not
///   kept as lazily-freed (`MADV_FREE`) pages that still count in the RSS
///   until the kernel is short of memory: the RSS operators read is the
///   memory the agent holds.
pub const JEMALLOC_CONF: Option<&'static c_char> = Some(
    // SAFETY: a pointer to the first byte of a NUL-terminated static.
    unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() },
);

/// Hands every unused page of every jemalloc arena back to the kernel
/// now, and glibc's (the C libraries the agent links allocate there).
pub fn give_back() {
    // What this thread freed last waits in its cache, not in an arena:
    // flush it first. Then every arena (MALLCTL_ARENAS_ALL) purges.
    for name in [c"thread.tcache.flush", c"arena.4096.purge"] {
        // SAFETY: void mallctls: no old or new value is read or written.
        let r = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if r != 0 {
            tracing::debug!(mallctl = ?name, error = %std::io::Error::from_raw_os_error(r), "jemalloc mallctl failed");
        }
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only takes the allocator's own locks; it is safe
    // to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of the pages under `[p, p + len)` are resident (`mincore`).
    fn resident_pages(p: *mut u8, len: usize) -> usize {
        let page = page_size();
        let start = p as usize & !(page - 1);
        let pages = (p as usize + len - start).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is mapped (jemalloc keeps its mappings after a
        // purge) and `vec` has a byte per page.
        let r =
            unsafe { libc::mincore(start as *mut libc::c_void, pages * page, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("a page size")
    }

    #[test]
    fn freed_jemalloc_memory_goes_back_to_the_kernel() {
        // This test binary's global allocator is the system's, so the
        // jemalloc heap here holds only what this test puts there, and
        // runs on jemalloc's default ten-second decay: without the purge
        // the freed pages would stay resident.
        const MIB: usize = 1 << 20;
        const N: usize = 16;
        let blocks: Vec<*mut u8> = (0..N)
            .map(|_| {
                // SAFETY: plain allocation; checked for NULL below.
                let p = unsafe { tikv_jemalloc_sys::malloc(MIB) }.cast::<u8>();
                assert!(!p.is_null());
                // SAFETY: p points to MIB writable bytes.
                unsafe { std::ptr::write_bytes(p, 1, MIB) };
                p
            })
            .collect();
        let touched: usize = blocks.iter().map(|p| resident_pages(*p, MIB)).sum();
        assert!(touched >= N * MIB / page_size(), "{touched} pages resident");
        for p in &blocks {
            // SAFETY: allocated above by the same allocator, freed once.
            unsafe { tikv_jemalloc_sys::free(p.cast()) };
        }
        give_back();
        // The addresses stay mapped; their pages are gone. A page or two
        // per block may hold jemalloc's own bookkeeping.
        let after: usize = blocks.iter().map(|p| resident_pages(*p, MIB)).sum();
        assert!(
            after <= 2 * N,
            "{after} of {touched} pages still resident after freeing and purging"
        );
    }
}
