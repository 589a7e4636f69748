//! Loading a customer on first sight, with Redis: its entitlements and, in the
//! same round trip, the global totals of its current windows, so the very first
//! check on this instance already counts the usage other instances hold.
//!
//! This is the one network round trip the request path may take: a check of a
//! customer loaded within `redis.entitlements_ttl` takes none. Concurrent misses
//! on one customer share one load. A customer older than the TTL is answered
//! from the cache and re-read in the background (pub/sub is the fast path for
//! changes; this is the safety net).

use crate::counters::{Counters, CustomerId};
use crate::engine::{now_ms, Engine};
use crate::entitlements::{EntitlementCache, Freshness};
use crate::limits::backfill::BackfillPorts;
use crate::model::{Aggregation, BillingAnchor, Catalog};
use crate::redis_link::{Keys, Redis, RedisError};
use crate::store::redis::DOC_FIELD;
use crate::usage::UsageSeam;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How long a failed load is trusted (the default plan) before another try.
const RETRY_AFTER_FAILURE_MS: i64 = 1_000;

/// What loading a customer from Redis needs of the engine: Redis and its TTL,
/// the entitlements cache (and the backfill that applies a changed document),
/// the tracked windows to read the shared totals of, the seam to load them in.
#[derive(Clone, Copy)]
pub struct CustomerPorts<'a> {
    pub catalog: &'a Catalog,
    pub usage: &'a UsageSeam,
    pub entitlements: &'a EntitlementCache,
    pub redis: Option<&'a Redis>,
    pub instance_id: &'a str,
    /// `redis.entitlements_ttl` in milliseconds.
    pub redis_ttl_ms: i64,
    /// Applies the entitlements read from Redis.
    pub backfill: BackfillPorts<'a>,
}

impl Engine {
    /// The customer loader's narrow view of the state.
    pub fn customer_ports(&self) -> CustomerPorts<'_> {
        CustomerPorts {
            catalog: self.catalog(),
            usage: self.usage(),
            entitlements: self.entitlements(),
            redis: self.redis(),
            instance_id: self.instance_id(),
            redis_ttl_ms: self.redis_ttl_ms(),
            backfill: self.backfill_ports(),
        }
    }

    /// Loads `name` if this instance has not yet (waiting for it), or starts a
    /// background refresh if its entry is older than the TTL.
    pub async fn ensure_customer(self: &Arc<Engine>, name: &str) {
        // Boxed: a Redis round trip's future, kept out of every check's
        // handler (which is copied with it) when there is no Redis (issue 24).
        if self.redis().is_none() {
            return;
        }
        if let Some(true) = Box::pin(self.customer_ports().ensure_loaded(name)).await {
            let engine = self.clone();
            let name = name.to_string();
            tokio::spawn(async move { engine.customer_ports().refresh_customer(&name).await });
        }
    }
}

impl CustomerPorts<'_> {
    fn counters(&self) -> &Counters {
        self.usage.counters()
    }

    /// Loads `name` if never loaded here; returns `Some(true)` when the entry is
    /// stale (the caller may refresh it without waiting), `None` without Redis.
    pub async fn ensure_loaded(&self, name: &str) -> Option<bool> {
        let redis = self.redis?;
        let id = self.counters().interner.intern(name).ok()?;
        match self.entitlements.freshness(id, now_ms()) {
            Freshness::Fresh => Some(false),
            Freshness::Stale => Some(true),
            Freshness::Missing => {
                let load = self.entitlements.loading(id)?;
                load.get_or_init(|| self.load_unless_done(redis, id, name, Freshness::Missing)).await;
                self.entitlements.loaded(id);
                Some(false)
            }
        }
    }

    /// Re-reads a loaded customer (one refresh at a time per customer).
    async fn refresh_customer(&self, name: &str) {
        let (Some(redis), Ok(id)) = (self.redis, self.counters().interner.intern(name)) else { return };
        let Some(load) = self.entitlements.loading(id) else { return };
        if load.initialized() {
            return;
        }
        load.get_or_init(|| self.load_unless_done(redis, id, name, Freshness::Stale)).await;
        self.entitlements.loaded(id);
    }

    /// Loads the customer if it is still as `seen`. A load that finished
    /// between the caller's look and its taking the load cell has dropped
    /// that cell already, so the caller got a new one: without this second
    /// look it would read Redis again.
    async fn load_unless_done(&self, redis: &Redis, id: CustomerId, name: &str, seen: Freshness) {
        if self.entitlements.freshness(id, now_ms()) == seen {
            self.load_customer(redis, id, name).await;
        }
    }

    /// One pipelined read of the customer's entitlements and window totals.
    async fn load_customer(&self, redis: &Redis, id: CustomerId, name: &str) {
        let now = now_ms();
        match self.read_customer(redis, id, name, now).await {
            Ok(()) => {
                self.entitlements.mark_fetched(id, now);
                crate::telemetry::entitlement_reload("load", 1);
            }
            Err(e) => {
                tracing::warn!(customer = %name, error = %e, "could not load a customer from redis; using what is cached (or the default plan) for now");
                self.entitlements.mark_fetched(id, now - self.redis_ttl_ms + RETRY_AFTER_FAILURE_MS);
            }
        }
    }

    async fn read_customer(&self, redis: &Redis, id: CustomerId, name: &str, now: i64) -> Result<(), RedisError> {
        // Every shared window this customer may use (plan kinds; an override's
        // own kinds are seeded when its entitlements are applied).
        let mut windows = Vec::new();
        for meter in self.catalog.meters() {
            if !matches!(meter.aggregation, Aggregation::Sum | Aggregation::Count) {
                continue;
            }
            for kind in self.counters().tracked_kinds(meter.id) {
                let key = Counters::key(id, meter.id, kind, now, BillingAnchor::default());
                windows.push((key, redis.keys.window(name, &meter.name, kind, key.start_ms)));
            }
        }
        let field = Keys::instance_field(self.instance_id);
        let mut pipe = ::redis::pipe();
        pipe.hget(redis.keys.entitlements(name), DOC_FIELD);
        for (_, key) in &windows {
            pipe.cmd("HMGET").arg(key).arg("t").arg(&field);
        }
        let mut conn = redis.conn();
        let mut replies: Vec<::redis::Value> = redis.call("load customer", pipe.query_async(&mut conn)).await?;
        if replies.len() != windows.len() + 1 {
            return Err(RedisError::Unexpected(format!("{} replies for {} commands", replies.len(), windows.len() + 1)));
        }
        let totals = replies.split_off(1);
        let doc_text: Option<String> =
            replies.pop().map(::redis::from_redis_value).transpose().map_err(|e| RedisError::Unexpected(e.to_string()))?.flatten();
        for ((key, _), reply) in windows.iter().zip(totals) {
            let pair: Vec<Option<i64>> = ::redis::from_redis_value(reply).map_err(|e| RedisError::Unexpected(e.to_string()))?;
            let (total, part) = (pair.first().copied().flatten().unwrap_or(0), pair.get(1).copied().flatten().unwrap_or(0));
            self.usage.load_shared(*key, crate::usage::Origin::Sync, |cell| {
                cell.others.store(total.saturating_sub(part).max(0), Ordering::Release);
                cell.synced_ms.store(now, Ordering::Release);
            });
        }
        let doc = match doc_text {
            None => None,
            Some(text) => match serde_json::from_str(&text) {
                Ok(doc) => Some(doc),
                Err(e) => {
                    tracing::warn!(customer = %name, error = %e, "entitlements in redis are not valid JSON; using the default plan");
                    None
                }
            },
        };
        if let Err(e) = self.backfill.refresh_entitlements(name, doc).await {
            tracing::warn!(customer = %name, error = %e, "entitlements in redis do not resolve; keeping the cached ones");
        }
        Ok(())
    }
}
