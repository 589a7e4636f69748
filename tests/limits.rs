//! Limit checks end to end over HTTP: hard, soft and multiple limits, consume and
//! its idempotency, gauges, concurrency races on consume, late events, the usage
//! summary and the usage history.

mod common;

use chrono::{Datelike, TimeZone, Utc};
use common::{
    away_from_day_boundary, check, event, ingest, next_month_start, now_ms, rfc3339, uid, Client, TestServer, DAY, HOUR, INTERVIEW,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const MINUTE: i64 = 60_000;

fn day_start(ms: i64) -> i64 {
    ms.div_euclid(DAY) * DAY
}

fn month_start(ms: i64) -> i64 {
    let at = Utc.timestamp_millis_opt(ms).unwrap();
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0).unwrap().timestamp_millis()
}

/// A decimal written as meterd writes it (trailing zeros trimmed), as JSON.
fn num(text: &str) -> Value {
    serde_json::from_str(text).expect("a JSON number")
}

/// Raw hundredths as a JSON number the way meterd renders precision-2 amounts.
fn cents(raw: i64) -> Value {
    let (whole, frac) = (raw / 100, raw % 100);
    if frac == 0 {
        num(&whole.to_string())
    } else if frac % 10 == 0 {
        num(&format!("{whole}.{}", frac / 10))
    } else {
        num(&format!("{whole}.{frac:02}"))
    }
}

async fn consume(c: &Client, customer: &str, meter: &str, quantity: Value, id: &str) -> common::Resp {
    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": quantity, "consume": true, "id": id})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r
}

async fn summary(c: &Client, customer: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

/// The summary row of `meter` (and `window`).
fn row<'a>(summary: &'a Value, meter: &str, window: &str) -> &'a Value {
    summary["meters"]
        .as_array()
        .expect("meters")
        .iter()
        .find(|r| r["meter"] == meter && r["window"] == window)
        .unwrap_or_else(|| panic!("no {meter}/{window} row in {summary}"))
}

async fn usage(c: &Client, query: &str) -> Value {
    let r = c.get(&format!("/v1/usage?{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interview_platform_limits() {
    away_from_day_boundary().await;
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let cust = "cand_295";
    let body = json!([
        event(cust, "interview_minutes", num("120.5")),
        event(cust, "interview_minutes", num("100")),
        event(cust, "interview_minutes", num("74.5")),
    ]);
    assert_eq!(ingest(&c, body).await, json!({"accepted": 3, "duplicates": 0}));

    let resets = rfc3339(next_month_start(now_ms()));
    let answer = check(&c, cust, "interview_minutes", json!(10)).await;
    assert_eq!(
        answer,
        json!({
            "allowed": false, "customer": cust, "meter": "interview_minutes", "quantity": 10,
            "used": 295, "held": 0, "limit": 300, "remaining": 5, "window": "month",
            "resets_at": resets, "hard": true, "reason": "limit_exceeded",
            "limits": [{"window": "month", "limit": 300, "used": 295, "held": 0, "remaining": 5,
                        "resets_at": resets, "hard": true}]
        })
    );

    let answer = check(&c, cust, "interview_minutes", json!(5)).await;
    assert_eq!(answer["allowed"], json!(true), "{answer}");
    assert_eq!(answer["reason"], "within_limit");
    assert_eq!(answer["used"], json!(295));
    assert_eq!(answer["remaining"], json!(5));
    assert_eq!(answer["quantity"], json!(5));
    // Exact decimals: 5.01 more would pass 300 by one hundredth.
    let answer = check(&c, cust, "interview_minutes", num("5.01")).await;
    assert_eq!(answer["allowed"], json!(false), "{answer}");
    assert_eq!(answer["quantity"], num("5.01"));
    // A plain check records nothing.
    assert_eq!(row(&summary(&c, cust).await, "interview_minutes", "month")["used"], json!(295));

    // Three interviews today: the fourth is refused until the next UTC midnight.
    let body = json!([event(cust, "interviews", json!(1)), event(cust, "interviews", json!(1)), event(cust, "interviews", json!(1))]);
    ingest(&c, body).await;
    let midnight = rfc3339(day_start(now_ms()) + DAY);
    let answer = check(&c, cust, "interviews", json!(1)).await;
    assert_eq!(
        answer,
        json!({
            "allowed": false, "customer": cust, "meter": "interviews", "quantity": 1,
            "used": 3, "held": 0, "limit": 3, "remaining": 0, "window": "day",
            "resets_at": midnight, "hard": true, "reason": "limit_exceeded",
            "limits": [{"window": "day", "limit": 3, "used": 3, "held": 0, "remaining": 0,
                        "resets_at": midnight, "hard": true}]
        })
    );
    // The default quantity is one.
    let r = c.check(&json!({"customer": cust, "meter": "interviews"})).await;
    assert_eq!(r.body["quantity"], json!(1), "{}", r.text);
    assert_eq!(r.body["allowed"], json!(false), "{}", r.text);

    // Premium: unlimited minutes, whatever the usage.
    let prem = "cand_premium";
    let r = c.put_json(&format!("/v1/customers/{prem}/entitlements"), &json!({"plan": "premium"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    ingest(&c, json!([event(prem, "interview_minutes", num("150.25")), event(prem, "interview_minutes", json!(400))])).await;
    let answer = check(&c, prem, "interview_minutes", json!(1000)).await;
    assert_eq!(answer["allowed"], json!(true), "{answer}");
    assert_eq!(answer["reason"], "unlimited");
    assert_eq!(answer["limit"], Value::Null);
    assert_eq!(answer["remaining"], Value::Null);
    assert_eq!(answer["used"], num("550.25"));
    assert_eq!(answer["limits"].as_array().map(Vec::len), Some(1), "{answer}");
    assert_eq!(answer["limits"][0]["limit"], Value::Null);
    // Premium video reviews stay limited (50 a month).
    let answer = check(&c, prem, "video_reviews", json!(51)).await;
    assert_eq!(answer["allowed"], json!(false), "{answer}");
    assert_eq!(answer["limit"], json!(50));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_records_once_and_is_idempotent() {
    away_from_day_boundary().await;
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let cust = "cand_consume";
    ingest(&c, json!(event(cust, "interview_minutes", num("99.5")))).await;

    let a = consume(&c, cust, "interview_minutes", num("100.25"), "consume-a").await;
    assert_eq!(a.body["allowed"], json!(true), "{}", a.text);
    assert_eq!(a.body["reason"], "within_limit");
    assert_eq!(a.body["used"], num("199.75"));
    assert_eq!(a.body["remaining"], num("100.25"));
    assert_eq!(a.body["limits"][0]["used"], num("199.75"));
    assert_eq!(row(&summary(&c, cust).await, "interview_minutes", "month")["used"], num("199.75"));

    // A retry gets the very same answer and records nothing more.
    let again = consume(&c, cust, "interview_minutes", num("100.25"), "consume-a").await;
    assert_eq!(again.text, a.text);
    assert_eq!(row(&summary(&c, cust).await, "interview_minutes", "month")["used"], num("199.75"));

    // Denied: nothing recorded, and its retry is denied the same way.
    let denied = consume(&c, cust, "interview_minutes", num("100.26"), "consume-b").await;
    assert_eq!(denied.body["allowed"], json!(false), "{}", denied.text);
    assert_eq!(denied.body["reason"], "limit_exceeded");
    assert_eq!(denied.body["used"], num("199.75"));
    assert_eq!(denied.body["remaining"], num("100.25"));
    let denied_again = consume(&c, cust, "interview_minutes", num("100.26"), "consume-b").await;
    assert_eq!(denied_again.text, denied.text);
    assert_eq!(row(&summary(&c, cust).await, "interview_minutes", "month")["used"], num("199.75"));

    // The last unit that fits is granted.
    let last = consume(&c, cust, "interview_minutes", num("100.25"), "consume-c").await;
    assert_eq!(last.body["allowed"], json!(true), "{}", last.text);
    assert_eq!(last.body["used"], json!(300));
    assert_eq!(last.body["remaining"], json!(0));

    // A consume's id sent later as an event is a duplicate.
    let r = ingest(&c, json!({"id": "consume-a", "customer": cust, "meter": "interview_minutes", "quantity": 1})).await;
    assert_eq!(r, json!({"accepted": 0, "duplicates": 1}));
    let s = summary(&c, cust).await;
    assert_eq!(row(&s, "interview_minutes", "month")["used"], json!(300));
    assert_eq!(row(&s, "interview_minutes", "month")["remaining"], json!(0));
    assert_eq!(row(&s, "interview_minutes", "month")["percent"], num("100.0"));

    // The history agrees, before and after a flush.
    let from = day_start(now_ms());
    let q = format!("meter=interview_minutes&customer={cust}&from={from}&to={}&granularity=day", from + DAY);
    let expected = json!([{"customer": cust, "start": rfc3339(from), "end": rfc3339(from + DAY), "value": 300}]);
    assert_eq!(usage(&c, &q).await["data"], expected);
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(usage(&c, &q).await["data"], expected);

    // Consume on a count meter: three a day.
    for i in 0..3 {
        let r = consume(&c, cust, "interviews", json!(1), &format!("iv-{i}")).await;
        assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
        assert_eq!(r.body["used"], json!(i + 1));
    }
    let r = consume(&c, cust, "interviews", json!(1), "iv-3").await;
    assert_eq!(r.body["allowed"], json!(false), "{}", r.text);
    assert_eq!(r.body["used"], json!(3));
    assert_eq!(row(&summary(&c, cust).await, "interviews", "day")["used"], json!(3));

    // An id already ingested as an event is counted once when consumed later
    // (a sum meter and a count meter).
    for (customer, meter, window) in [("dup1", "interview_minutes", "month"), ("dup2", "interviews", "day")] {
        ingest(&c, json!({"id": format!("{customer}-x"), "customer": customer, "meter": meter, "quantity": 1})).await;
        let r = consume(&c, customer, meter, json!(1), &format!("{customer}-x")).await;
        assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
        // The answer reports the usage as it stands: the event's, not twice.
        assert_eq!(r.body["used"], json!(1), "{}", r.text);
        assert_eq!(row(&summary(&c, customer).await, meter, window)["used"], json!(1), "{customer}");
    }

    // A consume needs an id.
    let r = c.check(&json!({"customer": cust, "meter": "interviews", "consume": true})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.code(), "invalid_request");

    server.stop().await;
}

const SOFT: &str = r#"
[[meters]]
name = "api_calls"
aggregation = "sum"

[[plans]]
name = "free"
default = true
[plans.limits]
api_calls = { limit = 10, window = "month", hard = false }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_limits_allow_and_record() {
    away_from_day_boundary().await;
    let server = TestServer::start(SOFT).await;
    let c = server.client();
    ingest(&c, json!(event("s1", "api_calls", json!(9)))).await;
    let a = check(&c, "s1", "api_calls", json!(1)).await;
    assert_eq!(a["reason"], "within_limit", "{a}");
    let a = check(&c, "s1", "api_calls", json!(5)).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["reason"], "soft_limit_exceeded");
    assert_eq!(a["hard"], json!(false));
    assert_eq!(a["used"], json!(9));
    assert_eq!(a["limit"], json!(10));
    assert_eq!(a["remaining"], json!(1));
    assert_eq!(a["limits"][0]["hard"], json!(false));

    let r = consume(&c, "s1", "api_calls", json!(5), "soft-1").await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    assert_eq!(r.body["reason"], "soft_limit_exceeded");
    assert_eq!(r.body["used"], json!(14));
    assert_eq!(r.body["remaining"], json!(0));
    let s = summary(&c, "s1").await;
    let m = row(&s, "api_calls", "month");
    assert_eq!(m["used"], json!(14), "{s}");
    assert_eq!(m["remaining"], json!(0));
    assert_eq!(m["percent"], num("140.0"));
    assert_eq!(m["hard"], json!(false));
    server.stop().await;
}

const TWO_LIMITS: &str = r#"
[[meters]]
name = "analyses"
aggregation = "count"

[[meters]]
name = "exports"
aggregation = "sum"

[[plans]]
name = "free"
default = true
[plans.limits]
analyses = [ { limit = 5, window = "month" }, { limit = 2, window = "day" } ]
exports = [ { limit = 3, window = "month" }, { limit = 10, window = "day" } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_limits_on_one_meter() {
    away_from_day_boundary().await;
    let server = TestServer::start(TWO_LIMITS).await;
    let c = server.client();
    let now = now_ms();
    let (month_end, day_end) = (rfc3339(next_month_start(now)), rfc3339(day_start(now) + DAY));

    // The day limit is the tighter one.
    let a = check(&c, "t1", "analyses", json!(1)).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["window"], "day");
    assert_eq!(a["limit"], json!(2));
    assert_eq!(a["resets_at"], json!(day_end));
    assert_eq!(
        a["limits"],
        json!([
            {"window": "month", "limit": 5, "used": 0, "held": 0, "remaining": 5, "resets_at": month_end, "hard": true},
            {"window": "day", "limit": 2, "used": 0, "held": 0, "remaining": 2, "resets_at": day_end, "hard": true},
        ])
    );
    for i in 0..2 {
        let r = consume(&c, "t1", "analyses", json!(1), &format!("an-{i}")).await;
        assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
        assert_eq!(r.body["used"], json!(i + 1));
        assert_eq!(r.body["window"], "day");
    }
    let r = consume(&c, "t1", "analyses", json!(1), "an-2").await;
    assert_eq!(r.body["allowed"], json!(false), "{}", r.text);
    assert_eq!(r.body["reason"], "limit_exceeded");
    assert_eq!(r.body["window"], "day");
    assert_eq!(r.body["used"], json!(2));
    assert_eq!(r.body["remaining"], json!(0));
    assert_eq!(
        r.body["limits"],
        json!([
            {"window": "month", "limit": 5, "used": 2, "held": 0, "remaining": 3, "resets_at": month_end, "hard": true},
            {"window": "day", "limit": 2, "used": 2, "held": 0, "remaining": 0, "resets_at": day_end, "hard": true},
        ])
    );
    // All-or-nothing: the refused consume recorded in neither window.
    let s = summary(&c, "t1").await;
    assert_eq!(row(&s, "analyses", "month")["used"], json!(2), "{s}");
    assert_eq!(row(&s, "analyses", "day")["used"], json!(2), "{s}");

    // The month limit binds: the top level describes it.
    ingest(&c, json!(event("t2", "exports", json!(2)))).await;
    let a = check(&c, "t2", "exports", json!(1)).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["window"], "month");
    assert_eq!(a["remaining"], json!(1));
    let a = check(&c, "t2", "exports", json!(2)).await;
    assert_eq!(a["allowed"], json!(false), "{a}");
    assert_eq!(a["window"], "month");
    assert_eq!(a["limit"], json!(3));
    assert_eq!(a["used"], json!(2));
    assert_eq!(a["resets_at"], json!(month_end));
    assert_eq!(a["limits"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        a["limits"][1],
        json!({"window": "day", "limit": 10, "used": 2, "held": 0, "remaining": 8, "resets_at": day_end, "hard": true})
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_not_on_the_plan_is_not_entitled() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let a = check(&c, "ne1", "video_reviews", json!(1)).await;
    assert_eq!(a["allowed"], json!(false), "{a}");
    assert_eq!(a["reason"], "not_entitled");
    assert_eq!(a["limits"], json!([]));
    let r = consume(&c, "ne1", "video_reviews", json!(1), "ne-consume").await;
    assert_eq!(r.body["allowed"], json!(false), "{}", r.text);
    assert_eq!(r.body["reason"], "not_entitled");
    // Not on the starter summary either.
    let s = summary(&c, "ne1").await;
    assert!(s["meters"].as_array().unwrap().iter().all(|r| r["meter"] != "video_reviews"), "{s}");
    // On professional it is entitled, and the refused consume recorded nothing.
    let r = c.put_json("/v1/customers/ne1/entitlements", &json!({"plan": "professional"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = check(&c, "ne1", "video_reviews", json!(1)).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["used"], json!(0));
    assert_eq!(a["limit"], json!(10));
    // An unknown meter is a bad request, not a denial.
    let r = c.check(&json!({"customer": "ne1", "meter": "nope"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.code(), "invalid_request");
    server.stop().await;
}

const GAUGES: &str = r#"
[[meters]]
name = "storage_gb"
aggregation = "latest"
precision = 3

[[meters]]
name = "seats"
aggregation = "max"

[[meters]]
name = "interviews"
aggregation = "count"

[[plans]]
name = "free"
default = true
[plans.limits]
storage_gb = { limit = 10, window = "month" }
seats = { limit = 5, window = "month" }
interviews = { limit = 100, window = "month" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_latest_and_max() {
    away_from_day_boundary().await;
    let server = TestServer::start(GAUGES).await;
    let c = server.client();
    let now = now_ms();
    // The newest reading is sent first; the older one must not replace it.
    let newer = json!({"id": uid("g"), "customer": "g1", "meter": "storage_gb", "quantity": 2.5, "timestamp": now - 1_000});
    let older = json!({"id": uid("g"), "customer": "g1", "meter": "storage_gb", "quantity": 7.25, "timestamp": now - 3_000});
    ingest(&c, newer).await;
    ingest(&c, older).await;
    let a = check(&c, "g1", "storage_gb", num("7.5")).await;
    assert_eq!(a["used"], num("2.5"), "{a}");
    assert_eq!(a["allowed"], json!(true), "used + q = 10 stays within 10: {a}");
    assert_eq!(a["remaining"], num("7.5"));
    let a = check(&c, "g1", "storage_gb", num("7.501")).await;
    assert_eq!(a["allowed"], json!(false), "{a}");
    // Flushing changes nothing.
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    let a = check(&c, "g1", "storage_gb", json!(0)).await;
    assert_eq!(a["used"], num("2.5"), "{a}");
    // A newer, smaller reading replaces it (a gauge, not a max).
    ingest(&c, json!({"id": uid("g"), "customer": "g1", "meter": "storage_gb", "quantity": 1.125, "timestamp": now})).await;
    let a = check(&c, "g1", "storage_gb", json!(0)).await;
    assert_eq!(a["used"], num("1.125"), "{a}");
    assert_eq!(row(&summary(&c, "g1").await, "storage_gb", "month")["used"], num("1.125"));
    // The history's latest value agrees, across stored and unflushed minutes.
    let from = day_start(now);
    let q = format!("meter=storage_gb&customer=g1&from={from}&to={}&granularity=day", from + DAY);
    assert_eq!(usage(&c, &q).await["data"][0]["value"], num("1.125"));

    // max keeps the largest.
    ingest(&c, json!([event("g2", "seats", json!(3)), event("g2", "seats", json!(5)), event("g2", "seats", json!(4))])).await;
    let a = check(&c, "g2", "seats", json!(1)).await;
    assert_eq!(a["used"], json!(5), "{a}");
    assert_eq!(a["allowed"], json!(false), "{a}");
    let a = check(&c, "g2", "seats", json!(0)).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    // Consume on a gauge records the new level.
    ingest(&c, json!(event("g3", "seats", json!(2)))).await;
    let r = consume(&c, "g3", "seats", json!(2), "seat-up").await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    assert_eq!(r.body["used"], json!(4));
    assert_eq!(row(&summary(&c, "g3").await, "seats", "month")["used"], json!(4));
    let r = consume(&c, "g3", "seats", json!(2), "seat-up-2").await;
    assert_eq!(r.body["allowed"], json!(false), "{}", r.text);
    assert_eq!(row(&summary(&c, "g3").await, "seats", "month")["used"], json!(4));

    // count ignores the quantity of events.
    ingest(&c, json!([event("g4", "interviews", json!(7)), event("g4", "interviews", json!(0)), event("g4", "interviews", num("2.5"))]))
        .await;
    let a = check(&c, "g4", "interviews", json!(1)).await;
    assert_eq!(a["used"], json!(3), "{a}");
    server.stop().await;
}

const RACE: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"

[[meters]]
name = "jobs"
aggregation = "count"

[[plans]]
name = "free"
default = true
[plans.limits]
tokens = { limit = 1000, window = "month" }
jobs = [ { limit = 500, window = "day" }, { limit = 400, window = "month" } ]
"#;

/// `tasks` tasks each send `per_task` consumes of `quantity` concurrently over
/// HTTP; returns the `used` of every allowed answer (the binding limit's).
async fn race(c: &Client, customer: &str, meter: &str, quantity: i64, tasks: usize, per_task: usize) -> Vec<i64> {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let c = c.clone();
            let (customer, meter) = (customer.to_string(), meter.to_string());
            tokio::spawn(async move {
                let mut granted = Vec::new();
                for i in 0..per_task {
                    let id = format!("{meter}-{t}-{i}");
                    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": quantity, "consume": true, "id": id})).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    match r.body["allowed"].as_bool() {
                        Some(true) => granted.push(r.body["used"].as_i64().expect("used")),
                        Some(false) => assert_eq!(r.body["reason"], "limit_exceeded", "{}", r.text),
                        None => panic!("no allowed in {}", r.text),
                    }
                }
                granted
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("task"));
    }
    all.sort_unstable();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_consumes_never_overshoot_nor_over_deny() {
    away_from_day_boundary().await;
    let server = TestServer::start(RACE).await;
    let c = server.client();

    // One hard limit: 8 × 200 consumes of 3 against 1000 ⇒ exactly 333 granted.
    let granted = race(&c, "racer", "tokens", 3, 8, 200).await;
    assert_eq!(granted.len(), 333);
    // Each grant saw its own level: 3, 6, ..., 999.
    assert_eq!(granted, (1..=333).map(|k| 3 * k).collect::<Vec<_>>());
    let s = summary(&c, "racer").await;
    assert_eq!(row(&s, "tokens", "month")["used"], json!(999), "{s}");
    assert_eq!(row(&s, "tokens", "month")["remaining"], json!(1));
    let a = check(&c, "racer", "tokens", json!(1)).await;
    assert_eq!(a["allowed"], json!(true), "{a}");

    // Two limits (all-or-nothing path): day 500, month 400 ⇒ exactly 400 granted.
    let granted = race(&c, "racer", "jobs", 1, 8, 100).await;
    assert_eq!(granted.len(), 400);
    assert_eq!(granted, (1..=400).collect::<Vec<_>>());
    let s = summary(&c, "racer").await;
    assert_eq!(row(&s, "jobs", "month")["used"], json!(400), "{s}");
    assert_eq!(row(&s, "jobs", "day")["used"], json!(400), "{s}");

    // The history holds exactly the granted usage, flushed or not.
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    let from = day_start(now_ms());
    for (meter, total) in [("tokens", 999), ("jobs", 400)] {
        let q = format!("meter={meter}&customer=racer&from={from}&to={}&granularity=day", from + DAY);
        assert_eq!(usage(&c, &q).await["data"][0]["value"], json!(total), "{meter}");
    }
    server.stop().await;
}

const LATE: &str = r#"
[[meters]]
name = "calls"
aggregation = "sum"

[[plans]]
name = "free"
default = true
[plans.limits]
calls = [ { limit = 1000, window = "day" }, { limit = 100000, window = "month" } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_land_in_past_windows() {
    away_from_day_boundary().await;
    let server = TestServer::start(LATE).await;
    let c = server.client();
    let now = now_ms();
    let today = day_start(now);
    let yesterday = today - DAY;
    let yesterday_noon = yesterday + 12 * HOUR;
    let long_ago = today - 33 * DAY + 6 * HOUR; // within the default 35 days of lateness

    ingest(&c, json!(event("late1", "calls", json!(5)))).await;
    ingest(&c, json!({"id": uid("late"), "customer": "late1", "meter": "calls", "quantity": 7, "timestamp": rfc3339(yesterday_noon)}))
        .await;
    ingest(&c, json!({"id": uid("late"), "customer": "late1", "meter": "calls", "quantity": 11, "timestamp": long_ago})).await;
    // Older than max_lateness: refused.
    let r =
        c.events(&json!({"id": uid("late"), "customer": "late1", "meter": "calls", "quantity": 13, "timestamp": today - 40 * DAY})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.code(), "invalid_event");

    let month = month_start(now);
    let mut month_used = 5;
    if yesterday_noon >= month {
        month_used += 7;
    }
    if long_ago >= month {
        month_used += 11;
    }
    let a = check(&c, "late1", "calls", json!(1)).await;
    assert_eq!(a["limits"][0]["window"], "day", "{a}");
    assert_eq!(a["limits"][0]["used"], json!(5), "{a}");
    assert_eq!(a["limits"][1]["window"], "month", "{a}");
    assert_eq!(a["limits"][1]["used"], json!(month_used), "{a}");
    let s = summary(&c, "late1").await;
    assert_eq!(row(&s, "calls", "day")["used"], json!(5), "{s}");
    assert_eq!(row(&s, "calls", "month")["used"], json!(month_used), "{s}");

    let q = format!("meter=calls&customer=late1&from={}&to={}&granularity=day", rfc3339(yesterday), rfc3339(today + DAY));
    let expected = json!([
        {"customer": "late1", "start": rfc3339(yesterday), "end": rfc3339(today), "value": 7},
        {"customer": "late1", "start": rfc3339(today), "end": rfc3339(today + DAY), "value": 5},
    ]);
    assert_eq!(usage(&c, &q).await["data"], expected);
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(usage(&c, &q).await["data"], expected);
    let q = format!("meter=calls&customer=late1&from={}&to={}&granularity=day", today - 35 * DAY, today + DAY);
    let data = usage(&c, &q).await["data"].clone();
    let values: Vec<&Value> = data.as_array().unwrap().iter().map(|p| &p["value"]).collect();
    assert_eq!(values, vec![&json!(11), &json!(7), &json!(5)], "{data}");
    assert_eq!(data[0]["start"], json!(rfc3339(day_start(long_ago))));
    // The counters are unchanged by the flush.
    let s = summary(&c, "late1").await;
    assert_eq!(row(&s, "calls", "day")["used"], json!(5), "{s}");
    assert_eq!(row(&s, "calls", "month")["used"], json!(month_used), "{s}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_usage_summary() {
    away_from_day_boundary().await;
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    ingest(&c, json!([event("sum1", "interview_minutes", num("290.5")), event("sum1", "interview_minutes", num("4.5"))])).await;
    ingest(&c, json!([event("sum1", "interviews", json!(1)), event("sum1", "detailed_analyses", json!(1))])).await;
    let now = now_ms();
    let (month_end, day_end) = (rfc3339(next_month_start(now)), rfc3339(day_start(now) + DAY));
    assert_eq!(
        summary(&c, "sum1").await,
        json!({
            "customer": "sum1",
            "plan": "starter",
            "meters": [
                {"meter": "interview_minutes", "window": "month", "used": 295, "held": 0, "limit": 300, "remaining": 5,
                 "percent": 98.33, "resets_at": month_end, "hard": true},
                {"meter": "interviews", "window": "day", "used": 1, "held": 0, "limit": 3, "remaining": 2,
                 "percent": 33.33, "resets_at": day_end, "hard": true},
                {"meter": "detailed_analyses", "window": "month", "used": 1, "held": 0, "limit": 5, "remaining": 4,
                 "percent": 20.0, "resets_at": month_end, "hard": true},
            ],
            "features": {"advanced_analytics": false}
        })
    );
    // Unknown customer: the default plan, zero usage.
    assert_eq!(
        summary(&c, "nobody-at-all").await,
        json!({
            "customer": "nobody-at-all",
            "plan": "starter",
            "meters": [
                {"meter": "interview_minutes", "window": "month", "used": 0, "held": 0, "limit": 300, "remaining": 300,
                 "percent": 0.0, "resets_at": month_end, "hard": true},
                {"meter": "interviews", "window": "day", "used": 0, "held": 0, "limit": 3, "remaining": 3,
                 "percent": 0.0, "resets_at": day_end, "hard": true},
                {"meter": "detailed_analyses", "window": "month", "used": 0, "held": 0, "limit": 5, "remaining": 5,
                 "percent": 0.0, "resets_at": month_end, "hard": true},
            ],
            "features": {"advanced_analytics": false}
        })
    );
    // Premium: unlimited rows have null limit, remaining and percent.
    let r = c.put_json("/v1/customers/sum2/entitlements", &json!({"plan": "premium"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    ingest(&c, json!(event("sum2", "interview_minutes", num("12.34")))).await;
    let s = summary(&c, "sum2").await;
    assert_eq!(s["plan"], "premium");
    assert_eq!(s["features"], json!({"advanced_analytics": true}));
    let m = row(&s, "interview_minutes", "month");
    assert_eq!(m["used"], num("12.34"), "{s}");
    assert_eq!(m["limit"], Value::Null);
    assert_eq!(m["remaining"], Value::Null);
    assert_eq!(m["percent"], Value::Null);
    server.stop().await;
}

/// Folds `(customer, ts, raw)` events into expected series points.
fn expected_series(events: &[(&str, i64, i64)], granularity: i64, from: i64, to: i64) -> Value {
    let mut points: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (customer, ts, raw) in events {
        if *ts < from || *ts >= to {
            continue;
        }
        *points.entry((customer.to_string(), ts.div_euclid(granularity) * granularity)).or_default() += raw;
    }
    Value::Array(
        points
            .into_iter()
            .map(|((customer, start), raw)| {
                json!({"customer": customer, "start": rfc3339(start), "end": rfc3339(start + granularity), "value": cents(raw)})
            })
            .collect(),
    )
}

const SLOW_FLUSH: &str = r#"
[storage]
flush_interval = "1h"

[[meters]]
name = "interview_minutes"
aggregation = "sum"
precision = 2

[[plans]]
name = "free"
default = true
[plans.limits]
interview_minutes = { limit = 100000, window = "month" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_history_series_merge_store_and_memory() {
    let server = TestServer::start(SLOW_FLUSH).await;
    let c = server.client();
    let engine = server.app().engine.clone();
    // The flusher's first tick comes at once; let it pass (with nothing to flush)
    // so that the first queries below see only in-memory usage.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hour = now_ms().div_euclid(HOUR) * HOUR;
    let h = hour - 3 * HOUR; // three hours ago, aligned
    let mut events: Vec<(&str, i64, i64)> = vec![
        ("hist_a", h + 10_000, 150),
        ("hist_a", h + 50_000, 225),
        ("hist_a", h + MINUTE, 300),
        ("hist_a", h + HOUR + 5 * MINUTE, 400),
        ("hist_b", h + 30 * MINUTE, 1000),
        ("hist_b", h + 2 * HOUR + 59 * MINUTE + 59_000, 1),
    ];
    let send = |batch: Vec<(&'static str, i64, i64)>| {
        let c = c.clone();
        async move {
            let body: Vec<Value> = batch
                .iter()
                .map(|(cust, ts, raw)| {
                    json!({"id": uid("h"), "customer": cust, "meter": "interview_minutes", "quantity": cents(*raw), "timestamp": ts})
                })
                .collect();
            ingest(&c, Value::Array(body)).await;
        }
    };
    send(events.clone()).await;

    let (from, to) = (h, hour + HOUR);
    let verify = |events: Vec<(&'static str, i64, i64)>| {
        let c = c.clone();
        async move {
            for (g, name) in [(MINUTE, "minute"), (HOUR, "hour"), (DAY, "day")] {
                let all = usage(&c, &format!("meter=interview_minutes&from={from}&to={to}&granularity={name}")).await;
                assert_eq!(all["meter"], "interview_minutes");
                assert_eq!(all["granularity"], name);
                let lo = from.div_euclid(g) * g;
                assert_eq!(all["data"], expected_series(&events, g, lo, to), "all customers by {name}");
                let one = usage(&c, &format!("meter=interview_minutes&customer=hist_a&from={from}&to={to}&granularity={name}")).await;
                let mine: Vec<_> = events.iter().copied().filter(|e| e.0 == "hist_a").collect();
                assert_eq!(one["data"], expected_series(&mine, g, lo, to), "hist_a by {name}");
            }
        }
    };
    // Not flushed yet (the flush interval is an hour).
    let stored_seq = || async { engine.usage_store().max_flush_seq(engine.instance_id()).await.expect("store") };
    assert_eq!(stored_seq().await, 0);
    verify(events.clone()).await;
    assert_eq!(stored_seq().await, 0, "a flush ran during the in-memory queries");
    // Flushed.
    assert!(meterd::flush::flush_all(&engine).await.expect("flush") > 0);
    verify(events.clone()).await;
    // Partly stored, partly in memory, in the same buckets.
    let more = vec![("hist_a", h + 20_000, 5), ("hist_b", h + 30 * MINUTE + 1, 7), ("hist_c", h + HOUR, 99)];
    send(more.clone()).await;
    events.extend(more);
    verify(events.clone()).await;
    meterd::flush::flush_all(&engine).await.expect("flush");
    verify(events.clone()).await;
    // A sub-range: from is rounded down to the bucket, to is exclusive.
    let r = usage(&c, &format!("meter=interview_minutes&customer=hist_a&from={}&to={}&granularity=minute", h + 30_000, h + MINUTE)).await;
    assert_eq!(r["data"], json!([{"customer": "hist_a", "start": rfc3339(h), "end": rfc3339(h + MINUTE), "value": cents(380)}]));
    server.stop().await;
}

const FAST_FLUSH: &str = r#"
[storage]
flush_interval = "3ms"

[[meters]]
name = "calls"
aggregation = "sum"

[[plans]]
name = "free"
default = true
[plans.limits]
calls = { limit = 1000000, window = "total" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_history_never_double_counts_across_flushes() {
    let server = TestServer::start(FAST_FLUSH).await;
    let c = server.client();
    let from = now_ms() - DAY;
    let to = now_ms() + DAY;
    let mut total = 0;
    for i in 1..=60 {
        ingest(&c, json!([event("ff", "calls", json!(i)), event("ff2", "calls", json!(1))])).await;
        total += i;
        // Query while the flusher swaps and stores epochs every few milliseconds.
        let r = usage(&c, &format!("meter=calls&customer=ff&from={from}&to={to}&granularity=day")).await;
        let sum: i64 = r["data"].as_array().unwrap().iter().map(|p| p["value"].as_i64().unwrap()).sum();
        assert_eq!(sum, total, "after {i} batches: {r}");
        let r = usage(&c, &format!("meter=calls&from={from}&to={to}&granularity=day")).await;
        let sum: i64 = r["data"].as_array().unwrap().iter().map(|p| p["value"].as_i64().unwrap()).sum();
        assert_eq!(sum, total + i, "after {i} batches, all customers: {r}");
        let s = summary(&c, "ff").await;
        assert_eq!(row(&s, "calls", "total")["used"], json!(total));
        assert_eq!(row(&s, "calls", "total")["resets_at"], Value::Null);
    }
    server.stop().await;
}
