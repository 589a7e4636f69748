//! Prepaid credit grants in the entitlement stores (issue 18): the SQLite table
//! `grants (customer, id, doc)` and, in Redis, one hash per customer
//! (`P{C}:grants`, field = grant id, value = the JSON document), an index set of
//! the customers with grants and a version counter bumped on every change, so
//! other instances know to reload. A grant is inserted only if its id is new
//! for the customer (the insert and the check are one statement), which is what
//! makes a repeated `POST` idempotent across instances.

use super::StoreError;
use crate::model::grant::GrantDoc;
use crate::redis_link::Redis;
use ::redis::AsyncCommands;
use rusqlite::{Connection, OptionalExtension};

fn encode(doc: &GrantDoc) -> Result<String, StoreError> {
    serde_json::to_string(doc).map_err(|e| StoreError::Io(format!("encoding grant {:?}: {e}", doc.id)))
}

fn decode(customer: &str, text: &str) -> Result<GrantDoc, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("grant of {customer:?}: {e}")))
}

fn sql(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Io(format!("sqlite {op}: {e}"))
}

/// Inserts unless the id exists; the existing document otherwise.
pub fn sqlite_insert(conn: &mut Connection, customer: &str, doc: &GrantDoc) -> Result<Option<GrantDoc>, StoreError> {
    let text = encode(doc)?;
    let tx = conn.transaction().map_err(sql("insert grant"))?;
    let existing: Option<String> = tx
        .query_row("SELECT doc FROM grants WHERE customer = ?1 AND id = ?2", (customer, &doc.id), |r| r.get(0))
        .optional()
        .map_err(sql("insert grant"))?;
    if let Some(existing) = existing {
        return decode(customer, &existing).map(Some);
    }
    tx.execute("INSERT INTO grants (customer, id, doc) VALUES (?1, ?2, ?3)", (customer, &doc.id, &text)).map_err(sql("insert grant"))?;
    tx.commit().map_err(sql("insert grant"))?;
    Ok(None)
}

pub fn sqlite_update(conn: &mut Connection, customer: &str, doc: &GrantDoc) -> Result<(), StoreError> {
    let text = encode(doc)?;
    conn.execute("UPDATE grants SET doc = ?3 WHERE customer = ?1 AND id = ?2", (customer, &doc.id, &text)).map_err(sql("update grant"))?;
    Ok(())
}

pub fn sqlite_list(conn: &mut Connection) -> Result<Vec<(String, GrantDoc)>, StoreError> {
    let mut stmt = conn.prepare("SELECT customer, doc FROM grants ORDER BY customer, id").map_err(sql("list grants"))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(sql("list grants"))?;
    let mut out = Vec::new();
    for row in rows {
        let (customer, text) = row.map_err(sql("list grants"))?;
        let doc = decode(&customer, &text)?;
        out.push((customer, doc));
    }
    Ok(out)
}

fn io(e: crate::redis_link::RedisError) -> StoreError {
    StoreError::Io(e.to_string())
}

/// `HSETNX`: stored only if the id is new; then the index and the version.
pub async fn redis_insert(redis: &Redis, customer: &str, doc: &GrantDoc) -> Result<Option<GrantDoc>, StoreError> {
    let text = encode(doc)?;
    let key = redis.keys.grants(customer);
    let mut conn = redis.conn();
    let stored: bool = redis.call("grant insert", conn.hset_nx(&key, &doc.id, &text)).await.map_err(io)?;
    if !stored {
        let existing: Option<String> = redis.call("grant get", conn.hget(&key, &doc.id)).await.map_err(io)?;
        return match existing {
            Some(t) => decode(customer, &t).map(Some),
            None => Err(StoreError::Io(format!("grant {:?} of {customer:?} vanished while inserting", doc.id))),
        };
    }
    bump(redis, customer).await?;
    Ok(None)
}

pub async fn redis_update(redis: &Redis, customer: &str, doc: &GrantDoc) -> Result<(), StoreError> {
    let text = encode(doc)?;
    let mut conn = redis.conn();
    redis.call("grant update", conn.hset::<_, _, _, ()>(redis.keys.grants(customer), &doc.id, &text)).await.map_err(io)?;
    bump(redis, customer).await
}

/// Indexes the customer and moves the version (separate slots: separate commands).
async fn bump(redis: &Redis, customer: &str) -> Result<(), StoreError> {
    let mut conn = redis.conn();
    redis.call("grant index", conn.sadd::<_, _, ()>(redis.keys.grants_index(), customer)).await.map_err(io)?;
    redis.call("grant version", conn.incr::<_, _, ()>(redis.keys.grants_version(), 1)).await.map_err(io)?;
    Ok(())
}

pub async fn redis_list(redis: &Redis) -> Result<Vec<(String, GrantDoc)>, StoreError> {
    let mut conn = redis.conn();
    let customers: Vec<String> = redis.call("grant customers", conn.smembers(redis.keys.grants_index())).await.map_err(io)?;
    let mut out = Vec::new();
    for customer in customers {
        let all: Vec<(String, String)> = redis.call("grant list", conn.hgetall(redis.keys.grants(&customer))).await.map_err(io)?;
        for (_, text) in all {
            out.push((customer.clone(), decode(&customer, &text)?));
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1.id).cmp(&(&b.0, &b.1.id)));
    Ok(out)
}

pub async fn redis_version(redis: &Redis) -> Result<u64, StoreError> {
    let mut conn = redis.conn();
    let v: Option<u64> = redis.call("grant version", conn.get(redis.keys.grants_version())).await.map_err(io)?;
    Ok(v.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, amount: &str) -> GrantDoc {
        GrantDoc {
            id: id.into(),
            meter: "m".into(),
            amount: amount.into(),
            priority: 10,
            effective_at_ms: 0,
            expires_at_ms: None,
            reason: None,
            created_at_ms: 0,
            voided_at_ms: None,
            voided_raw: None,
            request: format!("{id}:{amount}"),
        }
    }

    #[test]
    fn sqlite_grants_survive_reopen_and_insert_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("s.sqlite");
        {
            let store = super::super::sqlite::SqliteStore::open(&path).unwrap_or_else(|e| panic!("open: {e}"));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(async {
                use super::super::EntitlementStore;
                assert_eq!(store.insert_grant("c", &doc("g1", "5")).await.ok(), Some(None));
                assert_eq!(store.insert_grant("c", &doc("g1", "9")).await.ok(), Some(Some(doc("g1", "5"))));
                let mut voided = doc("g1", "5");
                voided.voided_at_ms = Some(7);
                assert!(store.update_grant("c", &voided).await.is_ok());
            });
        }
        let store = super::super::sqlite::SqliteStore::open(&path).unwrap_or_else(|e| panic!("open: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
        let all = rt.block_on(async {
            use super::super::EntitlementStore;
            store.list_grants().await.unwrap_or_default()
        });
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.voided_at_ms, Some(7));
    }
}
