//! Shared `unique_count` windows (issue 25): with Redis, each window's
//! distinct values live in one Redis set (`P{C}:w:…:u`, members the values'
//! 128-bit hashes in hex) that every instance adds to, so a value seen by
//! three instances is counted once.
//!
//! Each sync round, per window this instance holds (or that a check read):
//! `SADD` the values added here since the last round, `SCARD`; when Redis
//! holds more than this instance knows, `SMEMBERS` and merge them in (through
//! the usage seam, origin `Sync`). The local set then holds every instance's
//! values, and the window counter their exact number: a check or consume
//! decides on it locally, and a returning value seen elsewhere is known here
//! after one round. `SADD` is idempotent, so a WAL replay or a retried round
//! adds nothing twice; when Redis holds fewer values than this instance knows
//! (it lost its data), the round reports it and the next one pushes every
//! value again. The set expires with the window's hash.

use crate::counters::unique::ValueHash;
use crate::counters::{CounterKey, CustomerId};
use crate::engine::Engine;
use crate::model::Aggregation;
use crate::redis_link::RedisError;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;

/// One window to sync.
struct Window {
    key: CounterKey,
    redis_key: String,
    expire_at: i64,
    known: usize,
    values: Vec<ValueHash>,
}

fn parse(member: &str) -> Option<ValueHash> {
    u128::from_str_radix(member, 16).ok()
}

/// One round for every `unique_count` window; `Ok(true)` when Redis turned
/// out to hold fewer values than this instance (push all next round).
pub async fn sync(engine: &Engine, all: bool) -> Result<bool, RedisError> {
    let Some(redis) = engine.redis() else { return Ok(false) };
    let meters: Vec<(&str, bool)> =
        engine.catalog().meters().iter().map(|m| (m.name.as_str(), m.aggregation == Aggregation::UniqueCount)).collect();
    if !meters.iter().any(|(_, u)| *u) {
        return Ok(false);
    }
    let counters = engine.counters();
    let now = crate::engine::now_ms();
    let mut by_customer: BTreeMap<CustomerId, Vec<Window>> = BTreeMap::new();
    let taken = counters.unique.take_unpushed(all);
    let seen: HashSet<CounterKey> = taken.iter().map(|(k, _, _)| *k).collect();
    let add = |key: CounterKey, known: usize, values: Vec<ValueHash>, by_customer: &mut BTreeMap<CustomerId, Vec<Window>>| {
        let Some(&(meter, true)) = meters.get(usize::from(key.meter)) else { return values };
        let expire_at = crate::redis_link::keys::expire_at(&key);
        if expire_at != 0 && expire_at < now {
            return Vec::new();
        }
        let Some(customer) = counters.interner.name(key.customer) else { return values };
        let redis_key = redis.keys.unique_set(&customer, meter, key.kind, key.start_ms);
        by_customer.entry(key.customer).or_default().push(Window { key, redis_key, expire_at, known, values });
        Vec::new()
    };
    for (key, known, values) in taken {
        let left = add(key, known, values, &mut by_customer);
        if !left.is_empty() {
            counters.unique.unpush(key, left);
        }
    }
    // Windows a check read here that hold no value here yet.
    let mut watched = Vec::new();
    counters.windows.for_each(|key, cell| {
        if meters.get(usize::from(key.meter)).is_some_and(|(_, u)| *u) && cell.watched.swap(false, Ordering::AcqRel) {
            watched.push(*key);
        }
    });
    for key in watched {
        if !seen.contains(&key) {
            add(key, 0, Vec::new(), &mut by_customer);
        }
    }
    let mut lost = false;
    let mut failure = None;
    // One pipeline per customer: its keys share a cluster slot.
    for windows in by_customer.into_values() {
        match sync_customer(engine, redis, &windows).await {
            Ok(l) => lost |= l,
            Err(e) => {
                for w in windows {
                    counters.unique.unpush(w.key, w.values);
                }
                failure = Some(e);
            }
        }
    }
    failure.map_or(Ok(lost), Err)
}

async fn sync_customer(engine: &Engine, redis: &crate::redis_link::Redis, windows: &[Window]) -> Result<bool, RedisError> {
    let mut pipe = ::redis::pipe();
    for w in windows {
        if !w.values.is_empty() {
            let members: Vec<String> = w.values.iter().map(|v| format!("{v:032x}")).collect();
            pipe.cmd("SADD").arg(&w.redis_key).arg(members).ignore();
            if w.expire_at > 0 {
                pipe.cmd("PEXPIREAT").arg(&w.redis_key).arg(w.expire_at).ignore();
            }
        }
        pipe.cmd("SCARD").arg(&w.redis_key);
    }
    let mut conn = redis.conn();
    let sizes: Vec<i64> = redis.call("sync unique sets", pipe.query_async(&mut conn)).await?;
    let mut lost = false;
    for (w, size) in windows.iter().zip(sizes) {
        let size = usize::try_from(size).unwrap_or(0);
        let here = engine.counters().unique.len_of(&w.key).max(w.known);
        if size < here {
            lost = true;
        }
        if size <= engine.counters().unique.len_of(&w.key) {
            continue;
        }
        let mut conn = redis.conn();
        let members: Vec<String> = redis.call("read unique set", ::redis::cmd("SMEMBERS").arg(&w.redis_key).query_async(&mut conn)).await?;
        engine.usage().merge_unique(w.key, members.iter().filter_map(|m| parse(m)), crate::usage::Origin::Sync);
    }
    Ok(lost)
}
