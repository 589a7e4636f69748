//! Adjustments (issue 19) with the usage store in a real ClickHouse (a
//! private `clickhouse-server`, see tests/common/ch.rs): the adjustment is its
//! own negative row, `sum(value)` stays exact, `/v1/usage` and the counters
//! rebuilt from ClickHouse after a restart show the corrected total. Without
//! `clickhouse-server` skipped with a note, or failed under
//! `METERD_TEST_REQUIRE_SERVICES` (see `common::require`).

mod common;

use common::ch::{query, unique_db, ClickHouseServer};
use common::require::need;
use common::{away_from_day_boundary, now_ms, TestServer, DAY};
use serde_json::json;

fn config(url: &str, db: &str) -> String {
    format!(
        "[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nflush_interval = \"200ms\"\n\
         [[meters]]\nname = \"minutes\"\nprecision = 2\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nminutes = {{ limit = 1000, window = \"month\" }}\n"
    )
}

async fn scalar(url: &str, sql: &str) -> i64 {
    let text = query(url, sql).await;
    text.trim().parse().unwrap_or_else(|_| panic!("{sql}: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjustments_are_negative_rows_and_sum_value_stays_exact() {
    let ch = need!(ClickHouseServer::start().await);
    let url = ch.url();
    away_from_day_boundary().await;
    let db = unique_db();
    let server = TestServer::start(&config(&url, &db)).await;
    let c = server.client();
    let mut expected = 0i64;
    let mut events = Vec::new();
    for i in 0..200 {
        let q = 1 + (i % 7);
        events.push(json!({"id": format!("ch-e{i}"), "customer": format!("c{}", i % 4), "meter": "minutes", "quantity": q}));
        expected += q * 100;
    }
    assert_eq!(c.events(&serde_json::Value::Array(events)).await.status, 202);
    // c0 has 50 events of 1..7: refund 12.34 of it, then a refused one that would go below zero.
    let c0: i64 = (0..200).filter(|i| i % 4 == 0).map(|i| (1 + (i % 7)) * 100).sum();
    let r = c
        .post_json(
            "/v1/adjustments",
            &json!({"id": "ch-adj", "customer": "c0", "meter": "minutes", "quantity": -12.34, "timestamp": now_ms(), "reason": "refund"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    expected -= 1234;
    let too_much = (c0 - 1234) as f64 / 100.0 + 0.01;
    let r = c
        .post_json(
            "/v1/adjustments",
            &json!({"id": "ch-adj2", "customer": "c0", "meter": "minutes", "quantity": -too_much, "timestamp": now_ms(), "reason": "x"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");

    let total = scalar(&url, &format!("SELECT sum(value) FROM {db}.usage_minute WHERE meter = 'minutes'")).await;
    assert_eq!(total, expected, "sum(value) in ClickHouse");
    let c0_stored = scalar(&url, &format!("SELECT sum(value) FROM {db}.usage_minute WHERE customer = 'c0'")).await;
    assert_eq!(c0_stored, c0 - 1234);
    let negative = scalar(&url, &format!("SELECT count() FROM {db}.usage_minute WHERE customer = 'c0' AND value = -1234")).await;
    assert_eq!(negative, 1, "the adjustment is its own negative row");
    let from = common::rfc3339((now_ms() - DAY).div_euclid(DAY) * DAY);
    let to = common::rfc3339((now_ms() + DAY).div_euclid(DAY) * DAY);
    let r = c.get(&format!("/v1/usage?meter=minutes&customer=c0&from={from}&to={to}&granularity=day")).await;
    let history: f64 = r.body["data"].as_array().expect("data").iter().filter_map(|p| p["value"].as_f64()).sum();
    assert_eq!((history * 100.0).round() as i64, c0 - 1234, "{}", r.text);

    // The month counter is rebuilt from ClickHouse, negative row included.
    let server = server.restart().await;
    let r = server.client().get("/v1/customers/c0/usage").await;
    let used = r.body["meters"][0]["used"].as_f64().expect("used");
    assert_eq!((used * 100.0).round() as i64, c0 - 1234, "{}", r.text);
    server.stop().await;
    let _ = query(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
