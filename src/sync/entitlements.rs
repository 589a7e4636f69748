//! Keeps this instance's entitlements cache in step with Redis: a pub/sub
//! subscriber applies each changed customer as soon as its message arrives
//! (another instance's PUT is seen here within milliseconds), and a full reload
//! every `redis.entitlements_ttl` (and after every resubscribe, when messages
//! may have been missed) is the safety net.

use crate::engine::Engine;
use crate::redis_link::Redis;
use crate::store::redis::RedisEntitlementStore;
use crate::store::EntitlementStore;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why one subscription or reload failed (logged; the task retries).
#[derive(Debug, thiserror::Error)]
pub enum EntitlementSyncError {
    #[error(transparent)]
    Redis(#[from] ::redis::RedisError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Entitlements(#[from] crate::entitlements::EntitlementsError),
}

/// Re-reads every stored customer and applies what changed; customers whose
/// document is gone fall back to the default plan. Returns how many changed.
pub async fn reload_all(engine: &Engine, store: &RedisEntitlementStore) -> Result<usize, EntitlementSyncError> {
    let stored = store.list().await?;
    let mut seen = HashSet::with_capacity(stored.len());
    let mut changed = 0;
    for (name, doc) in stored {
        seen.insert(name.clone());
        match engine.refresh_entitlements(&name, Some(doc)).await {
            Ok(true) => changed += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(customer = %name, error = %e, "stored entitlements do not resolve; keeping the cached ones"),
        }
    }
    for customer in engine.entitlements.customers() {
        let Some(name) = engine.counters.interner.name(customer) else { continue };
        if !seen.contains(name.as_ref()) && engine.refresh_entitlements(&name, None).await? {
            changed += 1;
        }
    }
    Ok(changed)
}

/// Applies one customer named by a pub/sub message.
async fn apply_one(engine: &Engine, store: &RedisEntitlementStore, name: &str) -> Result<bool, EntitlementSyncError> {
    let doc = store.get(name).await?;
    Ok(engine.refresh_entitlements(name, doc).await?)
}

/// Subscribes and applies messages until shutdown; resubscribes with backoff
/// after a lost connection and reloads everything then and every `ttl`.
pub async fn run(engine: Arc<Engine>, redis: Redis, ttl: Duration, mut shutdown: watch::Receiver<bool>) {
    let store = RedisEntitlementStore::new(redis.clone());
    let channel = redis.keys.entitlements_channel();
    let mut failures = 0u32;
    loop {
        let subscribed = async {
            let mut pubsub = redis.pubsub_client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        let mut pubsub = tokio::select! {
            r = tokio::time::timeout(redis.timeout.saturating_mul(3), subscribed) => match r {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "cannot subscribe to entitlement changes; retrying");
                    if wait(&mut shutdown, crate::flush::backoff(Duration::from_millis(200), failures)).await { return; }
                    continue;
                }
                Err(_) => {
                    failures += 1;
                    if wait(&mut shutdown, crate::flush::backoff(Duration::from_millis(200), failures)).await { return; }
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        failures = 0;
        // Messages may have been missed while unsubscribed.
        match reload_all(&engine, &store).await {
            Ok(n) => crate::telemetry::entitlement_reload("ttl", n),
            Err(e) => tracing::warn!(error = %e, "reloading entitlements failed; retrying on the next interval"),
        }
        let mut messages = pubsub.on_message();
        let mut reload = tokio::time::interval_at(tokio::time::Instant::now() + ttl, ttl);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        tracing::warn!("entitlement subscription lost; resubscribing");
                        break;
                    };
                    let Ok(name) = message.get_payload::<String>() else { continue };
                    match apply_one(&engine, &store, &name).await {
                        Ok(changed) => crate::telemetry::entitlement_reload("message", usize::from(changed)),
                        Err(e) => tracing::warn!(customer = %name, error = %e, "could not apply changed entitlements; the next reload retries"),
                    }
                }
                _ = reload.tick() => match reload_all(&engine, &store).await {
                    Ok(n) => crate::telemetry::entitlement_reload("ttl", n),
                    Err(e) => tracing::warn!(error = %e, "reloading entitlements failed; retrying on the next interval"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Sleeps `d`; true when shutdown came first.
async fn wait(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}
