//! Keeps this instance's entitlements cache in step with Redis: a pub/sub
//! subscriber re-reads each changed customer this instance has loaded as soon as
//! its message arrives (another instance's PUT is seen here within
//! milliseconds). Customers not loaded here are read on first sight
//! (`sync::customer`). After a lost subscription every loaded customer is made
//! stale, so the next request re-reads it: messages may have been missed.

use crate::engine::{now_ms, Engine};
use crate::entitlements::Freshness;
use crate::redis_link::Redis;
use crate::store::redis::RedisEntitlementStore;
use crate::store::EntitlementStore;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why applying one message failed (logged; the TTL re-read is the safety net).
#[derive(Debug, thiserror::Error)]
pub enum EntitlementSyncError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Entitlements(#[from] crate::entitlements::EntitlementsError),
}

/// Applies one customer named by a pub/sub message, if this instance has it.
async fn apply_one(engine: &Engine, store: &RedisEntitlementStore, name: &str) -> Result<bool, EntitlementSyncError> {
    let ports = engine.backfill_ports();
    let Some(id) = ports.usage.counters().interner.lookup(name) else { return Ok(false) };
    if ports.entitlements.freshness(id, now_ms()) == Freshness::Missing {
        return Ok(false); // Read on first sight, whenever that comes.
    }
    let doc = store.get(name).await?;
    let changed = ports.refresh_entitlements(name, doc).await?;
    ports.entitlements.mark_fetched(id, now_ms());
    Ok(changed)
}

/// Subscribes and applies messages until shutdown; resubscribes with backoff
/// after a lost connection.
pub async fn run(engine: Arc<Engine>, redis: Redis, mut shutdown: watch::Receiver<bool>) {
    let store = RedisEntitlementStore::new(redis.clone());
    let channel = redis.keys.entitlements_channel();
    let mut failures = 0u32;
    loop {
        let subscribed = async {
            let mut pubsub = redis.pubsub_client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(redis.timeout.saturating_mul(3), subscribed) => r,
            _ = shutdown.changed() => return,
        };
        let mut pubsub = match outcome {
            Ok(Ok(p)) => p,
            failed => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    let reason = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(error = %reason, "cannot subscribe to entitlement changes; retrying");
                }
                if wait(&mut shutdown, crate::backoff::backoff(Duration::from_millis(200), failures)).await {
                    return;
                }
                continue;
            }
        };
        if failures > 0 {
            tracing::info!("subscribed to entitlement changes again");
        }
        failures = 0;
        // Messages may have been missed while unsubscribed.
        engine.entitlements().expire_all();
        let mut messages = pubsub.on_message();
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
                        Err(e) => tracing::warn!(customer = %name, error = %e, "could not apply changed entitlements; the TTL re-read retries"),
                    }
                }
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
