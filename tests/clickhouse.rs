//! meterd with a real ClickHouse (18.16 in CI, started by `scripts/test`):
//! exact sums after 100k events, and an ambiguous failure (the INSERT reaches
//! ClickHouse, the connection is cut before the answer) never double counts.
//! Without `METERD_TEST_CLICKHOUSE_URL` skipped with a note, or failed under
//! `METERD_TEST_REQUIRE_SERVICES` (see `common::require`).

mod common;

use common::ch::{cutting_proxy, query, unique_db};
use common::require::{clickhouse_url, need};
use common::{away_from_day_boundary, TestServer};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

fn config(url: &str, db: &str) -> String {
    format!(
        "[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nflush_interval = \"200ms\"\n\
         [[meters]]\nname = \"tokens\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = \"unlimited\", window = \"month\" }}\n"
    )
}

async fn ch_sum(url: &str, db: &str) -> u64 {
    common::ch::sum(url, db, "tokens").await
}

fn batch(tag: usize, n: usize) -> (Value, u64) {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("{tag}-{i}"), "customer": format!("c{}", i % 97), "meter": "tokens", "quantity": 1 + (i % 5)}))
        .collect();
    let total = (0..n).map(|i| 1 + (i % 5) as u64).sum();
    (Value::Array(events), total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_events_sum_exactly_in_clickhouse() {
    let url = need!(clickhouse_url());
    away_from_day_boundary().await;
    let db = unique_db();
    let server = TestServer::start(&config(&url, &db)).await;
    let c = server.client();
    let mut expected = 0;
    for b in 0..100 {
        let (body, total) = batch(b, 1000);
        let r = c.events(&body).await;
        assert_eq!(r.status, 202, "{}", r.text);
        expected += total;
    }
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(ch_sum(&url, &db).await, expected, "sum(value) in ClickHouse");
    // /v1/usage reads ClickHouse (merged with anything unflushed: nothing now).
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(1)).format("%Y-%m-%dT00:00:00Z");
    let to = (now + chrono::Duration::days(1)).format("%Y-%m-%dT00:00:00Z");
    let r = c.get(&format!("/v1/usage?meter=tokens&from={from}&to={to}&granularity=day")).await;
    let total: u64 = r.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(0);
    assert_eq!(total, expected, "{}", r.text);
    // A restart rebuilds the month counters from ClickHouse.
    let server = server.restart().await;
    let r = server.client().get("/v1/customers/c0/usage").await;
    let c0: u64 = (0..100).flat_map(|_| (0..1000).filter(|i| i % 97 == 0).map(|i| 1 + (i % 5) as u64)).sum();
    assert_eq!(r.body["meters"][0]["used"], json!(c0), "{}", r.text);
    server.stop().await;
    let _ = query(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_answer_is_lost_is_not_stored_twice() {
    let url = need!(clickhouse_url());
    away_from_day_boundary().await;
    let db = unique_db();
    let armed = Arc::new(AtomicBool::new(false));
    let cuts = Arc::new(AtomicU64::new(0));
    let upstream = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy = cutting_proxy(upstream, "usage_minute", armed.clone(), cuts.clone()).await;
    let server = TestServer::start(&config(&format!("http://{proxy}"), &db)).await;
    let c = server.client();
    let (body, expected) = batch(1, 500);
    assert_eq!(c.events(&body).await.status, 202);
    armed.store(true, Ordering::SeqCst);
    // The flush's INSERT lands, its answer is cut: the flush fails, ambiguously.
    let first = meterd::flush::flush_once(&server.app().engine).await;
    assert!(first.is_err(), "the cut flush should have failed: {first:?}");
    assert_eq!(cuts.load(Ordering::SeqCst), 1, "the proxy cut one INSERT");
    assert_eq!(ch_sum(&url, &db).await, expected, "the INSERT did reach ClickHouse");
    // The retry asks whether the flush is stored and does not send it again.
    meterd::flush::flush_all(&server.app().engine).await.expect("retry");
    assert_eq!(ch_sum(&url, &db).await, expected, "stored once");
    let (body2, expected2) = batch(2, 300);
    assert_eq!(c.events(&body2).await.status, 202);
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(ch_sum(&url, &db).await, expected + expected2);
    server.stop().await;
    let _ = query(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

/// A row ClickHouse can never hold (a minute past 2106, which `DateTime`
/// cannot store; ingest refuses such timestamps, so it is folded in directly
/// here) is set aside on disk and reported, and the rest of the flush is stored:
/// one bad row never blocks the flusher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstorable_row_is_set_aside_and_the_rest_is_stored() {
    let url = need!(clickhouse_url());
    away_from_day_boundary().await;
    let db = unique_db();
    let server = TestServer::start(&config(&url, &db)).await;
    let engine = &server.app().engine;
    let meter = engine.catalog().meter_by_name("tokens").expect("meter");
    let customer = engine.counters().interner.intern("far-future").expect("intern");
    let year_2200 = 7_258_118_400_000;
    engine.counters().apply(&[meterd::counters::Usage {
        customer,
        meter,
        raw: 5,
        ts: year_2200,
        properties: &[],
        props_hash: 0,
        anchor: Default::default(),
    }]);
    let (body, total) = batch(7, 10);
    assert_eq!(server.client().events(&body).await.status, 202);
    meterd::flush::flush_all(engine).await.expect("the flush goes through");
    assert_eq!(ch_sum(&url, &db).await, total, "the storable rows are stored");
    let rejected: Vec<_> = std::fs::read_dir(server.data_dir().join("rejected")).expect("rejected dir").flatten().collect();
    assert_eq!(rejected.len(), 1, "one file for the flush");
    let text = std::fs::read_to_string(rejected[0].path()).expect("read");
    assert_eq!(text.lines().count(), 1);
    assert!(text.contains("far-future") && text.contains("DateTime"), "{text}");
    let metrics = server.client().get("/metrics").await.text;
    assert!(metrics.lines().any(|l| l.starts_with("meterd_flush_rejected_rows_total") && !l.ends_with(" 0")), "{metrics}");
    // Nothing is pending: the next flush has nothing to retry.
    assert!(engine.counters().buckets.flushing().is_none());
    let _ = query(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
