//! The naive Redis baseline: `INCRBY` of a monthly per-customer key for every
//! event (a batch as one pipeline) and a `GET` compared with the limit in the
//! client for every check; a consume is `GET` then `INCRBY` (racy across
//! clients, as the naive design is). One multiplexed connection per worker.

use crate::workload::{customer_name, OpKind, Workload};
use redis::aio::MultiplexedConnection;
use std::sync::Arc;

/// One request's keys.
#[derive(Debug, Clone)]
pub struct RedisShape {
    pub kind: OpKind,
    pub keys: Vec<String>,
}

/// `usage:{customer}:{meter}:{YYYYMM}` for the current UTC month.
pub fn shapes(workload: &Workload, meter: &str) -> Vec<RedisShape> {
    let month = chrono::Utc::now().format("%Y%m").to_string();
    workload
        .shapes
        .iter()
        .map(|s| RedisShape {
            kind: s.kind,
            keys: s.customers.iter().map(|&c| format!("usage:{}:{meter}:{month}", customer_name(c))).collect(),
        })
        .collect()
}

pub struct RedisClient {
    conn: MultiplexedConnection,
    limit: i64,
    shapes: Arc<Vec<RedisShape>>,
}

impl RedisClient {
    pub async fn connect(url: &str, limit: i64, shapes: Arc<Vec<RedisShape>>) -> redis::RedisResult<RedisClient> {
        let client = redis::Client::open(url)?;
        let conn = client.get_multiplexed_async_connection().await?;
        Ok(RedisClient { conn, limit, shapes })
    }

    /// Runs shape `index`; returns whether the check allowed.
    pub async fn run(&mut self, index: usize) -> redis::RedisResult<bool> {
        let shape = &self.shapes[index];
        match shape.kind {
            OpKind::Ingest if shape.keys.len() == 1 => {
                let _: i64 = redis::cmd("INCRBY").arg(&shape.keys[0]).arg(1).query_async(&mut self.conn).await?;
                Ok(true)
            }
            OpKind::Ingest => {
                let mut pipe = redis::pipe();
                for k in &shape.keys {
                    pipe.cmd("INCRBY").arg(k).arg(1).ignore();
                }
                let () = pipe.query_async(&mut self.conn).await?;
                Ok(true)
            }
            OpKind::Check | OpKind::Consume => {
                let key = &shape.keys[0];
                let used: Option<i64> = redis::cmd("GET").arg(key).query_async(&mut self.conn).await?;
                let allowed = used.unwrap_or(0).saturating_add(1) <= self.limit;
                if allowed && shape.kind == OpKind::Consume {
                    let _: i64 = redis::cmd("INCRBY").arg(key).arg(1).query_async(&mut self.conn).await?;
                }
                Ok(allowed)
            }
        }
    }
}
