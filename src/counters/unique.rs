//! Unique counts (issue 25): per tracked window of a `unique_count` meter, the
//! set of distinct values of its `unique_property` seen in the window, so the
//! window counter holds exactly their number.
//!
//! Values are kept as 128-bit xxh3 hashes (16 B each; two distinct values
//! collide with probability ~n²/2¹²⁹, as for event ids in `dedupe`). A set
//! holds at most the configured cap (`ingest.max_unique_values`): ingest asks
//! [`UniqueSets::refused`] for a batch's values (one decision per window, under
//! its lock), consumes ask [`UniqueSets::admits`], and a value past it is refused;
//! replay, rebuild and Redis merges insert regardless (those values were
//! accepted already), so a set may pass the cap by what concurrent requests
//! admitted together. Sets leave with their window (`flush::housekeeping`).
//!
//! With Redis, each set also remembers the values not yet added to the
//! window's shared set (`sync::unique`), and merges those other instances
//! added; the window counter then holds the distinct count of all of them.

use super::window::CounterKey;
use crate::keyhash::KeyHash;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A value's hash.
pub type ValueHash = u128;

/// Hashes one value of a `unique_property` (fixed seed: stable across builds,
/// so Redis sets written by other instances and versions agree).
pub fn hash_value(value: &str) -> ValueHash {
    xxhash_rust::xxh3::xxh3_128_with_seed(value.as_bytes(), 0x7569_6e71_7565)
}

/// The values of one window.
#[derive(Default)]
struct Set {
    values: HashSet<ValueHash, KeyHash>,
    /// Values added here and not yet in the shared Redis set.
    unpushed: Vec<ValueHash>,
}

const SHARDS: usize = 64;

/// Every tracked window's distinct values.
pub struct UniqueSets {
    shards: Box<[Mutex<HashMap<CounterKey, Set, KeyHash>>]>,
    cap: AtomicUsize,
    shared: AtomicBool,
    values: AtomicUsize,
}

impl Default for UniqueSets {
    fn default() -> Self {
        UniqueSets {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            cap: AtomicUsize::new(100_000),
            shared: AtomicBool::new(false),
            values: AtomicUsize::new(0),
        }
    }
}

impl UniqueSets {
    /// Sets the cap of distinct values per window.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap.max(1), Ordering::Release);
    }

    /// The cap of distinct values per window.
    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Acquire)
    }

    /// Remembers values not yet pushed to Redis (instances share totals).
    pub fn set_shared(&self) {
        self.shared.store(true, Ordering::Release);
    }

    fn shard(&self, key: &CounterKey) -> std::sync::MutexGuard<'_, HashMap<CounterKey, Set, KeyHash>> {
        use std::hash::BuildHasher;
        let i = (KeyHash.hash_one(key) >> 58) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `value` to the window's set; whether it was new there.
    pub fn insert(&self, key: CounterKey, value: ValueHash) -> bool {
        let mut shard = self.shard(&key);
        let set = shard.entry(key).or_default();
        let new = set.values.insert(value);
        if new {
            self.values.fetch_add(1, Ordering::Relaxed);
            if self.shared.load(Ordering::Relaxed) {
                set.unpushed.push(value);
            }
        }
        new
    }

    /// Whether the window already counts `value`.
    pub fn contains(&self, key: &CounterKey, value: ValueHash) -> bool {
        self.shard(key).get(key).is_some_and(|s| s.values.contains(&value))
    }

    /// Whether `value` may be added to the window: it is counted already, or
    /// the set has room. `Err(size)` when the set is full. (A request with
    /// several values asks [`UniqueSets::refused`].)
    pub fn admits(&self, key: &CounterKey, value: ValueHash) -> Result<(), usize> {
        let shard = self.shard(key);
        let Some(set) = shard.get(key) else {
            return Ok(());
        };
        if set.values.contains(&value) || set.values.len() < self.cap() {
            Ok(())
        } else {
            Err(set.values.len())
        }
    }

    /// Which of a request's `values` (in its order, counted or not) would pass
    /// the cap: their positions, and the set's size. Decided under the set's
    /// lock in one go, so that a value another request adds meanwhile is not
    /// counted twice (once as this request's, once as the set's), which
    /// refused requests that fit.
    pub fn refused(&self, key: &CounterKey, values: &[ValueHash]) -> (Vec<usize>, usize) {
        let cap = self.cap();
        let shard = self.shard(key);
        let set = shard.get(key).map(|s| &s.values);
        let size = set.map_or(0, HashSet::len);
        let mut admitted: HashSet<ValueHash, KeyHash> = HashSet::default();
        let mut refused = Vec::new();
        for (i, value) in values.iter().enumerate() {
            if set.is_some_and(|s| s.contains(value)) || admitted.contains(value) {
                continue;
            }
            if size.saturating_add(admitted.len()) < cap {
                admitted.insert(*value);
            } else {
                refused.push(i);
            }
        }
        (refused, size)
    }

    /// Adds values counted elsewhere (the store at start, other instances
    /// through Redis) without marking them to push; how many were new.
    pub fn merge(&self, key: CounterKey, values: impl IntoIterator<Item = ValueHash>) -> usize {
        let mut shard = self.shard(&key);
        let set = shard.entry(key).or_default();
        let before = set.values.len();
        set.values.extend(values);
        let added = set.values.len() - before;
        self.values.fetch_add(added, Ordering::Relaxed);
        added
    }

    /// The window's number of distinct values.
    pub fn len_of(&self, key: &CounterKey) -> usize {
        self.shard(key).get(key).map_or(0, |s| s.values.len())
    }

    /// Every window with a set: its key, size and the values to push (taken:
    /// on a failed push, give them back with [`UniqueSets::unpush`]); with
    /// `all`, every value (Redis lost its data).
    pub fn take_unpushed(&self, all: bool) -> Vec<(CounterKey, usize, Vec<ValueHash>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (key, set) in shard.iter_mut() {
                let values = if all {
                    set.unpushed.clear();
                    set.values.iter().copied().collect()
                } else {
                    std::mem::take(&mut set.unpushed)
                };
                out.push((*key, set.values.len(), values));
            }
        }
        out
    }

    /// Puts back values a failed push took.
    pub fn unpush(&self, key: CounterKey, values: Vec<ValueHash>) {
        if let Some(set) = self.shard(&key).get_mut(&key) {
            set.unpushed.extend(values);
        }
    }

    /// Drops the sets of windows that ended before `cutoff_ms`; how many.
    pub fn retain_ending_after(&self, cutoff_ms: i64, end_of: impl Fn(&CounterKey) -> i64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|key, set| {
                let keep = end_of(key) >= cutoff_ms;
                if !keep {
                    dropped += 1;
                    self.values.fetch_sub(set.values.len(), Ordering::Relaxed);
                }
                keep
            });
        }
        dropped
    }

    /// Distinct values held over every window (the memory gauge: ~16-32 B each).
    pub fn values(&self) -> usize {
        self.values.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WindowKind;

    fn key(start_ms: i64) -> CounterKey {
        CounterKey { customer: 1, meter: 0, kind: WindowKind::Day, start_ms }
    }

    #[test]
    fn counts_each_value_once_and_stops_at_the_cap() {
        let sets = UniqueSets::default();
        sets.set_cap(2);
        assert!(sets.insert(key(0), hash_value("a")));
        assert!(!sets.insert(key(0), hash_value("a")));
        assert!(sets.admits(&key(0), hash_value("b")).is_ok());
        assert_eq!(sets.refused(&key(0), &[hash_value("b"), hash_value("c")]), (vec![1], 1), "one new value fits, not two");
        assert!(sets.insert(key(0), hash_value("b")));
        assert_eq!(sets.admits(&key(0), hash_value("c")), Err(2));
        assert!(sets.admits(&key(0), hash_value("a")).is_ok(), "a counted value is always admitted");
        assert_eq!(sets.len_of(&key(0)), 2);
        assert_eq!(sets.merge(key(0), [hash_value("a"), hash_value("z")]), 1);
        assert_eq!(sets.values(), 3);
        assert_eq!(sets.retain_ending_after(10, |k| k.start_ms + 5), 1);
        assert_eq!(sets.values(), 0);
    }

    #[test]
    fn a_request_counts_each_new_value_once_in_order() {
        let sets = UniqueSets::default();
        sets.set_cap(4);
        let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(hash_value);
        sets.insert(key(0), a);
        sets.insert(key(0), b);
        // c and d fill the set; c again and a (counted) pass; e does not fit.
        assert_eq!(sets.refused(&key(0), &[a, c, d, c, e, a]), (vec![4], 2));
        assert_eq!(sets.refused(&key(1), &[a, b, c, d, e, e]), (vec![4, 5], 0), "an empty window");
        assert_eq!(sets.len_of(&key(0)), 2, "asking adds nothing");
    }

    /// Requests racing on one window, each with values that all fit together
    /// with the others': none is refused, however their checks and inserts
    /// interleave. (Counting a request's values one at a time against a size
    /// read each time refused some: a value another request had added since
    /// counted twice.)
    #[test]
    fn racing_requests_that_fit_together_are_never_refused() {
        let sets = std::sync::Arc::new(UniqueSets::default());
        sets.set_cap(40);
        let values: Vec<ValueHash> = (0..40).map(|i| hash_value(&format!("p{i}"))).collect();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (sets, values) = (sets.clone(), values.clone());
                std::thread::spawn(move || {
                    let mut refusals = 0;
                    for round in 0..300 {
                        let k = key(round);
                        // Each thread its own order over the same 40 values.
                        let mine: Vec<ValueHash> = (0..40).map(|i| values[(i * 7 + t * 11) % 40]).collect();
                        refusals += sets.refused(&k, &mine).0.len();
                        for v in mine {
                            sets.insert(k, v);
                        }
                    }
                    refusals
                })
            })
            .collect();
        let refusals: usize = threads.into_iter().map(|h| h.join().unwrap_or(usize::MAX)).sum();
        assert_eq!(refusals, 0);
        assert!((0..300).all(|r| sets.len_of(&key(r)) == 40));
        assert_eq!(sets.refused(&key(0), &[hash_value("p40")]), (vec![0], 40), "a 41st value does not fit");
    }

    #[test]
    fn shared_sets_hand_out_new_values_once() {
        let sets = UniqueSets::default();
        sets.set_shared();
        sets.insert(key(0), 1);
        sets.insert(key(0), 1);
        sets.merge(key(0), [2]);
        let taken = sets.take_unpushed(false);
        assert_eq!(taken, vec![(key(0), 2, vec![1])]);
        assert_eq!(sets.take_unpushed(false), vec![(key(0), 2, vec![])]);
        let mut all = sets.take_unpushed(true).remove(0).2;
        all.sort_unstable();
        assert_eq!(all, vec![1, 2]);
    }
}
