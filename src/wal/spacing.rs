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
//! Off by default: a few clients that each send their next request as soon as
//! the last is answered (a small pool, a backfill) find every group of theirs
//! held, and each request takes the spacing. Two such connections ran 3–4×
//! slower with 800 µs. It pays for many independent clients.

use std::time::{Duration, Instant};

/// When the writer may take its next group.
#[derive(Debug, Clone)]
pub struct Spacing {
    every: Duration,
    /// When the last group was taken, and how many records it held.
    last: Option<(Instant, usize)>,
}

impl Spacing {
    /// Groups at least `every` apart while busy (zero: never held).
    pub fn new(every: Duration) -> Spacing {
        Spacing { every, last: None }
    }

    /// How long a writer that has a record in hand at `now` waits before it
    /// takes its group.
    pub fn hold(&self, now: Instant) -> Duration {
        match self.last {
            Some((started, records)) if records > 1 => (started + self.every).saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    /// A group was taken at `at`.
    pub fn taken(&mut self, at: Instant) {
        self.last = Some((at, 0));
    }

    /// The group taken last held `records` appends.
    pub fn held(&mut self, records: usize) {
        if let Some((_, n)) = self.last.as_mut() {
            *n = records;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn only_a_group_of_several_spaces_the_next() {
        let t0 = Instant::now();
        let mut s = Spacing::new(MS * 10);
        assert_eq!(s.hold(t0), Duration::ZERO, "the first group is taken at once");
        s.taken(t0);
        s.held(1);
        assert_eq!(s.hold(t0 + MS), Duration::ZERO, "after a lone record, at once");
        s.taken(t0 + MS);
        s.held(3);
        assert_eq!(s.hold(t0 + MS * 2), MS * 9, "after a group of three: until 10ms after it started");
        assert_eq!(s.hold(t0 + MS * 11), Duration::ZERO, "a group that started long ago holds nothing");
        assert_eq!(s.hold(t0 + MS * 30), Duration::ZERO);
        s.taken(t0 + MS * 30);
        assert_eq!(s.hold(t0 + MS * 31), Duration::ZERO, "a group with no appends (a checkpoint) spaces nothing");
        s.held(0);
        assert_eq!(s.hold(t0 + MS * 31), Duration::ZERO);
    }

    #[test]
    fn zero_spacing_never_holds() {
        let t0 = Instant::now();
        let mut s = Spacing::new(Duration::ZERO);
        s.taken(t0);
        s.held(100);
        assert_eq!(s.hold(t0), Duration::ZERO);
    }
}
