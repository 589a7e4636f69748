//! Entitlements in Redis, shared by every instance: one hash per customer
//! (`P{C}:ent`, field `doc` = the entitlements JSON), an index set of the
//! customers that have one (`P{index}:customers`), and a pub/sub message on
//! `Pentitlements` naming the customer after every change. An application may
//! write entitlements directly the same way: `HSET`, `SADD`, `PUBLISH`.

use super::{EntitlementStore, StoreError};
use crate::model::EntitlementsDoc;
use crate::redis_link::{Redis, RedisError};
use ::redis::AsyncCommands;
use async_trait::async_trait;

/// How many customers one task reads at a time when listing.
const LIST_CHUNK: usize = 256;

/// The entitlements hash field holding the JSON document.
pub const DOC_FIELD: &str = "doc";

/// Entitlements in Redis.
#[derive(Clone)]
pub struct RedisEntitlementStore {
    redis: Redis,
}

fn io(e: RedisError) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedisEntitlementStore {
    pub fn new(redis: Redis) -> RedisEntitlementStore {
        RedisEntitlementStore { redis }
    }

    /// The index set of customers with stored entitlements.
    fn index_key(&self) -> String {
        self.redis.keys.entitlements_index()
    }

    fn parse(customer: &str, text: &str) -> Result<EntitlementsDoc, StoreError> {
        serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("redis entitlements of {customer:?}: {e}")))
    }
}

#[async_trait]
impl EntitlementStore for RedisEntitlementStore {
    async fn get(&self, customer: &str) -> Result<Option<EntitlementsDoc>, StoreError> {
        let key = self.redis.keys.entitlements(customer);
        let mut conn = self.redis.conn();
        let text: Option<String> = self.redis.call("entitlements get", conn.hget(&key, DOC_FIELD)).await.map_err(io)?;
        text.map(|t| Self::parse(customer, &t)).transpose()
    }

    async fn put(&self, customer: &str, doc: &EntitlementsDoc) -> Result<(), StoreError> {
        let text = serde_json::to_string(doc).map_err(|e| StoreError::Io(format!("encoding entitlements: {e}")))?;
        let key = self.redis.keys.entitlements(customer);
        let index = self.index_key();
        let channel = self.redis.keys.entitlements_channel();
        let mut conn = self.redis.conn();
        // Separate commands: the hash and the index live in different cluster slots.
        self.redis.call("entitlements put", conn.hset::<_, _, _, ()>(&key, DOC_FIELD, &text)).await.map_err(io)?;
        self.redis.call("entitlements index", conn.sadd::<_, _, ()>(&index, customer)).await.map_err(io)?;
        self.redis.call("entitlements publish", conn.publish::<_, _, ()>(&channel, customer)).await.map_err(io)?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(String, EntitlementsDoc)>, StoreError> {
        let mut conn = self.redis.conn();
        let customers: Vec<String> = self.redis.call("entitlements list", conn.smembers(self.index_key())).await.map_err(io)?;
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in customers.chunks(LIST_CHUNK) {
            let chunk = chunk.to_vec();
            let store = self.clone();
            tasks.spawn(async move {
                let mut out = Vec::with_capacity(chunk.len());
                for customer in chunk {
                    if let Some(doc) = store.get(&customer).await? {
                        out.push((customer, doc));
                    }
                }
                Ok::<_, StoreError>(out)
            });
        }
        let mut all = Vec::with_capacity(customers.len());
        while let Some(joined) = tasks.join_next().await {
            let part = joined.map_err(|e| StoreError::Task(e.to_string()))??;
            all.extend(part);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    // Customers and portal tokens (issue 20): the hash, the index entry, then
    // the message every instance re-reads the customer on.
    async fn delete(&self, customer: &str) -> Result<(), StoreError> {
        let key = self.redis.keys.entitlements(customer);
        let index = self.index_key();
        let channel = self.redis.keys.entitlements_channel();
        let mut conn = self.redis.conn();
        self.redis.call("entitlements delete", conn.del::<_, ()>(&key)).await.map_err(io)?;
        self.redis.call("entitlements unindex", conn.srem::<_, _, ()>(&index, customer)).await.map_err(io)?;
        self.redis.call("entitlements publish", conn.publish::<_, _, ()>(&channel, customer)).await.map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite::{self, require, Fixture};
    use super::*;
    use std::time::Duration;

    /// A store on the Redis of `scripts/test`, under a key prefix of its own.
    struct Prefixed(RedisEntitlementStore);

    impl Fixture for Prefixed {
        type Store = RedisEntitlementStore;

        fn store(&self) -> &RedisEntitlementStore {
            &self.0
        }
    }

    async fn open(tag: &str) -> require::Need<Prefixed> {
        let url = require::redis_url()?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let prefix = format!("meterd-test:{}:{nanos}:{tag}:", std::process::id());
        match Redis::connect(std::slice::from_ref(&url), &prefix, Duration::from_secs(5)).await {
            Ok(redis) => Ok(Prefixed(RedisEntitlementStore::new(redis))),
            Err(e) => panic!("connect to {url}: {e}"),
        }
    }

    suite::store_suite!(open; entitlements);
}
