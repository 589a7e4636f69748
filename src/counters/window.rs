//! Window counters: one atomic cell per `(customer, meter, window kind, window
//! start)`. These are what limit checks read, so a read is one sharded-map lookup
//! and an atomic load; adds are atomic too.

use super::hash::KeyHash;
use super::intern::CustomerId;
use crate::model::{Aggregation, MeterId, WindowKind};
use dashmap::DashMap;
use std::sync::atomic::{AtomicI64, Ordering};

/// One window counter's key: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub customer: CustomerId,
    pub meter: MeterId,
    pub kind: WindowKind,
    pub start_ms: i64,
}

/// One window's value. `ts` is the timestamp of the event that set a `latest`
/// value (unused by the other aggregations).
#[derive(Debug, Default)]
pub struct Cell {
    pub value: AtomicI64,
    pub ts: AtomicI64,
}

impl Cell {
    /// Folds one event into the cell. `latest` needs `value` and `ts` to change
    /// together, so its callers hold the key's stripe lock (see [`super::Counters`]).
    pub fn fold(&self, aggregation: Aggregation, raw: i64, ts: i64) {
        match aggregation {
            Aggregation::Sum | Aggregation::Count => {
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
    map: DashMap<CounterKey, Cell, KeyHash>,
}

impl Default for WindowCounters {
    fn default() -> Self {
        WindowCounters { map: DashMap::with_capacity_and_hasher_and_shard_amount(1024, KeyHash, 64) }
    }
}

impl WindowCounters {
    /// The value of one window, 0 if it has no usage.
    pub fn read(&self, key: &CounterKey) -> i64 {
        self.map.get(key).map(|c| c.value.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Runs `f` on the key's cell, creating it first if needed.
    pub fn with_cell<R>(&self, key: CounterKey, f: impl FnOnce(&Cell) -> R) -> R {
        if let Some(cell) = self.map.get(&key) {
            return f(&cell);
        }
        let cell = self.map.entry(key).or_default().downgrade();
        f(&cell)
    }

    /// Adds to a `sum`/`count` window only if the result stays within `limit`
    /// (compare-and-swap); returns the value after, or the value that refused.
    pub fn add_within(&self, key: CounterKey, raw: i64, limit: i64) -> Result<i64, i64> {
        self.with_cell(key, |cell| {
            let mut current = cell.value.load(Ordering::Acquire);
            loop {
                let next = match current.checked_add(raw) {
                    Some(n) if n <= limit => n,
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
    pub fn retain_ending_after(&self, cutoff_ms: i64, end_of: impl Fn(&CounterKey) -> i64) {
        self.map.retain(|k, _| end_of(k) >= cutoff_ms);
    }

    /// Number of live window counters.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
