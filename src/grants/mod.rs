//! Grants and balances (issue 18), the service behind `POST/GET/DELETE
//! /v1/customers/{c}/grants` and `GET /v1/customers/{c}/balances`, and
//! [`GrantPorts::create_grant`] for code that makes grants (Stripe checkout).
//!
//! A grant is stored first (insert-if-new in the entitlement store, so a
//! repeated request is idempotent across instances), then installed in the
//! credit book, which answers every read. With Redis, other instances notice
//! through the store's grants version ([`refresh`]) and reload.

pub mod redis_consume;
pub mod slices;

use crate::counters::intern::Interner;
use crate::credits::{CreditBook, GrantView};
use crate::engine::Engine;
use crate::entitlements::EntitlementCache;
use crate::model::grant::{GrantProblem, GrantSpec};
use crate::model::window::rfc3339;
use crate::model::{Catalog, Decimal, LimitAmount};
use crate::store::{EntitlementStore, StoreError};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// Why a grant request failed.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(transparent)]
    Invalid(#[from] GrantProblem),
    #[error("grant {0:?} exists with another body")]
    Conflict(String),
    #[error("no grant {0:?}")]
    NotFound(String),
    #[error("customer table is full")]
    Full,
    #[error("could not store the grant: {0}")]
    Store(#[from] StoreError),
}

/// A grant as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GrantOut {
    pub id: String,
    pub meter: String,
    pub amount: Decimal,
    pub remaining: Decimal,
    pub priority: i64,
    pub effective_at: String,
    pub expires_at: Option<String>,
    pub status: &'static str,
    pub reason: Option<String>,
}

/// One meter's balance.
#[derive(Debug, Clone, Serialize)]
pub struct BalanceOut {
    pub meter: String,
    pub balance: Decimal,
    pub granted: Decimal,
    pub used: Decimal,
    pub next_expiry: Option<ExpiryOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExpiryOut {
    pub amount: Decimal,
    pub expires_at: String,
}

/// `GET /v1/customers/{c}/balances`.
#[derive(Debug, Clone, Serialize)]
pub struct Balances {
    pub customer: String,
    pub balances: Vec<BalanceOut>,
}

/// What the grants service needs of the engine.
#[derive(Clone, Copy)]
pub struct GrantPorts<'a> {
    pub catalog: &'a Catalog,
    pub credits: &'a CreditBook,
    pub store: &'a dyn EntitlementStore,
    pub interner: &'a Interner,
    pub entitlements: &'a EntitlementCache,
    /// With Redis: voids leave what slices of the balance stand on
    /// (`redis_link::credit_lease`).
    pub redis: Option<&'a crate::redis_link::Redis>,
    pub instance_id: &'a str,
}

impl Engine {
    /// The grants service's view of the state.
    pub fn grant_ports(&self) -> GrantPorts<'_> {
        GrantPorts {
            catalog: self.catalog(),
            credits: self.credits(),
            store: &**self.grant_store(),
            interner: &self.counters().interner,
            entitlements: self.entitlements(),
            redis: self.redis(),
            instance_id: self.instance_id(),
        }
    }
}

fn out(view: &GrantView, catalog: &Catalog) -> GrantOut {
    let precision = catalog.meter_by_name(&view.doc.meter).map_or(0, |m| m.precision);
    let d = |raw| Decimal { raw, precision };
    GrantOut {
        id: view.doc.id.clone(),
        meter: view.doc.meter.clone(),
        amount: d(view.amount),
        remaining: d(view.remaining),
        priority: view.doc.priority,
        effective_at: rfc3339(view.doc.effective_at_ms),
        expires_at: view.doc.expires_at_ms.map(rfc3339),
        status: view.status.as_str(),
        reason: view.doc.reason.clone(),
    }
}

impl GrantPorts<'_> {
    /// Makes a grant: `(grant, true)` when new (201), `(grant, false)` when the
    /// same grant was made before (200); [`GrantError::Conflict`] when the id
    /// was used with another body.
    pub async fn create_grant(&self, customer: &str, spec: GrantSpec) -> Result<(GrantOut, bool), GrantError> {
        valid_customer(customer)?;
        let now = crate::clock::now_ms();
        let (doc, raw) = spec.validate(self.catalog, now)?;
        let id = self.interner.intern(customer).map_err(|_| GrantError::Full)?;
        let (stored, created) = match self.store.insert_grant(customer, &doc).await? {
            None => (doc, true),
            Some(existing) if existing.request == doc.request => (existing, false),
            Some(_) => return Err(GrantError::Conflict(doc.id)),
        };
        if self.credits.grant(id, &stored.id).as_ref() != Some(&stored) {
            self.credits.install(id, customer, stored.clone(), raw);
        }
        if let Some(meter) = self.catalog.meter_by_name(&stored.meter) {
            // The alert level of the customer's limit, for usage that is never checked.
            let low = self.entitlements.get(Some(id)).limits(meter.id).and_then(|ls| CreditBook::low_balance_of(ls));
            let _ = self.credits.balance(Some(id), meter.id, low, now);
        }
        let view = self.view(id, &stored.id, now).ok_or_else(|| GrantError::NotFound(stored.id.clone()))?;
        tracing::info!(customer = %customer, grant = %stored.id, meter = %stored.meter, created, "grant");
        Ok((view, created))
    }

    /// Voids the unspent remainder of a grant from now.
    pub async fn void_grant(&self, customer: &str, grant: &str) -> Result<GrantOut, GrantError> {
        valid_customer(customer)?;
        let now = crate::clock::now_ms();
        let id = self.interner.lookup(customer).ok_or_else(|| GrantError::NotFound(grant.to_string()))?;
        let mut doc = match self.credits.grant(id, grant) {
            Some(doc) => doc,
            None => {
                // Made on another instance and not seen here yet.
                crate::credits::load::grants(self.credits, self.store, self.interner).await?;
                self.credits.grant(id, grant).ok_or_else(|| GrantError::NotFound(grant.to_string()))?
            }
        };
        if doc.voided_at_ms.is_none() {
            let remaining = self.credits.remaining_of(id, grant, now).unwrap_or(0);
            let hard = self.catalog.meter_by_name(&doc.meter).filter(|m| {
                self.entitlements.get(Some(id)).limits(m.id).is_some_and(|ls| ls.iter().any(|l| l.hard && l.amount.is_credits()))
            });
            let shared = match (self.redis, hard) {
                (Some(redis), Some(meter)) if remaining > 0 => Some((redis, meter)),
                _ => None,
            };
            let voided = match shared {
                Some((redis, meter)) => self.voidable(redis, (customer, id), meter, grant, now).await?,
                None => remaining,
            };
            doc.voided_at_ms = Some(now);
            doc.voided_raw = Some(voided);
            self.store.update_grant(customer, &doc).await?;
            self.credits.void(id, doc);
            if let Some((redis, meter)) = shared {
                // Stored: every grant up to this version is loaded here, then
                // the fence is lifted; instances that have not loaded it yet
                // get no slice until they do.
                let version = self.store.grants_version().await?;
                crate::credits::load::grants(self.credits, self.store, self.interner).await?;
                self.credits.saw_grants(version);
                let (credit_key, held_key) = (redis.keys.credits(customer, &meter.name), redis.keys.held(customer, &meter.name));
                if let Err(e) = crate::redis_link::credit_lease::voided(redis, &credit_key, &held_key, version).await {
                    tracing::warn!(error = %e, "the void's fence could not be lifted; it ends by itself after a lease ttl");
                }
            }
        }
        self.view(id, grant, now).ok_or_else(|| GrantError::NotFound(grant.to_string()))
    }

    /// With Redis, on a hard credits balance: how much of the grant's
    /// remainder a void may take — what no slice of the balance, no hold and
    /// no usage this instance has not seen yet stands on (the rule:
    /// `redis_link::credit_lease`). Fences the balance's slices until the void
    /// is stored. Retries while another void is in progress or this
    /// instance's grants are older than the balance's, for two lease ttls.
    async fn voidable(
        &self,
        redis: &crate::redis_link::Redis,
        (name, customer): (&str, crate::counters::CustomerId),
        meter: &crate::model::Meter,
        grant: &str,
        now: i64,
    ) -> Result<i64, GrantError> {
        let (credit_key, held_key) = (redis.keys.credits(name, &meter.name), redis.keys.held(name, &meter.name));
        let ttl_ms = redis.leases.ttl_ms();
        let deadline = std::time::Instant::now() + Duration::from_millis(u64::try_from(ttl_ms.saturating_mul(2)).unwrap_or(2_000));
        loop {
            let remaining = self.credits.remaining_of(customer, grant, now).unwrap_or(0);
            let (balance, own, others) = self.credits.shared_view(customer, meter.id, now);
            let ask = crate::redis_link::credit_lease::SliceAsk {
                credit_key: &credit_key,
                held_key: &held_key,
                own,
                base: balance.saturating_add(own).saturating_add(others),
                want: remaining,
                seen: self.credits.grants_seen(),
            };
            let io = |e: crate::redis_link::RedisError| GrantError::Store(StoreError::Io(e.to_string()));
            if let Some(free) = crate::redis_link::credit_lease::void(redis, self.instance_id, ttl_ms, &ask).await.map_err(io)? {
                return Ok(free);
            }
            if std::time::Instant::now() >= deadline {
                return Err(GrantError::Store(StoreError::Io("the balance's grants are changing (another void); try again".into())));
            }
            // Another void, or grants newer than ours: load them, then again.
            let version = self.store.grants_version().await?;
            crate::credits::load::grants(self.credits, self.store, self.interner).await?;
            self.credits.saw_grants(version);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn view(&self, customer: crate::counters::CustomerId, grant: &str, now: i64) -> Option<GrantOut> {
        self.credits.grants(Some(customer), None, now).iter().find(|v| v.doc.id == grant).map(|v| out(v, self.catalog))
    }

    /// The customer's grants, optionally of one meter.
    pub fn list(&self, customer: &str, meter: Option<&str>) -> Result<Vec<GrantOut>, GrantError> {
        valid_customer(customer)?;
        let meter = match meter {
            None => None,
            Some(name) => Some(
                self.catalog
                    .meter_by_name(name)
                    .ok_or_else(|| GrantProblem { field: "meter", reason: format!("unknown meter {name:?}") })?
                    .id,
            ),
        };
        let id = self.interner.lookup(customer);
        let now = crate::clock::now_ms();
        Ok(self.credits.grants(id, meter, now).iter().map(|v| out(v, self.catalog)).collect())
    }

    /// Every credit balance of the customer: the meters its plan makes
    /// credits and those it has grants on.
    pub fn balances(&self, customer: &str) -> Result<Balances, GrantError> {
        valid_customer(customer)?;
        let id = self.interner.lookup(customer);
        let ent = self.entitlements.get(id);
        let now = crate::clock::now_ms();
        let mut meters: Vec<crate::model::MeterId> = self
            .catalog
            .meters()
            .iter()
            .filter(|m| ent.limits(m.id).is_some_and(|ls| ls.iter().any(|l| l.amount.is_credits())))
            .map(|m| m.id)
            .collect();
        if let Some(id) = id {
            meters.extend(self.credits.meters_of(id));
        }
        meters.sort_unstable();
        meters.dedup();
        let mut balances = Vec::with_capacity(meters.len());
        for m in meters {
            let Some(meter) = self.catalog.meter(m) else { continue };
            let low = ent.limits(m).and_then(|ls| CreditBook::low_balance_of(ls));
            let b = self.credits.balance(id, m, low, now);
            let d = |raw| Decimal { raw, precision: meter.precision };
            balances.push(BalanceOut {
                meter: meter.name.clone(),
                balance: d(b.balance),
                granted: d(b.granted),
                used: d(b.granted.saturating_sub(b.balance)),
                next_expiry: b.next_expiry.map(|(amount, at)| ExpiryOut { amount: d(amount), expires_at: rfc3339(at) }),
            });
        }
        Ok(Balances { customer: customer.to_string(), balances })
    }
}

fn valid_customer(customer: &str) -> Result<(), GrantProblem> {
    if customer.is_empty() || customer.len() > 256 || customer.chars().any(char::is_control) {
        return Err(GrantProblem { field: "customer", reason: "must be 1-256 bytes without control characters".into() });
    }
    Ok(())
}

/// Whether the limits on a meter include a credits limit.
pub fn has_credits(limits: &[crate::model::Limit]) -> bool {
    limits.iter().any(|l| matches!(l.amount, LimitAmount::Credits { .. }))
}

/// One credits sync round with Redis (`redis_consume::sync` on every ledger of
/// this instance): what [`refresh`] runs every interval.
pub async fn sync_credits(engine: &Engine, redis: &crate::redis_link::Redis) {
    let (interner, catalog) = (&engine.counters().interner, engine.catalog());
    redis_consume::sync(
        engine.credits(),
        engine.holds(),
        redis,
        engine.instance_id(),
        |c| interner.name(c),
        |m| catalog.meter(m).map(|m| m.name.clone()),
    )
    .await;
}

/// With a shared store (Redis), every `interval` until `stop`: syncs credit
/// usage with the other instances and reloads the grants when the store's
/// grants version moved.
pub async fn refresh(engine: Arc<Engine>, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut seen = 0u64;
    loop {
        let ports = engine.grant_ports();
        if let Some(redis) = engine.redis() {
            sync_credits(&engine, redis).await;
            // Leased credits (issue 16): renew the slices in use, return the idle ones.
            slices::maintain(&engine, redis, false).await;
        }
        match ports.store.grants_version().await {
            Ok(v) if v != seen => match crate::credits::load::grants(ports.credits, ports.store, ports.interner).await {
                Ok(_) => {
                    seen = v;
                    ports.credits.saw_grants(v);
                }
                Err(e) => tracing::warn!(error = %e, "reloading grants failed; retrying"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the grants version failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => {
                // Shutdown: every slice's unused credit goes back.
                if let Some(redis) = engine.redis() {
                    slices::maintain(&engine, redis, true).await;
                }
                return;
            }
        }
    }
}
