//! Shared `max` and `latest` windows (issue 16): with Redis, a check on any
//! instance sees the global max, or the newest reading by timestamp.
//!
//! Unlike totals, gauges merge: the max of maxes, the newest of the newest.
//! So a window hash of a gauge meter holds the merged value itself (`m` for
//! `max`; `l` and its timestamp `lt` for `latest`), each instance pushes its
//! cell's value (which may already include what it merged before: merging is
//! idempotent), and the answer is folded back into the cell with the meter's
//! own aggregation. A check then reads the cell as it is: no `others` part.
//! Pushed each round when changed or checked, like totals; a check refreshes
//! a stale one itself (`limits::fresh`).

use crate::counters::window::WindowCell;
use crate::counters::CounterKey;
use crate::engine::Engine;
use crate::model::Aggregation;
use crate::redis_link::{RedisError, MAX_EXACT};
use std::sync::atomic::Ordering;

/// Keys per script call on a single server (a cluster calls once per key).
const KEYS_PER_CALL: usize = 256;

/// ARGV per key: kind (`max` | `latest`), value, timestamp (-1: no reading
/// here, read only), expire-at ms or 0. Returns per key the merged value and
/// its timestamp (0 for `max`).
const GAUGE_SCRIPT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local b = 4 * i - 3
  local kind, v, ts, exp = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local g, gts = 0, 0
  if kind == 'max' then
    local m = redis.call('HGET', key, 'm')
    if m then g = tonumber(m) end
    if ts >= 0 and (not m or v > g) then
      redis.call('HSET', key, 'm', v)
      g = v
    end
  else
    local cur = redis.call('HMGET', key, 'l', 'lt')
    if cur[2] then g, gts = tonumber(cur[1]), tonumber(cur[2]) end
    if ts >= 0 and (not cur[2] or ts > gts or (ts == gts and v > g)) then
      redis.call('HSET', key, 'l', v, 'lt', ts)
      g, gts = v, ts
    end
  end
  if exp > 0 then redis.call('PEXPIREAT', key, exp) end
  out[2 * i - 1] = g
  out[2 * i] = gts
end
return out
";

static GAUGE: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(GAUGE_SCRIPT));

/// One gauge window to push.
struct Push {
    key: CounterKey,
    aggregation: Aggregation,
    redis_key: String,
    value: i64,
    ts: i64,
    expire_at: i64,
}

/// Folds the merged value Redis answered into the cell (under the stripe
/// lock for `latest`, whose value and timestamp change together).
pub fn merge(engine: &Engine, key: &CounterKey, aggregation: Aggregation, value: i64, ts: i64, at_ms: i64) {
    let counters = engine.counters();
    let _stripe = (aggregation == Aggregation::Latest).then(|| counters.stripe(key.customer, key.meter));
    engine.usage().load_shared(*key, crate::usage::Origin::Sync, |cell| {
        cell.fold(aggregation, value, ts);
        cell.pushed.store(cell.value.load(Ordering::Acquire), Ordering::Release);
        cell.synced_ms.store(at_ms, Ordering::Release);
    });
}

/// Pushes the gauge windows that changed or were checked (all when `all`),
/// folding the merged values back. Returns keys pushed.
pub async fn sync(engine: &Engine, all: bool, round_ms: i64) -> Result<usize, RedisError> {
    let Some(redis) = engine.redis() else { return Ok(0) };
    let kinds: Vec<(&str, Aggregation)> = engine.catalog().meters().iter().map(|m| (m.name.as_str(), m.aggregation)).collect();
    if !kinds.iter().any(|(_, a)| a.is_gauge()) {
        return Ok(0);
    }
    let mut pushes = Vec::new();
    engine.counters().windows.for_each(|key, cell: &WindowCell| {
        let Some(&(meter, aggregation)) = kinds.get(usize::from(key.meter)) else { return };
        if !matches!(aggregation, Aggregation::Max | Aggregation::Latest) {
            return;
        }
        let expires = crate::redis_link::keys::expire_at(key);
        if expires != 0 && expires < round_ms {
            return;
        }
        let value = cell.value.load(Ordering::Acquire);
        let watched = cell.watched.swap(false, Ordering::AcqRel);
        if !(all || watched || value != cell.pushed.load(Ordering::Acquire)) || value > MAX_EXACT {
            return;
        }
        let ts = match aggregation {
            Aggregation::Latest if cell.ts.load(Ordering::Acquire) == 0 => -1,
            Aggregation::Latest => cell.ts.load(Ordering::Acquire),
            _ if value == 0 => -1,
            _ => 0,
        };
        let Some(customer) = engine.counters().interner.name(key.customer) else { return };
        pushes.push(Push {
            key: *key,
            aggregation,
            redis_key: redis.keys.window(&customer, meter, key.kind, key.start_ms),
            value,
            ts,
            expire_at: expires,
        });
    });
    let per_call = if matches!(redis.conn(), crate::redis_link::Conn::Cluster(_)) { 1 } else { KEYS_PER_CALL };
    let pushed = pushes.len();
    for call in pushes.chunks(per_call) {
        let mut invocation = GAUGE.prepare_invoke();
        for p in call {
            let kind = if p.aggregation == Aggregation::Max { "max" } else { "latest" };
            invocation.key(&p.redis_key).arg(kind).arg(p.value).arg(p.ts).arg(p.expire_at);
        }
        let mut conn = redis.conn();
        let answer: Vec<i64> = redis.call("sync gauges", invocation.invoke_async(&mut conn)).await?;
        if answer.len() != call.len() * 2 {
            return Err(RedisError::Unexpected(format!("gauge script returned {} values for {} keys", answer.len(), call.len())));
        }
        for (p, pair) in call.iter().zip(answer.chunks(2)) {
            merge(engine, &p.key, p.aggregation, pair[0], pair[1], round_ms);
        }
    }
    Ok(pushed)
}
