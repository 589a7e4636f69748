//! Global window counters: every `redis.sync_interval` this instance pushes its
//! own usage of each changed (or recently checked) `sum`/`count` window to Redis
//! and reads back the total over all instances.
//!
//! **Exactly once without a delta log.** A window hash holds, per instance, that
//! instance's *whole* usage of the window (`i:<instance>`), and the total `t`. A
//! push sends the absolute value; the script raises the instance's part to it and
//! adds only the difference to `t`. Pushing the same value twice adds nothing, so
//! a WAL replay after a crash (which rebuilds the instance's exact own usage from
//! its store rows and its WAL) can never add a delta twice: the per-key part *is*
//! the instance's watermark. A part never goes down, so a push that raced a
//! strict consume (which raises the part itself) cannot undo it.
//!
//! **Redis down.** Nothing is queued: the pending usage is `value - pushed` of
//! cells that exist anyway, so memory does not grow while Redis is away. When it
//! returns, the next round pushes. If Redis lost its data (restarted empty), a
//! part comes back lower than what this instance pushed before; the next round
//! then pushes every cell, rebuilding the totals from every instance's state.
//!
//! **Data loss detection.** Every round sets `Palive` if missing; finding it
//! missing means Redis lost its data (or is new), and the round pushes every
//! cell.
//!
//! Every total read back stamps the cell's `synced_ms`; checks refresh totals
//! older than two intervals themselves (`limits::fresh`).
//!
//! `max` and `latest` windows merge rather than add: `sync::gauges`.

use crate::counters::window::WindowCell;
use crate::counters::{CounterKey, CustomerId};
use crate::engine::{now_ms, Engine};
use crate::model::Aggregation;
use crate::redis_link::{Keys, Redis, RedisError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Keys per script call on a single server (a cluster calls once per customer).
const KEYS_PER_CALL: usize = 256;
/// Script calls in flight at once.
const CALLS_IN_FLIGHT: usize = 16;

/// Raises this instance's part of each window to the pushed value, adds the
/// difference to the total, sets the expiry when the part is new; returns per
/// key the total and the part as it was before. ARGV: field, then per key
/// (value, expire-at ms or 0), then `1` on a round that pushes every cell
/// (start, data loss): it also drops this instance's *expired* lease caps,
/// whose unreported allowance the pushed value now accounts for (see
/// `redis_link::lease`). Three commands per changed key, two per unchanged
/// one (one more on those rounds).
const SYNC_SCRIPT: &str = r"
local field = ARGV[1]
local clean = ARGV[2 * #KEYS + 2] == '1'
local id = string.sub(field, 3)
local now = 0
if clean then
  local tm = redis.call('TIME')
  now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end
local out = {}
for i, key in ipairs(KEYS) do
  local v = tonumber(ARGV[2 * i])
  if clean then
    local x = tonumber(redis.call('HGET', key, 'x:' .. id) or '0')
    if x > 0 and x <= now then redis.call('HDEL', key, 'c:' .. id, 'x:' .. id, 'u:' .. id) end
  end
  local old = tonumber(redis.call('HGET', key, field) or '0')
  local t
  if v > old then
    redis.call('HSET', key, field, v)
    t = redis.call('HINCRBY', key, 't', v - old)
    if old == 0 then
      local exp = tonumber(ARGV[2 * i + 1])
      if exp > 0 then redis.call('PEXPIREAT', key, exp) end
    end
  else
    t = tonumber(redis.call('HGET', key, 't') or '0')
  end
  out[2 * i - 1] = t
  out[2 * i] = old
end
return out
";

/// Why a sync round failed (the next round retries).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("sync task failed: {0}")]
    Task(String),
}

/// The syncer's state kept between rounds.
pub struct CounterSync {
    redis: Redis,
    script: ::redis::Script,
    field: String,
    /// Set when Redis turned out to have lost pushed parts: push every cell.
    resync_all: AtomicBool,
}

/// One key to push.
struct Push {
    key: CounterKey,
    redis_key: String,
    value: i64,
    expire_at: i64,
}

/// Re-exported: the window keys' expiry is the Redis layout's (`redis_link::keys`).
pub use crate::redis_link::keys::expire_at;

impl CounterSync {
    pub fn new(redis: Redis, instance_id: &str) -> CounterSync {
        CounterSync {
            redis,
            script: ::redis::Script::new(SYNC_SCRIPT),
            field: Keys::instance_field(instance_id),
            resync_all: AtomicBool::new(true),
        }
    }

    /// Picks the cells to push: changed since the last push, checked since the
    /// last round, or all of them after a restart or a Redis data loss.
    fn collect(&self, engine: &Engine, all: bool) -> (HashMap<CustomerId, Vec<Push>>, usize, i64) {
        let mut by_customer: HashMap<CustomerId, Vec<Push>> = HashMap::new();
        let (mut pending_keys, mut pending_units) = (0usize, 0i64);
        let names: Vec<Option<(&str, Aggregation)>> =
            engine.catalog().meters().iter().map(|m| Some((m.name.as_str(), m.aggregation))).collect();
        let now = now_ms();
        engine.counters().windows.for_each(|key, cell: &WindowCell| {
            let Some(Some((meter, aggregation))) = names.get(usize::from(key.meter)) else { return };
            if !matches!(aggregation, Aggregation::Sum | Aggregation::Count) {
                return;
            }
            let expires = expire_at(key);
            if expires != 0 && expires < now {
                return;
            }
            let value = cell.value.load(Ordering::Acquire);
            let pushed = cell.pushed.load(Ordering::Acquire);
            let watched = cell.watched.swap(false, Ordering::AcqRel);
            if value > pushed {
                pending_keys += 1;
                pending_units = pending_units.saturating_add(value - pushed);
            }
            if !(all || watched || value > pushed) {
                return;
            }
            if value > crate::redis_link::MAX_EXACT {
                // Issue 16: Lua counts in doubles; this total would be rounded.
                tracing::error!(
                    value,
                    "a window total beyond 2^53 raw units is not pushed to redis (it could not stay exact); lower the meter's precision"
                );
                return;
            }
            let Some(customer) = engine.counters().interner.name(key.customer) else { return };
            by_customer.entry(key.customer).or_default().push(Push {
                key: *key,
                redis_key: self.redis.keys.window(&customer, meter, key.kind, key.start_ms),
                value,
                expire_at: expires,
            });
        });
        (by_customer, pending_keys, pending_units)
    }

    /// Whether Redis lost its data since the last round: `Palive` is gone
    /// (`SET NX` succeeds). Then every cell is pushed again, even one this
    /// instance did not touch (issue 16: totals are rebuilt from every live
    /// instance, not only from those that happen to push a changed window).
    async fn lost_data(&self) -> Result<bool, RedisError> {
        let mut conn = self.redis.conn();
        let set: Option<String> =
            self.redis.call("sync alive", ::redis::cmd("SET").arg(self.redis.keys.alive()).arg(1).arg("NX").query_async(&mut conn)).await?;
        Ok(set.is_some())
    }

    /// One round: push, read totals back, update the cells. Returns keys pushed.
    pub async fn sync_once(self: &Arc<Self>, engine: &Arc<Engine>) -> Result<usize, SyncError> {
        if self.lost_data().await? {
            self.resync_all.store(true, Ordering::Release);
        }
        let all = self.resync_all.swap(false, Ordering::AcqRel);
        let round_ms = now_ms();
        let (by_customer, pending_keys, pending_units) = self.collect(engine, all);
        crate::telemetry::redis_pending(pending_keys, pending_units);
        // Reservations (issue 19): the held totals of every (customer, meter)
        // pushed or checked this round are read back too.
        let held_pairs: Vec<(CustomerId, crate::model::MeterId)> = {
            let mut pairs: Vec<_> = by_customer.values().flatten().map(|p| (p.key.customer, p.key.meter)).collect();
            pairs.sort_unstable();
            pairs.dedup();
            pairs
        };
        let calls: Vec<Vec<Push>> = if matches!(self.redis.conn(), crate::redis_link::Conn::Cluster(_)) {
            by_customer.into_values().collect()
        } else {
            let flat: Vec<Push> = by_customer.into_values().flatten().collect();
            let mut calls = Vec::with_capacity(flat.len() / KEYS_PER_CALL + 1);
            let mut it = flat.into_iter().peekable();
            while it.peek().is_some() {
                calls.push(it.by_ref().take(KEYS_PER_CALL).collect());
            }
            calls
        };
        let keys: usize = calls.iter().map(Vec::len).sum();
        let mut tasks = tokio::task::JoinSet::new();
        let mut calls = calls.into_iter();
        let mut failure = None;
        loop {
            while tasks.len() < CALLS_IN_FLIGHT {
                let Some(call) = calls.next() else { break };
                let this = self.clone();
                let engine = engine.clone();
                tasks.spawn(async move { this.push(&engine, call, round_ms, all).await });
            }
            let Some(joined) = tasks.join_next().await else { break };
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(SyncError::from(e)),
                Err(e) => failure = Some(SyncError::Task(e.to_string())),
            }
        }
        if let Err(e) = pull_held(engine, &self.redis, &held_pairs).await {
            failure = Some(SyncError::Task(e.to_string()));
        }
        // Shared `max` / `latest` windows (issue 16).
        if let Err(e) = super::gauges::sync(engine, all, round_ms).await {
            failure = Some(SyncError::from(e));
        }
        // Shared `unique_count` windows (issue 25).
        match super::unique::sync(engine, all).await {
            Ok(true) => self.resync_all.store(true, Ordering::Release),
            Ok(false) => {}
            Err(e) => failure = Some(SyncError::from(e)),
        }
        match failure {
            Some(e) => {
                // Whatever was not pushed stays pending; after an outage Redis may
                // also have lost data, so the next success pushes everything.
                self.resync_all.store(true, Ordering::Release);
                Err(e)
            }
            None => Ok(keys),
        }
    }

    /// One script call; applies its answer to the cells, stamped `round_ms`
    /// (taken before the call: the totals are at least that fresh).
    async fn push(&self, engine: &Engine, call: Vec<Push>, round_ms: i64, all: bool) -> Result<(), RedisError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(&self.field);
        for p in &call {
            invocation.key(&p.redis_key).arg(p.value).arg(p.expire_at);
        }
        invocation.arg(i32::from(all));
        let leases = &self.redis.leases;
        let mut conn = self.redis.conn();
        let answer: Vec<i64> = self.redis.call("sync counters", invocation.invoke_async(&mut conn)).await?;
        if answer.len() != call.len() * 2 {
            return Err(RedisError::Unexpected(format!("sync script returned {} values for {} keys", answer.len(), call.len())));
        }
        for (p, pair) in call.iter().zip(answer.chunks(2)) {
            let (total, old) = (pair[0], pair[1]);
            let part = old.max(p.value);
            engine.usage().update_shared(&p.key, crate::usage::Origin::Sync, |cell| {
                if old < cell.pushed.load(Ordering::Acquire) {
                    // Redis forgot some of what we pushed: rebuild every key.
                    self.resync_all.store(true, Ordering::Release);
                }
                cell.pushed.store(part, Ordering::Release);
                cell.others.store(total.saturating_sub(part).max(0), Ordering::Release);
                cell.synced_ms.store(round_ms, Ordering::Release);
            });
            if !leases.is_empty() {
                leases.reported(&p.key, part);
            }
        }
        Ok(())
    }
}

/// Reads the held totals of `pairs` (reservations, issue 19) into the hold
/// book: one pipelined read per `KEYS_PER_CALL` pairs, `CALLS_IN_FLIGHT`
/// at once.
pub async fn pull_held(
    engine: &Arc<Engine>,
    redis: &Redis,
    pairs: &[(CustomerId, crate::model::MeterId)],
) -> Result<(), crate::holds::shared::SharedError> {
    if !engine.holds().is_shared() || pairs.is_empty() {
        return Ok(());
    }
    let names: Vec<(CustomerId, crate::model::MeterId, Arc<str>, String)> = pairs
        .iter()
        .filter_map(|&(c, m)| {
            Some((c, m, engine.counters().interner.name(c)?, engine.catalog().meters().get(usize::from(m))?.name.clone()))
        })
        .collect();
    let mut chunks = names.chunks(KEYS_PER_CALL).map(<[_]>::to_vec);
    let mut tasks = tokio::task::JoinSet::new();
    let mut failure = None;
    loop {
        while tasks.len() < CALLS_IN_FLIGHT {
            let Some(chunk) = chunks.next() else { break };
            let (engine, redis) = (engine.clone(), redis.clone());
            tasks.spawn(async move {
                let asked: Vec<(&str, &str)> = chunk.iter().map(|(_, _, c, m)| (&**c, m.as_str())).collect();
                let held = crate::holds::shared::read_held(&redis, &asked).await?;
                for ((c, m, _, _), h) in chunk.iter().zip(held) {
                    engine.holds().set_shared(*c, *m, h.unwrap_or_default());
                }
                Ok::<(), crate::holds::shared::SharedError>(())
            });
        }
        let Some(joined) = tasks.join_next().await else { break };
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(crate::holds::shared::SharedError::Redis(RedisError::Unexpected(e.to_string()))),
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Pushes every `interval` until shutdown, then once more.
pub async fn run(engine: Arc<Engine>, sync: Arc<CounterSync>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    // Lease timing and the staleness bound derive from the interval (issue 16).
    sync.redis.leases.set_sync_interval(interval);
    let lease_wait = Duration::from_millis(u64::try_from(sync.redis.leases.ttl_ms() / 4).unwrap_or(250)).max(interval);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            // At most a quarter of a lease ttl apart even while failing: after a
            // Redis restart every instance must push its usage again well
            // within the time no new slice is granted (`redis_link::lease`).
            _ = tokio::time::sleep(crate::backoff::backoff(interval, failures).min(lease_wait)) => {}
            _ = shutdown.changed() => break,
        }
        let started = Instant::now();
        match sync.sync_once(&engine).await {
            Ok(keys) => {
                failures = 0;
                crate::telemetry::redis_sync(keys, started.elapsed().as_secs_f64(), true);
                let (local, remote) = sync.redis.leases.decisions();
                crate::telemetry::leased_decisions(local, remote);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                crate::telemetry::redis_sync(0, 0.0, false);
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(error = %e, failures, "pushing counters to redis failed; usage stays pending and is pushed when it returns");
                }
            }
        }
        // Leased slices: renew the used ones, return the idle ones.
        super::leases::maintain(&engine, &sync.redis, false).await;
    }
    if let Err(e) = sync.sync_once(&engine).await {
        tracing::warn!(error = %e, "final counter push to redis failed; the usage is pushed from the WAL and store at the next start");
    }
    // Unused slices go back at shutdown.
    super::leases::maintain(&engine, &sync.redis, true).await;
}
