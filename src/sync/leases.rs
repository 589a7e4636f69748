//! Upkeep of the quota slices this instance holds for `leased` limits (issue
//! 16), run by the counter syncer after each round and once at shutdown:
//! a slice used within the last two sync intervals is renewed before half its
//! lifetime is gone; an idle one is returned (its unused quota goes back to
//! the other instances), and so is every slice at shutdown. A slice whose
//! window has ended is dropped: the next window is a new key with no slices.
//!
//! Each call runs under the `(customer, meter)` consume lock, so no consume
//! is between its decision and its fold while its slice is renewed or
//! returned (see `limits::leased`). A failed call changes nothing in Redis: a
//! slice not renewed expires on its own, both there and here.

use crate::engine::{now_ms, Engine};
use crate::redis_link::lease::{self, LeaseKey, LeaseMode, LeaseReply};
use crate::redis_link::Redis;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Renews the used slices, returns the idle ones (every one when `closing`).
pub async fn maintain(engine: &Engine, redis: &Redis, closing: bool) {
    let book = &redis.leases;
    if book.is_empty() {
        return;
    }
    let ttl_ms = book.ttl_ms();
    let idle = Duration::from_millis(u64::try_from(book.sync_interval_ms().saturating_mul(2)).unwrap_or(400));
    let half = Duration::from_millis(u64::try_from(ttl_ms / 2).unwrap_or(500));
    let wall = now_ms();
    for (key, cap) in book.snapshot() {
        if cap.window_end_ms <= wall {
            book.remove(&key);
            continue;
        }
        let now = Instant::now();
        let mode = if closing || now.saturating_duration_since(cap.last_used) > idle {
            LeaseMode::Return
        } else if cap.valid_until.saturating_duration_since(now) < half {
            LeaseMode::Renew
        } else {
            continue;
        };
        let _guard = engine.consume_locks().lock(key.customer, key.meter).await;
        // A consume may have replaced the cap while we waited for the lock.
        let Some(cap) = book.get(&key) else { continue };
        if mode == LeaseMode::Renew && cap.valid_until <= Instant::now() {
            // Too late: Redis may have given it to another instance already.
            book.remove(&key);
            continue;
        }
        if mode == LeaseMode::Return {
            // Forgotten here first: from now on consumes ask Redis, and every
            // consume that reserved inside it (`LeaseBook::within`) is counted
            // in the usage read next.
            book.remove(&key);
        }
        let value = engine.counters().windows.get(&key, |c| c.value.load(Ordering::Acquire)).unwrap_or(0);
        let wanted = LeaseKey { redis_key: cap.redis_key.clone(), limit: cap.limit, value, want: cap.cap, expire_at: cap.expire_at };
        let sent = Instant::now();
        match lease::call(redis, engine.instance_id(), mode, ttl_ms, std::slice::from_ref(&wanted), None).await {
            Ok(LeaseReply::Granted { ttl_ms, windows }) => {
                if mode == LeaseMode::Renew {
                    let (held, part, unreported) =
                        windows.first().map_or((cap.cap, cap.reported, cap.unreported), |w| (w.cap.max(cap.cap), w.part, w.unreported));
                    book.hold(key, lease::Cap { cap: held, reported: part.max(cap.reported), unreported, ..cap }, sent, ttl_ms);
                }
                if let Some(w) = windows.first() {
                    engine.usage().update_shared(&key, crate::usage::Origin::Sync, |cell| {
                        cell.pushed.fetch_max(w.part, Ordering::AcqRel);
                        cell.others.store(w.total.saturating_sub(w.part).max(0), Ordering::Release);
                        cell.synced_ms.store(wall, Ordering::Release);
                    });
                }
            }
            Ok(other) => {
                book.remove(&key);
                tracing::debug!(reply = ?other, "a slice could not be renewed; consumes ask redis again");
            }
            Err(e) => tracing::debug!(error = %e, mode = ?mode, "lease upkeep failed; the slice expires on its own"),
        }
    }
}
