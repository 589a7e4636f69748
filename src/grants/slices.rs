//! Leased hard credits with Redis (issues 16 and 18): a consume on a hard
//! credits balance whose enforcement is `leased` (the default) is decided
//! inside a slice of the balance this instance holds, with no round trip;
//! only a consume that does not fit takes a new slice (one script call, which
//! may refuse). The script and its invariant are `redis_link::credit_lease`.
//!
//! Runs under the `(customer, meter)` consume lock (`limits`, the serial
//! path), from the decision to the fold, as does the upkeep here, so a slice is
//! never renewed or returned while a consume inside it is being recorded.
//! The upkeep runs after each credits sync (`grants::refresh`): a slice used in
//! the last two sync intervals is renewed before half its life is gone, an idle
//! or expired one is returned, and every one at shutdown.

use crate::counters::CustomerId;
use crate::credits::CreditBook;
use crate::engine::Engine;
use crate::grants::redis_consume::learn;
use crate::holds::HoldBook;
use crate::model::Meter;
use crate::redis_link::credit_lease::{self, Slice, SliceAsk, SliceMode, SliceReply};
use crate::redis_link::Redis;
use std::time::{Duration, Instant};

/// How a leased credits consume was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Inside a slice (held, or just granted): record it.
    Inside,
    /// No slice for it: not enough free credit over all instances.
    Refused,
    /// Redis restarted less than two lease ttls ago: no slices yet (take the
    /// consume per call, as `strict` does).
    Recovering,
    /// Not decided: Redis unreachable, or grants changing.
    Down(String),
}

/// Decides `quantity` of `(customer, meter)`'s balance inside a slice. Call
/// under the consume lock, after the local decision allowed. The held total
/// each answer carries goes to `holds` before the book learns the answer's
/// total (see `grants::redis_consume`).
#[allow(clippy::too_many_arguments)]
pub async fn take(
    book: &CreditBook,
    holds: &HoldBook,
    redis: &Redis,
    instance_id: &str,
    (name, customer): (&str, CustomerId),
    meter: &Meter,
    quantity: i64,
    now: i64,
) -> Outcome {
    let key = (customer, meter.id);
    let (balance, own, others, expiry) = book.slice_view(customer, meter.id, now);
    let slices = &redis.credit_slices;
    let started = Instant::now();
    if slices.fits(key, own, quantity, started) {
        redis.leases.decided(true);
        slices.touch(key, started);
        return Outcome::Inside;
    }
    redis.leases.decided(false);
    let credit_key = redis.keys.credits(name, &meter.name);
    let held_key = redis.keys.held(name, &meter.name);
    let ask = SliceAsk {
        credit_key: &credit_key,
        held_key: &held_key,
        own,
        base: balance.saturating_add(own).saturating_add(others),
        want: own.saturating_add(quantity),
        seen: book.grants_seen(),
    };
    match credit_lease::call(redis, instance_id, SliceMode::Take, redis.leases.ttl_ms(), &ask).await {
        Ok(SliceReply::Granted(g)) => {
            learn(book, holds, (customer, meter.id), g.total, g.held, now);
            let slice = Slice {
                cap: g.cap,
                valid_until: started,
                last_used: started,
                reported: g.part,
                unreported: g.unreported,
                expires: expiry.map(|at| started + Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0))),
                credit_key,
                held_key,
            };
            slices.hold(key, slice, started, g.ttl_ms);
            Outcome::Inside
        }
        Ok(SliceReply::Denied { total, held }) => {
            slices.remove(key);
            learn(book, holds, (customer, meter.id), total, held, now);
            Outcome::Refused
        }
        Ok(SliceReply::Recovering) => Outcome::Recovering,
        Ok(SliceReply::Stale { total, held }) => {
            learn(book, holds, (customer, meter.id), total, held, now);
            Outcome::Down("grants are changing (a void in progress, or this instance has not loaded the newest grants)".into())
        }
        Err(e) => Outcome::Down(e.to_string()),
    }
}

/// Renews the slices used lately, returns the idle or expired ones (every one
/// when `closing`).
pub async fn maintain(engine: &Engine, redis: &Redis, closing: bool) {
    let slices = &redis.credit_slices;
    if slices.is_empty() {
        return;
    }
    let book = engine.credits();
    let ttl_ms = redis.leases.ttl_ms();
    let idle = Duration::from_millis(u64::try_from(redis.leases.sync_interval_ms().saturating_mul(2)).unwrap_or(400));
    let half = Duration::from_millis(u64::try_from(ttl_ms / 2).unwrap_or(500));
    for (key, slice) in slices.snapshot() {
        let now = Instant::now();
        let mode = if closing || slice.valid_until <= now || now.saturating_duration_since(slice.last_used) > idle {
            SliceMode::Return
        } else if slice.valid_until.saturating_duration_since(now) < half {
            SliceMode::Renew
        } else {
            continue;
        };
        let _guard = engine.consume_locks().lock(key.0, key.1).await;
        // A consume may have replaced or dropped the slice meanwhile.
        let Some(slice) = slices.get(key) else { continue };
        if mode == SliceMode::Return {
            // Forgotten here first: from now on consumes ask Redis.
            slices.remove(key);
        }
        let wall = crate::engine::now_ms();
        let (_, own, _) = book.shared_view(key.0, key.1, wall);
        let ask =
            SliceAsk { credit_key: &slice.credit_key, held_key: &slice.held_key, own, base: 0, want: slice.cap, seen: book.grants_seen() };
        let sent = Instant::now();
        match credit_lease::call(redis, engine.instance_id(), mode, ttl_ms, &ask).await {
            Ok(SliceReply::Granted(g)) => {
                if mode == SliceMode::Renew {
                    let renewed =
                        Slice { cap: g.cap.max(slice.cap), reported: g.part.max(slice.reported), unreported: g.unreported, ..slice };
                    slices.hold(key, renewed, sent, g.ttl_ms);
                }
                learn(book, engine.holds(), key, g.total, g.held, wall);
            }
            Ok(other) => {
                slices.remove(key);
                tracing::debug!(reply = ?other, "a credit slice could not be renewed; consumes ask redis again");
            }
            Err(e) => tracing::debug!(error = %e, mode = ?mode, "credit slice upkeep failed; the slice expires on its own"),
        }
    }
}
