//! The usage summary (`GET /v1/customers/{c}/usage`): one row per limit with used,
//! remaining, percent and reset time, plus the customer's features.

use super::{view, LimitReads, LimitState};
use crate::engine::now_ms;
use crate::model::{Decimal, LimitAmount};
use serde::Serialize;
use std::collections::BTreeMap;

/// One limit of one meter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    pub meter: String,
    pub window: &'static str,
    pub used: Decimal,
    /// Held by reservations (issue 19).
    pub held: Decimal,
    pub limit: Option<Decimal>,
    pub remaining: Option<Decimal>,
    /// Used as a percentage of the limit, two decimals; null when unlimited.
    pub percent: Option<f64>,
    pub resets_at: Option<crate::model::window::Rfc3339>,
    pub hard: bool,
}

/// The whole summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageSummary {
    pub customer: String,
    pub plan: String,
    pub meters: Vec<SummaryRow>,
    pub features: BTreeMap<String, bool>,
}

fn percent(state: &LimitState) -> Option<f64> {
    match state.limit.amount {
        LimitAmount::Unlimited => None,
        LimitAmount::Finite(0) | LimitAmount::Credits { granted: 0, .. } => Some(if state.used > 0 { 100.0 } else { 0.0 }),
        // Display only: the exact figures are `used` and `limit`.
        LimitAmount::Finite(l) | LimitAmount::Credits { granted: l, .. } => Some((state.used as f64 / l as f64 * 10_000.0).round() / 100.0),
    }
}

impl LimitReads<'_> {
    /// The summary for `customer`; an unknown customer gets the default plan with
    /// zero usage.
    pub fn summary(&self, customer: &str) -> UsageSummary {
        let id = self.counters.interner.lookup(customer);
        let ent = self.entitlements.get(id);
        let now = now_ms();
        let mut rows = Vec::new();
        for meter in self.catalog.meters() {
            let Some(limits) = ent.limits(meter.id) else { continue };
            for state in self.limit_states(id, meter, &ent, limits, now) {
                let v = view(&state, meter);
                rows.push(SummaryRow {
                    meter: meter.name.clone(),
                    window: v.window,
                    used: v.used,
                    held: v.held,
                    limit: v.limit,
                    remaining: v.remaining,
                    percent: percent(&state),
                    resets_at: v.resets_at,
                    hard: v.hard,
                });
            }
        }
        UsageSummary { customer: customer.to_string(), plan: ent.plan.name.clone(), meters: rows, features: ent.features.clone() }
    }
}
