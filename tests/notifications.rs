//! Threshold notifications (issue 17) end to end: a real meterd in-process, a
//! real webhook receiver that verifies every signature with the reference
//! `standardwebhooks` crate.

mod common;
mod notifications_support;

use common::{away_from_hour_boundary, event, ingest, put, uid, TestServer};
use notifications_support::{notifications, thresholds, Receiver};
use serde_json::json;
use std::time::Duration;

const METERS: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"
[[meters]]
name = "calls"
aggregation = "sum"
[[meters]]
name = "quiet"
aggregation = "sum"
[[meters]]
name = "free"
aggregation = "sum"

[[plans]]
name = "starter"
default = true
[plans.limits]
minutes = { limit = 100, window = "month" }
calls = { limit = 10, window = "month", hard = false, notify = [50] }
quiet = { limit = 10, window = "month", notify = [] }
free = { limit = "unlimited" }
"#;

fn config(url: &str, env: &str, extra: &str) -> String {
    format!("{}{METERS}", notifications(url, env, extra))
}

/// Settles: gives the delivery loop time to send whatever it would send.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_fire_once_and_only_the_highest_on_a_jump() {
    away_from_hour_boundary().await;
    let rx = Receiver::start().await;
    let s = TestServer::start(&config(&rx.url(), "METERD_TEST_WH_1", "")).await;
    let c = s.client();
    let cust = uid("u");
    ingest(&c, json!([event(&cust, "minutes", 74)])).await;
    settle().await;
    assert_eq!(thresholds(&rx.all(), &cust), Vec::<i64>::new(), "74 % reaches nothing");
    ingest(&c, json!([event(&cust, "minutes", 1)])).await;
    let got = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 1).await;
    assert_eq!(thresholds(&got, &cust), [75]);
    ingest(&c, json!([event(&cust, "minutes", 20)])).await; // 95: passes 90 only
    let got = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 2).await;
    assert_eq!(thresholds(&got, &cust), [75, 90]);
    ingest(&c, json!([event(&cust, "minutes", 15)])).await; // 110
    let got = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 3).await;
    assert_eq!(thresholds(&got, &cust), [75, 90, 100]);
    // More usage in the same window sends nothing more.
    ingest(&c, json!([event(&cust, "minutes", 50)])).await;
    settle().await;
    assert_eq!(thresholds(&rx.all(), &cust), [75, 90, 100], "each threshold once per window");
    assert!(rx.bad_signatures().is_empty(), "every signature verifies");

    let last = &got[2].body;
    assert_eq!(last["data"]["limit"], 100);
    assert_eq!(last["data"]["used"], 110);
    assert_eq!(last["data"]["percent"], 110.0);
    assert_eq!(last["data"]["hard"], true);
    assert_eq!(last["data"]["plan"], "starter");
    assert_eq!(last["data"]["window"], "month");
    assert!(last["data"]["window_start"].as_str().is_some_and(|s| s.ends_with("-01T00:00:00Z")), "{last}");
    assert!(last["data"]["resets_at"].is_string(), "{last}");
    let ids: std::collections::HashSet<_> = got.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids.len(), 3, "one webhook-id per notification");

    let listed = c.get(&format!("/v1/notifications?customer={cust}")).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let rows = listed.body["notifications"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 3, "{}", listed.text);
    assert!(rows.iter().all(|r| r["status"] == "delivered" && r["attempts"] == 1 && r["endpoint"] == "app"), "{}", listed.text);
    assert_eq!(rows[0]["data"]["threshold"], 100, "newest first: {}", listed.text);
    assert_eq!(c.get("/v1/notifications?status=nope").await.status, 400);
    assert_eq!(c.get("/v1/notifications?limit=0").await.status, 400);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_limit_notify_soft_limits_and_unlimited() {
    away_from_hour_boundary().await;
    let rx = Receiver::start().await;
    let s = TestServer::start(&config(&rx.url(), "METERD_TEST_WH_2", "")).await;
    let c = s.client();
    let cust = uid("u");
    // calls: soft limit 10 with notify = [50]; quiet: notify = []; free: unlimited.
    ingest(&c, json!([event(&cust, "calls", 12), event(&cust, "quiet", 12), event(&cust, "free", 1_000_000)])).await;
    let got = rx.wait_for(Duration::from_secs(10), |d| !thresholds(d, &cust).is_empty()).await;
    settle().await;
    let all = rx.all();
    let mine: Vec<_> = all.iter().filter(|d| d.body["data"]["customer"] == cust.as_str()).collect();
    assert_eq!(mine.len(), 1, "only the soft limit's own 50 %: {mine:?}");
    assert_eq!(got[0].body["data"]["meter"], "calls");
    assert_eq!(got[0].body["data"]["threshold"], 50);
    assert_eq!(got[0].body["data"]["hard"], false);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_same_webhook_id_until_it_recovers() {
    away_from_hour_boundary().await;
    let rx = Receiver::start().await;
    rx.fail_first(3);
    let s = TestServer::start(&config(&rx.url(), "METERD_TEST_WH_3", "")).await;
    let c = s.client();
    let cust = uid("u");
    ingest(&c, json!([event(&cust, "minutes", 80)])).await;
    let got = rx.wait_for(Duration::from_secs(20), |d| thresholds(d, &cust).len() == 1).await;
    assert_eq!(thresholds(&got, &cust), [75]);
    let attempts: Vec<_> = rx.all().into_iter().filter(|d| d.body["data"]["customer"] == cust.as_str()).collect();
    assert_eq!(attempts.len(), 4, "three failures, then the success: {attempts:?}");
    assert!(attempts.iter().all(|a| a.id == got[0].id && a.verified), "the same webhook-id on every attempt");
    assert_eq!(attempts.iter().map(|a| a.status).collect::<Vec<_>>(), [503, 503, 503, 204]);
    let listed = c.get(&format!("/v1/notifications?customer={cust}")).await;
    let row = &listed.body["notifications"][0];
    assert_eq!((row["status"].as_str(), row["attempts"].as_i64()), (Some("delivered"), Some(4)), "{}", listed.text);
    assert_eq!(row["last_error"], "HTTP 503");

    // Redelivery: the same webhook-id once more.
    let id = got[0].id.clone();
    let admin = c.post_json(&format!("/v1/notifications/{id}/redeliver"), &json!({})).await;
    assert_eq!(admin.status, 202, "{}", admin.text);
    let again = rx.wait_for(Duration::from_secs(10), |d| d.iter().filter(|x| x.id == id).count() == 2).await;
    assert_eq!(again.iter().filter(|x| x.id == id).count(), 2);
    assert_eq!(c.post_json("/v1/notifications/ntf_nope/redeliver", &json!({})).await.status, 404);

    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_recovers_is_failed_after_retry_for() {
    let rx = Receiver::start().await;
    rx.set_down(true);
    let s = TestServer::start(&config(&rx.url(), "METERD_TEST_WH_4", "retry_for = \"2s\"")).await;
    let c = s.client();
    let cust = uid("u");
    ingest(&c, json!([event(&cust, "minutes", 100)])).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let row = loop {
        let listed = c.get(&format!("/v1/notifications?customer={cust}&status=failed")).await;
        if let Some(row) = listed.body["notifications"].as_array().and_then(|a| a.first().cloned()) {
            break row;
        }
        assert!(std::time::Instant::now() < deadline, "never failed: {}", c.get("/v1/notifications").await.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(row["attempts"].as_i64().is_some_and(|n| n >= 2), "{row}");
    assert_eq!(row["last_error"], "HTTP 503");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_limit_rearms() {
    away_from_hour_boundary().await;
    let rx = Receiver::start().await;
    let s = TestServer::start(&config(&rx.url(), "METERD_TEST_WH_5", "")).await;
    let c = s.client();
    let cust = uid("u");
    ingest(&c, json!([event(&cust, "minutes", 80)])).await;
    rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 1).await;
    // Limit 100 → 80: 80 is 100 % of the new limit; the new value re-arms.
    let r = put(&c, &cust, json!({"overrides": {"minutes": {"limit": 80, "window": "month"}}})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let got = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 2).await;
    assert_eq!(thresholds(&got, &cust), [75, 100]);
    assert_eq!(got[1].body["data"]["limit"], 80);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_window_rearms_and_an_ended_window_never_notifies() {
    let rx = Receiver::start().await;
    let meters = "[[meters]]\nname = \"rpm\"\naggregation = \"sum\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nrpm = { limit = 10, window = \"minute\" }\n";
    let s = TestServer::start(&format!("{}{meters}", notifications(&rx.url(), "METERD_TEST_WH_6", ""))).await;
    let c = s.client();
    // Stay clear of a minute's last seconds.
    let into = common::now_ms().rem_euclid(60_000);
    if into > 45_000 {
        tokio::time::sleep(Duration::from_millis((61_000 - into) as u64)).await;
    }
    let (cust, late) = (uid("u"), uid("late"));
    ingest(&c, json!([event(&cust, "rpm", 10)])).await;
    let first = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 1).await;
    assert_eq!(thresholds(&first, &cust), [100]);
    // Next minute: the same usage notifies again, with another id and window start.
    let into = common::now_ms().rem_euclid(60_000);
    tokio::time::sleep(Duration::from_millis((60_500 - into) as u64)).await;
    let prev_minute = common::now_ms() - 30_000;
    ingest(&c, json!([event(&cust, "rpm", 10)])).await;
    // A late event into the minute that ended reaches 100 % there: never notified.
    ingest(&c, json!([{"id": uid("e"), "customer": late, "meter": "rpm", "quantity": 10, "timestamp": common::rfc3339(prev_minute)}]))
        .await;
    let got = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 2).await;
    assert_eq!(thresholds(&got, &cust), [100, 100]);
    let mine: Vec<_> = got.iter().filter(|d| d.body["data"]["customer"] == cust.as_str()).collect();
    assert_ne!(mine[0].id, mine[1].id);
    assert_ne!(mine[0].body["data"]["window_start"], mine[1].body["data"]["window_start"]);
    settle().await;
    assert_eq!(thresholds(&rx.all(), &late), Vec::<i64>::new(), "an ended window never notifies");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_does_not_delay_another() {
    away_from_hour_boundary().await;
    // Accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hang_addr = hang.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            open.push(s);
        }
    });
    let rx = Receiver::start().await;
    std::env::set_var("METERD_TEST_WH_7B", notifications_support::SECRET);
    let text = format!(
        "{}[[notifications.endpoints]]\nname = \"slow\"\nurl = \"http://{hang_addr}/hook\"\nsecret_env = \"METERD_TEST_WH_7B\"\n{METERS}",
        notifications(&rx.url(), "METERD_TEST_WH_7", "timeout = \"30s\"")
    );
    let s = TestServer::start(&text).await;
    let c = s.client();
    let cust = uid("u");
    // Several crossings, so the slow endpoint has attempts in flight.
    for q in [75, 15, 10] {
        ingest(&c, json!([event(&cust, "minutes", q)])).await;
    }
    let started = std::time::Instant::now();
    let got = rx.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 3).await;
    assert_eq!(thresholds(&got, &cust), [75, 90, 100]);
    assert!(started.elapsed() < Duration::from_secs(5), "the fast endpoint waited {:?}", started.elapsed());
    let slow = c.get(&format!("/v1/notifications?customer={cust}&status=pending")).await;
    let pending = slow.body["notifications"].as_array().cloned().unwrap_or_default();
    assert_eq!(pending.len(), 3, "the hanging endpoint's rows are still pending: {}", slow.text);
    assert!(pending.iter().all(|r| r["endpoint"] == "slow"), "{}", slow.text);
    held.abort();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_endpoints_live_and_refuses_new_thresholds() {
    away_from_hour_boundary().await;
    let (a, b) = (Receiver::start().await, Receiver::start().await);
    // One limit in the plan: reload compares plans by their Debug text, which
    // orders a plan's limits by HashMap order (two parses of several limits may
    // differ; reported to the lead).
    let one = "[[meters]]\nname = \"minutes\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nminutes = { limit = 100, window = \"month\" }\n";
    let config = |url: &str, env: &str, extra: &str| format!("{}{one}", notifications(url, env, extra));
    let s = TestServer::start(&config(&a.url(), "METERD_TEST_WH_8", "")).await;
    let c = s.client();
    let valid = |text: &str| {
        let text = common::with_dirs(text, s.dir.path());
        meterd::config::Config::parse(&text, "t.toml").and_then(|c| c.validate("t.toml")).expect("valid")
    };
    let applied = s.app().reloader.apply(valid(&config(&b.url(), "METERD_TEST_WH_8", "")));
    assert!(applied.as_ref().is_ok_and(|a| a.parts.contains(&"notifications.endpoints")), "{applied:?}");
    let cust = uid("u");
    ingest(&c, json!([event(&cust, "minutes", 80)])).await;
    let got = b.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 1).await;
    assert_eq!(thresholds(&got, &cust), [75], "the new endpoint gets it");
    assert!(thresholds(&a.all(), &cust).is_empty(), "the old endpoint does not");
    let refused = s.app().reloader.apply(valid(&config(&b.url(), "METERD_TEST_WH_8", "thresholds = [50]")));
    assert!(format!("{refused:?}").contains("notifications.thresholds"), "{refused:?}");
    s.stop().await;
}
