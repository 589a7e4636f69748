//! `/metrics` of a fresh process with Redis: `meterd_redis_up` is 1 from the
//! start (it is set at connect, which once ran before the recorder existed and
//! was lost), the Redis series are registered at zero, and the supervised Redis
//! tasks show as running; `meterd_leased_decisions_total` counts every
//! leased consume, local or with a round trip.
//!
//! One test in this file: the metrics recorder is per process.

mod common;

use common::redis_server::RedisServer;
use common::require::need;
use common::TestServer;

const CONFIG: &str = r#"
[[meters]]
name = "calls"
aggregation = "count"

[[meters]]
name = "gpu"
aggregation = "sum"

[[plans]]
name = "small"
default = true
[plans.limits]
calls = { limit = 60, window = "month" }
gpu = { limit = 100, window = "month", enforcement = "leased" }
"#;

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_series_are_there_from_the_start_and_redis_up_is_true() {
    let redis = need!(RedisServer::start(false).await);
    let config = format!("[redis]\nurl = \"{}\"\nsync_interval = \"100ms\"\n{CONFIG}", redis.url());
    let server = TestServer::start(&config).await;
    let text = server.client().get("/metrics").await.text;
    assert_eq!(value(&text, "meterd_redis_up"), Some(1.0), "{text}");
    for series in [
        "meterd_redis_sync_errors_total",
        "meterd_redis_pending_keys",
        "meterd_redis_pending_units",
        r#"meterd_entitlement_reloads_total{trigger="message"}"#,
        r#"meterd_events_total{meter="calls",result="accepted"}"#,
        r#"meterd_leased_decisions_total{where="local"}"#,
        r#"meterd_leased_decisions_total{where="redis"}"#,
    ] {
        assert_eq!(value(&text, series), Some(0.0), "{series} is not at 0:\n{text}");
    }
    assert!(value(&text, "meterd_redis_sync_keys_total").is_some(), "{text}");
    for task in ["flusher", "entitlement_listener", "counter_syncer"] {
        let series = format!(r#"meterd_task_running{{task="{task}"}}"#);
        assert_eq!(value(&text, &series), Some(1.0), "{series}:\n{text}");
        let series = format!(r#"meterd_task_restarts_total{{task="{task}"}}"#);
        assert_eq!(value(&text, &series), Some(0.0), "{series}:\n{text}");
    }
    for absent in ["meterd_stripe_", "meterd_raw_export_"] {
        assert!(!text.lines().any(|l| l.starts_with(absent)), "{absent}* should be absent:\n{text}");
    }
    // Leased consumes: no slice while Redis is younger than two lease ttls
    // (1 s each at this sync interval), then 30 consumes of 3 against 100.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let client = server.client();
    let mut granted = 0;
    for i in 0..30 {
        let r = client
            .check(&serde_json::json!({"customer": "lease-m", "meter": "gpu", "quantity": 3, "consume": true, "id": format!("g-{i}")}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        granted += i64::from(r.body["allowed"] == serde_json::json!(true));
    }
    assert_eq!(granted, 30, "30 consumes of 3 fit 100");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = client.get("/metrics").await.text;
        let local = value(&text, r#"meterd_leased_decisions_total{where="local"}"#).unwrap_or(0.0);
        let remote = value(&text, r#"meterd_leased_decisions_total{where="redis"}"#).unwrap_or(0.0);
        if local + remote == 30.0 {
            assert!(local >= 1.0 && remote >= 1.0, "the first consume takes a slice, later ones use it: {local} / {remote}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "leased decisions never reached 30: {local} local + {remote} redis\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop().await;
}
