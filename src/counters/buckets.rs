//! Minute buckets: per `(customer, meter, minute, properties)` aggregates that the
//! flusher writes to the usage store.
//!
//! Buckets live in an [`Epoch`]. Writers hold a read guard of the current-epoch
//! lock (a crossbeam `ShardedLock`: a read touches only this thread's shard, so
//! writers on different cores do not contend) for as long as they write. The
//! flusher swaps in a fresh epoch under the write lock, which waits for in-flight
//! writers, then drains the old epoch at leisure. The old epoch stays visible as
//! "flushing" until the store holds it, so queries never miss usage between the
//! swap and the store write, and the epoch's sequence number tells a query whether
//! the store already has it.

use super::flat::{FlatKey, FlatMap};
use super::intern::CustomerId;
use super::window::Cell;
use crate::keyhash::KeyHash;
use crate::model::{Aggregation, MeterId};
use crossbeam::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};
use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

/// Event properties, sorted by key. Shared by every bucket with the same set.
pub type Properties = Arc<[(Box<str>, Box<str>)]>;

/// One bucket's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub customer: CustomerId,
    pub meter: MeterId,
    /// Minutes since the Unix epoch.
    pub minute: i64,
    /// Hash of the sorted properties (0 for none).
    pub props_hash: u64,
}

/// As for window counters: no real key has meter `MeterId::MAX`.
impl FlatKey for BucketKey {
    fn vacant() -> BucketKey {
        BucketKey { customer: 0, meter: MeterId::MAX, minute: 0, props_hash: 0 }
    }
    fn is_vacant(&self) -> bool {
        self.meter == MeterId::MAX
    }
}

/// One bucket's aggregate and the properties it was recorded with.
#[derive(Debug, Default)]
pub struct Bucket {
    pub cell: Cell,
    pub properties: OnceLock<Properties>,
}

/// A generation of buckets with its flush sequence number.
pub struct Epoch {
    pub seq: u64,
    /// The WAL records folded into this epoch or an older one; set when the epoch
    /// is swapped out (see `wal`'s module doc).
    pub wal_mark: std::sync::OnceLock<crate::wal::WalMark>,
    pub buckets: FlatMap<BucketKey, Bucket, KeyHash>,
}

impl Epoch {
    /// An empty epoch sized for `capacity` buckets: the previous epoch's count,
    /// so a steady load does not grow (rehash) the table every flush interval.
    fn new(seq: u64, capacity: usize) -> Epoch {
        let buckets = FlatMap::with_capacity_and_hasher(capacity.max(1024), KeyHash);
        Epoch { seq, wal_mark: std::sync::OnceLock::new(), buckets }
    }

    /// Folds one event into its bucket.
    pub fn fold(&self, key: BucketKey, properties: &[(Cow<'_, str>, Cow<'_, str>)], aggregation: Aggregation, raw: i64, ts: i64) {
        self.buckets.with(key, |b| b.fold(properties, aggregation, raw, ts))
    }
}

impl Bucket {
    /// Folds one event in; the first event with properties leaves a copy of them.
    pub fn fold(&self, properties: &[(Cow<'_, str>, Cow<'_, str>)], aggregation: Aggregation, raw: i64, ts: i64) {
        if !properties.is_empty() && self.properties.get().is_none() {
            let owned: Properties = properties.iter().map(|(k, v)| (Box::from(k.as_ref()), Box::from(v.as_ref()))).collect();
            let _ = self.properties.set(owned);
        }
        self.cell.fold(aggregation, raw, ts);
    }
}

/// The current epoch and the one being flushed.
pub struct Buckets {
    current: ShardedLock<Arc<Epoch>>,
    flushing: Mutex<Option<Arc<Epoch>>>,
}

impl Buckets {
    /// Starts at flush sequence `next_seq` (one past the highest the store holds).
    pub fn new(next_seq: u64) -> Buckets {
        Buckets { current: ShardedLock::new(Arc::new(Epoch::new(next_seq, 0))), flushing: Mutex::new(None) }
    }

    /// Holds off epoch swaps (and backfills) while the guard lives.
    pub fn write_guard(&self) -> ShardedLockReadGuard<'_, Arc<Epoch>> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Excludes every writer while the guard lives.
    pub fn exclusive(&self) -> ShardedLockWriteGuard<'_, Arc<Epoch>> {
        self.current.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch waiting to be stored, if a flush is pending or was not stored yet.
    pub fn flushing(&self) -> Option<Arc<Epoch>> {
        self.flushing.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The epochs a query should merge with the store: the flushing one and the
    /// current one. Taken current-first so a swap in between cannot hide one.
    pub fn unflushed(&self) -> Vec<Arc<Epoch>> {
        let current = self.write_guard().clone();
        let mut out = Vec::with_capacity(2);
        if let Some(f) = self.flushing() {
            if f.seq != current.seq {
                out.push(f);
            }
        }
        out.push(current);
        out
    }

    /// Returns the epoch to flush: the pending one if the last flush failed, else
    /// the current one, swapped out for a fresh epoch. `None` when there is nothing
    /// to flush. `watermark` is asked under the exclusive lock (no fold in flight)
    /// and stored in the swapped epoch.
    pub fn take_for_flush(&self, watermark: impl FnOnce() -> crate::wal::WalMark) -> Option<Arc<Epoch>> {
        let mut flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pending) = flushing.as_ref() {
            return Some(pending.clone());
        }
        // The next epoch is allocated before the exclusive lock, which stops
        // every writer: only this function swaps epochs (under `flushing`), so
        // the sequence number read here is still current below.
        let (seq, len) = {
            let current = self.write_guard();
            (current.seq, current.buckets.len())
        };
        if len == 0 {
            return None;
        }
        // Allocating and writing a table of `len` slots takes milliseconds of
        // page faults: on a lowered thread, off the runtime's worker (issue 24).
        let next = crate::priority::lowered_scoped(|| Epoch::new(seq + 1, len)).unwrap_or_else(|_| Epoch::new(seq + 1, len));
        let next = Arc::new(next);
        let mut current = self.exclusive();
        let _ = current.wal_mark.set(watermark());
        let old = std::mem::replace(&mut *current, next);
        *flushing = Some(old.clone());
        Some(old)
    }

    /// Marks the flushing epoch as stored.
    pub fn flushed(&self, seq: u64) {
        let mut flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        if flushing.as_ref().map(|e| e.seq) == Some(seq) {
            *flushing = None;
        }
    }

    /// Number of buckets not yet stored.
    pub fn pending_len(&self) -> usize {
        self.unflushed().iter().map(|e| e.buckets.len()).sum()
    }
}

/// Reads a bucket's value.
pub fn bucket_value(b: &Bucket) -> (i64, i64) {
    (b.cell.value.load(Ordering::Acquire), b.cell.ts.load(Ordering::Acquire))
}

/// The value of property `key` of a bucket's events (issue 25: group-by and
/// unique counts read it), if they had it.
pub fn bucket_property<'b>(b: &'b Bucket, key: &str) -> Option<&'b str> {
    b.properties.get()?.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
}
