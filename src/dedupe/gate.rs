//! The *gate*: one Bloom filter over the ids of every live disk run, probed
//! before the runs' own filters. A fresh id without a `timestamp` must be
//! shown absent from every run; with one filter per run that costs a cache
//! miss per run (twelve at 100M ids), with the gate one miss answers for all
//! the runs it covers, and the runs' own filters are consulted only for the
//! ~1 % the gate lets through (and for runs not yet covered).
//!
//! A Bloom filter cannot forget, so runs leaving the window stay in the gate
//! as stale bits (more false positives, never a wrong answer) until it is
//! rebuilt from the live runs' entries on disk; the same rebuild covers runs
//! opened at a restart (the gate is not stored) and grows the gate when it is
//! full. The gate is built only while it fits the dedupe memory budget beside
//! the runs' own filters; past that the runs' filters answer alone.

use super::bloom::Bloom;
use std::collections::HashSet;

/// A Bloom filter over the fingerprints of the runs in `covers`.
#[derive(Debug, Clone)]
pub struct Gate {
    bloom: Bloom,
    /// Fingerprints it was sized for.
    capacity: u64,
    /// Fingerprints inserted (live and stale).
    inserted: u64,
    /// Sequence numbers of the runs whose every fingerprint is in it.
    covers: HashSet<u64>,
}

/// The gate's key of a fingerprint: its halves swapped, so the gate's block
/// and bits come from other fingerprint bits than a run filter's.
fn key(tag: u128) -> u128 {
    (tag >> 48) | ((tag & ((1 << 48) - 1)) << 48)
}

impl Gate {
    /// An empty gate for `capacity` fingerprints.
    pub fn with_capacity(capacity: u64) -> Gate {
        let keys = usize::try_from(capacity).unwrap_or(usize::MAX);
        Gate { bloom: Bloom::with_keys(keys), capacity, inserted: 0, covers: HashSet::new() }
    }

    /// Bytes of RAM a gate for `capacity` fingerprints takes.
    pub fn bytes_for(capacity: u64) -> u64 {
        capacity.saturating_mul(super::bloom::BITS_PER_KEY as u64).div_ceil(512) * 64
    }

    pub fn insert(&mut self, tag: u128) {
        self.bloom.insert(key(tag));
        self.inserted += 1;
    }

    /// Marks run `seq` as wholly inserted.
    pub fn cover(&mut self, seq: u64) {
        self.covers.insert(seq);
    }

    pub fn covers(&self, seq: u64) -> bool {
        self.covers.contains(&seq)
    }

    /// Whether `tag` may be in one of the covered runs (`false`: surely not).
    pub fn may_contain(&self, tag: u128) -> bool {
        self.bloom.may_contain(key(tag))
    }

    pub fn prefetch(&self, tag: u128) {
        self.bloom.prefetch(key(tag));
    }

    /// Whether `more` fingerprints fit without passing the sized capacity.
    pub fn has_room(&self, more: u64) -> bool {
        self.inserted.saturating_add(more) <= self.capacity
    }

    pub fn inserted(&self) -> u64 {
        self.inserted
    }

    pub fn bytes(&self) -> usize {
        self.bloom.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_fingerprints_always_pass_and_others_mostly_not() {
        let tag = |s: &str| super::super::table::tag(super::super::hash_id(s));
        let mut g = Gate::with_capacity(50_000);
        for i in 0..50_000 {
            g.insert(tag(&format!("in-{i}")));
        }
        g.cover(7);
        assert!((0..50_000).all(|i| g.may_contain(tag(&format!("in-{i}")))));
        let fp = (0..50_000).filter(|i| g.may_contain(tag(&format!("out-{i}")))).count();
        assert!(fp < 1_000, "{fp} false positives in 50k");
        assert!(g.covers(7) && !g.covers(8));
        assert!(!g.has_room(1) && g.inserted() == 50_000);
        assert_eq!(Gate::bytes_for(50_000), g.bytes() as u64);
    }
}
