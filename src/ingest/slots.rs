//! The dedupe table's slot arrays. Two things about how they are allocated are
//! worth a module (measured in BENCHMARKS.md, "batched ingest"):
//!
//! - They are zeroed by *writing* zeros, not by `calloc`. A calloc'd array maps
//!   every page to the kernel's shared zero page; the rehash then reads a slot
//!   (one fault) and writes it (a second, copy-on-write fault that also flushes
//!   the other cores' TLBs with an interrupt). Writing first costs one fault per
//!   page and no interrupt.
//! - Arrays of 2 MiB or more are 2 MiB-aligned and advised onto transparent huge
//!   pages: one fault per 2 MiB instead of per 4 KiB, and a TLB entry that covers
//!   512 times as much of a table whose every probe is a random access.

use std::alloc::Layout;
use std::ptr::NonNull;

/// From this many bytes on, an array goes on huge pages.
const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// A fixed-length, zero-initialised array of `u128` slots.
pub struct Slots {
    ptr: NonNull<u128>,
    len: usize,
    /// `None` for the empty array (nothing allocated).
    layout: Option<Layout>,
}

// SAFETY: `Slots` owns its allocation exclusively, like a `Box<[u128]>`.
unsafe impl Send for Slots {}
// SAFETY: shared access only reads through `&[u128]`.
unsafe impl Sync for Slots {}

impl Default for Slots {
    fn default() -> Slots {
        Slots { ptr: NonNull::dangling(), len: 0, layout: None }
    }
}

impl Slots {
    /// `len` zeroed slots.
    pub fn zeroed(len: usize) -> Slots {
        let bytes = len.saturating_mul(std::mem::size_of::<u128>());
        if len == 0 || bytes > isize::MAX as usize / 2 {
            return Slots::default();
        }
        let huge = bytes >= HUGE_PAGE;
        let (size, align) = if huge { (bytes.next_multiple_of(HUGE_PAGE), HUGE_PAGE) } else { (bytes, std::mem::align_of::<u128>()) };
        let Ok(layout) = Layout::from_size_align(size, align) else {
            return Slots::default();
        };
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<u128>()) else {
            std::alloc::handle_alloc_error(layout);
        };
        if huge {
            advise_huge_pages(raw, size);
        }
        // SAFETY: `raw` is a fresh allocation of `size >= bytes` bytes.
        unsafe { std::ptr::write_bytes(raw, 0, size) };
        Slots { ptr, len, layout: Some(layout) }
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(at: *mut u8, size: usize) {
    // SAFETY: `[at, at + size)` is one live allocation; madvise only changes how
    // the kernel backs it, never its contents. A refusal (THP disabled) is fine.
    let _ = unsafe { libc::madvise(at.cast(), size, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_at: *mut u8, _size: usize) {}

impl Drop for Slots {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [u128];
    fn deref(&self) -> &[u128] {
        // SAFETY: `ptr` is valid for `len` initialised slots (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [u128] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_huge_arrays_are_zeroed_and_writable() {
        for len in [0, 1, 1024, HUGE_PAGE / 16, HUGE_PAGE / 16 + 3] {
            let mut s = Slots::zeroed(len);
            assert_eq!(s.len(), len);
            assert!(s.iter().all(|&x| x == 0));
            if let Some(last) = s.last_mut() {
                *last = u128::MAX;
            }
            assert_eq!(s.iter().filter(|&&x| x != 0).count(), usize::from(len > 0));
        }
        assert_eq!(Slots::default().len(), 0);
    }
}
