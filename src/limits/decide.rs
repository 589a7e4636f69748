//! The limit decision itself, free of any state: given each limit's window and
//! current usage, may `quantity` more be used? Kept pure so it is unit-tested and
//! benchmarked on its own.

use crate::model::{Limit, LimitAmount, Window};

/// The limits of one decision: one or two nearly always, held inline (issue 24:
/// one allocation per check and consume when it was a `Vec`).
pub type LimitStates = smallvec::SmallVec<[LimitState; 2]>;

/// One limit as it stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub limit: Limit,
    pub window: Window,
    /// Raw units used in the window.
    pub used: i64,
    /// Raw units reservations hold (issue 19): not usage, but counted against
    /// the limit like it.
    pub held: i64,
}

impl LimitState {
    /// Raw units left before the limit (`None` when unlimited), never negative;
    /// for credits, the balance (negative in overage). Holds count (issue 19).
    pub fn remaining(&self) -> Option<i64> {
        match self.limit.amount {
            LimitAmount::Unlimited => None,
            LimitAmount::Finite(l) => Some(l.saturating_sub(self.used).saturating_sub(self.held).max(0)),
            LimitAmount::Credits { granted, .. } => Some(granted.saturating_sub(self.used).saturating_sub(self.held)),
        }
    }

    /// Whether using `quantity` more would pass this limit.
    pub fn exceeded_by(&self, quantity: i64) -> bool {
        match self.limit.amount {
            LimitAmount::Unlimited => false,
            LimitAmount::Finite(l) | LimitAmount::Credits { granted: l, .. } => {
                self.used.saturating_add(self.held).saturating_add(quantity) > l
            }
        }
    }
}

pub use crate::model::Reason;

/// The outcome over all of a meter's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: Reason,
    /// The most constraining limit, which the answer's top-level fields describe.
    pub primary: usize,
}

/// Decides over every limit: all hard limits must allow.
///
/// The primary limit is the first hard limit exceeded if any; otherwise the finite
/// limit with the least headroom; otherwise the first (unlimited) one.
pub fn decide(states: &[LimitState], quantity: i64) -> Verdict {
    if states.is_empty() {
        return Verdict { allowed: false, reason: Reason::NotEntitled, primary: 0 };
    }
    let headroom = |s: &LimitState| match s.limit.amount {
        LimitAmount::Unlimited => i128::MAX,
        LimitAmount::Finite(l) | LimitAmount::Credits { granted: l, .. } => {
            i128::from(l) - i128::from(s.used) - i128::from(s.held) - i128::from(quantity)
        }
    };
    let least = |pred: &dyn Fn(&LimitState) -> bool| {
        states.iter().enumerate().filter(|(_, s)| pred(s)).min_by_key(|(_, s)| headroom(s)).map(|(i, _)| i)
    };
    if let Some(i) = least(&|s: &LimitState| s.limit.hard && s.exceeded_by(quantity)) {
        // A credits limit that refuses says so (issue 18).
        let reason = if states[i].limit.amount.is_credits() { Reason::InsufficientCredits } else { Reason::LimitExceeded };
        return Verdict { allowed: false, reason, primary: i };
    }
    if let Some(i) = least(&|s: &LimitState| !s.limit.hard && s.exceeded_by(quantity)) {
        return Verdict { allowed: true, reason: Reason::SoftLimitExceeded, primary: i };
    }
    match least(&|s: &LimitState| !matches!(s.limit.amount, LimitAmount::Unlimited)) {
        Some(i) => Verdict { allowed: true, reason: Reason::WithinLimit, primary: i },
        None => Verdict { allowed: true, reason: Reason::Unlimited, primary: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BillingAnchor, Enforcement, WindowKind};

    fn state(kind: WindowKind, amount: LimitAmount, hard: bool, used: i64) -> LimitState {
        LimitState {
            limit: Limit { window: kind, amount, hard, enforcement: Enforcement::Cached, notify: None },
            window: kind.bounds(0, BillingAnchor::default()),
            used,
            held: 0,
        }
    }

    #[test]
    fn interview_minutes() {
        let s = [state(WindowKind::Month, LimitAmount::Finite(300), true, 295)];
        assert_eq!(decide(&s, 10), Verdict { allowed: false, reason: Reason::LimitExceeded, primary: 0 });
        assert_eq!(decide(&s, 5), Verdict { allowed: true, reason: Reason::WithinLimit, primary: 0 });
        assert_eq!(s[0].remaining(), Some(5));
    }

    #[test]
    fn all_limits_must_allow_and_primary_is_most_constraining() {
        let s = [state(WindowKind::Month, LimitAmount::Finite(5), true, 1), state(WindowKind::Day, LimitAmount::Finite(2), true, 1)];
        assert_eq!(decide(&s, 1), Verdict { allowed: true, reason: Reason::WithinLimit, primary: 1 });
        assert_eq!(decide(&s, 2), Verdict { allowed: false, reason: Reason::LimitExceeded, primary: 1 });
    }

    #[test]
    fn credits_deny_below_the_quantity_and_soft_credits_overdraw() {
        let credits = |hard, granted, used| LimitState {
            limit: Limit {
                window: WindowKind::Total,
                amount: LimitAmount::Credits { granted, low_balance: None },
                hard,
                enforcement: Enforcement::Cached,
                notify: None,
            },
            window: WindowKind::Total.bounds(0, BillingAnchor::default()),
            used,
            held: 0,
        };
        let s = [credits(true, 100, 70), state(WindowKind::Minute, LimitAmount::Finite(60), true, 0)];
        assert_eq!(decide(&s, 30), Verdict { allowed: true, reason: Reason::WithinLimit, primary: 0 });
        assert_eq!(decide(&s, 31), Verdict { allowed: false, reason: Reason::InsufficientCredits, primary: 0 });
        let soft = [credits(false, 100, 120)];
        assert_eq!(decide(&soft, 1), Verdict { allowed: true, reason: Reason::SoftLimitExceeded, primary: 0 });
        assert_eq!(soft[0].remaining(), Some(-20));
    }

    #[test]
    fn soft_and_unlimited() {
        let soft = [state(WindowKind::Month, LimitAmount::Finite(10), false, 10)];
        assert_eq!(decide(&soft, 1), Verdict { allowed: true, reason: Reason::SoftLimitExceeded, primary: 0 });
        let unl = [state(WindowKind::Month, LimitAmount::Unlimited, true, 1_000_000)];
        assert_eq!(decide(&unl, 1), Verdict { allowed: true, reason: Reason::Unlimited, primary: 0 });
        assert_eq!(decide(&[], 1).reason, Reason::NotEntitled);
    }
}
