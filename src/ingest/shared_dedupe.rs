//! Cross-instance dedupe: with Redis, an event id accepted by one instance is a
//! duplicate on every other for `ingest.dedupe_window`. Each id new to this
//! instance is claimed with `SET Pid:<hash> <instance> NX PX <window> GET`, one
//! pipelined round trip per batch (concurrent single calls on a cluster, where
//! the ids live in different slots). An id already claimed by *this* instance
//! counts as new: the local dedupe (its RAM table, restored from the WAL's id
//! files, and its disk runs) is the authority for our own ids, so a batch lost in a crash before its WAL record
//! was durable is accepted when the client retries it.
//!
//! Redis unreachable: the local decision stands (logged by the Redis handle,
//! counted in `meterd_redis_up`).

use crate::redis_link::{Conn, Redis, RedisError};

/// Claims `ids`; returns per id whether it is new across instances.
pub async fn claim(redis: &Redis, instance_id: &str, ids: &[u128], window_ms: i64) -> Result<Vec<bool>, RedisError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let cmd = |id: u128| {
        let mut c = ::redis::cmd("SET");
        c.arg(redis.keys.event_id(id)).arg(instance_id).arg("NX").arg("PX").arg(window_ms.max(1)).arg("GET");
        c
    };
    let previous: Vec<Option<String>> = match redis.conn() {
        Conn::Single(_) => {
            let mut pipe = ::redis::pipe();
            for &id in ids {
                pipe.add_command(cmd(id));
            }
            let mut conn = redis.conn();
            redis.call("dedupe claim", pipe.query_async(&mut conn)).await?
        }
        Conn::Cluster(_) => {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, &id) in ids.iter().enumerate() {
                let c = cmd(id);
                let mut conn = redis.conn();
                tasks.spawn(async move { (i, c.query_async::<Option<String>>(&mut conn).await) });
            }
            let mut out = vec![None; ids.len()];
            let call = async {
                while let Some(joined) = tasks.join_next().await {
                    let (i, r) = joined.map_err(|e| ::redis::RedisError::from((::redis::ErrorKind::Io, "dedupe task", e.to_string())))?;
                    if let Some(slot) = out.get_mut(i) {
                        *slot = r?;
                    }
                }
                Ok::<_, ::redis::RedisError>(())
            };
            redis.call("dedupe claim", call).await?;
            out
        }
    };
    Ok(previous.into_iter().map(|p| p.is_none_or(|owner| owner == instance_id)).collect())
}

/// Releases claims of a batch that was refused after claiming (best effort).
pub async fn release(redis: &Redis, ids: &[u128]) {
    for &id in ids {
        let mut conn = redis.conn();
        let mut c = ::redis::cmd("DEL");
        c.arg(redis.keys.event_id(id));
        if redis.call("dedupe release", c.query_async::<i64>(&mut conn)).await.is_err() {
            return;
        }
    }
}
