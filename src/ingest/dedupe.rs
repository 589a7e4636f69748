//! Event-id deduplication within `ingest.dedupe_window`.
//!
//! Ids are kept as 128-bit hashes (two keyed SipHash-1-3 passes), not strings:
//! a collision needs ~2^64 ids, and an entry costs a fixed size whatever the id's
//! length. Entries older than the window are swept by the maintenance task.

use dashmap::DashMap;
use std::hash::{Hash, Hasher};

/// A 128-bit id hash.
pub type IdHash = u128;

/// Hashes an event id.
pub fn hash_id(id: &str) -> IdHash {
    let mut a = std::hash::DefaultHasher::new();
    0x6d65_7465_7264_u64.hash(&mut a);
    id.hash(&mut a);
    let mut b = std::hash::DefaultHasher::new();
    0x6465_6475_7065_u64.hash(&mut b);
    id.hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// Ids accepted recently, with the time each was accepted.
pub struct Deduper {
    seen: DashMap<IdHash, i64, crate::counters::hash::KeyHash>,
    window_ms: i64,
}

impl Deduper {
    pub fn new(window_ms: i64) -> Deduper {
        Deduper {
            seen: DashMap::with_capacity_and_hasher_and_shard_amount(1024, crate::counters::hash::KeyHash, 64),
            window_ms,
        }
    }

    /// Records `id` as accepted at `now_ms`; `false` if it already was (within the
    /// window). Atomic: of two racing callers exactly one gets `true`.
    pub fn insert(&self, id: IdHash, now_ms: i64) -> bool {
        match self.seen.entry(id) {
            dashmap::Entry::Occupied(mut o) => {
                if *o.get() < now_ms - self.window_ms {
                    o.insert(now_ms);
                    true
                } else {
                    false
                }
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(now_ms);
                true
            }
        }
    }

    /// Forgets `id` (a batch whose acceptance failed after dedupe).
    pub fn remove(&self, id: IdHash) {
        self.seen.remove(&id);
    }

    /// Drops ids older than the window.
    pub fn sweep(&self, now_ms: i64) {
        let cutoff = now_ms - self.window_ms;
        self.seen.retain(|_, at| *at >= cutoff);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupes_within_window_only() {
        let d = Deduper::new(1000);
        let id = hash_id("evt-1");
        assert!(d.insert(id, 0));
        assert!(!d.insert(id, 999));
        assert!(!d.insert(id, 1000));
        assert!(d.insert(id, 2001));
        assert_ne!(hash_id("a"), hash_id("b"));
        d.sweep(10_000);
        assert!(d.is_empty());
    }
}
