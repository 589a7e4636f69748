//! `enforcement = "leased"` limits with Redis (issue 16): like `strict`, the
//! instances together never pass the limit, yet most consumes are decided
//! locally. Each instance holds a *cap* per window, granted by the lease
//! script (`redis_link::lease`, which states the invariant): a consume whose
//! own usage plus quantity fits the cap is decided and recorded here, with no
//! round trip; otherwise one script call takes a new slice (or refuses).
//!
//! Runs under the `(customer, meter)` consume lock from the decision to the
//! fold, so two consumes here cannot both use the last unit of a cap, and the
//! lease maintenance (`sync::leases`, which renews and returns caps under the
//! same lock) never returns a unit a consume is about to record.
//!
//! Redis unreachable (or restarted less than a lease ttl ago): consumes that
//! fit a cap still held go on locally; the others follow
//! `strict_when_unavailable` (decide from local state, or deny).

use super::{
    answer, consume_record, consume_usage, decide, CheckAnswer, CheckError, Consume, LimitState, LimitStates, LimitsPorts, Reason, Verdict,
};
use crate::counters::{CounterKey, Counters};
use crate::engine::ConsumeGuard;
use crate::model::{Aggregation, Enforcement, Limit, LimitAmount, Meter};
use crate::redis_link::lease::{self, Cap, LeaseKey, LeaseMode, LeaseReply};
use crate::redis_link::Redis;
use crate::usage::Origin;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A limit decided through leases: hard, finite, `leased`.
pub fn is_leased(limit: &Limit) -> bool {
    limit.enforcement == Enforcement::Leased && limit.hard && matches!(limit.amount, LimitAmount::Finite(_))
}

/// Whether a consume of `meter` on these limits goes through leases (a meter
/// with a `strict` limit too goes the strict way, which treats leased limits
/// as strict ones).
pub fn applies(ports: &LimitsPorts<'_>, meter: &Meter, limits: &[Limit]) -> bool {
    ports.redis.is_some()
        && matches!(meter.aggregation, Aggregation::Sum | Aggregation::Count)
        && limits.iter().any(is_leased)
        && !limits.iter().any(super::strict::is_strict_window)
}

impl LimitsPorts<'_> {
    /// A consume with at least one leased limit; the caller holds `guard` and
    /// has claimed the id.
    pub(super) async fn consume_leased(&self, guard: &ConsumeGuard<'_>, redis: &Redis, c: &Consume<'_>) -> Result<CheckAnswer, CheckError> {
        let Consume { name, customer, meter, ent, limits, quantity, id_hash, now } = *c;
        debug_assert!(guard.covers(customer, meter.id), "the consume lock of another (customer, meter)");
        let mut states = self.reads.limit_states(Some(customer), meter, ent, limits, now);
        // The other limits decide locally first: no round trip when they refuse.
        let rest: LimitStates = states.iter().copied().filter(|s| !is_leased(&s.limit)).collect();
        if !rest.is_empty() && !decide(&rest, quantity).allowed {
            return Ok(self.refuse(name, meter, quantity, &states, id_hash));
        }
        let leased: Vec<usize> = (0..states.len()).filter(|&i| is_leased(&states[i].limit)).collect();
        let keys: Vec<CounterKey> =
            leased.iter().map(|&i| Counters::key(customer, meter.id, states[i].limit.window, now, ent.billing_anchor)).collect();
        let own = |key: &CounterKey| self.reads.counters.windows.get(key, |cell| cell.value.load(Ordering::Acquire)).unwrap_or(0);
        let book = &redis.leases;
        let started = Instant::now();
        let inside = keys.iter().all(|k| book.fits(k, own(k), quantity, started));
        book.decided(inside);
        if inside {
            for k in &keys {
                book.touch(k, started);
            }
        } else {
            let wanted: Vec<LeaseKey> = leased
                .iter()
                .zip(&keys)
                .map(|(&i, key)| {
                    let limit = match states[i].limit.amount {
                        LimitAmount::Finite(l) => l,
                        LimitAmount::Unlimited | LimitAmount::Credits { .. } => -1,
                    };
                    let value = own(key);
                    LeaseKey {
                        redis_key: redis.keys.window(name, &meter.name, key.kind, key.start_ms),
                        limit,
                        value,
                        want: value.saturating_add(quantity),
                        expire_at: crate::redis_link::keys::expire_at(key),
                    }
                })
                .collect();
            let ttl_ms = book.ttl_ms();
            let held_key = redis.keys.held(name, &meter.name);
            match lease::call(redis, self.instance_id, LeaseMode::Take, ttl_ms, &wanted, Some(&held_key)).await {
                Ok(LeaseReply::Granted { ttl_ms, windows }) => {
                    for (((&i, key), want), w) in leased.iter().zip(&keys).zip(&wanted).zip(&windows) {
                        let cap = Cap {
                            cap: w.cap,
                            valid_until: started,
                            last_used: started,
                            reported: w.part,
                            unreported: w.unreported,
                            limit: want.limit,
                            redis_key: want.redis_key.clone(),
                            expire_at: want.expire_at,
                            window_end_ms: states[i].window.end_ms,
                        };
                        book.hold(*key, cap, started, ttl_ms);
                        self.note_total(key, w.total, w.part);
                    }
                }
                Ok(LeaseReply::Denied { index, total }) => {
                    for k in &keys {
                        book.remove(k);
                    }
                    let primary = leased.get(index).copied().unwrap_or(0);
                    if let (Some(&i), Some(key)) = (leased.get(index), keys.get(index)) {
                        states[i].used = total;
                        self.note_total(key, total, own(key));
                    }
                    // Another instance's slice may hold what `used` leaves: the
                    // verdict is the script's, whatever the numbers show.
                    let verdict = Verdict { allowed: false, reason: Reason::LimitExceeded, primary };
                    self.deduper.remove(id_hash);
                    crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
                    return Ok(answer(name, meter, quantity, &states, verdict));
                }
                outcome => {
                    match &outcome {
                        Err(e) => tracing::debug!(error = %e, "leased limit outside its slice while redis is unreachable"),
                        _ => tracing::debug!("leased limit outside its slice while redis recovers from a restart"),
                    }
                    if self.strict_open_when_down {
                        return self.consume_local(c, Some(guard)).await;
                    }
                    let verdict = Verdict { allowed: false, reason: Reason::Unavailable, primary: leased.first().copied().unwrap_or(0) };
                    self.deduper.remove(id_hash);
                    crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
                    return Ok(answer(name, meter, quantity, &states, verdict));
                }
            }
        }
        // Inside every cap (held or just granted): record it.
        let mut verdict = decide(&states, quantity);
        if !verdict.allowed {
            // A stale view of the others' usage; the caps are what decides.
            verdict = Verdict { allowed: true, reason: Reason::WithinLimit, primary: verdict.primary };
        }
        let seq = self.wal.append_with(|| consume_record(c, quantity)).await.map_err(|e| self.wal_refused(id_hash, e))?;
        self.usage.fold(&consume_usage(c, quantity), None, Origin::Live, || self.wal.tracker.folded(seq));
        for s in &mut states {
            s.used = s.used.saturating_add(quantity);
        }
        crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
        Ok(answer(name, meter, quantity, &states, verdict))
    }

    /// What Redis answered of a window: the others' usage, and how much of
    /// ours it holds.
    fn note_total(&self, key: &CounterKey, total: i64, part: i64) {
        let at = crate::engine::now_ms();
        self.usage.load_shared(*key, Origin::Sync, |cell| {
            cell.pushed.fetch_max(part, Ordering::AcqRel);
            cell.others.store(total.saturating_sub(part).max(0), Ordering::Release);
            cell.synced_ms.store(at, Ordering::Release);
        });
    }
}

/// The one leased limit of a consume that has no other limit: decided
/// without the consume lock when it fits the slice (see `single`).
fn single(c: &Consume<'_>) -> Option<Limit> {
    match c.limits {
        [only] if is_leased(only) && matches!(c.meter.aggregation, Aggregation::Sum | Aggregation::Count) => Some(*only),
        _ => None,
    }
}

impl LimitsPorts<'_> {
    /// A consume on a single leased limit, without any lock: reserves the
    /// quantity in own usage with compare-and-swap, bounded by the slice, while
    /// holding the slice's entry (so upkeep cannot return it and a take cannot
    /// replace it meanwhile). `None` when it does not fit: the caller takes the
    /// consume lock and [`LimitsPorts::consume_leased_single`].
    pub(super) async fn consume_leased_fast(&self, redis: &Redis, c: &Consume<'_>) -> Option<Result<CheckAnswer, CheckError>> {
        let limit = single(c)?;
        let key = Counters::key(c.customer, c.meter.id, limit.window, c.now, c.ent.billing_anchor);
        let own = redis.leases.within(&key, Instant::now(), |bound| self.usage.reserve_own_within(key, c.quantity, bound))?.ok()?;
        redis.leases.decided(true);
        Some(self.record_reserved(c, limit, key, own).await)
    }

    /// A single leased limit that did not fit the slice, under the consume
    /// lock: the slice is taken out of the book first (every reservation in
    /// it is then in own usage), a new one is asked for with own usage + the
    /// quantity, the quantity is reserved, and only then is the new slice put
    /// in the book for the lock-free path.
    pub(super) async fn consume_leased_single(
        &self,
        guard: &ConsumeGuard<'_>,
        redis: &Redis,
        c: &Consume<'_>,
    ) -> Result<CheckAnswer, CheckError> {
        let Some(limit) = single(c) else { return self.consume_leased(guard, redis, c).await };
        let Consume { name, customer, meter, ent, quantity, id_hash, now, .. } = *c;
        let key = Counters::key(customer, meter.id, limit.window, now, ent.billing_anchor);
        let book = &redis.leases;
        // Another consume may have taken a slice while this one waited.
        if let Some(Ok(own)) = book.within(&key, Instant::now(), |bound| self.usage.reserve_own_within(key, quantity, bound)) {
            book.decided(true);
            return self.record_reserved(c, limit, key, own).await;
        }
        book.decided(false);
        let old = book.take_out(&key);
        let window = limit.window.bounds(now, ent.billing_anchor);
        let value = self.reads.counters.windows.get(&key, |cell| cell.value.load(Ordering::Acquire)).unwrap_or(0);
        let max = match limit.amount {
            LimitAmount::Finite(l) => l,
            LimitAmount::Unlimited | LimitAmount::Credits { .. } => -1,
        };
        let wanted = LeaseKey {
            redis_key: redis.keys.window(name, &meter.name, key.kind, key.start_ms),
            limit: max,
            value,
            want: value.saturating_add(quantity),
            expire_at: crate::redis_link::keys::expire_at(&key),
        };
        let started = Instant::now();
        let held = self.reads.holds.held(customer, meter.id);
        let states = |used| -> LimitStates { smallvec::smallvec![LimitState { limit, window, used, held }] };
        let held_key = redis.keys.held(name, &meter.name);
        match lease::call(redis, self.instance_id, LeaseMode::Take, book.ttl_ms(), std::slice::from_ref(&wanted), Some(&held_key)).await {
            Ok(LeaseReply::Granted { ttl_ms, windows }) => {
                let Some(w) = windows.first().copied() else {
                    return Err(CheckError::Unavailable("redis lease script answered no window".into()));
                };
                // Reserved before the slice is visible: nothing else can use these units.
                let own = self.usage.reserve_own_within(key, quantity, i64::MAX).unwrap_or(value);
                let cap = Cap {
                    cap: w.cap,
                    valid_until: started,
                    last_used: started,
                    reported: w.part,
                    unreported: w.unreported,
                    limit: max,
                    redis_key: wanted.redis_key.clone(),
                    expire_at: wanted.expire_at,
                    window_end_ms: window.end_ms,
                };
                book.hold(key, cap, started, ttl_ms);
                self.note_total(&key, w.total, w.part);
                self.record_reserved(c, limit, key, own).await
            }
            Ok(LeaseReply::Denied { total, .. }) => {
                self.note_total(&key, total, value);
                let verdict = Verdict { allowed: false, reason: Reason::LimitExceeded, primary: 0 };
                self.deduper.remove(id_hash);
                crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
                Ok(answer(name, meter, quantity, &states(total), verdict))
            }
            outcome => {
                // Redis still holds the slice taken out: usable again here.
                if let Some(old) = old {
                    book.put_back(key, old);
                }
                if let Err(e) = &outcome {
                    tracing::debug!(error = %e, "leased limit outside its slice while redis is unreachable");
                }
                if self.strict_open_when_down {
                    return self.consume_local(c, Some(guard)).await;
                }
                let used = self.reads.counters.windows.read(&key);
                let verdict = Verdict { allowed: false, reason: Reason::Unavailable, primary: 0 };
                self.deduper.remove(id_hash);
                crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
                Ok(answer(name, meter, quantity, &states(used), verdict))
            }
        }
    }

    /// Makes a reserved consume durable and folds the rest (the reserved
    /// window is skipped); gives the reservation back if the WAL refuses.
    async fn record_reserved(&self, c: &Consume<'_>, limit: Limit, key: CounterKey, own: i64) -> Result<CheckAnswer, CheckError> {
        let seq = match self.wal.append_with(|| consume_record(c, c.quantity)).await {
            Ok(seq) => seq,
            Err(e) => {
                self.usage.give_back(key, c.quantity);
                return Err(self.wal_refused(c.id_hash, e));
            }
        };
        self.usage.fold(&consume_usage(c, c.quantity), Some(limit.window), Origin::Live, || self.wal.tracker.folded(seq));
        let others = self.reads.counters.windows.get(&key, |cell| cell.others.load(Ordering::Acquire)).unwrap_or(0);
        let states: LimitStates = smallvec::smallvec![LimitState {
            limit,
            window: limit.window.bounds(c.now, c.ent.billing_anchor),
            used: own.saturating_add(others),
            held: self.reads.holds.held(c.customer, c.meter.id),
        }];
        let verdict = Verdict { allowed: true, reason: Reason::WithinLimit, primary: 0 };
        crate::telemetry::decision(verdict.reason.as_str(), true, c.meter.id.into(), &c.meter.name);
        Ok(answer(c.name, c.meter, c.quantity, &states, verdict))
    }
}
