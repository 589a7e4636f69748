//! `/metrics` of a fresh process: every documented series is there at zero
//! before any traffic (none of a part that is not configured), with the build
//! and process series; the `meter` label counts per configured meter.
//!
//! One test in this file: the metrics recorder is per process, and the test
//! needs one nothing else has counted into.

mod common;

use common::{check, event, ingest, TestServer, INTERVIEW};
use serde_json::json;

const METERS: [&str; 4] = ["interview_minutes", "interviews", "detailed_analyses", "video_reviews"];
const REASONS: [&str; 6] = ["within_limit", "limit_exceeded", "soft_limit_exceeded", "unlimited", "not_entitled", "unavailable"];

/// The value of the one line that starts with `series` followed by a space.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_process_lists_every_documented_series_at_zero() {
    // A spacing longer than a consume's round trip: a hold would show below.
    let config = INTERVIEW.replacen("[storage]\n", "[storage]\nwal_sync_spacing = \"10ms\"\n", 1);
    assert_ne!(config, INTERVIEW);
    let server = TestServer::start(&config).await;
    let c = server.client();
    let r = c.get("/metrics").await;
    assert_eq!(r.status, 200);
    let text = r.text;

    // Counters: exactly 0.
    let mut zero: Vec<String> = [
        "meterd_flush_rows_total",
        "meterd_flush_errors_total",
        "meterd_flush_rejected_rows_total",
        "meterd_rate_limited_total",
        "meterd_flush_duration_seconds_count",
        "meterd_ingest_batch_size_count",
        "meterd_wal_sync_duration_seconds_count",
        "meterd_wal_group_records_count",
        "meterd_wal_sync_hold_seconds_count",
        r#"meterd_wal_sync_holds_total{ended="spacing"}"#,
        r#"meterd_wal_sync_holds_total{ended="open"}"#,
        r#"meterd_wal_sync_holds_total{ended="closed"}"#,
        r#"meterd_events_total{meter="",result="rejected"}"#,
    ]
    .map(String::from)
    .to_vec();
    for meter in METERS {
        for result in ["accepted", "duplicate"] {
            zero.push(format!(r#"meterd_events_total{{meter="{meter}",result="{result}"}}"#));
        }
        for reason in REASONS {
            for consume in ["false", "true"] {
                zero.push(format!(r#"meterd_decisions_total{{meter="{meter}",reason="{reason}",consume="{consume}"}}"#));
            }
        }
    }
    for series in &zero {
        assert_eq!(value(&text, series), Some(0.0), "{series} is not at 0:\n{text}");
    }
    // Gauges: present (the housekeeping sets some before the render).
    for series in [
        "meterd_active_counters",
        "meterd_customers",
        "meterd_pending_buckets",
        "meterd_dedupe_ids",
        "meterd_flush_lag_seconds",
        "meterd_wal_bytes",
        "meterd_wal_checkpoint",
        "meterd_writes_refused",
    ] {
        assert!(value(&text, series).is_some(), "{series} missing:\n{text}");
    }
    // Bounded dedupe (issue 15).
    for series in ["meterd_dedupe_spilled_ids", "meterd_dedupe_ram_bytes", "meterd_dedupe_spill_failures_total"] {
        assert_eq!(value(&text, series), Some(0.0), "{series} missing or not 0:\n{text}");
    }
    // Bounded counters and interner (issue 15, point 4).
    for series in ["meterd_window_counters_evicted_total", "meterd_customers_refused_total"] {
        assert_eq!(value(&text, series), Some(0.0), "{series} missing or not 0:\n{text}");
    }
    // No Redis, Stripe or raw-events export here: none of their series.
    for absent in ["meterd_redis_", "meterd_stripe_", "meterd_raw_export_", "meterd_entitlement_reloads_total"] {
        assert!(!text.lines().any(|l| l.starts_with(absent)), "{absent}* should be absent:\n{text}");
    }
    let build = format!(r#"meterd_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&text, &build), Some(1.0), "{text}");
    for series in ["process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds", "process_max_fds"] {
        assert!(value(&text, series).is_some_and(|v| v > 0.0), "{series} missing or 0:\n{text}");
    }
    assert!(value(&text, "process_cpu_seconds_total").is_some(), "{text}");

    // Traffic moves the series of its meter only.
    let dup = json!({"id": "m-dup", "customer": "m1", "meter": "interviews", "quantity": 1});
    ingest(&c, json!([event("m1", "interviews", 1), event("m1", "interview_minutes", 3), dup.clone()])).await;
    ingest(&c, json!([dup])).await;
    assert_eq!(check(&c, "m1", "interviews", 1).await["reason"], "within_limit");
    assert_eq!(check(&c, "m1", "video_reviews", 1).await["reason"], "not_entitled");
    let bad = c.events(&json!([event("m1", "interviews", 1), {"id": "x", "customer": "m1", "meter": "nope"}])).await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    let text = c.get("/metrics").await.text;
    let at = |series: &str| value(&text, series);
    assert_eq!(at(r#"meterd_events_total{meter="interviews",result="accepted"}"#), Some(2.0), "{text}");
    assert_eq!(at(r#"meterd_events_total{meter="interviews",result="duplicate"}"#), Some(1.0));
    assert_eq!(at(r#"meterd_events_total{meter="interview_minutes",result="accepted"}"#), Some(1.0));
    assert_eq!(at(r#"meterd_events_total{meter="detailed_analyses",result="accepted"}"#), Some(0.0));
    assert_eq!(at(r#"meterd_events_total{meter="",result="rejected"}"#), Some(1.0));
    assert_eq!(at(r#"meterd_decisions_total{meter="interviews",reason="within_limit",consume="false"}"#), Some(1.0));
    assert_eq!(at(r#"meterd_decisions_total{meter="video_reviews",reason="not_entitled",consume="false"}"#), Some(1.0));
    assert_eq!(at(r#"meterd_decisions_total{meter="interview_minutes",reason="within_limit",consume="false"}"#), Some(0.0));

    // The WAL's series (durability "fsync"): consumes made one after another are
    // a group and a sync each; concurrent ones share groups, and every record
    // is counted once. A refused consume writes no record.
    const GROUPS: &str = "meterd_wal_group_records_count";
    const RECORDS: &str = "meterd_wal_group_records_sum";
    const SYNCS: &str = "meterd_wal_sync_duration_seconds_count";
    let series = |text: &str| [GROUPS, RECORDS, SYNCS].map(|s| value(text, s).unwrap_or(-1.0));
    let consume =
        |i: usize| json!({"customer": "m2", "meter": "interview_minutes", "quantity": 1, "consume": true, "id": format!("w-{i}")});
    let allowed = |r: &common::Resp| {
        assert_eq!(r.status, 200, "{}", r.text);
        serde_json::from_str::<serde_json::Value>(&r.text).is_ok_and(|v| v["allowed"] == true)
    };
    let [g0, r0, s0] = series(&c.get("/metrics").await.text);
    assert!(g0 >= 1.0 && r0 >= g0 && s0 >= g0, "the ingest above wrote a record: {g0} {r0} {s0}");
    for i in 0..5 {
        assert!(allowed(&c.check(&consume(i)).await));
    }
    let text = c.get("/metrics").await.text;
    let [g1, r1, s1] = series(&text);
    assert_eq!((g1 - g0, r1 - r0, s1 - s0), (5.0, 5.0, 5.0), "{text}");
    // Every group so far held one record: none was held back (sync spacing).
    assert_eq!(value(&text, "meterd_wal_sync_hold_seconds_count"), Some(0.0), "{text}");
    assert!(value(&text, "meterd_wal_sync_duration_seconds_sum").is_some_and(|s| s > 0.0), "{text}");
    let racing: Vec<_> = (5..37)
        .map(|i| {
            let (c, body) = (server.client(), consume(i));
            tokio::spawn(async move { c.check(&body).await })
        })
        .collect();
    let mut records = 0.0;
    for task in racing {
        let r = task.await.expect("consume task");
        records += if allowed(&r) { 1.0 } else { 0.0 };
    }
    assert!(records >= 30.0, "most of the concurrent consumes fit the plan: {records}");
    let text = c.get("/metrics").await.text;
    let [g2, r2, s2] = series(&text);
    assert_eq!(r2 - r1, records, "every record once: {text}");
    assert!((1.0..=records).contains(&(g2 - g1)) && s2 - s1 == g2 - g1, "a group and a sync each: {g2} {s2}\n{text}");
    let holds = value(&text, "meterd_wal_sync_hold_seconds_count").unwrap_or(-1.0);
    assert!((0.0..=g2 - g1).contains(&holds), "at most one hold per group: {holds} of {}\n{text}", g2 - g1);
    let ended: f64 = ["spacing", "open", "closed"]
        .iter()
        .map(|e| value(&text, &format!(r#"meterd_wal_sync_holds_total{{ended="{e}"}}"#)).unwrap_or(-100.0))
        .sum();
    assert_eq!(ended, holds, "every hold counted once by how it ended\n{text}");
    server.stop().await;
}
