//! Embedded SQLite store: usage and entitlements in one local file.
//!
//! This is the store for single-instance deployments, which should not need a
//! database server: one file next to the daemon holds the flushed minute rows
//! (`usage_minute`), a record of every flush written (`flushes`) and the
//! per-customer entitlement documents (`entitlements`). It implements the same
//! [`UsageStore`] and [`EntitlementStore`] traits as the networked backends, and
//! the shared scenarios in `super::suite` run against it.
//!
//! # Exactly-once flushes
//!
//! Every flush carries `(instance_id, seq)`. [`UsageStore::write_flush`] runs one
//! `BEGIN IMMEDIATE` transaction that first looks the pair up in `flushes`: when
//! it is there the flush was already stored and the call does nothing; otherwise
//! it merges every row into the row its key already has (or inserts it) and then
//! the `flushes` record, and commits. The check and
//! the writes are in the same transaction, so a retried flush (say the first
//! attempt committed but its reply was lost) is never counted twice, and a failed
//! attempt leaves neither rows nor a record, so the retry writes it in full.
//!
//! # One row per key
//!
//! A row's key is `(meter, customer, minute, properties, instance_id)`. With a
//! one-second flush a busy customer's minute is flushed up to 60 times; each
//! later flush folds its value into the key's row by the meter's fold (sum, max,
//! or the newest event's value), so the table grows with the keys that saw
//! usage, not with the flushes. A file written before this kept a row per flush;
//! queries fold those duplicates as before, and a merge updates one of them.
//!
//! Queries read the rows and `MAX(flush_seq)` of the asking instance in one read
//! transaction, so the reported `stored_seq` describes exactly the rows in the
//! answer: the caller adds its in-memory epochs above that sequence and counts
//! nothing twice or not at all.
//!
//! # Concurrency
//!
//! One [`rusqlite::Connection`] sits behind a mutex and every call runs on
//! tokio's blocking pool. Flushes come once a second, so one connection is ample;
//! WAL keeps outside readers (backups, `sqlite3` in a shell) from blocking it, and
//! `synchronous=FULL` makes a committed flush survive power loss.

use super::{
    Aggregate, DistinctValue, EntitlementStore, FlushBatch, Fold, GroupedPoint, LedgerKind, LedgerRow, LedgerStore, SeriesPoint,
    StoreError, Stored, UsageQuery, UsageStore,
};
use crate::clock::now_ms;
use crate::model::EntitlementsDoc;
use crate::wal::WalMark;
use async_trait::async_trait;
use rusqlite::types::ToSql;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long a statement waits for a lock held by another connection to the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_minute (
    meter       TEXT    NOT NULL,
    customer    TEXT    NOT NULL,
    minute      INTEGER NOT NULL, -- unix ms of the minute start
    properties  TEXT    NOT NULL, -- JSON array of [k, v] pairs, '' when none
    value       INTEGER NOT NULL,
    last_ts     INTEGER NOT NULL,
    instance_id TEXT    NOT NULL,
    flush_seq   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_minute_meter_minute
    ON usage_minute (meter, minute);
-- One row per key: a flush merges into the row an earlier flush wrote.
CREATE INDEX IF NOT EXISTS usage_minute_key
    ON usage_minute (meter, customer, minute, properties, instance_id);
CREATE TABLE IF NOT EXISTS flushes (
    instance_id TEXT    NOT NULL,
    flush_seq   INTEGER NOT NULL,
    rows        INTEGER NOT NULL,
    written_at  INTEGER NOT NULL,
    wal_seq     INTEGER NOT NULL DEFAULT 0, -- WAL records this flush covers, inclusive
    wal_extras  TEXT    NOT NULL DEFAULT '', -- and these ranges above wal_seq (WalMark)
    PRIMARY KEY (instance_id, flush_seq)
);
CREATE TABLE IF NOT EXISTS stripe_ledger (
    meter              TEXT    NOT NULL,
    customer           TEXT    NOT NULL,
    period_start       INTEGER NOT NULL, -- unix ms
    n                  INTEGER NOT NULL,
    identifier         TEXT    NOT NULL,
    kind               TEXT    NOT NULL, -- sent | cancelled | failed
    value              INTEGER NOT NULL, -- whole units
    stripe_customer_id TEXT    NOT NULL,
    at                 INTEGER NOT NULL, -- unix ms
    fence              INTEGER NOT NULL,
    PRIMARY KEY (identifier, kind)
);
CREATE INDEX IF NOT EXISTS stripe_ledger_meter_period
    ON stripe_ledger (meter, period_start);
CREATE TABLE IF NOT EXISTS entitlements (
    customer   TEXT PRIMARY KEY,
    doc        TEXT    NOT NULL, -- JSON of EntitlementsDoc
    updated_at INTEGER NOT NULL
);
-- Prepaid credit grants (issue 18).
CREATE TABLE IF NOT EXISTS grants (
    customer TEXT NOT NULL,
    id       TEXT NOT NULL,
    doc      TEXT NOT NULL, -- JSON of GrantDoc
    PRIMARY KEY (customer, id)
);
";

/// Usage and entitlements in one SQLite file. Cloning shares the connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Maps a rusqlite error to [`StoreError::Io`], naming the operation.
fn io(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Io(format!("sqlite {op}: {e}"))
}

fn seq_to_sql(seq: u64, op: &'static str) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Io(format!("sqlite {op}: flush seq {seq} exceeds the storable range")))
}

fn seq_from_sql(seq: i64, op: &'static str) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("sqlite {op}: negative flush seq {seq} stored")))
}

/// The highest stored seq of `instance_id`, 0 when none.
fn stored_seq(conn: &Connection, instance_id: &str, op: &'static str) -> Result<u64, StoreError> {
    let seq: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(flush_seq), 0) FROM flushes WHERE instance_id = ?1")
        .and_then(|mut stmt| stmt.query_row([instance_id], |r| r.get(0)))
        .map_err(io(op))?;
    seq_from_sql(seq, op)
}

/// The WAL records the latest stored flush of `instance_id` covers.
fn stored_wal_mark(conn: &Connection, instance_id: &str, op: &'static str) -> Result<WalMark, StoreError> {
    let latest: Option<(i64, String)> = conn
        .prepare_cached("SELECT wal_seq, wal_extras FROM flushes WHERE instance_id = ?1 ORDER BY flush_seq DESC LIMIT 1")
        .and_then(|mut stmt| stmt.query_row([instance_id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(io(op))?;
    let Some((upto, extras)) = latest else {
        return Ok(WalMark::default());
    };
    let extras = WalMark::parse_extras(&extras).map_err(|e| StoreError::Corrupt(format!("sqlite {op}: {e}")))?;
    Ok(WalMark { upto: seq_from_sql(upto, op)?, extras })
}

/// Adds columns that later versions brought to a store file made by an earlier one.
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let has_extras: bool = conn
        .prepare("SELECT COUNT(*) FROM pragma_table_info('flushes') WHERE name = 'wal_extras'")?
        .query_row([], |r| r.get::<_, i64>(0))?
        > 0;
    if !has_extras {
        conn.execute_batch("ALTER TABLE flushes ADD COLUMN wal_extras TEXT NOT NULL DEFAULT ''")?;
    }
    // Before rows were merged by key (issue 24) the lookup index stopped at the
    // minute; `usage_minute_key` (in `SCHEMA`) covers its queries too.
    conn.execute_batch("DROP INDEX IF EXISTS usage_minute_meter_customer_minute")?;
    Ok(())
}

/// The select list folding `value` and `last_ts` of a group. For `Latest`, SQLite
/// takes the bare `value` from the row that holds `MAX(last_ts)` (documented
/// bare-column behaviour of a lone `max()` aggregate).
fn fold_columns(fold: Fold) -> &'static str {
    match fold {
        Fold::Sum => "SUM(value), MAX(last_ts)",
        Fold::Max => "MAX(value), MAX(last_ts)",
        Fold::Latest => "value, MAX(last_ts)",
    }
}

/// Opens a read transaction: everything read through it is one snapshot.
fn read_tx<'c>(conn: &'c mut Connection, op: &'static str) -> Result<Transaction<'c>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(io(op))
}

impl SqliteStore {
    /// Opens (creating when missing) the store file at `path` and its schema.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let ctx = |e: rusqlite::Error| StoreError::Io(format!("sqlite open {}: {e}", path.display()));
        let conn = Connection::open(path).map_err(ctx)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(ctx)?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(ctx)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Io(format!("sqlite open {}: could not enable WAL (journal_mode is {mode:?})", path.display())));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(ctx)?;
        conn.execute_batch(SCHEMA).map_err(ctx)?;
        migrate(&conn).map_err(ctx)?;
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)), path: path.to_path_buf() })
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(format!("sqlite {op}: {e}")))?
    }
}

fn write_flush_blocking(conn: &mut Connection, batch: &FlushBatch) -> Result<(), StoreError> {
    const OP: &str = "write_flush";
    let seq = seq_to_sql(batch.seq, OP)?;
    let rows =
        i64::try_from(batch.rows.len()).map_err(|_| StoreError::Io(format!("sqlite {OP}: {} rows in one flush", batch.rows.len())))?;
    // Serialize before taking the write lock.
    let mut props = Vec::with_capacity(batch.rows.len());
    for row in &batch.rows {
        props.push(if row.properties.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&row.properties).map_err(|e| StoreError::Io(format!("sqlite {OP}: encoding properties: {e}")))?
        });
    }

    // IMMEDIATE: take the write lock before the check, so nothing can store the
    // same flush between the check and the insert.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(io(OP))?;
    let stored: Option<i64> = tx
        .prepare_cached("SELECT wal_seq FROM flushes WHERE instance_id = ?1 AND flush_seq = ?2")
        .and_then(|mut stmt| stmt.query_row((&batch.instance_id, seq), |r| r.get(0)).optional())
        .map_err(io(OP))?;
    if let Some(stored_wal) = stored {
        if u64::try_from(stored_wal).ok() != Some(batch.wal_seq) {
            // Another flush under this number: never take it for this one.
            return Err(StoreError::Corrupt(format!(
                "sqlite {OP}: flush {}#{} is already stored with a different WAL watermark ({stored_wal}, this one {})",
                batch.instance_id, batch.seq, batch.wal_seq
            )));
        }
        // Already stored: dropping `tx` rolls back the (empty) transaction.
        return Ok(());
    }
    {
        // A key an earlier flush wrote is merged into its row, by the meter's
        // fold, so the table holds one row per (meter, customer, minute,
        // properties, instance) however often a minute is flushed: with a 1 s
        // flush a busy customer's minute is 1 row, not 60 (issue 24). The
        // `rowid` pick updates one row even in a file written before rows
        // were merged, which may hold several of a key (queries fold them).
        let mut merge = tx
            .prepare_cached(
                "UPDATE usage_minute SET \
                 value = CASE ?6 WHEN 0 THEN value + ?5 WHEN 1 THEN max(value, ?5) \
                         ELSE (CASE WHEN ?7 >= last_ts THEN ?5 ELSE value END) END, \
                 last_ts = max(last_ts, ?7), flush_seq = ?9 \
                 WHERE rowid = (SELECT rowid FROM usage_minute \
                   WHERE meter = ?1 AND customer = ?2 AND minute = ?3 AND properties = ?4 AND instance_id = ?8 LIMIT 1)",
            )
            .map_err(io(OP))?;
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO usage_minute \
                 (meter, customer, minute, properties, value, last_ts, instance_id, flush_seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(io(OP))?;
        // The flusher runs this lowered (`crate::priority`); yielding every
        // 32 rows (~0.1 ms) lets a request worker woken on this CPU in at once.
        let mut yielder = crate::priority::Yielder::new(32);
        for (row, props) in batch.rows.iter().zip(&props) {
            let fold: i64 = match row.fold {
                Fold::Sum => 0,
                Fold::Max => 1,
                Fold::Latest => 2,
            };
            let merged = merge
                .execute((&row.meter, &row.customer, row.minute_ms, props, row.value, fold, row.last_ts, &batch.instance_id, seq))
                .map_err(io(OP))?;
            if merged == 0 {
                insert
                    .execute((&row.meter, &row.customer, row.minute_ms, props, row.value, row.last_ts, &batch.instance_id, seq))
                    .map_err(io(OP))?;
            }
            yielder.step();
        }
    }
    let wal_seq = i64::try_from(batch.wal_seq).map_err(|_| StoreError::Io(format!("sqlite {OP}: wal seq {} too large", batch.wal_seq)))?;
    let extras = WalMark { upto: batch.wal_seq, extras: batch.wal_extras.clone() }.extras_text();
    tx.prepare_cached(
        "INSERT INTO flushes (instance_id, flush_seq, rows, written_at, wal_seq, wal_extras) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut stmt| stmt.execute((&batch.instance_id, seq, rows, now_ms(), wal_seq, extras)))
    .map_err(io(OP))?;
    tx.commit().map_err(io(OP))
}

fn aggregate_blocking(conn: &mut Connection, query: &UsageQuery) -> Result<Stored<Vec<Aggregate>>, StoreError> {
    const OP: &str = "aggregate";
    let customer_clause = if query.customer.is_some() { " AND customer = ?4" } else { " AND ?4 IS NULL" };
    let own_clause = if query.own_only { " AND instance_id = ?5" } else { "" };
    let sql = format!(
        "SELECT customer, {} FROM usage_minute \
         WHERE meter = ?1 AND minute >= ?2 AND minute < ?3{customer_clause}{own_clause} \
         GROUP BY customer ORDER BY customer",
        fold_columns(query.fold)
    );
    let params: [&dyn ToSql; 5] = [&query.meter, &query.from_ms, &query.to_ms, &query.customer, &query.instance_id];
    let n = if query.own_only { 5 } else { 4 };

    let tx = read_tx(conn, OP)?;
    let data = {
        let mut stmt = tx.prepare_cached(&sql).map_err(io(OP))?;
        let rows = stmt
            .query_map(&params[..n], |r| Ok(Aggregate { customer: r.get(0)?, value: r.get(1)?, last_ts: r.get(2)? }))
            .map_err(io(OP))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(io(OP))?
    };
    let stored_seq = stored_seq(&tx, &query.instance_id, OP)?;
    tx.commit().map_err(io(OP))?;
    Ok(Stored { data, stored_seq })
}

fn series_blocking(
    conn: &mut Connection,
    query: &UsageQuery,
    granularity_ms: i64,
    limit: usize,
) -> Result<Stored<Vec<SeriesPoint>>, StoreError> {
    const OP: &str = "series";
    if granularity_ms <= 0 {
        return Err(StoreError::Io(format!("sqlite {OP}: granularity must be positive, got {granularity_ms} ms")));
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let customer_clause = if query.customer.is_some() { " AND customer = ?6" } else { "" };
    // minute >= 0, so integer division floors and buckets align to the epoch.
    let sql = format!(
        "SELECT customer, (minute / ?4) * ?4 AS start, {} FROM usage_minute \
         WHERE meter = ?1 AND minute >= ?2 AND minute < ?3{customer_clause} \
         GROUP BY customer, start ORDER BY customer, start LIMIT ?5",
        fold_columns(query.fold)
    );
    let params: [&dyn ToSql; 6] = [&query.meter, &query.from_ms, &query.to_ms, &granularity_ms, &limit, &query.customer];
    let n = if query.customer.is_some() { 6 } else { 5 };

    let tx = read_tx(conn, OP)?;
    let data = {
        let mut stmt = tx.prepare_cached(&sql).map_err(io(OP))?;
        let rows = stmt
            .query_map(&params[..n], |r| Ok(SeriesPoint { customer: r.get(0)?, start_ms: r.get(1)?, value: r.get(2)?, last_ts: r.get(3)? }))
            .map_err(io(OP))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(io(OP))?
    };
    let stored_seq = stored_seq(&tx, &query.instance_id, OP)?;
    tx.commit().map_err(io(OP))?;
    Ok(Stored { data, stored_seq })
}

/// Issue 25: the value of the property named by parameter `?{param}` in a
/// row's `properties` (a JSON array of `[k, v]` pairs, '' when none), or NULL.
fn property_sql(param: u8) -> String {
    format!("(SELECT j.value ->> 1 FROM json_each(NULLIF(properties, '')) AS j WHERE j.value ->> 0 = ?{param} LIMIT 1)")
}

fn series_grouped_blocking(
    conn: &mut Connection,
    query: &UsageQuery,
    granularity_ms: i64,
    group_by: &str,
    limit: usize,
) -> Result<Stored<Vec<GroupedPoint>>, StoreError> {
    const OP: &str = "series_grouped";
    if granularity_ms <= 0 {
        return Err(StoreError::Io(format!("sqlite {OP}: granularity must be positive, got {granularity_ms} ms")));
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let customer_clause = if query.customer.is_some() { " AND customer = ?6" } else { " AND ?6 IS NULL" };
    let sql = format!(
        "SELECT customer, (minute / ?4) * ?4 AS start, {} AS grp, {} FROM usage_minute \
         WHERE meter = ?1 AND minute >= ?2 AND minute < ?3{customer_clause} \
         GROUP BY customer, start, grp ORDER BY customer, start, grp LIMIT ?5",
        property_sql(7),
        fold_columns(query.fold)
    );
    let params: [&dyn ToSql; 7] = [&query.meter, &query.from_ms, &query.to_ms, &granularity_ms, &limit, &query.customer, &group_by];
    let tx = read_tx(conn, OP)?;
    let data = {
        let mut stmt = tx.prepare_cached(&sql).map_err(io(OP))?;
        let rows = stmt
            .query_map(&params[..], |r| {
                Ok(GroupedPoint { customer: r.get(0)?, start_ms: r.get(1)?, group: r.get(2)?, value: r.get(3)?, last_ts: r.get(4)? })
            })
            .map_err(io(OP))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(io(OP))?
    };
    let stored_seq = stored_seq(&tx, &query.instance_id, OP)?;
    tx.commit().map_err(io(OP))?;
    Ok(Stored { data, stored_seq })
}

fn distinct_values_blocking(
    conn: &mut Connection,
    query: &UsageQuery,
    granularity_ms: i64,
    property: &str,
    group_by: Option<&str>,
    limit: usize,
) -> Result<Stored<Vec<DistinctValue>>, StoreError> {
    const OP: &str = "distinct_values";
    if granularity_ms <= 0 {
        return Err(StoreError::Io(format!("sqlite {OP}: granularity must be positive, got {granularity_ms} ms")));
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let customer_clause = if query.customer.is_some() { " AND customer = ?6" } else { " AND ?6 IS NULL" };
    let own_clause = if query.own_only { " AND instance_id = ?9" } else { " AND ?9 IS NOT NULL" };
    let sql = format!(
        "SELECT DISTINCT customer, ((minute - ?2) / ?4) * ?4 + ?2 AS start, {} AS grp, {} AS val FROM usage_minute \
         WHERE meter = ?1 AND minute >= ?2 AND minute < ?3{customer_clause}{own_clause} AND val IS NOT NULL \
         ORDER BY customer, start, grp, val LIMIT ?5",
        property_sql(7),
        property_sql(8),
    );
    let params: [&dyn ToSql; 9] =
        [&query.meter, &query.from_ms, &query.to_ms, &granularity_ms, &limit, &query.customer, &group_by, &property, &query.instance_id];
    let tx = read_tx(conn, OP)?;
    let data = {
        let mut stmt = tx.prepare_cached(&sql).map_err(io(OP))?;
        let rows = stmt
            .query_map(&params[..], |r| Ok(DistinctValue { customer: r.get(0)?, start_ms: r.get(1)?, group: r.get(2)?, value: r.get(3)? }))
            .map_err(io(OP))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(io(OP))?
    };
    let stored_seq = stored_seq(&tx, &query.instance_id, OP)?;
    tx.commit().map_err(io(OP))?;
    Ok(Stored { data, stored_seq })
}

fn parse_doc(customer: &str, doc: &str) -> Result<EntitlementsDoc, StoreError> {
    serde_json::from_str(doc)
        .map_err(|e| StoreError::Corrupt(format!("entitlements of customer {customer:?} are not a valid document: {e}")))
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn write_flush(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        // On a lowered thread that borrows the batch (it was cloned, thousands
        // of rows, on a runtime worker), with the worker's queued requests
        // handed to another thread meanwhile (issue 24; `crate::priority`).
        crate::priority::lowered_scoped(|| {
            let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            write_flush_blocking(&mut guard, batch)
        })
        .map_err(|e| StoreError::Task(format!("sqlite write_flush: {e}")))?
    }

    async fn wal_mark(&self, instance_id: &str) -> Result<WalMark, StoreError> {
        let instance_id = instance_id.to_owned();
        self.run("wal_mark", move |conn| stored_wal_mark(conn, &instance_id, "wal_mark")).await
    }

    async fn max_flush_seq(&self, instance_id: &str) -> Result<u64, StoreError> {
        let instance_id = instance_id.to_owned();
        self.run("max_flush_seq", move |conn| stored_seq(conn, &instance_id, "max_flush_seq")).await
    }

    async fn aggregate(&self, query: &UsageQuery) -> Result<Stored<Vec<Aggregate>>, StoreError> {
        let query = query.clone();
        self.run("aggregate", move |conn| aggregate_blocking(conn, &query)).await
    }

    async fn series(&self, query: &UsageQuery, granularity_ms: i64, limit: usize) -> Result<Stored<Vec<SeriesPoint>>, StoreError> {
        let query = query.clone();
        self.run("series", move |conn| series_blocking(conn, &query, granularity_ms, limit)).await
    }

    async fn series_grouped(
        &self,
        query: &UsageQuery,
        granularity_ms: i64,
        group_by: &str,
        limit: usize,
    ) -> Result<Stored<Vec<GroupedPoint>>, StoreError> {
        let (query, group_by) = (query.clone(), group_by.to_owned());
        self.run("series_grouped", move |conn| series_grouped_blocking(conn, &query, granularity_ms, &group_by, limit)).await
    }

    async fn distinct_values(
        &self,
        query: &UsageQuery,
        granularity_ms: i64,
        property: &str,
        group_by: Option<&str>,
        limit: usize,
    ) -> Result<Stored<Vec<DistinctValue>>, StoreError> {
        let (query, property, group_by) = (query.clone(), property.to_owned(), group_by.map(str::to_owned));
        self.run("distinct_values", move |conn| {
            distinct_values_blocking(conn, &query, granularity_ms, &property, group_by.as_deref(), limit)
        })
        .await
    }
}

fn append_ledger_blocking(conn: &mut Connection, rows: &[LedgerRow], fence: u64) -> Result<(), StoreError> {
    const OP: &str = "append_ledger";
    let fence_sql = seq_to_sql(fence, OP)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(io(OP))?;
    if fence > 0 {
        let stored: i64 = tx.query_row("SELECT COALESCE(MAX(fence), 0) FROM stripe_ledger", [], |r| r.get(0)).map_err(io(OP))?;
        if stored > fence_sql {
            return Err(StoreError::Fenced(format!("the ledger holds fence {stored}, newer than this writer's {fence}")));
        }
    }
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO stripe_ledger \
                 (meter, customer, period_start, n, identifier, kind, value, stripe_customer_id, at, fence) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(io(OP))?;
        for r in rows {
            insert
                .execute((
                    &r.meter,
                    &r.customer,
                    r.period_start_ms,
                    i64::from(r.n),
                    &r.identifier,
                    r.kind.as_str(),
                    r.value,
                    &r.stripe_customer_id,
                    r.at_ms,
                    seq_to_sql(r.fence, OP)?,
                ))
                .map_err(io(OP))?;
        }
    }
    tx.commit().map_err(io(OP))
}

fn ledger_rows_blocking(conn: &mut Connection, meter: &str, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
    const OP: &str = "ledger_rows";
    let mut stmt = conn
        .prepare_cached(
            "SELECT meter, customer, period_start, n, identifier, kind, value, stripe_customer_id, at, fence FROM stripe_ledger \
             WHERE meter = ?1 AND period_start >= ?2 AND period_start < ?3 ORDER BY customer, period_start, n, kind",
        )
        .map_err(io(OP))?;
    type Raw = (String, String, i64, i64, String, String, i64, String, i64, i64);
    let rows = stmt
        .query_map((meter, from_ms, to_ms), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?))
        })
        .map_err(io(OP))?;
    let mut out = Vec::new();
    for row in rows {
        let (meter, customer, period_start_ms, n, identifier, kind, value, stripe_customer_id, at_ms, fence): Raw = row.map_err(io(OP))?;
        let kind = LedgerKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("sqlite {OP}: unknown ledger kind {kind:?}")))?;
        let n = u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("sqlite {OP}: ledger n {n} out of range")))?;
        out.push(LedgerRow {
            meter,
            customer,
            period_start_ms,
            n,
            identifier,
            kind,
            value,
            stripe_customer_id,
            at_ms,
            fence: seq_from_sql(fence, OP)?,
        });
    }
    Ok(out)
}

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn append_ledger(&self, rows: &[LedgerRow], fence: u64) -> Result<(), StoreError> {
        let rows = rows.to_vec();
        self.run("append_ledger", move |conn| append_ledger_blocking(conn, &rows, fence)).await
    }

    async fn ledger_rows(&self, meter: &str, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        let meter = meter.to_owned();
        self.run("ledger_rows", move |conn| ledger_rows_blocking(conn, &meter, from_ms, to_ms)).await
    }
}

#[async_trait]
impl EntitlementStore for SqliteStore {
    async fn get(&self, customer: &str) -> Result<Option<EntitlementsDoc>, StoreError> {
        const OP: &str = "get entitlements";
        let customer = customer.to_owned();
        self.run(OP, move |conn| {
            let doc: Option<String> = conn
                .prepare_cached("SELECT doc FROM entitlements WHERE customer = ?1")
                .and_then(|mut stmt| stmt.query_row([&customer], |r| r.get(0)).optional())
                .map_err(io(OP))?;
            doc.map(|d| parse_doc(&customer, &d)).transpose()
        })
        .await
    }

    async fn put(&self, customer: &str, doc: &EntitlementsDoc) -> Result<(), StoreError> {
        const OP: &str = "put entitlements";
        let customer = customer.to_owned();
        let doc = serde_json::to_string(doc).map_err(|e| StoreError::Io(format!("sqlite {OP}: encoding document of {customer:?}: {e}")))?;
        self.run(OP, move |conn| {
            conn.prepare_cached(
                "INSERT INTO entitlements (customer, doc, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (customer) DO UPDATE SET doc = excluded.doc, updated_at = excluded.updated_at",
            )
            .and_then(|mut stmt| stmt.execute((&customer, &doc, now_ms())))
            .map_err(io(OP))?;
            Ok(())
        })
        .await
    }

    async fn list(&self) -> Result<Vec<(String, EntitlementsDoc)>, StoreError> {
        const OP: &str = "list entitlements";
        self.run(OP, move |conn| {
            let mut stmt = conn.prepare_cached("SELECT customer, doc FROM entitlements ORDER BY customer").map_err(io(OP))?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(io(OP))?;
            let mut out = Vec::new();
            for row in rows {
                let (customer, doc) = row.map_err(io(OP))?;
                let doc = parse_doc(&customer, &doc)?;
                out.push((customer, doc));
            }
            Ok(out)
        })
        .await
    }

    // Customers and portal tokens (issue 20).
    async fn delete(&self, customer: &str) -> Result<(), StoreError> {
        const OP: &str = "delete entitlements";
        let customer = customer.to_owned();
        self.run(OP, move |conn| {
            conn.prepare_cached("DELETE FROM entitlements WHERE customer = ?1")
                .and_then(|mut stmt| stmt.execute([&customer]))
                .map_err(io(OP))?;
            Ok(())
        })
        .await
    }

    // Prepaid credit grants (issue 18).
    async fn insert_grant(
        &self,
        customer: &str,
        doc: &crate::model::grant::GrantDoc,
    ) -> Result<Option<crate::model::grant::GrantDoc>, StoreError> {
        let (customer, doc) = (customer.to_owned(), doc.clone());
        self.run("insert grant", move |conn| super::grants::sqlite_insert(conn, &customer, &doc)).await
    }

    async fn update_grant(&self, customer: &str, doc: &crate::model::grant::GrantDoc) -> Result<(), StoreError> {
        let (customer, doc) = (customer.to_owned(), doc.clone());
        self.run("update grant", move |conn| super::grants::sqlite_update(conn, &customer, &doc)).await
    }

    async fn list_grants(&self) -> Result<Vec<(String, crate::model::grant::GrantDoc)>, StoreError> {
        self.run("list grants", super::grants::sqlite_list).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite;
    use super::super::{FlushBatch, UsageQuery, UsageRow};
    use super::*;

    fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("meterd.db")).expect("open store");
        (dir, store)
    }

    /// A store in a temp dir, removed with it.
    struct Temp {
        _dir: tempfile::TempDir,
        store: SqliteStore,
    }

    impl suite::Fixture for Temp {
        type Store = SqliteStore;

        fn store(&self) -> &SqliteStore {
            &self.store
        }
    }

    async fn open(_tag: &str) -> suite::require::Need<Temp> {
        let (dir, store) = open_temp();
        Ok(Temp { _dir: dir, store })
    }

    suite::store_suite!(open; usage, ledger, entitlements);

    fn batch(instance_id: &str, seq: u64, rows: Vec<UsageRow>) -> FlushBatch {
        FlushBatch { instance_id: instance_id.to_owned(), seq, wal_seq: 0, wal_extras: Vec::new(), rows }
    }

    fn row(customer: &str, minute_ms: i64, value: i64) -> UsageRow {
        UsageRow {
            meter: "m".to_owned(),
            customer: customer.to_owned(),
            minute_ms,
            properties: vec![("region".to_owned(), "eu".to_owned())],
            value,
            last_ts: minute_ms + 1,
            fold: Fold::Sum,
        }
    }

    fn sum_query(instance_id: &str) -> UsageQuery {
        UsageQuery {
            instance_id: instance_id.to_owned(),
            meter: "m".to_owned(),
            fold: Fold::Sum,
            from_ms: 0,
            to_ms: i64::MAX,
            customer: None,
            own_only: false,
        }
    }

    #[tokio::test]
    async fn persists_across_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("meterd.db");
        let doc = EntitlementsDoc { plan: Some("pro".to_owned()), ..EntitlementsDoc::default() };
        {
            let store = SqliteStore::open(&path).expect("open");
            store.write_flush(&batch("i", 3, vec![row("a", 60_000, 5), row("b", 0, 7)])).await.expect("flush");
            store.put("a", &doc).await.expect("put");
        }
        let store = SqliteStore::open(&path).expect("reopen");
        let got = store.aggregate(&sum_query("i")).await.expect("aggregate");
        assert_eq!(
            got,
            Stored {
                data: vec![
                    Aggregate { customer: "a".to_owned(), value: 5, last_ts: 60_001 },
                    Aggregate { customer: "b".to_owned(), value: 7, last_ts: 1 },
                ],
                stored_seq: 3,
            }
        );
        assert_eq!(store.max_flush_seq("i").await.expect("max seq"), 3);
        // The exactly-once record survives the restart too.
        store.write_flush(&batch("i", 3, vec![row("a", 60_000, 100)])).await.expect("rewrite");
        let again = store.aggregate(&sum_query("i")).await.expect("aggregate");
        assert_eq!(again.data[0].value, 5);
        assert_eq!(store.get("a").await.expect("get"), Some(doc));
        // Properties were stored as a JSON array of pairs.
        let conn = store.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let props: String =
            conn.query_row("SELECT properties FROM usage_minute WHERE customer = 'a'", [], |r| r.get(0)).expect("properties");
        assert_eq!(props, r#"[["region","eu"]]"#);
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal mode");
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn a_flush_of_many_rows_stores_every_row_once() {
        let (_dir, store) = open_temp();
        // More rows than a yield step, in three minutes.
        let n = 150;
        let rows: Vec<UsageRow> = (0..n).map(|i| row(&format!("c{i:04}"), 60_000 * (i as i64 % 3), i as i64 + 1)).collect();
        store.write_flush(&batch("i", 1, rows)).await.expect("flush");
        let got = store.aggregate(&sum_query("i")).await.expect("aggregate");
        assert_eq!(got.data.len(), n);
        let values: Vec<i64> = got.data.iter().map(|a| a.value).collect();
        assert_eq!(values, (1..=n as i64).collect::<Vec<_>>(), "every row once, in customer order");
        let conn = store.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let stored: i64 = conn.query_row("SELECT count(*) FROM usage_minute", [], |r| r.get(0)).expect("count");
        assert_eq!(stored, n as i64);
    }

    fn stored_rows(store: &SqliteStore) -> i64 {
        let conn = store.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.query_row("SELECT count(*) FROM usage_minute", [], |r| r.get(0)).expect("count")
    }

    fn folded(fold: Fold, customer: &str, minute_ms: i64, value: i64, last_ts: i64) -> UsageRow {
        UsageRow { customer: customer.to_owned(), value, last_ts, fold, ..row(customer, minute_ms, value) }
    }

    #[tokio::test]
    async fn later_flushes_of_a_key_merge_into_its_row_by_the_meters_fold() {
        let (_dir, store) = open_temp();
        // Three flushes of the same minute, as a busy customer makes with a 1 s
        // flush; for `latest` the second carries an older event than the first.
        let flushes = [(5, 1_000), (9, 500), (2, 3_000)];
        for (seq, (value, at)) in flushes.iter().enumerate() {
            let rows = vec![
                folded(Fold::Sum, "sum", 0, *value, *at),
                folded(Fold::Max, "max", 0, *value, *at),
                folded(Fold::Latest, "latest", 0, *value, *at),
            ];
            store.write_flush(&batch("i", seq as u64 + 1, rows)).await.expect("flush");
        }
        assert_eq!(stored_rows(&store), 3, "one row per key, not one per flush");
        let got: Vec<(String, i64, i64, i64)> = {
            let conn = store.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let mut stmt = conn.prepare("SELECT customer, value, last_ts, flush_seq FROM usage_minute ORDER BY customer").expect("select");
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).expect("rows").map(|r| r.expect("row"));
            rows.collect()
        };
        assert_eq!(
            got,
            vec![
                // The value of the newest event (3_000), not of the last flush written.
                ("latest".to_owned(), 2, 3_000, 3),
                ("max".to_owned(), 9, 3_000, 3),
                ("sum".to_owned(), 16, 3_000, 3),
            ]
        );
        // An older event in a later flush leaves `latest` as it is.
        store.write_flush(&batch("i", 4, vec![folded(Fold::Latest, "latest", 0, 7, 2_000)])).await.expect("flush");
        let latest = UsageQuery { meter: "m".to_owned(), fold: Fold::Latest, customer: Some("latest".to_owned()), ..sum_query("i") };
        assert_eq!(
            store.aggregate(&latest).await.expect("aggregate").data,
            vec![Aggregate { customer: "latest".into(), value: 2, last_ts: 3_000 }]
        );
    }

    #[tokio::test]
    async fn rows_differing_in_any_part_of_the_key_stay_apart() {
        let (_dir, store) = open_temp();
        store.write_flush(&batch("i", 1, vec![row("a", 0, 1)])).await.expect("flush");
        let other_props = UsageRow { properties: vec![("region".to_owned(), "us".to_owned())], ..row("a", 0, 2) };
        let other_meter = UsageRow { meter: "n".to_owned(), ..row("a", 0, 4) };
        store.write_flush(&batch("i", 2, vec![other_props, other_meter, row("a", 60_000, 8), row("b", 0, 16)])).await.expect("flush");
        store.write_flush(&batch("j", 1, vec![row("a", 0, 32)])).await.expect("another instance");
        assert_eq!(stored_rows(&store), 6);
        // Every value is still counted once.
        let total: i64 = store.aggregate(&sum_query("i")).await.expect("aggregate").data.iter().map(|a| a.value).sum();
        assert_eq!(total, 1 + 2 + 8 + 16 + 32);
        let own = UsageQuery { own_only: true, ..sum_query("j") };
        assert_eq!(store.aggregate(&own).await.expect("aggregate").data, vec![Aggregate { customer: "a".into(), value: 32, last_ts: 1 }]);
    }

    #[tokio::test]
    async fn a_file_from_before_merging_keeps_its_rows_and_takes_merges() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("meterd.db");
        {
            // The schema and rows of a build that inserted a row per flush: two
            // rows of one key, and the old lookup index.
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(&SCHEMA.replace(
                "usage_minute_key\n    ON usage_minute (meter, customer, minute, properties, instance_id)",
                "usage_minute_meter_customer_minute\n    ON usage_minute (meter, customer, minute)",
            ))
            .expect("old schema");
            conn.execute_batch(
                "INSERT INTO usage_minute VALUES ('m', 'a', 0, '[[\"region\",\"eu\"]]', 5, 1, 'i', 1); \
                 INSERT INTO usage_minute VALUES ('m', 'a', 0, '[[\"region\",\"eu\"]]', 7, 1, 'i', 2); \
                 INSERT INTO flushes VALUES ('i', 1, 1, 0, 0, ''), ('i', 2, 1, 0, 0, '');",
            )
            .expect("old rows");
        }
        let store = SqliteStore::open(&path).expect("open");
        let indexes: Vec<String> = {
            let conn = store.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_minute' ORDER BY name")
                .expect("select");
            let names = stmt.query_map([], |r| r.get(0)).expect("names").map(|r| r.expect("name")).collect();
            names
        };
        assert_eq!(indexes, vec!["usage_minute_key".to_owned(), "usage_minute_meter_minute".to_owned()]);
        // The next flush of that key merges into one of the two rows, not both.
        store.write_flush(&batch("i", 3, vec![row("a", 0, 100)])).await.expect("flush");
        assert_eq!(stored_rows(&store), 2);
        assert_eq!(store.aggregate(&sum_query("i")).await.expect("aggregate").data[0].value, 112);
    }

    #[tokio::test]
    async fn failed_flush_leaves_nothing() {
        let (_dir, store) = open_temp();
        store
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .execute_batch(
                "CREATE TRIGGER fail_on_poison BEFORE INSERT ON usage_minute WHEN NEW.value = -999 \
                 BEGIN SELECT RAISE(ABORT, 'poisoned row'); END;",
            )
            .expect("trigger");
        let bad = batch("i", 1, vec![row("a", 0, 10), row("b", 0, 20), row("c", 0, -999)]);
        match store.write_flush(&bad).await {
            Err(StoreError::Io(msg)) => assert!(msg.contains("write_flush"), "{msg}"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        let got = store.aggregate(&sum_query("i")).await.expect("aggregate");
        assert_eq!(got, Stored { data: vec![], stored_seq: 0 });
        assert_eq!(store.max_flush_seq("i").await.expect("max seq"), 0);
        // The seq was not recorded, so a retry is written in full.
        let good = batch("i", 1, vec![row("a", 0, 10), row("b", 0, 20)]);
        store.write_flush(&good).await.expect("retry");
        let got = store.aggregate(&sum_query("i")).await.expect("aggregate");
        assert_eq!(got.data.iter().map(|a| a.value).collect::<Vec<_>>(), vec![10, 20]);
        assert_eq!(got.stored_seq, 1);
        let conn = store.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let rows: i64 =
            conn.query_row("SELECT rows FROM flushes WHERE instance_id = 'i' AND flush_seq = 1", [], |r| r.get(0)).expect("flush record");
        assert_eq!(rows, 2);
    }

    #[tokio::test]
    async fn malformed_entitlements_are_corrupt() {
        let (_dir, store) = open_temp();
        store
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .execute("INSERT INTO entitlements (customer, doc, updated_at) VALUES ('acme', '{\"plan\": 7}', 0)", [])
            .expect("insert");
        match store.get("acme").await {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("acme"), "{msg}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        match store.list().await {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("acme"), "{msg}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn rejects_bad_granularity_and_seq() {
        let (_dir, store) = open_temp();
        assert!(matches!(store.series(&sum_query("i"), 0, 10).await, Err(StoreError::Io(_))));
        assert!(matches!(store.write_flush(&batch("i", u64::MAX, vec![])).await, Err(StoreError::Io(_))));
    }

    #[tokio::test]
    async fn recovers_from_poisoned_mutex() {
        let (_dir, store) = open_temp();
        let conn = Arc::clone(&store.conn);
        let poisoned = std::thread::spawn(move || {
            let _guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            panic!("poison the store mutex");
        })
        .join();
        assert!(poisoned.is_err());
        assert!(store.conn.is_poisoned());
        store.write_flush(&batch("i", 1, vec![row("a", 0, 4)])).await.expect("flush after poison");
        assert_eq!(store.max_flush_seq("i").await.expect("max seq"), 1);
    }
}
