//! ClickHouse flush throughput and freshness: rows/s of one flush INSERT at
//! several sizes, and, while meterd ingests as fast as two tasks can push
//! batches of 1000 (in process, `durability = "fsync"`), the lag from a marker
//! event's 202 to its row being visible in ClickHouse.
//!
//! Needs a ClickHouse: run through the test harness, which starts one:
//! `METERD_TEST_CMD='cargo bench --bench clickhouse_flush' scripts/test`.
//! Without `METERD_TEST_CLICKHOUSE_URL` it prints a notice and measures nothing
//! (or fails under `METERD_TEST_REQUIRE_SERVICES`: tests/common/require.rs).

use meterd::config::Config;
use meterd::store::clickhouse::ClickHouseStore;
use meterd::store::{FlushBatch, Fold, UsageQuery, UsageRow, UsageStore};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/require.rs"]
mod require;

fn rows(n: usize, minute_ms: i64) -> Vec<UsageRow> {
    (0..n)
        .map(|i| UsageRow {
            meter: "tokens".into(),
            customer: format!("c{i}"),
            minute_ms,
            properties: vec![],
            value: 1 + (i as i64 % 7),
            last_ts: minute_ms + 1,
            fold: Fold::Sum,
        })
        .collect()
}

async fn count_marker(url: &str, db: &str, customer: &str) -> u64 {
    let body = format!("SELECT count() FROM {db}.usage_minute WHERE customer = '{customer}'");
    // Uncompressed answers: what 18.16 sends to this client (see the store's docs).
    let client = clickhouse::Client::default().with_url(url).with_compression(clickhouse::Compression::None);
    match client.query(&body).fetch_one::<u64>().await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("marker query failed: {e}");
            0
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` builds benches; this one only runs with --bench.
    }
    let url = require::need!(require::clickhouse_url());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db = format!("meterd_bench_{}", std::process::id());
    println!("| measurement | figure |");
    println!("|---|---|");
    rt.block_on(async {
        let store = ClickHouseStore::connect(&url, &db).await.expect("connect");
        let minute = meterd::engine::now_ms() / 60_000 * 60_000;
        let mut seq = 0;
        for size in [1_000usize, 10_000, 100_000] {
            let mut per_second = Vec::new();
            for _ in 0..3 {
                seq += 1;
                let batch = FlushBatch { instance_id: "bench".into(), seq, wal_seq: seq, wal_extras: vec![], rows: rows(size, minute) };
                let started = Instant::now();
                store.write_flush(&batch).await.expect("flush");
                per_second.push(size as f64 / started.elapsed().as_secs_f64());
            }
            per_second.sort_by(f64::total_cmp);
            println!(
                "| one flush of {size} rows (median of 3) | {:.0} rows/s ({:.1} ms) |",
                per_second[1],
                size as f64 / per_second[1] * 1e3
            );
        }
    });

    // History queries (what `/v1/usage` asks the store) over 5.76M stored rows:
    // 1,000 customers with a row every minute for 4 days, in 58 flushes of
    // 100k rows. Do they need rollups? Median of 5 runs of each query.
    rt.block_on(async {
        let history = format!("{db}_history");
        let store = ClickHouseStore::connect(&url, &history).await.expect("connect");
        let (customers, minutes) = (1_000usize, 4 * 1_440i64);
        let start = (meterd::engine::now_ms() / 86_400_000 - 4) * 86_400_000;
        let all: Vec<UsageRow> = (0..minutes)
            .flat_map(|m| {
                (0..customers).map(move |c| UsageRow {
                    meter: "tokens".into(),
                    customer: format!("c{c}"),
                    minute_ms: start + m * 60_000,
                    properties: vec![],
                    value: 1 + (c as i64 % 7),
                    last_ts: start + m * 60_000 + 1,
                    fold: Fold::Sum,
                })
            })
            .collect();
        let loading = Instant::now();
        for (i, chunk) in all.chunks(100_000).enumerate() {
            let seq = i as u64 + 1;
            let batch = FlushBatch { instance_id: "bench".into(), seq, wal_seq: seq, wal_extras: vec![], rows: chunk.to_vec() };
            store.write_flush(&batch).await.expect("flush");
        }
        println!("| history: loading {} rows in flushes of 100k | {:.1} s |", all.len(), loading.elapsed().as_secs_f64());
        let end = start + minutes * 60_000;
        let query = |customer: Option<&str>| UsageQuery {
            instance_id: "bench".into(),
            meter: "tokens".into(),
            fold: Fold::Sum,
            from_ms: start,
            to_ms: end,
            customer: customer.map(str::to_string),
            own_only: false,
        };
        let cases: [(&str, Option<&str>, i64); 4] = [
            ("one customer, 4 days by hour", Some("c7"), 3_600_000),
            ("one customer, 4 days by minute", Some("c7"), 60_000),
            ("all 1,000 customers, 4 days by day", None, 86_400_000),
            ("all 1,000 customers, 4 days by hour", None, 3_600_000),
        ];
        for (name, customer, granularity) in cases {
            let mut times = Vec::new();
            let mut points = 0;
            for _ in 0..5 {
                let started = Instant::now();
                let got = store.series(&query(customer), granularity, 100_000).await.expect("series");
                times.push(started.elapsed().as_secs_f64() * 1e3);
                points = got.data.len();
            }
            times.sort_by(f64::total_cmp);
            println!("| history: {name} ({points} points) | {:.1} ms (min {:.1}, max {:.1}) |", times[2], times[0], times[4]);
        }
    });

    // End to end: ingest flat out, markers every 250 ms, lag to visibility.
    let dir = tempfile::tempdir().expect("tmp");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\n[ingest]\ndedupe_window = \"2m\"\n\
         [clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}_e2e\"\nflush_interval = \"1s\"\n\
         [[meters]]\nname = \"tokens\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = \"unlimited\", window = \"month\" }}\n",
        dir.path().display().to_string()
    );
    let valid = Config::parse(&text, "bench").and_then(|c| c.validate("bench")).expect("config");
    rt.block_on(async {
        let app = meterd::AppHandle::start(valid).await.expect("start");
        let engine = app.engine.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..2 {
            let (engine, stop, events) = (engine.clone(), stop.clone(), events.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let body: Vec<String> = (0..1000)
                        .map(|i| {
                            format!(
                                r#"{{"id":"w{w}-{n}-{i}","customer":"c{}","meter":"tokens","quantity":3}}"#,
                                (n as usize * 7 + i) % 10_000
                            )
                        })
                        .collect();
                    engine.ingest(format!("[{}]", body.join(",")).as_bytes(), meterd::ingest::BodyKind::Json).await.expect("ingest");
                    events.fetch_add(1000, Ordering::Relaxed);
                    n += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (e0, t0) = (events.load(Ordering::Relaxed), Instant::now());
        let mut lags = Vec::new();
        for m in 0..20 {
            let marker = format!("marker-{m}");
            let body = format!(r#"{{"id":"m-{m}","customer":"{marker}","meter":"tokens","quantity":1}}"#);
            engine.ingest(body.as_bytes(), meterd::ingest::BodyKind::Json).await.expect("marker");
            let acked = Instant::now();
            let url = url.clone();
            let db = format!("{db}_e2e");
            lags.push(tokio::spawn(async move {
                while count_marker(&url, &db, &marker).await == 0 {
                    if acked.elapsed() > Duration::from_secs(30) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(acked.elapsed())
            }));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let rate = (events.load(Ordering::Relaxed) - e0) as f64 / t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut measured = Vec::new();
        for l in lags {
            match l.await.expect("lag") {
                Some(lag) => measured.push(lag),
                None => println!("| a marker was not visible within 30 s | |"),
            }
        }
        if measured.is_empty() {
            return;
        }
        for t in tasks {
            let _ = t.await;
        }
        measured.sort();
        println!("| ingest rate during the lag measurement (2 tasks, batches of 1000, fsync, in process) | {:.2} M events/s |", rate / 1e6);
        println!(
            "| 202 → visible in ClickHouse, `flush_interval = 1s` (20 markers) | p50 {:.0} ms, max {:.0} ms |",
            measured[measured.len() / 2].as_secs_f64() * 1e3,
            measured[measured.len() - 1].as_secs_f64() * 1e3
        );
        app.shutdown().await.expect("shutdown");
        let client = clickhouse::Client::default().with_url(&url).with_compression(clickhouse::Compression::None);
        let _ = client.query(&format!("DROP DATABASE IF EXISTS {db}")).execute().await;
        let _ = client.query(&format!("DROP DATABASE IF EXISTS {db}_e2e")).execute().await;
    });
}
