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
    /// Raw units it paid before the ledger's compacted horizon (issue 15:
    /// see [`Ledger::compact`]); `None` when it came after the compaction.
    base_spent: Option<i64>,
}

impl LedgerGrant {
    pub fn new(id: Arc<str>, amount: i64, priority: i64, effective_ms: i64, expires_ms: Option<i64>) -> LedgerGrant {
        LedgerGrant { id, amount, priority, effective_ms, expires_ms, voided: 0, remaining: amount, base_spent: None }
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
    /// Issue 15: minutes before `floor` are folded into the base (the state
    /// after them: each grant's `base_spent`, `base_overage`, at
    /// `base_cursor`); `i64::MIN`: nothing folded.
    floor: i64,
    base_cursor: i64,
    base_overage: i64,
    /// Usage may arrive this late (`ingest.max_lateness`); `None`: the log is
    /// never compacted.
    lateness_ms: Option<i64>,
    /// Usage that came dated before `floor`, charged at `floor` (exact: no
    /// grant boundary lies between, see [`Ledger::compact`]).
    late: u64,
    /// Grants that came acting from before the folded base: they act from
    /// the base (not exact: they did not pay for the folded minutes).
    late_grants: u64,
}

/// Minutes of log always kept before now (compaction also waits until an
/// hour more than it would fold has gathered, so it runs at most hourly).
const KEEP_MS: i64 = 60 * MINUTE_MS;

impl Ledger {
    pub fn new() -> Ledger {
        Ledger { cursor: i64::MIN, floor: i64::MIN, base_cursor: i64::MIN, ..Ledger::default() }
    }

    /// A ledger whose per-minute log is compacted (issue 15): usage older
    /// than what may still arrive late (`lateness_ms`) and than every grant
    /// boundary it could fall across is folded into one base state.
    pub fn bounded(lateness_ms: i64) -> Ledger {
        Ledger { lateness_ms: Some(lateness_ms.max(0)), ..Ledger::new() }
    }

    /// Minutes of usage kept for replays.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Changes so far that came from before the compacted horizon: (usage,
    /// grants).
    pub fn late_changes(&self) -> (u64, u64) {
        (self.late, self.late_grants)
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

    /// Adds (or replaces, by id) a grant; the ledger replays. A grant acting
    /// from before the compacted horizon acts from the horizon.
    pub fn put_grant(&mut self, mut grant: LedgerGrant) {
        if let Some(old) = self.grants.iter().find(|g| g.id == grant.id) {
            grant.base_spent = old.base_spent;
        } else if grant.start() <= self.base_cursor {
            self.late_grants += 1;
        }
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
        let mut m = minute(ts_ms);
        if m < self.floor {
            // Older than the compacted horizon: charged at the horizon (the
            // same grants act there unless one started or ended between).
            m = self.floor;
            self.late += 1;
        }
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
        self.maybe_compact(t);
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

    /// Back to the base state (the start, or the compacted horizon). A grant
    /// acting from before the horizon that came after the compaction pays
    /// the overage there, as it would have at its start.
    fn restore_base(&mut self) {
        for g in &mut self.grants {
            g.remaining = g.capacity().saturating_sub(g.base_spent.unwrap_or(0)).max(0);
        }
        self.overage = self.base_overage;
        self.cursor = self.base_cursor;
        if self.overage > 0 {
            let cursor = self.cursor;
            let mut late: Vec<usize> = (0..self.grants.len())
                .filter(|&i| self.grants[i].base_spent.is_none() && self.grants[i].start() <= cursor && self.grants[i].active_at(cursor))
                .collect();
            late.sort_by_key(|&i| self.grants[i].start());
            for i in late {
                let g = &mut self.grants[i];
                let pay = g.remaining.min(self.overage);
                g.remaining -= pay;
                self.overage -= pay;
            }
        }
    }

    /// Replays every minute of usage from the base (grants changed, or late
    /// usage crossed a boundary).
    fn replay(&mut self) {
        let until = self.cursor;
        self.restore_base();
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

    /// Where the log may be folded up to at minute `now`: before what may
    /// still arrive late, and before every grant boundary after that (late
    /// usage charged at the horizon then sees the grants it would have seen),
    /// and at least [`KEEP_MS`] back.
    fn horizon(&self, now: i64) -> Option<i64> {
        let lateness = self.lateness_ms?;
        let oldest_late = minute(now.saturating_sub(lateness));
        let boundary =
            self.grants.iter().flat_map(|g| [Some(g.start()), g.end()]).flatten().filter(|&b| b > oldest_late).min().unwrap_or(i64::MAX);
        Some(now.saturating_sub(KEEP_MS).min(boundary.saturating_sub(MINUTE_MS)))
    }

    /// Folds the log when an hour more than the horizon allows has gathered.
    fn maybe_compact(&mut self, now: i64) {
        let (Some(k), Some((&first, _))) = (self.horizon(now), self.log.first_key_value()) else { return };
        if first < k.saturating_sub(KEEP_MS) && !self.dirty {
            self.compact(k);
        }
    }

    /// Folds every minute before `k` into the base (issue 15): the state
    /// after them is kept (what each grant paid, the overage) and their log
    /// entries are dropped, so the log holds only minutes that can still be
    /// replayed across. The balance is unchanged.
    pub fn compact(&mut self, k: i64) {
        if self.dirty {
            self.replay();
        }
        let until = self.cursor;
        self.restore_base();
        let log = std::mem::take(&mut self.log);
        let mut kept = BTreeMap::new();
        for (m, raw) in log {
            if m < k {
                self.advance(m);
                self.take(m, raw);
            } else {
                kept.insert(m, raw);
            }
        }
        for g in &mut self.grants {
            g.base_spent = Some(g.capacity().saturating_sub(g.remaining));
        }
        self.base_overage = self.overage;
        self.base_cursor = self.cursor;
        self.floor = self.floor.max(k);
        for (&m, &raw) in &kept {
            self.advance(m);
            self.take(m, raw);
        }
        self.log = kept;
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

    /// Issue 15: a month of usage every minute, with weekly top-ups that
    /// expire, a void, and late usage: the bounded ledger's log stays flat
    /// (at most `max_lateness` plus two hours of minutes) while its balance is
    /// the unbounded ledger's at every hour, and it replays exactly after a
    /// grant change.
    #[test]
    fn a_month_of_minutes_keeps_the_log_flat_and_the_balance_exact() {
        const DAY: i64 = 1440 * M;
        // [bounded, unbounded]
        let mut l = [Ledger::bounded(DAY), Ledger::new()];
        fn both(l: &mut [Ledger; 2], f: impl Fn(&mut Ledger)) {
            l.iter_mut().for_each(f);
        }
        both(&mut l, |x| x.put_grant(grant("month", 5_000_000, 10, 0, Some(31 * DAY))));
        let mut longest = 0;
        for t in (0..30 * DAY).step_by(M as usize) {
            if t % (7 * DAY) == 0 {
                let k = t / (7 * DAY);
                both(&mut l, |x| x.put_grant(grant(&format!("w{k}"), 300_000, 5, t, Some(t + 10 * DAY))));
            }
            if t == 15 * DAY {
                let left = l[1].remaining_of("w2", t).unwrap_or(0);
                assert!(left > 0);
                both(&mut l, |x| {
                    x.void("w2", left);
                });
            }
            let q = 20 + (t / M) % 7;
            both(&mut l, |x| x.charge(t + 5, q));
            if (t / M) % 10 == 0 && t > DAY {
                // Late: six hours back (within max_lateness).
                both(&mut l, |x| x.charge(t - 6 * 60 * M, 3));
            }
            let (b, f) = (l[0].balance(t), l[1].balance(t));
            if t % (60 * M) == 0 {
                assert_eq!(b, f, "balance at minute {}", t / M);
            }
            if t > 20 * DAY {
                longest = longest.max(l[0].log_len());
            }
        }
        assert_eq!(l[0].balance(30 * DAY), l[1].balance(30 * DAY));
        assert!(l[1].log_len() >= 30 * 1440, "the unbounded ledger keeps every minute: {}", l[1].log_len());
        assert!(longest <= 1440 + 2 * 60 + 1, "the bounded log stays flat: {longest} minutes");
        assert!(longest >= 1440, "and keeps what may still arrive late: {longest} minutes");
        assert_eq!(l[0].late_changes().1, 0);
        // A top-up after all that replays from the base, exactly.
        both(&mut l, |x| x.put_grant(grant("late-topup", 1_000, 1, 30 * DAY, None)));
        assert_eq!(l[0].balance(30 * DAY + M), l[1].balance(30 * DAY + M));
        // A grant backdated before the folded minutes acts from the base: counted.
        l[0].put_grant(grant("backdated", 10, 10, 0, None));
        assert_eq!(l[0].late_changes().1, 1);
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
