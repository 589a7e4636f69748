//! The usage seam: the one place where usage changes. Every change of the
//! window counters and minute buckets — accepted events, consumes (cached and
//! strict), WAL replay and the store rebuild at start, counters seeded for new
//! entitlements, totals read back from Redis — goes through [`UsageSeam`],
//! which applies it to the [`Counters`] and then tells the observers fixed at
//! startup what changed: the customer, the meter, each window's key and its new
//! totals, and where the change came from ([`Origin`]).
//!
//! Capabilities that must see every change of usage (threshold notifications,
//! credits, reservations) plug in here as a [`UsageObserver`]. With no observer
//! the seam costs one branch on an empty slice (see `benches/hot_path.rs`,
//! `seam/*`); observers run on the caller's thread after the change is applied
//! and must be quick and never block (hand work to a channel).
//!
//! Reads (checks, summaries, the flusher's epochs) go to [`UsageSeam::counters`]
//! directly: they change nothing.

use crate::counters::window::WindowCell;
use crate::counters::{CounterKey, Counters, CustomerId, Usage};
use crate::model::{Aggregation, MeterId, WindowKind};
use std::sync::Arc;

/// Where a change of usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Live traffic: an accepted event or an allowed consume.
    Live,
    /// The WAL replayed at start.
    Replay,
    /// A window rebuilt from the usage store at start.
    Rebuild,
    /// A window seeded for changed entitlements (a new kind, a moved anchor).
    Backfill,
    /// Totals of other instances read back from Redis (sync, customer load,
    /// or a strict consume's answer).
    Sync,
}

impl Origin {
    /// Whether the change is new usage (not a restatement of usage already
    /// counted somewhere: replay, rebuild, backfill, sync).
    pub fn is_live(self) -> bool {
        self == Origin::Live
    }
}

/// One window after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowTotal {
    pub key: CounterKey,
    /// This instance's usage of the window.
    pub local: i64,
    /// What a check sees: `local` plus the other instances' last synced usage.
    pub total: i64,
}

/// What an observer is told: one `(customer, meter)` changed in these windows.
/// Totals are read just after the change was applied (a concurrent change may
/// be included); for a batch, each usage is told after the whole batch is
/// folded, so its windows show the batch's totals.
#[derive(Debug, Clone, Copy)]
pub struct UsageChange<'a> {
    pub customer: CustomerId,
    pub meter: MeterId,
    pub origin: Origin,
    /// The raw units added (0 for a window set or a sync: see `windows`;
    /// negative for an adjustment that takes usage back, issue 19).
    pub raw: i64,
    /// The usage's event time, Unix ms (0 with `raw` 0): credits charge usage
    /// to the grants active then.
    pub ts: i64,
    /// Every tracked window the change touched, with its new totals.
    pub windows: &'a [WindowTotal],
}

/// A subscriber to every change of usage.
pub trait UsageObserver: Send + Sync {
    /// Called after a change is applied, on the thread that applied it.
    fn changed(&self, change: &UsageChange<'_>);
}

/// Owns the counters; every write goes through it.
pub struct UsageSeam {
    counters: Counters,
    observers: Box<[Arc<dyn UsageObserver>]>,
}

impl UsageSeam {
    /// The seam over `counters`, telling `observers` (fixed from now on).
    pub fn new(counters: Counters, observers: Vec<Arc<dyn UsageObserver>>) -> UsageSeam {
        UsageSeam { counters, observers: observers.into_boxed_slice() }
    }

    /// The counters, to read (checks, summaries, flushes, expiry).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether anyone listens.
    pub fn observed(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Folds a batch of usage into buckets and windows.
    pub fn apply(&self, usages: &[Usage<'_>], origin: Origin) {
        self.apply_then(usages, origin, || {});
    }

    /// Folds a batch, running `done` before an epoch swap may happen (the WAL
    /// marks the batch folded there; see [`Counters::apply_then`]).
    pub fn apply_then(&self, usages: &[Usage<'_>], origin: Origin, done: impl FnOnce()) {
        self.counters.apply_then(usages, done);
        if self.observers.is_empty() {
            return;
        }
        for usage in usages {
            self.tell_usage(usage, origin);
        }
    }

    /// Folds one usage into buckets and every tracked window except `skip` (a
    /// window already reserved with [`UsageSeam::reserve_within`]), taking the
    /// epoch guard (and the stripe lock for `latest`); runs `done` under the
    /// guard. Observers see every tracked window, `skip` included.
    pub fn fold(&self, usage: &Usage<'_>, skip: Option<WindowKind>, origin: Origin, done: impl FnOnce()) {
        {
            let epoch = self.counters.buckets.write_guard();
            let _stripe = (usage.meter.aggregation == Aggregation::Latest).then(|| self.counters.stripe(usage.customer, usage.meter.id));
            self.counters.fold(&epoch, usage, skip);
            done();
        }
        if !self.observers.is_empty() {
            self.tell_usage(usage, origin);
        }
    }

    /// Adds `raw` to one window unless that would pass `max` (compare-and-swap):
    /// a consume's reservation, `Ok(total after)` or `Err(total now)`. Observers
    /// hear of it when it is committed with [`UsageSeam::fold`] (`skip` = its
    /// kind); [`UsageSeam::give_back`] undoes it.
    pub fn reserve_within(&self, key: CounterKey, raw: i64, max: i64) -> Result<i64, i64> {
        self.counters.windows.add_within(key, raw, max)
    }

    /// Like [`UsageSeam::reserve_within`], bounding only this instance's own
    /// usage by `max_own` (a `leased` slice's cap, issue 16).
    pub fn reserve_own_within(&self, key: CounterKey, raw: i64, max_own: i64) -> Result<i64, i64> {
        self.counters.windows.add_own_within(key, raw, max_own)
    }

    /// Undoes a reservation that was never committed.
    pub fn give_back(&self, key: CounterKey, raw: i64) {
        self.counters.windows.with_cell(key, |c| c.value.fetch_sub(raw, std::sync::atomic::Ordering::AcqRel));
    }

    /// Sets one window's own usage (rebuild, backfill).
    pub fn set_window(&self, key: CounterKey, value: i64, last_ts: i64, origin: Origin) {
        self.counters.windows.set(key, value, last_ts);
        if !self.observers.is_empty() {
            self.tell_windows(key.customer, key.meter, origin, (0, 0), &[key]);
        }
    }

    /// Unique counts (issue 25): adds values counted elsewhere (the store at
    /// start: `Rebuild`; other instances through Redis: `Sync`) to a
    /// `unique_count` window, which grows by the number new to it. Returns
    /// that number.
    pub fn merge_unique(
        &self,
        key: CounterKey,
        values: impl IntoIterator<Item = crate::counters::unique::ValueHash>,
        origin: Origin,
    ) -> usize {
        let added = self.counters.unique.merge(key, values);
        let raw = i64::try_from(added).unwrap_or(i64::MAX);
        self.counters.windows.with_cell(key, |c| c.fold(Aggregation::Sum, raw, 0));
        if added > 0 && !self.observers.is_empty() {
            self.tell_windows(key.customer, key.meter, origin, (0, 0), &[key]);
        }
        added
    }

    /// Applies what Redis says of an existing window (`pushed`, `others`) with
    /// `f`; `None` when the window is not held here. Observers hear of it when
    /// the total changed.
    pub fn update_shared<R>(&self, key: &CounterKey, origin: Origin, f: impl FnOnce(&WindowCell) -> R) -> Option<R> {
        let (r, before, after) = self.counters.windows.get(key, |cell| {
            let before = cell.used();
            let r = f(cell);
            (r, before, cell.used())
        })?;
        if !self.observers.is_empty() && before != after {
            self.tell_windows(key.customer, key.meter, origin, (0, 0), &[*key]);
        }
        Some(r)
    }

    /// Like [`UsageSeam::update_shared`], creating the window if needed.
    pub fn load_shared<R>(&self, key: CounterKey, origin: Origin, f: impl FnOnce(&WindowCell) -> R) -> R {
        let (r, before, after) = self.counters.windows.with_cell(key, |cell| {
            let before = cell.used();
            let r = f(cell);
            (r, before, cell.used())
        });
        if !self.observers.is_empty() && before != after {
            self.tell_windows(key.customer, key.meter, origin, (0, 0), &[key]);
        }
        r
    }

    /// Tells observers of a folded usage: every tracked window at its time.
    fn tell_usage(&self, usage: &Usage<'_>, origin: Origin) {
        let mut keys = [EMPTY_KEY; WindowKind::ALL.len()];
        let mut n = 0;
        for (slot, kind) in keys.iter_mut().zip(self.counters.tracked_kinds(usage.meter.id)) {
            *slot = Counters::key(usage.customer, usage.meter.id, kind, usage.ts, usage.anchor);
            n += 1;
        }
        self.tell_windows(usage.customer, usage.meter.id, origin, (usage.raw, usage.ts), &keys[..n]);
    }

    /// Reads the windows' totals and tells every observer (no allocation: a
    /// change touches at most one window per kind).
    fn tell_windows(&self, customer: CustomerId, meter: MeterId, origin: Origin, (raw, ts): (i64, i64), keys: &[CounterKey]) {
        let mut windows = [WindowTotal { key: EMPTY_KEY, local: 0, total: 0 }; WindowKind::ALL.len()];
        for (window, key) in windows.iter_mut().zip(keys) {
            let (local, total) =
                self.counters.windows.get(key, |c| (c.value.load(std::sync::atomic::Ordering::Acquire), c.used())).unwrap_or((0, 0));
            *window = WindowTotal { key: *key, local, total };
        }
        let change = UsageChange { customer, meter, origin, raw, ts, windows: &windows[..keys.len().min(windows.len())] };
        for observer in self.observers.iter() {
            observer.changed(&change);
        }
    }
}

/// A placeholder in the fixed-size key buffers above.
const EMPTY_KEY: CounterKey = CounterKey { customer: 0, meter: 0, kind: WindowKind::Total, start_ms: 0 };
