//! The notification metrics, exactly (one test in its own binary: the metrics
//! recorder is per process).

mod common;
mod notifications_support;

use common::{away_from_hour_boundary, event, ingest, uid, TestServer};
use notifications_support::{notifications, thresholds, Receiver};
use serde_json::json;
use std::time::Duration;

fn value(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(name)
                && (l.len() == name.len() || l[name.len()..].starts_with([' ', '{']))
                && labels.iter().all(|x| l.contains(x))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_failed_retried_and_pending_are_counted() {
    away_from_hour_boundary().await;
    let ok = Receiver::start().await;
    ok.fail_first(2);
    let dead = Receiver::start().await;
    dead.set_down(true);
    std::env::set_var("METERD_TEST_WH_M2", notifications_support::SECRET);
    let text = format!(
        "{}[[notifications.endpoints]]\nname = \"dead\"\nurl = \"{}\"\nsecret_env = \"METERD_TEST_WH_M2\"\n\
         [[meters]]\nname = \"m\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nm = {{ limit = 10, window = \"month\" }}\n",
        notifications(&ok.url(), "METERD_TEST_WH_M1", "retry_for = \"8s\""),
        dead.url()
    );
    let s = TestServer::start(&text).await;
    let c = s.client();
    let before = c.get("/metrics").await.text;
    for name in ["meterd_notifications_sent_total", "meterd_notifications_failed_total", "meterd_notifications_retries_total"] {
        assert_eq!(value(&before, name, &["endpoint=\"dead\"", "type=\"credits.low\""]), Some(0.0), "registered at zero: {before}");
    }
    assert_eq!(value(&before, "meterd_notifications_pending", &[]), Some(0.0), "{before}");
    let cust = uid("u");
    ingest(&c, json!([event(&cust, "m", 10)])).await;
    let got = ok.wait_for(Duration::from_secs(10), |d| thresholds(d, &cust).len() == 1).await;
    assert_eq!(thresholds(&got, &cust), [100]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mid = c.get("/metrics").await.text;
    assert_eq!(value(&mid, "meterd_notifications_pending", &[]), Some(1.0), "the dead endpoint's row waits: {mid}");
    assert!(value(&mid, "meterd_notifications_oldest_pending_seconds", &[]).is_some_and(|a| a >= 1.0), "{mid}");
    // The dead endpoint fails after retry_for.
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let after = loop {
        let m = c.get("/metrics").await.text;
        if value(&m, "meterd_notifications_failed_total", &["endpoint=\"dead\"", "type=\"limit.threshold\""]) == Some(1.0) {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "never failed: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let app = ["endpoint=\"app\"", "type=\"limit.threshold\""];
    assert_eq!(value(&after, "meterd_notifications_created_total", &["type=\"limit.threshold\""]), Some(2.0), "one row per endpoint");
    assert_eq!(value(&after, "meterd_notifications_sent_total", &app), Some(1.0), "{after}");
    assert_eq!(value(&after, "meterd_notifications_retries_total", &app), Some(2.0), "{after}");
    assert_eq!(value(&after, "meterd_notifications_failed_total", &app), Some(0.0), "{after}");
    let dead_retries = value(&after, "meterd_notifications_retries_total", &["endpoint=\"dead\"", "type=\"limit.threshold\""]);
    assert!(dead_retries.is_some_and(|n| n >= 1.0), "{after}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let end = c.get("/metrics").await.text;
    assert_eq!(value(&end, "meterd_notifications_pending", &[]), Some(0.0), "{end}");
    s.stop().await;
}
