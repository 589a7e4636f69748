//! Which Stripe webhook events were applied, durably and shared by every
//! instance: SQLite (`stripe_events.sqlite` in data_dir) when embedded, Redis
//! (`P{stripe}:evt:<id>`, `P{stripe}:sub:<id>`) with `[redis]`.
//!
//! An event is *claimed* before it is applied and *finished* after; a claim
//! that failed to apply is *released* so Stripe's retry applies it. A claim
//! left pending longer than [`PENDING_TTL_MS`] (the instance died mid-apply)
//! may be taken over. The claim also orders a subscription's events: one whose
//! `created` is older than the newest claimed for the same subscription is
//! recorded as done and changes nothing; and while one event of a subscription
//! is being applied, another of the same subscription is [`Claim::InFlight`]
//! (answered 503: Stripe retries), so two events of one subscription are never
//! applied at once, on any instance, and finish in `created` order. Event records are kept
//! [`KEEP_EVENTS_MS`] (Stripe resends an event for at most 3 days and keeps
//! events 30 days), subscription marks [`KEEP_SUBSCRIPTIONS_MS`] after their
//! last event.

use super::StoreError;
use crate::redis_link::{Redis, RedisError};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

/// How long an event id is remembered.
pub const KEEP_EVENTS_MS: i64 = 30 * 86_400_000;
/// How long a subscription's newest `created` is remembered after its last event.
pub const KEEP_SUBSCRIPTIONS_MS: i64 = 400 * 86_400_000;
/// A claim older than this that was never finished may be taken over.
pub const PENDING_TTL_MS: i64 = 60_000;

/// The answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This caller applies the event, then finishes (or releases) it.
    Apply,
    /// Already applied (or judged stale) before.
    Duplicate,
    /// Another caller is applying it, or another event of its subscription, right now.
    InFlight,
    /// Older than an event already claimed for the same subscription: recorded, not applied.
    Stale,
}

/// A subscription event's ordering key.
#[derive(Debug, Clone)]
pub struct Ordering {
    pub subscription: String,
    /// The event's `created`, Unix seconds.
    pub created: i64,
}

/// Where applied Stripe events are recorded.
#[async_trait]
pub trait StripeEventLedger: Send + Sync + 'static {
    async fn claim(&self, event_id: &str, order: Option<&Ordering>, now_ms: i64) -> Result<Claim, StoreError>;
    /// The claimed event was applied (`order`: as given to the claim).
    async fn finish(&self, event_id: &str, order: Option<&Ordering>, now_ms: i64) -> Result<(), StoreError>;
    /// The claimed event could not be applied: a retry claims it again.
    async fn release(&self, event_id: &str, order: Option<&Ordering>) -> Result<(), StoreError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stripe_events (
    event_id TEXT PRIMARY KEY NOT NULL,
    done INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stripe_events_at ON stripe_events (at_ms);
CREATE TABLE IF NOT EXISTS stripe_subscriptions (
    subscription TEXT PRIMARY KEY NOT NULL,
    created INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    pending_event TEXT,
    pending_at INTEGER
);
";

/// The embedded ledger: its own SQLite file (webhooks never wait on a flush).
#[derive(Clone)]
pub struct SqliteStripeEvents {
    conn: Arc<Mutex<Connection>>,
}

fn sql(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Io(format!("stripe events {op}: {e}"))
}

impl SqliteStripeEvents {
    pub fn open(path: &Path) -> Result<SqliteStripeEvents, StoreError> {
        let ctx = |e: rusqlite::Error| StoreError::Io(format!("sqlite open {}: {e}", path.display()));
        let conn = Connection::open(path).map_err(ctx)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(ctx)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(ctx)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(ctx)?;
        conn.execute_batch(SCHEMA).map_err(ctx)?;
        Ok(SqliteStripeEvents { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(PoisonError::into_inner)))
            .await
            .map_err(|e| StoreError::Task(format!("stripe events {op}: {e}")))?
    }
}

fn claim_blocking(conn: &mut Connection, event_id: &str, order: Option<&Ordering>, now: i64) -> Result<Claim, StoreError> {
    const OP: &str = "claim";
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql(OP))?;
    tx.execute("DELETE FROM stripe_events WHERE at_ms < ?1", [now - KEEP_EVENTS_MS]).map_err(sql(OP))?;
    tx.execute("DELETE FROM stripe_subscriptions WHERE at_ms < ?1", [now - KEEP_SUBSCRIPTIONS_MS]).map_err(sql(OP))?;
    let seen: Option<(bool, i64)> = tx
        .query_row("SELECT done, at_ms FROM stripe_events WHERE event_id = ?1", [event_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(sql(OP))?;
    match seen {
        Some((true, _)) => return Ok(Claim::Duplicate),
        Some((false, at)) if now - at < PENDING_TTL_MS => return Ok(Claim::InFlight),
        _ => {}
    }
    let mut claim = Claim::Apply;
    if let Some(order) = order {
        type Row = (i64, Option<String>, Option<i64>);
        let row: Option<Row> = tx
            .query_row(
                "SELECT created, pending_event, pending_at FROM stripe_subscriptions WHERE subscription = ?1",
                [&order.subscription],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql(OP))?;
        if let Some((_, Some(pending), Some(at))) = &row {
            if pending != event_id && now - at < PENDING_TTL_MS {
                return Ok(Claim::InFlight); // Another event of this subscription is being applied.
            }
        }
        if row.is_some_and(|(newest, _, _)| order.created < newest) {
            claim = Claim::Stale;
        } else {
            tx.execute(
                "INSERT INTO stripe_subscriptions (subscription, created, at_ms, pending_event, pending_at) VALUES (?1, ?2, ?3, ?4, ?3) \
                 ON CONFLICT (subscription) DO UPDATE SET created = excluded.created, at_ms = excluded.at_ms, \
                 pending_event = excluded.pending_event, pending_at = excluded.pending_at",
                (&order.subscription, order.created, now, event_id),
            )
            .map_err(sql(OP))?;
        }
    }
    tx.execute(
        "INSERT INTO stripe_events (event_id, done, at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (event_id) DO UPDATE SET done = excluded.done, at_ms = excluded.at_ms",
        (event_id, claim == Claim::Stale, now),
    )
    .map_err(sql(OP))?;
    tx.commit().map_err(sql(OP))?;
    Ok(claim)
}

/// The subscription no longer waits on `event_id`.
fn unmark_pending(tx: &rusqlite::Transaction<'_>, event_id: &str, order: Option<&Ordering>) -> Result<(), StoreError> {
    if let Some(order) = order {
        tx.execute(
            "UPDATE stripe_subscriptions SET pending_event = NULL, pending_at = NULL WHERE subscription = ?1 AND pending_event = ?2",
            (&order.subscription, event_id),
        )
        .map_err(sql("unmark"))?;
    }
    Ok(())
}

#[async_trait]
impl StripeEventLedger for SqliteStripeEvents {
    async fn claim(&self, event_id: &str, order: Option<&Ordering>, now_ms: i64) -> Result<Claim, StoreError> {
        let (event_id, order) = (event_id.to_string(), order.cloned());
        self.run("claim", move |conn| claim_blocking(conn, &event_id, order.as_ref(), now_ms)).await
    }

    async fn finish(&self, event_id: &str, order: Option<&Ordering>, now_ms: i64) -> Result<(), StoreError> {
        let (event_id, order) = (event_id.to_string(), order.cloned());
        self.run("finish", move |conn| {
            let tx = conn.transaction().map_err(sql("finish"))?;
            tx.execute("UPDATE stripe_events SET done = 1, at_ms = ?2 WHERE event_id = ?1", (&event_id, now_ms)).map_err(sql("finish"))?;
            unmark_pending(&tx, &event_id, order.as_ref())?;
            tx.commit().map_err(sql("finish"))
        })
        .await
    }

    async fn release(&self, event_id: &str, order: Option<&Ordering>) -> Result<(), StoreError> {
        let (event_id, order) = (event_id.to_string(), order.cloned());
        self.run("release", move |conn| {
            let tx = conn.transaction().map_err(sql("release"))?;
            tx.execute("DELETE FROM stripe_events WHERE event_id = ?1 AND done = 0", [&event_id]).map_err(sql("release"))?;
            unmark_pending(&tx, &event_id, order.as_ref())?;
            tx.commit().map_err(sql("release"))
        })
        .await
    }
}

/// The claim in one script: KEYS = event, subscription (or none); ARGV = now,
/// created (or ""), pending ttl, keep events, keep subscriptions, event id.
/// Returns 0 apply, 1 duplicate, 2 in flight, 3 stale. The event key holds
/// `done:<ms>` or `pending:<ms>`; the subscription hash `c` (newest created),
/// `p` and `pa` (the event being applied, since when).
const CLAIM_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local seen = redis.call('GET', KEYS[1])
if seen then
  local state, at = string.match(seen, '^(%a+):(%-?%d+)$')
  if state == 'done' then return 1 end
  if at and now - tonumber(at) < tonumber(ARGV[3]) then return 2 end
end
local result = 0
if KEYS[2] then
  local created = tonumber(ARGV[2])
  local sub = redis.call('HMGET', KEYS[2], 'c', 'p', 'pa')
  local newest, pending, pending_at = tonumber(sub[1] or ''), sub[2], tonumber(sub[3] or '')
  if pending and pending ~= ARGV[6] and pending_at and now - pending_at < tonumber(ARGV[3]) then return 2 end
  if newest and created < newest then
    result = 3
  else
    redis.call('HSET', KEYS[2], 'c', created, 'p', ARGV[6], 'pa', now)
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
  end
end
local state = 'pending'
if result == 3 then state = 'done' end
redis.call('SET', KEYS[1], state .. ':' .. now, 'PX', ARGV[4])
return result
";

/// Finish (ARGV[1] = `done:<ms>`) or release (ARGV[1] = "") an event and
/// clear its subscription's pending mark. KEYS = event, subscription (or
/// none); ARGV = value, keep events, event id.
const SETTLE_SCRIPT: &str = r"
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if KEYS[2] and redis.call('HGET', KEYS[2], 'p') == ARGV[3] then
  redis.call('HDEL', KEYS[2], 'p', 'pa')
end
return 0
";

/// The shared ledger in Redis.
#[derive(Clone)]
pub struct RedisStripeEvents {
    redis: Redis,
    claim: Arc<::redis::Script>,
    settle: Arc<::redis::Script>,
}

fn redis_io(e: RedisError) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedisStripeEvents {
    pub fn new(redis: Redis) -> RedisStripeEvents {
        RedisStripeEvents {
            redis,
            claim: Arc::new(::redis::Script::new(CLAIM_SCRIPT)),
            settle: Arc::new(::redis::Script::new(SETTLE_SCRIPT)),
        }
    }

    async fn settle(&self, event_id: &str, order: Option<&Ordering>, value: String) -> Result<(), StoreError> {
        let mut invocation = self.settle.prepare_invoke();
        invocation.key(self.redis.keys.stripe_event(event_id));
        if let Some(order) = order {
            invocation.key(self.redis.keys.stripe_subscription(&order.subscription));
        }
        invocation.arg(value).arg(KEEP_EVENTS_MS).arg(event_id);
        let mut conn = self.redis.conn();
        self.redis.call("stripe event settle", invocation.invoke_async::<i64>(&mut conn)).await.map(|_| ()).map_err(redis_io)
    }
}

#[async_trait]
impl StripeEventLedger for RedisStripeEvents {
    async fn claim(&self, event_id: &str, order: Option<&Ordering>, now_ms: i64) -> Result<Claim, StoreError> {
        let mut invocation = self.claim.prepare_invoke();
        invocation.key(self.redis.keys.stripe_event(event_id));
        if let Some(order) = order {
            invocation.key(self.redis.keys.stripe_subscription(&order.subscription));
        }
        invocation
            .arg(now_ms)
            .arg(order.map(|o| o.created.to_string()).unwrap_or_default())
            .arg(PENDING_TTL_MS)
            .arg(KEEP_EVENTS_MS)
            .arg(KEEP_SUBSCRIPTIONS_MS)
            .arg(event_id);
        let mut conn = self.redis.conn();
        let answer: i64 = self.redis.call("stripe event claim", invocation.invoke_async(&mut conn)).await.map_err(redis_io)?;
        match answer {
            0 => Ok(Claim::Apply),
            1 => Ok(Claim::Duplicate),
            2 => Ok(Claim::InFlight),
            3 => Ok(Claim::Stale),
            other => Err(StoreError::Corrupt(format!("stripe event claim answered {other}"))),
        }
    }

    async fn finish(&self, event_id: &str, order: Option<&Ordering>, now_ms: i64) -> Result<(), StoreError> {
        self.settle(event_id, order, format!("done:{now_ms}")).await
    }

    async fn release(&self, event_id: &str, order: Option<&Ordering>) -> Result<(), StoreError> {
        self.settle(event_id, order, String::new()).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite::require::{self, need};
    use super::*;

    fn order(sub: &str, created: i64) -> Ordering {
        Ordering { subscription: sub.to_string(), created }
    }

    async fn claim(l: &dyn StripeEventLedger, id: &str, o: Option<Ordering>, now: i64) -> Claim {
        l.claim(id, o.as_ref(), now).await.unwrap_or_else(|e| panic!("claim {id}: {e}"))
    }

    async fn finish(l: &dyn StripeEventLedger, id: &str, o: Ordering, now: i64) {
        l.finish(id, Some(&o), now).await.unwrap_or_else(|e| panic!("finish {id}: {e}"));
    }

    const T: i64 = 1_000_000_000_000;

    /// Once, in order, one event of a subscription at a time; releases and takeovers.
    async fn scenario(l: &dyn StripeEventLedger) {
        let t = T;
        assert_eq!(claim(l, "evt_2", Some(order("sub_1", 200)), t).await, Claim::Apply);
        assert_eq!(claim(l, "evt_2", Some(order("sub_1", 200)), t + 1).await, Claim::InFlight, "pending and fresh");
        assert_eq!(claim(l, "evt_4", Some(order("sub_1", 400)), t + 1).await, Claim::InFlight, "its subscription is busy");
        assert_eq!(claim(l, "evt_x", Some(order("sub_other", 1)), t + 1).await, Claim::Apply, "another subscription is not");
        finish(l, "evt_2", order("sub_1", 200), t + 2).await;
        assert_eq!(claim(l, "evt_2", Some(order("sub_1", 200)), t + 3).await, Claim::Duplicate);
        assert_eq!(claim(l, "evt_1", Some(order("sub_1", 100)), t + 4).await, Claim::Stale, "older than evt_2");
        assert_eq!(claim(l, "evt_1", Some(order("sub_1", 100)), t + 5).await, Claim::Duplicate, "a stale event is recorded");
        // A released claim (the apply failed) is claimed again, and frees its subscription.
        assert_eq!(claim(l, "evt_3", Some(order("sub_1", 300)), t + 7).await, Claim::Apply);
        l.release("evt_3", Some(&order("sub_1", 300))).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(claim(l, "evt_3", Some(order("sub_1", 300)), t + 8).await, Claim::Apply, "released, same created");
        // A claim abandoned by a dead instance is taken over after the TTL, and so is its subscription.
        let later = t + 8 + PENDING_TTL_MS;
        assert_eq!(claim(l, "evt_3", Some(order("sub_1", 300)), later).await, Claim::Apply);
        assert_eq!(claim(l, "evt_5", Some(order("sub_1", 500)), later + 1).await, Claim::InFlight);
        finish(l, "evt_3", order("sub_1", 300), later + 2).await;
        assert_eq!(claim(l, "evt_5", Some(order("sub_1", 500)), later + 3).await, Claim::Apply, "free once evt_3 finished");
        finish(l, "evt_5", order("sub_1", 500), later + 4).await;
        assert_eq!(claim(l, "evt_4", Some(order("sub_1", 400)), later + 5).await, Claim::Stale, "evt_5 came first");
        // Events without a subscription (checkout sessions).
        assert_eq!(claim(l, "evt_cs", None, later + 6).await, Claim::Apply);
        l.finish("evt_cs", None, later + 7).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(claim(l, "evt_cs", None, later + 8).await, Claim::Duplicate);
    }

    #[tokio::test]
    async fn sqlite_applies_once_in_order_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("stripe_events.sqlite");
        let l = SqliteStripeEvents::open(&path).unwrap_or_else(|e| panic!("{e}"));
        scenario(&l).await;
        drop(l);
        let l = SqliteStripeEvents::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let after = T + 100 + PENDING_TTL_MS;
        assert_eq!(claim(&l, "evt_3", None, after).await, Claim::Duplicate, "durable across reopening");
        assert_eq!(claim(&l, "evt_4b", Some(order("sub_1", 450)), after + 1).await, Claim::Stale);
        // Forgotten after the retention.
        assert_eq!(claim(&l, "evt_3", None, after + KEEP_EVENTS_MS).await, Claim::Apply);
    }

    #[tokio::test]
    async fn redis_applies_once_in_order() {
        let url = need!(require::redis_url());
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let prefix = format!("meterd-test:{}:{nanos}:stripe:", std::process::id());
        let redis = Redis::connect(std::slice::from_ref(&url), &prefix, std::time::Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        scenario(&RedisStripeEvents::new(redis)).await;
    }
}
