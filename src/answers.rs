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
//! **Keeping to the caps costs no pass.** Each map is [`SHARDS`] shards, each
//! holding its share of the cap and its ids in the order they came. An insert
//! into a full shard drops that shard's oldest entry (so the oldest go first
//! within a shard: 1/256 of the ids, by hash), and entries past their age go
//! at the next insert or sweep that meets them. The sweep, with housekeeping,
//! only pops what expired from the front of each line. A former version swept
//! the whole table every ten seconds: 50–110 ms of a core at 20 k consumes/s,
//! at normal priority (issue 24).

use crate::dedupe::IdHash;
use crate::keyhash::KeyHash;
use crate::model::answer::{CheckAnswer, Reason};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// How long a whole answer is held (or the dedupe window, if shorter).
pub const RECENT_TTL_MS: i64 = 10 * 60 * 1000;
/// Most whole answers held (about 400 bytes each: ~100 MB).
pub const MAX_RECENT: usize = 1 << 18;
/// Most denials held (about 60 bytes each with their place in line: ~60 MB).
pub const MAX_DENIED: usize = 1 << 20;
/// Shards of each map: a consume locks one, and each holds at most its share
/// of the cap (1,024 whole answers, 4,096 denials), so no lock is held for
/// long and no map rehashes more than a few thousand entries at once.
pub const SHARDS: usize = 256;
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
    created_ms: i64,
    answer: AnswerCell,
}

/// A denied consume: when, and why.
#[derive(Clone, Copy)]
struct Denial {
    at_ms: i64,
    reason: Reason,
}

/// What the line of one shard needs to know of an entry.
trait Aged {
    fn at_ms(&self) -> i64;
    /// Kept past the caps and its age (an answer still being decided, for at
    /// most [`PIN_MS`] after `now`'s minus its creation).
    fn pinned(&self, now: i64) -> bool;
}

impl Aged for Slot {
    fn at_ms(&self) -> i64 {
        self.created_ms
    }
    fn pinned(&self, now: i64) -> bool {
        !self.answer.initialized() && self.created_ms >= now.saturating_sub(PIN_MS)
    }
}

impl Aged for Denial {
    fn at_ms(&self) -> i64 {
        self.at_ms
    }
    fn pinned(&self, _now: i64) -> bool {
        false
    }
}

/// One shard: the entries, and their ids in the order they came.
struct Shard<V> {
    map: HashMap<IdHash, V, KeyHash>,
    line: VecDeque<IdHash>,
}

/// A map of ids whose shards forget their oldest entries as new ones come:
/// past its share of the cap a shard drops its oldest on each insert, and
/// entries past their age are dropped by the insert or the tick's sweep that
/// finds them first. Keeping to the cap thus costs each insert about one
/// removal, never a pass over the whole map.
struct AgedMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    /// Each shard's share of the cap.
    cap: usize,
    /// Dropped before their age because a shard was at its cap.
    evicted: AtomicU64,
}

impl<V: Aged> AgedMap<V> {
    fn new(shards: usize, cap: usize) -> AgedMap<V> {
        let shards = shards.max(1);
        AgedMap {
            shards: (0..shards).map(|_| Mutex::new(Shard { map: HashMap::with_hasher(KeyHash), line: VecDeque::new() })).collect(),
            cap: cap / shards,
            evicted: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: IdHash) -> std::sync::MutexGuard<'_, Shard<V>> {
        // The id is already a hash: its high bits pick the shard.
        let i = ((id >> 64) as u64 % self.shards.len() as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops from the front of `s`'s line what is older than `cut` or over the
    /// cap (`room` more to come), handing each dropped entry to `gone`.
    fn trim(&self, s: &mut Shard<V>, now: i64, cut: i64, room: usize, mut gone: impl FnMut(V)) {
        let mut pinned_seen = 0;
        while let Some(&id) = s.line.front() {
            let over = s.map.len() + room > self.cap;
            let Some(v) = s.map.get(&id) else {
                s.line.pop_front();
                continue;
            };
            let old = v.at_ms() < cut;
            if !over && !old {
                break;
            }
            s.line.pop_front();
            if v.pinned(now) {
                // Being decided right now: to the back of the line, once.
                s.line.push_back(id);
                pinned_seen += 1;
                if pinned_seen >= s.line.len() {
                    break;
                }
                continue;
            }
            if let Some(v) = s.map.remove(&id) {
                if !old {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                gone(v);
            }
        }
    }

    /// The entry of `id` (made by `make` on first sight) through `read`.
    fn get_or_insert<T>(&self, id: IdHash, now: i64, cut: i64, make: impl FnOnce() -> V, read: impl FnOnce(&V) -> T) -> T {
        let mut s = self.shard(id);
        if let Some(v) = s.map.get(&id) {
            return read(v);
        }
        // At the cap this drops one entry: freed here, under the shard's lock
        // (one of 256), which costs less than carrying it out in a `Vec`.
        self.trim(&mut s, now, cut, 1, drop);
        let v = make();
        let got = read(&v);
        if self.cap > 0 || v.pinned(now) {
            s.map.insert(id, v);
            s.line.push_back(id);
        }
        got
    }

    fn read<T>(&self, id: IdHash, read: impl FnOnce(&V) -> T) -> Option<T> {
        self.shard(id).map.get(&id).map(read)
    }

    /// Drops what is older than `cut` in every shard; returns how many stay.
    fn sweep(&self, now: i64, cut: i64) -> usize {
        let mut left = 0;
        let mut freed = Vec::new();
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            // A sweep may drop thousands: freed once the lock is let go.
            self.trim(&mut s, now, cut, 0, |v| freed.push(v));
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
    recent: AgedMap<Slot>,
    denied: AgedMap<Denial>,
    limits: AnswerLimits,
    last_warned_ms: AtomicI64,
}

impl ConsumeAnswers {
    pub fn new(limits: AnswerLimits) -> ConsumeAnswers {
        ConsumeAnswers {
            recent: AgedMap::new(limits.shards, limits.max_recent),
            denied: AgedMap::new(limits.shards, limits.max_denied),
            limits,
            last_warned_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// The answer cell of `id` (created empty on first sight; the oldest
    /// answer of its shard goes if the shard is at its cap).
    pub fn cell(&self, id: IdHash, now: i64) -> AnswerCell {
        let cut = now.saturating_sub(self.limits.recent_ttl_ms);
        self.recent.get_or_insert(id, now, cut, || Slot { created_ms: now, answer: Arc::new(OnceCell::new()) }, |s| s.answer.clone())
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
            self.denied.get_or_insert(id, now, cut, || Denial { at_ms: now, reason: answer.reason }, |_| ());
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
        let denied = self.denied.sweep(now, now.saturating_sub(l.window_ms));
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
    async fn past_a_cap_the_oldest_go_first_and_are_counted() {
        let a = ConsumeAnswers::new(limits());
        for id in 0..25u128 {
            decide(&a, id, id as i64, id % 2 == 0).await;
        }
        let swept = a.sweep(30);
        assert_eq!(swept.recent, 10);
        assert_eq!(swept.evicted_recent, 15);
        assert!((15..25).all(|id| a.recent.read(id, |_| ()).is_some()), "the newest ten are kept");
        // Denied: the odd ids 1..=23 (12 of them); the newest four stay.
        assert_eq!(swept.denied, 4);
        assert_eq!(swept.evicted_denied, 8);
        assert!([17u128, 19, 21, 23].iter().all(|id| a.denial(*id, 30).is_some()));
        assert_eq!(a.denial(15, 30), None);
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
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 2, ..limits() });
        let abandoned = a.cell(1, 0);
        assert_eq!(a.sweep(PIN_MS).recent, 1, "within the minute it may still be decided");
        assert_eq!(a.sweep(PIN_MS + 1).recent, 0, "then it goes with its age");
        let abandoned_too = a.cell(2, 0);
        for id in 3..6u128 {
            decide(&a, id, PIN_MS + 1, true).await;
        }
        assert!(!Arc::ptr_eq(&abandoned_too, &a.cell(2, PIN_MS + 1)), "and with the cap");
        drop(abandoned);
    }

    #[tokio::test]
    async fn an_answer_being_decided_at_the_front_outlives_the_cap() {
        let a = ConsumeAnswers::new(AnswerLimits { max_recent: 2, ..limits() });
        let pending = a.cell(1, 0);
        for id in 2..10u128 {
            decide(&a, id, 0, true).await;
        }
        assert!(Arc::ptr_eq(&pending, &a.cell(1, 0)), "the undecided answer was kept");
        assert_eq!(a.len().0, 2, "the one being decided counts in the cap");
        assert!(a.cell(9, 0).initialized(), "with the newest");
    }
}
