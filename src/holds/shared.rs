//! Reservations across instances (issue 19): with Redis, every reservation
//! and every held total lives there, so holds count on every instance and a
//! hold taken on one instance is settled or released on any other.
//!
//! **Keys** (see `redis_link`'s layout): the reservation `P{C}:r:<id>` (a
//! hash), the customer's held total of a meter `P{C}:held:<meter>` (`t`, and
//! its version `v`: Redis time in µs, rising with every change, so a stale
//! read never overwrites a newer total here), both in the customer's hash
//! slot with its window hashes; the owner `Pres:<id>` (which customer an id
//! belongs to: settle, release and get name only the id); and the expiry index
//! `P{index}:hold_expiry`.
//!
//! **Atomic.** One script takes a hold: it checks the `strict` and `leased`
//! windows given (`t + slices + held + quantity ≤ limit`, after raising this
//! instance's part to its usage like the strict script) and a hard credits
//! balance on the customer's credit key (`base − t − held ≥ quantity`, after
//! raising this instance's part like the credits take) and, when all fit,
//! writes the reservation and raises the held total. The strict consume script
//! and the lease script read the same held total (`limits::strict`,
//! `redis_link::lease`), so holds and consumes never pass a hard limit
//! together. One script finishes a hold (`held` → settled, released, expired,
//! or denied when withdrawn): the status changes once, whichever instance
//! asks, so a hold is released exactly once — also when several instances run
//! the expiry task over the same index.
//!
//! **TTLs.** A reservation expires a day ([`super::FINISHED_RETENTION_MS`])
//! after it finished, or after its expiry; an allocation's lives while held.
//! A held total back at zero expires after the same day.

use super::{Reservation, Status, FINISHED_RETENTION_MS};
use crate::redis_link::{Conn, Redis, RedisError};
use ::redis::Value;

/// Why a shared reservation call failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("reservation {0:?} exists with another customer, meter or quantity")]
    Conflict(String),
}

/// Helpers every script shares: the held total and its version.
const PRELUDE: &str = r"
local function held_now(hk)
  local h = redis.call('HMGET', hk, 't', 'v')
  return tonumber(h[1] or '0'), tonumber(h[2] or '0')
end
local function bump(hk, q, keep)
  local tm = redis.call('TIME')
  local us = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
  local v = tonumber(redis.call('HGET', hk, 'v') or '0') + 1
  if us > v then v = us end
  local t = redis.call('HINCRBY', hk, 't', q)
  if t < 0 then
    redis.call('HSET', hk, 't', 0)
    t = 0
  end
  redis.call('HSET', hk, 'v', v)
  if t == 0 then redis.call('PEXPIRE', hk, keep) else redis.call('PERSIST', hk) end
  return t, v
end
local codes = {held = 1, settled = 2, released = 3, expired = 4, denied = 5}
local function record(rec)
  local r = redis.call('HMGET', rec, 's', 'q', 'e', 'sq', 'c', 'f', 'ts', 'm')
  return {codes[r[1]] or 0, tonumber(r[2] or '0'), tonumber(r[3] or '0'), tonumber(r[4] or '-1'), tonumber(r[5] or '0'),
          tonumber(r[6] or '0'), tonumber(r[7] or '0'), r[8] or ''}
end
";

/// KEYS: the reservation, the held total, the customer's credit key of the
/// meter (any key of the slot when there is no credit check), then the windows
/// to check. ARGV: instance id, quantity, meter, expires-at (0: none), now ms,
/// retention ms, mode (`hold` | `deny`), the credit check's own usage (-1: no
/// check) and base (see [`CreditCheck`]), then per window (limit, own usage,
/// key expire-at or 0, `1` if leased). Replies `{1, held, version, total...}`
/// (held; the credit total `t` last when checked), `{0, index (0: decided
/// before; windows + 1: the credits), total, held, version}` (denied,
/// recorded), `{2, held, version, record...}` (the id exists: nothing changed)
/// or `{3}` (it exists with another meter or quantity).
const RESERVE_BODY: &str = r"
local me, q, meter, exp = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now, keep, mode = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local cown, cbase = tonumber(ARGV[8]), tonumber(ARGV[9])
local rec, hk = KEYS[1], KEYS[2]
if redis.call('EXISTS', rec) == 1 then
  local r = record(rec)
  if r[8] ~= meter or r[2] ~= q then return {3} end
  local h, v = held_now(hk)
  local out = {2, h, v}
  for i = 1, 8 do out[3 + i] = r[i] end
  return out
end
local function deny(index, total)
  redis.call('HSET', rec, 'm', meter, 'q', q, 'e', exp, 's', 'denied', 'c', now, 'f', now, 'i', me)
  redis.call('PEXPIRE', rec, keep)
  local h, v = held_now(hk)
  return {0, index, total, h, v}
end
if mode == 'deny' then return deny(0, 0) end
local field = 'i:' .. me
local h = held_now(hk)
local totals = {}
local rnow = redis_now_ms()
local n = (#ARGV - 9) / 4
for i = 1, n do
  local key, b = KEYS[3 + i], 9 + 4 * (i - 1)
  local limit, own, wexp, leased = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), ARGV[b + 4] == '1'
  local old = tonumber(redis.call('HGET', key, field) or '0')
  local t = tonumber(redis.call('HGET', key, 't') or '0')
  if own > old then
    redis.call('HSET', key, field, own)
    t = redis.call('HINCRBY', key, 't', own - old)
    if wexp > 0 then redis.call('PEXPIREAT', key, wexp) end
  end
  totals[i] = t
  local slices = 0
  if leased then
    -- Quota inside the instances' slices (redis_link::lease) is theirs.
    slices = slices_left(read_slices(key), rnow)
  end
  if limit >= 0 and t + slices + h + q > limit then return deny(i, t) end
end
-- A hard credits balance (grants::redis_consume): this instance's part raised
-- to its usage like a take, then what every instance used and what is held
-- over all instances leave the balance.
if cown >= 0 then
  local ck = KEYS[3]
  local old = tonumber(redis.call('HGET', ck, field) or '0')
  local ct = tonumber(redis.call('HGET', ck, 't') or '0')
  if cown > old then
    redis.call('HSET', ck, field, cown)
    ct = redis.call('HINCRBY', ck, 't', cown - old)
  end
  -- Slices of the balance (redis_link::credit_lease) are spoken for, and a
  -- void in progress stops holds as it stops slices.
  local cs = read_slices(ck)
  local vf, sl = cs.vf, slices_left(cs, rnow)
  if vf > rnow or cbase - ct - h - sl < q then return deny(n + 1, ct) end
  totals[n + 1] = ct
end
redis.call('HSET', rec, 'm', meter, 'q', q, 'e', exp, 's', 'held', 'c', now, 'f', 0, 'i', me)
if exp > 0 then redis.call('PEXPIREAT', rec, exp + keep) end
local t, v = bump(hk, q, keep)
local out = {1, t, v}
for i = 1, #totals do out[3 + i] = totals[i] end
return out
";

/// KEYS: the reservation, the held total, the customer's credit key of the
/// meter (any key of the slot when none), then (a settle) the `strict` and
/// `leased` windows its usage counts in. ARGV: status, settled quantity (-1:
/// none), usage timestamp ms, now ms, retention ms, `1` to finish only when
/// its expiry passed, the instance field, this instance's own usage of a hard
/// credits balance (-1: none), then per window (own usage, expire-at or 0): a
/// settle moves its quantity from the held total into this instance's part of
/// each window and of the credit key at once (as a strict consume or a
/// credits take does), so no other instance can take those units before the
/// next sync push. Replies
/// `{changed (1|0), held, version, record...}`, or `{-1}` when there is no
/// such reservation.
const FINISH_BODY: &str = r"
local rec, hk = KEYS[1], KEYS[2]
local status, sq, ts, now, keep, due = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local field, cown = ARGV[7], tonumber(ARGV[8])
if redis.call('EXISTS', rec) == 0 then return {-1} end
local r = record(rec)
local changed = 0
local h, v
if r[1] == 1 and not (due and (r[3] == 0 or r[3] > now)) then
  redis.call('HSET', rec, 's', status, 'f', now)
  if sq >= 0 then redis.call('HSET', rec, 'sq', sq, 'ts', ts) end
  if sq > 0 then
    for i = 1, (#ARGV - 8) / 2 do
      local key, own, wexp = KEYS[3 + i], tonumber(ARGV[7 + 2 * i]), tonumber(ARGV[8 + 2 * i])
      local old = tonumber(redis.call('HGET', key, field) or '0')
      if own > old then
        redis.call('HINCRBY', key, 't', own - old)
        old = own
      end
      redis.call('HSET', key, field, old + sq)
      redis.call('HINCRBY', key, 't', sq)
      if wexp > 0 then redis.call('PEXPIREAT', key, wexp) end
    end
    if cown >= 0 then
      local ck = KEYS[3]
      local old = tonumber(redis.call('HGET', ck, field) or '0')
      if cown > old then
        redis.call('HINCRBY', ck, 't', cown - old)
        old = cown
      end
      redis.call('HSET', ck, field, old + sq)
      redis.call('HINCRBY', ck, 't', sq)
    end
  end
  redis.call('PEXPIRE', rec, keep)
  h, v = bump(hk, -r[2], keep)
  r = record(rec)
  changed = 1
else
  h, v = held_now(hk)
end
local out = {changed, h, v}
for i = 1, 8 do out[3 + i] = r[i] end
return out
";

static RESERVE: std::sync::LazyLock<::redis::Script> =
    std::sync::LazyLock::new(|| ::redis::Script::new(&format!("{}{PRELUDE}{RESERVE_BODY}", crate::redis_link::slices_lua::SLICES_LUA)));
static FINISH: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(&format!("{PRELUDE}{FINISH_BODY}")));

/// A held total as Redis answered it (defined with the Redis link, whose
/// credit scripts answer it too).
pub use crate::redis_link::Held;

/// One `strict` or `leased` window a hold must fit.
#[derive(Debug, Clone)]
pub struct WindowCheck {
    pub redis_key: String,
    /// The limit, raw units (-1: none).
    pub limit: i64,
    /// This instance's own usage of the window.
    pub own: i64,
    /// The window key's expiry (ms), 0 for none.
    pub expire_at: i64,
    /// Leased: the instances' slices are not free.
    pub leased: bool,
}

/// A hard credits balance a hold must fit, atomically with the consumes'
/// takes (`grants::redis_consume`): held only when `base − t − held ≥
/// quantity`, `t` being every instance's usage in the credit key.
#[derive(Debug, Clone)]
pub struct CreditCheck {
    /// The customer's credit key of the meter.
    pub redis_key: String,
    /// This instance's own usage of the balance (raised in the key first).
    pub own: i64,
    /// The balance this instance knows plus its own usage and the other
    /// instances' usage it has charged.
    pub base: i64,
}

/// What a reserve call did.
#[derive(Debug, Clone)]
pub enum ReserveOutcome {
    /// Held; the window totals as checked, in order, then the credit total
    /// `t` when a credit check was given.
    Held { held: Held, totals: Vec<i64> },
    /// Denied (and recorded so): by the window at `index` (0-based; the
    /// number of windows: the credit check) whose total is `total`, or by the
    /// caller's own decision (`index` `None`).
    Denied { index: Option<usize>, total: i64, held: Held },
    /// The id was reserved before (nothing changed).
    Exists { reservation: Reservation, held: Held },
}

/// What a finish call did.
#[derive(Debug, Clone)]
pub enum FinishOutcome {
    /// The reservation was held and now has the status asked for.
    Finished {
        reservation: Reservation,
        held: Held,
    },
    /// It was no longer held (or not due): as it stands.
    Unchanged {
        reservation: Reservation,
        held: Held,
    },
    NotFound,
}

/// A reservation to take.
#[derive(Debug, Clone, Copy)]
pub struct Take<'a> {
    pub id: &'a str,
    pub customer: &'a str,
    pub meter: &'a str,
    pub quantity: i64,
    /// Unix ms; `None`: an allocation.
    pub expires_at: Option<i64>,
    pub now: i64,
    /// Denied already (by a cached limit): record the denial only.
    pub deny: bool,
}

fn unexpected(what: &str, reply: &[Value]) -> SharedError {
    SharedError::Redis(RedisError::Unexpected(format!("{what} script answered {reply:?}")))
}

fn int(v: Option<&Value>) -> Option<i64> {
    v.and_then(|v| ::redis::from_redis_value_ref::<i64>(v).ok())
}

fn status_of(code: i64) -> Option<Status> {
    Some(match code {
        1 => Status::Held,
        2 => Status::Settled,
        3 => Status::Released,
        4 => Status::Expired,
        5 => Status::Denied,
        _ => return None,
    })
}

/// The record as the scripts return it (8 values from `at`).
fn reservation(id: &str, customer: &str, reply: &[Value], at: usize) -> Option<Reservation> {
    let n = |i: usize| int(reply.get(at + i));
    let meter: String = ::redis::from_redis_value_ref(reply.get(at + 7)?).ok()?;
    let expires_at = n(2)?;
    let settled = n(3)?;
    Some(Reservation {
        id: id.to_string(),
        customer: customer.to_string(),
        meter,
        quantity: n(1)?,
        expires_at: (expires_at > 0).then_some(expires_at),
        status: status_of(n(0)?)?,
        settled_quantity: (settled >= 0).then_some(settled),
        created_ms: n(4)?,
        finished_ms: n(5)?,
    })
}

/// Claims `id` for `customer` (`Pres:<id>`): the owner key lets settle,
/// release and get find the customer's slot. An id owned by another customer
/// is a conflict.
async fn claim_owner(redis: &Redis, id: &str, customer: &str) -> Result<(), SharedError> {
    let mut conn = redis.conn();
    let mut c = ::redis::cmd("SET");
    c.arg(redis.keys.reservation_owner(id)).arg(customer).arg("NX").arg("GET");
    let previous: Option<String> = redis.call("reservation owner", c.query_async(&mut conn)).await?;
    match previous {
        Some(owner) if owner != customer => Err(SharedError::Conflict(id.to_string())),
        _ => Ok(()),
    }
}

/// The customer owning `id`, if any.
pub async fn owner(redis: &Redis, id: &str) -> Result<Option<String>, SharedError> {
    let mut conn = redis.conn();
    let mut c = ::redis::cmd("GET");
    c.arg(redis.keys.reservation_owner(id));
    Ok(redis.call("reservation owner", c.query_async(&mut conn)).await?)
}

/// Sets the owner key's expiry to the reservation's: a day after it finished
/// or after its expiry; none while an allocation is held.
async fn expire_owner(redis: &Redis, r: &Reservation) -> Result<(), SharedError> {
    let mut conn = redis.conn();
    let key = redis.keys.reservation_owner(&r.id);
    let c = match (r.status, r.expires_at) {
        (Status::Held, None) => {
            let mut c = ::redis::cmd("PERSIST");
            c.arg(key);
            c
        }
        (Status::Held, Some(at)) => {
            let mut c = ::redis::cmd("PEXPIREAT");
            c.arg(key).arg(at.saturating_add(FINISHED_RETENTION_MS));
            c
        }
        _ => {
            let mut c = ::redis::cmd("PEXPIRE");
            c.arg(key).arg(FINISHED_RETENTION_MS);
            c
        }
    };
    let _: i64 = redis.call("reservation owner expiry", c.query_async(&mut conn)).await?;
    Ok(())
}

/// Takes (or denies) a reservation; see the module doc.
pub async fn reserve(
    redis: &Redis,
    instance_id: &str,
    take: Take<'_>,
    windows: &[WindowCheck],
    credit: Option<&CreditCheck>,
) -> Result<ReserveOutcome, SharedError> {
    claim_owner(redis, take.id, take.customer).await?;
    let expires_at = take.expires_at.unwrap_or(0);
    if let (Some(at), false) = (take.expires_at, take.deny) {
        // The index first: a hint the expiry task checks against the hash, so a
        // crash after it (and before the hold) costs one look.
        let member = serde_json::to_string(&(take.customer, take.meter, take.id)).unwrap_or_default();
        index(redis, &member, at, true).await?;
    }
    let held_key = redis.keys.held(take.customer, take.meter);
    let mut invocation = RESERVE.prepare_invoke();
    invocation
        .key(redis.keys.reservation(take.customer, take.id))
        .key(&held_key)
        .key(credit.map_or(held_key.as_str(), |c| c.redis_key.as_str()))
        .arg(instance_id)
        .arg(crate::redis_link::exact(take.quantity, "quantity")?)
        .arg(take.meter)
        .arg(expires_at)
        .arg(take.now)
        .arg(FINISHED_RETENTION_MS)
        .arg(if take.deny { "deny" } else { "hold" });
    match credit {
        Some(c) => invocation.arg(crate::redis_link::exact(c.own.max(0), "usage")?).arg(crate::redis_link::exact(c.base, "balance")?),
        None => invocation.arg(-1).arg(0),
    };
    for w in windows {
        invocation.key(&w.redis_key).arg(crate::redis_link::exact(w.limit, "limit")?).arg(crate::redis_link::exact(w.own, "usage")?);
        invocation.arg(w.expire_at).arg(i32::from(w.leased));
    }
    let mut conn = redis.conn();
    let reply: Vec<Value> = redis.call("reserve", invocation.invoke_async(&mut conn)).await?;
    let held = |at: usize| Held { total: int(reply.get(at)).unwrap_or(0), version: int(reply.get(at + 1)).unwrap_or(0) };
    let outcome = match int(reply.first()) {
        Some(1) if reply.len() == 3 + windows.len() + usize::from(credit.is_some()) => {
            ReserveOutcome::Held { held: held(1), totals: reply[3..].iter().filter_map(|v| int(Some(v))).collect() }
        }
        Some(0) if reply.len() == 5 => {
            let index = int(reply.get(1)).unwrap_or(0);
            ReserveOutcome::Denied { index: usize::try_from(index - 1).ok(), total: int(reply.get(2)).unwrap_or(0), held: held(3) }
        }
        Some(2) => match reservation(take.id, take.customer, &reply, 3) {
            Some(r) => ReserveOutcome::Exists { reservation: r, held: held(1) },
            None => return Err(unexpected("reserve", &reply)),
        },
        Some(3) => return Err(SharedError::Conflict(take.id.to_string())),
        _ => return Err(unexpected("reserve", &reply)),
    };
    let status = match outcome {
        ReserveOutcome::Held { .. } => Some(Status::Held),
        ReserveOutcome::Denied { .. } => Some(Status::Denied),
        ReserveOutcome::Exists { .. } => None,
    };
    if let Some(status) = status {
        let r = Reservation {
            id: take.id.to_string(),
            customer: take.customer.to_string(),
            meter: take.meter.to_string(),
            quantity: take.quantity,
            expires_at: take.expires_at,
            status,
            settled_quantity: None,
            created_ms: take.now,
            finished_ms: if status == Status::Held { 0 } else { take.now },
        };
        expire_owner(redis, &r).await?;
        track(redis, &r).await?;
    }
    if let ReserveOutcome::Exists { reservation, .. } = &outcome {
        // Tracked again (idempotent): a crash may have come before it.
        track(redis, reservation).await?;
    }
    Ok(outcome)
}

/// A finish to apply.
#[derive(Debug, Clone, Copy)]
pub struct Finish<'a> {
    pub id: &'a str,
    pub customer: &'a str,
    pub meter: &'a str,
    pub status: Status,
    /// A settle's quantity and usage timestamp.
    pub settled: Option<(i64, i64)>,
    pub now: i64,
    /// Expiry: only when its `expires_at` passed.
    pub only_due: bool,
    /// A settle: the windows its usage goes to at once, with this
    /// instance's own usage of each (see `FINISH_BODY`).
    pub windows: &'a [WindowCheck],
    /// A settle on a hard credits balance: its credit key and this instance's
    /// own usage of it; the usage goes to the key at once too.
    pub credit: Option<(&'a str, i64)>,
    pub instance_id: &'a str,
}

/// Finishes a held reservation (exactly once, whichever instance asks).
/// Also answers the usage timestamp a settle stored (0: none).
pub async fn finish(redis: &Redis, f: Finish<'_>) -> Result<(FinishOutcome, i64), SharedError> {
    let (sq, ts) = f.settled.unwrap_or((-1, 0));
    let held_key = redis.keys.held(f.customer, f.meter);
    let mut invocation = FINISH.prepare_invoke();
    invocation
        .key(redis.keys.reservation(f.customer, f.id))
        .key(&held_key)
        .key(f.credit.map_or(held_key.as_str(), |(key, _)| key))
        .arg(f.status.as_str())
        .arg(crate::redis_link::exact(sq, "quantity")?)
        .arg(ts)
        .arg(f.now)
        .arg(FINISHED_RETENTION_MS)
        .arg(i32::from(f.only_due))
        .arg(crate::redis_link::Keys::instance_field(f.instance_id))
        .arg(match f.credit {
            Some((_, own)) => crate::redis_link::exact(own.max(0), "usage")?,
            None => -1,
        });
    for w in f.windows {
        invocation.key(&w.redis_key).arg(crate::redis_link::exact(w.own, "usage")?).arg(w.expire_at);
    }
    let mut conn = redis.conn();
    let reply: Vec<Value> = redis.call("finish reservation", invocation.invoke_async(&mut conn)).await?;
    if int(reply.first()) == Some(-1) {
        return Ok((FinishOutcome::NotFound, 0));
    }
    let (Some(changed), Some(r)) = (int(reply.first()), reservation(f.id, f.customer, &reply, 3)) else {
        return Err(unexpected("finish", &reply));
    };
    let held = Held { total: int(reply.get(1)).unwrap_or(0), version: int(reply.get(2)).unwrap_or(0) };
    let ts = int(reply.get(9)).unwrap_or(0);
    if changed == 1 {
        expire_owner(redis, &r).await?;
        track(redis, &r).await?;
        Ok((FinishOutcome::Finished { reservation: r, held }, ts))
    } else {
        Ok((FinishOutcome::Unchanged { reservation: r, held }, ts))
    }
}

/// The reservation `id` as Redis holds it, with the usage timestamp a settle
/// stored (0: none).
pub async fn get(redis: &Redis, id: &str) -> Result<Option<(Reservation, i64)>, SharedError> {
    let Some(customer) = owner(redis, id).await? else { return Ok(None) };
    let mut conn = redis.conn();
    let mut c = ::redis::cmd("HMGET");
    c.arg(redis.keys.reservation(&customer, id)).arg(&["s", "q", "e", "sq", "c", "f", "ts", "m"]);
    let fields: Vec<Option<String>> = redis.call("get reservation", c.query_async(&mut conn)).await?;
    let Some(Some(status)) = fields.first() else { return Ok(None) };
    let n = |i: usize| fields.get(i).cloned().flatten().and_then(|s| s.parse::<i64>().ok());
    let status = match status.as_str() {
        "held" => Status::Held,
        "settled" => Status::Settled,
        "released" => Status::Released,
        "expired" => Status::Expired,
        _ => Status::Denied,
    };
    let expires_at = n(2).unwrap_or(0);
    let r = Reservation {
        id: id.to_string(),
        customer,
        meter: fields.get(7).cloned().flatten().unwrap_or_default(),
        quantity: n(1).unwrap_or(0),
        expires_at: (expires_at > 0).then_some(expires_at),
        status,
        settled_quantity: n(3).filter(|&q| q >= 0),
        created_ms: n(4).unwrap_or(0),
        finished_ms: n(5).unwrap_or(0),
    };
    Ok(Some((r, n(6).unwrap_or(0))))
}

/// Up to `max` reservations whose expiry is at or before `now`, as
/// `(customer, meter, id, index member)`.
pub async fn due(redis: &Redis, now: i64, max: usize) -> Result<Vec<(String, String, String, String)>, SharedError> {
    let mut conn = redis.conn();
    let mut c = ::redis::cmd("ZRANGEBYSCORE");
    c.arg(redis.keys.hold_expiry()).arg("-inf").arg(now).arg("LIMIT").arg(0).arg(max);
    let members: Vec<String> = redis.call("due holds", c.query_async(&mut conn)).await?;
    Ok(members
        .into_iter()
        .filter_map(|m| {
            let (customer, meter, id): (String, String, String) = serde_json::from_str(&m).ok()?;
            Some((customer, meter, id, m))
        })
        .collect())
}

/// Puts `member` in the expiry index at `at` (`only_new`: an existing
/// member keeps its score: a repeated reservation does not move its expiry).
pub async fn index(redis: &Redis, member: &str, at: i64, only_new: bool) -> Result<(), SharedError> {
    let mut conn = redis.conn();
    let mut c = ::redis::cmd("ZADD");
    c.arg(redis.keys.hold_expiry());
    if only_new {
        c.arg("NX");
    }
    c.arg(at).arg(member);
    let _: i64 = redis.call("hold expiry index", c.query_async(&mut conn)).await?;
    Ok(())
}

/// Drops an index member (its reservation is finished or gone).
pub async fn unindex(redis: &Redis, member: &str) -> Result<(), SharedError> {
    let mut conn = redis.conn();
    let mut c = ::redis::cmd("ZREM");
    c.arg(redis.keys.hold_expiry()).arg(member);
    let _: i64 = redis.call("unindex hold", c.query_async(&mut conn)).await?;
    Ok(())
}

/// The held totals of `(customer, meter)` pairs, in order (`None`: none held).
pub async fn read_held(redis: &Redis, pairs: &[(&str, &str)]) -> Result<Vec<Option<Held>>, SharedError> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let cmd = |(customer, meter): (&str, &str)| {
        let mut c = ::redis::cmd("HMGET");
        c.arg(redis.keys.held(customer, meter)).arg("t").arg("v");
        c
    };
    let replies: Vec<(Option<i64>, Option<i64>)> = match redis.conn() {
        Conn::Single(_) => {
            let mut pipe = ::redis::pipe();
            for &p in pairs {
                pipe.add_command(cmd(p));
            }
            let mut conn = redis.conn();
            redis.call("read held", pipe.query_async(&mut conn)).await?
        }
        Conn::Cluster(_) => {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, &p) in pairs.iter().enumerate() {
                let c = cmd(p);
                let mut conn = redis.conn();
                tasks.spawn(async move { (i, c.query_async::<(Option<i64>, Option<i64>)>(&mut conn).await) });
            }
            let mut out = vec![(None, None); pairs.len()];
            let call = async {
                while let Some(joined) = tasks.join_next().await {
                    let (i, r) =
                        joined.map_err(|e| ::redis::RedisError::from((::redis::ErrorKind::Io, "read held task", e.to_string())))?;
                    if let Some(slot) = out.get_mut(i) {
                        *slot = r?;
                    }
                }
                Ok::<_, ::redis::RedisError>(())
            };
            redis.call("read held", call).await?;
            out
        }
    };
    Ok(replies.into_iter().map(|(t, v)| t.map(|total| Held { total, version: v.unwrap_or(0) })).collect())
}

// Listing a customer's reservations (issue 22): two sorted sets in the
// customer's slot, `P{C}:rl:created` (by created ms, for newest first) and
// `P{C}:rl:end` (by when the record expires: `+inf` while an allocation is
// held). Every reserve and finish tracks its reservation; each tracking drops
// up to [`TRACK_PRUNE`] members whose records expired and sets both keys to
// expire with the last record, so neither set outlives what it indexes. A
// listing drops the members it meets whose record is gone.

/// Members past their end dropped per tracking call.
const TRACK_PRUNE: usize = 64;
/// The end scores lag the records' expiry by this much (instances' clocks).
const TRACK_GRACE_MS: i64 = 60_000;
/// Reservations a listing looks at, at most (newest first), and per round trip.
pub const LIST_SCAN_MAX: usize = 10_000;
const LIST_PAGE: usize = 500;

/// KEYS: by-created, by-end. ARGV: id, created ms, end ms (or `+inf`), now ms,
/// prune batch. Replies how many expired members were dropped.
const TRACK_BODY: &str = r"
local rs, re = KEYS[1], KEYS[2]
redis.call('ZADD', rs, 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', re, ARGV[3], ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', re, '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[5]))
if #gone > 0 then
  redis.call('ZREM', rs, unpack(gone))
  redis.call('ZREM', re, unpack(gone))
end
local last = redis.call('ZRANGE', re, -1, -1, 'WITHSCORES')
if #last == 0 then return #gone end
local at = tonumber(last[2])
if last[2] == 'inf' or last[2] == '+inf' or at == nil or at == math.huge then
  redis.call('PERSIST', rs)
  redis.call('PERSIST', re)
else
  redis.call('PEXPIREAT', rs, math.floor(at))
  redis.call('PEXPIREAT', re, math.floor(at))
end
return #gone
";

/// KEYS: by-created, by-end. ARGV: the reservation key prefix (`P{C}:r:`),
/// first and last rank (newest first). The records read are in the same slot
/// (the customer's hash tag), so this runs on a cluster too. A member whose
/// record is gone (expired before its end, or a finish that crashed before
/// tracking) is dropped from both sets. Replies how many were dropped, then
/// per member left its id and its record (see `record`).
const PAGE_BODY: &str = r"
local ids = redis.call('ZREVRANGE', KEYS[1], ARGV[2], ARGV[3])
local out, gone = {0}, {}
for _, id in ipairs(ids) do
  local r = record(ARGV[1] .. id)
  if r[1] == 0 then
    gone[#gone + 1] = id
  else
    out[#out + 1] = id
    for i = 1, 8 do out[#out + 1] = r[i] end
  end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
out[1] = #gone
return out
";

static TRACK: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(TRACK_BODY));
static PAGE: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(&format!("{PRELUDE}{PAGE_BODY}")));

/// When `r`'s record expires (ms), `None` while it lives on (a held allocation).
fn record_end(r: &Reservation) -> Option<i64> {
    match (r.status, r.expires_at) {
        (Status::Held, None) => None,
        (Status::Held, Some(at)) => Some(at.saturating_add(FINISHED_RETENTION_MS)),
        _ => Some(r.finished_ms.max(r.created_ms).saturating_add(FINISHED_RETENTION_MS)),
    }
}

/// Puts `r` in its customer's listing sets (or moves its end), dropping
/// expired members.
pub async fn track(redis: &Redis, r: &Reservation) -> Result<(), SharedError> {
    let end = match record_end(r) {
        Some(at) => at.saturating_add(TRACK_GRACE_MS).to_string(),
        None => "+inf".to_string(),
    };
    let mut invocation = TRACK.prepare_invoke();
    invocation
        .key(redis.keys.reservations_by_created(&r.customer))
        .key(redis.keys.reservations_by_end(&r.customer))
        .arg(&r.id)
        .arg(r.created_ms)
        .arg(end)
        .arg(crate::clock::now_ms())
        .arg(TRACK_PRUNE);
    let mut conn = redis.conn();
    let _: i64 = redis.call("track reservation", invocation.invoke_async(&mut conn)).await?;
    Ok(())
}

/// `customer`'s reservations newest first (by created time), those `keep`
/// accepts, at most `limit`, looking at no more than [`LIST_SCAN_MAX`].
pub async fn list(
    redis: &Redis,
    customer: &str,
    keep: impl Fn(&Reservation) -> bool,
    limit: usize,
) -> Result<Vec<Reservation>, SharedError> {
    let mut out = Vec::new();
    let prefix = redis.keys.reservation(customer, "");
    let (mut start, mut scanned) = (0, 0);
    while scanned < LIST_SCAN_MAX && out.len() < limit {
        let mut invocation = PAGE.prepare_invoke();
        invocation
            .key(redis.keys.reservations_by_created(customer))
            .key(redis.keys.reservations_by_end(customer))
            .arg(&prefix)
            .arg(start)
            .arg(start + LIST_PAGE - 1);
        let mut conn = redis.conn();
        let reply: Vec<Value> = redis.call("list reservations", invocation.invoke_async(&mut conn)).await?;
        let (Some(dropped), Some(rest)) = (int(reply.first()).and_then(|n| usize::try_from(n).ok()), reply.get(1..)) else {
            return Err(unexpected("list", &reply));
        };
        if rest.len() % 9 != 0 {
            return Err(unexpected("list", &reply));
        }
        for chunk in rest.chunks(9) {
            let id = chunk.first().and_then(|v| ::redis::from_redis_value_ref::<String>(v).ok());
            let Some(r) = id.and_then(|id| reservation(&id, customer, chunk, 1)) else { return Err(unexpected("list", &reply)) };
            if keep(&r) && out.len() < limit {
                out.push(r);
            }
        }
        let live = rest.len() / 9;
        // The dropped members are gone: the next page starts after the live ones.
        scanned += live + dropped;
        if live + dropped < LIST_PAGE {
            break;
        }
        start += live;
    }
    Ok(out)
}
