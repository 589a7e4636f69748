//! One `(customer, meter)` credit ledger: the grants and the usage charged to
//! them, burned down as API.md says. Time counts in whole minutes (usage is
//! charged at the start of its minute; a grant acts from the start of the
//! minute of its `effective_at` to the start of the minute of its `expires_at`
//! or void), the granularity the usage store keeps, so a ledger rebuilt from the
//! store after a restart is the ledger that was lost.
//!
//! The ledger is a simulation in time order: at each minute, grants that start
//! pay the unpaid overage first, then the minute's usage is taken from the
//! grants active then — lowest `priority`, earliest `expires_at` (none last),
//! earliest `effective_at`, then `id` — and what no grant covers is overage.
//! It runs incrementally: usage at or after the cursor advances it; late usage
//! whose minute sees the same active grants as the cursor is charged there (with
//! one set of active grants, the result depends only on the total taken); any
//! other change (a grant made or voided, late usage across a grant boundary)
//! marks the ledger for a full replay of its per-minute usage log.

use std::collections::BTreeMap;
use std::sync::Arc;

const MINUTE_MS: i64 = 60_000;

/// The start of the minute holding `ms`.
pub fn minute(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// One grant in a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerGrant {
    pub id: Arc<str>,
    /// Raw units granted.
    pub amount: i64,
    pub priority: i64,
    pub effective_ms: i64,
    pub expires_ms: Option<i64>,
    /// Raw units a void took away (see [`Ledger::void`]).
    pub voided: i64,
    /// Raw units not yet spent (what was left when it expired, for an expired one).
    pub remaining: i64,
}

impl LedgerGrant {
    pub fn new(id: Arc<str>, amount: i64, priority: i64, effective_ms: i64, expires_ms: Option<i64>) -> LedgerGrant {
        LedgerGrant { id, amount, priority, effective_ms, expires_ms, voided: 0, remaining: amount }
    }

    /// The minute it starts acting.
    pub fn start(&self) -> i64 {
        minute(self.effective_ms)
    }

    /// The minute it stops acting (expiry), if any.
    pub fn end(&self) -> Option<i64> {
        self.expires_ms.map(minute)
    }

    /// What it can pay: the amount less what a void took away.
    fn capacity(&self) -> i64 {
        self.amount.saturating_sub(self.voided).max(0)
    }

    /// Whether it acts at minute `t`.
    pub fn active_at(&self, t: i64) -> bool {
        self.start() <= t && self.end().is_none_or(|e| t < e)
    }

    /// The burn-down order key.
    fn order(&self) -> (i64, i64, i64, &str) {
        (self.priority, self.expires_ms.unwrap_or(i64::MAX), self.effective_ms, &self.id)
    }
}

/// The figures of a balance at one time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balance {
    /// Remaining of the active grants minus unpaid overage.
    pub balance: i64,
    /// Amount of the active grants.
    pub granted: i64,
    /// The earliest expiry among active grants with something left: (remaining
    /// expiring then, when).
    pub next_expiry: Option<(i64, i64)>,
}

/// Grants, overage and usage of one `(customer, meter)`.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Sorted in burn-down order.
    grants: Vec<LedgerGrant>,
    overage: i64,
    /// Everything up to this minute is applied (`i64::MIN`: nothing yet).
    cursor: i64,
    /// Usage per minute, for replays.
    log: BTreeMap<i64, i64>,
    dirty: bool,
    /// Every unit of usage seen (the "spent" total).
    used: i64,
    /// Crossing state for low / depleted alerts (see `super::alert`).
    pub(super) low_fired: bool,
    pub(super) depleted_fired: bool,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger { cursor: i64::MIN, ..Ledger::default() }
    }

    /// The grants, in burn-down order.
    pub fn grants(&self) -> &[LedgerGrant] {
        &self.grants
    }

    /// All usage seen, raw units.
    pub fn used(&self) -> i64 {
        self.used
    }

    /// Unpaid overage now (after [`Ledger::balance`] brought it up to date).
    pub fn overage(&self) -> i64 {
        self.overage
    }

    /// Adds (or replaces, by id) a grant; the ledger replays.
    pub fn put_grant(&mut self, grant: LedgerGrant) {
        self.grants.retain(|g| g.id != grant.id);
        let at = self.grants.partition_point(|g| g.order() < grant.order());
        self.grants.insert(at, grant);
        self.dirty = true;
    }

    /// What grant `id` has left at `now_ms`.
    pub fn remaining_of(&mut self, id: &str, now_ms: i64) -> Option<i64> {
        let _ = self.balance(now_ms);
        self.grants.iter().find(|g| &*g.id == id).map(|g| g.remaining)
    }

    /// Voids `raw` units of grant `id` (its remainder when voided): what it
    /// paid stays paid, it pays nothing more. False when there is no such grant.
    pub fn void(&mut self, id: &str, raw: i64) -> bool {
        match self.grants.iter_mut().find(|g| &*g.id == id) {
            Some(g) => {
                g.voided = raw.max(0);
                self.dirty = true;
                true
            }
            None => false,
        }
    }

    /// Charges `raw` units of usage at `ts_ms`.
    pub fn charge(&mut self, ts_ms: i64, raw: i64) {
        if raw == 0 {
            return;
        }
        let m = minute(ts_ms);
        *self.log.entry(m).or_insert(0) += raw;
        self.used = self.used.saturating_add(raw);
        if self.dirty {
            return;
        }
        if m >= self.cursor {
            self.advance(m);
            self.take(m, raw);
        } else if self.boundary_between(m, self.cursor) {
            self.dirty = true;
        } else {
            let at = self.cursor;
            self.take(at, raw);
        }
    }

    /// The balance at `now_ms` (or at the cursor, if usage already moved it later).
    pub fn balance(&mut self, now_ms: i64) -> Balance {
        if self.dirty {
            self.replay();
        }
        let t = minute(now_ms);
        if t > self.cursor {
            self.advance(t);
        }
        let t = self.cursor;
        let mut b = Balance { balance: -self.overage, ..Balance::default() };
        for g in self.grants.iter().filter(|g| g.active_at(t)) {
            b.balance = b.balance.saturating_add(g.remaining);
            b.granted = b.granted.saturating_add(g.capacity());
            if let (Some(exp), true) = (g.expires_ms, g.remaining > 0) {
                b.next_expiry = match b.next_expiry {
                    Some((amount, at)) if at == exp => Some((amount + g.remaining, at)),
                    Some((_, at)) if at < exp => b.next_expiry,
                    _ => Some((g.remaining, exp)),
                };
            }
        }
        b
    }

    /// Whether a grant starts or ends in `(from, to]`.
    fn boundary_between(&self, from: i64, to: i64) -> bool {
        self.grants.iter().any(|g| (from < g.start() && g.start() <= to) || g.end().is_some_and(|e| from < e && e <= to))
    }

    /// Moves the cursor to `t`: grants starting in `(cursor, t]` pay the
    /// overage first, in the order they start.
    fn advance(&mut self, t: i64) {
        if self.overage > 0 {
            let cursor = self.cursor;
            let mut starting: Vec<usize> =
                (0..self.grants.len()).filter(|&i| cursor < self.grants[i].start() && self.grants[i].start() <= t).collect();
            starting.sort_by_key(|&i| self.grants[i].start());
            for i in starting {
                let g = &mut self.grants[i];
                // A grant that ended before it could pay pays nothing.
                if g.end().is_some_and(|e| e <= g.start()) {
                    continue;
                }
                let pay = g.remaining.min(self.overage);
                g.remaining -= pay;
                self.overage -= pay;
            }
        }
        self.cursor = self.cursor.max(t);
    }

    /// Takes `raw` from the grants active at `t`, in order; the rest is overage.
    fn take(&mut self, t: i64, raw: i64) {
        // A negative amount (an adjustment, issue 19) gives back: unpaid
        // overage first, then the active grants last in spending order, each
        // up to its capacity.
        if raw < 0 {
            let mut back = raw.saturating_neg();
            let cleared = self.overage.min(back).max(0);
            self.overage -= cleared;
            back -= cleared;
            for g in self.grants.iter_mut().rev().filter(|g| g.active_at(t)) {
                let give = (g.capacity() - g.remaining).clamp(0, back);
                g.remaining += give;
                back -= give;
            }
            return;
        }
        let mut left = raw;
        for g in self.grants.iter_mut().filter(|g| g.active_at(t)) {
            if left == 0 {
                break;
            }
            let take = g.remaining.min(left);
            g.remaining -= take;
            left -= take;
        }
        self.overage = self.overage.saturating_add(left);
    }

    /// Replays every minute of usage from scratch (grants changed, or late usage
    /// crossed a boundary).
    fn replay(&mut self) {
        let until = self.cursor;
        for g in &mut self.grants {
            g.remaining = g.capacity();
        }
        self.overage = 0;
        self.cursor = i64::MIN;
        self.dirty = false;
        let log = std::mem::take(&mut self.log);
        for (&m, &raw) in &log {
            self.advance(m);
            self.take(m, raw);
        }
        self.log = log;
        if until > self.cursor {
            self.advance(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: i64 = MINUTE_MS;

    fn grant(id: &str, amount: i64, priority: i64, effective: i64, expires: Option<i64>) -> LedgerGrant {
        LedgerGrant::new(id.into(), amount, priority, effective, expires)
    }

    #[test]
    fn priority_then_expiry_then_effective_then_id() {
        let mut l = Ledger::new();
        l.put_grant(grant("b", 10, 10, 0, None));
        l.put_grant(grant("a", 10, 10, 0, None));
        l.put_grant(grant("c", 10, 10, 0, Some(100 * M)));
        l.put_grant(grant("d", 10, 5, M, None));
        l.put_grant(grant("e", 10, 10, -M, None));
        l.charge(2 * M, 15);
        let _ = l.balance(2 * M);
        let left: Vec<(&str, i64)> = l.grants().iter().map(|g| (&*g.id, g.remaining)).collect();
        assert_eq!(left, vec![("d", 0), ("c", 5), ("e", 10), ("a", 10), ("b", 10)]);
    }

    #[test]
    fn a_negative_charge_clears_overage_then_refills_grants_in_reverse() {
        let mut l = Ledger::new();
        l.put_grant(grant("a", 10, 1, 0, None));
        l.put_grant(grant("b", 10, 2, 0, None));
        l.charge(M, 25);
        assert_eq!(l.balance(M).balance, -5);
        l.charge(M, -7);
        assert_eq!(l.balance(M).balance, 2);
        let left: Vec<(&str, i64)> = l.grants().iter().map(|g| (&*g.id, g.remaining)).collect();
        assert_eq!(left, vec![("a", 0), ("b", 2)]);
        l.charge(2 * M, -18);
        assert_eq!(l.balance(2 * M).balance, 20, "back to the full grants");
    }

    #[test]
    fn overage_is_paid_first_by_a_later_grant_and_expiry_takes_the_rest() {
        let mut l = Ledger::new();
        l.put_grant(grant("g1", 10, 10, 0, Some(10 * M)));
        l.charge(M, 15);
        assert_eq!(l.balance(M).balance, -5);
        l.put_grant(grant("g2", 20, 10, 2 * M, None));
        assert_eq!(l.balance(2 * M), Balance { balance: 15, granted: 30, next_expiry: None });
        let mut l = Ledger::new();
        l.put_grant(grant("g1", 10, 10, 0, Some(10 * M)));
        l.charge(M, 4);
        assert_eq!(l.balance(10 * M - 1).next_expiry, Some((6, 10 * M)));
        assert_eq!(l.balance(10 * M).balance, 0, "expired at its minute");
    }

    /// The model: the same rules, computed from scratch in time order.
    fn model(grants: &[LedgerGrant], usage: &[(i64, i64)], now: i64) -> i64 {
        let mut gs: Vec<LedgerGrant> = grants.to_vec();
        gs.sort_by(|a, b| a.order().cmp(&b.order()));
        let mut times: Vec<i64> = gs.iter().map(|g| g.start()).chain(usage.iter().map(|u| minute(u.0))).filter(|&t| t <= now).collect();
        times.sort_unstable();
        times.dedup();
        let mut overage = 0i64;
        for t in times {
            for g in gs.iter_mut().filter(|g| g.start() == t && g.end().is_none_or(|e| e > t)) {
                let pay = g.remaining.min(overage);
                g.remaining -= pay;
                overage -= pay;
            }
            let mut left: i64 = usage.iter().filter(|u| minute(u.0) == t).map(|u| u.1).sum();
            for g in gs.iter_mut().filter(|g| g.active_at(t)) {
                let take = g.remaining.min(left);
                g.remaining -= take;
                left -= take;
            }
            overage += left;
        }
        let now = minute(now);
        gs.iter().filter(|g| g.active_at(now)).map(|g| g.remaining).sum::<i64>() - overage
    }

    proptest! {
        /// Grants and usage arriving in any order, reads in between: the
        /// ledger's balance is the model's.
        #[test]
        fn burn_down_matches_the_model(
            grants in proptest::collection::vec((1i64..50, 0i64..3, 0i64..20, proptest::option::of(1i64..20)), 0..6),
            usage in proptest::collection::vec((0i64..(30 * M), 1i64..30), 0..30),
            order in proptest::collection::vec(any::<u16>(), 40),
            reads in proptest::collection::vec(0i64..(30 * M), 0..5),
        ) {
            let grants: Vec<LedgerGrant> = grants
                .iter()
                .enumerate()
                .map(|(i, &(amount, priority, eff, dur))| grant(&format!("g{i}"), amount, priority, eff * M + 7, dur.map(|d| (eff + d) * M + 11)))
                .collect();
            // Arrival order: shuffled grants and usage.
            let mut steps: Vec<(u16, usize)> = (0..grants.len() + usage.len()).map(|i| (order[i % order.len()].wrapping_add(i as u16), i)).collect();
            steps.sort();
            let mut l = Ledger::new();
            for (n, (_, i)) in steps.iter().enumerate() {
                match grants.get(*i) {
                    Some(g) => l.put_grant(g.clone()),
                    None => {
                        let (ts, q) = usage[i - grants.len()];
                        l.charge(ts, q);
                    }
                }
                if let Some(&r) = reads.get(n) {
                    let _ = l.balance(r);
                }
            }
            let now = 40 * M;
            prop_assert_eq!(l.balance(now).balance, model(&grants, &usage, now));
        }
    }
}
