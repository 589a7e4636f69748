//! Remembered consume answers, bounded.
//!
//! A retried consume (same `id`) must get the same decision and record nothing
//! more. Remembering every answer for the whole dedupe window (24 h by default)
//! grows with traffic without bound: about 400 bytes per consume, 35 GB a day at
//! 1,000 consumes a second. Most of it is not needed:
//!
//! - *Allowed* consumes claimed their id in the dedupe set, which is exact and
//!   bounded for the whole window (it spills to disk). A retry whose answer is
//!   no longer held finds the id there and is answered "allowed, nothing
//!   recorded", with the figures as they stand.
//! - *Denied* consumes released their id (an event may still use it), so the
//!   dedupe set cannot tell a retry from a new consume. Their ids are kept here,
//!   about 60 bytes each, for the window: a retry is denied again, with the same
//!   reason and the figures as they stand.
//!
//! So the whole answer (what a retry gets byte for byte) is held only briefly:
//! [`RECENT_TTL_MS`], and at most [`MAX_RECENT`] of them. Denials are held for the
//! window, at most [`MAX_DENIED`]. Past a cap the oldest are forgotten first
//! (`meterd_consume_answers_evicted_total`); a retry of a forgotten denial is
//! decided anew.
//!
//! **Keeping to the caps costs no pass.** Whole answers live in a
//! set-associative table: an id's hash picks one of [`SHARDS`] shards (each
//! behind its own lock) and, in it, one set of [`WAYS`] entries, held inline
//! (id, time, cell). A new id takes an empty entry of its set, else one past its
//! age, else the oldest of the set's entries (counted as evicted). So a consume
//! touches one lock and one set, and the cap is the table's size. A former
//! version kept each shard's ids in a hash map with a line of their order, and
//! an insert at the cap looked up and removed the shard's oldest: several cache
//! misses a consume, the most of any function on a consume's path (issue 24,
//! sixteenth pass). The oldest *of the set* goes first, not the oldest of all:
//! an answer goes once four newer ids have landed in its set, which with
//! 65,536 sets at 50 k consumes/s takes about five seconds on average (under
//! one second for fewer than one answer in a hundred). The housekeeping
//! sweep scans only a shard whose oldest entry may be past its age. A consume
//! asks the CPU for its set ([`ConsumeAnswers::prefetch`]) as soon as it has its
//! id, and takes its cell once the request is validated.
//!
//! Denials keep strict order: each of their [`SHARDS`] shards holds its share
//! of the cap and its ids in the order they came; an insert into a full shard
//! drops that shard's oldest, and entries past their age go at the next insert
//! or sweep that meets them, popped from the front of the line. A former
//! version swept the whole table every ten seconds: 50–110 ms of a core at
//! 20 k consumes/s, at normal priority (issue 24).

use crate::dedupe::IdHash;
use crate::keyhash::KeyHash;
use crate::model::answer::{CheckAnswer, Reason};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// How long a whole answer is held (or the dedupe window, if shorter).
pub const RECENT_TTL_MS: i64 = 10 * 60 * 1000;
/// Most whole answers held (about 400 bytes each: ~100 MB, of which the
/// table's own entries are 8 MB, allocated at start).
pub const MAX_RECENT: usize = 1 << 18;
/// Most denials held (about 60 bytes each with their place in line: ~60 MB).
pub const MAX_DENIED: usize = 1 << 20;
/// Shards of each table: a consume locks one, and each holds at most its share
/// of the cap (1,024 whole answers, 4,096 denials), so no lock is held for
/// long and no map rehashes more than a few thousand entries at once.
pub const SHARDS: usize = 256;
/// Entries of a set of the whole-answer table (`Slots`): a new id may take
/// the place of any of them. Four entries of 32 bytes are two cache lines.
pub const WAYS: usize = 4;
/// Least time between two warnings that a cap was reached.
const WARN_EVERY_MS: i64 = 3_600_000;
/// How long an answer not yet decided is kept past the caps and its age: far
/// longer than a decision takes (Redis calls time out within seconds). A cell
/// left empty longer was abandoned (its decision failed and the client gave
/// up); it goes like any other, so abandoned cells cannot pile up.
const PIN_MS: i64 = 60_000;

/// The answer cell of one consume id: filled once by whoever decides first.
pub type AnswerCell = Arc<OnceCell<Arc<CheckAnswer>>>;

/// A consume's remembered answer, so a retry with the same id gets the same one.
struct Slot {
    id: IdHash,
    created_ms: i64,
    answer: AnswerCell,
}

impl Slot {
    /// Kept past the cap and its age: an answer still being decided, for at
    /// most [`PIN_MS`] after its creation.
    fn pinned(&self, now: i64) -> bool {
        !self.answer.initialized() && self.created_ms >= now.saturating_sub(PIN_MS)
    }
}

/// A denied consume: when, and why.
#[derive(Clone, Copy)]
struct Denial {
    at_ms: i64,
    reason: Reason,
}

/// One shard: the entries, and their ids in the order they came.
struct DenialShard {
    map: HashMap<IdHash, Denial, KeyHash>,
    line: VecDeque<IdHash>,
}

/// The denied consumes by id, in shards that forget their oldest entries as
/// new ones come: past its share of the cap a shard drops its oldest on each
/// insert, and entries past their age are dropped by the insert or the
/// tick's sweep that finds them first. Keeping to the cap thus costs each
/// insert about one removal, never a pass over the whole map.
struct Denials {
    shards: Box<[Mutex<DenialShard>]>,
    /// Each shard's share of the cap.
    cap: usize,
    /// Dropped before their age because a shard was at its cap.
    evicted: AtomicU64,
}

impl Denials {
    fn new(shards: usize, cap: usize) -> Denials {
        let shards = shards.max(1);
        Denials {
            shards: (0..shards).map(|_| Mutex::new(DenialShard { map: HashMap::with_hasher(KeyHash), line: VecDeque::new() })).collect(),
            cap: cap / shards,
            evicted: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: IdHash) -> std::sync::MutexGuard<'_, DenialShard> {
        // The id is already a hash: its high bits pick the shard.
        let i = ((id >> 64) as u64 % self.shards.len() as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops from the front of `s`'s line what is older than `cut` or over the
    /// cap (`room` more to come), handing each dropped entry to `gone`.
    fn trim(&self, s: &mut DenialShard, cut: i64, room: usize, mut gone: impl FnMut(Denial)) {
        while let Some(&id) = s.line.front() {
            let over = s.map.len() + room > self.cap;
            let Some(v) = s.map.get(&id) else {
                s.line.pop_front();
                continue;
            };
            let old = v.at_ms < cut;
            if !over && !old {
                break;
            }
            s.line.pop_front();
            if let Some(v) = s.map.remove(&id) {
                if !old {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                gone(v);
            }
        }
    }

    /// The entry of `id` (made by `make` on first sight) through `read`.
    fn get_or_insert<T>(&self, id: IdHash, cut: i64, make: impl FnOnce() -> Denial, read: impl FnOnce(&Denial) -> T) -> T {
        let mut s = self.shard(id);
        if let Some(v) = s.map.get(&id) {
            return read(v);
        }
        // At the cap this drops one entry: freed here, under the shard's lock
        // (one of 256), which costs less than carrying it out in a `Vec`.
        self.trim(&mut s, cut, 1, drop);
        let v = make();
        let got = read(&v);
        if self.cap > 0 {
            s.map.insert(id, v);
            s.line.push_back(id);
        }
        got
    }

    fn read<T>(&self, id: IdHash, read: impl FnOnce(&Denial) -> T) -> Option<T> {
        self.shard(id).map.get(&id).map(read)
    }

    /// Drops what is older than `cut` in every shard; returns how many stay.
    fn sweep(&self, cut: i64) -> usize {
        let mut left = 0;
        let mut freed = Vec::new();
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            // A sweep may drop thousands: freed once the lock is let go.
            self.trim(&mut s, cut, 0, |v| freed.push(v));
            left += s.map.len();
            drop(s);
            freed.clear();
        }
        left
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len()).sum()
    }
}

/// One set of the whole-answer table: the entries an id may take.
#[derive(Default)]
#[repr(align(64))]
struct Set([Option<Slot>; WAYS]);

// A set is two cache lines: an id's lookup reads those and nothing else.
const _: () = assert!(std::mem::size_of::<Set>() == 128);

/// One shard of the whole-answer table.
struct SlotShard {
    sets: Box<[Set]>,
    /// Entries held.
    held: usize,
    /// No entry held was created before this (`i64::MAX` when none is held):
    /// a sweep skips the shard while it is within the age.
    oldest_ms: i64,
}

/// The whole answers: [`SHARDS`] shards of sets of [`WAYS`] entries. An id's
/// hash picks its shard (high bits) and its set (low bits); a new id takes an
/// empty entry of its set, else one past its age, else the set's oldest. An
/// answer still being decided is never dropped; if every entry of the set is
/// one, the new answer is not held (a racing duplicate then finds its id in
/// the dedupe set instead).
struct Slots {
    shards: Box<[Mutex<SlotShard>]>,
    /// Where each shard's sets are (they never move), to prefetch a set
    /// without its lock; and how many sets each shard has.
    places: Box<[usize]>,
    sets: usize,
    /// Dropped before their age to make room.
    evicted: AtomicU64,
}

impl Slots {
    /// At most `cap` entries (at least one set per shard). Shards and sets
    /// per shard are powers of two (rounded down), so an id's place is found
    /// by masks, not divisions.
    fn new(shards: usize, cap: usize) -> Slots {
        let shards = floor_pow2(shards);
        let sets = floor_pow2(cap / shards / WAYS);
        let shards: Box<[Mutex<SlotShard>]> = (0..shards)
            .map(|_| {
                let sets: Box<[Set]> = (0..sets).map(|_| Set::default()).collect();
                Mutex::new(SlotShard { sets, held: 0, oldest_ms: i64::MAX })
            })
            .collect();
        let places = shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).sets.as_ptr() as usize).collect();
        Slots { shards, places, sets, evicted: AtomicU64::new(0) }
    }

    /// Asks the CPU to bring `id`'s set and its shard's lock into cache: a
    /// consume does so as soon as it has its id, and takes its cell after the
    /// request is validated, by when they are there (the set is the one cache
    /// miss a new id's cell cannot avoid). Reads nothing itself.
    fn prefetch(&self, id: IdHash) {
        let (i, j) = self.place(id);
        let (Some(base), Some(lock)) = (self.places.get(i), self.shards.get(i)) else { return };
        let set = base + j * std::mem::size_of::<Set>();
        prefetch(set);
        prefetch(set + 64);
        prefetch(lock as *const _ as usize);
    }

    /// The shard (from the hash's high bits) and the set in it (low bits) of `id`.
    fn place(&self, id: IdHash) -> (usize, usize) {
        (((id >> 64) as usize) & (self.shards.len() - 1), (id as usize) & (self.sets - 1))
    }

    /// `id`'s shard, locked, and the index of its set there.
    fn shard(&self, id: IdHash) -> (std::sync::MutexGuard<'_, SlotShard>, usize) {
        let (i, j) = self.place(id);
        (self.shards[i].lock().unwrap_or_else(|p| p.into_inner()), j)
    }

    /// The cell of `id`: its entry's if held and within the age (or still
    /// being decided), else a new one, which takes an entry of the set.
    fn cell(&self, id: IdHash, now: i64, cut: i64) -> AnswerCell {
        let (mut guard, j) = self.shard(id);
        let shard = &mut *guard;
        let Some(set) = shard.sets.get_mut(j) else {
            return Arc::new(OnceCell::new());
        };
        // Where the new entry goes: its own aged entry, else an empty one,
        // else one past its age, else the oldest; never one being decided.
        // Whether one is being decided is read from its cell, which is not in
        // the set's cache lines: only for the entry that would go.
        let mut order = [(u8::MAX, i64::MAX, 0usize); WAYS];
        for (i, entry) in set.0.iter().enumerate() {
            order[i] = match entry {
                Some(e) if e.id == id => {
                    if e.created_ms >= cut || e.pinned(now) {
                        return e.answer.clone();
                    }
                    // Its own aged entry first: an id is never held twice.
                    (0, e.created_ms, i)
                }
                None => (1, 0, i),
                Some(e) if e.created_ms < cut => (2, e.created_ms, i),
                Some(e) => (3, e.created_ms, i),
            };
        }
        order.sort_unstable();
        let cell: AnswerCell = Arc::new(OnceCell::new());
        let Some(&(rank, _, i)) = order.iter().find(|(_, _, i)| set.0[*i].as_ref().is_none_or(|e| e.id == id || !e.pinned(now))) else {
            return cell;
        };
        let gone = set.0[i].replace(Slot { id, created_ms: now, answer: cell.clone() });
        match (&gone, rank) {
            (None, _) => shard.held += 1,
            (Some(_), 3) => {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        shard.oldest_ms = shard.oldest_ms.min(now);
        // The dropped answer is freed once the lock is let go.
        drop(guard);
        drop(gone);
        cell
    }

    /// Drops the entries created before `cut` (but those still being
    /// decided) from every shard that may hold one; returns how many stay.
    fn sweep(&self, now: i64, cut: i64) -> usize {
        let mut left = 0;
        let mut freed = Vec::new();
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            if s.oldest_ms >= cut {
                left += s.held;
                continue;
            }
            let mut oldest = i64::MAX;
            for set in s.sets.iter_mut() {
                for entry in set.0.iter_mut() {
                    match entry {
                        Some(e) if e.created_ms < cut && !e.pinned(now) => freed.extend(entry.take()),
                        Some(e) => oldest = oldest.min(e.created_ms),
                        None => {}
                    }
                }
            }
            s.held -= freed.len().min(s.held);
            s.oldest_ms = oldest;
            left += s.held;
            drop(s);
            freed.clear();
        }
        left
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).held).sum()
    }

    #[cfg(test)]
    fn holds(&self, id: IdHash) -> bool {
        let (s, j) = self.shard(id);
        s.sets[j].0.iter().flatten().any(|e| e.id == id)
    }
}

/// The largest power of two not above `n` (one for zero).
fn floor_pow2(n: usize) -> usize {
    if n <= 1 {
        1
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// A hint to the CPU to load the cache line at `address` (no read, no fault:
/// any address will do).
#[inline]
fn prefetch(address: usize) {
    // SAFETY: `prefetch` needs SSE, which every x86-64 CPU has; it is a hint
    // that reads nothing and cannot fault, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// The caps and lifetimes (constants in production; small in tests).
#[derive(Debug, Clone, Copy)]
pub struct AnswerLimits {
    pub recent_ttl_ms: i64,
    pub max_recent: usize,
    pub window_ms: i64,
    pub max_denied: usize,
    /// Shards of each map; each holds at most its share of a cap.
    pub shards: usize,
}

impl AnswerLimits {
    /// The production limits for a dedupe window.
    pub fn for_window(window_ms: i64) -> AnswerLimits {
        AnswerLimits {
            recent_ttl_ms: RECENT_TTL_MS.min(window_ms),
            max_recent: MAX_RECENT,
            window_ms,
            max_denied: MAX_DENIED,
            shards: SHARDS,
        }
    }
}

/// What a sweep left, and what was dropped early since the last sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub recent: usize,
    pub denied: usize,
    /// Dropped before their time because a shard was at its cap.
    pub evicted_recent: usize,
    pub evicted_denied: usize,
}

/// The remembered answers of consumes.
pub struct ConsumeAnswers {
    recent: Slots,
    denied: Denials,
    limits: AnswerLimits,
    last_warned_ms: AtomicI64,
}

impl ConsumeAnswers {
    pub fn new(limits: AnswerLimits) -> ConsumeAnswers {
        ConsumeAnswers {
            recent: Slots::new(limits.shards, limits.max_recent),
            denied: Denials::new(limits.shards, limits.max_denied),
            limits,
            last_warned_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// The answer cell of `id` (created empty on first sight; the oldest
    /// answer of its set goes if the set is full).
    pub fn cell(&self, id: IdHash, now: i64) -> AnswerCell {
        self.recent.cell(id, now, now.saturating_sub(self.limits.recent_ttl_ms))
    }

    /// Brings the place of `id`'s whole answer into cache ahead of [`Self::cell`].
    pub fn prefetch(&self, id: IdHash) {
        self.recent.prefetch(id);
    }

    /// Why `id` was denied, if it was within the window and is still held.
    pub fn denial(&self, id: IdHash, now: i64) -> Option<Reason> {
        let d = self.denied.read(id, |d| *d)?;
        (d.at_ms >= now.saturating_sub(self.limits.window_ms)).then_some(d.reason)
    }

    /// Notes a decided answer: a denial is held for the window.
    pub fn decided(&self, id: IdHash, now: i64, answer: &CheckAnswer) {
        if !answer.allowed {
            let cut = now.saturating_sub(self.limits.window_ms);
            self.denied.get_or_insert(id, cut, || Denial { at_ms: now, reason: answer.reason }, |_| ());
        }
    }

    /// Whole answers and denials held.
    pub fn len(&self) -> (usize, usize) {
        (self.recent.len(), self.denied.len())
    }

    /// Forgets whole answers older than their lifetime and denials older than
    /// the window (the caps are kept by every insert), and reports. An answer
    /// still being decided is kept whatever its age. Costs a lock of each
    /// shard plus what it drops.
    pub fn sweep(&self, now: i64) -> Swept {
        let l = self.limits;
        let recent = self.recent.sweep(now, now.saturating_sub(l.recent_ttl_ms));
        let denied = self.denied.sweep(now.saturating_sub(l.window_ms));
        let evicted_recent = usize::try_from(self.recent.evicted.swap(0, Ordering::Relaxed)).unwrap_or(usize::MAX);
        let evicted_denied = usize::try_from(self.denied.evicted.swap(0, Ordering::Relaxed)).unwrap_or(usize::MAX);
        let swept = Swept { recent, denied, evicted_recent, evicted_denied };
        crate::telemetry::consume_answers(swept.recent, swept.denied, evicted_recent, evicted_denied);
        if evicted_recent + evicted_denied > 0 && now.saturating_sub(self.last_warned_ms.load(Ordering::Relaxed)) >= WARN_EVERY_MS {
            self.last_warned_ms.store(now, Ordering::Relaxed);
            tracing::warn!(
                evicted_answers = evicted_recent,
                evicted_denials = evicted_denied,
                max_answers = l.max_recent,
                max_denials = l.max_denied,
                "remembered consume answers reached their cap; the oldest were forgotten early (a retry of an allowed one is still \
                 answered from the dedupe ids; a retry of a forgotten denial is decided anew). Logged at most once an hour; \
                 see meterd_consume_answers_evicted_total"
            );
        }
        swept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AnswerLimits {
        AnswerLimits { recent_ttl_ms: 1_000, max_recent: 10, window_ms: 5_000, max_denied: 4, shards: 1 }
    }

    async fn decide(a: &ConsumeAnswers, id: IdHash, now: i64, allowed: bool) {
        let cell = a.cell(id, now);
        let got = cell
            .get_or_init(|| async {
                Arc::new(CheckAnswer::bare(allowed, if allowed { Reason::WithinLimit } else { Reason::LimitExceeded }))
            })
            .await;
        a.decided(id, now, got);
    }

    #[tokio::test]
    async fn a_retry_gets_the_same_cell_until_its_lifetime_ends() {
        let a = ConsumeAnswers::new(limits());
        decide(&a, 1, 0, true).await;
        assert!(a.cell(1, 500).initialized(), "within the lifetime the answer is held");
        a.sweep(1_000);
        assert!(a.cell(1, 1_000).initialized());
        a.sweep(1_001);
        assert!(!a.cell(1, 1_001).initialized(), "past it the whole answer is forgotten");
    }

    #[tokio::test]
    async fn denials_outlive_the_whole_answer_for_the_window() {
        let a = ConsumeAnswers::new(limits());
        decide(&a, 7, 0, false).await;
        decide(&a, 8, 0, true).await;
        a.sweep(2_000);
        assert_eq!(a.len(), (0, 1), "both whole answers went; the denial stays");
        assert_eq!(a.denial(7, 2_000), Some(Reason::LimitExceeded));
        assert_eq!(a.denial(8, 2_000), None, "allowed consumes are left to the dedupe ids");
        assert_eq!(a.denial(7, 5_001), None, "a denial older than the window is not used");
        a.sweep(5_001);
        assert_eq!(a.len().1, 0);
    }

    #[tokio::test]
    async fn past_a_cap_the_oldest_of_a_set_go_first_and_are_counted() {
        // One shard of two sets of four: even ids in one, odd in the other.
        let a = ConsumeAnswers::new(limits());
        for id in 0..25u128 {
            decide(&a, id, id as i64, id % 2 == 0).await;
        }
        let swept = a.sweep(30);
        assert_eq!(swept.recent, 8);
        assert_eq!(swept.evicted_recent, 17);
        assert!((17..25).all(|id| a.recent.holds(id)), "the newest four of each set are kept");
        assert!((0..17).all(|id| !a.recent.holds(id)));
        // Denied: the odd ids 1..=23 (12 of them); the newest four stay.
        assert_eq!(swept.denied, 4);
        assert_eq!(swept.evicted_denied, 8);
        assert!([17u128, 19, 21, 23].iter().all(|id| a.denial(*id, 30).is_some()));
        assert_eq!(a.denial(15, 30), None);
    }

    #[tokio::test]
    async fn a_new_id_takes_an_aged_entry_before_a_newer_one() {
        let a = ConsumeAnswers::new(limits());
        // Set 0 (even ids): one answer past its age, three within it.
        decide(&a, 0, 0, true).await;
        for id in [2u128, 4, 6] {
            decide(&a, id, 900, true).await;
        }
        decide(&a, 8, 1_500, true).await;
        assert!(!a.recent.holds(0), "the aged one made room");
        assert!([2u128, 4, 6, 8].iter().all(|id| a.recent.holds(*id)));
        assert_eq!(a.sweep(1_500).evicted_recent, 0, "an aged answer is not counted as evicted");
    }

    #[test]
    fn the_production_table_holds_exactly_the_cap() {
        let slots = Slots::new(SHARDS, MAX_RECENT);
        assert_eq!(slots.shards.len() * slots.sets * WAYS, MAX_RECENT);
        assert_eq!((floor_pow2(0), floor_pow2(1), floor_pow2(7), floor_pow2(8), floor_pow2(9)), (1, 1, 4, 8, 8));
        let odd = Slots::new(6, 100);
        assert_eq!((odd.shards.len(), odd.sets), (4, 4), "rounded down: never above the cap");
    }

    #[tokio::test]
    async fn an_id_past_its_age_takes_its_own_entry_again() {
        let a = ConsumeAnswers::new(limits());
        decide(&a, 0, 0, true).await;
        let renewed = a.cell(0, 1_500);
        assert!(!renewed.initialized(), "past its age: decided anew");
        assert_eq!(a.len().0, 1, "in its own entry, not a second one");
        assert!(Arc::ptr_eq(&renewed, &a.cell(0, 1_600)));
    }

    #[tokio::test]
    async fn a_sweep_drops_only_what_aged_and_keeps_track_of_the_rest() {
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 64, shards: 4, ..limits() });
        for id in 0..8u128 {
            decide(&a, id << 64 | id, 0, true).await;
            decide(&a, (id + 8) << 64 | (id + 8), 900, true).await;
        }
        assert_eq!(a.sweep(1_000).recent, 16, "nothing past its age yet");
        assert_eq!(a.sweep(1_500).recent, 8, "the answers made at 0 went");
        assert_eq!(a.sweep(1_900).recent, 8);
        assert_eq!(a.sweep(1_901).recent, 0, "then those made at 900: the shards' oldest moved on");
    }

    #[tokio::test]
    async fn an_answer_being_decided_is_never_swept() {
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 0, ..limits() });
        let pending = a.cell(3, 0);
        let swept = a.sweep(10_000);
        assert_eq!(swept.recent, 1);
        assert!(Arc::ptr_eq(&pending, &a.cell(3, 10_000)), "a racing duplicate still waits on the same cell");
    }

    #[tokio::test]
    async fn every_insert_keeps_the_cap_without_a_sweep() {
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 64, max_denied: 32, shards: 8, ..limits() });
        for id in 0..1_000u128 {
            // Ids spread over the shards as hashes do.
            decide(&a, id.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835), 0, id % 2 == 0).await;
            let (recent, denied) = a.len();
            assert!(recent <= 64 && denied <= 32, "{recent} answers and {denied} denials held after {id} consumes");
        }
        let swept = a.sweep(0);
        assert_eq!(swept.recent + swept.evicted_recent, 1_000, "each consume is either held or counted as evicted");
        assert_eq!(swept.denied + swept.evicted_denied, 500);
    }

    #[tokio::test]
    async fn an_answer_left_undecided_goes_after_a_minute() {
        // One set of four.
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 2, ..limits() });
        let abandoned = a.cell(1, 0);
        assert_eq!(a.sweep(PIN_MS).recent, 1, "within the minute it may still be decided");
        assert_eq!(a.sweep(PIN_MS + 1).recent, 0, "then it goes with its age");
        let abandoned_too = a.cell(2, 0);
        for id in 3..7u128 {
            decide(&a, id, PIN_MS + 1, true).await;
        }
        assert!(!Arc::ptr_eq(&abandoned_too, &a.cell(2, PIN_MS + 1)), "and makes room like any other");
        drop(abandoned);
    }

    #[tokio::test]
    async fn an_answer_being_decided_outlives_newer_ones() {
        // One set of four.
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 2, ..limits() });
        let pending = a.cell(1, 0);
        for id in 2..10u128 {
            decide(&a, id, 0, true).await;
        }
        assert!(Arc::ptr_eq(&pending, &a.cell(1, 0)), "the undecided answer was kept");
        assert_eq!(a.len().0, 4, "the one being decided counts in the set");
        assert!(a.cell(9, 0).initialized(), "with the newest");
    }

    #[tokio::test]
    async fn a_set_of_answers_all_being_decided_holds_no_more() {
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 4, ..limits() });
        let pending: Vec<AnswerCell> = (0..4u128).map(|id| a.cell(id, 0)).collect();
        let extra = a.cell(4, 0);
        assert!(!a.recent.holds(4), "not held");
        assert!(!Arc::ptr_eq(&extra, &a.cell(4, 0)), "a duplicate gets a cell of its own (the dedupe set decides it)");
        assert!((0..4u128).all(|id| a.recent.holds(id)));
        assert_eq!(a.len().0, 4);
        drop(pending);
    }
}
