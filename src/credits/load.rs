//! Filling the book at start: every stored grant, then the usage the store
//! holds for credits meters, per minute (the WAL replay adds what the store does
//! not hold yet, through the usage seam). Also used to reload the grants when
//! another instance changed them.

use super::CreditBook;
use crate::counters::intern::Interner;
use crate::store::{EntitlementStore, Fold, StoreError, UsageQuery, UsageStore};

/// The most minute rows read per credits meter at start.
pub const MAX_HISTORY_MINUTES: usize = 50_000_000;

/// Installs every stored grant; returns how many.
pub async fn grants(book: &CreditBook, store: &dyn EntitlementStore, interner: &Interner) -> Result<usize, StoreError> {
    let mut n = 0;
    for (customer, doc) in store.list_grants().await? {
        let Some(meter) = book.catalog.meter_by_name(&doc.meter) else {
            tracing::warn!(customer = %customer, grant = %doc.id, meter = %doc.meter, "a stored grant names a meter no longer configured; skipped");
            continue;
        };
        let raw = match crate::model::quantity::parse_decimal(&doc.amount, meter.precision) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(customer = %customer, grant = %doc.id, error = %e, "a stored grant's amount no longer fits its meter; skipped");
                continue;
            }
        };
        let Ok(id) = interner.intern(&customer) else {
            tracing::warn!(customer = %customer, "customer table full: a stored grant is not loaded");
            continue;
        };
        if book.grant(id, &doc.id).as_ref() != Some(&doc) {
            book.install(id, &customer, doc, raw);
        }
        n += 1;
    }
    Ok(n)
}

/// Marks the meters customers' overrides make credits (the plans' are marked
/// when the book is made).
pub fn track_overrides(book: &CreditBook, entitlements: &crate::entitlements::EntitlementCache, interner: &Interner) {
    for customer in 0..u32::try_from(interner.len()).unwrap_or(u32::MAX) {
        track_overrides_of(book, &entitlements.get(Some(customer)));
    }
}

/// Marks the meters one customer's overrides make credits.
pub fn track_overrides_of(book: &CreditBook, ent: &crate::model::Entitlements) {
    for (meter, limits) in &ent.overrides {
        if limits.iter().any(|l| l.amount.is_credits()) {
            if !book.observes() {
                tracing::warn!(
                    meter = *meter,
                    "an override makes a meter credits but no plan has a credits limit: usage is not charged to balances"
                );
            }
            book.track_meter(*meter);
        }
    }
}

/// Grants, then the stored usage of every credits meter.
pub async fn load(
    book: &CreditBook,
    grant_store: &dyn EntitlementStore,
    usage_store: &dyn UsageStore,
    interner: &Interner,
    instance_id: &str,
    own_only: bool,
) -> Result<(), StoreError> {
    let n = grants(book, grant_store, interner).await?;
    let now = crate::clock::now_ms();
    let mut minutes = 0usize;
    for meter in book.catalog.meters() {
        if !book.is_credit_meter(meter.id) {
            continue;
        }
        let query = UsageQuery {
            instance_id: instance_id.to_string(),
            meter: meter.name.clone(),
            fold: Fold::Sum,
            from_ms: 0,
            to_ms: now.saturating_add(3_600_000),
            customer: None,
            own_only,
        };
        let points = usage_store.series(&query, 60_000, MAX_HISTORY_MINUTES).await?.data;
        for p in points {
            let Ok(id) = interner.intern(&p.customer) else { continue };
            book.load_minute(id, meter.id, p.start_ms, p.value);
            minutes += 1;
        }
    }
    book.publish_all();
    if n > 0 || minutes > 0 {
        tracing::info!(grants = n, minutes, "credit balances loaded");
    }
    Ok(())
}
