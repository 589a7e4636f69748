//! The in-process entitlements cache: resolved [`Entitlements`] per customer, as an
//! `Arc` snapshot so a check reads them without locks or copies.
//!
//! Every stored document is loaded at start (from SQLite, or from Redis's index
//! of customers), so a customer absent from the cache simply has the default plan
//! and a check never waits on the store. With Redis, changes made on other
//! instances arrive by pub/sub and a periodic reload (`sync::entitlements`).

use crate::counters::{CustomerId, Interner};
use crate::model::{Catalog, Entitlements, EntitlementsDoc, SpecProblem};
use crate::store::{EntitlementStore, StoreError};
use dashmap::DashMap;
use std::sync::Arc;

/// Why entitlements could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum EntitlementsError {
    #[error("invalid entitlements")]
    Invalid(Vec<SpecProblem>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("customer table is full: {0}")]
    Intern(#[from] crate::counters::intern::InternError),
}

/// Cached entitlements in front of the store.
pub struct EntitlementCache {
    catalog: Arc<Catalog>,
    store: Arc<dyn EntitlementStore>,
    entries: DashMap<CustomerId, (Arc<Entitlements>, EntitlementsDoc), crate::keyhash::KeyHash>,
    /// The default plan's entitlements: swapped when a reload changes plans.
    default: arc_swap::ArcSwap<Entitlements>,
    /// Loaded on first sight (Redis) instead of all at start: when each customer
    /// was last read, and the loads in flight (one per customer, however many
    /// requests wait for it).
    lazy: Option<Lazy>,
}

/// The state of on-demand loading.
pub struct Lazy {
    pub ttl_ms: i64,
    fetched: DashMap<CustomerId, i64, crate::keyhash::KeyHash>,
    loading: DashMap<CustomerId, Arc<tokio::sync::OnceCell<()>>, crate::keyhash::KeyHash>,
}

/// Whether a customer's cached entitlements may be used as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Loaded within the TTL (or embedded: everything is loaded).
    Fresh,
    /// Loaded, but longer ago than the TTL: use it, refresh in the background.
    Stale,
    /// Never loaded on this instance.
    Missing,
}

impl EntitlementCache {
    /// Loads every stored document. Documents that no longer resolve (a plan or
    /// meter removed from the config) are logged and fall back to the default plan.
    ///
    /// With `lazy_ttl` nothing is read now: customers are loaded on first sight
    /// and re-read when older than the TTL (see `sync::customer`).
    pub async fn load(
        catalog: Arc<Catalog>,
        store: Arc<dyn EntitlementStore>,
        interner: &Interner,
        lazy_ttl: Option<std::time::Duration>,
    ) -> Result<EntitlementCache, EntitlementsError> {
        let cache = EntitlementCache {
            default: arc_swap::ArcSwap::from_pointee(Entitlements::default_for(&catalog)),
            catalog,
            store,
            entries: DashMap::with_hasher(crate::keyhash::KeyHash),
            lazy: lazy_ttl.map(|ttl| Lazy {
                ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                fetched: DashMap::with_hasher(crate::keyhash::KeyHash),
                loading: DashMap::with_hasher(crate::keyhash::KeyHash),
            }),
        };
        if cache.lazy.is_some() {
            return Ok(cache);
        }
        for (customer, doc) in cache.store.list().await? {
            match Entitlements::resolve(&doc, &cache.catalog) {
                Ok(e) => {
                    let id = interner.intern(&customer)?;
                    cache.entries.insert(id, (Arc::new(e), doc));
                }
                Err(problems) => {
                    let problems: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.path, p.reason)).collect();
                    tracing::warn!(customer = %customer, ?problems, "stored entitlements no longer match the config; using the default plan");
                }
            }
        }
        Ok(cache)
    }

    /// The customer's entitlements (the default plan if none are stored).
    pub fn get(&self, customer: Option<CustomerId>) -> Arc<Entitlements> {
        customer.and_then(|id| self.entries.get(&id).map(|e| e.0.clone())).unwrap_or_else(|| self.default.load_full())
    }

    /// The stored document, if any.
    pub fn doc(&self, customer: Option<CustomerId>) -> Option<EntitlementsDoc> {
        customer.and_then(|id| self.entries.get(&id).map(|e| e.1.clone()))
    }

    /// Validates, stores, then caches a document; returns the resolved view.
    pub async fn put(&self, customer: CustomerId, name: &str, doc: EntitlementsDoc) -> Result<Arc<Entitlements>, EntitlementsError> {
        Entitlements::resolve(&doc, &self.catalog).map_err(EntitlementsError::Invalid)?;
        self.store.put(name, &doc).await?;
        self.install(customer, doc)
    }

    /// Caches a document read from the store (another instance wrote it).
    pub fn install(&self, customer: CustomerId, doc: EntitlementsDoc) -> Result<Arc<Entitlements>, EntitlementsError> {
        // Resolved under the entry's lock: a reload's [`Self::refresh`] either
        // sees this entry or ran before it was resolved (against the new plans).
        let entry = self.entries.entry(customer);
        let resolved = Arc::new(Entitlements::resolve(&doc, &self.catalog).map_err(EntitlementsError::Invalid)?);
        match entry {
            dashmap::Entry::Occupied(mut o) => {
                o.insert((resolved.clone(), doc));
            }
            dashmap::Entry::Vacant(v) => {
                v.insert((resolved.clone(), doc));
            }
        }
        Ok(resolved)
    }

    /// Forgets a customer's document (deleted from the store): the default plan applies.
    pub fn remove(&self, customer: CustomerId) -> Arc<Entitlements> {
        self.entries.remove(&customer);
        self.default.load_full()
    }

    /// How usable the cached entry of `customer` is at `now`.
    pub fn freshness(&self, customer: CustomerId, now: i64) -> Freshness {
        let Some(lazy) = &self.lazy else { return Freshness::Fresh };
        match lazy.fetched.get(&customer).map(|t| *t) {
            None => Freshness::Missing,
            Some(t) if now.saturating_sub(t) < lazy.ttl_ms => Freshness::Fresh,
            Some(_) => Freshness::Stale,
        }
    }

    /// Records that `customer` was read from the store at `at`.
    pub fn mark_fetched(&self, customer: CustomerId, at: i64) {
        if let Some(lazy) = &self.lazy {
            lazy.fetched.insert(customer, at);
        }
    }

    /// Makes every loaded customer stale (messages may have been missed).
    pub fn expire_all(&self) {
        if let Some(lazy) = &self.lazy {
            lazy.fetched.alter_all(|_, _| i64::MIN);
        }
    }

    /// The load in flight for `customer`, started by whoever asks first.
    pub fn loading(&self, customer: CustomerId) -> Option<Arc<tokio::sync::OnceCell<()>>> {
        let lazy = self.lazy.as_ref()?;
        Some(lazy.loading.entry(customer).or_insert_with(|| Arc::new(tokio::sync::OnceCell::new())).clone())
    }

    /// The load of `customer` finished: the next stale read starts a new one.
    pub fn loaded(&self, customer: CustomerId) {
        if let Some(lazy) = &self.lazy {
            lazy.loading.remove(&customer);
        }
    }

    // Live plan changes (config reload, issue 23).
    /// The cached customers whose documents do not resolve against `catalog`
    /// (their plan is gone), as the plan names they name and how many.
    pub fn unresolved(&self, catalog: &Catalog) -> Vec<(String, usize)> {
        let mut missing: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for entry in self.entries.iter() {
            if Entitlements::resolve(&entry.1, catalog).is_err() {
                *missing.entry(entry.1.plan.clone().unwrap_or_default()).or_default() += 1;
            }
        }
        missing.into_iter().collect()
    }

    /// Re-resolves every cached customer and the default against the catalog's
    /// plans (after [`Catalog::replace_plans`]). Checks keep reading meanwhile:
    /// the new resolutions are made under shared locks, then each is swapped
    /// in under its entry's lock unless an install replaced the entry in
    /// between (that one resolved against the new plans already). A customer
    /// whose plan is unchanged keeps its entry; one whose document no longer
    /// resolves keeps what it had (logged).
    pub fn refresh(&self) {
        self.default.store(Arc::new(Entitlements::default_for(&self.catalog)));
        let mut changed = Vec::new();
        let mut kept = 0usize;
        for entry in self.entries.iter() {
            let (resolved, doc) = entry.value();
            let plan = match &doc.plan {
                None => Some(self.catalog.default_plan()),
                Some(name) => self.catalog.plan(name),
            };
            if plan.as_deref() == Some(&*resolved.plan) {
                continue;
            }
            match Entitlements::resolve(doc, &self.catalog) {
                Ok(e) => changed.push((*entry.key(), resolved.clone(), Arc::new(e))),
                Err(_) => kept += 1,
            }
        }
        for (customer, before, after) in changed {
            if let Some(mut entry) = self.entries.get_mut(&customer) {
                if Arc::ptr_eq(&entry.0, &before) {
                    entry.0 = after;
                }
            }
        }
        if kept > 0 {
            tracing::warn!(
                customers = kept,
                "stored entitlements do not resolve against the reloaded plans; they keep their previous plan"
            );
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    // Customers and Stripe subscription sync (issue 20).
    /// The store behind the cache (listing customers, finding one by its
    /// Stripe customer id, reading the current document before a change).
    pub fn store(&self) -> &Arc<dyn EntitlementStore> {
        &self.store
    }

    /// Deletes a customer's document from the store (the default plan applies).
    /// The cache is updated by the caller, through the backfill path.
    pub async fn delete(&self, name: &str) -> Result<(), EntitlementsError> {
        Ok(self.store.delete(name).await?)
    }
}

// Live plan changes (config reload, issue 23).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Aggregation, Enforcement, Limit, LimitAmount, Meter, Plan, WindowKind};
    use std::collections::{BTreeMap, HashMap};

    fn catalog(limit: i64) -> Catalog {
        let meter = Meter {
            id: 0,
            name: "m".into(),
            aggregation: Aggregation::Sum,
            precision: 0,
            stripe_event_name: None,
            unique_property: None,
            group_by: Vec::new(),
        };
        let one = |n| -> Arc<[Limit]> {
            Arc::from(vec![Limit {
                window: WindowKind::Month,
                amount: LimitAmount::Finite(n),
                hard: true,
                enforcement: Enforcement::Cached,
                notify: None,
            }])
        };
        let p = Plan { name: "p".into(), features: BTreeMap::new(), limits: HashMap::from([(0, one(limit))]) };
        let d = Plan { name: "d".into(), features: BTreeMap::new(), limits: HashMap::from([(0, one(limit + 1))]) };
        Catalog::new(vec![meter], vec![d, p], 0)
    }

    fn limit_of(e: &Entitlements) -> Option<LimitAmount> {
        e.limits(0).and_then(|l| l.first()).map(|l| l.amount)
    }

    /// Installs race a plan swap and refresh: every customer ends on the new
    /// plans (none keeps a resolution made against the old ones), and so does
    /// the default.
    #[test]
    fn installs_racing_a_plan_swap_all_end_on_the_new_plans() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store: Arc<dyn EntitlementStore> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("s.sqlite")).unwrap_or_else(|e| panic!("{e}")));
        let doc = EntitlementsDoc { plan: Some("p".into()), ..Default::default() };
        for round in 0..20i64 {
            let old = Arc::new(catalog(10 + round));
            let cache =
                rt.block_on(EntitlementCache::load(old.clone(), store.clone(), &Interner::new(), None)).unwrap_or_else(|e| panic!("{e}"));
            let new = catalog(1000 + round);
            std::thread::scope(|s| {
                for t in 0..4u32 {
                    let (cache, doc) = (&cache, doc.clone());
                    s.spawn(move || {
                        for i in 0..500 {
                            cache.install(t * 1000 + i, doc.clone()).unwrap_or_else(|e| panic!("{e}"));
                        }
                    });
                }
                s.spawn(|| {
                    std::thread::yield_now();
                    old.replace_plans(&new);
                    cache.refresh();
                });
            });
            let mut on_new = 0;
            for t in 0..4u32 {
                for i in 0..500 {
                    let e = cache.get(Some(t * 1000 + i));
                    assert_eq!(e.plan.name, "p");
                    assert_eq!(limit_of(&e), Some(LimitAmount::Finite(1000 + round)), "round {round}: customer {t}/{i} kept the old plan");
                    on_new += 1;
                }
            }
            assert_eq!(on_new, 2000);
            assert_eq!(limit_of(&cache.get(None)), Some(LimitAmount::Finite(1001 + round)), "the default plan refreshed");
            assert_eq!(limit_of(&cache.get(Some(99_999))), Some(LimitAmount::Finite(1001 + round)));
        }
    }
}
