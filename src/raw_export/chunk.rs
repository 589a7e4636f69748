//! Cutting the records waiting for export into INSERTs ("chunks") of at most a
//! given number of rows, and picking the rows of a chunk that ClickHouse does
//! not hold yet. Pure: the exporter (`super`) does the I/O.
//!
//! The records waiting are a queue; a position in it is a record and an event
//! of that record. A chunk runs from a start position to an end position
//! (exclusive) and may split a record (one batch may hold up to
//! `ingest.max_batch_events` events, more than one INSERT should carry). Once a
//! chunk is stored, the records before its end are done and leave the queue.

use std::collections::HashSet;

/// A place among the waiting records: event `event` of record `record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub record: usize,
    pub event: usize,
}

/// The end (exclusive) of the chunk starting at `start`, given each waiting
/// record's event count: at most `max_rows` events further on (at least one,
/// when there is one). An end at the end of a record is given as the start of
/// the next, so records with no events are passed over too.
pub fn end(counts: &[usize], start: Pos, max_rows: usize) -> Pos {
    let mut left = max_rows.max(1);
    let mut pos = start;
    while let Some(&count) = counts.get(pos.record) {
        let here = count.saturating_sub(pos.event);
        if here > left {
            pos.event += left;
            return pos;
        }
        left -= here;
        pos = Pos { record: pos.record + 1, event: 0 };
        if left == 0 {
            break;
        }
    }
    pos
}

/// The `(record, event)` pairs from `start` to `end` (exclusive), in order.
pub fn events(counts: &[usize], start: Pos, end: Pos) -> impl Iterator<Item = (usize, usize)> + '_ {
    (start.record..=end.record.min(counts.len().saturating_sub(1))).flat_map(move |r| {
        let from = if r == start.record { start.event } else { 0 };
        let to = if r == end.record { end.event } else { counts.get(r).copied().unwrap_or(0) };
        (from..to.max(from)).map(move |e| (r, e))
    })
}

/// Which of `keys` (a chunk's `(wal_seq, idx)`, in order) ClickHouse lacks.
pub fn missing(keys: &[(u64, u32)], stored: &HashSet<(u64, u32)>) -> Vec<bool> {
    keys.iter().map(|k| !stored.contains(k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos(record: usize, event: usize) -> Pos {
        Pos { record, event }
    }

    #[test]
    fn chunks_hold_at_most_max_rows_and_split_big_records() {
        let counts = [3, 5, 2];
        assert_eq!(end(&counts, pos(0, 0), 4), pos(1, 1), "record 1 is split");
        assert_eq!(end(&counts, pos(1, 1), 4), pos(2, 0), "exactly to a record's end: the next starts");
        assert_eq!(end(&counts, pos(2, 0), 4), pos(3, 0), "the rest");
        assert_eq!(end(&counts, pos(0, 0), 100), pos(3, 0));
        assert_eq!(end(&counts, pos(0, 2), 0), pos(1, 0), "at least one row");
        assert_eq!(end(&[], pos(0, 0), 4), pos(0, 0), "nothing waiting");
        // Records without events are passed over, not left waiting forever.
        assert_eq!(end(&[0, 0], pos(0, 0), 4), pos(2, 0));
        assert_eq!(events(&counts, pos(0, 2), pos(1, 2)).collect::<Vec<_>>(), vec![(0, 2), (1, 0), (1, 1)]);
        assert_eq!(events(&counts, pos(2, 0), pos(3, 0)).collect::<Vec<_>>(), vec![(2, 0), (2, 1)]);
        assert_eq!(events(&[0, 2], pos(0, 0), pos(2, 0)).collect::<Vec<_>>(), vec![(1, 0), (1, 1)]);
    }

    #[test]
    fn missing_rows_are_the_ones_not_stored() {
        let keys = [(7, 0), (7, 1), (8, 0), (8, 1)];
        let stored = HashSet::from([(7, 0), (7, 1), (8, 1), (9, 0)]);
        assert_eq!(missing(&keys, &stored), vec![false, false, true, false]);
        assert_eq!(missing(&keys, &HashSet::new()), vec![true; 4]);
    }

    proptest! {
        /// Chunk after chunk covers every event exactly once, in order, each
        /// chunk with at most `max` rows (at least one while any are left).
        #[test]
        fn chunks_cover_every_event_once(counts in proptest::collection::vec(0usize..7, 0..12), max in 1usize..9) {
            let all: Vec<(usize, usize)> = counts.iter().enumerate().flat_map(|(r, &n)| (0..n).map(move |e| (r, e))).collect();
            let mut seen = Vec::new();
            let mut at = Pos::default();
            while at.record < counts.len() {
                let next = end(&counts, at, max);
                let chunk: Vec<_> = events(&counts, at, next).collect();
                prop_assert!(chunk.len() <= max);
                prop_assert!(next != at, "progress");
                seen.extend(chunk);
                at = next;
            }
            prop_assert_eq!(seen, all);
        }
    }
}
