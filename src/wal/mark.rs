//! How far something downstream of the WAL (a store flush, a Redis sync) covers
//! it: every record up to `upto`, plus the ranges in `extras` above it.
//!
//! Batches are folded in the order their tasks run, not in sequence order: when
//! one group commit acknowledges records 9 and 10, record 10 may be folded (and
//! swapped out with an epoch) before record 9. The epoch then holds 10 but not 9,
//! so "everything up to 8" alone would make a replay count 10 twice. The mark
//! names 10 as an extra, and a replay skips it.

/// Why a stored mark could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("malformed WAL mark extras {0:?}: expected ranges like \"10-12,15-15\"")]
    Malformed(String),
}

/// Every WAL record `<= upto`, and every record inside one of `extras`
/// (inclusive ranges above `upto`, ascending, disjoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalMark {
    pub upto: u64,
    pub extras: Vec<(u64, u64)>,
}

impl WalMark {
    /// A mark with no extras.
    pub fn upto(upto: u64) -> WalMark {
        WalMark { upto, extras: Vec::new() }
    }

    /// Whether record `seq` is covered.
    pub fn covers(&self, seq: u64) -> bool {
        seq <= self.upto || self.extras.iter().any(|&(a, b)| a <= seq && seq <= b)
    }

    /// The extras as text, `"a-b,c-d"` (empty when none): how stores keep them.
    pub fn extras_text(&self) -> String {
        self.extras.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>().join(",")
    }

    /// Parses [`WalMark::extras_text`] output.
    pub fn parse_extras(text: &str) -> Result<Vec<(u64, u64)>, MarkError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let bad = || MarkError::Malformed(text.chars().take(200).collect());
        text.split(',')
            .map(|range| {
                let (a, b) = range.split_once('-').ok_or_else(bad)?;
                let (a, b) = (a.parse::<u64>().map_err(|_| bad())?, b.parse::<u64>().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                Ok((a, b))
            })
            .collect()
    }

    /// The mark of everything `<= max_acked` except `unfolded` (ascending).
    pub fn of(max_acked: u64, unfolded: impl IntoIterator<Item = u64>) -> WalMark {
        let mut unfolded = unfolded.into_iter().filter(|&s| s <= max_acked).peekable();
        let Some(first) = unfolded.next() else {
            return WalMark::upto(max_acked);
        };
        let mut mark = WalMark::upto(first - 1);
        let mut hole = first;
        loop {
            let next = unfolded.next();
            let end = next.map_or(max_acked, |n| n - 1);
            if end > hole {
                mark.extras.push((hole + 1, end));
            }
            match next {
                Some(n) => hole = n,
                None => return mark,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extras_are_the_folded_records_above_the_first_hole() {
        assert_eq!(WalMark::of(10, []), WalMark::upto(10));
        assert_eq!(WalMark::of(10, [9]), WalMark { upto: 8, extras: vec![(10, 10)] });
        assert_eq!(WalMark::of(10, [10]), WalMark::upto(9));
        assert_eq!(WalMark::of(20, [5, 6, 9, 15]), WalMark { upto: 4, extras: vec![(7, 8), (10, 14), (16, 20)] });
    }

    #[test]
    fn text_round_trips_and_bad_text_is_an_error() {
        let mark = WalMark { upto: 4, extras: vec![(7, 8), (10, 14)] };
        assert_eq!(WalMark::parse_extras(&mark.extras_text()).ok(), Some(mark.extras.clone()));
        assert_eq!(WalMark::parse_extras("").ok(), Some(vec![]));
        for bad in ["7", "7-", "a-b", "9-7", "1-2,,3-4"] {
            assert!(WalMark::parse_extras(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn covers_exactly_the_folded_records(max in 0u64..200, holes in proptest::collection::btree_set(1u64..200, 0..20)) {
            let mark = WalMark::of(max, holes.iter().copied());
            for seq in 1..=max + 5 {
                prop_assert_eq!(mark.covers(seq), seq <= max && !holes.contains(&seq), "seq {}", seq);
            }
        }
    }
}
