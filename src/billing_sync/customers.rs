//! The customer directory behind `GET /v1/customers`: every customer with
//! stored entitlements, or with usage in a current window on this instance,
//! in name order, a page at a time (the cursor is the last name returned).

use crate::counters::window::WindowCell;
use crate::engine::{now_ms, Engine};
use crate::model::WindowKind;
use crate::store::StoreError;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// One row of the directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CustomerRow {
    pub customer: String,
    pub plan: String,
    pub stripe_customer_id: Option<String>,
}

/// One page and the cursor of the next (`None`: this was the last).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Page {
    pub customers: Vec<CustomerRow>,
    pub next: Option<String>,
}

/// The end of the window a counter key belongs to.
fn window_end(kind: WindowKind, start_ms: i64) -> i64 {
    match kind {
        WindowKind::Total => i64::MAX,
        // Anchored per customer: a cycle is at most 31 days.
        WindowKind::BillingCycle => start_ms.saturating_add(31 * 86_400_000),
        kind => kind.bounds(start_ms, Default::default()).end_ms,
    }
}

/// Customers whose names start with `prefix` and sort after `after`, at most `limit`.
pub async fn page(engine: &Engine, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, StoreError> {
    let catalog = engine.catalog();
    let default = catalog.default_plan().name.clone();
    let wanted = |name: &str| name.starts_with(prefix) && after.is_none_or(|a| name > a);
    let mut rows: BTreeMap<String, CustomerRow> = BTreeMap::new();
    for (name, doc) in engine.entitlements().store().list().await? {
        if wanted(&name) {
            let plan = doc.plan.clone().unwrap_or_else(|| default.clone());
            rows.insert(name.clone(), CustomerRow { customer: name, plan, stripe_customer_id: doc.stripe_customer_id });
        }
    }
    let now = now_ms();
    let counters = engine.counters();
    let mut with_usage = std::collections::HashSet::new();
    counters.windows.for_each(|key, cell: &WindowCell| {
        let used = cell.value.load(Ordering::Acquire) > 0 || cell.others.load(Ordering::Acquire) > 0;
        if used && key.start_ms <= now && now < window_end(key.kind, key.start_ms) {
            with_usage.insert(key.customer);
        }
    });
    for id in with_usage {
        let Some(name) = counters.interner.name(id) else { continue };
        if wanted(&name) && !rows.contains_key(name.as_ref() as &str) {
            let ent = engine.entitlements().get(Some(id));
            let row =
                CustomerRow { customer: name.to_string(), plan: ent.plan.name.clone(), stripe_customer_id: ent.stripe_customer_id.clone() };
            rows.insert(name.to_string(), row);
        }
    }
    let more = rows.len() > limit;
    let customers: Vec<CustomerRow> = rows.into_values().take(limit).collect();
    let next = if more { customers.last().map(|r| r.customer.clone()) } else { None };
    Ok(Page { customers, next })
}
