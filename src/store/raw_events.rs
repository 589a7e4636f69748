//! The `raw_events` table in ClickHouse: every accepted event, one row each, as
//! it was accepted, for audit and backfill (`clickhouse.raw_events = true`).
//!
//! This module owns the table: it creates it, checks an existing one's columns,
//! turns WAL events into rows, and runs the few statements the export needs.
//! *When* rows are sent, and how each is stored exactly once, is the exporter's
//! business (`crate::raw_export`); what this module gives it for that is a key
//! per row, `(instance_id, wal_seq, idx)`, and [`RawEventsTable::stored`], the
//! keys of a range of WAL records already in the table.
//!
//! Like `usage_minute`, written for ClickHouse 18.16 and current releases
//! alike: plain `String`/integer/`Float64`/`DateTime` columns only (no
//! `DateTime64`, `LowCardinality`, `Nullable`), no query parameters, RowBinary
//! inserts compressed with LZ4, answers uncompressed (see `super::clickhouse`).
//!
//! The event id is not kept by meterd (the WAL holds its 128-bit hash only, to
//! keep the synced bytes per event small), so the table has `id_hash`: that hash
//! as 32 lowercase hex digits. `meterd::ingest::dedupe::hash_id` computes it
//! from an id.

use super::clickhouse::{check_columns, io, open_table, timed, ColumnRow, REQUEST_TIMEOUT};
use super::StoreError;
use crate::wal::{WalBatch, WalEvent};
use ::clickhouse::{Client, Row};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

/// The table, in the configured database.
pub const TABLE: &str = "raw_events";

/// The table's definition.
///
/// Partitioned by the event's month: an audit asks about a period, and old
/// months can be dropped whole (`ALTER TABLE … DROP PARTITION 202401`) when
/// they need not be kept. An INSERT with events of two months becomes two
/// parts, committed one after the other, so a failure can store a chunk in
/// part; the exporter copes with that anyway (18.16 also keeps the part of a
/// body that arrived before a connection was cut), by asking which rows of a
/// chunk are stored before it sends the chunk again. Sorted by
/// `(customer, meter, ts)`: audits ask about a customer's usage of a meter.
const CREATE: &str = "(
    instance_id String,
    wal_seq     UInt64,
    idx         UInt32,
    id_hash     String,
    customer    String,
    meter       String,
    raw         Int64,
    precision   UInt8,
    value       Float64,
    ts          DateTime('UTC'),
    ts_ms       Int64,
    accepted    DateTime('UTC'),
    accepted_ms Int64,
    properties  String
) ENGINE = MergeTree() PARTITION BY toYYYYMM(ts) ORDER BY (customer, meter, ts)";

/// Every column meterd writes, with its type (`DateTime`: any time zone).
const COLUMNS: [(&str, &str); 14] = [
    ("instance_id", "String"),
    ("wal_seq", "UInt64"),
    ("idx", "UInt32"),
    ("id_hash", "String"),
    ("customer", "String"),
    ("meter", "String"),
    ("raw", "Int64"),
    ("precision", "UInt8"),
    ("value", "Float64"),
    ("ts", "DateTime"),
    ("ts_ms", "Int64"),
    ("accepted", "DateTime"),
    ("accepted_ms", "Int64"),
    ("properties", "String"),
];

/// One row (RowBinary; the insert names its columns, so the order is free).
#[derive(Debug, Clone, PartialEq, Row, Serialize)]
pub struct RawEventRow {
    pub instance_id: String,
    /// The WAL record holding the event (one accepted batch)...
    pub wal_seq: u64,
    /// ...and the event's place in it: with `instance_id`, the row's key.
    pub idx: u32,
    /// The event id's 128-bit hash, 32 lowercase hex digits.
    pub id_hash: String,
    pub customer: String,
    pub meter: String,
    /// The quantity in raw units: `value * 10^precision`, exact.
    pub raw: i64,
    /// The meter's precision when exported (0 for a meter no longer configured).
    pub precision: u8,
    /// The quantity in meter units (`raw / 10^precision`; `raw` is the exact one).
    pub value: f64,
    /// The event's timestamp, Unix seconds (clamped to what `DateTime` holds)...
    pub ts: u32,
    /// ...and exactly, in Unix milliseconds.
    pub ts_ms: i64,
    /// When meterd accepted the event, Unix seconds, and milliseconds.
    pub accepted: u32,
    pub accepted_ms: i64,
    /// The event's properties as a JSON object (`{}` when none).
    pub properties: String,
}

/// Unix milliseconds as `DateTime` seconds, clamped to 1970..2106.
fn datetime(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000).clamp(0, i64::from(u32::MAX))).unwrap_or(u32::MAX)
}

impl RawEventRow {
    /// The row of event `idx` of WAL record `wal_seq`; `precision` is the
    /// meter's (`None`: no longer configured, exported with precision 0).
    pub fn of(instance_id: &str, wal_seq: u64, idx: u32, batch: &WalBatch, event: &WalEvent, precision: Option<u8>) -> RawEventRow {
        let precision = precision.unwrap_or(0);
        let properties: serde_json::Map<String, serde_json::Value> =
            event.properties.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        RawEventRow {
            instance_id: instance_id.to_owned(),
            wal_seq,
            idx,
            id_hash: format!("{:032x}", event.id_hash),
            customer: batch.customer(event).to_owned(),
            meter: batch.meter(event).to_owned(),
            raw: event.raw,
            precision,
            value: event.raw as f64 / 10f64.powi(i32::from(precision)),
            ts: datetime(event.ts),
            ts_ms: event.ts,
            accepted: datetime(batch.accepted_ms),
            accepted_ms: batch.accepted_ms,
            properties: serde_json::Value::Object(properties).to_string(),
        }
    }
}

/// The table, and the HTTP clients that reach it.
#[derive(Clone)]
pub struct RawEventsTable {
    /// Queries: uncompressed answers (18.16 answers `compress=1` with nothing).
    client: Client,
    /// Inserts: LZ4-compressed bodies.
    insert_client: Client,
    database: String,
    /// `` `database`.raw_events ``
    table: String,
}

impl fmt::Debug for RawEventsTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawEventsTable").field("table", &self.table).finish_non_exhaustive()
    }
}

impl RawEventsTable {
    /// Connects to the HTTP interface at `url` and creates `database` and its
    /// `raw_events` table when missing. An existing table must have meterd's
    /// columns with their types (extra columns are fine).
    pub async fn connect(url: &str, database: &str) -> Result<RawEventsTable, StoreError> {
        const OP: &str = "connect";
        let (client, insert_client, table) = open_table(url, database, TABLE, CREATE).await?;
        let query = client.query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?").bind(database).bind(TABLE);
        let columns: Vec<ColumnRow> = timed(OP, query.fetch_all()).await?;
        check_columns(&table, &columns, &COLUMNS)?;
        Ok(RawEventsTable { client, insert_client, database: database.to_owned(), table })
    }

    /// The prefix of every query id the export of `instance_id` uses.
    fn query_prefix(&self, instance_id: &str) -> String {
        format!("meterd-raw:{}:{instance_id}:", self.database)
    }

    /// The query id of the chunk starting at event `idx` of record `wal_seq`:
    /// its check and its insert carry it, and ClickHouse refuses a query whose
    /// id is running, so a retry cannot check while an earlier attempt of the
    /// same chunk is still being executed.
    pub fn query_id(&self, instance_id: &str, wal_seq: u64, idx: u32) -> String {
        format!("{}{wal_seq}.{idx}", self.query_prefix(instance_id))
    }

    /// Waits (at most a minute) until no export query of an earlier run of
    /// `instance_id` is running on the server: a killed run's INSERT could
    /// otherwise commit after [`Self::stored`] said its rows were missing.
    pub async fn wait_for_earlier_run(&self, instance_id: &str) -> Result<(), StoreError> {
        const OP: &str = "raw_events wait";
        let prefix = self.query_prefix(instance_id);
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let query = self.client.query("SELECT count() FROM system.processes WHERE startsWith(query_id, ?)").bind(prefix.as_str());
            let running: Vec<u64> = timed(OP, query.fetch_all()).await?;
            let running = running.first().copied().unwrap_or(0);
            if running == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(StoreError::Io(format!(
                    "clickhouse {OP}: raw-event inserts of an earlier run of this instance were still running after {REQUEST_TIMEOUT:?}"
                )));
            }
            tracing::info!(running, "waiting for raw-event inserts of the previous run to finish on ClickHouse");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The highest WAL sequence of `instance_id` in the table, 0 when none.
    /// (`wal_seq` is not in the sort key: this reads two columns of the table.)
    pub async fn max_seq(&self, instance_id: &str) -> Result<u64, StoreError> {
        let sql = format!("SELECT max(wal_seq) FROM {} WHERE instance_id = ?", self.table);
        let rows: Vec<u64> = timed("raw_events max_seq", self.client.query(&sql).bind(instance_id).fetch_all()).await?;
        Ok(rows.first().copied().unwrap_or(0))
    }

    /// The `(wal_seq, idx)` of `instance_id`'s rows with `wal_seq` in
    /// `[from, to]`, read under `query_id` (see [`Self::query_id`]).
    pub async fn stored(&self, instance_id: &str, from: u64, to: u64, query_id: &str) -> Result<HashSet<(u64, u32)>, StoreError> {
        let sql = format!("SELECT wal_seq, idx FROM {} WHERE instance_id = ? AND wal_seq >= ? AND wal_seq <= ?", self.table);
        let query = self.client.query(&sql).bind(instance_id).bind(from).bind(to).with_option("query_id", query_id);
        let keys: Vec<(u64, u32)> = timed("raw_events stored", query.fetch_all()).await?;
        Ok(keys.into_iter().collect())
    }

    /// Inserts `rows` in one INSERT under `query_id`. A failure may leave a part
    /// of them stored (see `CREATE`'s note); the caller asks before retrying.
    pub async fn insert(&self, rows: &[RawEventRow], query_id: &str) -> Result<(), StoreError> {
        const OP: &str = "raw_events insert";
        let mut insert = self
            .insert_client
            .insert::<RawEventRow>(&self.table)
            .map_err(io(OP))?
            .with_option("query_id", query_id)
            .with_timeouts(Some(REQUEST_TIMEOUT), Some(REQUEST_TIMEOUT));
        for row in rows {
            insert.write(row).await.map_err(io(OP))?;
        }
        insert.end().await.map_err(io(OP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::BatchBuilder;

    fn batch() -> WalBatch {
        let mut b = BatchBuilder::new(1_700_000_000_123, 3);
        b.push(
            0xabc,
            7,
            || "cust-7".into(),
            0,
            "tokens",
            1250,
            1_699_999_999_999,
            vec![("a".into(), "1".into()), ("b".into(), "x\"y".into())],
        );
        b.push(u128::MAX, 8, || "cust-8".into(), 1, "calls", 3, -1500, vec![]);
        b.push(1, 7, || "cust-7".into(), 0, "tokens", 1, 5_000_000_000_000, vec![]);
        b.finish()
    }

    #[test]
    fn rows_carry_the_event_as_accepted() {
        let b = batch();
        let row = RawEventRow::of("inst", 42, 0, &b, &b.events[0], Some(2));
        assert_eq!(
            row,
            RawEventRow {
                instance_id: "inst".into(),
                wal_seq: 42,
                idx: 0,
                id_hash: "00000000000000000000000000000abc".into(),
                customer: "cust-7".into(),
                meter: "tokens".into(),
                raw: 1250,
                precision: 2,
                value: 12.5,
                ts: 1_699_999_999,
                ts_ms: 1_699_999_999_999,
                accepted: 1_700_000_000,
                accepted_ms: 1_700_000_000_123,
                properties: r#"{"a":"1","b":"x\"y"}"#.into(),
            }
        );
        let row = RawEventRow::of("inst", 42, 1, &b, &b.events[1], None);
        assert_eq!(
            (row.id_hash.as_str(), row.customer.as_str(), row.meter.as_str()),
            ("ffffffffffffffffffffffffffffffff", "cust-8", "calls")
        );
        assert_eq!((row.precision, row.value, row.properties.as_str()), (0, 3.0, "{}"), "an unknown meter: precision 0");
        // DateTime cannot hold times before 1970 or after 2106: clamped, ts_ms exact.
        assert_eq!((row.ts, row.ts_ms), (0, -1500));
        let row = RawEventRow::of("inst", 42, 2, &b, &b.events[2], Some(0));
        assert_eq!((row.ts, row.ts_ms), (u32::MAX, 5_000_000_000_000));
    }

    #[test]
    fn query_ids_share_a_prefix_per_instance() {
        let table = RawEventsTable {
            client: Client::default(),
            insert_client: Client::default(),
            database: "db".into(),
            table: "`db`.raw_events".into(),
        };
        assert_eq!(table.query_id("inst-1", 7, 3), "meterd-raw:db:inst-1:7.3");
        assert!(table.query_id("inst-1", 7, 3).starts_with(&table.query_prefix("inst-1")));
        assert!(!table.query_id("inst-10", 7, 3).starts_with(&table.query_prefix("inst-1")), "instance ids end at a colon");
    }
}

/// Against the ClickHouse server `scripts/test` starts (see `suite::require`).
#[cfg(test)]
mod server_tests {
    use super::super::clickhouse::tests::unique_database;
    use super::super::suite::require::{self, need};
    use super::*;
    use crate::wal::record::BatchBuilder;

    async fn sql(table: &RawEventsTable, sql: &str) {
        if let Err(e) = table.client.query(sql).execute().await {
            panic!("{sql}: {e}");
        }
    }

    async fn text(table: &RawEventsTable, sql: &str) -> Vec<String> {
        table.client.query(sql).fetch_all::<String>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn rows(instance: &str, seq: u64, n: u32, ts_ms: i64) -> Vec<RawEventRow> {
        let mut b = BatchBuilder::new(ts_ms, n as usize);
        for i in 0..n {
            b.push(u128::from(i), 0, || "c".into(), 0, "m", i64::from(i), ts_ms + i64::from(i) * 1000, vec![("k".into(), "v".into())]);
        }
        let b = b.finish();
        b.events.iter().enumerate().map(|(i, e)| RawEventRow::of(instance, seq, i as u32, &b, e, Some(1))).collect()
    }

    #[tokio::test]
    async fn creates_the_table_and_reads_back_keys() {
        let url = need!(require::clickhouse_url());
        let db = unique_database("raw");
        let table = RawEventsTable::connect(&url, &db).await.unwrap_or_else(|e| panic!("connect: {e}"));
        // Connecting again keeps the table (and checks it).
        let table = RawEventsTable::connect(&url, &table.database).await.unwrap_or_else(|e| panic!("reconnect: {e}"));
        let mut types =
            text(&table, &format!("SELECT concat(name, ' ', type) FROM system.columns WHERE database = '{db}' AND table = '{TABLE}'"))
                .await;
        types.sort();
        assert!(types.contains(&"ts DateTime('UTC')".to_string()) && types.contains(&"id_hash String".to_string()), "{types:?}");
        assert_eq!(types.len(), COLUMNS.len());

        // Records 1 and 2 of "a" (2 events each; record 2 across a month boundary), record 1 of "b".
        let jan31 = 1_706_745_599_000; // 2024-01-31T23:59:59Z
        let mut a = rows("a", 1, 2, jan31 - 86_400_000);
        a.extend(rows("a", 2, 2, jan31));
        table.insert(&a, &table.query_id("a", 1, 0)).await.unwrap_or_else(|e| panic!("insert: {e}"));
        table.insert(&rows("b", 1, 3, jan31), &table.query_id("b", 1, 0)).await.unwrap_or_else(|e| panic!("insert: {e}"));
        assert_eq!(table.max_seq("a").await.ok(), Some(2));
        assert_eq!(table.max_seq("nobody").await.ok(), Some(0));
        let stored = table.stored("a", 2, 9, &table.query_id("a", 2, 0)).await.unwrap_or_else(|e| panic!("stored: {e}"));
        assert_eq!(stored, HashSet::from([(2, 0), (2, 1)]), "only this instance's, only the range");
        // The row as analysts see it.
        let row = text(
            &table,
            &format!("SELECT concat(toString(ts), ' ', toString(value), ' ', properties, ' ', toString(toYYYYMM(ts))) FROM `{db}`.{TABLE} WHERE instance_id = 'a' AND wal_seq = 2 AND idx = 1"),
        )
        .await;
        assert_eq!(row, vec![r#"2024-02-01 00:00:00 0.1 {"k":"v"} 202402"#.to_string()]);
        sql(&table, &format!("DROP DATABASE IF EXISTS `{db}`")).await;
    }

    #[tokio::test]
    async fn refuses_a_table_with_other_types() {
        let url = need!(require::clickhouse_url());
        let db = unique_database("rawwrong");
        let table = RawEventsTable::connect(&url, &db).await.unwrap_or_else(|e| panic!("connect: {e}"));
        let other = unique_database("rawwrong2");
        sql(&table, &format!("CREATE DATABASE `{other}`")).await;
        sql(
            &table,
            &format!(
                "CREATE TABLE `{other}`.{TABLE} (instance_id String, wal_seq UInt32, idx UInt32) ENGINE = MergeTree() ORDER BY wal_seq"
            ),
        )
        .await;
        match RawEventsTable::connect(&url, &other).await {
            Err(StoreError::Io(msg)) => assert!(msg.contains("wal_seq") && msg.contains("UInt32"), "{msg}"),
            other => panic!("expected a schema error, got {other:?}"),
        }
        sql(&table, &format!("DROP DATABASE `{other}`")).await;
        sql(&table, &format!("DROP DATABASE `{db}`")).await;
    }
}
