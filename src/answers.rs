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
//!   24 bytes each, for the window: a retry is denied again, with the same
//!   reason and the figures as they stand.
//!
//! So the whole answer (what a retry gets byte for byte) is held only briefly:
//! [`RECENT_TTL_MS`], and at most [`MAX_RECENT`] of them. Denials are held for the
//! window, at most [`MAX_DENIED`]. Past a cap the oldest are forgotten first
//! (`meterd_consume_answers_evicted_total`); a retry of a forgotten denial is
//! decided anew. The sweep runs with housekeeping, once a flush tick, so between
//! sweeps a map may pass its cap by the consumes in between.

use crate::dedupe::IdHash;
use crate::keyhash::KeyHash;
use crate::model::answer::{CheckAnswer, Reason};
use dashmap::DashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tokio::sync::OnceCell;

/// How long a whole answer is held (or the dedupe window, if shorter).
pub const RECENT_TTL_MS: i64 = 10 * 60 * 1000;
/// Most whole answers held (about 400 bytes each: ~100 MB).
pub const MAX_RECENT: usize = 1 << 18;
/// Most denials held (24 bytes of entry each, ~50 MB with the table's slack).
pub const MAX_DENIED: usize = 1 << 20;
/// Shards of each map (a power of two, as DashMap needs). Not DashMap's 4 per
/// core: a shard grows by rehashing all its entries under its write lock, and
/// every consume inserts here, so a few large shards stalled consumes (issue 24).
const SHARDS: usize = 256;
/// Least time between two warnings that a cap was reached.
const WARN_EVERY_MS: i64 = 3_600_000;
/// Buckets of time the cap's cut is counted in.
const CUT_BUCKETS: usize = 4096;

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

/// The caps and lifetimes (constants in production; small in tests).
#[derive(Debug, Clone, Copy)]
pub struct AnswerLimits {
    pub recent_ttl_ms: i64,
    pub max_recent: usize,
    pub window_ms: i64,
    pub max_denied: usize,
}

impl AnswerLimits {
    /// The production limits for a dedupe window.
    pub fn for_window(window_ms: i64) -> AnswerLimits {
        AnswerLimits { recent_ttl_ms: RECENT_TTL_MS.min(window_ms), max_recent: MAX_RECENT, window_ms, max_denied: MAX_DENIED }
    }
}

/// What a sweep left and dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub recent: usize,
    pub denied: usize,
    /// Dropped before their time because a map was over its cap.
    pub evicted_recent: usize,
    pub evicted_denied: usize,
}

/// The remembered answers of consumes.
pub struct ConsumeAnswers {
    recent: DashMap<IdHash, Slot, KeyHash>,
    denied: DashMap<IdHash, Denial, KeyHash>,
    limits: AnswerLimits,
    last_warned_ms: AtomicI64,
}

impl ConsumeAnswers {
    pub fn new(limits: AnswerLimits) -> ConsumeAnswers {
        ConsumeAnswers {
            recent: DashMap::with_hasher_and_shard_amount(KeyHash, SHARDS),
            denied: DashMap::with_hasher_and_shard_amount(KeyHash, SHARDS),
            limits,
            last_warned_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// The answer cell of `id` (created empty on first sight).
    pub fn cell(&self, id: IdHash, now: i64) -> AnswerCell {
        self.recent.entry(id).or_insert_with(|| Slot { created_ms: now, answer: Arc::new(OnceCell::new()) }).answer.clone()
    }

    /// Why `id` was denied, if it was within the window and is still held.
    pub fn denial(&self, id: IdHash, now: i64) -> Option<Reason> {
        // One shard's read lock (not `is_empty`, which visits every shard).
        let d = *self.denied.get(&id)?;
        (d.at_ms >= now.saturating_sub(self.limits.window_ms)).then_some(d.reason)
    }

    /// Notes a decided answer: a denial is held for the window.
    pub fn decided(&self, id: IdHash, now: i64, answer: &CheckAnswer) {
        if !answer.allowed {
            self.denied.entry(id).or_insert(Denial { at_ms: now, reason: answer.reason });
        }
    }

    /// Whole answers and denials held.
    pub fn len(&self) -> (usize, usize) {
        (self.recent.len(), self.denied.len())
    }

    /// Forgets whole answers older than their lifetime and denials older than
    /// the window, then the oldest of either past its cap. An answer still
    /// being decided is kept whatever its age.
    pub fn sweep(&self, now: i64) -> Swept {
        let l = self.limits;
        // One read-only pass to find the cut, one `retain`: a second of consumes
        // over the cap is ~90k entries, and this runs every flush tick.
        let ttl_cut = now.saturating_sub(l.recent_ttl_ms);
        let cap_cut = oldest_cut(|| self.recent.iter().map(|e| e.created_ms).filter(|&t| t >= ttl_cut), l.max_recent);
        let mut evicted_recent = 0;
        // The answers dropped are freed on a lowered thread, not under the
        // shard locks consumes wait for (each is several allocations).
        let mut freed: Vec<AnswerCell> = Vec::new();
        self.recent.retain(|_, s| {
            let keep = (s.created_ms >= ttl_cut && cap_cut.is_none_or(|cut| s.created_ms > cut)) || !s.answer.initialized();
            if !keep {
                evicted_recent += usize::from(s.created_ms >= ttl_cut);
                freed.push(s.answer.clone());
            }
            keep
        });
        if !freed.is_empty() {
            crate::priority::drop_lowered(freed);
        }
        let window_cut = now.saturating_sub(l.window_ms);
        let cap_cut = oldest_cut(|| self.denied.iter().map(|e| e.at_ms).filter(|&t| t >= window_cut), l.max_denied);
        let mut evicted_denied = 0;
        self.denied.retain(|_, d| {
            let keep = d.at_ms >= window_cut && cap_cut.is_none_or(|cut| d.at_ms > cut);
            evicted_denied += usize::from(!keep && d.at_ms >= window_cut);
            keep
        });
        let swept = Swept { recent: self.recent.len(), denied: self.denied.len(), evicted_recent, evicted_denied };
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

/// The time at or below which entries go so that at most `cap` stay, or `None`
/// when there are no more than `cap`. Counted in at most [`CUT_BUCKETS`] buckets
/// of time (no copy of the times): the cut falls on a bucket's end, so it may
/// drop up to a bucket's worth more than needed (a few hundred milliseconds of
/// consumes when the entries span ten minutes), never fewer.
fn oldest_cut<I: Iterator<Item = i64>>(times: impl Fn() -> I, cap: usize) -> Option<i64> {
    let (mut n, mut lo, mut hi) = (0usize, i64::MAX, i64::MIN);
    for t in times() {
        n += 1;
        lo = lo.min(t);
        hi = hi.max(t);
    }
    if n <= cap {
        return None;
    }
    let width = ((hi - lo) / CUT_BUCKETS as i64 + 1).max(1);
    let mut counts = vec![0usize; CUT_BUCKETS + 1];
    for t in times() {
        counts[((t - lo) / width) as usize] += 1;
    }
    let mut left = n;
    for (i, c) in counts.iter().enumerate() {
        left -= c;
        if left <= cap {
            return Some(lo + (i as i64 + 1) * width - 1);
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AnswerLimits {
        AnswerLimits { recent_ttl_ms: 1_000, max_recent: 10, window_ms: 5_000, max_denied: 4 }
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
        assert!((15..25).all(|id| a.recent.contains_key(&id)), "the newest ten are kept");
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

    #[test]
    fn the_cut_keeps_at_most_the_cap() {
        assert_eq!(oldest_cut(|| [5, 1, 3].into_iter(), 3), None);
        assert_eq!(oldest_cut(|| [5, 1, 3, 2].into_iter(), 3), Some(1));
        // Ties at the cut go too: never more than the cap.
        assert_eq!(oldest_cut(|| [1, 1, 1, 2].into_iter(), 2), Some(1));
        // Over a long span the cut falls on a bucket's end: at most the cap stay,
        // and no more than a bucket's worth beyond the excess go.
        let times: Vec<i64> = (0..600_000).collect();
        let cut = oldest_cut(|| times.iter().copied(), 400_000).unwrap_or(i64::MAX);
        let stay = times.iter().filter(|&&t| t > cut).count();
        assert!(stay <= 400_000 && stay > 400_000 - 600_000 / CUT_BUCKETS - 1, "{stay} stay");
    }
}
