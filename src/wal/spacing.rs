//! Spacing between the WAL's syncs under load (issue 24).
//!
//! With `durability = "fsync"` every group of records costs one `pwrite` and
//! one `fdatasync`, and on a virtual disk each sync costs far more CPU than the
//! records in it: two notifications of the device (each an exit to the
//! hypervisor), an interrupt, and the sleep and wake of the writer and of the
//! kernel's block worker. A writer that syncs the moment the last sync returns
//! makes small groups at a moderate load (three records at 20 k consumes/s on
//! the benchmark machine) and pays that price thousands of times a second.
//!
//! So once a group held more than one record (the WAL is busy), the next
//! group's sync starts no sooner than the spacing after this one's started;
//! the records that arrive meanwhile join it. A record that finds the writer
//! after a lone record is taken at once: a light load never waits. Like
//! MySQL's `binlog_group_commit_sync_delay`, but only under load.
//!
//! A hold pays only for independent clients (an open load): they keep
//! sending while the writer waits. Clients that each send their next request
//! as soon as the last is answered (a closed loop: a small pool, a backfill)
//! have nothing more to send once they are all back, and a fixed hold made
//! every request of theirs wait it out (two such connections ran 3–4× slower
//! with 800 µs). So a hold ends early when the loop looks closed: once as
//! many records are in hand as the last group held (the sender whose record
//! makes that count wakes the writer, [`Recall`]), the writer watches for
//! `GRACE_GAPS` mean gaps between arrivals; if none comes, it takes the
//! group at once and holds no more for a pause (1 ms, doubled by each closed
//! loop found in a row, up to 128 ms); while arrivals keep coming, it watches
//! on, up to the spacing's end. A closed loop thus pays one probe per pause.
//! The same watch runs while the writer waits for that count: if no record
//! arrives for four mean gaps, the group is taken as a closed loop's too. A
//! closed loop that lost a client (one finished, or hung up) never brings the
//! count back, and would otherwise wait the spacing out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The least grace a writer gives arrivals once the last group's count is
/// back, whatever the gaps between them were.
const MIN_GRACE: Duration = Duration::from_micros(50);

/// How many mean gaps between arrivals a writer waits for the next before it
/// takes the silence for a closed loop: independent arrivals leave four mean
/// gaps empty about once in 55 (e^-4).
const GRACE_GAPS: u32 = 4;

/// When the writer may take its next group.
#[derive(Debug, Clone)]
pub struct Spacing {
    every: Duration,
    /// When the last group was taken, and how many records it held.
    last: Option<(Instant, usize)>,
    /// After a hold found a closed loop: no hold before this.
    quiet_until: Option<Instant>,
    /// How long the last closed loop found stopped the holds.
    quiet: Duration,
    /// Holds in a row that found independent clients.
    opens: u32,
}

/// How a hold ended (in the order of `telemetry::WAL_HOLD_ENDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The spacing ran out.
    Out,
    /// The last group's count came back and more kept coming: independent
    /// clients; held to the spacing's end.
    Open,
    /// Nothing came during a watch, once the last group's count was back or
    /// before: the same clients sending again as soon as answered (perhaps
    /// fewer of them than before).
    Closed,
}

/// The first pause of holds after a closed loop was found; each closed loop
/// found in a row doubles it, up to [`QUIET_MAX`].
const QUIET_MIN: Duration = Duration::from_millis(1);
const QUIET_MAX: Duration = Duration::from_millis(128);

/// Holds in a row that must find independent clients before the pause goes
/// back to its least: a closed loop of a few more clients than the last group
/// held finds some between its closed ones.
const OPENS_TO_FORGET: u32 = 4;

/// A hold: the writer waits at most `until`, and sooner once `back` records
/// (the last group's count) are in hand and no more come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// When the last group was taken: its records' answers went out after.
    pub since: Instant,
    pub until: Instant,
    pub back: usize,
}

impl Spacing {
    /// Groups at least `every` apart while busy (zero: never held).
    pub fn new(every: Duration) -> Spacing {
        Spacing { every, last: None, quiet_until: None, quiet: Duration::ZERO, opens: 0 }
    }

    /// Whether a writer that has a record in hand at `now` holds, and how.
    pub fn hold(&self, now: Instant) -> Option<Hold> {
        if self.quiet_until.is_some_and(|t| now < t) {
            return None;
        }
        match self.last {
            Some((started, records)) if records > 1 => {
                let until = started + self.every;
                (until > now).then_some(Hold { since: started, until, back: records })
            }
            _ => None,
        }
    }

    /// A group was taken at `at`.
    pub fn taken(&mut self, at: Instant) {
        self.last = Some((at, 0));
    }

    /// A hold that began at `now` ended so.
    pub fn ended(&mut self, now: Instant, outcome: Outcome) {
        match outcome {
            Outcome::Out => {}
            Outcome::Open => {
                self.opens += 1;
                if self.opens >= OPENS_TO_FORGET {
                    self.quiet = Duration::ZERO;
                }
            }
            Outcome::Closed => {
                self.opens = 0;
                self.quiet = (self.quiet * 2).clamp(QUIET_MIN, QUIET_MAX);
                self.quiet_until = Some(now + self.quiet);
            }
        }
    }

    /// The group taken last held `records` appends.
    pub fn held(&mut self, records: usize) {
        if let Some((_, n)) = self.last.as_mut() {
            *n = records;
        }
    }
}

/// How long a writer whose last group's count came back at `back_at`
/// watches for more arrivals: `GRACE_GAPS` of the mean gaps between the
/// arrivals since the last group was taken, at least `MIN_GRACE`, never
/// past the hold's end.
pub fn grace(hold: Hold, back_at: Instant) -> Duration {
    watch(hold.since, hold.back, back_at).min(hold.until.saturating_duration_since(back_at))
}

/// How long a writer that has seen `arrivals` records since the last group
/// was taken at `since` waits, from `now`, for the next before it takes the
/// silence for a closed loop: `GRACE_GAPS` mean gaps, at least `MIN_GRACE`.
pub fn watch(since: Instant, arrivals: usize, now: Instant) -> Duration {
    let arrivals = u32::try_from(arrivals.max(1)).unwrap_or(u32::MAX);
    let gap = now.saturating_duration_since(since) / arrivals;
    (gap * GRACE_GAPS).max(MIN_GRACE)
}

/// Shared by the WAL's senders and its writer: while the writer holds, the
/// sender whose record brings the queue to the count it waits for wakes it.
#[derive(Debug, Default)]
pub struct Recall {
    /// Queued records the held writer waits for (zero: not waiting).
    want: AtomicUsize,
    writer: OnceLock<Thread>,
}

impl Recall {
    /// Called on the writer's thread before it first holds.
    pub fn writer_is_this_thread(&self) {
        let _ = self.writer.set(std::thread::current());
    }

    /// A sender has queued a record; `queued` reads the queue's length. One
    /// relaxed load when the writer is not waiting.
    #[inline]
    pub fn queued(&self, queued: impl FnOnce() -> usize) {
        let want = self.want.load(Ordering::Relaxed);
        if want != 0 && queued() >= want && self.want.swap(0, Ordering::AcqRel) != 0 {
            if let Some(writer) = self.writer.get() {
                writer.unpark();
            }
        }
    }

    /// The writer waits for `want` queued records (zero: no longer).
    ///
    /// Sequentially consistent, because the writer reads the queue's length
    /// right after: a store that could pass that load (as a plain store may on
    /// x86) would let a sender that queued meanwhile read the old `want` (no
    /// wake) while the writer reads the old length (parks), and the hold would
    /// run to its end. The sender's side is the channel's push, a locked
    /// read-modify-write, before its load of `want`.
    pub fn wait_for(&self, want: usize) {
        self.want.store(want, Ordering::SeqCst);
    }

    /// Whether a sender has answered the writer's wait.
    pub fn answered(&self) -> bool {
        self.want.load(Ordering::Acquire) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    /// The writer counts a hold under `WAL_HOLD_ENDS[outcome as usize]`: the
    /// two lists must stay in step.
    #[test]
    fn each_outcome_is_counted_under_its_own_label() {
        let label = |o: Outcome| crate::telemetry::WAL_HOLD_ENDS.get(o as usize).copied();
        assert_eq!(label(Outcome::Out), Some("spacing"));
        assert_eq!(label(Outcome::Open), Some("open"));
        assert_eq!(label(Outcome::Closed), Some("closed"));
    }

    #[test]
    fn only_a_group_of_several_spaces_the_next() {
        let t0 = Instant::now();
        let mut s = Spacing::new(MS * 10);
        assert_eq!(s.hold(t0), None, "the first group is taken at once");
        s.taken(t0);
        s.held(1);
        assert_eq!(s.hold(t0 + MS), None, "after a lone record, at once");
        s.taken(t0 + MS);
        s.held(3);
        assert_eq!(
            s.hold(t0 + MS * 2),
            Some(Hold { since: t0 + MS, until: t0 + MS * 11, back: 3 }),
            "after a group of three: until 10ms after it started, or sooner once three are back"
        );
        assert_eq!(s.hold(t0 + MS * 11), None, "a group that started long ago holds nothing");
        assert_eq!(s.hold(t0 + MS * 30), None);
        s.taken(t0 + MS * 30);
        assert_eq!(s.hold(t0 + MS * 31), None, "a group with no appends (a checkpoint) spaces nothing");
        s.held(0);
        assert_eq!(s.hold(t0 + MS * 31), None);
    }

    #[test]
    fn zero_spacing_never_holds() {
        let t0 = Instant::now();
        let mut s = Spacing::new(Duration::ZERO);
        s.taken(t0);
        s.held(100);
        assert_eq!(s.hold(t0), None);
    }

    /// A group of `records` taken at `at`.
    fn busy(s: &mut Spacing, at: Instant, records: usize) {
        s.taken(at);
        s.held(records);
    }

    /// `n` holds 20 ms apart from `at`, each after a group of four, each
    /// ended as `outcome`.
    fn holds(s: &mut Spacing, at: &mut Instant, outcome: Outcome, n: usize) {
        for _ in 0..n {
            busy(s, *at, 4);
            s.ended(*at, outcome);
            *at += MS * 20;
        }
    }

    #[test]
    fn a_closed_loop_pauses_the_holds_longer_each_time_in_a_row() {
        let t0 = Instant::now();
        let mut s = Spacing::new(MS * 10);
        busy(&mut s, t0, 4);
        assert!(s.hold(t0 + MS).is_some());
        s.ended(t0 + MS, Outcome::Closed);
        assert_eq!(s.hold(t0 + MS + US * 999), None, "no hold for 1 ms after a closed loop");
        let t1 = t0 + MS * 2;
        busy(&mut s, t1, 4);
        assert!(s.hold(t1 + US).is_some(), "then a probe");
        s.ended(t1 + US, Outcome::Closed);
        assert_eq!(s.hold(t1 + MS * 2), None, "a second in a row: 2 ms");
        assert!(s.hold(t1 + US + MS * 2).is_some());
        let mut at = t1 + MS * 3;
        for _ in 0..20 {
            busy(&mut s, at, 4);
            s.ended(at, Outcome::Closed);
            at += QUIET_MAX;
        }
        // The last pause began at `at - QUIET_MAX`; a group taken since.
        busy(&mut s, at - MS, 4);
        assert_eq!(s.hold(at - US), None, "still paused");
        assert!(s.hold(at).is_some(), "never longer than 128 ms");
    }

    #[test]
    fn only_several_open_holds_in_a_row_forget_a_closed_loop() {
        let t0 = Instant::now();
        let mut s = Spacing::new(MS * 10);
        let mut at = t0;
        // Three closed loops in a row: a 4 ms pause.
        holds(&mut s, &mut at, Outcome::Closed, 3);
        // Open holds fewer than four in a row (a closed loop a little larger
        // than its groups) keep the pause growing.
        holds(&mut s, &mut at, Outcome::Open, 3);
        busy(&mut s, at, 4);
        s.ended(at, Outcome::Closed);
        assert_eq!(s.hold(at + MS * 8 - US), None, "the fourth closed loop: 8 ms");
        at += MS * 20;
        // Four open holds in a row: the next closed loop pauses 1 ms again.
        holds(&mut s, &mut at, Outcome::Open, 4);
        busy(&mut s, at, 4);
        s.ended(at, Outcome::Closed);
        busy(&mut s, at + MS, 4);
        assert!(s.hold(at + MS + US).is_some(), "1 ms, not 16");
        // A hold the spacing ended says nothing either way.
        s.ended(at + MS + US, Outcome::Out);
        busy(&mut s, at + MS * 2, 4);
        assert!(s.hold(at + MS * 2 + US).is_some());
    }

    #[test]
    fn the_grace_is_four_mean_gaps_within_bounds() {
        let t0 = Instant::now();
        let hold = Hold { since: t0, until: t0 + MS * 10, back: 10 };
        assert_eq!(grace(hold, t0 + MS), US * 400, "ten arrivals in 1 ms: 100 us apart");
        assert_eq!(grace(hold, t0 + US * 10), MIN_GRACE, "arrivals close together: the least grace");
        assert_eq!(grace(hold, t0 + MS * 9), MS, "never past the hold's end");
        assert_eq!(grace(Hold { back: 0, ..hold }, t0 + MS), MS * 4, "no count: one gap");
        assert_eq!(watch(t0, 2, t0 + MS * 3), MS * 6, "two arrivals in 3 ms: four gaps of 1.5 ms");
        assert_eq!(watch(t0, 1, t0 + US * 5), MIN_GRACE, "at least the least grace");
        assert_eq!(watch(t0, 1, t0 + MS * 30), MS * 120, "not bounded by a hold's end: the caller bounds it");
    }

    #[test]
    fn the_sender_that_brings_the_count_wakes_the_writer_once() {
        let recall = Recall::default();
        recall.queued(|| panic!("not waiting: the queue is not read"));
        recall.wait_for(3);
        recall.queued(|| 2);
        assert!(!recall.answered(), "two of three");
        recall.queued(|| 3);
        assert!(recall.answered(), "three: answered");
        recall.queued(|| panic!("answered: the queue is not read again"));
    }
}
