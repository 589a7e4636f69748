//! One reporter at a time: a lease with a fencing token.
//!
//! Several meterd instances may share one usage store; each would report the
//! same totals to Stripe. Identifiers make a double send harmless for Stripe, but
//! two reporters would still race on the ledger, so only the holder of this lease
//! reports. Every acquisition gets a *fencing token* that only grows; the ledger
//! refuses writes carrying a token older than one it already holds, so a holder
//! that stalled past its lease (a long GC-like pause, a partition) cannot write
//! over its successor.
//!
//! Two implementations: [`LocalLease`] (embedded mode: the only instance always
//! holds it, token 0 = unfenced) and [`RedisLease`] (`SET NX PX` and an `INCR`ed
//! token in one Lua script; renew and release only while still the holder).

use async_trait::async_trait;
use std::time::Duration;

/// Why a lease call failed (the lease state is then unknown: do not report).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("redis lease: {0}")]
    Redis(String),
    #[error("redis lease: no answer within {0:?}")]
    Timeout(Duration),
}

/// A lease on "being the reporter".
#[async_trait]
pub trait Lease: Send + Sync + 'static {
    /// Takes the lease if it is free (or already ours); `Some(fencing token)` while
    /// this instance holds it, `None` when another instance does.
    async fn acquire(&self) -> Result<Option<u64>, LeaseError>;
    /// Extends the lease held with `token`; `false` when it was lost.
    async fn renew(&self, token: u64) -> Result<bool, LeaseError>;
    /// Gives the lease up (on shutdown), if still held with `token`.
    async fn release(&self, token: u64) -> Result<(), LeaseError>;
    /// For logs and the status endpoint.
    fn kind(&self) -> &'static str;
}

/// Embedded mode: one instance, always the reporter. Token 0: the ledger does
/// not fence it.
#[derive(Debug, Default)]
pub struct LocalLease;

#[async_trait]
impl Lease for LocalLease {
    async fn acquire(&self) -> Result<Option<u64>, LeaseError> {
        Ok(Some(0))
    }
    async fn renew(&self, _token: u64) -> Result<bool, LeaseError> {
        Ok(true)
    }
    async fn release(&self, _token: u64) -> Result<(), LeaseError> {
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}

/// KEYS[1] lease, KEYS[2] fence counter; ARGV[1] holder, ARGV[2] ttl ms.
/// Returns the token (> 0) when held by ARGV[1] after the call, else 0.
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, token = string.match(cur, '^(.*):(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. t, 'PX', ARGV[2])
return t
";

/// KEYS[1] lease; ARGV[1] "holder:token", ARGV[2] ttl ms. 1 when renewed.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// KEYS[1] lease; ARGV[1] "holder:token". 1 when released.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// How long one Redis call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The lease in Redis, shared by every instance using the same key prefix.
pub struct RedisLease {
    conn: crate::redis_link::Conn,
    key: String,
    fence_key: String,
    /// This process: instance id plus a per-start nonce, so a restarted instance
    /// does not inherit its predecessor's lease.
    holder: String,
    ttl: Duration,
    acquire: redis::Script,
    renew: redis::Script,
    release: redis::Script,
}

impl std::fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLease").field("key", &self.key).field("holder", &self.holder).finish_non_exhaustive()
    }
}

fn redis_err(e: redis::RedisError) -> LeaseError {
    LeaseError::Redis(e.to_string())
}

impl RedisLease {
    /// A lease on one server at `url`; see [`RedisLease::on`]. Connects lazily.
    pub fn new(url: &str, prefix: &str, instance_id: &str, ttl: Duration) -> Result<RedisLease, LeaseError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let conn = client.get_connection_manager_lazy(redis::aio::ConnectionManagerConfig::new()).map_err(redis_err)?;
        Ok(RedisLease::on(crate::redis_link::Conn::Single(conn), prefix, instance_id, ttl))
    }

    /// A lease under `{prefix}{stripe}:lease` (token counter
    /// `{prefix}{stripe}:fence`: one hash tag, so one cluster slot), held for
    /// `ttl` after each acquire or renew, on meterd's Redis connection (one
    /// server or a cluster).
    pub fn on(conn: crate::redis_link::Conn, prefix: &str, instance_id: &str, ttl: Duration) -> RedisLease {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        RedisLease {
            conn,
            key: format!("{prefix}{{stripe}}:lease"),
            fence_key: format!("{prefix}{{stripe}}:fence"),
            holder: format!("{instance_id}-{:x}{:x}", nanos as u64, std::process::id()),
            ttl,
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    async fn call<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T, LeaseError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(CALL_TIMEOUT, inv.invoke_async(&mut conn)).await {
            Ok(r) => r.map_err(redis_err),
            Err(_) => Err(LeaseError::Timeout(CALL_TIMEOUT)),
        }
    }
}

#[async_trait]
impl Lease for RedisLease {
    async fn acquire(&self) -> Result<Option<u64>, LeaseError> {
        let mut inv = self.acquire.prepare_invoke();
        inv.key(&self.key).key(&self.fence_key).arg(&self.holder).arg(self.ttl_ms());
        let token: u64 = self.call(inv).await?;
        Ok((token > 0).then_some(token))
    }

    async fn renew(&self, token: u64) -> Result<bool, LeaseError> {
        let mut inv = self.renew.prepare_invoke();
        inv.key(&self.key).arg(format!("{}:{token}", self.holder)).arg(self.ttl_ms());
        let renewed: u64 = self.call(inv).await?;
        Ok(renewed == 1)
    }

    async fn release(&self, token: u64) -> Result<(), LeaseError> {
        let mut inv = self.release.prepare_invoke();
        inv.key(&self.key).arg(format!("{}:{token}", self.holder));
        let _: u64 = self.call(inv).await?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::require::{need, redis_url};

    fn prefix(tag: &str) -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        format!("meterd-test:{}:{nanos}:{tag}:", std::process::id())
    }

    fn lease(url: &str, prefix: &str, instance: &str, ttl_ms: u64) -> RedisLease {
        RedisLease::new(url, prefix, instance, Duration::from_millis(ttl_ms)).unwrap_or_else(|e| panic!("lease: {e}"))
    }

    #[tokio::test]
    async fn local_lease_always_holds_unfenced() {
        let l = LocalLease;
        assert_eq!(l.acquire().await.ok(), Some(Some(0)));
        assert_eq!(l.renew(0).await.ok(), Some(true));
        assert!(l.release(0).await.is_ok());
    }

    #[tokio::test]
    async fn two_leases_compete_and_only_one_holds() {
        let url = need!(redis_url());
        let p = prefix("compete");
        let a = lease(&url, &p, "a", 30_000);
        let b = lease(&url, &p, "b", 30_000);
        let ta = a.acquire().await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("a should get the free lease"));
        assert!(ta > 0, "a Redis token is never 0 (0 is the unfenced local token)");
        assert_eq!(b.acquire().await.ok(), Some(None), "b must not get a held lease");
        // The holder re-acquiring keeps its token; renewing works; b cannot renew a's token.
        assert_eq!(a.acquire().await.ok(), Some(Some(ta)));
        assert_eq!(a.renew(ta).await.ok(), Some(true));
        assert_eq!(b.renew(ta).await.ok(), Some(false), "renew is only for the holder");
        b.release(ta).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.acquire().await.ok(), Some(None), "a release by a non-holder changes nothing");
        // Released: b takes it with a greater token, and a's renew now fails.
        a.release(ta).await.unwrap_or_else(|e| panic!("{e}"));
        let tb = b.acquire().await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("b should get the released lease"));
        assert!(tb > ta, "fencing tokens grow: {tb} > {ta}");
        assert_eq!(a.renew(ta).await.ok(), Some(false), "the old holder lost it");
        assert_eq!(a.acquire().await.ok(), Some(None));
    }

    #[tokio::test]
    async fn expiry_hands_the_lease_over_with_a_greater_token() {
        let url = need!(redis_url());
        let p = prefix("expiry");
        let a = lease(&url, &p, "a", 200);
        let b = lease(&url, &p, "b", 200);
        let ta = a.acquire().await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("a should get the free lease"));
        assert_eq!(b.acquire().await.ok(), Some(None));
        // a stalls without renewing: once the lease expires, b takes over.
        let mut tb = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tb = b.acquire().await.unwrap_or_else(|e| panic!("{e}"));
            if tb.is_some() {
                break;
            }
        }
        let tb = tb.unwrap_or_else(|| panic!("b never got the expired lease"));
        assert!(tb > ta, "fencing tokens grow: {tb} > {ta}");
        assert_eq!(a.renew(ta).await.ok(), Some(false), "a stalled holder cannot renew a lease it lost");
        assert_eq!(a.acquire().await.ok(), Some(None));
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_lease() {
        let a = lease("redis://127.0.0.1:1/0", &prefix("down"), "a", 1_000);
        assert!(a.acquire().await.is_err());
    }
}
