//! `enforcement = "strict"` limits with Redis: the check and the consume happen
//! in one Lua script on the customer's window keys, so instances together never
//! pass the limit (a cached limit may overshoot by one sync interval's usage
//! elsewhere). Costs one round trip on the request path, by design.
//!
//! The script first raises this instance's part of each window to its local
//! usage (as the syncer would), so usage not yet synced counts too; then checks
//! every strict limit and, if all allow, adds the quantity to the total and to
//! this instance's part. The local fold that follows makes the local usage equal
//! that part, so the next sync adds nothing (see `sync::counters`).

use super::{answer, decide, CheckAnswer, CheckError, Consume, LimitState, LimitStates, LimitsPorts, Reason, Verdict};
use crate::counters::{Counters, Usage};
use crate::engine::ConsumeGuard;
use crate::model::{Enforcement, Limit, LimitAmount, Meter};
use crate::redis_link::{Keys, Redis};
use crate::usage::Origin;
use crate::wal::RecordBuilder;
use std::sync::atomic::Ordering;

/// KEYS: the windows, then (with reservations shared, issue 19) the
/// customer's held total of the meter, which every limit must leave room for.
/// ARGV: field, quantity, then per window (limit or -1, local usage, expire-at
/// or 0). Returns {1, total-before..., held, held version} when allowed (and
/// applied), or {0, index, total, held, held version} for the first limit that
/// refuses.
const STRICT_SCRIPT: &str = r"
local field = ARGV[1]
local q = tonumber(ARGV[2])
local n = (#ARGV - 2) / 3
local h, hv = 0, 0
if KEYS[n + 1] then
  local hh = redis.call('HMGET', KEYS[n + 1], 't', 'v')
  h, hv = tonumber(hh[1] or '0'), tonumber(hh[2] or '0')
end
local before = {}
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[3 * i])
  local v = tonumber(ARGV[3 * i + 1])
  local old = tonumber(redis.call('HGET', key, field) or '0')
  local t = tonumber(redis.call('HGET', key, 't') or '0')
  if v > old then t = t + (v - old) end
  before[i] = t
  if limit >= 0 and t + h + q > limit then return {0, i, t, h, hv} end
end
local out = {1}
for i = 1, n do
  local key = KEYS[i]
  local v = tonumber(ARGV[3 * i + 1])
  local exp = tonumber(ARGV[3 * i + 2])
  local old = tonumber(redis.call('HGET', key, field) or '0')
  if v > old then
    redis.call('HINCRBY', key, 't', v - old)
    old = v
  end
  redis.call('HSET', key, field, old + q)
  redis.call('HINCRBY', key, 't', q)
  if exp > 0 then redis.call('PEXPIREAT', key, exp) end
  out[i + 1] = before[i]
end
out[n + 2] = h
out[n + 3] = hv
return out
";

/// Gives back a consume whose WAL write failed after the script applied it.
const GIVE_BACK_SCRIPT: &str = r"
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, ARGV[1], -tonumber(ARGV[2]))
  redis.call('HINCRBY', key, 't', -tonumber(ARGV[2]))
end
return 1
";

static STRICT: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(STRICT_SCRIPT));
static GIVE_BACK: std::sync::LazyLock<::redis::Script> = std::sync::LazyLock::new(|| ::redis::Script::new(GIVE_BACK_SCRIPT));

/// Decided by the script here: `strict` limits, and `leased` ones on a meter
/// that also has a strict limit (one round trip decides both).
/// (A credits limit is never a window of the script: its balance is taken by
/// `grants::redis_consume`.)
fn is_strict(limit: &Limit) -> bool {
    limit.enforcement != Enforcement::Cached && !limit.amount.is_credits()
}

/// A hard `strict` window limit (not a credits balance, whose `strict` only
/// says how the balance is taken).
pub(super) fn is_strict_window(limit: &Limit) -> bool {
    limit.enforcement == Enforcement::Strict && limit.hard && !limit.amount.is_credits()
}

/// Whether a consume of `meter` on these limits goes through Redis here. Also
/// a `leased` limit beside a hard credits balance: the leased path has no
/// credit take, so both are decided in Redis on this path (the leased limit as
/// a strict one), and racing instances overdraw neither.
pub fn applies(ports: &LimitsPorts<'_>, meter: &Meter, limits: &[Limit]) -> bool {
    ports.redis.is_some()
        && !meter.aggregation.is_gauge()
        && meter.aggregation != crate::model::Aggregation::Max
        && (limits.iter().any(is_strict_window)
            || (limits.iter().any(super::leased::is_leased) && crate::grants::redis_consume::applies(limits)))
}

impl LimitsPorts<'_> {
    /// A consume with at least one strict limit. `guard` is the `(customer,
    /// meter)` consume lock, held from the local decision of the cached limits
    /// to the fold of the answer (so two consumes here cannot both pass a cached
    /// limit); the caller has claimed the id locally.
    pub(super) async fn consume_strict(&self, guard: &ConsumeGuard<'_>, redis: &Redis, c: &Consume<'_>) -> Result<CheckAnswer, CheckError> {
        let Consume { name, customer, meter, ent, limits, quantity, id_hash, now } = *c;
        debug_assert!(guard.covers(customer, meter.id), "the consume lock of another (customer, meter)");
        let mut states = self.reads.limit_states(Some(customer), meter, ent, limits, now);
        // Cached limits decide locally first: no round trip when they refuse.
        let cached: LimitStates = states.iter().copied().filter(|s| !is_strict(&s.limit)).collect();
        if !cached.is_empty() && !decide(&cached, quantity).allowed {
            return Ok(self.refuse(name, meter, quantity, &states, id_hash));
        }
        let strict: Vec<usize> = (0..states.len()).filter(|&i| is_strict(&states[i].limit)).collect();
        let keys: Vec<crate::counters::CounterKey> =
            strict.iter().map(|&i| Counters::key(customer, meter.id, states[i].limit.window, now, ent.billing_anchor)).collect();
        let mut invocation = STRICT.prepare_invoke();
        invocation.arg(Keys::instance_field(self.instance_id)).arg(quantity);
        for (&i, key) in strict.iter().zip(&keys) {
            let limit = match states[i].limit.amount {
                // Reservations (issue 19): the script leaves room for what is held.
                LimitAmount::Finite(l) => l,
                LimitAmount::Unlimited | LimitAmount::Credits { .. } => -1,
            };
            let own = self.reads.counters.windows.get(key, |c| c.value.load(Ordering::Acquire)).unwrap_or(0);
            // Beyond 2^53 the script could not count exactly: a limit of 0 refuses.
            let (limit, own) = if crate::redis_link::exact(limit, "limit").and(crate::redis_link::exact(own, "usage")).is_ok() {
                (limit, own)
            } else {
                tracing::error!(customer = %name, "a strict limit or usage beyond 2^53 raw units cannot be decided exactly in redis");
                (0, own.min(crate::redis_link::MAX_EXACT))
            };
            let expire = crate::redis_link::keys::expire_at(key);
            invocation.key(redis.keys.window(name, &meter.name, key.kind, key.start_ms)).arg(limit).arg(own).arg(expire);
        }
        // Reservations (issue 19): held over all instances, read in the script.
        invocation.key(redis.keys.held(name, &meter.name));
        let mut conn = redis.conn();
        let answer_: Result<Vec<i64>, _> = redis.call("strict consume", invocation.invoke_async(&mut conn)).await;
        let reply = match answer_ {
            Ok(r) => r,
            Err(e) if self.strict_open_when_down => {
                tracing::debug!(error = %e, "strict limit decided locally: redis is unreachable (strict_when_unavailable = allow)");
                return self.consume_local(c, Some(guard)).await;
            }
            Err(_) => {
                let verdict = Verdict { allowed: false, reason: Reason::Unavailable, primary: strict.first().copied().unwrap_or(0) };
                self.deduper.remove(id_hash);
                crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
                return Ok(answer(name, meter, quantity, &states, verdict));
            }
        };
        let held_of = |at: usize| crate::holds::shared::Held { total: reply[at], version: reply[at + 1] };
        match reply.first() {
            Some(1) if reply.len() == strict.len() + 3 => {
                for (n, &i) in strict.iter().enumerate() {
                    states[i].used = reply[n + 1];
                }
                self.note_held(customer, meter, &mut states, held_of(strict.len() + 1));
            }
            Some(0) if reply.len() == 5 => {
                let (index, total) = (usize::try_from(reply[1] - 1).unwrap_or(0), reply[2]);
                self.note_held(customer, meter, &mut states, held_of(3));
                if let Some(&i) = strict.get(index) {
                    states[i].used = total;
                }
                return Ok(self.refuse(name, meter, quantity, &states, id_hash));
            }
            _ => return Err(CheckError::Unavailable(format!("redis strict script answered {reply:?}"))),
        }
        let verdict = decide(&states, quantity);
        // Prepaid credits (issue 18): a hard credits limit is taken in Redis too;
        // refused, the strict windows are given back.
        let taken = if crate::grants::redis_consume::applies(limits) {
            let mut credits_verdict = verdict;
            let taken = self.take_credits(redis, c, &mut states, &mut credits_verdict).await;
            if !credits_verdict.allowed {
                let mut give_back = GIVE_BACK.prepare_invoke();
                give_back.arg(Keys::instance_field(self.instance_id)).arg(quantity);
                for key in &keys {
                    give_back.key(redis.keys.window(name, &meter.name, key.kind, key.start_ms));
                }
                if let Err(e) = redis.call("strict give back", give_back.invoke_async::<i64>(&mut conn)).await {
                    tracing::warn!(error = %e, customer = %name, "a strict consume could not be given back after credits refused it");
                }
                self.deduper.remove(id_hash);
                crate::telemetry::decision(credits_verdict.reason.as_str(), true, meter.id.into(), &meter.name);
                return Ok(answer(name, meter, quantity, &states, credits_verdict));
            }
            taken
        } else {
            None
        };
        let mut b = RecordBuilder::new(now, 1);
        b.push::<&str, &str>(id_hash, customer, name, meter.id, &meter.name, quantity, now, &[]);
        let seq = match self.wal.append(b).await {
            Ok(seq) => seq,
            Err(e) => {
                let mut give_back = GIVE_BACK.prepare_invoke();
                give_back.arg(Keys::instance_field(self.instance_id)).arg(quantity);
                for key in &keys {
                    give_back.key(redis.keys.window(name, &meter.name, key.kind, key.start_ms));
                }
                if let Err(e) = redis.call("strict give back", give_back.invoke_async::<i64>(&mut conn)).await {
                    tracing::warn!(error = %e, customer = %name, "a strict consume could not be given back in redis after the WAL refused it");
                }
                if let Some(t) = &taken {
                    crate::grants::redis_consume::give_back(self.reads.credits, redis, t).await;
                }
                self.deduper.remove(id_hash);
                return Err(CheckError::Unavailable(format!("could not write the WAL: {e}")));
            }
        };
        let usage = Usage { customer, meter, raw: quantity, ts: now, properties: &[], props_hash: 0, anchor: ent.billing_anchor };
        self.usage.fold(&usage, None, Origin::Live, || self.wal.tracker.folded(seq));
        for (n, (&i, key)) in strict.iter().zip(&keys).enumerate() {
            let total_before = reply[n + 1];
            // What Redis answered of the other instances' usage.
            let at = crate::engine::now_ms();
            self.usage.update_shared(key, Origin::Sync, |c| {
                let own = c.value.load(Ordering::Acquire);
                c.synced_ms.store(at, Ordering::Release);
                c.pushed.fetch_max(own, Ordering::AcqRel);
                c.others.store(total_before.saturating_add(quantity).saturating_sub(own).max(0), Ordering::Release);
            });
            states[i].used = states[i].used.saturating_add(quantity);
        }
        for (i, s) in states.iter_mut().enumerate() {
            if !strict.contains(&i) {
                s.used = s.used.saturating_add(quantity);
            }
        }
        if let Some(t) = &taken {
            // Prepaid credits (issue 18): the others' usage Redis answered.
            crate::grants::redis_consume::settle(self.reads.credits, t, now);
            for s in states.iter_mut().filter(|s| s.limit.amount.is_credits()) {
                let low = crate::credits::CreditBook::low_balance_of(std::slice::from_ref(&s.limit));
                *s = self.reads.credit_state(Some(customer), meter, s.limit, low, now);
            }
        }
        crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
        Ok(answer(name, meter, quantity, &states, verdict))
    }

    /// Reservations (issue 19): a held total Redis answered, for the book and
    /// the answer.
    pub(super) fn note_held(
        &self,
        customer: crate::counters::CustomerId,
        meter: &Meter,
        states: &mut [LimitState],
        held: crate::holds::shared::Held,
    ) {
        self.reads.holds.set_shared(customer, meter.id, held);
        let now = self.reads.holds.held(customer, meter.id);
        for s in states {
            s.held = now;
        }
    }

    /// A refused consume: nothing recorded, the id released.
    pub(super) fn refuse(&self, name: &str, meter: &Meter, quantity: i64, states: &[LimitState], id_hash: u128) -> CheckAnswer {
        let verdict = decide(states, quantity);
        self.deduper.remove(id_hash);
        crate::telemetry::decision(verdict.reason.as_str(), true, meter.id.into(), &meter.name);
        answer(name, meter, quantity, states, verdict)
    }
}
