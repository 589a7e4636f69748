//! Disk trouble, with real file systems (small tmpfs mounts; needs root, as in
//! CI): a full disk under the WAL refuses batches with 503 and loses nothing; a
//! usage store that cannot write makes the WAL grow until ingest answers 503
//! while checks go on, and everything drains when the store recovers; a data
//! directory that cannot be written stops the start with a clear error.

mod common;

use common::mount::Tmpfs;
use common::require::need;
use common::{away_from_day_boundary, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

const METERS: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
tokens = { limit = 1000000000, window = "month" }
"#;

fn batch(tag: &str, n: usize, q: u64) -> Value {
    Value::Array((0..n).map(|i| json!({"id": format!("{tag}-{i}"), "customer": "c", "meter": "tokens", "quantity": q})).collect())
}

async fn used(server: &TestServer) -> u64 {
    let r = server.client().get("/v1/customers/c/usage").await;
    r.body["meters"][0]["used"].as_u64().unwrap_or(u64::MAX)
}

async fn stored_total(server: &TestServer) -> u64 {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(1)).format("%Y-%m-%dT00:00:00Z");
    let to = (now + chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let r = server.client().get(&format!("/v1/usage?meter=tokens&from={from}&to={to}&granularity=day&customer=c")).await;
    r.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_under_the_wal_refuses_with_503_and_loses_nothing() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let wal_fs = need!(Tmpfs::mount(&dir.path().join("wal"), "1m", false));
    let config = format!("[storage]\ndurability = \"fsync\"\nflush_interval = \"100ms\"\nwal_segment_bytes = 65536\n{METERS}");
    let server = TestServer::start_in(&config, dir).await;
    let c = server.client();
    assert_eq!(c.events(&batch("a", 50, 2)).await.status, 202);

    let filler = wal_fs.fill();
    // The disk is full: batches are refused, not half-taken, and the server lives.
    let mut refused = 0;
    for i in 0..5 {
        let r = c.events(&batch(&format!("full{i}"), 50, 3)).await;
        if r.status == 503 {
            assert_eq!(r.code(), "unavailable", "{}", r.text);
            assert!(r.headers.contains_key("retry-after"));
            refused += 1;
        } else {
            assert_eq!(r.status, 202, "{}", r.text);
        }
    }
    assert!(refused > 0, "a full disk refused nothing");
    let accepted_while_full = 5 - refused;
    // Checks still answer.
    let r = c.check(&json!({"customer": "c", "meter": "tokens", "quantity": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Space comes back: the same refused batches are accepted (not duplicates).
    std::fs::remove_file(&filler).expect("remove filler");
    for i in 0..5 {
        let r = c.events(&batch(&format!("full{i}"), 50, 3)).await;
        assert_eq!(r.status, 202, "{}", r.text);
    }
    let expected = 50 * 2 + 5 * 50 * 3;
    assert_eq!(used(&server).await, expected, "accepted while full: {accepted_while_full}");
    let server = server.restart().await;
    assert_eq!(used(&server).await, expected);
    assert_eq!(stored_total(&server).await, expected);
    // Every batch is now a duplicate, after the restart too.
    let r = server.client().events(&batch("full0", 50, 3)).await;
    assert_eq!(r.body["accepted"], json!(0), "{}", r.text);
    server.stop().await;
    drop(wal_fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_store_fills_the_wal_then_503_then_drains() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    // The store's file system is small; the WAL has its own, roomier one.
    let store_fs = need!(Tmpfs::mount(&data, "2m", false));
    let wal_fs = need!(Tmpfs::mount(&data.join("wal"), "8m", false));
    let config = format!(
        "[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"100ms\"\nwal_segment_bytes = 16384\nmax_wal_bytes = 65536\n{METERS}",
        data.display().to_string()
    );
    let server = start_with_data_dir(&config).await;
    let c = server.client();
    assert_eq!(c.events(&batch("before", 20, 1)).await.status, 202);
    tokio::time::sleep(Duration::from_millis(400)).await;

    // The store's disk fills up: flushes fail, the WAL keeps every batch.
    let filler = store_fs.fill();
    let mut accepted = 20;
    let mut first_503 = None;
    for i in 0..400 {
        let r = c.events(&batch(&format!("b{i}"), 20, 1)).await;
        match r.status.as_u16() {
            202 => accepted += 20,
            503 => {
                assert_eq!(r.code(), "unavailable");
                assert!(r.body["error"]["message"].as_str().unwrap_or("").contains("max_wal_bytes"), "{}", r.text);
                first_503 = Some(i);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert!(first_503.is_some(), "the WAL never reached max_wal_bytes");
    // It stays that way while the store cannot write (a healthy store would
    // drain within a flush interval or two), and the flush failures are counted.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ready = c.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert!(ready.text.contains("behind"), "{}", ready.text);
    let metrics = c.get("/metrics").await.text;
    let errors: f64 = metrics
        .lines()
        .find(|l| l.starts_with("meterd_flush_errors_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "no flush error was recorded:\n{metrics}");
    assert!(metrics.lines().any(|l| l == "meterd_writes_refused 1"), "refusal not shown in metrics:\n{metrics}");
    // Checks keep answering from memory, with every accepted event counted.
    let r = c.check(&json!({"customer": "c", "meter": "tokens", "quantity": 1})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["used"], json!(accepted));

    // The store recovers: the backlog drains by itself and ingest resumes.
    std::fs::remove_file(&filler).expect("remove filler");
    let mut drained = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.get("/readyz").await.status == 200 {
            drained = true;
            break;
        }
    }
    assert!(drained, "the WAL never drained after the store recovered");
    assert_eq!(c.events(&batch("after", 20, 1)).await.status, 202);
    accepted += 20;
    assert_eq!(stored_total(&server).await, accepted);
    let server = restart_with_data_dir(server, &config).await;
    assert_eq!(used(&server).await, accepted);
    assert_eq!(stored_total(&server).await, accepted);
    server.stop().await;
    drop(wal_fs);
    drop(store_fs);
}

/// Starts a server on the `data_dir` its config names (the harness would pick
/// its own temp dir).
async fn start_with_data_dir(config: &str) -> TestServer {
    let text = format!("[server]\nlisten = \"127.0.0.1:0\"\n{config}");
    let valid = meterd::config::Config::parse(&text, "t").and_then(|c| c.validate("t")).expect("config");
    let app = meterd::AppHandle::start(valid).await.expect("start");
    TestServer { addr: app.addr, app: Some(app), dir: tempfile::tempdir().expect("temp dir"), config: config.to_string() }
}

async fn restart_with_data_dir(mut server: TestServer, config: &str) -> TestServer {
    if let Some(app) = server.app.take() {
        app.shutdown().await.expect("shutdown");
    }
    start_with_data_dir(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_data_dir_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A data_dir below a regular file can never be created.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write");
    let text = format!("[storage]\ndata_dir = {:?}\n{METERS}", file.join("data").display().to_string());
    let valid = meterd::config::Config::parse(&text, "t").and_then(|c| c.validate("t")).expect("config");
    let err = meterd::AppHandle::start(valid).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("plain-file") && err.contains("data directory"), "{err}");

    // A read-only file system.
    let ro = dir.path().join("ro");
    let _fs = need!(Tmpfs::mount(&ro, "64k", true));
    let text = format!("[storage]\ndata_dir = {:?}\n{METERS}", ro.display().to_string());
    let valid = meterd::config::Config::parse(&text, "t").and_then(|c| c.validate("t")).expect("config");
    let err = meterd::AppHandle::start(valid).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("ro") && (err.contains("Read-only") || err.contains("read-only")), "{err}");
}
