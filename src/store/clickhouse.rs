//! ClickHouse usage store: flushed minute rows in a table analysts query directly.
//!
//! Deployments with more than one instance, or whose analysts want SQL over the
//! usage, keep it in ClickHouse instead of the embedded SQLite file. This module
//! implements [`UsageStore`] over ClickHouse's HTTP interface (the official
//! `clickhouse` crate, RowBinary) and creates
//! `{database}.usage_minute` when it is missing: the public schema of
//! docs/api.md ("ClickHouse tables"). Entitlements are not kept here (Redis or SQLite keep them).
//! The shared scenarios of `super::suite` run against a real server.
//!
//! # Compatibility
//!
//! Written for, and tested against, ClickHouse 18.16 (Debian's package), so it
//! uses nothing newer: no `Nullable`, no `DateTime64`, no query parameters, no
//! transactions, no lightweight deletes. That server answers `compress=1` queries
//! with an empty body (and logs a Poco assertion), so answers come uncompressed;
//! insert bodies are LZ4-compressed (`decompress=1` works). Version 0.13 of the
//! crate is used: it is the newest within our `rust-version`, and it does not
//! validate row types
//! against the server's schema (which needs `RowBinaryWithNamesAndTypes`, absent
//! from 18.16), so [`ClickHouseStore::connect`] checks the columns itself: a
//! RowBinary type mismatch would otherwise be misread silently.
//!
//! # Exactly-once flushes without transactions
//!
//! ClickHouse has no transactions, but one `INSERT` of fewer than
//! `max_insert_block_size` rows into a MergeTree table *partition* becomes one
//! data part, which is committed whole or not at all. So:
//!
//! * the table has **no `PARTITION BY`** (one partition): an `INSERT` spanning two
//!   months would otherwise become one part per month, committed one by one, and a
//!   failure between them would store part of a flush (checked on 18.16: a block
//!   with rows in two months makes two parts);
//! * every row carries its flush's `instance_id`, `flush_seq` and `wal_seq`;
//! * [`UsageStore::write_flush`] first counts the flush's stored rows (see
//!   "Partial flushes" below): a retry after an ambiguous failure finds the flush
//!   stored and writes nothing; otherwise the rows go in one `INSERT` (at
//!   most [`MAX_FLUSH_ROWS`], well below `max_insert_block_size`, which the insert
//!   also sets explicitly so a server profile cannot lower it). Larger batches are
//!   refused rather than split, since a split flush could be half stored; the
//!   flusher never builds one that large. An empty flush writes nothing (there is
//!   no row to carry its sequence), so it does not advance
//!   [`UsageStore::max_flush_seq`] or [`UsageStore::wal_mark`]: harmless, as it
//!   held no usage (the WAL records it covers made no rows, so replaying them
//!   after a restart adds none).
//! * The check and the insert run under one in-process lock and in a spawned
//!   task: a caller that gives up (a timeout dropping the future, or the 60 s
//!   this module waits at most) neither cuts the request body short nor lets its
//!   retry check before the first insert is over. The check and the insert also
//!   carry the query id `meterd-flush:{db}:{instance}:{seq}`: ClickHouse
//!   refuses a second query with the id of a running one, so a retry (from this
//!   process or a restarted one) fails instead of duplicating while an earlier
//!   attempt is still being executed by the server.
//!
//! Partial flushes. Measured on 18.16: the server takes a request body that ends
//! early (client killed, connection cut) as complete. A flush under ~256 KiB
//! (roughly 1,500 rows) is one checksummed LZ4 frame, so a cut body is rejected;
//! a larger one is several frames, and a cut between two commits a prefix. So
//! every row also carries `flush_rows`, the size of its flush, and a flush counts
//! as stored only when that many of its rows are:
//!
//! * [`UsageStore::write_flush`] counts the flush's stored rows: all there, it is
//!   a no-op; none, it sends them all; some, it sends only the missing ones;
//! * [`UsageStore::max_flush_seq`], [`UsageStore::wal_mark`] and the
//!   `stored_seq` of queries count complete flushes only, so a partial flush's
//!   WAL records are replayed after a crash;
//! * [`UsageStore::recover`] (at start, before the replay) deletes partial
//!   flushes of the instance (`ALTER TABLE … DELETE`, waited for), so the replay
//!   stores their usage exactly once.
//!
//! Remaining window: if an earlier attempt's insert is still running on the server
//! when a retry counts the rows, the retry may send rows the earlier one is about
//! to commit. The shared query id makes the server refuse the retry while the
//! earlier query runs, which closes most of it.

//! # Consistent reads
//!
//! There are no read snapshots either, so `stored_seq` cannot be read "with" the
//! rows. Instead each query first reads `S`, the highest `flush_seq` of the
//! asking instance, and then reads the rows with
//! `(instance_id != asking OR flush_seq <= S)`. A flush of the asking instance
//! stored between the two reads is left out of the answer, so the caller, which
//! adds its in-memory epochs above `S`, counts it exactly once; without the filter
//! it would appear both in the rows and in the caller's epoch. Other instances'
//! rows are not filtered: the caller has no epochs of theirs.
//!
//! `max(flush_seq)` of an instance is not in the primary key, so asking it scans
//! those two columns of the whole table (75 ms of a 75 ms history query at 5.8M
//! rows, BENCHMARKS.md). Queries therefore ask it once per instance and process,
//! and from then on use what this process has seen complete: every flush
//! `write_flush` finds or makes complete raises it. That value is never above
//! the truth, and a lower `S` is still a correct split (the caller merges its
//! epochs above `S`, which are only dropped after `write_flush` returned).
//! [`UsageStore::max_flush_seq`] and [`UsageStore::wal_mark`] still scan.

use super::{
    Aggregate, DistinctValue, FlushBatch, Fold, GroupedPoint, LedgerKind, LedgerRow, LedgerStore, SeriesPoint, StoreError, Stored,
    UsageQuery, UsageRow, UsageStore,
};
use crate::wal::WalMark;
use ::clickhouse::{Client, Compression, Row};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// The table meterd writes, in the configured database.
pub const TABLE: &str = "usage_minute";

/// The most rows one flush may have: one `INSERT` must stay one block (one part).
pub const MAX_FLUSH_ROWS: usize = 500_000;

/// Sent with every insert, so a lower server-side default cannot split a flush.
const MAX_INSERT_BLOCK_SIZE: usize = 1_048_576;

/// How long one request may take before the call fails (and the flusher retries).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `usage_minute`. `value` holds raw units at the meter's precision (an integer:
/// a precision-2 meter stores 1.25 as 125). `properties` is the same JSON text as
/// in the SQLite store: an array of `[key, value]` pairs, `''` when none.
/// `DateTime('UTC')` displays in UTC whatever the server's time zone.
const CREATE_TABLE: &str = "(
    meter       String,
    customer    String,
    minute      DateTime('UTC'),
    properties  String,
    value       Int64,
    last_ts     Int64,
    instance_id String,
    flush_seq   UInt64,
    wal_seq     UInt64,
    wal_extras  String,
    flush_rows  UInt32
) ENGINE = MergeTree() ORDER BY (meter, customer, minute)";

/// The Stripe reporter's ledger (see [`LedgerStore`]). There are no unique keys
/// in ClickHouse, so a retried append may store a row twice: reads collapse rows
/// by `(identifier, kind)`, which makes the duplicate harmless.
pub const LEDGER_TABLE: &str = "stripe_ledger";

const CREATE_LEDGER: &str = "(
    meter              String,
    customer           String,
    period_start       Int64,
    n                  UInt32,
    identifier         String,
    kind               String,
    value              Int64,
    stripe_customer_id String,
    at                 Int64,
    fence              UInt64
) ENGINE = MergeTree() ORDER BY (meter, period_start, customer, n)";

/// Every column meterd reads or writes, with its type (`minute`: any `DateTime`).
const COLUMNS: [(&str, &str); 11] = [
    ("meter", "String"),
    ("customer", "String"),
    ("minute", "DateTime"),
    ("properties", "String"),
    ("value", "Int64"),
    ("last_ts", "Int64"),
    ("instance_id", "String"),
    ("flush_seq", "UInt64"),
    ("wal_seq", "UInt64"),
    ("wal_extras", "String"),
    ("flush_rows", "UInt32"),
];

/// Columns later versions added: created on a table made by an earlier one.
const ADDED_COLUMNS: [(&str, &str); 1] = [("wal_extras", "String AFTER wal_seq")];

/// Flushed usage in ClickHouse. Cloning shares the HTTP pool and the write lock.
#[derive(Clone)]
pub struct ClickHouseStore {
    /// Queries: uncompressed answers (see "Compatibility").
    client: Client,
    /// Inserts: LZ4-compressed bodies.
    insert_client: Client,
    database: String,
    /// `` `database`.usage_minute ``
    table: String,
    /// Held from the exactly-once check to the end of the insert.
    write_lock: Arc<Mutex<()>>,
    /// Per instance: the highest flush seen complete (see "Consistent reads").
    complete: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseStore").field("table", &self.table).finish_non_exhaustive()
    }
}

/// One row as inserted (RowBinary, in `COLUMNS` order).
#[derive(Debug, Row, Serialize)]
struct MinuteRow {
    meter: String,
    customer: String,
    /// Unix seconds: RowBinary's `DateTime`.
    minute: u32,
    properties: String,
    value: i64,
    last_ts: i64,
    instance_id: String,
    flush_seq: u64,
    wal_seq: u64,
    /// WAL ranges above `wal_seq` the flush covers ([`WalMark::extras_text`]).
    wal_extras: String,
    /// Rows in the whole flush: a flush is stored once this many rows of it are.
    flush_rows: u32,
}

/// The key of a stored row within its flush.
#[derive(Row, Deserialize, PartialEq, Eq, Hash)]
struct KeyRow {
    meter: String,
    customer: String,
    minute: u32,
    properties: String,
}

#[derive(Row, Deserialize)]
struct MarkRow {
    #[allow(dead_code)] // Selected to order by; only the mark is used.
    flush_seq: u64,
    upto: u64,
    extras: String,
}

#[derive(Row, Deserialize)]
struct AggregateRow {
    customer: String,
    value: i64,
    last_ts: i64,
}

#[derive(Row, Deserialize)]
struct PointRow {
    customer: String,
    start_ms: i64,
    value: i64,
    last_ts: i64,
}

/// Issue 25: one point of a grouped series (`has_group` 0: rows without the property).
#[derive(Row, Deserialize)]
struct GroupRow {
    customer: String,
    start_ms: i64,
    has_group: u8,
    group: String,
    value: i64,
    last_ts: i64,
}

/// Issue 25: one distinct value of a property in a bucket.
#[derive(Row, Deserialize)]
struct DistinctRow {
    customer: String,
    start_ms: i64,
    has_group: u8,
    group: String,
    value: String,
}

/// Issue 25: a ClickHouse string literal of an RE2 pattern matching the pair
/// `["key","value"]` in a row's `properties` (JSON as `serde_json` writes it),
/// the value's JSON-escaped text as the first group. ASCII punctuation of the
/// key is written as `\x{HH}`, so no `?` (a bind placeholder) or quote ends up
/// in the SQL text.
fn property_pattern(key: &str) -> String {
    let escaped = serde_json::to_string(key).unwrap_or_default();
    let inner = escaped.get(1..escaped.len().saturating_sub(1)).unwrap_or_default();
    let mut re = String::from(r"\x{5b}\x{22}");
    for ch in inner.chars() {
        if ch.is_ascii() && !ch.is_ascii_alphanumeric() {
            re.push_str(&format!("\\x{{{:02x}}}", ch as u32));
        } else {
            re.push(ch);
        }
    }
    re.push_str(r"\x{22},\x{22}(([^\x{22}\x{5c}]|\x{5c}.)*)\x{22}\x{5d}");
    // In the SQL string literal, each backslash is written twice.
    format!("'{}'", re.replace('\\', "\\\\"))
}

/// The value text a [`property_pattern`] captured, JSON-unescaped.
fn unescape(text: String) -> String {
    if !text.contains('\\') {
        return text;
    }
    serde_json::from_str::<String>(&format!("\"{text}\"")).unwrap_or(text)
}

/// One ledger row, as stored and read (RowBinary, in `CREATE_LEDGER` order).
#[derive(Debug, Row, Serialize, Deserialize)]
struct LedgerRecord {
    meter: String,
    customer: String,
    period_start: i64,
    n: u32,
    identifier: String,
    kind: String,
    value: i64,
    stripe_customer_id: String,
    at: i64,
    fence: u64,
}

#[derive(Row, Deserialize)]
pub(super) struct ColumnRow {
    pub(super) name: String,
    pub(super) ty: String,
}

/// Maps a client error to [`StoreError::Io`], naming the operation.
pub(super) fn io(op: &'static str) -> impl Fn(::clickhouse::error::Error) -> StoreError {
    move |e| classify(op, e)
}

/// Server exception codes that mean "this data is bad", not "try again":
/// CANNOT_PARSE_TEXT (6), CANNOT_PARSE_INPUT_ASSERTION_FAILED (27), TYPE_MISMATCH
/// (53), ARGUMENT_OUT_OF_BOUND (69), CANNOT_CONVERT_TYPE (70), INCORRECT_DATA
/// (117), VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE (321). Everything else (network,
/// timeouts, overload, a server restarting) is retried.
const POISON_CODES: [u32; 7] = [6, 27, 53, 69, 70, 117, 321];

/// Tells data the server refuses from failures worth retrying.
fn classify(op: &'static str, e: ::clickhouse::error::Error) -> StoreError {
    if let ::clickhouse::error::Error::BadResponse(message) = &e {
        if exception_code(message).is_some_and(|code| POISON_CODES.contains(&code)) {
            return StoreError::Rejected(format!("clickhouse {op}: {message}"));
        }
    }
    StoreError::Io(format!("clickhouse {op}: {e}"))
}

/// The `Code: N` of a ClickHouse exception text.
fn exception_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

/// Runs one request with [`REQUEST_TIMEOUT`].
pub(super) async fn timed<T>(op: &'static str, fut: impl Future<Output = Result<T, ::clickhouse::error::Error>>) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(result) => result.map_err(io(op)),
        Err(_) => Err(StoreError::Io(format!("clickhouse {op}: no answer within {REQUEST_TIMEOUT:?}"))),
    }
}

/// Database names are put into SQL text, so only plain identifiers are accepted.
fn check_database_name(database: &str) -> Result<(), StoreError> {
    let mut chars = database.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && database.len() <= 64;
    if plain {
        Ok(())
    } else {
        Err(StoreError::Io(format!("clickhouse connect: database name {database:?} must match [A-Za-z_][A-Za-z0-9_]{{0,63}}")))
    }
}

/// Checks the database name, then creates the database and `name` (defined by
/// `create`) when missing. Returns the query client (uncompressed answers, see
/// "Compatibility"), the insert client (LZ4 bodies) and the quoted table name.
pub(super) async fn open_table(url: &str, database: &str, name: &str, create: &str) -> Result<(Client, Client, String), StoreError> {
    const OP: &str = "connect";
    check_database_name(database)?;
    let client = Client::default().with_url(url).with_compression(Compression::None);
    let insert_client = client.clone().with_compression(Compression::Lz4);
    let table = format!("`{database}`.{name}");
    timed(OP, client.query(&format!("CREATE DATABASE IF NOT EXISTS `{database}`")).execute()).await?;
    timed(OP, client.query(&format!("CREATE TABLE IF NOT EXISTS {table} {create}")).execute()).await?;
    Ok((client, insert_client, table))
}

/// Fails unless `columns` (of `table`, from `system.columns`) has every column
/// of `want` with its type (`DateTime`: with or without a time zone). The crate
/// does not check RowBinary types against the server's, so a mismatch would
/// otherwise be misread silently.
pub(super) fn check_columns(table: &str, columns: &[ColumnRow], want: &[(&str, &str)]) -> Result<(), StoreError> {
    for &(name, ty) in want {
        let Some(col) = columns.iter().find(|c| c.name == name) else {
            return Err(StoreError::Io(format!("clickhouse connect: {table} has no column {name} ({ty})")));
        };
        let fits = if ty == "DateTime" { col.ty == "DateTime" || col.ty.starts_with("DateTime(") } else { col.ty == ty };
        if !fits {
            return Err(StoreError::Io(format!("clickhouse connect: column {name} of {table} is {}, expected {ty}", col.ty)));
        }
    }
    Ok(())
}

/// Ceiling of `a / b` for `b > 0`.
fn ceil_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b) + i64::from(a.rem_euclid(b) != 0)
}

/// The `minute` values (Unix seconds, inclusive) of `[from_ms, to_ms)`, or `None`
/// when no `DateTime` lies in it.
fn minute_range(from_ms: i64, to_ms: i64) -> Option<(u32, u32)> {
    // minute_s * 1000 >= from_ms  <=>  minute_s >= ceil(from_ms / 1000)
    // minute_s * 1000 <  to_ms    <=>  minute_s <= ceil(to_ms / 1000) - 1
    let lo = ceil_div(from_ms, 1000).max(0);
    let hi = (ceil_div(to_ms, 1000) - 1).min(i64::from(u32::MAX));
    if hi < lo {
        return None;
    }
    Some((u32::try_from(lo).ok()?, u32::try_from(hi).ok()?))
}

/// The select list folding `value` and `last_ts` of a group.
fn fold_columns(fold: Fold) -> &'static str {
    match fold {
        Fold::Sum => "sum(value), max(last_ts)",
        Fold::Max => "max(value), max(last_ts)",
        // The value of the row with the greatest last_ts; on a tie the greatest
        // value, so the answer does not depend on the order parts are read in.
        Fold::Latest => "argMax(value, tuple(last_ts, value)), max(last_ts)",
    }
}

fn encode_row(batch: &FlushBatch, row: &UsageRow) -> Result<MinuteRow, StoreError> {
    const OP: &str = "write_flush";
    let minute = if row.minute_ms % 1000 == 0 { u32::try_from(row.minute_ms / 1000).ok() } else { None };
    let Some(minute) = minute else {
        return Err(StoreError::Rejected(format!(
            "clickhouse {OP}: minute {} ms is not a storable DateTime (whole seconds, 1970..2106)",
            row.minute_ms
        )));
    };
    let properties = if row.properties.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&row.properties).map_err(|e| StoreError::Io(format!("clickhouse {OP}: encoding properties: {e}")))?
    };
    Ok(MinuteRow {
        meter: row.meter.clone(),
        customer: row.customer.clone(),
        minute,
        properties,
        value: row.value,
        last_ts: row.last_ts,
        instance_id: batch.instance_id.clone(),
        flush_seq: batch.seq,
        wal_seq: batch.wal_seq,
        wal_extras: WalMark { upto: batch.wal_seq, extras: batch.wal_extras.clone() }.extras_text(),
        flush_rows: u32::try_from(batch.rows.len()).unwrap_or(u32::MAX),
    })
}

impl ClickHouseStore {
    /// Connects to the HTTP interface at `url` (`http://host:8123`) and creates
    /// `database` and its `usage_minute` table when missing. An existing table
    /// must have meterd's columns with their types (extra columns are fine).
    pub async fn connect(url: &str, database: &str) -> Result<ClickHouseStore, StoreError> {
        const OP: &str = "connect";
        let (client, insert_client, table) = open_table(url, database, TABLE, CREATE_TABLE).await?;
        timed(OP, client.query(&format!("CREATE TABLE IF NOT EXISTS `{database}`.{LEDGER_TABLE} {CREATE_LEDGER}")).execute()).await?;
        let store = ClickHouseStore {
            client,
            insert_client,
            database: database.to_owned(),
            table,
            write_lock: Arc::new(Mutex::new(())),
            complete: Default::default(),
        };
        store.check_schema().await?;
        Ok(store)
    }

    /// The database this store writes to.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Fails unless the table has every column meterd uses, with its type.
    async fn check_schema(&self) -> Result<(), StoreError> {
        const OP: &str = "connect";
        let query = self
            .client
            .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
            .bind(self.database.as_str())
            .bind(TABLE);
        let mut columns: Vec<ColumnRow> = timed(OP, query.fetch_all()).await?;
        for (name, ddl) in ADDED_COLUMNS {
            if !columns.iter().any(|c| c.name == name) {
                tracing::info!(table = %self.table, column = name, "adding a column this version needs");
                timed(OP, self.client.query(&format!("ALTER TABLE {} ADD COLUMN {name} {ddl}", self.table)).execute()).await?;
                let ty = ddl.split_whitespace().next().unwrap_or_default().to_string();
                columns.push(ColumnRow { name: name.to_string(), ty });
            }
        }
        check_columns(&self.table, &columns, &COLUMNS)
    }

    /// The highest `column` (`flush_seq` or `wal_seq`) of the *complete* flushes
    /// of `instance_id` (all `flush_rows` rows stored), 0 when none. A flush cut
    /// short mid-body is not counted: its rows are re-sent or removed.
    async fn max_of(&self, column: &str, instance_id: &str, op: &'static str) -> Result<u64, StoreError> {
        let sql = format!(
            "SELECT max(s) FROM (SELECT any({column}) AS s FROM {} WHERE instance_id = ? \
             GROUP BY flush_seq HAVING count() >= any(flush_rows))",
            self.table
        );
        let rows: Vec<u64> = timed(op, self.client.query(&sql).bind(instance_id).fetch_all()).await?;
        Ok(rows.first().copied().unwrap_or(0))
    }

    /// The body of [`UsageStore::write_flush`], run under the write lock.
    async fn write_rows(
        check: ::clickhouse::query::Query,
        keys: ::clickhouse::query::Query,
        insert: ::clickhouse::insert::Insert<MinuteRow>,
        rows: Vec<MinuteRow>,
        batch_wal: u64,
        flush_name: &str,
    ) -> Result<(), StoreError> {
        const OP: &str = "write_flush";
        // fetch_all reads the answer to its end, so the check is over on the
        // server (and its query id free again) before the insert starts.
        // Complete means as many rows as the *stored* attempt announced: a
        // flush id is written once, whatever a later call holds.
        let counts: Vec<(u64, u32, u64)> = timed(OP, check.fetch_all()).await?;
        let (stored, announced, stored_wal) = counts.first().copied().unwrap_or((0, 0, 0));
        if stored > 0 && stored_wal != batch_wal {
            // Another flush under this number: never take it for this one.
            return Err(StoreError::Corrupt(format!(
                "clickhouse {OP}: flush {flush_name} is already stored with a different WAL watermark \
                 ({stored_wal}, this one {batch_wal}); refusing to mix them"
            )));
        }
        if stored > 0 && stored >= u64::from(announced) {
            return Ok(());
        }
        let present: std::collections::HashSet<KeyRow> =
            if stored == 0 { Default::default() } else { timed(OP, keys.fetch_all::<KeyRow>()).await?.into_iter().collect() };
        if stored > 0 {
            tracing::warn!(
                flush_seq = rows[0].flush_seq,
                stored,
                total = rows.len(),
                "a flush was stored in part; sending the missing rows"
            );
        }
        let mut insert = insert;
        for row in &rows {
            let key =
                KeyRow { meter: row.meter.clone(), customer: row.customer.clone(), minute: row.minute, properties: row.properties.clone() };
            if !present.contains(&key) {
                insert.write(row).await.map_err(io(OP))?;
            }
        }
        insert.end().await.map_err(io(OP))
    }

    /// Records that flush `seq` of `instance_id` is complete in the table.
    fn saw_complete(complete: &std::sync::Mutex<std::collections::HashMap<String, u64>>, instance_id: &str, seq: u64) {
        let mut map = complete.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(instance_id) {
            Some(known) => *known = (*known).max(seq),
            None => {
                map.insert(instance_id.to_string(), seq);
            }
        }
    }

    /// `S` for a consistent read (see "Consistent reads"): from memory once known.
    async fn stored_seq(&self, instance_id: &str, op: &'static str) -> Result<u64, StoreError> {
        if let Some(&known) = self.complete.lock().unwrap_or_else(|p| p.into_inner()).get(instance_id) {
            return Ok(known);
        }
        let scanned = self.max_of("flush_seq", instance_id, op).await?;
        Self::saw_complete(&self.complete, instance_id, scanned);
        Ok(scanned)
    }

    /// `SELECT {select} ... WHERE <the query's rows> {tail}`, leaving out the
    /// asking instance's rows above `stored_seq` (see the module docs).
    fn rows_query(&self, select: &str, tail: &str, q: &UsageQuery, (lo, hi): (u32, u32), stored_seq: u64) -> ::clickhouse::query::Query {
        let customer_clause = if q.customer.is_some() { " AND customer = ?" } else { "" };
        let own_clause = if q.own_only { " AND instance_id = ?" } else { "" };
        let sql = format!(
            "SELECT {select} FROM {} \
             WHERE meter = ? AND minute >= toDateTime(?) AND minute <= toDateTime(?){customer_clause}{own_clause} \
             AND (instance_id != ? OR flush_seq <= ?) {tail}",
            self.table
        );
        let mut query = self.client.query(&sql).bind(q.meter.as_str()).bind(lo).bind(hi);
        if let Some(customer) = &q.customer {
            query = query.bind(customer.as_str());
        }
        if q.own_only {
            query = query.bind(q.instance_id.as_str());
        }
        query.bind(q.instance_id.as_str()).bind(stored_seq)
    }
}

#[async_trait]
impl UsageStore for ClickHouseStore {
    async fn write_flush(&self, batch: &FlushBatch) -> Result<(), StoreError> {
        const OP: &str = "write_flush";
        if batch.rows.is_empty() {
            return Ok(());
        }
        if batch.rows.len() > MAX_FLUSH_ROWS {
            return Err(StoreError::Io(format!(
                "clickhouse {OP}: flush {}#{} has {} rows, more than the {MAX_FLUSH_ROWS} one INSERT stores atomically",
                batch.instance_id,
                batch.seq,
                batch.rows.len()
            )));
        }
        let rows = batch.rows.iter().map(|row| encode_row(batch, row)).collect::<Result<Vec<_>, _>>()?;
        let query_id = format!("meterd-flush:{}:{}:{}", self.database, batch.instance_id, batch.seq);
        // How much of this flush is stored: all of it (a retry after an ambiguous
        // failure: nothing to do), none (send it all), or a part (a body cut
        // mid-stream, which 18.16 keeps: send only the missing rows).
        let count_sql =
            format!("SELECT count(), any(flush_rows), any(wal_seq) FROM {} WHERE instance_id = ? AND flush_seq = ?", self.table);
        let check =
            self.client.query(&count_sql).bind(batch.instance_id.as_str()).bind(batch.seq).with_option("query_id", query_id.as_str());
        let keys_sql = format!(
            "SELECT meter, customer, toUInt32(minute) AS minute, properties FROM {} WHERE instance_id = ? AND flush_seq = ?",
            self.table
        );
        let keys = self.client.query(&keys_sql).bind(batch.instance_id.as_str()).bind(batch.seq);
        let insert = self
            .insert_client
            .insert::<MinuteRow>(&self.table)
            .map_err(io(OP))?
            .with_option("query_id", query_id)
            .with_option("max_insert_block_size", MAX_INSERT_BLOCK_SIZE.to_string());
        // No client-side timeouts on the insert: one that fires aborts the request
        // body, and 18.16 would store the part already sent (see the module docs).
        // The caller's wait is bounded below instead; the attempt goes on.

        let Ok(guard) = tokio::time::timeout(REQUEST_TIMEOUT, Arc::clone(&self.write_lock).lock_owned()).await else {
            return Err(StoreError::Io(format!("clickhouse {OP}: an earlier flush is still being written after {REQUEST_TIMEOUT:?}")));
        };
        let (batch_wal, flush_name) = (batch.wal_seq, format!("{}#{}", batch.instance_id, batch.seq));
        let (complete, instance, seq) = (self.complete.clone(), batch.instance_id.clone(), batch.seq);
        let task = tokio::spawn(async move {
            let _guard = guard;
            let result = Self::write_rows(check, keys, insert, rows, batch_wal, &flush_name).await;
            if result.is_ok() {
                Self::saw_complete(&complete, &instance, seq);
            }
            result
        });
        match tokio::time::timeout(REQUEST_TIMEOUT, task).await {
            Ok(joined) => joined.map_err(|e| StoreError::Task(format!("clickhouse {OP}: {e}")))?,
            // Dropping the handle detaches the task: the insert runs to its end,
            // and the retry (which waits for the lock) then finds it stored.
            Err(_) => Err(StoreError::Io(format!(
                "clickhouse {OP}: flush {}#{} not acknowledged within {REQUEST_TIMEOUT:?}; it is still being written",
                batch.instance_id, batch.seq
            ))),
        }
    }

    async fn recover(&self, instance_id: &str) -> Result<u64, StoreError> {
        const OP: &str = "recover";
        // A flush sent by this instance before it was killed may still be
        // running on the server (the body arrived, the part is not committed
        // yet). Wait for it: otherwise it could commit after the sequence
        // numbers and the replay floor below were read, and a new flush under
        // the same number would look "already stored".
        let running = "SELECT count() FROM system.processes WHERE startsWith(query_id, ?)";
        let prefix = format!("meterd-flush:{}:{instance_id}:", self.database);
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let left: Vec<u64> = timed(OP, self.client.query(running).bind(prefix.as_str()).fetch_all()).await?;
            if left.first().copied().unwrap_or(0) == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(StoreError::Io(format!(
                    "clickhouse {OP}: flushes of an earlier run of this instance were still running after {REQUEST_TIMEOUT:?}"
                )));
            }
            tracing::info!(running = left.first().copied().unwrap_or(0), "waiting for flushes of the previous run to finish on ClickHouse");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Flushes of this instance stored in part (a body cut mid-stream, then the
        // process died): remove them, so that the WAL replay, which starts above
        // the complete flushes, stores their usage once.
        let sql = format!("SELECT flush_seq FROM {} WHERE instance_id = ? GROUP BY flush_seq HAVING count() < any(flush_rows)", self.table);
        let partial: Vec<u64> = timed(OP, self.client.query(&sql).bind(instance_id).fetch_all()).await?;
        if partial.is_empty() {
            return Ok(0);
        }
        let list = partial.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        tracing::warn!(flushes = %list, "removing flushes stored in part before the WAL replays them");
        let delete = format!("ALTER TABLE {} DELETE WHERE instance_id = ? AND flush_seq IN ({list})", self.table);
        timed(OP, self.client.query(&delete).bind(instance_id).execute()).await?;
        // Mutations run in the background: wait until this one is done.
        let pending = "SELECT count() FROM system.mutations WHERE database = ? AND table = ? AND is_done = 0";
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let left: Vec<u64> = timed(OP, self.client.query(pending).bind(self.database.as_str()).bind(TABLE).fetch_all()).await?;
            if left.first().copied().unwrap_or(0) == 0 {
                return Ok(partial.len() as u64);
            }
            if std::time::Instant::now() > deadline {
                return Err(StoreError::Io(format!(
                    "clickhouse {OP}: deleting partial flushes {list} did not finish in {REQUEST_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn max_flush_seq(&self, instance_id: &str) -> Result<u64, StoreError> {
        self.max_of("flush_seq", instance_id, "max_flush_seq").await
    }

    fn unstorable(&self, row: &UsageRow) -> Option<String> {
        let fits = row.minute_ms % 1000 == 0 && u32::try_from(row.minute_ms / 1000).is_ok();
        (!fits).then(|| format!("minute {} ms is not a storable DateTime (whole seconds, 1970..2106)", row.minute_ms))
    }

    async fn wal_mark(&self, instance_id: &str) -> Result<WalMark, StoreError> {
        const OP: &str = "wal_mark";
        let sql = format!(
            "SELECT flush_seq, any(wal_seq) AS upto, any(wal_extras) AS extras FROM {} WHERE instance_id = ? \
             GROUP BY flush_seq HAVING count() >= any(flush_rows) ORDER BY flush_seq DESC LIMIT 1",
            self.table
        );
        let rows: Vec<MarkRow> = timed(OP, self.client.query(&sql).bind(instance_id).fetch_all()).await?;
        let Some(latest) = rows.into_iter().next() else {
            return Ok(WalMark::default());
        };
        let extras = WalMark::parse_extras(&latest.extras).map_err(|e| StoreError::Corrupt(format!("clickhouse {OP}: {e}")))?;
        Ok(WalMark { upto: latest.upto, extras })
    }

    async fn aggregate(&self, query: &UsageQuery) -> Result<Stored<Vec<Aggregate>>, StoreError> {
        const OP: &str = "aggregate";
        // Before the rows: see "Consistent reads" in the module docs.
        let stored_seq = self.stored_seq(&query.instance_id, OP).await?;
        let Some(range) = minute_range(query.from_ms, query.to_ms) else {
            return Ok(Stored { data: Vec::new(), stored_seq });
        };
        let select = format!("customer, {}", fold_columns(query.fold));
        let rows: Vec<AggregateRow> =
            timed(OP, self.rows_query(&select, "GROUP BY customer ORDER BY customer", query, range, stored_seq).fetch_all()).await?;
        let data = rows.into_iter().map(|r| Aggregate { customer: r.customer, value: r.value, last_ts: r.last_ts }).collect();
        Ok(Stored { data, stored_seq })
    }

    async fn series(&self, query: &UsageQuery, granularity_ms: i64, limit: usize) -> Result<Stored<Vec<SeriesPoint>>, StoreError> {
        const OP: &str = "series";
        if granularity_ms <= 0 {
            return Err(StoreError::Io(format!("clickhouse {OP}: granularity must be positive, got {granularity_ms} ms")));
        }
        let stored_seq = self.stored_seq(&query.instance_id, OP).await?;
        let Some(range) = minute_range(query.from_ms, query.to_ms) else {
            return Ok(Stored { data: Vec::new(), stored_seq });
        };
        // minute >= 0, so intDiv floors and buckets align to the epoch. The
        // granularity and limit are integers, formatted in rather than bound.
        let select = format!(
            "customer, toInt64(intDiv(toInt64(toUInt32(minute)) * 1000, {granularity_ms}) * {granularity_ms}) AS bucket_start, {}",
            fold_columns(query.fold)
        );
        let tail = format!("GROUP BY customer, bucket_start ORDER BY customer, bucket_start LIMIT {limit}");
        let rows: Vec<PointRow> = timed(OP, self.rows_query(&select, &tail, query, range, stored_seq).fetch_all()).await?;
        let data = rows
            .into_iter()
            .map(|r| SeriesPoint { customer: r.customer, start_ms: r.start_ms, value: r.value, last_ts: r.last_ts })
            .collect();
        Ok(Stored { data, stored_seq })
    }

    async fn series_grouped(
        &self,
        query: &UsageQuery,
        granularity_ms: i64,
        group_by: &str,
        limit: usize,
    ) -> Result<Stored<Vec<GroupedPoint>>, StoreError> {
        const OP: &str = "series_grouped";
        if granularity_ms <= 0 {
            return Err(StoreError::Io(format!("clickhouse {OP}: granularity must be positive, got {granularity_ms} ms")));
        }
        let stored_seq = self.stored_seq(&query.instance_id, OP).await?;
        let Some(range) = minute_range(query.from_ms, query.to_ms) else {
            return Ok(Stored { data: Vec::new(), stored_seq });
        };
        let pattern = property_pattern(group_by);
        let select = format!(
            "customer, toInt64(intDiv(toInt64(toUInt32(minute)) * 1000, {granularity_ms}) * {granularity_ms}) AS bucket_start, \
             match(properties, {pattern}) AS has_group, extract(properties, {pattern}) AS grp, {}",
            fold_columns(query.fold)
        );
        let tail = format!("GROUP BY customer, bucket_start, has_group, grp ORDER BY customer, bucket_start, has_group, grp LIMIT {limit}");
        let rows: Vec<GroupRow> = timed(OP, self.rows_query(&select, &tail, query, range, stored_seq).fetch_all()).await?;
        let data = rows
            .into_iter()
            .map(|r| GroupedPoint {
                customer: r.customer,
                start_ms: r.start_ms,
                group: (r.has_group != 0).then(|| unescape(r.group)),
                value: r.value,
                last_ts: r.last_ts,
            })
            .collect();
        Ok(Stored { data, stored_seq })
    }

    async fn distinct_values(
        &self,
        query: &UsageQuery,
        granularity_ms: i64,
        property: &str,
        group_by: Option<&str>,
        limit: usize,
    ) -> Result<Stored<Vec<DistinctValue>>, StoreError> {
        const OP: &str = "distinct_values";
        if granularity_ms <= 0 {
            return Err(StoreError::Io(format!("clickhouse {OP}: granularity must be positive, got {granularity_ms} ms")));
        }
        let stored_seq = self.stored_seq(&query.instance_id, OP).await?;
        let Some(range) = minute_range(query.from_ms, query.to_ms) else {
            return Ok(Stored { data: Vec::new(), stored_seq });
        };
        let from = query.from_ms;
        let value = property_pattern(property);
        let group = match group_by {
            Some(g) => {
                let p = property_pattern(g);
                format!("match(properties, {p}) AS has_group, extract(properties, {p}) AS grp")
            }
            None => "toUInt8(0) AS has_group, '' AS grp".to_string(),
        };
        let select = format!(
            "DISTINCT customer, toInt64(intDiv(toInt64(toUInt32(minute)) * 1000 - {from}, {granularity_ms}) * {granularity_ms} + {from}) \
             AS bucket_start, {group}, extract(properties, {value}) AS val"
        );
        let tail = format!("AND match(properties, {value}) ORDER BY customer, bucket_start, has_group, grp, val LIMIT {limit}");
        let rows: Vec<DistinctRow> = timed(OP, self.rows_query(&select, &tail, query, range, stored_seq).fetch_all()).await?;
        let data = rows
            .into_iter()
            .map(|r| DistinctValue {
                customer: r.customer,
                start_ms: r.start_ms,
                group: (r.has_group != 0).then(|| unescape(r.group)),
                value: unescape(r.value),
            })
            .collect();
        Ok(Stored { data, stored_seq })
    }
}

#[async_trait]
impl LedgerStore for ClickHouseStore {
    async fn append_ledger(&self, rows: &[LedgerRow], fence: u64) -> Result<(), StoreError> {
        const OP: &str = "append_ledger";
        if rows.is_empty() {
            return Ok(());
        }
        let table = format!("`{}`.{LEDGER_TABLE}", self.database);
        // No transactions: the check and the insert are two requests. A holder
        // superseded between them may still write once; its rows carry its fence.
        if fence > 0 {
            let stored: Vec<u64> = timed(OP, self.client.query(&format!("SELECT max(fence) FROM {table}")).fetch_all()).await?;
            let stored = stored.first().copied().unwrap_or(0);
            if stored > fence {
                return Err(StoreError::Fenced(format!("the ledger holds fence {stored}, newer than this writer's {fence}")));
            }
        }
        let mut insert = self.insert_client.insert::<LedgerRecord>(&table).map_err(io(OP))?;
        for r in rows {
            let record = LedgerRecord {
                meter: r.meter.clone(),
                customer: r.customer.clone(),
                period_start: r.period_start_ms,
                n: r.n,
                identifier: r.identifier.clone(),
                kind: r.kind.as_str().to_owned(),
                value: r.value,
                stripe_customer_id: r.stripe_customer_id.clone(),
                at: r.at_ms,
                fence: r.fence,
            };
            insert.write(&record).await.map_err(io(OP))?;
        }
        timed(OP, insert.end()).await
    }

    async fn ledger_rows(&self, meter: &str, from_ms: i64, to_ms: i64) -> Result<Vec<LedgerRow>, StoreError> {
        const OP: &str = "ledger_rows";
        // Collapse rows a retried append stored twice; the first write's time counts.
        let sql = format!(
            "SELECT meter, customer, period_start, n, identifier, kind, any(value), any(stripe_customer_id), min(at), max(fence) \
             FROM `{}`.{LEDGER_TABLE} WHERE meter = ? AND period_start >= ? AND period_start < ? \
             GROUP BY meter, customer, period_start, n, identifier, kind ORDER BY customer, period_start, n, kind",
            self.database
        );
        let records: Vec<LedgerRecord> = timed(OP, self.client.query(&sql).bind(meter).bind(from_ms).bind(to_ms).fetch_all()).await?;
        records
            .into_iter()
            .map(|r| {
                let kind = LedgerKind::parse(&r.kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("clickhouse {OP}: unknown ledger kind {:?}", r.kind)))?;
                Ok(LedgerRow {
                    meter: r.meter,
                    customer: r.customer,
                    period_start_ms: r.period_start,
                    n: r.n,
                    identifier: r.identifier,
                    kind,
                    value: r.value,
                    stripe_customer_id: r.stripe_customer_id,
                    at_ms: r.at,
                    fence: r.fence,
                })
            })
            .collect()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::suite::require::{self, need, Need};
    use super::super::suite::{self, flush, query, row, MINUTE, T0};
    use super::*;

    #[test]
    fn data_errors_are_poison_and_the_rest_is_retried() {
        let bad = ::clickhouse::error::Error::BadResponse("Code: 53, e.displayText() = DB::Exception: Type mismatch".into());
        assert!(matches!(classify("t", bad), StoreError::Rejected(_)));
        let busy =
            ::clickhouse::error::Error::BadResponse("Code: 202, e.displayText() = DB::Exception: Too many simultaneous queries".into());
        assert!(matches!(classify("t", busy), StoreError::Io(_)));
        assert!(matches!(classify("t", ::clickhouse::error::Error::TimedOut), StoreError::Io(_)));
        assert_eq!(exception_code("Code: 321, e.displayText()"), Some(321));
        assert_eq!(exception_code("no code here"), None);
    }
    use std::time::{SystemTime, UNIX_EPOCH};

    /// A database name no other test or run uses.
    pub(in crate::store) fn unique_database(tag: &str) -> String {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        format!("meterd_test_{}_{nanos}_{tag}", std::process::id())
    }

    async fn open(url: &str, tag: &str) -> ClickHouseStore {
        let database = unique_database(tag);
        match ClickHouseStore::connect(url, &database).await {
            Ok(store) => store,
            Err(e) => panic!("connect to {url}, database {database}: {e}"),
        }
    }

    /// A store on a database of its own, dropped when the test is done.
    struct Database(ClickHouseStore);

    impl suite::Fixture for Database {
        type Store = ClickHouseStore;

        fn store(&self) -> &ClickHouseStore {
            &self.0
        }

        async fn finish(self) {
            drop_database(&self.0).await;
        }
    }

    async fn open_database(tag: &str) -> Need<Database> {
        let url = require::clickhouse_url()?;
        Ok(Database(open(&url, tag).await))
    }

    suite::store_suite!(open_database; usage, ledger);

    async fn sql(store: &ClickHouseStore, sql: &str) {
        if let Err(e) = store.client.query(sql).execute().await {
            panic!("{sql}: {e}");
        }
    }

    async fn drop_database(store: &ClickHouseStore) {
        sql(store, &format!("DROP DATABASE IF EXISTS `{}`", store.database)).await;
    }

    async fn scalar(store: &ClickHouseStore, sql: &str) -> u64 {
        match store.client.query(sql).fetch_all::<u64>().await {
            Ok(rows) => rows.first().copied().unwrap_or_else(|| panic!("{sql}: no row")),
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    async fn rows_of(store: &ClickHouseStore, instance_id: &str, seq: u64) -> u64 {
        scalar(store, &format!("SELECT count() FROM {} WHERE instance_id = '{instance_id}' AND flush_seq = {seq}", store.table)).await
    }

    /// Stores only the first `keep` rows of `batch`, as a body cut mid-stream
    /// leaves them on 18.16.
    async fn store_part(store: &ClickHouseStore, batch: &FlushBatch, keep: usize) {
        let mut insert = store.insert_client.insert::<MinuteRow>(&store.table).unwrap_or_else(|e| panic!("insert: {e}"));
        for r in batch.rows.iter().take(keep) {
            let row = encode_row(batch, r).unwrap_or_else(|e| panic!("encode: {e}"));
            insert.write(&row).await.unwrap_or_else(|e| panic!("write: {e}"));
        }
        insert.end().await.unwrap_or_else(|e| panic!("end: {e}"));
    }

    fn five_rows(inst: &str, seq: u64) -> FlushBatch {
        flush(inst, seq, (0..5).map(|i| row("p.m", &format!("p-c{i}"), T0 + i * MINUTE, &[], 10 + i, T0)).collect())
    }

    #[tokio::test]
    async fn partial_flush_is_completed_by_the_retry() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "partial").await;
        let batch = five_rows("p-inst", 1);
        store_part(&store, &batch, 2).await;
        // A flush stored in part is not stored: it does not count as the highest.
        assert_eq!(store.max_flush_seq("p-inst").await.ok(), Some(0));
        assert_eq!(store.wal_mark("p-inst").await.ok().map(|m| m.upto), Some(0));
        // The retry sends only the three missing rows.
        store.write_flush(&batch).await.unwrap_or_else(|e| panic!("retry: {e}"));
        assert_eq!(rows_of(&store, "p-inst", 1).await, 5);
        let total = scalar(&store, &format!("SELECT sum(value) FROM {} WHERE instance_id = 'p-inst'", store.table)).await;
        assert_eq!(total, 10 + 11 + 12 + 13 + 14);
        assert_eq!(store.max_flush_seq("p-inst").await.ok(), Some(1));
        assert_eq!(store.wal_mark("p-inst").await.ok().map(|m| m.upto), Some(10));
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn recover_removes_partial_flushes() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "recover").await;
        store.write_flush(&five_rows("r-inst", 1)).await.unwrap_or_else(|e| panic!("flush 1: {e}"));
        store_part(&store, &five_rows("r-inst", 2), 3).await;
        store_part(&store, &five_rows("other", 7), 1).await;
        assert_eq!(store.max_flush_seq("r-inst").await.ok(), Some(1));
        assert_eq!(store.wal_mark("r-inst").await.ok().map(|m| m.upto), Some(10), "the replay floor ignores the partial flush");
        assert_eq!(store.recover("r-inst").await.ok(), Some(1));
        assert_eq!(rows_of(&store, "r-inst", 2).await, 0, "the partial flush is gone");
        assert_eq!(rows_of(&store, "r-inst", 1).await, 5, "the complete one stays");
        assert_eq!(rows_of(&store, "other", 7).await, 1, "another instance's rows are its own business");
        assert_eq!(store.recover("r-inst").await.ok(), Some(0));
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn a_ledger_append_stored_twice_reads_as_one() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "ledger").await;
        suite::ledger(&store, "t6").await;
        // A retried append stored twice (no unique keys here) reads as one row.
        let rows = store.ledger_rows("t6.tokens", T0, T0 + suite::HOUR).await.unwrap_or_else(|e| panic!("{e}"));
        store.append_ledger(&rows, 0).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.ledger_rows("t6.tokens", T0, T0 + suite::HOUR).await.ok(), Some(rows));
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn a_restarted_instance_sees_the_database() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "restart").await;
        suite::duplicate_flush(&store, "s2").await;
        // A second store on the same database (a restarted instance) sees it all.
        let again = match ClickHouseStore::connect(&url, &store.database).await {
            Ok(s) => s,
            Err(e) => panic!("reconnect: {e}"),
        };
        assert_eq!(again.max_flush_seq("s2-a").await.expect("max seq"), 4);
        suite::sum_aggregate(&again, "s8").await;
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn retried_flush_is_stored_once() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "retry").await;
        let meter = "r.api_calls";
        let batch =
            flush("r-inst", 1, vec![row(meter, "r-c1", T0, &[("region", "eu")], 5, T0 + 1), row(meter, "r-c2", T0, &[], 7, T0 + 2)]);
        store.write_flush(&batch).await.expect("first attempt");
        // The reply was lost, say: the flusher writes the same flush again.
        store.write_flush(&batch).await.expect("retry");
        assert_eq!(rows_of(&store, "r-inst", 1).await, 2, "rows stored once");

        // An attempt abandoned by its caller (a timeout dropping the future) still
        // runs to its end; the retry then finds it stored.
        let second = flush("r-inst", 2, vec![row(meter, "r-c1", T0 + MINUTE, &[], 11, T0 + MINUTE + 1)]);
        let abandoned = tokio::time::timeout(Duration::ZERO, store.write_flush(&second)).await;
        assert!(abandoned.is_err(), "the first attempt should be cut off");
        store.write_flush(&second).await.expect("retry after abandon");
        store.write_flush(&second).await.expect("retry again");
        assert_eq!(rows_of(&store, "r-inst", 2).await, 1, "abandoned + retried flush stored once");

        let q = query("r-inst", meter, Fold::Sum, T0, T0 + 2 * MINUTE, None);
        let got = store.aggregate(&q).await.expect("aggregate");
        assert_eq!(
            got,
            Stored {
                data: vec![
                    Aggregate { customer: "r-c1".to_owned(), value: 16, last_ts: T0 + MINUTE + 1 },
                    Aggregate { customer: "r-c2".to_owned(), value: 7, last_ts: T0 + 2 },
                ],
                stored_seq: 2,
            }
        );
        assert_eq!(store.wal_mark("r-inst").await.expect("wal seq").upto, 20);

        // Properties are stored as the SQLite store stores them.
        let props = match store
            .client
            .query(&format!("SELECT properties FROM {} WHERE customer = ? ORDER BY minute", store.table))
            .bind("r-c1")
            .fetch_all::<String>()
            .await
        {
            Ok(p) => p,
            Err(e) => panic!("properties: {e}"),
        };
        assert_eq!(props, vec![r#"[["region","eu"]]"#.to_owned(), String::new()]);
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn schema_has_contract_columns() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "schema").await;
        let columns = match store
            .client
            .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
            .bind(store.database.as_str())
            .bind(TABLE)
            .fetch_all::<ColumnRow>()
            .await
        {
            // 18.16 has no `position` column; sort to compare.
            Ok(c) => {
                let mut c = c.into_iter().map(|c| (c.name, c.ty)).collect::<Vec<_>>();
                c.sort();
                c
            }
            Err(e) => panic!("system.columns: {e}"),
        };
        let mut expected: Vec<(String, String)> = [
            ("meter", "String"),
            ("customer", "String"),
            ("minute", "DateTime('UTC')"),
            ("properties", "String"),
            ("value", "Int64"),
            ("last_ts", "Int64"),
            ("instance_id", "String"),
            ("flush_seq", "UInt64"),
            ("wal_seq", "UInt64"),
            ("wal_extras", "String"),
            ("flush_rows", "UInt32"),
        ]
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
        expected.sort();
        assert_eq!(columns, expected);
        let engine = match store
            .client
            .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
            .bind(store.database.as_str())
            .bind(TABLE)
            .fetch_all::<String>()
            .await
        {
            Ok(e) => e,
            Err(e) => panic!("system.tables: {e}"),
        };
        assert_eq!(engine, vec!["MergeTree".to_owned()]);

        // A flush spanning a month boundary is one part: committed whole.
        let jan31 = 19_753 * suite::DAY + 23 * suite::HOUR + 59 * MINUTE; // 2024-01-31T23:59Z
        let batch =
            flush("p-inst", 1, vec![row("p.m", "p-c", jan31, &[], 1, jan31), row("p.m", "p-c", jan31 + MINUTE, &[], 2, jan31 + MINUTE)]);
        store.write_flush(&batch).await.expect("flush across months");
        let parts = scalar(
            &store,
            &format!("SELECT count() FROM system.parts WHERE database = '{}' AND table = '{TABLE}' AND active", store.database),
        )
        .await;
        assert_eq!(parts, 1, "one INSERT, one part");

        // Connecting again keeps the table; the values are the analysts' sum.
        let again = ClickHouseStore::connect(&url, &store.database).await.expect("reconnect");
        let total = scalar(&again, &format!("SELECT toUInt64(sum(value)) FROM {} WHERE meter = 'p.m'", again.table)).await;
        assert_eq!(total, 3);
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn rejects_wrong_schema_and_bad_names() {
        let url = need!(require::clickhouse_url());
        assert!(matches!(ClickHouseStore::connect(&url, "bad-name; DROP").await, Err(StoreError::Io(_))));
        assert!(matches!(ClickHouseStore::connect(&url, "").await, Err(StoreError::Io(_))));
        let store = open(&url, "wrong").await;
        let other = unique_database("wrong2");
        sql(&store, &format!("CREATE DATABASE `{other}`")).await;
        // As an analyst might have made it: value Float64.
        let columns = "meter String, customer String, minute DateTime, properties String, value Float64, \
                       last_ts Int64, instance_id String, flush_seq UInt64, wal_seq UInt64";
        sql(&store, &format!("CREATE TABLE `{other}`.{TABLE} ({columns}) ENGINE = MergeTree() ORDER BY meter")).await;
        match ClickHouseStore::connect(&url, &other).await {
            Err(StoreError::Io(msg)) => assert!(msg.contains("value") && msg.contains("Float64"), "{msg}"),
            other => panic!("expected a schema error, got {other:?}"),
        }
        sql(&store, &format!("DROP DATABASE `{other}`")).await;
        drop_database(&store).await;
    }

    #[tokio::test]
    async fn rejects_unstorable_batches() {
        let url = need!(require::clickhouse_url());
        let store = open(&url, "reject").await;
        let q = query("x-inst", "x.m", Fold::Sum, 0, i64::MAX, None);
        assert!(matches!(store.series(&q, 0, 10).await, Err(StoreError::Io(_))));
        // Not whole seconds, before 1970, after 2106: nothing is written.
        for minute_ms in [T0 + 1, -MINUTE, (i64::from(u32::MAX) + 1) * 1000] {
            let bad = flush("x-inst", 1, vec![row("x.m", "x-c", T0, &[], 1, T0), row("x.m", "x-c", minute_ms, &[], 1, T0)]);
            assert!(store.unstorable(&bad.rows[1]).is_some() && store.unstorable(&bad.rows[0]).is_none(), "minute {minute_ms}");
            assert!(matches!(store.write_flush(&bad).await, Err(StoreError::Rejected(_))), "minute {minute_ms}");
        }
        let huge = flush("x-inst", 1, vec![row("x.m", "x-c", T0, &[], 1, T0); MAX_FLUSH_ROWS + 1]);
        match store.write_flush(&huge).await {
            Err(StoreError::Io(msg)) => assert!(msg.contains("rows"), "{msg}"),
            other => panic!("expected a size error, got {other:?}"),
        }
        // An empty flush writes nothing.
        store.write_flush(&flush("x-inst", 2, vec![])).await.expect("empty flush");
        assert_eq!(store.max_flush_seq("x-inst").await.expect("max seq"), 0);
        assert_eq!(store.aggregate(&q).await.expect("aggregate"), Stored { data: vec![], stored_seq: 0 });
        // Ranges outside what DateTime holds are empty, not errors.
        let early = query("x-inst", "x.m", Fold::Sum, i64::MIN, 0, None);
        assert_eq!(store.aggregate(&early).await.expect("aggregate"), Stored { data: vec![], stored_seq: 0 });
        drop_database(&store).await;
    }

    #[test]
    fn minute_ranges() {
        assert_eq!(minute_range(0, 60_000), Some((0, 59)));
        assert_eq!(
            minute_range(T0, T0 + MINUTE),
            Some((u32::try_from(T0 / 1000).unwrap_or(0), u32::try_from(T0 / 1000 + 59).unwrap_or(0)))
        );
        assert_eq!(minute_range(1, 1001), Some((1, 1)));
        assert_eq!(minute_range(-5_000, 1), Some((0, 0)));
        assert_eq!(minute_range(0, 0), None);
        assert_eq!(minute_range(i64::MIN, 0), None);
        assert_eq!(minute_range(0, i64::MAX), Some((0, u32::MAX)));
        assert_eq!(minute_range(i64::MAX - 1, i64::MAX), None);
        assert_eq!(ceil_div(-1, 1000), 0);
        assert_eq!(ceil_div(-1000, 1000), -1);
        assert_eq!(ceil_div(1001, 1000), 2);
    }
}
