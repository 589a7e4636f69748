//! Slices of hard credit balances (issues 16 and 18): the Redis script that
//! grants an instance a slice of a customer's remaining balance of a meter,
//! and the book of slices this instance holds. The window leases
//! (`super::lease`) carry the same idea over a limit; here the "limit" is the
//! balance with no usage, `base = balance + own usage + others' usage`, which
//! the asking instance computes from its credit book (grants, burn-down,
//! expiries), since only the book knows the grants.
//!
//! **The invariant.** The credit key `P{C}:credits:{meter}` keeps the total
//! `t`, each instance's credit usage `i:<id>`, and per slice holder its cap
//! `c:<id>` (the level its own usage may reach without asking), its expiry
//! `x:<id>` (Redis time) and its unreported allowance `u:<id>`. A slice is
//! granted only while `base − t − Σ others' unused slices − own unused slice −
//! held (reservations) ≥ what is asked`; an instance decides a consume locally
//! only while its own usage plus the quantity stays within its cap and at most
//! `u` ahead of what Redis holds of it. So every unit consumed anywhere is
//! inside some slice granted out of credit nobody else had: the balance is
//! never overdrawn by consumes, whatever the number of instances. The strict
//! credits take (`grants::redis_consume`) and the reserve script
//! (`holds::shared`) count the slices as spent too.
//!
//! **Expiry of slices** as for windows: a slice lives `ttl` in Redis time, the
//! holder trusts it until `sent + 0.9 ttl`; a killed holder's slice returns
//! after the ttl except `min(u, cap − part)` (what it may have used without
//! reporting), which its next sync push (after a restart; `redis_consume`'s
//! sync) releases once the usage is pushed.
//!
//! **Grants that expire.** The holder trusts a slice no later than the minute
//! the earliest expiring active grant ends (the ledger's boundary): a slice
//! never spends credit after it expired. Others asking after the expiry send
//! a base without it, and the slice's unused part still counts against them.
//!
//! **Voids** (the rule). A void must not take credit already promised:
//! `void` mode answers how much of the grant's remainder is free —
//! `min(remainder, base − t − every unused slice − held)` — and that is what
//! the void takes (`voided_raw`); credit that slices, holds or usage not yet
//! seen here stand on stays with the grant, so nothing promised is overdrawn.
//! The same call fences the key (`vf`, one ttl): no slice is granted until the
//! void is stored and the fence lifted with the store's grants version (`gv`);
//! from then on an instance whose credit book has not loaded that version
//! (`seen < gv`) is refused a slice (`Stale`) until its grants refresh: no
//! instance takes a slice out of a base that still holds the voided credit.
//!
//! **Redis restarted empty**: no slice is granted for two ttls (server
//! uptime), while every instance pushes its credit usage again; a consume
//! then uses the strict credits take.

use super::Held;
use crate::counters::CustomerId;
use crate::model::MeterId;
use crate::redis_link::{Redis, RedisError};
use dashmap::DashMap;
use std::time::{Duration, Instant};

/// KEYS: the credit key, then the customer's held total of the meter.
/// ARGV: instance id, ttl ms, mode (`take` | `renew` | `return` | `void` |
/// `voided`), own usage, base, want (take: own + quantity; renew: the cap held;
/// void: the grant's remainder; voided: the grants version), grants version
/// seen. Replies: `{1, ttl, cap, total, part, unreported, held, held version}`
/// (granted, renewed, returned); `{0, total, held, held version}` refused (the
/// requester's slice is returned) or a renewal of an expired slice; `{2}`
/// recovering from a restart; `{3, total, held, held version}` grants changing
/// (fenced by a void, or this instance's grants are older than the key's
/// `gv`); void: `{1, voidable, total}`. The held total is the one read with
/// `total`: the caller records it before it learns `total`
/// (`grants::redis_consume`'s module doc says why).
const SCRIPT: &str = r"
local me, ttl, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local v, base, want, seen = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local key = KEYS[1]
local now = redis_now_ms()
if mode == 'voided' then
  local gv = tonumber(redis.call('HGET', key, 'gv') or '0')
  if want > gv then redis.call('HSET', key, 'gv', want) end
  redis.call('HDEL', key, 'vf')
  return {1}
end
if mode == 'take' and recovering(ttl) then return {2} end
local cf, xf, uf = 'c:' .. me, 'x:' .. me, 'u:' .. me
local s = read_slices(key)
local gv, vf, caps, exps, unrep = s.gv, s.vf, s.caps, s.exps, s.unrep
local t, mine = raise_own(s, key, me, v)
local hk, hv = 0, 0
if KEYS[2] then
  local hh = redis.call('HMGET', KEYS[2], 't', 'v')
  hk, hv = tonumber(hh[1] or '0'), tonumber(hh[2] or '0')
end
if (mode == 'take' or mode == 'void') and (vf > now or gv > seen) then return {3, t, hk, hv} end
if mode == 'void' then
  local free = base - t - slices_left(s, now) - hk
  if free < 0 then free = 0 end
  if free > want then free = want end
  redis.call('HSET', key, 'vf', now + ttl)
  return {1, free, t}
end
local held, holders = 0, 0
for id, _ in pairs(caps) do
  if id ~= me then
    if (exps[id] or 0) > now then holders = holders + 1 end
    held = held + unused(s, id, now)
  end
end
local valid = (exps[me] or 0) > now
local floor = mine
if valid and (caps[me] or 0) > floor then floor = caps[me] end
local free = base - t - held - (floor - mine) - hk
if mode == 'take' then
  local cap = floor
  local u = 0
  if valid then u = unrep[me] or 0 end
  if want > floor then
    local need = want - floor
    if need > free then
      redis.call('HDEL', key, cf, xf, uf)
      return {0, t, hk, hv}
    end
    local extra = math.floor(free / (2 * (holders + 1)))
    if extra < need then extra = need end
    if extra > free then extra = free end
    cap = floor + extra
  end
  local quarter = math.floor((cap - mine) / 4)
  if quarter > u then u = quarter end
  if want - mine > u then u = want - mine end
  redis.call('HSET', key, cf, cap, xf, now + ttl, uf, u)
  return {1, ttl, cap, t, mine, u, hk, hv}
end
if mode == 'renew' then
  local missing = caps[me] == nil
  if not valid and not (missing and recovering(ttl)) then
    redis.call('HDEL', key, cf, xf, uf)
    return {0, t, hk, hv}
  end
  local cap = floor
  if want > cap then cap = want end
  local u = unrep[me] or 0
  if missing then u = cap - mine end
  redis.call('HSET', key, cf, cap, xf, now + ttl, uf, u)
  return {1, ttl, cap, t, mine, u, hk, hv}
end
redis.call('HDEL', key, cf, xf, uf)
return {1, ttl, mine, t, mine, 0, hk, hv}
";

static CREDIT_LEASE: std::sync::LazyLock<::redis::Script> =
    std::sync::LazyLock::new(|| ::redis::Script::new(&format!("{}{SCRIPT}", super::slices_lua::SLICES_LUA)));

/// What a call does: the same three as a window lease's (take a slice, keep
/// it alive, give the unused part back).
pub use super::lease::LeaseMode as SliceMode;

/// One call's arguments.
#[derive(Debug, Clone)]
pub struct SliceAsk<'a> {
    pub credit_key: &'a str,
    pub held_key: &'a str,
    /// This instance's own credit usage.
    pub own: i64,
    /// Balance + own + others' usage, as the credit book sees it.
    pub base: i64,
    /// Take: own + quantity; renew: the cap held.
    pub want: i64,
    /// The grants version the credit book has loaded.
    pub seen: u64,
}

/// A granted (renewed, returned) slice as Redis answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub ttl_ms: i64,
    pub cap: i64,
    /// Every instance's credit usage.
    pub total: i64,
    /// This instance's usage Redis holds.
    pub part: i64,
    pub unreported: i64,
    /// The held total read with `total` (record it before learning `total`).
    pub held: Held,
}

/// The script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceReply {
    Granted(Granted),
    /// Not enough free credit (or an expired slice not renewed).
    Denied {
        total: i64,
        held: Held,
    },
    /// Redis restarted less than two ttls ago.
    Recovering,
    /// Grants are changing (a void in progress, or ours are older).
    Stale {
        total: i64,
        held: Held,
    },
}

fn invoke(ask: &SliceAsk<'_>, instance_id: &str, mode: &str, ttl_ms: i64) -> Result<::redis::ScriptInvocation<'static>, RedisError> {
    let mut invocation = CREDIT_LEASE.prepare_invoke();
    invocation
        .key(ask.credit_key)
        .key(ask.held_key)
        .arg(instance_id)
        .arg(ttl_ms)
        .arg(mode)
        .arg(super::exact(ask.own, "usage")?)
        .arg(super::exact(ask.base, "balance")?)
        .arg(super::exact(ask.want, "usage")?)
        .arg(ask.seen);
    Ok(invocation)
}

/// Runs a take, renewal or return.
pub async fn call(redis: &Redis, instance_id: &str, mode: SliceMode, ttl_ms: i64, ask: &SliceAsk<'_>) -> Result<SliceReply, RedisError> {
    let invocation = invoke(ask, instance_id, mode.as_str(), ttl_ms)?;
    let mut conn = redis.conn();
    let reply: Vec<i64> = redis.call("credit slice", invocation.invoke_async(&mut conn)).await?;
    let held = |total: i64, version: i64| Held { total, version };
    match *reply.as_slice() {
        [1, ttl_ms, cap, total, part, unreported, h, v] => {
            Ok(SliceReply::Granted(Granted { ttl_ms, cap, total, part, unreported, held: held(h, v) }))
        }
        [0, total, h, v] => Ok(SliceReply::Denied { total, held: held(h, v) }),
        [2] => Ok(SliceReply::Recovering),
        [3, total, h, v] => Ok(SliceReply::Stale { total, held: held(h, v) }),
        _ => Err(RedisError::Unexpected(format!("credit slice script answered {reply:?}"))),
    }
}

/// A void about to be stored: how much of the grant's remainder (`ask.want`)
/// no slice, hold or unseen usage stands on (`Ok(Some(_))`: void that much;
/// the key is fenced until [`voided`]); `Ok(None)` when grants are changing
/// (another void, or this instance's grants are older): reload and retry.
pub async fn void(redis: &Redis, instance_id: &str, ttl_ms: i64, ask: &SliceAsk<'_>) -> Result<Option<i64>, RedisError> {
    let invocation = invoke(ask, instance_id, "void", ttl_ms)?;
    let mut conn = redis.conn();
    let reply: Vec<i64> = redis.call("credit void", invocation.invoke_async(&mut conn)).await?;
    match reply.as_slice() {
        [1, free, _] => Ok(Some(*free)),
        [3, ..] => Ok(None),
        _ => Err(RedisError::Unexpected(format!("credit void script answered {reply:?}"))),
    }
}

/// The void is stored at grants `version`: lifts the fence; instances whose
/// credit book has not loaded `version` get no slice until they do.
pub async fn voided(redis: &Redis, credit_key: &str, held_key: &str, version: u64) -> Result<(), RedisError> {
    let mut invocation = CREDIT_LEASE.prepare_invoke();
    invocation.key(credit_key).key(held_key).arg("").arg(0).arg("voided").arg(0).arg(0).arg(version).arg(0);
    let mut conn = redis.conn();
    let _: Vec<i64> = redis.call("credit voided", invocation.invoke_async(&mut conn)).await?;
    Ok(())
}

/// A slice of a balance held here.
#[derive(Debug, Clone)]
pub struct Slice {
    /// Own credit usage may grow up to here without asking Redis.
    pub cap: i64,
    /// Trusted until then: 0.9 ttl after the request left, and never past
    /// the next grant expiry.
    pub valid_until: Instant,
    pub last_used: Instant,
    /// Own usage Redis is known to hold.
    pub reported: i64,
    /// Own usage may run this far ahead of `reported`.
    pub unreported: i64,
    /// The next grant expiry (the slice is not trusted past it).
    pub expires: Option<Instant>,
    pub credit_key: String,
    pub held_key: String,
}

/// The slices held here, per `(customer, meter)`.
#[derive(Debug, Default)]
pub struct CreditSlices {
    slices: DashMap<(CustomerId, MeterId), Slice>,
}

impl CreditSlices {
    /// Whether own usage `own` plus `quantity` fits the slice of `key`.
    pub fn fits(&self, key: (CustomerId, MeterId), own: i64, quantity: i64, now: Instant) -> bool {
        let after = own.saturating_add(quantity);
        self.slices.get(&key).is_some_and(|s| s.valid_until > now && after <= s.cap && after.saturating_sub(s.reported) <= s.unreported)
    }

    /// Records a granted or renewed slice; `sent` is when the request left.
    pub fn hold(&self, key: (CustomerId, MeterId), mut slice: Slice, sent: Instant, ttl_ms: i64) {
        let ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
        let until = sent + ttl - ttl / 10;
        slice.valid_until = slice.expires.map_or(until, |e| e.min(until));
        self.slices.insert(key, slice);
    }

    /// Marks a slice used now.
    pub fn touch(&self, key: (CustomerId, MeterId), now: Instant) {
        if let Some(mut s) = self.slices.get_mut(&key) {
            s.last_used = now;
        }
    }

    /// Redis holds `part` of own usage (a sync push).
    pub fn reported(&self, key: (CustomerId, MeterId), part: i64) {
        if let Some(mut s) = self.slices.get_mut(&key) {
            s.reported = s.reported.max(part);
        }
    }

    pub fn get(&self, key: (CustomerId, MeterId)) -> Option<Slice> {
        self.slices.get(&key).map(|s| s.clone())
    }

    pub fn remove(&self, key: (CustomerId, MeterId)) -> Option<Slice> {
        self.slices.remove(&key).map(|(_, s)| s)
    }

    /// Every slice held (the upkeep's list).
    pub fn snapshot(&self) -> Vec<((CustomerId, MeterId), Slice)> {
        self.slices.iter().map(|e| (*e.key(), e.value().clone())).collect()
    }

    pub fn len(&self) -> usize {
        self.slices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }
}
