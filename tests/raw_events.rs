//! `clickhouse.raw_events = true` against a real ClickHouse (18.16 under
//! `scripts/test`): every acknowledged event lands in `raw_events` exactly once,
//! with its fields, through graceful restarts, SIGKILLs mid-export, a chunk an
//! earlier run stored in part, an INSERT whose answer is lost, and ClickHouse
//! outages (during which the WAL keeps what the export still needs). Skipped
//! (with a message) when `scripts/test` did not provide ClickHouse.

mod common;

use common::ch::{clickhouse_url, query, unique_db};
use common::{away_from_day_boundary, now_ms, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const METERS: &str = "[[meters]]\nname = \"tokens\"\n[[meters]]\nname = \"minutes\"\nprecision = 2\n\
    [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = { limit = \"unlimited\" }\nminutes = { limit = \"unlimited\" }\n";

/// A config exporting raw events to `db`, flushing and exporting every `interval`.
fn config(url: &str, db: &str, interval: &str) -> String {
    format!("[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nflush_interval = \"{interval}\"\nraw_events = true\n{METERS}")
}

/// The hex `id_hash` meterd stores for an event id.
fn id_hex(id: &str) -> String {
    format!("{:032x}", meterd::ingest::dedupe::hash_id(id))
}

/// One number from a query (`u64::MAX` if unreadable).
async fn number(url: &str, sql: &str) -> u64 {
    query(url, sql).await.trim().parse().unwrap_or(u64::MAX)
}

async fn rows(url: &str, db: &str) -> u64 {
    number(url, &format!("SELECT count() FROM {db}.raw_events")).await
}

/// Waits until `raw_events` holds `want` rows (the export runs on its own).
async fn wait_rows(url: &str, db: &str, want: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let got = rows(url, db).await;
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count() / distinct keys / distinct id hashes` of the table: equal when no
/// row is stored twice.
async fn uniqueness(url: &str, db: &str) -> String {
    query(url, &format!("SELECT count(), uniqExact(instance_id, wal_seq, idx), uniqExact(id_hash) FROM {db}.raw_events")).await
}

async fn drop_db(url: &str, db: &str) {
    let _ = query(url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_in_raw_events_once_with_its_fields() {
    let Some(url) = clickhouse_url() else { return };
    away_from_day_boundary().await;
    let db = unique_db();
    let server = TestServer::start(&config(&url, &db, "100ms")).await;
    let c = server.client();
    let t0 = now_ms() - 60_000;
    let (mut events, mut tokens_raw, mut minutes_raw) = (0u64, 0i64, 0i64);
    for b in 0..20 {
        let batch: Vec<Value> = (0..250)
            .map(|i| {
                let n = b * 250 + i;
                let mut e = if n % 2 == 0 {
                    tokens_raw += 1 + n % 5;
                    json!({"id": format!("a-{n}"), "customer": format!("c{}", n % 7), "meter": "tokens", "quantity": 1 + n % 5})
                } else {
                    minutes_raw += 125 + n % 3;
                    json!({"id": format!("a-{n}"), "customer": format!("c{}", n % 7), "meter": "minutes", "quantity": (125 + n % 3) as f64 / 100.0})
                };
                e["timestamp"] = json!(t0 + n);
                if n % 3 == 0 {
                    e["properties"] = json!({"region": if n % 2 == 0 { "eu" } else { "us" }, "n": n.to_string()});
                }
                e
            })
            .collect();
        let r = c.events(&Value::Array(batch)).await;
        assert_eq!(r.status, 202, "{}", r.text);
        events += 250;
    }
    // A retried batch is a duplicate: not accepted, not exported again.
    let again: Vec<Value> = (0..10).map(|n| json!({"id": format!("a-{n}"), "customer": "c0", "meter": "tokens", "quantity": 99})).collect();
    let r = c.events(&Value::Array(again)).await;
    assert_eq!(r.body["duplicates"], json!(10), "{}", r.text);
    // A consume is an event too.
    let r = c.check(&json!({"customer": "c9", "meter": "tokens", "quantity": 4, "consume": true, "id": "consume-1"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    (events, tokens_raw) = (events + 1, tokens_raw + 4);

    assert_eq!(wait_rows(&url, &db, events, Duration::from_secs(60)).await, events, "every accepted event is exported");
    assert_eq!(uniqueness(&url, &db).await, format!("{events}\t{events}\t{events}"), "each once");
    let sums =
        query(&url, &format!("SELECT meter, sum(raw), toString(round(sum(value), 4)) FROM {db}.raw_events GROUP BY meter ORDER BY meter"))
            .await;
    assert_eq!(sums, format!("minutes\t{minutes_raw}\t{}\ntokens\t{tokens_raw}\t{tokens_raw}", minutes_raw as f64 / 100.0));
    // One event, field by field (n = 3: a minutes event with properties).
    let row = query(
        &url,
        &format!(
            "SELECT customer, meter, raw, precision, value, ts_ms, toUnixTimestamp(ts), properties, \
             accepted_ms >= {t0} AND toUnixTimestamp(accepted) = intDiv(accepted_ms, 1000), instance_id != '' \
             FROM {db}.raw_events WHERE id_hash = '{}'",
            id_hex("a-3")
        ),
    )
    .await;
    let ts = t0 + 3;
    assert_eq!(row, format!("c3\tminutes\t125\t2\t1.25\t{ts}\t{}\t{{\"n\":\"3\",\"region\":\"us\"}}\t1\t1", ts.div_euclid(1000)));
    let consume =
        query(&url, &format!("SELECT customer, raw, properties FROM {db}.raw_events WHERE id_hash = '{}'", id_hex("consume-1"))).await;
    assert_eq!(consume, "c9\t4\t{}");
    // Events of one batch share a record and keep their order in it.
    let first = query(
        &url,
        &format!("SELECT wal_seq, idx FROM {db}.raw_events WHERE id_hash IN ('{}', '{}') ORDER BY idx", id_hex("a-0"), id_hex("a-249")),
    )
    .await;
    let seqs: Vec<&str> = first.lines().map(|l| l.split('\t').next().unwrap_or("")).collect();
    assert_eq!(first.lines().map(|l| l.split('\t').nth(1).unwrap_or("")).collect::<Vec<_>>(), vec!["0", "249"], "{first}");
    assert_eq!(seqs[0], seqs[1], "{first}");

    let metrics = c.get("/metrics").await.text;
    let exported = metrics.lines().find(|l| l.starts_with("meterd_raw_export_rows_total")).unwrap_or("");
    assert!(exported.ends_with(&format!(" {events}")), "{exported}");
    assert!(metrics.contains("meterd_raw_export_lag_records 0"), "caught up:\n{metrics}");

    // A graceful restart exports nothing twice.
    let server = server.restart().await;
    let body = json!([{"id": "after-restart", "customer": "c1", "meter": "tokens", "quantity": 2}]);
    assert_eq!(server.client().events(&body).await.status, 202);
    assert_eq!(wait_rows(&url, &db, events + 1, Duration::from_secs(60)).await, events + 1);
    server.stop().await;
    assert_eq!(uniqueness(&url, &db).await, format!("{0}\t{0}\t{0}", events + 1));
    drop_db(&url, &db).await;
}
