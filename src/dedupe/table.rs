//! The recent ids: a sharded, flat, open-addressing table in RAM.
//!
//! Ids are kept as 128-bit hashes (xxh3-128), not strings, so
//! an entry has a fixed size whatever the id's length. The set is a sharded,
//! flat, open-addressing table of `u128` slots: the top 96 bits of the hash as a
//! fingerprint and the acceptance minute in the low 32 bits. One probe is usually
//! one cache line, which matters because at millions of events per second the set
//! holds tens of millions of ids and every insert is a cache miss. A false
//! duplicate needs two ids to share 96 bits: at 100M live ids the chance is about
//! 10^-13. Entries older than the window are swept by the maintenance task; the
//! oldest are moved to disk runs when the table reaches its memory budget (see
//! the parent module).

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::pages::Pages;
use super::IdHash;

const SHARDS: usize = 256;
const MIN_CAPACITY: usize = 1024;

/// One shard: a power-of-two array of slots, 0 = empty, at most half full.
#[derive(Default)]
struct Shard {
    slots: Pages<u128>,
    len: usize,
    /// The run-set version whose ids were last moved out of this shard: a
    /// prober holding an older run set must reload it (see `Table::insert_with`).
    version: u64,
    /// No slot is older than this minute, so a sweep skips the shard until
    /// it expires (issue 24: the housekeeping sweep read every slot of the
    /// table, under each shard's lock, every ten seconds).
    oldest: OldestMinute,
}

/// A lower bound of a shard's slot minutes (`u32::MAX` when it has none).
#[derive(Clone, Copy)]
struct OldestMinute(u32);

impl Default for OldestMinute {
    fn default() -> OldestMinute {
        OldestMinute(u32::MAX)
    }
}

impl OldestMinute {
    fn note(&mut self, minute: u32) {
        self.0 = self.0.min(minute);
    }
}

/// Fingerprint of a hash: its top 96 bits (1 in the one-in-2^96 case that they
/// are all zero, since 0 marks an empty slot).
pub(super) fn tag(id: IdHash) -> u128 {
    (id >> 32).max(1)
}

/// Where a fingerprint's probe starts: its low bits (hash bits 32.., independent
/// of the top bits that pick the shard).
fn home_of(tag: u128, mask: usize) -> usize {
    (tag as usize) & mask
}

pub(super) fn slot(tag: u128, minute: u32) -> u128 {
    (tag << 32) | u128::from(minute)
}

pub(super) fn slot_tag(s: u128) -> u128 {
    s >> 32
}

pub(super) fn slot_minute(s: u128) -> u32 {
    s as u32
}

/// A slot array of `cap` empty slots, every page already written.
///
/// `calloc` hands out fresh pages that map the kernel's shared zero page: the
/// first probe (a read) maps it, the first insert (a write) then faults again to
/// copy it, and that copy-on-write flushes the TLB of every core running the
/// process by interrupt. Writing one word per page first makes each page a
/// single write fault with no flush (the profile of batched ingest had 6 % of
/// meterd's CPU in those copy-on-write faults and their TLB shootdowns).
fn zeroed_slots(cap: usize) -> Pages<u128> {
    const PER_PAGE: usize = 4096 / std::mem::size_of::<u128>();
    let mut slots: Pages<u128> = Pages::zeroed_on_heap(cap);
    let base = slots.as_mut_ptr();
    for i in (0..cap).step_by(PER_PAGE) {
        // SAFETY: `i < cap == slots.len()`, so the write is inside the
        // allocation; volatile so it is not dropped as storing a zero the
        // allocator already guarantees.
        unsafe { std::ptr::write_volatile(base.add(i), 0) };
    }
    slots
}

impl Shard {
    /// The index holding `tag`, or the empty slot where it would go.
    fn find(&self, id: IdHash) -> (usize, bool) {
        let mask = self.slots.len() - 1;
        let want = tag(id);
        let mut i = home_of(want, mask);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return (i, false);
            }
            if slot_tag(s) == want {
                return (i, true);
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        self.grow_to((self.slots.len() * 2).max(MIN_CAPACITY));
    }

    /// Moves the slots into a new array of `cap` (a power of two, more than
    /// twice the ids held).
    fn grow_to(&mut self, cap: usize) {
        let old = std::mem::replace(&mut self.slots, zeroed_slots(cap));
        self.len = 0;
        self.oldest = OldestMinute::default();
        for s in old.iter().copied().filter(|&s| s != 0) {
            self.put_slot(s);
        }
    }

    /// Re-inserts a slot (growth, sweep): its home comes from its fingerprint.
    fn put_slot(&mut self, s: u128) {
        let mask = self.slots.len() - 1;
        let mut i = home_of(slot_tag(s), mask);
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = s;
        self.len += 1;
        self.oldest.note(slot_minute(s));
    }

    /// Removes index `i` with backward-shift deletion (no tombstones).
    fn remove_at(&mut self, mut i: usize) {
        let mask = self.slots.len() - 1;
        self.slots[i] = 0;
        self.len -= 1;
        let mut j = (i + 1) & mask;
        loop {
            let s = self.slots[j];
            if s == 0 {
                return;
            }
            let home = home_of(slot_tag(s), mask);
            // Move `s` back into the hole if its home is not in (i, j].
            let between = if i <= j { i < home && home <= j } else { i < home || home <= j };
            if !between {
                self.slots[i] = s;
                self.slots[j] = 0;
                i = j;
            }
            j = (j + 1) & mask;
        }
    }
}

/// Where a shard's slots are, published for prefetching only: read without the
/// lock, so possibly stale, which is harmless because a prefetch never faults.
#[derive(Default)]
struct Hint {
    base: AtomicPtr<u128>,
    mask: AtomicUsize,
}

/// Ids accepted recently, with the minute each was accepted.
pub struct Table {
    shards: Box<[Mutex<Shard>]>,
    hints: Box<[Hint]>,
    window_minutes: u32,
}

/// How many ids ahead a batch prefetches: enough misses in flight to hide most
/// of the memory latency of a table far larger than the caches.
const PREFETCH_AHEAD: usize = 8;

pub(super) fn minute_of(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(60_000)).unwrap_or(u32::MAX)
}

impl Table {
    pub fn new(window_ms: i64) -> Table {
        let window_minutes = u32::try_from(window_ms.div_euclid(60_000).max(1)).unwrap_or(u32::MAX);
        Table {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hints: (0..SHARDS).map(|_| Hint::default()).collect(),
            window_minutes,
        }
    }

    fn shard_index(id: IdHash) -> usize {
        // Shard by the top bits; slots are placed by bits 32.. (see `home_of`).
        (id >> 120) as usize % SHARDS
    }

    fn shard(&self, id: IdHash) -> MutexGuard<'_, Shard> {
        self.shards[Self::shard_index(id)].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a shard's slot array after it moved (caller holds the lock).
    fn publish(&self, index: usize, shard: &mut Shard) {
        let hint = &self.hints[index];
        hint.base.store(shard.slots.as_mut_ptr(), Ordering::Release);
        hint.mask.store(shard.slots.len().saturating_sub(1), Ordering::Release);
    }

    /// Asks the CPU to start loading `id`'s home slot.
    fn prefetch(&self, id: IdHash) {
        let hint = &self.hints[Self::shard_index(id)];
        let base = hint.base.load(Ordering::Acquire);
        if base.is_null() {
            return;
        }
        let at = base.wrapping_add(home_of(tag(id), hint.mask.load(Ordering::Acquire)));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `_mm_prefetch` is only a hint: it never faults and reads nothing
        // into the program, so a stale or dangling address is harmless.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at as *const i8);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }

    /// [`Table::insert`] for a batch, with the table's cache misses overlapped:
    /// each id's slot is prefetched a few ids before it is probed.
    pub fn insert_batch(&self, ids: &[IdHash], now_ms: i64) -> Vec<bool> {
        self.insert_batch_with(ids, now_ms, |_, _, _| false)
    }

    /// [`Table::insert_with`] for a batch (prefetching as [`Table::insert_batch`]);
    /// `older(k, id, shard_version)` answers for `ids[k]`. The answers come in
    /// the caller's collection: a `Vec` for a batch, inline for one id.
    pub fn insert_batch_with<C: FromIterator<bool>>(
        &self,
        ids: &[IdHash],
        now_ms: i64,
        mut older: impl FnMut(usize, IdHash, u64) -> bool,
    ) -> C {
        for &id in ids.iter().take(PREFETCH_AHEAD) {
            self.prefetch(id);
        }
        ids.iter()
            .enumerate()
            .map(|(k, &id)| {
                if let Some(&ahead) = ids.get(k + PREFETCH_AHEAD) {
                    self.prefetch(ahead);
                }
                self.insert_with(id, now_ms, |version| older(k, id, version))
            })
            .collect()
    }

    /// Makes room at once for `n` more ids across the table, so that a
    /// restart putting millions back moves each shard's slots once, not at
    /// every doubling (growth was a fifth of a restart's CPU). A shard's share
    /// of ids set by hash strays from `n / SHARDS` by well under the sixteenth
    /// allowed; one that gets more simply grows again.
    pub fn reserve(&self, n: usize) {
        if n == 0 {
            return;
        }
        let share = n / SHARDS;
        let share = share + share / 16 + 64;
        for (index, lock) in self.shards.iter().enumerate() {
            let mut shard = lock.lock().unwrap_or_else(|p| p.into_inner());
            // At most half full, as `insert_with` keeps it.
            let cap = shard.len.saturating_add(share).saturating_mul(2).next_power_of_two().max(MIN_CAPACITY);
            if cap > shard.slots.len() {
                shard.grow_to(cap);
                self.publish(index, &mut shard);
            }
        }
    }

    /// The slots of every shard (tests: what `reserve` made room for).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).slots.len()).sum()
    }

    /// [`Table::insert`] of each `(id, accepted_ms)`, prefetched as
    /// [`Table::insert_batch`] (a restart puts back millions of ids, each a
    /// cache miss in a table far larger than the caches).
    pub fn insert_each_at(&self, entries: &[(IdHash, i64)]) {
        for &(id, _) in entries.iter().take(PREFETCH_AHEAD) {
            self.prefetch(id);
        }
        for (k, &(id, at_ms)) in entries.iter().enumerate() {
            if let Some(&(ahead, _)) = entries.get(k + PREFETCH_AHEAD) {
                self.prefetch(ahead);
            }
            self.insert(id, at_ms);
        }
    }

    fn expired(&self, minute: u32, now_minute: u32) -> bool {
        minute.saturating_add(self.window_minutes) < now_minute
    }

    /// Records `id` as accepted at `now_ms`; `false` if it already was (within the
    /// window). Atomic: of two racing callers exactly one gets `true`.
    pub fn insert(&self, id: IdHash, now_ms: i64) -> bool {
        self.insert_with(id, now_ms, |_| false)
    }

    /// [`Table::insert`], asking `older(shard_version)` — under the shard's lock,
    /// so atomically with the insert — whether an id absent from the table is a
    /// live one kept elsewhere (on disk). `shard_version` is the run-set version
    /// whose ids last left this shard: a caller holding an older run set must
    /// look at the current one.
    pub fn insert_with(&self, id: IdHash, now_ms: i64, older: impl FnOnce(u64) -> bool) -> bool {
        let now_minute = minute_of(now_ms);
        let mut shard = self.shard(id);
        if (shard.len + 1) * 2 > shard.slots.len() {
            shard.grow();
            self.publish(Self::shard_index(id), &mut shard);
        }
        let (i, found) = shard.find(id);
        if found {
            if self.expired(slot_minute(shard.slots[i]), now_minute) {
                // The table always holds an id's newest acceptance: anything
                // older on disk has expired too.
                shard.slots[i] = slot(tag(id), now_minute);
                shard.oldest.note(now_minute);
                return true;
            }
            return false;
        }
        if older(shard.version) {
            return false;
        }
        shard.slots[i] = slot(tag(id), now_minute);
        shard.len += 1;
        shard.oldest.note(now_minute);
        true
    }

    /// Whether `id` is in the table (live or not), without inserting it.
    pub fn contains(&self, id: IdHash) -> bool {
        let shard = self.shard(id);
        !shard.slots.is_empty() && shard.find(id).1
    }

    /// Forgets `id` (a consume that was refused and so recorded nothing);
    /// whether it was in the table.
    pub fn remove(&self, id: IdHash) -> bool {
        let mut shard = self.shard(id);
        if shard.slots.is_empty() {
            return false;
        }
        let (i, found) = shard.find(id);
        if found {
            shard.remove_at(i);
        }
        found
    }

    /// Drops ids older than the window, shard by shard; a shard whose oldest
    /// slot has not expired is not read.
    pub fn sweep(&self, now_ms: i64) {
        let now_minute = minute_of(now_ms);
        self.retain(|shard| self.expired(shard.oldest.0, now_minute), |s| !self.expired(slot_minute(s), now_minute), None);
    }

    /// Rebuilds every shard that `look` picks and that holds a slot `keep`
    /// refuses, without those; `version` (a spill) is recorded on every shard.
    fn retain(&self, look: impl Fn(&Shard) -> bool, keep: impl Fn(u128) -> bool, version: Option<u64>) {
        for (index, lock) in self.shards.iter().enumerate() {
            let mut shard = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = version {
                shard.version = v;
            }
            if !look(&shard) {
                continue;
            }
            let mut oldest = OldestMinute::default();
            let all_kept = shard.slots.iter().filter(|&&s| s != 0).all(|&s| {
                oldest.note(slot_minute(s));
                keep(s)
            });
            if all_kept {
                // The bound is exact now: the next sweep skips the shard until
                // its true oldest minute expires.
                shard.oldest = oldest;
                continue;
            }
            let live: Vec<u128> = shard.slots.iter().copied().filter(|&s| s != 0 && keep(s)).collect();
            let mut cap = MIN_CAPACITY;
            while live.len() * 2 >= cap {
                cap *= 2;
            }
            shard.slots = zeroed_slots(cap);
            shard.len = 0;
            shard.oldest = OldestMinute::default();
            for s in live {
                shard.put_slot(s);
            }
            self.publish(index, &mut shard);
        }
    }

    /// How many ids were accepted in each minute, oldest first.
    pub fn minutes(&self) -> std::collections::BTreeMap<u32, usize> {
        let mut out = std::collections::BTreeMap::new();
        for lock in self.shards.iter() {
            let shard = lock.lock().unwrap_or_else(|p| p.into_inner());
            for &s in shard.slots.iter().filter(|&&s| s != 0) {
                *out.entry(slot_minute(s)).or_insert(0) += 1;
            }
        }
        out
    }

    /// The slots of ids accepted at or before `minute` (unsorted).
    pub fn collect_upto(&self, minute: u32) -> Vec<u128> {
        let mut out = Vec::new();
        for lock in self.shards.iter() {
            let shard = lock.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.slots.iter().copied().filter(|&s| s != 0 && slot_minute(s) <= minute));
        }
        out
    }

    /// Drops the ids accepted at or before `minute` (they are on disk in the
    /// runs of set `version`, which must be published before this is called).
    pub fn drop_upto(&self, minute: u32, version: u64) {
        self.retain(|shard| shard.oldest.0 <= minute, |s| slot_minute(s) > minute, Some(version));
    }

    /// Bytes of slot arrays held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).slots.len() * std::mem::size_of::<u128>()).sum()
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::hash_id;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const MIN: i64 = 60_000;

    #[test]
    fn dedupes_within_window_only() {
        let d = Table::new(10 * MIN);
        let id = hash_id("evt-1");
        assert!(d.insert(id, 0));
        assert!(!d.insert(id, 5 * MIN));
        assert!(!d.insert(id, 10 * MIN));
        assert!(d.insert(id, 12 * MIN));
        assert_ne!(hash_id("a"), hash_id("b"));
        d.sweep(100 * MIN);
        assert!(d.is_empty());
    }

    #[test]
    fn a_sweep_drops_exactly_what_expired_whatever_shards_it_skips() {
        // Window 10 minutes: an id accepted in minute m expires in minute m + 11.
        let d = Table::new(10 * MIN);
        let early: Vec<IdHash> = (0..2_000).map(|i| hash_id(&format!("early-{i}"))).collect();
        let late: Vec<IdHash> = (0..2_000).map(|i| hash_id(&format!("late-{i}"))).collect();
        d.insert_batch(&early, 0);
        // Nothing expired: every shard is read once, and its bound made exact.
        d.sweep(10 * MIN);
        assert_eq!(d.len(), 2_000);
        d.insert_batch(&late, 5 * MIN);
        // The first minute the early ids are expired, every one goes.
        d.sweep(11 * MIN - 1);
        assert_eq!(d.len(), 4_000, "one minute early, nothing goes");
        d.sweep(11 * MIN);
        assert_eq!(d.len(), 2_000, "the early ids go in the first minute past the window");
        assert!(late.iter().all(|&id| d.contains(id)));
        d.sweep(16 * MIN - 1);
        assert_eq!(d.len(), 2_000);
        d.sweep(16 * MIN);
        assert!(d.is_empty());
        // A table never swept before: the bounds its inserts noted.
        let fresh = Table::new(10 * MIN);
        fresh.insert_batch(&early, 3 * MIN);
        fresh.sweep(14 * MIN - 1);
        assert_eq!(fresh.len(), 2_000);
        fresh.sweep(14 * MIN);
        assert!(fresh.is_empty());
    }

    #[test]
    fn a_reserved_table_takes_its_ids_without_growing_and_no_bigger_than_growth_makes_it() {
        let ids: Vec<IdHash> = (0..200_000u64).map(|i| crate::dedupe::hash_id(&format!("r-{i}"))).collect();
        let reserved = Table::new(60 * MIN);
        reserved.reserve(ids.len());
        let room = reserved.capacity();
        reserved.insert_each_at(&ids.iter().map(|&id| (id, 0)).collect::<Vec<_>>());
        assert_eq!(reserved.len(), ids.len());
        assert_eq!(reserved.capacity(), room, "no shard grew");
        let grown = Table::new(60 * MIN);
        grown.insert_batch(&ids, 0);
        assert!(room >= grown.capacity() && room <= 2 * grown.capacity(), "reserved {room}, grown {}", grown.capacity());
        // Nothing asked, nothing allocated.
        let empty = Table::new(60 * MIN);
        empty.reserve(0);
        assert_eq!(empty.capacity(), 0);
    }

    #[test]
    fn batch_insert_matches_single_inserts() {
        let a = Table::new(60 * MIN);
        let b = Table::new(60 * MIN);
        let ids: Vec<IdHash> = (0..5000).map(|i| hash_id(&format!("e{}", i % 3000))).collect();
        let single: Vec<bool> = ids.iter().map(|&id| a.insert(id, 0)).collect();
        assert_eq!(b.insert_batch(&ids, 0).as_slice(), single.as_slice());
        assert_eq!(single.iter().filter(|&&f| f).count(), 3000);
    }

    /// Runs `admit` on four threads at once over one table; the table and the
    /// number of ids the threads were told are fresh.
    fn race(admit: impl Fn(&Table, u64) -> usize + Sync) -> (Table, usize) {
        let d = Table::new(60 * MIN);
        let admitted = std::thread::scope(|s| {
            let (d, admit) = (&d, &admit);
            let handles: Vec<_> = (0..4_u64).map(|t| s.spawn(move || admit(d, t))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        (d, admitted)
    }

    #[test]
    fn racing_batches_admit_each_id_once() {
        let (d, admitted) = race(|d, t| {
            // Overlapping ranges, each batch with an id given twice.
            (0..40_u64)
                .map(|b| {
                    let mut ids: Vec<IdHash> = (0..500).map(|i| hash_id(&format!("id-{}", t * 5_000 + b * 500 + i))).collect();
                    ids.push(ids[7]);
                    d.insert_batch(&ids, 0).iter().filter(|&&f| f).count()
                })
                .sum()
        });
        // Thread t covers ids t*5000 .. t*5000+20000: 35,000 distinct in all.
        assert_eq!(admitted, 35_000);
        assert_eq!(d.len(), 35_000);
    }

    #[test]
    fn racing_inserts_admit_each_id_once() {
        let (d, admitted) = race(|d, _| (0..50_000).filter(|i| d.insert(hash_id(&format!("id-{i}")), 0)).count());
        assert_eq!(admitted, 50_000);
        assert_eq!(d.len(), 50_000);
    }

    proptest! {
        /// Against a model (a HashMap), under inserts, removes and sweeps at
        /// advancing times, the table answers the same; growth and backward-shift
        /// deletion keep every live id findable. Hashes are drawn from a small
        /// space so that probe chains collide and wrap.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0_u8..3, 0_u16..400, 0_i64..3), 1..3000)) {
            let window = 5 * MIN;
            let d = Table::new(window);
            let mut model: HashMap<u128, i64> = HashMap::new();
            let mut now = 0;
            for (op, key, advance) in ops {
                now += advance * MIN;
                // Same shard (top bits 0); homes cluster on 7 slots.
                let id = (u128::from(key % 7) << 32) | (u128::from(key) << 48);
                match op {
                    0 => {
                        let fresh = match model.get(&id) {
                            Some(&at) => at.div_euclid(MIN) + window / MIN < now.div_euclid(MIN),
                            None => true,
                        };
                        prop_assert_eq!(d.insert(id, now), fresh);
                        if fresh {
                            model.insert(id, now);
                        }
                    }
                    1 => {
                        d.remove(id);
                        model.remove(&id);
                    }
                    _ => {
                        d.sweep(now);
                        model.retain(|_, at| at.div_euclid(MIN) + window / MIN >= now.div_euclid(MIN));
                    }
                }
            }
            for (&id, &at) in model.iter() {
                if at.div_euclid(MIN) + window / MIN >= now.div_euclid(MIN) {
                    prop_assert!(!d.insert(id, now), "live id lost");
                }
            }
        }
    }
}
