//! Per-customer entitlements over HTTP: the resolved view, overrides, window kinds
//! only an override uses (seeded with earlier usage), billing anchors, bad PUTs.

mod common;

use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use common::{
    away_from_hour_boundary, check, event, ingest, next_month_start, now_ms, put, rfc3339, uid, Client, TestServer, DAY, HOUR, INTERVIEW,
};
use serde_json::{json, Value};

/// The first billing-cycle start after `now` for an anchor on `day` at
/// `secs` seconds past midnight, clamped to each month's last day.
fn next_anchor(now: i64, day: u32, secs: i64) -> i64 {
    let at = Utc.timestamp_millis_opt(now).unwrap();
    let (mut y, mut m) = (at.year(), at.month());
    loop {
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let days_in_month = (NaiveDate::from_ymd_opt(ny, nm, 1).unwrap() - NaiveDate::from_ymd_opt(y, m, 1).unwrap()).num_days() as u32;
        let start = Utc.with_ymd_and_hms(y, m, day.min(days_in_month), 0, 0, 0).unwrap().timestamp_millis() + secs * 1000;
        if start > now {
            return start;
        }
        (y, m) = (ny, nm);
    }
}

async fn get(c: &Client, customer: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/entitlements")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn limit(amount: Value, window: &str) -> Value {
    json!([{"limit": amount, "window": window, "hard": true, "enforcement": "cached"}])
}

fn starter_view(customer: &str) -> Value {
    json!({
        "customer": customer,
        "plan": "starter",
        "overrides": {},
        "features": {"advanced_analytics": false},
        "stripe_customer_id": null,
        "billing_anchor": null,
        "limits": {
            "interview_minutes": limit(json!(300), "month"),
            "interviews": limit(json!(3), "day"),
            "detailed_analyses": limit(json!(5), "month"),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_returns_the_resolved_view_and_takes_effect_at_once() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    assert_eq!(get(&c, "ent1").await, starter_view("ent1"));
    assert_eq!(check(&c, "ent1", "video_reviews", 1).await["reason"], "not_entitled");

    let doc = json!({
        "plan": "professional",
        "overrides": {"interviews": [{"limit": 12, "window": "day"}]},
        "features": {"advanced_analytics": true, "beta_reports": true},
        "stripe_customer_id": "cus_123",
        "billing_anchor": "2026-11-15T00:00:00Z"
    });
    let expected = json!({
        "customer": "ent1",
        "plan": "professional",
        "overrides": {"interviews": [{"limit": 12, "window": "day"}]},
        "features": {"advanced_analytics": true, "beta_reports": true},
        "stripe_customer_id": "cus_123",
        "billing_anchor": "2026-11-15T00:00:00Z",
        "limits": {
            "interview_minutes": limit(json!(800), "month"),
            "interviews": limit(json!(12), "day"),
            "detailed_analyses": limit(json!(25), "month"),
            "video_reviews": limit(json!(10), "month"),
        }
    });
    let r = put(&c, "ent1", doc).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, expected);
    assert_eq!(get(&c, "ent1").await, expected);

    // The next check sees it.
    let a = check(&c, "ent1", "video_reviews", 1).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["limit"], json!(10));
    assert_eq!(check(&c, "ent1", "interviews", 1).await["limit"], json!(12));
    assert_eq!(check(&c, "ent1", "interview_minutes", 801).await["allowed"], json!(false));
    let s = c.get("/v1/customers/ent1/usage").await.body;
    assert_eq!(s["plan"], "professional");
    assert_eq!(s["features"], json!({"advanced_analytics": true, "beta_reports": true}));
    assert_eq!(s["meters"].as_array().map(Vec::len), Some(4), "{s}");

    // PUT replaces everything: back to the plan alone.
    let r = put(&c, "ent1", json!({"plan": "starter"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, starter_view("ent1"));
    assert_eq!(get(&c, "ent1").await, starter_view("ent1"));
    assert_eq!(check(&c, "ent1", "video_reviews", 1).await["reason"], "not_entitled");

    // Premium: unlimited limits render as null, as checks show them, with no
    // window the plan did not give; an empty document is the default plan.
    let r = put(&c, "ent2", json!({"plan": "premium"})).await;
    assert_eq!(r.body["limits"]["interview_minutes"], json!([{"limit": null, "hard": true, "enforcement": "cached"}]), "{}", r.text);
    assert_eq!(r.body["features"], json!({"advanced_analytics": true}));
    let r = put(&c, "ent2", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, starter_view("ent2"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_has_one_representation_and_every_spelling_is_accepted() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let unlimited = json!([{"limit": null, "hard": true, "enforcement": "cached"}]);
    for (customer, spelling) in [("unl1", json!("unlimited")), ("unl2", json!(-1)), ("unl3", Value::Null)] {
        let r = put(&c, customer, json!({"overrides": {"interviews": {"limit": spelling}}})).await;
        assert_eq!(r.status, 200, "{spelling}: {}", r.text);
        assert_eq!(r.body["limits"]["interviews"], unlimited, "{spelling}: {}", r.text);
        assert_eq!(get(&c, customer).await["limits"]["interviews"], unlimited, "{spelling}");
        let a = check(&c, customer, "interviews", 1_000).await;
        assert_eq!((&a["reason"], &a["limit"], &a["remaining"]), (&json!("unlimited"), &Value::Null, &Value::Null), "{a}");
    }
    // An unlimited limit on a window that was given keeps it.
    let r = put(&c, "unl4", json!({"overrides": {"interviews": {"limit": null, "window": "day"}}})).await;
    assert_eq!(r.body["limits"]["interviews"], limit(Value::Null, "day"), "{}", r.text);
    // The view's limits PUT back as overrides give the same view.
    let view = get(&c, "unl1").await;
    let r = put(&c, "unl5", json!({"overrides": view["limits"]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["limits"], view["limits"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_replaces_the_plan_limits_for_that_meter() {
    away_from_hour_boundary().await;
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    ingest(&c, json!([event("ov1", "interviews", 1), event("ov1", "interviews", 1), event("ov1", "interviews", 1)])).await;
    assert_eq!(check(&c, "ov1", "interviews", 1).await["allowed"], json!(false));

    let r = put(&c, "ov1", json!({"overrides": {"interviews": {"limit": 10, "window": "day"}}})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["plan"], "starter");
    assert_eq!(r.body["limits"]["interviews"], limit(json!(10), "day"));
    assert_eq!(r.body["limits"]["interview_minutes"], limit(json!(300), "month"));
    let a = check(&c, "ov1", "interviews", 1).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["used"], json!(3));
    assert_eq!(a["limit"], json!(10));
    assert_eq!(a["remaining"], json!(7));
    let r = c.check(&json!({"customer": "ov1", "meter": "interviews", "quantity": 1, "consume": true, "id": "ov1-4th"})).await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    assert_eq!(r.body["used"], json!(4));

    // Several limits in an override replace the plan's single one.
    let r = put(
        &c,
        "ov1",
        json!({"overrides": {"interviews": [{"limit": 10, "window": "day"}, {"limit": 4, "window": "month", "hard": false}]}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = check(&c, "ov1", "interviews", 1).await;
    assert_eq!(a["allowed"], json!(true), "{a}");
    assert_eq!(a["reason"], "soft_limit_exceeded");
    assert_eq!(a["window"], "month");
    assert_eq!(a["used"], json!(4), "the month window counts the earlier interviews: {a}");
    assert_eq!(a["limits"].as_array().map(Vec::len), Some(2));

    // Removing the override restores the plan's 3 a day.
    let r = put(&c, "ov1", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = check(&c, "ov1", "interviews", 1).await;
    assert_eq!(a["allowed"], json!(false), "{a}");
    assert_eq!(a["used"], json!(4));
    assert_eq!(a["limit"], json!(3));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_with_a_new_window_kind_counts_earlier_usage() {
    away_from_hour_boundary().await;
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let engine = server.app().engine.clone();
    let flush = || async { meterd::flush::flush_all(&engine).await.expect("flush") };
    let now = now_ms();
    let hour_start = now.div_euclid(HOUR) * HOUR;
    let hour_end = rfc3339(hour_start + HOUR);

    // h1: all in memory, plus one interview in the previous hour (not counted).
    ingest(
        &c,
        json!([event("h1", "interviews", 1), event("h1", "interviews", 1), event("h1", "interviews", 1), event("h1", "interviews", 1)]),
    )
    .await;
    ingest(&c, json!({"id": uid("e"), "customer": "h1", "meter": "interviews", "timestamp": hour_start - 60_000})).await;
    // h2: partly stored, partly in memory.
    ingest(&c, json!([event("h2", "interviews", 1), event("h2", "interviews", 1)])).await;
    flush().await;
    ingest(&c, json!(event("h2", "interviews", 1))).await;
    // h3: all stored.
    ingest(&c, json!(event("h3", "interviews", 1))).await;
    flush().await;

    let hourly = json!({"overrides": {"interviews": {"limit": 5, "window": "hour"}}});
    for (customer, used) in [("h1", 4), ("h2", 3), ("h3", 1), ("h4", 0)] {
        let r = put(&c, customer, hourly.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["limits"]["interviews"], limit(json!(5), "hour"));
        let a = check(&c, customer, "interviews", 1).await;
        assert_eq!(
            a,
            json!({
                "allowed": true, "customer": customer, "meter": "interviews", "quantity": 1,
                "used": used, "held": 0, "limit": 5, "remaining": 5 - used, "window": "hour",
                "resets_at": hour_end, "hard": true, "reason": "within_limit",
                "limits": [{"window": "hour", "limit": 5, "used": used, "held": 0, "remaining": 5 - used,
                            "resets_at": hour_end, "hard": true}]
            }),
            "{customer}"
        );
    }
    // A flush moves the usage to the store; the counters do not change.
    flush().await;
    for (customer, used) in [("h1", 4), ("h2", 3), ("h3", 1), ("h4", 0)] {
        assert_eq!(check(&c, customer, "interviews", 1).await["used"], json!(used), "{customer}");
    }
    // New usage counts in the new window, once.
    ingest(&c, json!(event("h1", "interviews", 1))).await;
    let a = check(&c, "h1", "interviews", 1).await;
    assert_eq!(a["used"], json!(5), "{a}");
    assert_eq!(a["allowed"], json!(false), "{a}");
    let r = c.check(&json!({"customer": "h2", "meter": "interviews", "consume": true, "id": "h2-c1"})).await;
    assert_eq!(r.body["used"], json!(4), "{}", r.text);
    flush().await;
    assert_eq!(check(&c, "h2", "interviews", 1).await["used"], json!(4));
    // A customer without the override still has the plan's day limit.
    let a = check(&c, "h5", "interviews", 1).await;
    assert_eq!(a["window"], "day", "{a}");
    // A second override on a kind already seeded for others is seeded too.
    ingest(&c, json!([event("h6", "interviews", 1), event("h6", "interviews", 1)])).await;
    flush().await;
    let r = put(&c, "h6", hourly.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(check(&c, "h6", "interviews", 1).await["used"], json!(2));
    server.stop().await;
}

const BILLING: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"

[[plans]]
name = "free"
default = true
[plans.limits]
tokens = { limit = 100, window = "billing_cycle" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_anchor_sets_the_cycle() {
    away_from_hour_boundary().await;
    let server = TestServer::start(BILLING).await;
    let c = server.client();
    let now = now_ms();

    // No anchor: the calendar month.
    let a = check(&c, "b0", "tokens", 1).await;
    assert_eq!(a["window"], "billing_cycle", "{a}");
    assert_eq!(a["resets_at"], json!(rfc3339(next_month_start(now))));

    // Usage now and three days ago; an anchor of yesterday's date starts the cycle
    // yesterday, so only today's usage is in it.
    let three_days_ago = now - 3 * DAY;
    ingest(&c, json!(event("b1", "tokens", 30))).await;
    ingest(&c, json!({"id": uid("e"), "customer": "b1", "meter": "tokens", "quantity": 20, "timestamp": three_days_ago})).await;
    let this_month = {
        let at = Utc.timestamp_millis_opt(now).unwrap();
        Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0).unwrap().timestamp_millis()
    };
    let before = if three_days_ago >= this_month { 50 } else { 30 };
    assert_eq!(check(&c, "b1", "tokens", 1).await["used"], json!(before));

    let yesterday = Utc.timestamp_millis_opt(now - DAY).unwrap();
    let anchor = format!("{}T00:00:00Z", yesterday.format("%Y-%m-%d"));
    let r = put(&c, "b1", json!({"billing_anchor": anchor})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["billing_anchor"], json!(anchor));
    let expected_reset = rfc3339(next_anchor(now, yesterday.day(), 0));
    let a = check(&c, "b1", "tokens", 1).await;
    assert_eq!(a["used"], json!(30), "{a}");
    assert_eq!(a["resets_at"], json!(expected_reset), "{a}");
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(check(&c, "b1", "tokens", 1).await["used"], json!(30));
    ingest(&c, json!(event("b1", "tokens", 5))).await;
    assert_eq!(check(&c, "b1", "tokens", 1).await["used"], json!(35));
    let s = c.get("/v1/customers/b1/usage").await.body;
    assert_eq!(s["meters"][0]["window"], "billing_cycle", "{s}");
    assert_eq!(s["meters"][0]["used"], json!(35), "{s}");
    assert_eq!(s["meters"][0]["resets_at"], json!(expected_reset), "{s}");

    // An anchor on the 31st renews on the last day of shorter months.
    let r = put(&c, "b2", json!({"billing_anchor": "2025-01-31T00:00:00Z"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = check(&c, "b2", "tokens", 1).await;
    assert_eq!(a["resets_at"], json!(rfc3339(next_anchor(now, 31, 0))), "{a}");

    // The anchor's time of day is kept.
    let r = put(&c, "b3", json!({"billing_anchor": "2024-06-15T09:30:00Z"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a = check(&c, "b3", "tokens", 1).await;
    assert_eq!(a["resets_at"], json!(rfc3339(next_anchor(now, 15, 9 * 3600 + 30 * 60))), "{a}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_put_is_refused_and_changes_nothing() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let r = put(&c, "bad1", json!({"plan": "professional", "stripe_customer_id": "cus_9"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = get(&c, "bad1").await;
    assert_eq!(before["plan"], "professional");

    let cases = [
        (json!({"plan": "gold"}), "plan"),
        (json!({"plan": "starter", "overrides": {"nope": {"limit": 1, "window": "day"}}}), "overrides.nope"),
        (json!({"plan": "starter", "overrides": {"interviews": {"limit": 5, "window": "week"}}}), "overrides.interviews.window"),
        (json!({"plan": "starter", "overrides": {"interviews": {"limit": 5}}}), "overrides.interviews.window"),
        (
            json!({"plan": "starter", "overrides": {"interview_minutes": {"limit": 1.234, "window": "day"}}}),
            "overrides.interview_minutes.limit",
        ),
        (json!({"plan": "starter", "billing_anchor": "yesterday"}), "billing_anchor"),
        (json!({"plan": "starter", "colour": "red"}), "colour"),
        (json!({"plan": "starter", "features": {"sso": "yes"}}), "entitlements"),
        (json!({"plan": 7}), "entitlements"),
        (json!(["starter"]), "entitlements"),
    ];
    for (doc, field) in cases {
        let r = put(&c, "bad1", doc.clone()).await;
        assert_eq!(r.status, 400, "{doc}: {}", r.text);
        assert_eq!(r.code(), "invalid_request", "{doc}: {}", r.text);
        let message = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(field), "{doc}: message {message:?} should name {field:?}");
        assert_eq!(get(&c, "bad1").await, before, "{doc} changed the entitlements");
    }
    // Not JSON at all.
    let r = c.send(hyper::Method::PUT, "/v1/customers/bad1/entitlements", Some("application/json"), "{plan: starter").await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.code(), "invalid_json", "{}", r.text);
    assert_eq!(get(&c, "bad1").await, before);
    // Checks still see the previous state.
    assert_eq!(check(&c, "bad1", "video_reviews", 1).await["allowed"], json!(true));

    // A refused PUT for a new customer leaves it on the default plan.
    let r = put(&c, "bad2", json!({"plan": "gold"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(get(&c, "bad2").await, starter_view("bad2"));

    // Every problem is named at once.
    let r = put(&c, "bad1", json!({"plan": "gold", "billing_anchor": "x", "overrides": {"nope": 1}})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let fields: Vec<&str> =
        r.body["error"]["details"].as_array().map(|d| d.iter().filter_map(|p| p["field"].as_str()).collect()).unwrap_or_default();
    assert_eq!(fields.len(), 3, "{}", r.text);
    assert_eq!(get(&c, "bad1").await, before);
    server.stop().await;
}
