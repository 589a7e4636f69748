//! Hard credits limits across instances (Redis): a consume is also taken in
//! one Lua script on the customer's credit key (`P{C}:credits:{meter}`, one
//! field per instance holding its own credit usage, and `t`, the sum), so
//! racing instances never overdraw a balance, whatever their enforcement.
//!
//! The instance sends its view: the balance from its book, its own usage and
//! the other instances' usage its book has charged. The script first raises
//! this instance's field to its own usage (usage not yet pushed counts), then
//! allows when `balance − (t − own − others) ≥ quantity`, i.e. the balance less
//! the usage elsewhere this instance has not seen yet; the answer's `t` lets
//! the book charge that usage. [`sync`] pushes and learns the same way for
//! every ledger, every `sync_interval`, so balances read anywhere converge.
//! Usage learned from other instances is charged at the time it is learned.
//! Reservations on a hard credits balance are decided on the same key by the
//! reserve script (`holds::shared`), with the same `base`.
//!
//! Every answer also carries the customer's held total of the meter as it
//! stood in the same script, which the hold book takes *before* the book
//! learns `t`. A settle (on any instance) moves its units from the held total
//! into `t` in one script: a `t` learned without the held total of the same
//! instant would count a settled hold twice here, as held and as used, and a
//! local decision would deny what the balance covers.
//!
//! This per-consume take is `enforcement = "strict"` on a credits limit, the
//! way a credits limit beside a strict or leased window is taken, and the
//! fallback while Redis recovers from a restart; by default a hard balance is
//! leased (`grants::slices`, `redis_link::credit_lease`). The take counts the
//! slices instances hold as spent, and refuses while grants are changing (a
//! void in progress, or grants newer than this instance's book).

use crate::counters::CustomerId;
use crate::credits::CreditBook;
use crate::holds::shared::Held;
use crate::holds::HoldBook;
use crate::model::{Limit, LimitAmount, Meter, MeterId};
use crate::redis_link::{Keys, Redis};

/// KEYS: the credit key, then the customer's held total of the meter
/// (reservations, issue 19), which a take leaves untouched. ARGV: field, own
/// usage, base (= balance + own + others), quantity (0: sync only), the grants
/// version the credit book has loaded. Returns {1, t before, held, held
/// version} when taken (or a sync), {0, t, held, held version} when refused,
/// {2, t, held, held version} while grants are changing (see
/// `redis_link::credit_lease`: a void in progress, or newer grants).
const SCRIPT: &str = r"
local field = ARGV[1]
local own = tonumber(ARGV[2])
local base = tonumber(ARGV[3])
local q = tonumber(ARGV[4])
local seen = tonumber(ARGV[5] or '0')
local me = string.sub(field, 3)
-- Reservations (issue 19): what is held over all instances, and its version,
-- read with `t` (answered with it; see the module doc).
local h, hv = 0, 0
if KEYS[2] then
  local hh = redis.call('HMGET', KEYS[2], 't', 'v')
  h, hv = tonumber(hh[1] or '0'), tonumber(hh[2] or '0')
end
local old = tonumber(redis.call('HGET', KEYS[1], field) or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
if own > old then
  redis.call('HSET', KEYS[1], field, own)
  redis.call('HINCRBY', KEYS[1], 't', own - old)
  t = t + (own - old)
  old = own
end
local now = redis_now_ms()
if q == 0 then
  -- A sync push: this instance's usage is all in its part now, so its own
  -- slice that expired (a restart after a crash) holds nothing any more.
  local x = tonumber(redis.call('HGET', KEYS[1], 'x:' .. me) or '0')
  if x > 0 and x <= now then redis.call('HDEL', KEYS[1], 'c:' .. me, 'x:' .. me, 'u:' .. me) end
  return {1, t, h, hv}
end
-- Slices of the balance (redis_link::credit_lease) are spoken for; a void
-- in progress, or grants newer than this instance's, stop the take.
local s = read_slices(KEYS[1])
if s.vf > now or s.gv > seen then return {2, t, h, hv} end
local sl = slices_left(s, now)
-- Reservations (issue 19): what is held over all instances is not spendable.
if base - t - h - sl < q then return {0, t, h, hv} end
redis.call('HSET', KEYS[1], field, old + q)
redis.call('HINCRBY', KEYS[1], 't', q)
return {1, t, h, hv}
";

/// Undoes a taken quantity whose WAL write failed.
const GIVE_BACK: &str = r"
redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 't', -tonumber(ARGV[2]))
return 1
";

static TAKE: std::sync::LazyLock<::redis::Script> =
    std::sync::LazyLock::new(|| ::redis::Script::new(&format!("{}{SCRIPT}", crate::redis_link::slices_lua::SLICES_LUA)));
static UNTAKE: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(GIVE_BACK));

/// A quantity taken in Redis, not yet folded locally.
#[derive(Debug, Clone)]
pub struct Taken {
    key: String,
    field: String,
    customer: CustomerId,
    meter: MeterId,
    quantity: i64,
    /// Every instance's usage before this take.
    total_before: i64,
}

/// What the script said.
#[derive(Debug, Clone)]
pub enum Outcome {
    Taken(Taken),
    /// Refused: the balance the script saw (other instances' usage included).
    Refused {
        balance: i64,
    },
    /// Redis could not answer.
    Down(String),
}

/// Whether a consume on these limits takes credits in Redis.
pub fn applies(limits: &[Limit]) -> bool {
    limits.iter().any(|l| l.hard && matches!(l.amount, LimitAmount::Credits { .. }))
}

/// Whether the hard credits limit among these is decided inside slices of
/// the balance (`grants::slices`): its enforcement is `leased` (the default;
/// `strict` takes every consume here).
pub fn leased(limits: &[Limit]) -> bool {
    limits.iter().any(|l| l.hard && matches!(l.amount, LimitAmount::Credits { .. }) && l.enforcement != crate::model::Enforcement::Strict)
}

/// What a credit script read in one go, learned in the one safe order: the
/// held total into the hold book first, then the usage `total` into the
/// credit book (see the module doc). Every answer that carries both goes
/// through here.
pub fn learn(book: &CreditBook, holds: &HoldBook, (customer, meter): (CustomerId, MeterId), total: i64, held: Held, now: i64) {
    holds.set_shared(customer, meter, held);
    book.learn_total(customer, meter, total, now);
}

/// The held total a script answered beside `t` (`[held, version]`) goes to
/// the hold book; call before the book learns that `t` (see the module doc),
/// where the `t` is learned later (a take, once folded: [`settle`]).
pub fn note_held(holds: &HoldBook, customer: CustomerId, meter: MeterId, held: &[i64]) {
    if let [total, version] = *held {
        holds.set_shared(customer, meter, Held { total, version });
    }
}

/// Takes `quantity` of the `(customer, meter)` balance in Redis (the customer
/// by name and id). Call under the
/// consume lock, after the local decision allowed.
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
    let (balance, own, others) = book.shared_view(customer, meter.id, now);
    let base = balance.saturating_add(own).saturating_add(others);
    let key = redis.keys.credits(name, &meter.name);
    let field = Keys::instance_field(instance_id);
    let mut invocation = TAKE.prepare_invoke();
    invocation.key(&key).key(redis.keys.held(name, &meter.name)).arg(&field).arg(own).arg(base).arg(quantity).arg(book.grants_seen());
    let mut conn = redis.conn();
    // Until it is folded here (or known not taken), the quantity is this
    // instance's own in whatever total a sync learns meanwhile.
    book.taking(customer, meter.id, quantity);
    let reply: Result<Vec<i64>, _> = redis.call("credits take", invocation.invoke_async(&mut conn)).await;
    if let Ok([_, _, held @ ..]) = reply.as_deref() {
        // Before any `t` of this answer is learned (here, or when the take is
        // folded: `settle`).
        note_held(holds, customer, meter.id, held);
    }
    match reply.as_deref() {
        Ok([1, t, _, _]) => Outcome::Taken(Taken { key, field, customer, meter: meter.id, quantity, total_before: *t }),
        Ok([0, t, _, _]) => {
            book.taking(customer, meter.id, -quantity);
            book.learn_total(customer, meter.id, *t, now);
            Outcome::Refused { balance: base.saturating_sub(*t) }
        }
        Ok([2, _, _, _]) => {
            book.taking(customer, meter.id, -quantity);
            Outcome::Down("grants are changing (a void in progress, or this instance has not loaded the newest grants)".into())
        }
        Ok(other) => {
            book.taking(customer, meter.id, -quantity);
            Outcome::Down(format!("redis credits script answered {other:?}"))
        }
        Err(e) => {
            book.taking(customer, meter.id, -quantity);
            Outcome::Down(e.to_string())
        }
    }
}

/// After the consume was folded locally: charge what Redis said of the others.
pub fn settle(book: &CreditBook, taken: &Taken, now: i64) {
    book.taking(taken.customer, taken.meter, -taken.quantity);
    book.learn_total(taken.customer, taken.meter, taken.total_before.saturating_add(taken.quantity), now);
}

/// The WAL refused the consume: give the quantity back in Redis.
pub async fn give_back(book: &CreditBook, redis: &Redis, taken: &Taken) {
    let mut invocation = UNTAKE.prepare_invoke();
    invocation.key(&taken.key).arg(&taken.field).arg(taken.quantity);
    let mut conn = redis.conn();
    let answer = redis.call("credits give back", invocation.invoke_async::<i64>(&mut conn)).await;
    // Given back or not, it will never be folded here: if it stays in Redis
    // the next sync charges it like the others' usage.
    book.taking(taken.customer, taken.meter, -taken.quantity);
    if let Err(e) = answer {
        tracing::warn!(error = %e, key = %taken.key, "a credits take could not be given back after the WAL refused it");
    }
}

/// How many credit keys one sync has in flight at once.
const SYNC_IN_FLIGHT: usize = 32;

/// Pushes this instance's usage of every ledger and charges the others'
/// (one script per ledger, `SYNC_IN_FLIGHT` at a time on the multiplexed
/// connection), taking the held total each answer carries into `holds` first.
/// Stops at the first failure; the next interval retries.
pub async fn sync(
    book: &CreditBook,
    holds: &HoldBook,
    redis: &Redis,
    instance_id: &str,
    names: impl Fn(CustomerId) -> Option<std::sync::Arc<str>>,
    meters: impl Fn(MeterId) -> Option<String>,
) {
    use futures_util::stream::{self, StreamExt};
    let field = Keys::instance_field(instance_id);
    let now = crate::clock::now_ms();
    let calls = book.ledger_keys().into_iter().filter_map(|(customer, meter)| {
        let (name, meter_name) = (names(customer)?, meters(meter)?);
        let (key, held_key) = (redis.keys.credits(&name, &meter_name), redis.keys.held(&name, &meter_name));
        let (_, own, _) = book.shared_view(customer, meter, now);
        Some((customer, meter, (key, held_key), own))
    });
    let field = &field;
    let mut answers = stream::iter(calls)
        .map(|(customer, meter, (key, held_key), own)| async move {
            let mut invocation = TAKE.prepare_invoke();
            invocation.key(key).key(held_key).arg(field).arg(own).arg(0).arg(0);
            let mut conn = redis.conn();
            (customer, meter, own, redis.call("credits sync", invocation.invoke_async::<Vec<i64>>(&mut conn)).await)
        })
        .buffer_unordered(SYNC_IN_FLIGHT);
    while let Some((customer, meter, own, answer)) = answers.next().await {
        match answer.as_deref() {
            Ok([1, t, h, v]) => {
                learn(book, holds, (customer, meter), *t, Held { total: *h, version: *v }, now);
                // Redis holds at least `own` of this instance's usage now.
                redis.credit_slices.reported((customer, meter), own);
            }
            Ok(other) => tracing::warn!(answer = ?other, "redis credits sync answered unexpectedly"),
            Err(e) => {
                tracing::warn!(error = %e, "redis credits sync failed; retrying next interval");
                return;
            }
        }
    }
}
