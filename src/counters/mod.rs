//! In-memory counters: the window counters checks read and the minute buckets the
//! flusher drains, updated together so the two never disagree.
//!
//! Only the window kinds some plan (or some customer's override) uses for a meter
//! are tracked, as a per-meter bit set. Enabling a kind later seeds it for the
//! customer that needs it (see `limits::backfill`), under the buckets' exclusive
//! lock so no event is counted twice or missed.

pub mod buckets;
pub mod flat;
pub mod intern;
pub mod unique;
pub mod window;

/// Re-exported: the key hasher is a leaf, shared with the WAL.
pub use crate::keyhash as hash;

pub use buckets::{BucketKey, Buckets, Epoch, Properties};
pub use intern::{CustomerId, Interner};
pub use window::{CounterKey, WindowCounters};

use crate::model::{Aggregation, BillingAnchor, Catalog, Meter, MeterId, WindowKind};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One unit of usage to fold in: a validated event, or an allowed consume.
#[derive(Debug, Clone)]
pub struct Usage<'a> {
    pub customer: CustomerId,
    pub meter: &'a Meter,
    /// Raw units (for `count` meters: one unit per event).
    pub raw: i64,
    /// Event time, Unix milliseconds.
    pub ts: i64,
    /// Sorted by key; copied into a bucket only when the bucket is created.
    pub properties: &'a [(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)],
    pub props_hash: u64,
    /// The customer's billing anchor, for `billing_cycle` windows.
    pub anchor: BillingAnchor,
}

/// Hash of sorted properties; 0 when there are none. Stable within a process
/// (minute buckets are keyed by it), not across builds.
pub fn props_hash(properties: &[(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)]) -> u64 {
    if properties.is_empty() {
        return 0;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for (k, v) in properties {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish() | 1
}

const STRIPES: usize = 1024;

/// Window counters, minute buckets and the bookkeeping that ties them together.
pub struct Counters {
    pub interner: Interner,
    pub windows: WindowCounters,
    pub buckets: Buckets,
    /// Unique counts (issue 25): the distinct values of `unique_count` windows.
    pub unique: unique::UniqueSets,
    /// Per meter id up to the catalog's capacity: the bit set of window kinds tracked.
    tracked: Vec<AtomicU8>,
    /// Striped locks by (customer, meter): serialize multi-window consumes and
    /// `latest` updates (value and timestamp change together). Never global.
    stripes: Box<[Mutex<()>]>,
}

impl Counters {
    /// Tracks every window kind the catalog's plans use; buckets start at `next_seq`.
    pub fn new(catalog: &Catalog, next_seq: u64) -> Counters {
        // Laid out for meters added live too (config reload, issue 23).
        let tracked: Vec<AtomicU8> = (0..catalog.capacity()).map(|_| AtomicU8::new(0)).collect();
        for plan in catalog.plans() {
            for (meter, limits) in &plan.limits {
                for kind in limits.iter().map(|l| l.window) {
                    if let Some(bits) = tracked.get(usize::from(*meter)) {
                        bits.fetch_or(1 << kind.index(), Ordering::AcqRel);
                    }
                }
            }
        }
        Counters {
            interner: Interner::new(),
            windows: WindowCounters::default(),
            buckets: Buckets::new(next_seq),
            unique: unique::UniqueSets::default(),
            tracked,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Whether `kind` is tracked for `meter`.
    pub fn is_tracked(&self, meter: MeterId, kind: WindowKind) -> bool {
        self.tracked_bits(meter) & (1 << kind.index()) != 0
    }

    fn tracked_bits(&self, meter: MeterId) -> u8 {
        self.tracked.get(usize::from(meter)).map(|b| b.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// The tracked kinds of `meter`.
    pub fn tracked_kinds(&self, meter: MeterId) -> impl Iterator<Item = WindowKind> {
        let bits = self.tracked_bits(meter);
        WindowKind::ALL.into_iter().filter(move |k| bits & (1 << k.index()) != 0)
    }

    /// Starts tracking `kind` for `meter`. Call only while holding
    /// [`Buckets::exclusive`], after seeding the counters that need it.
    pub fn track(&self, meter: MeterId, kind: WindowKind) {
        if let Some(bits) = self.tracked.get(usize::from(meter)) {
            bits.fetch_or(1 << kind.index(), Ordering::AcqRel);
        }
    }

    /// The stripe lock of `(customer, meter)`.
    pub fn stripe(&self, customer: CustomerId, meter: MeterId) -> MutexGuard<'_, ()> {
        let i = (customer as usize).wrapping_mul(31).wrapping_add(usize::from(meter)) % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counter key of the `kind` window containing `at_ms`.
    pub fn key(customer: CustomerId, meter: MeterId, kind: WindowKind, at_ms: i64, anchor: BillingAnchor) -> CounterKey {
        CounterKey { customer, meter, kind, start_ms: kind.bounds(at_ms, anchor).start_ms }
    }

    /// Folds usage into buckets and every tracked window, except `skip` (a window
    /// a consume already added to with compare-and-swap). The caller holds
    /// `epoch` (a [`Buckets::write_guard`]) and, for `latest`, the stripe lock.
    pub fn fold(&self, epoch: &Epoch, usage: &Usage<'_>, skip: Option<WindowKind>) {
        let meter = usage.meter;
        epoch.fold(Self::bucket_key(usage), usage.properties, meter.aggregation, usage.raw, usage.ts);
        if meter.aggregation == Aggregation::UniqueCount {
            self.fold_unique(usage, skip);
            return;
        }
        for kind in self.tracked_kinds(meter.id) {
            if Some(kind) == skip {
                continue;
            }
            let key = Self::key(usage.customer, meter.id, kind, usage.ts, usage.anchor);
            self.windows.with_cell(key, |cell| cell.fold(meter.aggregation, usage.raw, usage.ts));
        }
    }

    /// Unique counts (issue 25): each window counts the usage's value once.
    /// A usage without the value (validation makes every event carry it)
    /// counts nothing in the windows.
    fn fold_unique(&self, usage: &Usage<'_>, skip: Option<WindowKind>) {
        let Some(value) = usage.meter.unique_value(usage.properties) else { return };
        let value = unique::hash_value(value);
        for kind in self.tracked_kinds(usage.meter.id) {
            if Some(kind) == skip {
                continue;
            }
            let key = Self::key(usage.customer, usage.meter.id, kind, usage.ts, usage.anchor);
            let new = i64::from(self.unique.insert(key, value));
            self.windows.with_cell(key, |cell| cell.fold(Aggregation::Sum, new, usage.ts));
        }
    }

    /// Folds a batch of usage: the ingest path.
    pub fn apply(&self, usages: &[Usage<'_>]) {
        self.apply_then(usages, || {});
    }

    /// Folds a batch, then runs `done` before letting an epoch swap happen: the
    /// WAL marks the batch folded there, so the swapped epoch's watermark never
    /// excludes a batch the epoch already holds.
    pub fn apply_then(&self, usages: &[Usage<'_>], done: impl FnOnce()) {
        let epoch = self.buckets.write_guard();
        if usages.len() <= SMALL_BATCH {
            // Too few to overlap anything: skip the key vectors' allocations.
            for usage in usages {
                let _stripe = (usage.meter.aggregation == Aggregation::Latest).then(|| self.stripe(usage.customer, usage.meter.id));
                self.fold(&epoch, usage, None);
            }
            done();
            return;
        }
        // Every key and its hash first (under the guard: the tracked kinds cannot
        // change meanwhile); then each map visits its keys shard by shard, one
        // lock per shard, prefetching slots ahead (the maps are far larger than
        // the caches once the dedupe table is, and each lookup was one
        // serialized cache miss). `latest` usages keep the one-at-a-time path:
        // their stripe lock comes before a map's lock, as everywhere else.
        let mut buckets = Vec::with_capacity(usages.len());
        let mut bucket_of = Vec::with_capacity(usages.len());
        let mut windows = Vec::with_capacity(usages.len());
        let mut window_of = Vec::with_capacity(usages.len());
        for (u, usage) in usages.iter().enumerate() {
            if usage.meter.aggregation == Aggregation::Latest {
                let _stripe = self.stripe(usage.customer, usage.meter.id);
                self.fold(&epoch, usage, None);
                continue;
            }
            if usage.meter.aggregation == Aggregation::UniqueCount {
                // Issue 25: sets decide what each window adds; one at a time.
                self.fold(&epoch, usage, None);
                continue;
            }
            let key = Self::bucket_key(usage);
            buckets.push((key, epoch.buckets.hash(&key)));
            bucket_of.push(u);
            for kind in self.tracked_kinds(usage.meter.id) {
                let key = Self::key(usage.customer, usage.meter.id, kind, usage.ts, usage.anchor);
                windows.push((key, self.windows.hash(&key)));
                window_of.push(u);
            }
        }
        epoch.buckets.with_each_hashed(&buckets, |i, bucket| {
            let u = &usages[bucket_of[i]];
            bucket.fold(u.properties, u.meter.aggregation, u.raw, u.ts);
        });
        self.windows.with_each_cell_hashed(&windows, |i, cell| {
            let u = &usages[window_of[i]];
            cell.fold(u.meter.aggregation, u.raw, u.ts);
        });
        done();
        drop(epoch);
    }

    fn bucket_key(usage: &Usage<'_>) -> BucketKey {
        BucketKey { customer: usage.customer, meter: usage.meter.id, minute: usage.ts.div_euclid(60_000), props_hash: usage.props_hash }
    }
}

/// Batches up to this size fold one usage at a time: too few keys to overlap
/// their cache misses, and the key vectors would cost more than they save.
const SMALL_BATCH: usize = 8;

/// Shared handle.
pub type SharedCounters = Arc<Counters>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Enforcement, Limit, LimitAmount, Plan};
    use std::collections::HashMap;

    fn catalog() -> Catalog {
        catalog_with(&[WindowKind::Day])
    }

    /// Meter 0 `m` (sum) and meter 1 `l` (latest), both limited in `windows`.
    fn catalog_with(windows: &[WindowKind]) -> Catalog {
        let meter = |id, name: &str, aggregation| Meter {
            id,
            name: name.into(),
            aggregation,
            precision: 0,
            stripe_event_name: None,
            unique_property: None,
            group_by: Vec::new(),
        };
        let limits: Arc<[Limit]> = windows
            .iter()
            .map(|&window| Limit { window, amount: LimitAmount::Finite(10), hard: true, enforcement: Enforcement::Cached, notify: None })
            .collect();
        let plan = Plan { name: "p".into(), features: Default::default(), limits: HashMap::from([(0, limits.clone()), (1, limits)]) };
        Catalog::new(vec![meter(0, "m", Aggregation::Sum), meter(1, "l", Aggregation::Latest)], vec![plan], 0)
    }

    #[test]
    fn folds_into_tracked_windows_and_buckets() {
        let catalog = catalog();
        let counters = Counters::new(&catalog, 1);
        assert!(counters.is_tracked(0, WindowKind::Day));
        assert!(!counters.is_tracked(0, WindowKind::Month));
        let meter = &catalog.meters()[0];
        let usage = |ts| Usage { customer: 7, meter, raw: 3, ts, properties: &[], props_hash: 0, anchor: BillingAnchor::default() };
        let day = 86_400_000;
        counters.apply(&[usage(day + 5), usage(day + 60_000), usage(2 * day + 1)]);
        let key = Counters::key(7, 0, WindowKind::Day, day + 10, BillingAnchor::default());
        assert_eq!(counters.windows.read(&key), 6);
        let next = Counters::key(7, 0, WindowKind::Day, 2 * day, BillingAnchor::default());
        assert_eq!(counters.windows.read(&next), 3);
        assert_eq!(counters.buckets.pending_len(), 3);
        let epoch = counters.buckets.take_for_flush(crate::wal::WalMark::default);
        assert_eq!(epoch.as_ref().map(|e| e.seq), Some(1));
        assert_eq!(counters.buckets.unflushed().len(), 2);
        counters.buckets.flushed(1);
        assert_eq!(counters.buckets.pending_len(), 0);
    }

    /// A batch takes the shard-by-shard path (its `latest` usages the
    /// one-at-a-time one); folding it must equal folding its usages one at a
    /// time (the short path), for every window and bucket.
    #[test]
    fn a_batch_folds_like_its_usages_one_by_one() {
        let catalog = catalog_with(&[WindowKind::Day, WindowKind::Month]);
        let (sum, latest) = (&catalog.meters()[0], &catalog.meters()[1]);
        let day = 86_400_000;
        let usages: Vec<Usage> = (0..500_u32)
            .map(|i| Usage {
                customer: i % 37,
                meter: if i % 4 == 0 { latest } else { sum },
                raw: i64::from(i % 5) + 1,
                ts: i64::from(i % 3) * day + i64::from(i) * 1000,
                properties: &[],
                props_hash: u64::from(i % 2),
                anchor: BillingAnchor::default(),
            })
            .collect();
        let batched = Counters::new(&catalog, 1);
        let single = Counters::new(&catalog, 1);
        batched.apply(&usages);
        for u in &usages {
            single.apply(std::slice::from_ref(u));
        }
        let windows = |c: &Counters| {
            let mut all = Vec::new();
            c.windows.for_each(|k, cell| all.push((*k, cell.used())));
            all.sort_by_key(|(k, _)| (k.customer, k.meter, k.kind.index(), k.start_ms));
            all
        };
        let buckets = |c: &Counters| {
            let mut all = Vec::new();
            c.buckets
                .write_guard()
                .buckets
                .for_each(|k, b| all.push((k.customer, k.meter, k.minute, k.props_hash, buckets::bucket_value(b))));
            all.sort();
            all
        };
        assert_eq!(windows(&batched), windows(&single));
        assert_eq!(buckets(&batched), buckets(&single));
        assert!(windows(&batched).iter().any(|(k, _)| k.kind == WindowKind::Month));
        assert!(windows(&batched).iter().any(|(k, _)| k.meter == 1));
        assert_eq!(
            windows(&batched).iter().filter(|(k, _)| k.kind == WindowKind::Day && k.meter == 0).map(|(_, v)| v).sum::<i64>(),
            usages.iter().filter(|u| u.meter.id == 0).map(|u| u.raw).sum::<i64>()
        );
    }

    /// Issue 15, point 4: a customer that went idle keeps no window counter
    /// once its windows ended, while its unflushed buckets stay until flushed;
    /// seen again, it folds into fresh windows exactly.
    #[test]
    fn an_idle_customers_ended_windows_are_evicted_but_its_buckets_wait_for_the_flush() {
        let catalog = catalog_with(&[WindowKind::Day]);
        let counters = Counters::new(&catalog, 1);
        let meter = &catalog.meters()[0];
        let usage = |customer, ts| Usage { customer, meter, raw: 2, ts, properties: &[], props_hash: 0, anchor: BillingAnchor::default() };
        let day = 86_400_000;
        counters.apply(&[usage(1, 10), usage(1, 20), usage(2, 30), usage(2, day + 5)]);
        assert_eq!(counters.windows.len(), 3);
        let end_of = |k: &CounterKey| k.kind.bounds(k.start_ms, BillingAnchor::default()).end_ms;
        // Cutoff inside day 1: day 0's windows ended, day 1's did not.
        assert_eq!(counters.windows.retain_ending_after(day + 1, end_of), 2);
        assert_eq!(counters.windows.len(), 1);
        assert_eq!(counters.windows.read(&Counters::key(2, 0, WindowKind::Day, day, BillingAnchor::default())), 2);
        assert_eq!(counters.windows.read(&Counters::key(1, 0, WindowKind::Day, 0, BillingAnchor::default())), 0);
        // The buckets of the evicted windows are still there for the flusher.
        assert_eq!(counters.buckets.pending_len(), 3);
        let mut minute_zero = 0;
        counters.buckets.write_guard().buckets.for_each(|k, b| {
            if k.minute == 0 {
                minute_zero += buckets::bucket_value(b).0;
            }
        });
        assert_eq!(minute_zero, 6);
        // Customer 1 comes back the next day: a fresh window, exact.
        counters.apply(&[usage(1, day + 7), usage(1, day + 8), usage(1, day + 9)]);
        assert_eq!(counters.windows.read(&Counters::key(1, 0, WindowKind::Day, day, BillingAnchor::default())), 6);
        assert_eq!(counters.windows.retain_ending_after(day + 2, end_of), 0);
        assert_eq!(counters.windows.retain_ending_after(2 * day + 1, end_of), 2);
        assert!(counters.windows.is_empty());
    }

    /// Issue 25: a batch of a `unique_count` meter (long enough for the batch
    /// path) adds one per value new to each window; buckets count events.
    #[test]
    fn a_unique_count_window_counts_each_value_once() {
        let meter = Meter {
            id: 0,
            name: "u".into(),
            aggregation: Aggregation::UniqueCount,
            precision: 0,
            stripe_event_name: None,
            unique_property: Some("user".into()),
            group_by: Vec::new(),
        };
        let limits: Arc<[Limit]> = [WindowKind::Day, WindowKind::Month]
            .into_iter()
            .map(|window| Limit { window, amount: LimitAmount::Finite(10), hard: true, enforcement: Enforcement::Cached, notify: None })
            .collect();
        let plan = Plan { name: "p".into(), features: Default::default(), limits: HashMap::from([(0, limits)]) };
        let catalog = Catalog::new(vec![meter], vec![plan], 0);
        let counters = Counters::new(&catalog, 1);
        let meter = &catalog.meters()[0];
        let props: Vec<Vec<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)>> =
            (0..40).map(|i| vec![("user".into(), format!("u{}", i % 7).into())]).collect();
        let day = 86_400_000;
        let usages: Vec<Usage> = props
            .iter()
            .enumerate()
            .map(|(i, p)| Usage {
                customer: 1,
                meter,
                raw: 1,
                // Days 40 and 41 of the same month: the month sees 7 values, each day its own.
                ts: (40 + (i as i64 % 2)) * day + 1000,
                properties: p,
                props_hash: props_hash(p),
                anchor: BillingAnchor::default(),
            })
            .collect();
        counters.apply(&usages);
        counters.apply(&usages[..3]);
        let read = |kind, ts| counters.windows.read(&Counters::key(1, 0, kind, ts, BillingAnchor::default()));
        assert_eq!(read(WindowKind::Month, 40 * day), 7);
        assert_eq!(read(WindowKind::Day, 40 * day), 7);
        assert_eq!(read(WindowKind::Day, 41 * day), 7);
        let mut events = 0;
        counters.buckets.write_guard().buckets.for_each(|_, b| events += buckets::bucket_value(b).0);
        assert_eq!(events, 43);
        assert_eq!(counters.unique.values(), 21);
    }

    #[test]
    fn add_within_never_exceeds_the_limit_under_a_race() {
        let counters = Arc::new(Counters::new(&catalog(), 1));
        let key = CounterKey { customer: 1, meter: 0, kind: WindowKind::Day, start_ms: 0 };
        let granted: usize = (0..4)
            .map(|_| {
                let c = counters.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| c.windows.add_within(key, 3, 1000).is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .sum();
        assert_eq!(granted, 333);
        assert_eq!(counters.windows.read(&key), 999);
    }
}
