//! Entitlement changes that need counters seeded.
//!
//! Window kinds used by the config's plans are tracked from start. An override may
//! introduce a kind no plan uses (a per-day cap for one customer), and a new
//! billing anchor moves that customer's `billing_cycle` window. Either way the
//! customer's current window must be seeded with the usage it already holds:
//! store rows, plus the in-memory epochs the store does not have yet. The seed is
//! taken under the buckets' exclusive lock, so no event is folded while it is
//! computed, and the epoch sequence numbers prove that nothing was stored between
//! the store query and the lock (otherwise it retries).

use crate::counters::{BucketKey, Counters, CustomerId};
use crate::engine::{now_ms, Engine, PlanKinds};
use crate::entitlements::{EntitlementCache, EntitlementsError};
use crate::model::{Catalog, Entitlements, EntitlementsDoc, Meter, WindowKind};
use crate::store::{Fold, UsageQuery, UsageStore};
use crate::usage::UsageSeam;
use std::sync::Arc;

/// What changing a customer's entitlements needs of the engine: the cache, the
/// kinds the plans track already, and what seeding a new window reads (the
/// store, the unflushed epochs) and writes (the usage seam).
#[derive(Clone, Copy)]
pub struct BackfillPorts<'a> {
    pub catalog: &'a Catalog,
    pub usage: &'a UsageSeam,
    pub entitlements: &'a EntitlementCache,
    pub plan_kinds: &'a PlanKinds,
    pub usage_store: &'a dyn UsageStore,
    pub instance_id: &'a str,
}

impl Engine {
    /// The entitlement writers' narrow view of the state.
    pub fn backfill_ports(&self) -> BackfillPorts<'_> {
        BackfillPorts {
            catalog: self.catalog(),
            usage: self.usage(),
            entitlements: self.entitlements(),
            plan_kinds: self.plan_kinds(),
            usage_store: self.usage_store().as_ref(),
            instance_id: self.instance_id(),
        }
    }
}

impl BackfillPorts<'_> {
    fn counters(&self) -> &Counters {
        self.usage.counters()
    }

    /// Stores a customer's entitlements and seeds any counters they newly need.
    pub async fn set_entitlements(&self, name: &str, doc: EntitlementsDoc) -> Result<Arc<Entitlements>, EntitlementsError> {
        let customer = self.counters().interner.intern(name)?;
        let before = self.entitlements.get(Some(customer));
        let after = self.entitlements.put(customer, name, doc).await?;
        self.entitlements.mark_fetched(customer, now_ms());
        self.seed_changed(customer, name, &before, &after).await?;
        Ok(after)
    }

    /// Applies a customer's entitlements as the store now has them (`None`:
    /// deleted), after another instance changed them. Returns whether the cache
    /// changed.
    pub async fn refresh_entitlements(&self, name: &str, doc: Option<EntitlementsDoc>) -> Result<bool, EntitlementsError> {
        let customer = self.counters().interner.intern(name)?;
        if self.entitlements.doc(Some(customer)) == doc {
            return Ok(false);
        }
        let before = self.entitlements.get(Some(customer));
        let after = match doc {
            Some(doc) => self.entitlements.install(customer, doc)?,
            None => self.entitlements.remove(customer),
        };
        self.seed_changed(customer, name, &before, &after).await?;
        Ok(true)
    }

    /// Seeds the windows `after` needs that `before` did not have.
    async fn seed_changed(
        &self,
        customer: CustomerId,
        name: &str,
        before: &Entitlements,
        after: &Entitlements,
    ) -> Result<(), EntitlementsError> {
        let mut seeds = Vec::new();
        for meter in self.catalog.meters() {
            let Some(limits) = after.limits(meter.id) else { continue };
            for limit in limits.iter() {
                let plan_kind = self.plan_kinds.tracks(meter.id, limit.window);
                let anchor_moved = limit.window == WindowKind::BillingCycle && before.billing_anchor != after.billing_anchor;
                if !plan_kind || anchor_moved {
                    seeds.push((meter.clone(), limit.window));
                }
            }
        }
        for (meter, kind) in seeds {
            self.seed(customer, name, &meter, kind, after).await?;
        }
        Ok(())
    }

    /// Seeds the current `kind` window of `(customer, meter)` and tracks the kind.
    async fn seed(
        &self,
        customer: CustomerId,
        name: &str,
        meter: &Meter,
        kind: WindowKind,
        ent: &Entitlements,
    ) -> Result<(), EntitlementsError> {
        let fold = Fold::from(meter.aggregation);
        for _attempt in 0..10 {
            let now = now_ms();
            let window = kind.bounds(now, ent.billing_anchor);
            let mut query = UsageQuery::for_window(self.instance_id, &meter.name, fold, &window, Some(name));
            if let Some(property) = meter.unique_property.as_deref() {
                // Issue 25: a unique_count window is seeded with its distinct values.
                if self.seed_unique(customer, meter, property, kind, ent, &query).await? {
                    return Ok(());
                }
                continue;
            }
            query.own_only = self.counters().windows.is_shared();
            let stored = self.usage_store.aggregate(&query).await?;
            let mut value = stored.data.first().map(|a| (a.value, a.last_ts)).unwrap_or((0, 0));
            let current = self.counters().buckets.exclusive();
            let flushing = self.counters().buckets.flushing();
            let lowest = flushing.as_ref().map(|f| f.seq).unwrap_or(current.seq);
            if lowest > stored.stored_seq + 1 {
                // A flush landed between the query and the lock: ask again.
                continue;
            }
            for epoch in flushing.iter().chain(std::iter::once(&*current)) {
                if epoch.seq <= stored.stored_seq {
                    continue;
                }
                epoch.buckets.for_each(|k: &BucketKey, bucket| {
                    let minute_ms = k.minute * 60_000;
                    if k.customer == customer && k.meter == meter.id && minute_ms >= window.start_ms && minute_ms < window.end_ms {
                        value = fold.combine(value, crate::counters::buckets::bucket_value(bucket));
                    }
                });
            }
            let key = Counters::key(customer, meter.id, kind, now, ent.billing_anchor);
            self.usage.set_window(key, value.0, value.1, crate::usage::Origin::Backfill);
            self.counters().track(meter.id, kind);
            return Ok(());
        }
        tracing::warn!(customer = %name, meter = %meter.name, window = %kind, "could not seed a new window counter: flushes kept landing");
        self.counters().track(meter.id, kind);
        Ok(())
    }

    /// Seeds a `unique_count` window with the distinct values of the store
    /// (every instance's rows) and of the unflushed epochs; `false` when a
    /// flush landed meanwhile (ask again).
    async fn seed_unique(
        &self,
        customer: CustomerId,
        meter: &Meter,
        property: &str,
        kind: WindowKind,
        ent: &Entitlements,
        query: &UsageQuery,
    ) -> Result<bool, EntitlementsError> {
        use crate::counters::unique::hash_value;
        let span = query.to_ms.saturating_sub(query.from_ms).max(1);
        let stored = self.usage_store.distinct_values(query, span, property, None, usize::MAX).await?;
        let mut values: Vec<u128> = stored.data.iter().map(|d| hash_value(&d.value)).collect();
        let current = self.counters().buckets.exclusive();
        let flushing = self.counters().buckets.flushing();
        let lowest = flushing.as_ref().map(|f| f.seq).unwrap_or(current.seq);
        if lowest > stored.stored_seq + 1 {
            return Ok(false);
        }
        for epoch in flushing.iter().chain(std::iter::once(&*current)) {
            if epoch.seq <= stored.stored_seq {
                continue;
            }
            epoch.buckets.for_each(|k: &BucketKey, bucket| {
                let minute_ms = k.minute * 60_000;
                if k.customer == customer && k.meter == meter.id && minute_ms >= query.from_ms && minute_ms < query.to_ms {
                    if let Some(v) = crate::counters::buckets::bucket_property(bucket, property) {
                        values.push(hash_value(v));
                    }
                }
            });
        }
        let key = Counters::key(customer, meter.id, kind, query.from_ms, ent.billing_anchor);
        self.usage.merge_unique(key, values, crate::usage::Origin::Backfill);
        self.counters().track(meter.id, kind);
        drop(current);
        Ok(true)
    }
}
