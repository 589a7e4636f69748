//! Large zeroed arrays for the dedupe Bloom filters (the gate over the disk
//! runs, the runs' own), mapped straight from the kernel at a 2 MiB boundary
//! with a transparent-huge-page hint.
//!
//! A probe is one random access into up to hundreds of megabytes of filter.
//! With 4 KiB pages each such access also misses the TLB and walks the page
//! tables; the machine runs transparent huge pages in `madvise` mode (the
//! Debian default), so an ordinary `Vec` gets none. A 2 MiB-aligned mapping
//! marked `MADV_HUGEPAGE` lets one TLB entry cover 512 times as much
//! (BENCHMARKS.md, "huge pages"). Arrays under 2 MiB, and any mapping the
//! kernel refuses, stay ordinary heap allocations: the hint is an
//! optimisation, never a requirement. The recent-id table's shards use
//! [`Pages::zeroed_on_heap`]: they are allocated as they grow, on the ingest
//! path, where huge-page faults (and the compaction behind them) doubled the
//! batch p99 in a same-run A/B.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Size (and alignment) of a huge page on x86-64 and arm64 with 4 KiB base pages.
const HUGE: usize = 2 << 20;

/// Element types whose all-zero bit pattern is a valid value (what a fresh
/// anonymous mapping holds).
pub trait Zeroable: Copy + Default + 'static {}
impl Zeroable for u64 {}
impl Zeroable for u128 {}

/// A fixed-length array of `T`, zeroed at creation.
pub enum Pages<T: Zeroable> {
    Heap(Box<[T]>),
    Mapped(Mapping<T>),
}

/// An anonymous mapping with `len` elements from a 2 MiB boundary inside it.
pub struct Mapping<T> {
    ptr: NonNull<T>,
    len: usize,
    base: *mut libc::c_void,
    map_len: usize,
}

// SAFETY: a `Mapping` owns its memory exclusively, like a `Box<[T]>`: shared
// references only read it, writes need `&mut`.
unsafe impl<T: Send> Send for Mapping<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Mapping<T> {}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are exactly what `mmap` returned and no
        // reference into the mapping outlives `self`.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

impl<T: Zeroable> Default for Pages<T> {
    fn default() -> Self {
        Pages::Heap(Box::default())
    }
}

impl<T: Zeroable> Pages<T> {
    /// `len` zeroed elements; 2 MiB or more are mapped with the huge-page hint.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        if bytes >= HUGE {
            if let Some(m) = Self::map(len, bytes) {
                return Pages::Mapped(m);
            }
        }
        Self::zeroed_on_heap(len)
    }

    /// `len` zeroed elements on the heap, never mapped with the hint.
    pub fn zeroed_on_heap(len: usize) -> Self {
        Pages::Heap(vec![T::default(); len].into_boxed_slice())
    }

    /// A copy of `items` in a new array of their length.
    pub fn from_slice(items: &[T]) -> Self {
        let mut p = Self::zeroed(items.len());
        p.copy_from_slice(items);
        p
    }

    /// Whether the array is a huge-page-hinted mapping (tests, metrics).
    pub fn is_mapped(&self) -> bool {
        matches!(self, Pages::Mapped(_))
    }

    #[cfg(target_os = "linux")]
    fn map(len: usize, bytes: usize) -> Option<Mapping<T>> {
        let map_len = bytes.checked_add(HUGE)?;
        // SAFETY: an anonymous private mapping with no address hint: it aliases
        // nothing; the result is checked against MAP_FAILED below.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let start = (base as usize).next_multiple_of(HUGE);
        // SAFETY: `start..start + bytes` lies inside the mapping (at most
        // HUGE - 1 bytes of the HUGE extra are skipped). madvise only hints;
        // its failure (e.g. THP compiled out) leaves ordinary pages.
        unsafe { libc::madvise(start as *mut libc::c_void, bytes.next_multiple_of(4096), libc::MADV_HUGEPAGE) };
        let Some(ptr) = NonNull::new(start as *mut T) else {
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(base, map_len) };
            return None;
        };
        Some(Mapping { ptr, len, base, map_len })
    }

    #[cfg(not(target_os = "linux"))]
    fn map(_len: usize, _bytes: usize) -> Option<Mapping<T>> {
        None
    }
}

impl<T: Zeroable> Deref for Pages<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Pages::Heap(b) => b,
            // SAFETY: `ptr` is aligned (2 MiB) and points at `len` elements of
            // zero-initialised (hence valid, `Zeroable`) `T` owned by the mapping.
            Pages::Mapped(m) => unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), m.len) },
        }
    }
}

impl<T: Zeroable> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Pages::Heap(b) => b,
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            Pages::Mapped(m) => unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), m.len) },
        }
    }
}

impl<T: Zeroable> Clone for Pages<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: Zeroable + PartialEq> PartialEq for Pages<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Zeroable + Eq> Eq for Pages<T> {}

impl<T: Zeroable + std::fmt::Debug> std::fmt::Debug for Pages<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages").field("len", &self.len()).field("mapped", &self.is_mapped()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arrays_stay_on_the_heap_and_large_ones_are_aligned_mappings() {
        let small: Pages<u64> = Pages::zeroed(1000);
        assert!(!small.is_mapped() && small.iter().all(|&w| w == 0));
        let n = (3 * HUGE) / 16 + 5;
        let mut big: Pages<u128> = Pages::zeroed(n);
        assert_eq!(big.is_mapped(), cfg!(target_os = "linux"));
        assert_eq!(big.len(), n);
        if big.is_mapped() {
            assert_eq!(big.as_ptr() as usize % HUGE, 0);
        }
        assert!(big.iter().all(|&s| s == 0));
        big[0] = 1;
        big[n - 1] = u128::MAX;
        let copy = big.clone();
        assert_eq!(copy, big);
        assert_eq!((copy[0], copy[n - 1]), (1, u128::MAX));
        assert_ne!(copy.as_ptr(), big.as_ptr());
        let empty: Pages<u64> = Pages::default();
        assert!(empty.is_empty());
    }
}
