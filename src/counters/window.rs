//! Window counters: one atomic cell per `(customer, meter, window kind, window
//! start)`. These are what limit checks read, so a read is one sharded-map lookup
//! and an atomic load; adds are atomic too.

use super::flat::{FlatKey, FlatMap};
use super::intern::CustomerId;
use crate::keyhash::KeyHash;
use crate::model::{Aggregation, MeterId, WindowKind};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// One window counter's key: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub customer: CustomerId,
    pub meter: MeterId,
    pub kind: WindowKind,
    pub start_ms: i64,
}

/// Meter ids are below the catalog's size, which config caps under
/// `MeterId::MAX`: no real key has that meter.
impl FlatKey for CounterKey {
    fn vacant() -> CounterKey {
        CounterKey { customer: 0, meter: MeterId::MAX, kind: WindowKind::Total, start_ms: 0 }
    }
    fn is_vacant(&self) -> bool {
        self.meter == MeterId::MAX
    }
}

/// One value: a window's or a minute bucket's. `ts` is the timestamp of the
/// event that set a `latest` value (unused by the other aggregations).
#[derive(Debug, Default)]
pub struct Cell {
    pub value: AtomicI64,
    pub ts: AtomicI64,
}

/// A window counter: its [`Cell`] plus what sharing totals through Redis needs
/// (minute buckets do without). `value` stays this instance's own usage;
/// `others` is the usage of the other instances as of the last sync, and
/// `pushed` is how much of `value` Redis holds. A check reads `value + others`.
#[derive(Debug, Default)]
pub struct WindowCell {
    pub cell: Cell,
    pub others: AtomicI64,
    pub pushed: AtomicI64,
    /// Read by a check since the last sync: the syncer fetches its total even
    /// if this instance added nothing.
    pub watched: AtomicBool,
    /// When (wall-clock ms) `others` was last read from Redis; 0 never. Checks
    /// refresh a total older than two sync intervals first (issue 16).
    pub synced_ms: AtomicI64,
}

impl std::ops::Deref for WindowCell {
    type Target = Cell;
    fn deref(&self) -> &Cell {
        &self.cell
    }
}

impl WindowCell {
    /// What a check sees: this instance's usage plus the others' last synced.
    pub fn used(&self) -> i64 {
        self.value.load(Ordering::Acquire).saturating_add(self.others.load(Ordering::Acquire))
    }
}

impl Cell {
    /// Folds one event into the cell. `latest` needs `value` and `ts` to change
    /// together, so its callers hold the key's stripe lock (see [`super::Counters`]).
    pub fn fold(&self, aggregation: Aggregation, raw: i64, ts: i64) {
        match aggregation {
            // A unique_count window adds 1 per new value (see `super::unique`);
            // its buckets count events.
            Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => {
                // Checked at validation: a single add cannot overflow a sane total;
                // saturate rather than wrap if a total ever reaches i64::MAX.
                let prev = self.value.fetch_add(raw, Ordering::AcqRel);
                if prev.checked_add(raw).is_none() {
                    self.value.store(i64::MAX, Ordering::Release);
                }
            }
            Aggregation::Max => {
                self.value.fetch_max(raw, Ordering::AcqRel);
            }
            Aggregation::Latest => {
                if ts >= self.ts.load(Ordering::Acquire) {
                    self.ts.store(ts, Ordering::Release);
                    self.value.store(raw, Ordering::Release);
                }
            }
        }
    }
}

/// All window counters, sharded.
pub struct WindowCounters {
    map: FlatMap<CounterKey, WindowCell, KeyHash>,
    /// Instances share totals through Redis: reads mark cells for the syncer.
    shared: AtomicBool,
}

impl Default for WindowCounters {
    fn default() -> Self {
        WindowCounters { map: FlatMap::with_capacity_and_hasher(1024, KeyHash), shared: AtomicBool::new(false) }
    }
}

impl WindowCounters {
    /// Turns on cross-instance totals: reads create and mark cells so the syncer
    /// keeps their totals fresh.
    pub fn set_shared(&self) {
        self.shared.store(true, Ordering::Release);
    }

    /// Whether totals are shared through Redis.
    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Acquire)
    }

    /// The usage of one window (all instances' when shared), 0 if none.
    pub fn read(&self, key: &CounterKey) -> i64 {
        if self.is_shared() {
            return self.with_cell(*key, |c| {
                if !c.watched.load(Ordering::Relaxed) {
                    c.watched.store(true, Ordering::Relaxed);
                }
                c.used()
            });
        }
        self.map.get(key, |c| c.used()).unwrap_or(0)
    }

    /// Visits every cell (the syncer's scan).
    pub fn for_each(&self, f: impl FnMut(&CounterKey, &WindowCell)) {
        self.map.for_each(f);
    }

    /// Runs `f` on the key's cell if it exists.
    pub fn get<R>(&self, key: &CounterKey, f: impl FnOnce(&WindowCell) -> R) -> Option<R> {
        self.map.get(key, f)
    }

    /// Runs `f` on the key's cell, creating it first if needed.
    pub fn with_cell<R>(&self, key: CounterKey, f: impl FnOnce(&WindowCell) -> R) -> R {
        self.map.with(key, f)
    }

    /// The hash the map files `key` under (for the batch call below).
    pub fn hash(&self, key: &CounterKey) -> u64 {
        self.map.hash(key)
    }

    /// [`WindowCounters::with_cell`] for a batch of keys with their hashes:
    /// `f(i, cell)` for every `keys[i]`, shard by shard (see
    /// [`FlatMap::with_each_hashed`](super::flat::FlatMap::with_each_hashed)).
    pub fn with_each_cell_hashed(&self, keys: &[(CounterKey, u64)], f: impl FnMut(usize, &WindowCell)) {
        self.map.with_each_hashed(keys, f)
    }

    /// Adds to a `sum`/`count` window only if the usage (others' included)
    /// stays within `limit` (compare-and-swap); returns the usage after, or the
    /// usage that refused.
    pub fn add_within(&self, key: CounterKey, raw: i64, limit: i64) -> Result<i64, i64> {
        self.with_cell(key, |cell| {
            let others = cell.others.load(Ordering::Acquire);
            let mut current = cell.value.load(Ordering::Acquire);
            loop {
                let next = match current.checked_add(raw) {
                    Some(n) if n.saturating_add(others) <= limit => n,
                    _ => return Err(current.saturating_add(others)),
                };
                match cell.value.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(next.saturating_add(others)),
                    Err(actual) => current = actual,
                }
            }
        })
    }

    /// Adds to this instance's own usage of a window only if it stays within
    /// `max_own` (compare-and-swap; the others' usage does not count): a
    /// consume inside a `leased` slice. `Ok(own after)` or `Err(own now)`.
    pub fn add_own_within(&self, key: CounterKey, raw: i64, max_own: i64) -> Result<i64, i64> {
        self.with_cell(key, |cell| {
            let mut current = cell.value.load(Ordering::Acquire);
            loop {
                let next = match current.checked_add(raw) {
                    Some(n) if n <= max_own => n,
                    _ => return Err(current),
                };
                match cell.value.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(next),
                    Err(actual) => current = actual,
                }
            }
        })
    }

    /// Overwrites a window's value (seeding from the store).
    pub fn set(&self, key: CounterKey, value: i64, ts: i64) {
        self.with_cell(key, |cell| {
            cell.value.store(value, Ordering::Release);
            cell.ts.store(ts, Ordering::Release);
        });
    }

    /// Drops windows that ended before `cutoff_ms` (late events older than that are
    /// refused at ingest anyway). `end_of` maps a key to its window end.
    /// Returns how many were dropped. A customer that went idle keeps no
    /// counter past its windows' end; one seen again starts fresh windows
    /// (their usage is all new: the old windows ended).
    pub fn retain_ending_after(&self, cutoff_ms: i64, end_of: impl Fn(&CounterKey) -> i64) -> usize {
        self.map.retain(|k, _| end_of(k) >= cutoff_ms)
    }

    /// Number of live window counters.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
