//! Prepaid credits (issue 18): the in-memory book of every customer's grants
//! and credit balances, fed by the usage seam.
//!
//! The book is a [`UsageObserver`]: every change of usage on a credits meter
//! (live events and consumes, the WAL replay) is charged to the customer's
//! [`Ledger`] at the event's time, and at start the usage the store already
//! holds is loaded per minute ([`CreditBook::load_minute`]) before the WAL
//! replays the rest. Usage therefore reaches a balance by the same exactly-once
//! path as the counters: a balance after a crash, replay or retry is the grants
//! minus acknowledged usage. Checks, `balances` and `grants` read from here;
//! nothing waits on a store.
//!
//! A meter is a credits meter when a plan makes it `limit = "credits"` or any
//! grant names it; usage of other meters costs one bit test here. The book
//! observes the seam only when some plan has a credits limit, so a config
//! without credits keeps the seam's no-observer cost.
//! Balance crossings of `low_balance` and zero become [`CreditAlert`]s handed to
//! the [`CreditAlertSink`] (none by default).

pub mod alert;
pub mod ledger;
pub mod load;

pub use alert::{CreditAlert, CreditAlertKind, CreditAlertSink, NoAlerts};
pub use ledger::{minute, Balance, Ledger, LedgerGrant};

use crate::counters::CustomerId;
use crate::model::grant::GrantDoc;
use crate::model::{Catalog, Decimal, LimitAmount, MeterId};
use crate::usage::{UsageChange, UsageObserver};
use dashmap::DashMap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// A grant's state now, for `GET .../grants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    Active,
    Pending,
    Expired,
    Spent,
    Voided,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Active => "active",
            GrantStatus::Pending => "pending",
            GrantStatus::Expired => "expired",
            GrantStatus::Spent => "spent",
            GrantStatus::Voided => "voided",
        }
    }
}

/// A grant as the book holds it: the stored document, its amount in raw units,
/// what is left and its status at the time asked.
#[derive(Debug, Clone)]
pub struct GrantView {
    pub doc: GrantDoc,
    pub amount: i64,
    pub remaining: i64,
    pub status: GrantStatus,
}

/// One `(customer, meter)` ledger and the alert level it was last read with.
struct Entry {
    ledger: Ledger,
    low_balance: Option<i64>,
    /// Usage of other instances charged here (with Redis), raw units.
    others: i64,
    /// Taken in Redis by this instance's consumes and not yet folded here:
    /// already in the totals Redis answers, so it is this instance's own, not
    /// the others' (see [`CreditBook::learn_total`]).
    pending: i64,
}

/// Every credit ledger, the grants' documents, the alert sink and totals.
pub struct CreditBook {
    catalog: Arc<Catalog>,
    /// Per meter: usage of it is charged to ledgers.
    credit_meters: Box<[AtomicBool]>,
    ledgers: DashMap<(CustomerId, MeterId), Mutex<Entry>>,
    /// Per customer, the grants by id.
    docs: DashMap<CustomerId, BTreeMap<String, (GrantDoc, i64)>>,
    names: DashMap<CustomerId, Arc<str>>,
    sink: RwLock<Arc<dyn CreditAlertSink>>,
    /// Per meter: raw units granted (all grants) and spent (all usage charged).
    granted: Box<[AtomicI64]>,
    spent: Box<[AtomicI64]>,
    /// Whether a plan has a credits limit: only then is the book registered
    /// with the usage seam (with no observer, the seam costs one branch).
    observes: bool,
    /// The grants version of the shared store this book has loaded (with
    /// Redis; see `redis_link::credit_lease`, voids).
    grants_seen: std::sync::atomic::AtomicU64,
    /// `ingest.max_lateness` (ms): ledgers made from now on fold usage older
    /// than it into their base (issue 15); -1: never (tests, tools).
    lateness_ms: AtomicI64,
}

impl CreditBook {
    /// An empty book; the meters plans make credits are credits meters.
    pub fn new(catalog: Arc<Catalog>) -> CreditBook {
        // Laid out for meters added live too (config reload, issue 23).
        let n = catalog.capacity();
        let credit_meters: Box<[AtomicBool]> = (0..n).map(|_| AtomicBool::new(false)).collect();
        for plan in catalog.plans() {
            for (meter, limits) in &plan.limits {
                if limits.iter().any(|l| l.amount.is_credits()) {
                    if let Some(b) = credit_meters.get(usize::from(*meter)) {
                        b.store(true, Ordering::Release);
                    }
                }
            }
        }
        let observes = credit_meters.iter().any(|b| b.load(Ordering::Acquire));
        CreditBook {
            observes,
            catalog,
            credit_meters,
            ledgers: DashMap::new(),
            docs: DashMap::new(),
            names: DashMap::new(),
            sink: RwLock::new(Arc::new(NoAlerts)),
            granted: (0..n).map(|_| AtomicI64::new(0)).collect(),
            spent: (0..n).map(|_| AtomicI64::new(0)).collect(),
            grants_seen: std::sync::atomic::AtomicU64::new(0),
            lateness_ms: AtomicI64::new(-1),
        }
    }

    /// Where crossings go from now on.
    pub fn set_alert_sink(&self, sink: Arc<dyn CreditAlertSink>) {
        *self.sink.write().unwrap_or_else(PoisonError::into_inner) = sink;
    }

    /// Whether usage of `meter` is charged to ledgers.
    pub fn is_credit_meter(&self, meter: MeterId) -> bool {
        self.credit_meters.get(usize::from(meter)).is_some_and(|b| b.load(Ordering::Acquire))
    }

    /// Whether usage reaches the book: a plan in the config has a credits
    /// limit. Without one, grants are kept but no usage is charged to them.
    pub fn observes(&self) -> bool {
        self.observes
    }

    /// Marks `meter` a credits meter (an override made it one).
    pub fn track_meter(&self, meter: MeterId) {
        if let Some(b) = self.credit_meters.get(usize::from(meter)) {
            b.store(true, Ordering::Release);
        }
    }

    /// Sets the metrics of `meter` from the totals.
    fn publish(&self, meter: MeterId) {
        if let Some(m) = self.catalog.meter(meter) {
            let (granted, spent) = self.totals(meter);
            crate::telemetry::credit_totals(&m.name, granted, spent, m.precision);
        }
    }

    /// Sets every credits meter's metrics (after loading).
    pub fn publish_all(&self) {
        for m in self.catalog.meters() {
            if self.is_credit_meter(m.id) {
                self.publish(m.id);
            }
        }
    }

    /// Raw units granted and spent on `meter`, over every customer.
    pub fn totals(&self, meter: MeterId) -> (i64, i64) {
        let at = |v: &[AtomicI64]| v.get(usize::from(meter)).map_or(0, |a| a.load(Ordering::Acquire));
        (at(&self.granted), at(&self.spent))
    }

    /// Bounds every ledger made from now on (issue 15): usage older than
    /// `lateness_ms` (`ingest.max_lateness`), and than every grant boundary
    /// after it, is folded into the ledger's base state.
    pub fn set_max_lateness(&self, lateness_ms: i64) {
        self.lateness_ms.store(lateness_ms.max(0), Ordering::Release);
    }

    fn with_entry<R>(&self, customer: CustomerId, meter: MeterId, f: impl FnOnce(&mut Entry) -> R) -> R {
        let slot = self
            .ledgers
            .entry((customer, meter))
            .or_insert_with(|| {
                let lateness = self.lateness_ms.load(Ordering::Acquire);
                let ledger = if lateness >= 0 { Ledger::bounded(lateness) } else { Ledger::new() };
                Mutex::new(Entry { ledger, low_balance: None, others: 0, pending: 0 })
            })
            .downgrade();
        let mut entry = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let (len, late) = (entry.ledger.log_len(), entry.ledger.late_changes());
        let r = f(&mut entry);
        let (len_now, late_now) = (entry.ledger.log_len(), entry.ledger.late_changes());
        if len_now != len || late_now != late {
            // Entries folded: the log shrank by more than the change added (at most one).
            let compacted = u64::try_from(len.saturating_sub(len_now)).unwrap_or(0);
            let delta = i64::try_from(len_now).unwrap_or(i64::MAX).saturating_sub(i64::try_from(len).unwrap_or(i64::MAX));
            if late_now.1 > late.1 {
                tracing::warn!(
                    customer,
                    meter = usize::from(meter),
                    "a grant effective before the credit ledger's compacted horizon (older than ingest.max_lateness) acts from the horizon: \
                     it pays for no usage before it"
                );
            }
            let more = late_now.0.saturating_sub(late.0).saturating_add(late_now.1.saturating_sub(late.1));
            crate::telemetry::credit_ledgers(delta, compacted, more);
        }
        r
    }

    /// Per-minute entries every ledger keeps, summed (issue 15).
    pub fn ledger_minutes(&self) -> usize {
        self.ledgers.iter().map(|e| e.value().lock().unwrap_or_else(PoisonError::into_inner).ledger.log_len()).sum()
    }

    /// Installs a grant (loaded from the store, or just made) for `customer`
    /// (`name`); `raw` is its amount in raw units. Returns false when the
    /// grant's meter is not configured.
    pub fn install(&self, customer: CustomerId, name: &str, doc: GrantDoc, raw: i64) -> bool {
        let Some(meter) = self.catalog.meter_by_name(&doc.meter) else {
            return false;
        };
        let meter_id = meter.id;
        self.track_meter(meter_id);
        self.names.entry(customer).or_insert_with(|| Arc::from(name));
        let mut grant = LedgerGrant::new(Arc::from(doc.id.as_str()), raw, doc.priority, doc.effective_at_ms, doc.expires_at_ms);
        grant.voided = doc.voided_raw.unwrap_or(0);
        let fresh = {
            let mut docs = self.docs.entry(customer).or_default();
            docs.insert(doc.id.clone(), (doc, raw)).is_none()
        };
        if fresh {
            if let Some(a) = self.granted.get(usize::from(meter_id)) {
                a.fetch_add(raw, Ordering::AcqRel);
            }
            self.publish(meter_id);
        }
        self.with_entry(customer, meter_id, |e| e.ledger.put_grant(grant));
        self.recheck(customer, meter_id, crate::clock::now_ms(), true);
        true
    }

    /// The stored document of one grant.
    pub fn grant(&self, customer: CustomerId, id: &str) -> Option<GrantDoc> {
        self.docs.get(&customer).and_then(|d| d.get(id).map(|(doc, _)| doc.clone()))
    }

    /// What grant `id` of `customer` has left at `now` (what a void takes away).
    pub fn remaining_of(&self, customer: CustomerId, id: &str, now: i64) -> Option<i64> {
        let doc = self.grant(customer, id)?;
        let meter = self.catalog.meter_by_name(&doc.meter)?.id;
        self.with_entry(customer, meter, |e| e.ledger.remaining_of(id, now))
    }

    /// Applies a void already stored: `doc` carries `voided_raw`.
    pub fn void(&self, customer: CustomerId, doc: GrantDoc) -> bool {
        let Some(meter) = self.catalog.meter_by_name(&doc.meter).map(|m| m.id) else { return false };
        let raw = doc.voided_raw.unwrap_or(0);
        let id = doc.id.clone();
        match self.docs.get_mut(&customer) {
            Some(mut docs) => match docs.get_mut(&id) {
                Some(slot) => slot.0 = doc,
                None => return false,
            },
            None => return false,
        }
        self.with_entry(customer, meter, |e| e.ledger.void(&id, raw));
        self.recheck(customer, meter, crate::clock::now_ms(), true);
        true
    }

    /// The customer's grants (optionally of one meter) with what is left, by id.
    pub fn grants(&self, customer: Option<CustomerId>, meter: Option<MeterId>, now: i64) -> Vec<GrantView> {
        let Some(customer) = customer else { return Vec::new() };
        let docs: Vec<(GrantDoc, i64)> = match self.docs.get(&customer) {
            Some(d) => d.values().cloned().collect(),
            None => return Vec::new(),
        };
        let mut out = Vec::with_capacity(docs.len());
        for (doc, amount) in docs {
            let Some(m) = self.catalog.meter_by_name(&doc.meter) else { continue };
            if meter.is_some_and(|want| want != m.id) {
                continue;
            }
            let (remaining, active, ended) = self.with_entry(customer, m.id, |e| {
                let _ = e.ledger.balance(now);
                let t = minute(now);
                e.ledger
                    .grants()
                    .iter()
                    .find(|g| *g.id == *doc.id)
                    .map(|g| (g.remaining, g.active_at(t), g.end().is_some_and(|end| end <= t)))
                    .unwrap_or((0, false, false))
            });
            let status = if doc.voided_at_ms.is_some() {
                GrantStatus::Voided
            } else if ended {
                GrantStatus::Expired
            } else if !active {
                GrantStatus::Pending
            } else if remaining == 0 {
                GrantStatus::Spent
            } else {
                GrantStatus::Active
            };
            out.push(GrantView { doc, amount, remaining, status });
        }
        out
    }

    /// The meters the customer has a ledger for.
    pub fn meters_of(&self, customer: CustomerId) -> Vec<MeterId> {
        let mut v: Vec<MeterId> =
            self.catalog.meters().iter().map(|m| m.id).filter(|&m| self.ledgers.contains_key(&(customer, m))).collect();
        v.sort_unstable();
        v
    }

    /// The balance of `(customer, meter)` at `now`; `low_balance` is the level
    /// the caller's limit names (kept for alerts). A customer never seen has
    /// nothing: zero.
    pub fn balance(&self, customer: Option<CustomerId>, meter: MeterId, low_balance: Option<i64>, now: i64) -> Balance {
        let Some(customer) = customer else { return Balance::default() };
        if !self.ledgers.contains_key(&(customer, meter)) {
            return Balance::default();
        }
        self.with_entry(customer, meter, |e| {
            if low_balance.is_some() {
                e.low_balance = low_balance;
            }
            e.ledger.balance(now)
        })
    }

    /// With Redis: the balance now, this instance's own usage and the other
    /// instances' usage charged here, read together.
    pub fn shared_view(&self, customer: CustomerId, meter: MeterId, now: i64) -> (i64, i64, i64) {
        self.with_entry(customer, meter, |e| {
            let b = e.ledger.balance(now).balance;
            (b, e.ledger.used().saturating_sub(e.others), e.others)
        })
    }

    /// With Redis: [`CreditBook::shared_view`] and the next grant expiry
    /// (the start of the minute it ends, ms), read together: what a slice of
    /// the balance is asked with (`redis_link::credit_lease`).
    pub fn slice_view(&self, customer: CustomerId, meter: MeterId, now: i64) -> (i64, i64, i64, Option<i64>) {
        self.with_entry(customer, meter, |e| {
            let b = e.ledger.balance(now);
            (b.balance, e.ledger.used().saturating_sub(e.others), e.others, b.next_expiry.map(|(_, at)| minute(at)))
        })
    }

    /// The grants version of the shared store loaded into this book.
    pub fn grants_seen(&self) -> u64 {
        self.grants_seen.load(Ordering::Acquire)
    }

    /// Every grant up to version `v` is loaded.
    pub fn saw_grants(&self, v: u64) {
        self.grants_seen.fetch_max(v, Ordering::AcqRel);
    }

    /// A consume is about to take `quantity` in Redis (`+`), or the take
    /// ended: refused, given back, or folded here (`-`).
    pub fn taking(&self, customer: CustomerId, meter: MeterId, quantity: i64) {
        self.with_entry(customer, meter, |e| e.pending = e.pending.saturating_add(quantity).max(0));
    }

    /// With Redis: `total` is every instance's usage; what is not this
    /// instance's and not charged yet is charged now. This instance's own is
    /// its folded usage plus what its consumes took in Redis and have not
    /// folded yet: a sync answering between a consume's take and its fold must
    /// not charge that quantity as the others' (it would be counted twice).
    /// With reservations in Redis, callers first record the held total read in
    /// the same script (`grants::redis_consume`): a settle moves a hold's
    /// units into `total`, which must not be learned before the held total
    /// lost them.
    pub fn learn_total(&self, customer: CustomerId, meter: MeterId, total: i64, now: i64) {
        let grew = self.with_entry(customer, meter, |e| {
            let own = e.ledger.used().saturating_sub(e.others).saturating_add(e.pending);
            let others = total.saturating_sub(own);
            if others > e.others {
                e.ledger.charge(now, others - e.others);
                e.others = others;
                true
            } else {
                false
            }
        });
        if grew {
            self.recheck(customer, meter, now, true);
        }
    }

    /// Every ledger's `(customer, meter)`.
    pub fn ledger_keys(&self) -> Vec<(CustomerId, MeterId)> {
        self.ledgers.iter().map(|e| *e.key()).collect()
    }

    /// Usage of the store, loaded at start: `raw` units in the minute at `minute_ms`.
    pub fn load_minute(&self, customer: CustomerId, meter: MeterId, minute_ms: i64, raw: i64) {
        self.with_entry(customer, meter, |e| e.ledger.charge(minute_ms, raw));
        if let Some(a) = self.spent.get(usize::from(meter)) {
            a.fetch_add(raw, Ordering::AcqRel);
        }
    }

    /// After start: each ledger's alert state is set from its balance, so
    /// levels already crossed before the restart do not fire again.
    pub fn arm(&self, low_balance: impl Fn(CustomerId, MeterId) -> Option<i64>) {
        let now = crate::clock::now_ms();
        for item in self.ledgers.iter() {
            let (customer, meter) = *item.key();
            let mut e = item.value().lock().unwrap_or_else(PoisonError::into_inner);
            e.low_balance = low_balance(customer, meter);
            let len = e.ledger.log_len();
            let b = e.ledger.balance(now).balance;
            // The first balance folds what the store held beyond the horizon (issue 15).
            let folded = len.saturating_sub(e.ledger.log_len());
            crate::telemetry::credit_ledgers(-i64::try_from(folded).unwrap_or(0), u64::try_from(folded).unwrap_or(0), 0);
            let low = e.low_balance;
            let entry = &mut *e;
            let _ = alert::crossings(b, low, &mut entry.ledger.low_fired, &mut entry.ledger.depleted_fired);
        }
    }

    /// Checks the balance for crossings after a change and hands alerts to the
    /// sink (`fire` false: only the armed state moves).
    fn recheck(&self, customer: CustomerId, meter: MeterId, now: i64, fire: bool) {
        let (balance, low, kinds, episode) = self.with_entry(customer, meter, |e| {
            let b = e.ledger.balance(now).balance;
            let low = e.low_balance;
            let kinds = alert::crossings(b, low, &mut e.ledger.low_fired, &mut e.ledger.depleted_fired);
            let episode = e.ledger.grants().iter().filter(|g| g.start() <= now).fold(0i64, |sum, g| sum.saturating_add(g.amount));
            (b, low, kinds, episode)
        });
        if !fire || kinds.iter().all(Option::is_none) {
            return;
        }
        let (Some(name), Some(m)) = (self.names.get(&customer).map(|n| n.clone()), self.catalog.meter(meter)) else {
            return;
        };
        let d = |raw| Decimal { raw, precision: m.precision };
        let sink = self.sink.read().unwrap_or_else(PoisonError::into_inner).clone();
        for kind in kinds.into_iter().flatten() {
            tracing::info!(customer = %name, meter = %m.name, balance = balance, kind = kind.as_str(), "credit balance crossed a level");
            sink.alert(CreditAlert {
                kind,
                customer: name.to_string(),
                meter: m.name.clone(),
                balance: d(balance),
                low_balance: low.map(d),
                episode,
            });
        }
    }

    /// The `low_balance` of a credits limit among `limits`.
    pub fn low_balance_of(limits: &[crate::model::Limit]) -> Option<i64> {
        limits.iter().find_map(|l| match l.amount {
            LimitAmount::Credits { low_balance, .. } => low_balance,
            _ => None,
        })
    }
}

impl UsageObserver for CreditBook {
    fn changed(&self, change: &UsageChange<'_>) {
        if change.raw == 0 || !self.is_credit_meter(change.meter) {
            return;
        }
        if !matches!(change.origin, crate::usage::Origin::Live | crate::usage::Origin::Replay) {
            return;
        }
        self.with_entry(change.customer, change.meter, |e| e.ledger.charge(change.ts, change.raw));
        if let Some(a) = self.spent.get(usize::from(change.meter)) {
            a.fetch_add(change.raw, Ordering::AcqRel);
        }
        self.publish(change.meter);
        self.recheck(change.customer, change.meter, crate::clock::now_ms(), change.origin.is_live());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync answering between a consume's take in Redis and its fold here
    /// sees the taken quantity in the total: it is this instance's own, not
    /// the others' usage (it was once charged twice: a balance 30 too low).
    #[test]
    fn a_sync_between_take_and_fold_does_not_charge_the_take_as_others() {
        let book = CreditBook::new(Arc::new(Catalog::new(Vec::new(), Vec::new(), 0)));
        let (c, m) = (CustomerId::from(7u32), MeterId::from(0u16));
        book.load_minute(c, m, 0, 100);
        // The consume takes 30 in Redis; others have used 50 meanwhile.
        book.taking(c, m, 30);
        book.learn_total(c, m, 100 + 30 + 50, 0);
        assert_eq!(book.shared_view(c, m, 0).2, 50, "others");
        // The fold, then the take ends: nothing more is charged.
        book.load_minute(c, m, 0, 30);
        book.taking(c, m, -30);
        book.learn_total(c, m, 180, 0);
        assert_eq!(book.shared_view(c, m, 0), (-180, 130, 50));
        // A take refused or given back leaves no trace.
        book.taking(c, m, 20);
        book.taking(c, m, -20);
        book.learn_total(c, m, 190, 0);
        assert_eq!(book.shared_view(c, m, 0).2, 60, "10 more of the others'");
    }
}
