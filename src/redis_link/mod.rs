//! The connection to Redis (one server or a Redis Cluster) and the key layout
//! every instance shares. Background tasks (the counter syncer, the entitlement
//! listener) and the few request-path calls (strict limits, cross-instance
//! dedupe, an entitlement miss, reservations) go through one [`Redis`] handle, which also keeps
//! the "is Redis reachable" state that `/readyz` and a gauge report.
//!
//! **Key layout** (documented in docs/operations.md so an application may write
//! entitlements directly). `P` is `redis.key_prefix`; `{C}` is the customer id
//! as a hash tag, so all of one customer's keys live in one cluster slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{C}:ent` | hash | `doc`: the entitlements JSON (as `PUT .../entitlements` takes it) |
//! | `P{index}:customers` | set | every customer with an `ent` hash |
//! | `P{C}:w:<meter>:<window>:<start_ms>` | hash | `t`: the window total over all instances; `i:<instance>`: each instance's part; `c:<instance>`, `x:<instance>`: a `leased` slice's cap and expiry (see `lease`) |
//! | `P{C}:r:<id>` | hash | one reservation (issue 19): `m` meter, `q` quantity, `e` expires-at ms (0: an allocation), `s` status, `sq` settled quantity, `c` created ms, `f` finished ms, `i` the instance that took it; expires a day after it finished (or after its expiry) |
//! | `Pres:<id>` | string | the customer reservation `id` belongs to (expires with the reservation) |
//! | `P{C}:held:<meter>` | hash | `t`: what the customer's reservations hold of the meter over all instances; `v`: its version (Redis time µs, rising) |
//! | `P{index}:hold_expiry` | sorted set | `[customer, meter, id]` (JSON) by `expires_at`: the expiry task's index (a hint: the reservation's own hash decides) |
//! | `P{C}:rl:created`, `P{C}:rl:end` | sorted sets | the customer's reservation ids by created ms (listing) and by when their records expire (`+inf`: a held allocation; members past it are dropped, the keys expire with the last record) |
//! | `Palive` | string | set by every sync round if missing: its absence tells the syncers Redis lost its data |
//! | `Pid:<hex>` | string | an event id seen by some instance (expires after `dedupe_window`) |
//! | channel `Pentitlements` | pub/sub | a customer id whose entitlements changed |

pub mod credit_lease;
pub mod keys;
pub mod lease;
pub mod slices_lua;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use keys::Keys;

/// A customer's held total of a meter (reservations, issue 19) as a Redis
/// script read it: the reserve script's answers and, beside the credit usage
/// read in the same script, the credit scripts' (`credit_lease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// Raw units held over all instances.
    pub total: i64,
    /// Its version: a later answer has a higher one.
    pub version: i64,
}

/// The largest count Redis scripts keep exact: Lua numbers are doubles, exact
/// to 2^53. Limits above it are refused at config validation (with Redis);
/// totals above it are not pushed (the syncer logs an error) and strict or
/// leased consumes above it answer as if Redis were unavailable (issue 16).
pub use crate::model::plan::REDIS_EXACT_MAX as MAX_EXACT;

/// `v` if Redis scripts can count it exactly.
pub fn exact(v: i64, what: &str) -> Result<i64, RedisError> {
    if (-MAX_EXACT..=MAX_EXACT).contains(&v) {
        Ok(v)
    } else {
        Err(RedisError::Unexpected(format!("{what} {v} is beyond 2^53 raw units, the range Redis scripts count exactly")))
    }
}

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Call(#[from] ::redis::RedisError),
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
    #[error("redis answered something unexpected: {0}")]
    Unexpected(String),
}

/// One server (a multiplexed, self-reconnecting connection) or a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The shared Redis handle.
#[derive(Clone)]
pub struct Redis {
    conn: Conn,
    /// A plain client to one node, for pub/sub (a cluster forwards PUBLISH to
    /// every node, so any node's subscribers hear it).
    pubsub_client: ::redis::Client,
    pub keys: Keys,
    pub timeout: Duration,
    up: Arc<AtomicBool>,
    /// The quota slices this instance holds for `leased` limits (shared by clones).
    pub leases: Arc<lease::LeaseBook>,
    /// The slices of hard credit balances this instance holds (shared by clones).
    pub credit_slices: Arc<credit_lease::CreditSlices>,
}

impl Redis {
    /// Connects to `urls`: one url is a single server, several are a cluster's
    /// seed nodes. Fails when no node answers.
    pub async fn connect(urls: &[String], key_prefix: &str, timeout: Duration) -> Result<Redis, RedisError> {
        let first = urls.first().ok_or_else(|| RedisError::Unexpected("no redis url configured".into()))?;
        let pubsub_client = ::redis::Client::open(first.as_str())?;
        let connect = async {
            if urls.len() == 1 {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let manager = pubsub_client.get_connection_manager_with_config(config).await?;
                Ok::<_, RedisError>(Conn::Single(manager))
            } else {
                let client = ::redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        };
        let conn = tokio::time::timeout(timeout.saturating_mul(3), connect).await.map_err(|_| RedisError::Timeout(timeout * 3))??;
        let redis = Redis {
            conn,
            pubsub_client,
            keys: Keys::new(key_prefix),
            timeout,
            up: Arc::new(AtomicBool::new(true)),
            leases: Arc::default(),
            credit_slices: Arc::default(),
        };
        crate::telemetry::redis_up(true);
        Ok(redis)
    }

    /// A connection to send commands on (cheap: clones share the multiplexer).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A client for a pub/sub connection.
    pub fn pubsub_client(&self) -> &::redis::Client {
        &self.pubsub_client
    }

    /// Whether the last call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Records a call's outcome: logs and sets the gauge when reachability changes.
    pub fn observe<T>(&self, what: &'static str, result: &Result<T, RedisError>) {
        let ok = result.is_ok();
        if self.up.swap(ok, Ordering::AcqRel) != ok {
            crate::telemetry::redis_up(ok);
            match result {
                Ok(_) => tracing::info!(call = what, "redis is reachable again"),
                Err(e) => tracing::warn!(call = what, error = %e, "redis is unreachable; answering from local state"),
            }
        }
    }

    /// Runs `f` under the call timeout and records the outcome.
    pub async fn call<T, F>(&self, what: &'static str, f: F) -> Result<T, RedisError>
    where
        F: std::future::Future<Output = Result<T, ::redis::RedisError>>,
    {
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        };
        self.observe(what, &result);
        result
    }
}
