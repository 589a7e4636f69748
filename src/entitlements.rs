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
    entries: DashMap<CustomerId, (Arc<Entitlements>, EntitlementsDoc), crate::counters::hash::KeyHash>,
    default: Arc<Entitlements>,
}

impl EntitlementCache {
    /// Loads every stored document. Documents that no longer resolve (a plan or
    /// meter removed from the config) are logged and fall back to the default plan.
    pub async fn load(
        catalog: Arc<Catalog>,
        store: Arc<dyn EntitlementStore>,
        interner: &Interner,
    ) -> Result<EntitlementCache, EntitlementsError> {
        let cache = EntitlementCache {
            default: Arc::new(Entitlements::default_for(&catalog)),
            catalog,
            store,
            entries: DashMap::with_hasher(crate::counters::hash::KeyHash),
        };
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
        customer.and_then(|id| self.entries.get(&id).map(|e| e.0.clone())).unwrap_or_else(|| self.default.clone())
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
        let resolved = Arc::new(Entitlements::resolve(&doc, &self.catalog).map_err(EntitlementsError::Invalid)?);
        self.entries.insert(customer, (resolved.clone(), doc));
        Ok(resolved)
    }

    /// Forgets a customer's document (deleted from the store): the default plan applies.
    pub fn remove(&self, customer: CustomerId) -> Arc<Entitlements> {
        self.entries.remove(&customer);
        self.default.clone()
    }

    /// The customers with a cached document.
    pub fn customers(&self) -> Vec<CustomerId> {
        self.entries.iter().map(|e| *e.key()).collect()
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn EntitlementStore> {
        &self.store
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}
