//! The daemon's memory allocator: mimalloc, not glibc's malloc (issue 24).
//!
//! With `durability = "fsync"` a consume waits for its group's sync, so a
//! connection thread has dozens of requests' blocks alive at once, and glibc
//! served many of a consume's allocations from its slow paths (`_int_malloc`
//! and `malloc_consolidate`, ~6 % of the samples, against under 1 % with
//! `none`). Neither freeing a WAL record's buffers on the thread that made them
//! nor a larger per-thread cache (`glibc.malloc.tcache_count=256`) changed
//! that; mimalloc, whose free lists are per page and per size, took ~13 % off
//! an `fsync` consume's CPU.
//!
//! Two settings keep page faults off the request path: no transparent huge
//! pages for mimalloc's own memory (`no_thp` in Cargo.toml: a fault would zero
//! 2 MiB, under whatever lock the allocating code holds; the dedupe filters
//! ask for huge pages themselves), and no purging ([`configure`]). Every
//! structure that grows with traffic is capped, so the process's footprint is
//! bounded by its peak anyway; memory given back between bursts was faulted in
//! again by the next (measured in BENCHMARKS.md, eighteenth pass).
//!
//! Only the `meterd` binary uses it: the library, its tests and the criterion
//! benches keep the system allocator.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: its index in `mi_option_t`, for which the
/// `-sys` crate names no constant (`purge_delay_is_the_option_named` checks
/// the index against the option's documented default).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Never purge: freed memory stays mapped for the next allocation.
const NEVER: std::os::raw::c_long = -1;

/// Sets mimalloc's options; called first thing in `main`.
pub fn configure() {
    // SAFETY: sets one of mimalloc's integer options, which it reads on its
    // next purge, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, NEVER) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_is_the_option_named() {
        // SAFETY: reads and sets mimalloc's integer options.
        let default = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(default, 1000, "mimalloc's purge_delay defaults to 1000 ms: a new mimalloc moved or changed the option");
        configure();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, NEVER);
    }
}
