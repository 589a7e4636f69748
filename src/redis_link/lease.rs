//! Leases of quota for `enforcement = "leased"` limits (issue 16): the Redis
//! script that grants an instance a slice of a window's remaining quota, and
//! the book of slices this instance holds.
//!
//! **The invariant.** A window hash keeps, besides the total `t` and each
//! instance's part `i:<id>`, each instance's *cap* `c:<id>` (the level up to
//! which its part may grow without asking again) and its expiry `x:<id>`
//! (Redis time, ms). The script grants only while
//! `Σ_instances max(part, unexpired cap) ≤ limit`. An instance decides a
//! consume locally when its own usage plus the quantity stays within its cap,
//! so every granted unit is inside some cap and the total never passes the
//! limit. Pushing usage (the syncer, `sync::counters`) raises a part without
//! touching caps, so it leaves the sum unchanged: no double counting, and no
//! coordination between the syncer and the leases.
//!
//! **Slices.** A take asks for the cap it needs (own usage + quantity); the
//! script grants at least that and, when there is room, half the free quota
//! shared among the holders (`free / (2 × holders)`): slices shrink with the
//! remaining quota, and near the limit a slice is exactly one consume. A
//! refused take also gives back the requester's leftover, so leftovers too
//! small for a consume gather where they can be used.
//!
//! **Expiry.** A cap lives `ttl` in Redis time; the holder trusts it until
//! `sent + ttl − ttl/10` on its own monotonic clock (`sent` is taken before
//! the request, so the holder stops before Redis forgets). A live holder
//! renews caps it uses and returns idle ones (`sync::leases`); a killed one's
//! cap expires and returns — all but its *unreported allowance* `u:<id>`:
//! a holder decides locally only while its usage runs at most `u` ahead of
//! what Redis holds of it (a take reports; so does every sync push), so a
//! killed holder can have used at most `min(u, cap − part)` that Redis does
//! not know of, and that much stays held. When the same instance starts
//! again, its WAL replay restores its exact usage and its first sync round
//! pushes it and drops its expired cap (`sync::counters`), freeing the rest.
//! `u` is a quarter of the slice (at least one consume), so a crash strands
//! little, and only until the instance returns or the window ends.
//!
//! **Redis restarted empty.** Caps and parts vanish with the data, while
//! holders still trust their caps. So no slice is *taken* while the server has
//! been up for less than two `ttl`s: in that time every cap still trusted is
//! renewed (a renewal re-registers the cap it claims), every older one has
//! expired locally (a cap is trusted 0.9 `ttl` at most past its last grant or
//! renewal, which the old server did), and every syncer has pushed its usage
//! again (`Palive` tells it; it retries at least every `ttl / 4`). The one
//! assumption: an instance that can reach Redis at all does so within that
//! time.

use crate::counters::CounterKey;
use crate::keyhash::KeyHash;
use crate::redis_link::{Redis, RedisError};
use dashmap::DashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// KEYS: the windows, then optionally the customer's held total of the meter
/// (reservations, issue 19: a slice is granted only out of quota nothing
/// holds). ARGV: instance id, ttl ms, mode (`take` | `renew` | `return`),
/// then per window (limit, own usage, wanted cap, expire-at ms or 0). Every mode first raises
/// the instance's part to its usage (as a sync push would). Replies:
/// `{1, ttl, cap, total, part, ...}` per key; `{0, index, total}` when a take
/// is refused (the requester's caps on these keys are returned) or a renewal
/// finds its cap expired; `{2}` when the server restarted less than a ttl ago
/// (no new slices yet).
const LEASE_SCRIPT: &str = r"
local me, ttl, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = redis_now_ms()
if mode == 'take' and recovering(ttl) then return {2} end
local cf, xf, uf = 'c:' .. me, 'x:' .. me, 'u:' .. me
local plan = {}
local n = (#ARGV - 3) / 4
-- Reservations (issue 19): what is held over all instances is not free.
local hk = 0
if KEYS[n + 1] then hk = tonumber(redis.call('HGET', KEYS[n + 1], 't') or '0') end
for i = 1, n do
  local key = KEYS[i]
  local b = 4 * i
  local limit, v, want, exp = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local s = read_slices(key)
  local caps, exps, unrep = s.caps, s.exps, s.unrep
  local t, mine = raise_own(s, key, me, v)
  if exp > 0 then redis.call('PEXPIREAT', key, exp) end
  local held, holders = 0, 0
  for id, _ in pairs(caps) do
    if id ~= me then
      if (exps[id] or 0) > now then holders = holders + 1 end
      -- Expired: what its holder may have used without reporting stays held.
      held = held + unused(s, id, now)
    end
  end
  local floor = mine
  if (exps[me] or 0) > now and (caps[me] or 0) > floor then floor = caps[me] end
  plan[i] = {key = key, limit = limit, mine = mine, want = want, floor = floor, t = t, held = held, holders = holders,
             free = limit - (t - mine) - held - floor - hk, valid = (exps[me] or 0) > now, missing = caps[me] == nil,
             u = unrep[me] or 0}
end
local out = {1, ttl}
if mode == 'take' then
  local caps_new, unrep_new = {}, {}
  for i, p in ipairs(plan) do
    local cap = p.floor
    local u = p.u
    if not p.valid then u = 0 end
    if p.limit >= 0 and p.want > p.floor then
      local need = p.want - p.floor
      if need > p.free then
        for _, q in ipairs(plan) do redis.call('HDEL', q.key, cf, xf, uf) end
        return {0, i, p.t}
      end
      local extra = math.floor(p.free / (2 * (p.holders + 1)))
      if extra < need then extra = need end
      if extra > p.free then extra = p.free end
      cap = p.floor + extra
    end
    -- May be used without reporting: a quarter of the slice, at least what
    -- this consume needs.
    local quarter = math.floor((cap - p.mine) / 4)
    if quarter > u then u = quarter end
    if p.want - p.mine > u then u = p.want - p.mine end
    caps_new[i], unrep_new[i] = cap, u
  end
  for i, p in ipairs(plan) do
    redis.call('HSET', p.key, cf, caps_new[i], xf, now + ttl, uf, unrep_new[i])
    out[4 * i - 1] = caps_new[i]
    out[4 * i] = p.t
    out[4 * i + 1] = p.mine
    out[4 * i + 2] = unrep_new[i]
  end
  return out
end
if mode == 'renew' then
  -- Only a live cap is extended; a missing one is claimed back only while
  -- the server recovers from a restart (the holder still trusts it).
  for i, p in ipairs(plan) do
    if not p.valid and not (p.missing and recovering(ttl)) then
      redis.call('HDEL', p.key, cf, xf, uf)
      return {0, i, p.t}
    end
  end
end
for i, p in ipairs(plan) do
  local cap, u = p.mine, 0
  if mode == 'renew' then
    cap = p.floor
    if p.want > cap then cap = p.want end
    u = p.u
    if p.missing then u = cap - p.mine end
    redis.call('HSET', p.key, cf, cap, xf, now + ttl, uf, u)
  else
    redis.call('HDEL', p.key, cf, xf, uf)
  end
  out[4 * i - 1] = cap
  out[4 * i] = p.t
  out[4 * i + 1] = p.mine
  out[4 * i + 2] = u
end
return out
";

static LEASE: std::sync::LazyLock<::redis::Script> =
    std::sync::LazyLock::new(|| ::redis::Script::new(&format!("{}{LEASE_SCRIPT}", super::slices_lua::SLICES_LUA)));

/// What a lease call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMode {
    /// Ask for a cap of at least `want` (a slice).
    Take,
    /// Keep the cap `want` held locally alive (and re-register it after a
    /// Redis data loss).
    Renew,
    /// Give the unused cap back.
    Return,
}

impl LeaseMode {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            LeaseMode::Take => "take",
            LeaseMode::Renew => "renew",
            LeaseMode::Return => "return",
        }
    }
}

/// One window in a lease call.
#[derive(Debug, Clone)]
pub struct LeaseKey {
    pub redis_key: String,
    /// The limit in raw units.
    pub limit: i64,
    /// This instance's own usage of the window.
    pub value: i64,
    /// The cap wanted (take: usage + quantity; renew: the cap held).
    pub want: i64,
    /// The key's expiry (ms), 0 for none.
    pub expire_at: i64,
}

/// One window in a granted (or renewed, or returned) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseWindow {
    /// The cap now held (after a return: the part).
    pub cap: i64,
    /// The window's total over all instances.
    pub total: i64,
    /// This instance's part in Redis.
    pub part: i64,
    /// How far own usage may run ahead of `part` without a report.
    pub unreported: i64,
}

/// The script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReply {
    Granted {
        ttl_ms: i64,
        windows: Vec<LeaseWindow>,
    },
    /// Refused for the key at `index` (0-based), whose total is `total`.
    Denied {
        index: usize,
        total: i64,
    },
    /// The server restarted less than a lease ttl ago: no new slices yet.
    Recovering,
}

/// Runs the lease script on `keys` (one customer's windows: one hash slot).
/// `held_key`: the customer's held total of the meter (`Keys::held`), which a
/// take leaves room for.
pub async fn call(
    redis: &Redis,
    instance_id: &str,
    mode: LeaseMode,
    ttl_ms: i64,
    keys: &[LeaseKey],
    held_key: Option<&str>,
) -> Result<LeaseReply, RedisError> {
    let mut invocation = LEASE.prepare_invoke();
    invocation.arg(instance_id).arg(ttl_ms).arg(mode.as_str());
    for k in keys {
        let (value, want) = (super::exact(k.value, "usage")?, super::exact(k.want, "usage")?);
        invocation.key(&k.redis_key).arg(super::exact(k.limit, "limit")?).arg(value).arg(want).arg(k.expire_at);
    }
    if let Some(k) = held_key {
        invocation.key(k);
    }
    let mut conn = redis.conn();
    let reply: Vec<i64> = redis.call("lease", invocation.invoke_async(&mut conn)).await?;
    match reply.first() {
        Some(1) if reply.len() == 2 + 4 * keys.len() => {
            let windows = reply[2..].chunks(4).map(|w| LeaseWindow { cap: w[0], total: w[1], part: w[2], unreported: w[3] }).collect();
            Ok(LeaseReply::Granted { ttl_ms: reply[1], windows })
        }
        Some(0) if reply.len() == 3 => {
            let index = usize::try_from(reply[1] - 1).map_err(|_| RedisError::Unexpected(format!("lease script answered {reply:?}")))?;
            Ok(LeaseReply::Denied { index, total: reply[2] })
        }
        Some(2) => Ok(LeaseReply::Recovering),
        _ => Err(RedisError::Unexpected(format!("lease script answered {reply:?}"))),
    }
}

/// A slice this instance holds on one window.
#[derive(Debug, Clone)]
pub struct Cap {
    /// Own usage may grow up to here without asking Redis.
    pub cap: i64,
    /// Trusted until then (before Redis's expiry).
    pub valid_until: Instant,
    /// Last consume decided inside it (idle caps are returned).
    pub last_used: Instant,
    /// Own usage Redis is known to hold (take, renewal and sync answers).
    pub reported: i64,
    /// Own usage may run this far ahead of `reported` (beyond: a take, which
    /// reports): what stays held in Redis if this instance dies.
    pub unreported: i64,
    pub limit: i64,
    pub redis_key: String,
    pub expire_at: i64,
    /// The window's end (wall-clock ms): the cap is dropped after it.
    pub window_end_ms: i64,
}

/// The slices held here, and the lease timing derived from `sync_interval`.
#[derive(Debug)]
pub struct LeaseBook {
    caps: DashMap<CounterKey, Cap, KeyHash>,
    sync_interval_ms: AtomicI64,
    local: AtomicU64,
    remote: AtomicU64,
}

impl Default for LeaseBook {
    fn default() -> Self {
        LeaseBook {
            caps: DashMap::with_hasher(KeyHash),
            sync_interval_ms: AtomicI64::new(200),
            local: AtomicU64::new(0),
            remote: AtomicU64::new(0),
        }
    }
}

impl LeaseBook {
    /// Set by the syncer when it starts (`redis.sync_interval`).
    pub fn set_sync_interval(&self, interval: Duration) {
        let ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX).max(1);
        self.sync_interval_ms.store(ms, Ordering::Release);
    }

    pub fn sync_interval_ms(&self) -> i64 {
        self.sync_interval_ms.load(Ordering::Acquire)
    }

    /// A cap's lifetime in Redis: ten sync intervals, within 1 s – 60 s.
    pub fn ttl_ms(&self) -> i64 {
        self.sync_interval_ms().saturating_mul(10).clamp(1_000, 60_000)
    }

    /// A shared total older than this is refreshed before a check uses it.
    pub fn stale_after_ms(&self) -> i64 {
        self.sync_interval_ms().saturating_mul(2)
    }

    /// Whether own usage `own` plus `quantity` fits the cap held on `key`
    /// (trusted, and within the unreported allowance).
    pub fn fits(&self, key: &CounterKey, own: i64, quantity: i64, now: Instant) -> bool {
        let after = own.saturating_add(quantity);
        self.caps.get(key).is_some_and(|c| c.valid_until > now && after <= c.cap && after.saturating_sub(c.reported) <= c.unreported)
    }

    /// Runs `reserve(bound)` while holding the cap on `key` (so it cannot be
    /// returned or replaced meanwhile), `bound` being how far own usage may
    /// go: the cap, and `reported + unreported`. `None` when no trusted cap.
    pub fn within<R>(&self, key: &CounterKey, now: Instant, reserve: impl FnOnce(i64) -> R) -> Option<R> {
        let cap = self.caps.get(key)?;
        if cap.valid_until <= now {
            return None;
        }
        let r = reserve(cap.cap.min(cap.reported.saturating_add(cap.unreported)));
        drop(cap);
        self.touch(key, now);
        Some(r)
    }

    /// Takes the cap on `key` out of the book (a take is about to replace it):
    /// consumes inside it are all done once this returns.
    pub fn take_out(&self, key: &CounterKey) -> Option<Cap> {
        self.caps.remove(key).map(|(_, c)| c)
    }

    /// Puts back a cap taken out (the take failed: Redis still holds it).
    pub fn put_back(&self, key: CounterKey, cap: Cap) {
        self.caps.entry(key).or_insert(cap);
    }

    /// Redis holds `part` of own usage on `key` (a sync answer).
    pub fn reported(&self, key: &CounterKey, part: i64) {
        if let Some(mut c) = self.caps.get_mut(key) {
            c.reported = c.reported.max(part);
        }
    }

    /// A copy of the cap held on `key`.
    pub fn get(&self, key: &CounterKey) -> Option<Cap> {
        self.caps.get(key).map(|c| c.clone())
    }

    /// Records a granted or renewed cap; `sent` is when the request left.
    pub fn hold(&self, key: CounterKey, mut cap: Cap, sent: Instant, ttl_ms: i64) {
        let ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
        cap.valid_until = sent + ttl - ttl / 10;
        self.caps.insert(key, cap);
    }

    /// Marks a cap used now.
    pub fn touch(&self, key: &CounterKey, now: Instant) {
        if let Some(mut c) = self.caps.get_mut(key) {
            c.last_used = now;
        }
    }

    pub fn remove(&self, key: &CounterKey) {
        self.caps.remove(key);
    }

    /// Every cap held (the maintenance round's list).
    pub fn snapshot(&self) -> Vec<(CounterKey, Cap)> {
        self.caps.iter().map(|e| (*e.key(), e.value().clone())).collect()
    }

    pub fn len(&self) -> usize {
        self.caps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }

    /// Counts a leased decision: inside a held slice (`local`) or not.
    pub fn decided(&self, local: bool) {
        if local {
            self.local.fetch_add(1, Ordering::Relaxed);
        } else {
            self.remote.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Leased decisions so far: (inside a slice, with a round trip).
    pub fn decisions(&self) -> (u64, u64) {
        (self.local.load(Ordering::Relaxed), self.remote.load(Ordering::Relaxed))
    }
}
