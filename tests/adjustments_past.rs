//! Adjustments (issue 19): a decrease into a window no longer held in memory
//! (last month's, after a restart) is checked against what the usage store
//! says of that window. Its own file: the metrics test in adjustments.rs counts
//! refusals exactly, and the recorder is shared by the tests of one binary.

mod common;

use common::{away_from_day_boundary, uid, TestServer};
use serde_json::json;

const CONFIG: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"
precision = 2

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = { limit = 1000, window = "month" }
"#;

async fn usage(c: &common::Client, customer: &str) -> serde_json::Value {
    let r = c.get(&format!("/v1/customers/{customer}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["meters"][0]["used"].clone()
}

fn store_sum(dir: &std::path::Path, customer: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("meterd.sqlite")).expect("open the store");
    conn.query_row("SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer = ?1", [customer], |r| r.get(0)).expect("sum(value)")
}

/// A window no longer held in memory (last month's, after a restart) is checked
/// against what the store says of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_window_is_checked_against_the_store() {
    use chrono::{Datelike, TimeZone, Utc};
    away_from_day_boundary().await;
    let now = Utc::now();
    let month_start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).unwrap().timestamp_millis();
    let last_month = month_start - 3_600_000;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    let r = c.events(&json!({"id": uid("e"), "customer": "p1", "meter": "minutes", "quantity": 40, "timestamp": last_month})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(c.events(&common::event("p1", "minutes", 5)).await.status, 202);
    let server = server.restart().await;
    let c = server.client();
    let at = |id: &str, q: f64| json!({"id": id, "customer": "p1", "meter": "minutes", "quantity": q, "timestamp": last_month + 60_000, "reason": "r"});
    let r = c.post_json("/v1/adjustments", &at("p-1", -40.01)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = c.post_json("/v1/adjustments", &at("p-2", -30.0)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = c.post_json("/v1/adjustments", &at("p-3", -10.01)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // This month's window is untouched.
    assert_eq!(usage(&c, "p1").await, json!(5));
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(store_sum(&server.data_dir(), "p1"), 1500);
    server.stop().await;
}
