//! Reservations with Redis (issue 19): the reservation and the held totals
//! live there (`holds::shared`), so holds count on every instance and any
//! instance settles, releases or expires any hold.
//!
//! - **Reserve.** `cached` limits decide locally (`used + held + quantity`,
//!   the held total as fresh as the usage totals: the sync round and the stale
//!   refresh read it); `strict` and `leased` hard limits are checked in the
//!   reserve script, atomically with strict consumes and slice grants, which
//!   read the same held total. So is a hard credits balance, on the
//!   customer's credit key: held only when `base − t − held ≥ quantity`
//!   (`base` as a consume's take sends it, `t` every instance's usage), which
//!   the consumes' takes (`grants::redis_consume`) check against the same
//!   held total. A denial is recorded too (the same id answers the same).
//! - **Settle.** The finish script moves `held` → `settled` once and stores
//!   the quantity and timestamp; then the usage is recorded under the
//!   reservation id like an event: claimed locally and in Redis (the shared
//!   dedupe claim), written to the WAL, folded; on a hard credits balance the
//!   script also adds the quantity to this instance's usage in the credit
//!   key, counted as its own until folded (`CreditBook::taking`). Any later
//!   settle, on any instance, gets the stored result and tries that recording
//!   again, which the claims make a no-op — unless the first one crashed
//!   before recording: then the retry records it, once.
//! - **Release, expiry.** The finish script, once. The expiry task of every
//!   instance walks the shared expiry index; the script's status check makes
//!   one of them release each hold.

use super::ReservationAnswer;
use super::{invalid, ReservationError, ReservationPorts, ReservationView, ReserveAnswer, ReserveRequest, SettleRequest};
use crate::engine::now_ms;
use crate::holds::shared::{self as store, CreditCheck, Finish, FinishOutcome, Held, ReserveOutcome, SharedError, Take, WindowCheck};
use crate::holds::{Reservation, Status};
use crate::limits::{answer, decide, LimitState, LimitStates, Reason, Verdict};
use crate::model::{Enforcement, LimitAmount, Meter};
use crate::redis_link::Redis;
use std::sync::atomic::Ordering;

/// Expired holds released per expiry round (the rest: next round).
const EXPIRY_BATCH: usize = 256;

impl From<SharedError> for ReservationError {
    fn from(e: SharedError) -> Self {
        match e {
            SharedError::Conflict(id) => {
                ReservationError::Conflict(format!("reservation {id:?} exists with another customer, meter or quantity"))
            }
            SharedError::Redis(e) => ReservationError::Unavailable(format!("reservations need redis, which failed: {e}")),
        }
    }
}

/// Decided in the reserve script: hard, finite `strict` and `leased` limits.
fn in_script(s: &LimitState) -> bool {
    s.limit.hard && s.limit.enforcement != Enforcement::Cached && matches!(s.limit.amount, LimitAmount::Finite(_))
}

/// Decided in the reserve script too, on the customer's credit key: a hard
/// credits balance (whatever its enforcement), atomically with the consumes'
/// takes (`grants::redis_consume`) and the other instances' holds.
fn credit_in_script(s: &LimitState) -> bool {
    s.limit.hard && s.limit.amount.is_credits()
}

impl ReservationPorts<'_> {
    /// Redis, when holds live there.
    pub(super) fn shared(&self) -> Option<&Redis> {
        self.limits.redis.filter(|_| self.holds.is_shared())
    }

    /// The `strict` and `leased` windows (`scripted`, indices into `states`)
    /// at `at`, with this instance's own usage of each.
    #[allow(clippy::too_many_arguments)]
    fn windows(
        &self,
        redis: &Redis,
        (customer, name): (crate::counters::CustomerId, &str),
        meter: &Meter,
        states: &[LimitState],
        scripted: &[usize],
        at: i64,
        anchor: crate::model::BillingAnchor,
    ) -> Vec<WindowCheck> {
        scripted
            .iter()
            .map(|&i| {
                let s = &states[i];
                let key = crate::counters::Counters::key(customer, meter.id, s.limit.window, at, anchor);
                let own = self.limits.reads.counters.windows.get(&key, |c| c.value.load(Ordering::Acquire)).unwrap_or(0);
                WindowCheck {
                    redis_key: redis.keys.window(name, &meter.name, key.kind, key.start_ms),
                    limit: match s.limit.amount {
                        LimitAmount::Finite(l) => l,
                        LimitAmount::Unlimited | LimitAmount::Credits { .. } => -1,
                    },
                    own,
                    expire_at: crate::redis_link::keys::expire_at(&key),
                    leased: s.limit.enforcement == Enforcement::Leased,
                }
            })
            .collect()
    }

    /// The credit check of a hold on `meter`: this instance's view of the
    /// balance, as a consume's take sends it.
    fn credit_check(&self, redis: &Redis, (customer, name): (crate::counters::CustomerId, &str), meter: &Meter, now: i64) -> CreditCheck {
        let (balance, own, others) = self.limits.reads.credits.shared_view(customer, meter.id, now);
        CreditCheck { redis_key: redis.keys.credits(name, &meter.name), own, base: balance.saturating_add(own).saturating_add(others) }
    }

    /// The credit total `t` the reserve script answered: the other
    /// instances' usage in it is charged here, and `state` read again.
    fn learn_credits(&self, customer: crate::counters::CustomerId, meter: &Meter, state: &mut LimitState, total: i64, now: i64) {
        let credits = self.limits.reads.credits;
        credits.learn_total(customer, meter.id, total, now);
        let low = crate::credits::CreditBook::low_balance_of(std::slice::from_ref(&state.limit));
        let held = state.held;
        *state = self.limits.reads.credit_state(Some(customer), meter, state.limit, low, now);
        state.held = held;
    }

    fn note_held(&self, customer: &str, meter: &Meter, held: Held) {
        if let Ok(id) = self.limits.reads.counters.interner.intern(customer) {
            self.holds.set_shared(id, meter.id, held);
        }
    }

    /// `POST /v1/reservations` with Redis.
    pub(super) async fn reserve_shared(
        &self,
        redis: &Redis,
        req: &ReserveRequest,
        meter: &Meter,
        quantity: i64,
    ) -> Result<ReserveAnswer, ReservationError> {
        exact_in_redis(quantity)?;
        let customer = self.limits.reads.counters.interner.intern(&req.customer).map_err(|_| ReservationError::CustomersFull)?;
        if let Some(reason) = self.limits.write_gate.refusal() {
            return Err(ReservationError::Unavailable(reason));
        }
        self.limits.refresh_stale(&req.customer, meter).await;
        let ent = self.limits.reads.entitlements.get(Some(customer));
        let limits = ent.limits(meter.id).cloned().unwrap_or_default();
        let guard = self.limits.consume_locks.lock(customer, meter.id).await;
        let now = now_ms();
        let mut states = self.limits.reads.limit_states(Some(customer), meter, &ent, &limits, now);
        let local: LimitStates = states.iter().copied().filter(|s| !in_script(s) && !credit_in_script(s)).collect();
        // No limit at all: not entitled; else the local ones must allow.
        let local_allowed = !states.is_empty() && (local.is_empty() || decide(&local, quantity).allowed);
        let scripted: Vec<usize> = (0..states.len()).filter(|&i| in_script(&states[i])).collect();
        let windows = self.windows(redis, (customer, &req.customer), meter, &states, &scripted, now, ent.billing_anchor);
        // A hard credits balance: checked in the script after the windows.
        let credit_at = states.iter().position(credit_in_script);
        let credit = credit_at.map(|_| self.credit_check(redis, (customer, &req.customer), meter, now));
        let expires_at = req.expires_in.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        let take = Take { id: &req.id, customer: &req.customer, meter: &meter.name, quantity, expires_at, now, deny: !local_allowed };
        let outcome = store::reserve(redis, self.limits.instance_id, take, &windows, credit.as_ref()).await?;
        let mut r = Reservation {
            id: req.id.clone(),
            customer: req.customer.clone(),
            meter: meter.name.clone(),
            quantity,
            expires_at,
            status: Status::Denied,
            settled_quantity: None,
            created_ms: now,
            finished_ms: now,
        };
        let verdict = match outcome {
            ReserveOutcome::Held { held, totals } => {
                self.holds.set_shared(customer, meter.id, held);
                for (&i, &t) in scripted.iter().zip(&totals) {
                    states[i].used = t;
                }
                if let (Some(i), Some(&t)) = (credit_at, totals.get(scripted.len())) {
                    self.learn_credits(customer, meter, &mut states[i], t, now);
                }
                for s in &mut states {
                    s.held = held.total.saturating_sub(quantity).max(0);
                }
                let mut verdict = decide(&states, quantity);
                if !verdict.allowed {
                    // A stale view of the others' usage; the script decided.
                    verdict = Verdict { allowed: true, reason: Reason::WithinLimit, primary: verdict.primary };
                }
                for s in &mut states {
                    s.held = held.total;
                }
                r.status = Status::Held;
                r.finished_ms = 0;
                verdict
            }
            ReserveOutcome::Denied { index, total, held } => {
                self.holds.set_shared(customer, meter.id, held);
                for s in &mut states {
                    s.held = held.total;
                }
                let by = match index {
                    Some(n) if n == scripted.len() => credit_at,
                    Some(n) => scripted.get(n).copied(),
                    None => None,
                };
                match by {
                    Some(i) if Some(i) == credit_at => self.learn_credits(customer, meter, &mut states[i], total, now),
                    Some(i) => states[i].used = total,
                    None => {}
                }
                let verdict = decide(&states, quantity);
                if verdict.allowed {
                    // A stale view here; the script decided.
                    let reason = if by.is_some() && by == credit_at { Reason::InsufficientCredits } else { Reason::LimitExceeded };
                    Verdict { allowed: false, reason, primary: by.unwrap_or(0) }
                } else {
                    verdict
                }
            }
            ReserveOutcome::Exists { reservation, held } => {
                self.holds.set_shared(customer, meter.id, held);
                drop(guard);
                let (states, mut verdict) = self.limits.reads.evaluate(&reservation.customer, meter, 0, now_ms());
                verdict.allowed = reservation.status != Status::Denied;
                let check = answer(&reservation.customer, meter, quantity, &states, verdict);
                return Ok(ReserveAnswer { check, reservation: ReservationView::of(&reservation, meter.precision) });
            }
        };
        let mut check = answer(&req.customer, meter, quantity, &states, verdict);
        if r.status == Status::Held {
            // A consume decided here without the lock (one cached hard limit,
            // compare-and-swap) may have passed meanwhile: re-checked once the
            // hold is visible (see `LimitsPorts::consume_cas`).
            std::sync::atomic::fence(Ordering::SeqCst);
            let again = self.limits.reads.limit_states(Some(customer), meter, &ent, &limits, now);
            let over =
                |s: &LimitState| s.limit.hard && s.limit.enforcement == Enforcement::Cached && !credit_in_script(s) && s.exceeded_by(0);
            if again.iter().any(over) {
                let f = Finish {
                    id: &r.id,
                    customer: &r.customer,
                    meter: &meter.name,
                    status: Status::Denied,
                    settled: None,
                    now,
                    only_due: false,
                    windows: &[],
                    credit: None,
                    instance_id: self.limits.instance_id,
                };
                if let (FinishOutcome::Finished { reservation, held }, _) = store::finish(redis, f).await? {
                    self.holds.set_shared(customer, meter.id, held);
                    let mut states = again;
                    for s in &mut states {
                        s.held = held.total;
                    }
                    let verdict = decide(&states, quantity);
                    check = answer(&req.customer, meter, quantity, &states, Verdict { allowed: false, ..verdict });
                    r = reservation;
                    tracing::debug!(id = %r.id, "a hold was withdrawn: a consume passed the limit meanwhile");
                }
            }
        }
        drop(guard);
        crate::telemetry::hold_status(r.status.as_str());
        tracing::debug!(id = %r.id, status = r.status.as_str(), "reservation decided (shared)");
        Ok(ReserveAnswer { check, reservation: ReservationView::of(&r, meter.precision) })
    }

    /// `GET /v1/reservations/{id}` with Redis.
    pub(super) async fn get_shared(&self, redis: &Redis, id: &str) -> Result<ReservationAnswer, ReservationError> {
        let (r, _) = store::get(redis, id).await?.ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        Ok(self.view(&r))
    }

    /// Settle with Redis (see the module doc).
    pub(super) async fn settle_shared(&self, redis: &Redis, id: &str, req: SettleRequest) -> Result<ReservationAnswer, ReservationError> {
        let (r, _) = store::get(redis, id).await?.ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        let meter = self.meter(&r.meter)?;
        let quantity = match &req.quantity_text {
            None => r.quantity,
            Some(text) => crate::model::quantity::parse_decimal(text, meter.precision).map_err(|e| invalid("quantity", e.to_string()))?,
        };
        if quantity < 0 {
            return Err(invalid("quantity", "must not be negative"));
        }
        exact_in_redis(quantity)?;
        let now = now_ms();
        let ts = req.timestamp.unwrap_or(now);
        if ts > now + 5 * 60_000 {
            return Err(invalid("timestamp", "is more than 5 minutes in the future"));
        }
        match r.status {
            Status::Held | Status::Settled => {}
            other => return Err(ReservationError::Conflict(format!("reservation {id:?} is {}: it cannot be settled", other.as_str()))),
        }
        if let Some(reason) = self.limits.write_gate.refusal() {
            return Err(ReservationError::Unavailable(reason));
        }
        let customer = self.limits.reads.counters.interner.intern(&r.customer).map_err(|_| ReservationError::CustomersFull)?;
        let _guard = self.limits.consume_locks.lock(customer, meter.id).await;
        // Strict and leased windows get the usage at once (see `holds::shared`).
        let ent = self.limits.reads.entitlements.get(Some(customer));
        let limits = ent.limits(meter.id).cloned().unwrap_or_default();
        let states = self.limits.reads.limit_states(Some(customer), meter, &ent, &limits, ts);
        let scripted: Vec<usize> = (0..states.len()).filter(|&i| in_script(&states[i])).collect();
        let windows = self.windows(redis, (customer, &r.customer), meter, &states, &scripted, ts, ent.billing_anchor);
        // A hard credits balance gets the usage at once too; until it is
        // folded here, the quantity is this instance's own in the totals a
        // sync learns (as a consume's take: `CreditBook::taking`).
        let credits = self.limits.reads.credits;
        let credit_key = states.iter().any(credit_in_script).then(|| redis.keys.credits(&r.customer, &meter.name));
        let credit = credit_key.as_deref().map(|key| (key, credits.shared_view(customer, meter.id, now).1));
        let taking = if credit.is_some() { quantity } else { 0 };
        let f = Finish {
            id,
            customer: &r.customer,
            meter: &meter.name,
            status: Status::Settled,
            settled: Some((quantity, ts)),
            now,
            only_due: false,
            windows: &windows,
            credit,
            instance_id: self.limits.instance_id,
        };
        credits.taking(customer, meter.id, taking);
        let finished = store::finish(redis, f).await;
        let (outcome, stored_ts) = match finished {
            Ok(done) => done,
            Err(e) => {
                credits.taking(customer, meter.id, -taking);
                return Err(e.into());
            }
        };
        let (r, changed) = match outcome {
            FinishOutcome::Finished { reservation, held } => {
                self.holds.set_shared(customer, meter.id, held);
                (reservation, true)
            }
            FinishOutcome::Unchanged { reservation, held } => {
                self.holds.set_shared(customer, meter.id, held);
                (reservation, false)
            }
            FinishOutcome::NotFound => {
                credits.taking(customer, meter.id, -taking);
                return Err(ReservationError::NotFound(id.to_string()));
            }
        };
        // Only the settle that finished it moved the usage in Redis: that
        // quantity stays this instance's own until the record below folds it
        // (or fails: then a later sync charges it like the others' usage).
        let moved = if changed { taking } else { 0 };
        credits.taking(customer, meter.id, moved - taking);
        if r.status != Status::Settled {
            credits.taking(customer, meter.id, -moved);
            return Err(ReservationError::Conflict(format!("reservation {id:?} is {}: it cannot be settled", r.status.as_str())));
        }
        if changed {
            crate::telemetry::hold_status(Status::Settled.as_str());
        }
        // The first settle records; a later one (any instance) tries again,
        // which the id claims make a no-op unless the first never recorded.
        let settled = r.settled_quantity.unwrap_or(0);
        let recorded = if settled > 0 && now.saturating_sub(r.finished_ms) < self.limits.dedupe_window_ms {
            let ts = if stored_ts > 0 { stored_ts } else { ts };
            self.record(&r, customer, meter, settled, ts, now, Some(redis)).await
        } else {
            Ok(())
        };
        credits.taking(customer, meter.id, -moved);
        recorded?;
        Ok(self.view(&r))
    }

    /// Release (or expiry) with Redis. `only_due`: expiry, only once its time
    /// passed. `None` when there is no such reservation.
    pub(super) async fn finish_shared(
        &self,
        redis: &Redis,
        customer: &str,
        meter: &str,
        id: &str,
        status: Status,
        only_due: bool,
    ) -> Result<Option<(Reservation, bool)>, ReservationError> {
        let f = Finish {
            id,
            customer,
            meter,
            status,
            settled: None,
            now: now_ms(),
            only_due,
            windows: &[],
            credit: None,
            instance_id: self.limits.instance_id,
        };
        let (outcome, _) = store::finish(redis, f).await?;
        let catalog_meter = self.limits.reads.catalog.meter_by_name(meter);
        let (r, held, changed) = match outcome {
            FinishOutcome::Finished { reservation, held } => (reservation, held, true),
            FinishOutcome::Unchanged { reservation, held } => (reservation, held, false),
            FinishOutcome::NotFound => return Ok(None),
        };
        if let Some(m) = catalog_meter {
            self.note_held(customer, m, held);
        }
        if changed {
            crate::telemetry::hold_status(r.status.as_str());
        }
        Ok(Some((r, changed)))
    }

    /// `POST /v1/reservations/{id}/release` with Redis.
    pub(super) async fn release_shared(&self, redis: &Redis, id: &str) -> Result<ReservationAnswer, ReservationError> {
        let (r, _) = store::get(redis, id).await?.ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        let (r, _) = self
            .finish_shared(redis, &r.customer, &r.meter, id, Status::Released, false)
            .await?
            .ok_or_else(|| ReservationError::NotFound(id.to_string()))?;
        Ok(self.view(&r))
    }

    /// Releases the holds whose expiry passed, from the shared index (every
    /// instance runs this; each hold is released once). Returns how many this
    /// instance released.
    pub(super) async fn expire_shared(&self, redis: &Redis, now: i64) -> Result<usize, ReservationError> {
        let mut released = 0;
        for (customer, meter, id, member) in store::due(redis, now, EXPIRY_BATCH).await? {
            let done = self.finish_shared(redis, &customer, &meter, &id, Status::Expired, true).await?;
            match done {
                Some((_, true)) => {
                    released += 1;
                    tracing::debug!(id = %id, "a reservation expired; its hold is released");
                }
                // Not due after all (a repeated request with another
                // expiry put it there): indexed at its own expiry, if any.
                Some((r, false)) if r.status == Status::Held => {
                    match r.expires_at {
                        Some(at) => store::index(redis, &member, at, false).await?,
                        None => store::unindex(redis, &member).await?,
                    }
                    continue;
                }
                _ => {}
            }
            store::unindex(redis, &member).await?;
        }
        Ok(released)
    }
}

/// With Redis a quantity is counted by Lua scripts, exact to 2^53 raw units:
/// a larger one is bad input (400 naming `quantity`), refused before anything
/// changes.
fn exact_in_redis(quantity: i64) -> Result<(), ReservationError> {
    if quantity > crate::redis_link::MAX_EXACT {
        return Err(invalid(
            "quantity",
            format!("is beyond 2^53 raw units ({}), the range shared reservations count exactly", crate::redis_link::MAX_EXACT),
        ));
    }
    Ok(())
}
