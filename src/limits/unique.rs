//! Checks and consumes on `unique_count` meters (issue 25): "may this customer
//! add another active user?".
//!
//! A check may name the `value` it asks about. One already counted in every
//! limit's window is allowed (it adds nothing); any other needs `count + 1` to
//! fit every limit. Without a value a check asks about `quantity` new values
//! (default 1). A consume must name its value; it is decided and recorded under
//! the `(customer, meter)` consume lock, as an event carrying the value in the
//! meter's `unique_property`, so it is counted once in each window (through the
//! usage seam: `counters::unique`), replayed from the WAL and stored like any
//! event. Limits on these meters are `cached` only (config validation).

use super::{answer, decide, invalid, CheckError, CheckRequest, LimitState, LimitStates, LimitsPorts, Reason, Verdict};
use crate::counters::unique::hash_value;
use crate::counters::{Counters, CustomerId, Usage};
use crate::dedupe::IdHash;
use crate::engine::now_ms;
use crate::model::{CheckAnswer, Entitlements, Limit, Meter};
use crate::usage::Origin;
use crate::wal::RecordBuilder;
use std::borrow::Cow;
use std::sync::Arc;

/// Whether every limit's current window counts `value` already.
fn counted(
    ports: &LimitsPorts<'_>,
    customer: Option<CustomerId>,
    meter: &Meter,
    ent: &Entitlements,
    limits: &[Limit],
    value: u128,
    now: i64,
) -> bool {
    let Some(customer) = customer else { return false };
    !limits.is_empty()
        && limits
            .iter()
            .all(|l| ports.reads.counters.unique.contains(&Counters::key(customer, meter.id, l.window, now, ent.billing_anchor), value))
}

/// The verdict on `quantity` new values, or on a value counted already
/// (allowed whatever the limits say: it adds nothing).
fn verdict(states: &[LimitState], quantity: i64, counted: bool) -> Verdict {
    let v = decide(states, quantity);
    if counted && !v.allowed && !states.is_empty() {
        return Verdict { allowed: true, reason: Reason::WithinLimit, primary: v.primary };
    }
    v
}

impl LimitsPorts<'_> {
    /// Answers `/v1/check` on a `unique_count` meter. `hashed` is the consume's
    /// id as `check` hashed it for its prefetch (hashed once, not twice).
    pub(super) async fn check_unique(
        &self,
        req: &CheckRequest,
        meter: &Meter,
        hashed: Option<IdHash>,
    ) -> Result<Arc<CheckAnswer>, CheckError> {
        let value = match &req.value {
            Some(v) if v.is_empty() || v.len() > 256 => return Err(invalid("value", "must be 1-256 bytes (a property value)")),
            other => other.clone(),
        };
        let scale = meter.scale();
        let asked = match (&value, &req.quantity_text) {
            (Some(_), _) | (None, None) => scale,
            (None, Some(text)) => crate::model::quantity::parse_decimal(text, 0).map_err(|e| invalid("quantity", e.to_string()))?,
        };
        if !req.consume {
            let now = now_ms();
            let id = if self.reads.counters.windows.is_shared() {
                self.reads.counters.interner.intern(&req.customer).ok()
            } else {
                self.reads.counters.interner.lookup(&req.customer)
            };
            let ent = self.reads.entitlements.get(id);
            let (states, counted) = match ent.limits(meter.id) {
                Some(limits) => {
                    let counted = value.as_deref().is_some_and(|v| counted(self, id, meter, &ent, limits, hash_value(v), now));
                    (self.reads.limit_states(id, meter, &ent, limits, now), counted)
                }
                None => (LimitStates::new(), false),
            };
            let quantity = if counted { 0 } else { asked };
            let verdict = verdict(&states, quantity, counted);
            crate::telemetry::decision(verdict.reason.as_str(), false, meter.id.into(), &meter.name);
            return Ok(Arc::new(answer(&req.customer, meter, quantity, &states, verdict)));
        }
        let Some(value) = value else {
            return Err(invalid("value", format!("is required when consume is true on unique_count meter {:?}", meter.name)));
        };
        let (id_hash, now, cell) = self.consume_slot(req, hashed)?;
        let answer = cell
            .get_or_try_init(|| async {
                match self.consumes.denial(id_hash, now) {
                    Some(reason) => Ok(Arc::new(self.denied_again(&req.customer, meter, scale, reason, now))),
                    None => self.consume_unique(&req.customer, meter, &value, id_hash, now).await.map(Arc::new),
                }
            })
            .await?;
        self.consumes.decided(id_hash, now, answer);
        Ok(answer.clone())
    }

    /// Decides and records a consume of one value, under the consume lock.
    async fn consume_unique(&self, name: &str, meter: &Meter, value: &str, id_hash: u128, now: i64) -> Result<CheckAnswer, CheckError> {
        let one = meter.scale();
        let customer = self.reads.counters.interner.intern(name).map_err(|_| CheckError::Full)?;
        let ent = self.reads.entitlements.get(Some(customer));
        let Some(limits) = ent.limits(meter.id).cloned() else {
            crate::telemetry::decision(Reason::NotEntitled.as_str(), true, meter.id.into(), &meter.name);
            return Ok(answer(name, meter, one, &[], decide(&[], one)));
        };
        if let Some(reason) = self.write_gate.refusal() {
            return Err(CheckError::Unavailable(reason));
        }
        let hash = hash_value(value);
        // An id already used by an event: that usage is counted; record nothing.
        if !self.deduper.insert(id_hash, now) {
            let is_counted = counted(self, Some(customer), meter, &ent, &limits, hash, now);
            let states = self.reads.limit_states(Some(customer), meter, &ent, &limits, now);
            let quantity = if is_counted { 0 } else { one };
            let verdict = verdict(&states, quantity, is_counted);
            crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
            return Ok(answer(name, meter, quantity, &states, verdict));
        }
        let guard = self.consume_locks.lock(customer, meter.id).await;
        debug_assert!(guard.covers(customer, meter.id));
        let is_counted = counted(self, Some(customer), meter, &ent, &limits, hash, now);
        let quantity = if is_counted { 0 } else { one };
        let mut states = self.reads.limit_states(Some(customer), meter, &ent, &limits, now);
        let verdict = verdict(&states, quantity, is_counted);
        if !verdict.allowed || is_counted {
            // A denial, or a value counted already: nothing to record.
            if !verdict.allowed {
                self.deduper.remove(id_hash);
            }
            crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
            return Ok(answer(name, meter, quantity, &states, verdict));
        }
        // The cap of distinct values per window (`ingest.max_unique_values`).
        let sets = &self.reads.counters.unique;
        for kind in self.reads.counters.tracked_kinds(meter.id) {
            let key = Counters::key(customer, meter.id, kind, now, ent.billing_anchor);
            if let Err(size) = sets.admits(&key, hash) {
                self.deduper.remove(id_hash);
                crate::telemetry::unique_refused(1);
                return Err(invalid(
                    "value",
                    format!(
                        "a new value would pass ingest.max_unique_values ({}) in the {} window of meter {:?}, which counts {size} distinct values",
                        sets.cap(),
                        kind.as_str(),
                        meter.name
                    ),
                ));
            }
        }
        let property = meter.unique_property.as_deref().unwrap_or_default();
        let properties = [(Cow::Borrowed(property), Cow::Borrowed(value))];
        let mut record = RecordBuilder::new(now, 1);
        record.push(id_hash, customer, name, meter.id, &meter.name, one, now, &properties);
        let seq = match self.wal.append(record).await {
            Ok(seq) => seq,
            Err(e) => return Err(self.wal_refused(id_hash, e)),
        };
        let usage = Usage {
            customer,
            meter,
            raw: one,
            ts: now,
            properties: &properties,
            props_hash: crate::counters::props_hash(&properties),
            anchor: ent.billing_anchor,
        };
        self.usage.fold(&usage, None, Origin::Live, || self.wal.tracker.folded(seq));
        drop(guard);
        // Each window counts the value once: read the windows back.
        states = self.reads.limit_states(Some(customer), meter, &ent, &limits, now);
        crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
        Ok(answer(name, meter, quantity, &states, verdict))
    }
}
