//! Period planning, without I/O: given one meter's stored totals per (customer,
//! closed period) and its ledger rows, what to send, cancel or record as failed.
//!
//! For each (customer, period) the *target* is the stored total in whole units,
//! rounded down (`floor(raw / 10^precision)`): Stripe takes whole numbers. The
//! target is recomputed from the cumulative stored total of the period each time,
//! so late fractions add up (2.5 then +0.6 reports 2, then 1 more); at most one
//! unit below the period's total is never billed. The ledger's sum (sent +
//! cancelled + failed) is what is *accounted for*; the difference is the delta:
//!
//! * positive: sent as a new event with the next identifier, or, when the period
//!   is older than Stripe accepts, recorded as failed (never sent);
//! * negative (a `latest` or `max` meter whose value went down): the period's
//!   outstanding events are cancelled when all were sent in the last 23 h (Stripe
//!   cancels within 24 h), after which the next run sends the new total;
//!   otherwise the excess is *overreported*: surfaced (metric, log, status) for a
//!   human, since Stripe cannot take it back.
//!
//! Every event is written to the ledger as `pending` (identifier and value)
//! before it is sent, and confirmed (`sent` or `failed`) after. A pending event
//! without a confirmation (the answer was lost, meterd crashed) is resent with
//! the *same* value before anything new is planned for its period: a recomputed
//! value under the same identifier would be dropped by Stripe as a duplicate and
//! the ledger would then disagree with Stripe.
//!
//! Customers without a `stripe_customer_id` are never sent; their units show as
//! `unmapped` in the status.

use crate::store::{LedgerKind, LedgerRow, SeriesPoint};
use sha2::Digest;
use std::collections::{BTreeMap, HashSet};

/// Stripe refuses events older than 35 days; keep an hour's margin.
pub const MAX_AGE_MS: i64 = 35 * 86_400_000 - 3_600_000;

/// Stripe cancels events received in the last 24 h; keep an hour's margin.
pub const CANCEL_WINDOW_MS: i64 = 23 * 3_600_000;

/// The identifier of delta `n` of (meter, customer, period): deterministic, so a
/// resend after any failure is recognised by Stripe; 43 to 53 characters, whatever
/// the length of the names (Stripe allows 100).
pub fn identifier(meter: &str, customer: &str, period_start_ms: i64, n: u32) -> String {
    let mut h = sha2::Sha256::new();
    h.update(meter.as_bytes());
    h.update([0]);
    h.update(customer.as_bytes());
    h.update([0]);
    h.update(period_start_ms.to_be_bytes());
    let digest = hex::encode(h.finalize());
    format!("meterd_{}_{n}", &digest[..32])
}

/// A delta to send (or record as failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub customer: String,
    pub stripe_customer_id: String,
    pub period_start_ms: i64,
    pub n: u32,
    pub identifier: String,
    pub value: i64,
}

/// An event to cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel {
    pub customer: String,
    pub stripe_customer_id: String,
    pub period_start_ms: i64,
    pub n: u32,
    pub identifier: String,
    /// The cancelled event's value.
    pub value: i64,
}

/// Reported more than is stored, beyond what can be cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overreport {
    pub customer: String,
    pub period_start_ms: i64,
    pub excess: i64,
}

/// One meter's totals over the planned periods, in whole units.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MeterSummary {
    /// Stored, for customers with a Stripe id.
    pub stored: i64,
    /// Sent and not cancelled.
    pub reported: i64,
    /// Recorded as failed (never sent).
    pub failed: i64,
    /// Still to send.
    pub pending: i64,
    /// Stored for customers without a Stripe id (never reported).
    pub unmapped: i64,
    pub overreported: i64,
    /// Start of the oldest period with something pending, Unix ms.
    pub oldest_pending_ms: Option<i64>,
}

/// What one meter needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterPlan {
    /// Pending events whose outcome is unknown: resend exactly as recorded.
    pub resends: Vec<Delta>,
    pub sends: Vec<Delta>,
    pub too_old: Vec<Delta>,
    pub cancels: Vec<Cancel>,
    pub overreports: Vec<Overreport>,
    pub summary: MeterSummary,
}

/// What became of one identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Recorded as pending, no answer recorded: may or may not be at Stripe.
    InFlight,
    Sent,
    Failed,
}

/// One identifier's event: its value (from its first record) and outcome.
struct Event<'a> {
    row: &'a LedgerRow,
    value: i64,
    outcome: Outcome,
    /// When Stripe took it (the `sent` row), for the cancel window.
    sent_at_ms: i64,
}

/// The events of one (customer, period), from its ledger rows (cancellations aside).
fn events_of<'a>(rows: &[&'a LedgerRow]) -> Vec<Event<'a>> {
    let mut by_id: BTreeMap<&str, Event<'a>> = BTreeMap::new();
    for r in rows.iter().copied() {
        if r.kind == LedgerKind::Cancelled {
            continue;
        }
        let e =
            by_id.entry(r.identifier.as_str()).or_insert(Event { row: r, value: r.value, outcome: Outcome::InFlight, sent_at_ms: r.at_ms });
        // The pending record carries the value that was sent; keep it.
        if r.kind == LedgerKind::Pending {
            e.row = r;
            e.value = r.value;
        }
        match r.kind {
            LedgerKind::Sent => {
                e.outcome = Outcome::Sent;
                e.sent_at_ms = r.at_ms;
            }
            LedgerKind::Failed => e.outcome = Outcome::Failed,
            LedgerKind::Pending | LedgerKind::Cancelled => {}
        }
    }
    by_id.into_values().collect()
}

/// Per (customer, period): the stored raw total and the ledger rows.
#[derive(Default)]
struct Slot<'a> {
    raw: i64,
    rows: Vec<&'a LedgerRow>,
}

/// Plans one meter. `points` are stored totals per (customer, period start) in
/// raw units at `scale`; `ledger` the rows of the same periods; `stripe_id` maps
/// a customer to its Stripe id.
pub fn plan_meter(
    meter: &str,
    scale: i64,
    points: &[SeriesPoint],
    ledger: &[LedgerRow],
    stripe_id: &dyn Fn(&str) -> Option<String>,
    now_ms: i64,
) -> MeterPlan {
    let mut slots: BTreeMap<(&str, i64), Slot<'_>> = BTreeMap::new();
    for p in points {
        slots.entry((p.customer.as_str(), p.start_ms)).or_default().raw = p.value;
    }
    for r in ledger {
        slots.entry((r.customer.as_str(), r.period_start_ms)).or_default().rows.push(r);
    }
    let mut plan = MeterPlan::default();
    let scale = scale.max(1);
    for ((customer, period_start_ms), slot) in slots {
        let target = slot.raw.max(0).div_euclid(scale);
        let events = events_of(&slot.rows);
        let cancelled: i64 = slot.rows.iter().filter(|r| r.kind == LedgerKind::Cancelled).map(|r| r.value).sum();
        let accounted: i64 = events.iter().map(|e| e.value).sum::<i64>() + cancelled;
        let failed: i64 = events.iter().filter(|e| e.outcome == Outcome::Failed).map(|e| e.value).sum();
        let in_flight: Vec<&Event<'_>> = events.iter().filter(|e| e.outcome == Outcome::InFlight).collect();
        let next_n = slot.rows.iter().map(|r| r.n.saturating_add(1)).max().unwrap_or(0);
        let s = &mut plan.summary;
        s.reported += accounted - failed - in_flight.iter().map(|e| e.value).sum::<i64>();
        s.failed += failed;
        let Some(sid) = stripe_id(customer) else {
            // Never reported; anything in the ledger stays as it was.
            s.unmapped += target;
            continue;
        };
        s.stored += target;
        if !in_flight.is_empty() {
            // Settle what may already be at Stripe before planning anything new.
            for e in in_flight {
                s.pending += e.value;
                plan.resends.push(Delta {
                    customer: customer.to_string(),
                    stripe_customer_id: e.row.stripe_customer_id.clone(),
                    period_start_ms,
                    n: e.row.n,
                    identifier: e.row.identifier.clone(),
                    value: e.value,
                });
            }
            s.oldest_pending_ms = Some(s.oldest_pending_ms.map_or(period_start_ms, |o| o.min(period_start_ms)));
            continue;
        }
        let delta = target - accounted;
        if delta > 0 {
            let d = Delta {
                customer: customer.to_string(),
                stripe_customer_id: sid,
                period_start_ms,
                n: next_n,
                identifier: identifier(meter, customer, period_start_ms, next_n),
                value: delta,
            };
            if period_start_ms < now_ms - MAX_AGE_MS {
                plan.too_old.push(d);
            } else {
                s.pending += delta;
                s.oldest_pending_ms = Some(s.oldest_pending_ms.map_or(period_start_ms, |o| o.min(period_start_ms)));
                plan.sends.push(d);
            }
        } else if delta < 0 {
            let cancelled_ids: HashSet<&str> =
                slot.rows.iter().filter(|r| r.kind == LedgerKind::Cancelled).map(|r| r.identifier.as_str()).collect();
            let outstanding: Vec<&Event<'_>> =
                events.iter().filter(|e| e.outcome == Outcome::Sent && !cancelled_ids.contains(e.row.identifier.as_str())).collect();
            let cancellable = !outstanding.is_empty() && outstanding.iter().all(|e| e.sent_at_ms >= now_ms - CANCEL_WINDOW_MS);
            if cancellable {
                s.oldest_pending_ms = Some(s.oldest_pending_ms.map_or(period_start_ms, |o| o.min(period_start_ms)));
                plan.cancels.extend(outstanding.into_iter().map(|e| Cancel {
                    customer: customer.to_string(),
                    stripe_customer_id: e.row.stripe_customer_id.clone(),
                    period_start_ms,
                    n: e.row.n,
                    identifier: e.row.identifier.clone(),
                    value: e.value,
                }));
            } else {
                s.overreported += -delta;
                plan.overreports.push(Overreport { customer: customer.to_string(), period_start_ms, excess: -delta });
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: i64 = 60_000;
    const NOW: i64 = 1_000 * 86_400_000;

    fn point(customer: &str, start_ms: i64, value: i64) -> SeriesPoint {
        SeriesPoint { customer: customer.into(), start_ms, value, last_ts: start_ms }
    }

    fn sent(customer: &str, period: i64, n: u32, value: i64, at_ms: i64) -> LedgerRow {
        LedgerRow {
            meter: "m".into(),
            customer: customer.into(),
            period_start_ms: period,
            n,
            identifier: identifier("m", customer, period, n),
            kind: LedgerKind::Sent,
            value,
            stripe_customer_id: format!("cus_{customer}"),
            at_ms,
            fence: 0,
        }
    }

    fn ids(c: &str) -> Option<String> {
        (c != "anon").then(|| format!("cus_{c}"))
    }

    #[test]
    fn identifiers_are_deterministic_short_and_distinct() {
        let long = "c".repeat(256);
        let a = identifier("m", &long, 0, 0);
        assert!(a.len() <= 100, "{a}");
        assert_eq!(a, identifier("m", &long, 0, 0));
        assert_ne!(a, identifier("m", &long, 0, 1));
        assert_ne!(a, identifier("m", &long, P, 0));
        assert_ne!(a, identifier("n", &long, 0, 0));
        assert_ne!(identifier("m", "ab", 0, 0), identifier("ma", "b", 0, 0));
    }

    #[test]
    fn sends_deltas_floors_fractions_skips_zero_and_unmapped() {
        let t = NOW - 10 * P;
        let points = [point("a", t, 250), point("b", t, 99), point("anon", t, 700), point("c", t, 300)];
        // c is fully reported already.
        let ledger = [sent("c", t, 0, 3, NOW - P)];
        let plan = plan_meter("m", 100, &points, &ledger, &ids, NOW);
        assert_eq!(plan.sends.len(), 1, "{:?}", plan.sends);
        assert_eq!((plan.sends[0].customer.as_str(), plan.sends[0].value, plan.sends[0].n), ("a", 2, 0));
        assert_eq!(
            plan.summary,
            MeterSummary { stored: 5, reported: 3, pending: 2, unmapped: 7, oldest_pending_ms: Some(t), ..Default::default() }
        );
    }

    #[test]
    fn late_usage_is_a_new_delta_with_the_next_identifier() {
        let t = NOW - 10 * P;
        let plan = plan_meter("m", 100, &[point("a", t, 310)], &[sent("a", t, 0, 2, NOW - P)], &ids, NOW);
        assert_eq!(
            plan.sends,
            vec![Delta {
                customer: "a".into(),
                stripe_customer_id: "cus_a".into(),
                period_start_ms: t,
                n: 1,
                identifier: identifier("m", "a", t, 1),
                value: 1
            }]
        );
    }

    #[test]
    fn too_old_periods_are_failures_and_failures_count_as_accounted() {
        let old = NOW - 36 * 86_400_000;
        let plan = plan_meter("m", 1, &[point("a", old, 5)], &[], &ids, NOW);
        assert!(plan.sends.is_empty());
        assert_eq!(plan.too_old.len(), 1);
        let failed = LedgerRow { kind: LedgerKind::Failed, ..sent("a", old, 0, 5, NOW) };
        let again = plan_meter("m", 1, &[point("a", old, 5)], &[failed], &ids, NOW);
        assert!(again.sends.is_empty() && again.too_old.is_empty(), "not retried forever");
        assert_eq!((again.summary.failed, again.summary.reported), (5, 0));
    }

    #[test]
    fn an_unconfirmed_event_is_resent_as_recorded_before_anything_new() {
        let t = NOW - 10 * P;
        let pending = LedgerRow { kind: LedgerKind::Pending, ..sent("a", t, 0, 10, NOW - P) };
        // Late usage arrived meanwhile (14 stored): still resend 10, not 14.
        let plan = plan_meter("m", 1, &[point("a", t, 14)], std::slice::from_ref(&pending), &ids, NOW);
        assert!(plan.sends.is_empty());
        assert_eq!(plan.resends.len(), 1);
        assert_eq!((plan.resends[0].identifier.as_str(), plan.resends[0].value), (pending.identifier.as_str(), 10));
        assert_eq!((plan.summary.pending, plan.summary.reported), (10, 0));
        // Confirmed: the late 4 go as the next delta.
        let confirmed = sent("a", t, 0, 10, NOW);
        let next = plan_meter("m", 1, &[point("a", t, 14)], &[pending, confirmed], &ids, NOW);
        assert!(next.resends.is_empty());
        assert_eq!(next.sends.iter().map(|d| (d.n, d.value)).collect::<Vec<_>>(), vec![(1, 4)]);
        assert_eq!(next.summary.reported, 10);
    }

    #[test]
    fn decreases_cancel_recent_events_or_are_overreported() {
        let t = NOW - 10 * P;
        let ledger = [sent("a", t, 0, 10, NOW - 3_600_000)];
        let plan = plan_meter("m", 1, &[point("a", t, 4)], &ledger, &ids, NOW);
        assert_eq!(plan.cancels.len(), 1);
        assert_eq!(plan.cancels[0].identifier, identifier("m", "a", t, 0));
        // After the cancel: the full total goes again, as delta 1.
        let cancelled = LedgerRow { kind: LedgerKind::Cancelled, value: -10, ..ledger[0].clone() };
        let after = plan_meter("m", 1, &[point("a", t, 4)], &[ledger[0].clone(), cancelled], &ids, NOW);
        assert_eq!(after.sends.len(), 1);
        assert_eq!((after.sends[0].n, after.sends[0].value), (1, 4));
        // Sent more than 23 h ago: cannot be cancelled.
        let old = [sent("a", t, 0, 10, NOW - 25 * 3_600_000)];
        let over = plan_meter("m", 1, &[point("a", t, 4)], &old, &ids, NOW);
        assert!(over.cancels.is_empty() && over.sends.is_empty());
        assert_eq!(over.overreports, vec![Overreport { customer: "a".into(), period_start_ms: t, excess: 6 }]);
        assert_eq!(over.summary.overreported, 6);
    }
}
