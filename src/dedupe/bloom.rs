//! A blocked Bloom filter over id fingerprints, one per disk run: it answers
//! "surely not in this run" for almost every fresh id with one cache line of
//! RAM, so a run is read from disk only for its own ids and ~1 % of others.
//!
//! Each key sets one bit in each of the eight words of one 64-byte block
//! (k = 8); at 10 bits per key the false-positive rate is about 1 %.

use super::pages::Pages;

/// Bits of filter per id.
pub const BITS_PER_KEY: usize = 10;
const WORDS: usize = 8;

/// The filter's bit array, in blocks of eight words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    words: Pages<u64>,
}

impl Bloom {
    /// An empty filter sized for `keys` keys.
    pub fn with_keys(keys: usize) -> Bloom {
        let blocks = (keys * BITS_PER_KEY).div_ceil(WORDS * 64).max(1);
        Bloom { words: Pages::zeroed(blocks * WORDS) }
    }

    /// A filter from its stored words (a whole number of blocks, at least one).
    pub fn from_words(words: &[u64]) -> Option<Bloom> {
        (!words.is_empty() && words.len().is_multiple_of(WORDS)).then(|| Bloom { words: Pages::from_slice(words) })
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The block of a fingerprint: from its top 64 bits (multiply-shift).
    fn block(&self, tag: u128) -> usize {
        let h = (tag >> 32) as u64;
        let blocks = (self.words.len() / WORDS) as u128;
        ((u128::from(h) * blocks) >> 64) as usize * WORDS
    }

    /// One bit per word, from the fingerprint's low 48 bits.
    fn bit(tag: u128, word: usize) -> u64 {
        1 << ((tag as u64 >> (word * 6)) & 63)
    }

    pub fn insert(&mut self, tag: u128) {
        let b = self.block(tag);
        for w in 0..WORDS {
            self.words[b + w] |= Self::bit(tag, w);
        }
    }

    pub fn may_contain(&self, tag: u128) -> bool {
        let b = self.block(tag);
        (0..WORDS).all(|w| self.words[b + w] & Self::bit(tag, w) != 0)
    }

    /// Asks the CPU to start loading `tag`'s block (a batch probes a few ids ahead).
    pub fn prefetch(&self, tag: u128) {
        let at = self.words[self.block(tag)..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `_mm_prefetch` is only a hint: it never faults and reads
        // nothing into the program; `at` points into `words`.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at as *const i8);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }

    /// Bytes of RAM the filter holds.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_about_one_percent_false_positives() {
        let tags: Vec<u128> = (0..100_000u64).map(|i| crate::dedupe::hash_id(&format!("in-{i}")) >> 32).collect();
        let mut f = Bloom::with_keys(tags.len());
        for &t in &tags {
            f.insert(t);
        }
        assert!(tags.iter().all(|&t| f.may_contain(t)));
        let fp = (0..100_000u64).filter(|i| f.may_contain(crate::dedupe::hash_id(&format!("out-{i}")) >> 32)).count();
        assert!(fp < 2_000, "{fp} false positives in 100k");
        assert_eq!(Bloom::from_words(f.words()), Some(f));
        assert_eq!(Bloom::from_words(&[1, 2, 3]), None);
    }
}
