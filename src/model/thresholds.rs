//! Notification thresholds: the percents of a finite limit at which a
//! `limit.threshold` webhook fires (issue 17). A small `Copy` set, so a
//! [`super::Limit`] stays `Copy` and the notifier reads it without allocating.

use serde_json::Value;

/// At most this many thresholds per limit.
pub const MAX_THRESHOLDS: usize = 8;
/// The largest threshold, in percent.
pub const MAX_PERCENT: u16 = 1000;

/// Percents of a limit, strictly increasing, each in `1..=1000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Thresholds {
    len: u8,
    pcts: [u16; MAX_THRESHOLDS],
}

impl Thresholds {
    /// No thresholds (`notify = []`): the limit never notifies.
    pub const NONE: Thresholds = Thresholds { len: 0, pcts: [0; MAX_THRESHOLDS] };

    /// Builds a set from percents in any order (sorted and deduplicated);
    /// `Err` names the first problem.
    pub fn new(pcts: &[i64]) -> Result<Thresholds, String> {
        if pcts.len() > MAX_THRESHOLDS {
            return Err(format!("at most {MAX_THRESHOLDS} thresholds"));
        }
        let mut out = Thresholds::NONE;
        let mut sorted: Vec<u16> = Vec::with_capacity(pcts.len());
        for &p in pcts {
            match u16::try_from(p) {
                Ok(p) if (1..=MAX_PERCENT).contains(&p) => sorted.push(p),
                _ => return Err(format!("{p} must be a percent between 1 and {MAX_PERCENT}")),
            }
        }
        sorted.sort_unstable();
        sorted.dedup();
        for (slot, p) in out.pcts.iter_mut().zip(&sorted) {
            *slot = *p;
        }
        out.len = sorted.len() as u8;
        Ok(out)
    }

    /// Parses a JSON array of integers (a limit spec's `notify`).
    pub fn from_json(v: &Value) -> Result<Thresholds, String> {
        let Value::Array(items) = v else { return Err("must be an array of percents such as [75, 90, 100]".into()) };
        let mut pcts = Vec::with_capacity(items.len());
        for item in items {
            match item.as_i64() {
                Some(p) => pcts.push(p),
                None => return Err("must be an array of whole percents such as [75, 90, 100]".into()),
            }
        }
        Thresholds::new(&pcts)
    }

    /// The percents, ascending.
    pub fn as_slice(&self) -> &[u16] {
        &self.pcts[..usize::from(self.len)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The highest threshold reached by `used` of `limit` (raw units):
    /// `used * 100 >= p * limit`.
    pub fn highest_reached(&self, used: i64, limit: i64) -> Option<u16> {
        self.as_slice().iter().rev().copied().find(|&p| reached(used, limit, p))
    }

    /// The smallest usage that reaches the first threshold above `after`
    /// (`None`: no threshold left). Exact: `ceil(p * limit / 100)`.
    pub fn next_trigger(&self, after: Option<u16>, limit: i64) -> Option<i64> {
        let p = self.as_slice().iter().copied().find(|&p| after.is_none_or(|a| p > a))?;
        Some(trigger(limit, p))
    }
}

/// Whether `used` reaches `p` percent of `limit`.
pub fn reached(used: i64, limit: i64, p: u16) -> bool {
    i128::from(used) * 100 >= i128::from(p) * i128::from(limit)
}

/// The smallest usage reaching `p` percent of `limit` (saturating).
pub fn trigger(limit: i64, p: u16) -> i64 {
    let need = i128::from(p) * i128::from(limit);
    let t = if need <= 0 { need / 100 } else { (need + 99) / 100 };
    i64::try_from(t).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_deduplicated_and_bounded() {
        let t = Thresholds::new(&[100, 75, 90, 75]).unwrap_or_default();
        assert_eq!(t.as_slice(), &[75, 90, 100]);
        assert!(Thresholds::new(&[0]).is_err());
        assert!(Thresholds::new(&[1001]).is_err());
        assert!(Thresholds::new(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).is_err());
        assert!(Thresholds::from_json(&serde_json::json!([])).is_ok_and(|t| t.is_empty()));
        assert!(Thresholds::from_json(&serde_json::json!(["75"])).is_err());
    }

    #[test]
    fn highest_and_next_are_exact() {
        let t = Thresholds::new(&[75, 90, 100]).unwrap_or_default();
        assert_eq!(t.highest_reached(74, 100), None);
        assert_eq!(t.highest_reached(75, 100), Some(75));
        assert_eq!(t.highest_reached(95, 100), Some(90));
        assert_eq!(t.highest_reached(110, 100), Some(100));
        assert_eq!(t.next_trigger(None, 300), Some(225));
        assert_eq!(t.next_trigger(Some(75), 301), Some(271)); // 270.9 → 271
        assert_eq!(t.next_trigger(Some(100), 300), None);
        assert!(reached(271, 301, 90) && !reached(270, 301, 90));
    }
}
