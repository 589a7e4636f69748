//! End-to-end ingest throughput by durability mode and batch size, over real
//! HTTP on loopback (server in process, clients on keep-alive connections), and
//! WAL replay speed at start. Run with `cargo bench --bench durability`.
//!
//! Client and server share the machine's cores, so these are lower bounds on
//! what a dedicated server does; the modes and sizes compare within one run.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meterd::config::Config;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const METERS: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"
[[plans]]
name = "p"
default = true
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
"#;

/// `durability`, and `spacing` as `storage.wal_sync_spacing` when given.
fn config(dir: &std::path::Path, durability: &str, spacing: Option<&str>) -> meterd::config::ValidConfig {
    let spacing = spacing.map(|s| format!("wal_sync_spacing = \"{s}\"\n")).unwrap_or_default();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\ndurability = \"{durability}\"\n{spacing}[ingest]\ndedupe_window = \"1h\"\n{METERS}",
        dir.display().to_string()
    );
    Config::parse(&text, "bench").and_then(|c| c.validate("bench")).expect("config")
}

fn body(worker: usize, n: u64, size: usize) -> Bytes {
    let mut s = String::with_capacity(size * 90 + 2);
    s.push('[');
    for i in 0..size {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(r#"{{"id":"w{worker}-{n}-{i}","customer":"c{}","meter":"tokens","quantity":3}}"#, (n as usize + i) % 1000));
    }
    s.push(']');
    Bytes::from(s)
}

/// Events per second over `secs` with `workers` keep-alive connections.
async fn throughput(addr: std::net::SocketAddr, size: usize, workers: usize, secs: u64) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (stop, events, requests) = (stop.clone(), events.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
            tokio::spawn(conn);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = hyper::Request::post("/v1/events")
                    .header("host", "x")
                    .header("content-type", "application/json")
                    .body(Full::new(body(w, n, size)))
                    .expect("request");
                let resp = sender.send_request(req).await.expect("send");
                assert_eq!(resp.status(), 202);
                let _ = resp.into_body().collect().await;
                n += 1;
                events.fetch_add(size as u64, Ordering::Relaxed);
                requests.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (e0, r0, t0) = (events.load(Ordering::Relaxed), requests.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (e1, r1, dt) = (events.load(Ordering::Relaxed), requests.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    ((e1 - e0) as f64 / dt, (r1 - r0) as f64 / dt)
}

fn replay_bench(rt: &tokio::runtime::Runtime) {
    use meterd::wal::{Wal, WalConfig};
    let dir = tempfile::tempdir().expect("tmp");
    let valid = config(dir.path(), "buffered", None);
    let wal_config = |sync| WalConfig {
        dir: dir.path().join("wal"),
        sync,
        segment_bytes: 64 << 20,
        dedupe_window_ms: 3_600_000,
        hold: None,
        sync_spacing: std::time::Duration::ZERO,
    };
    let total_events = 2_000_000u64;
    rt.block_on(async {
        let (wal, _) = Wal::open(
            &wal_config(Some(meterd::wal::Sync::Interval(Duration::from_millis(100)))),
            &meterd::wal::WalMark::default(),
            |_, _, _| {},
            |_, _| {},
        )
        .expect("open");
        let now = meterd::engine::now_ms();
        for b in 0..total_events / 1000 {
            let mut builder = meterd::wal::RecordBuilder::new(now, 1000);
            for i in 0..1000u64 {
                let c = (i % 1000) as u32;
                builder.push::<&str, &str>(u128::from(b * 1000 + i) << 32 | 7, c, &format!("c{c}"), 0, "tokens", 3, now, &[]);
            }
            wal.append(builder).await.expect("append");
        }
        wal.close();
    });
    let store = Arc::new(meterd::store::sqlite::SqliteStore::open(&dir.path().join("s.sqlite")).expect("store"));
    let started = Instant::now();
    let engine = rt
        .block_on(meterd::engine::Engine::start(
            &valid,
            "bench".into(),
            store.clone(),
            store,
            wal_config(Some(meterd::wal::Sync::Always)),
            None,
        ))
        .expect("start");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(engine.wal_report().replayed_events, total_events);
    println!(
        "| WAL replay at start (decode + fold + dedupe, {total_events} events in {} records) | {:.2} s | **{:.2} M events/s** |",
        total_events / 1000,
        secs,
        total_events as f64 / secs / 1e6
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("durability bench: run it with `cargo bench --bench durability`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let secs = std::env::var("METERD_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("| durability | batch size | connections | events/s | requests/s |");
    println!("|---|---|---|---|---|");
    // `fsync` as it comes, then with its syncs spaced (issue 24).
    for (durability, spacing) in [("fsync", None), ("fsync", Some("800us")), ("buffered", None), ("none", None)] {
        for (size, workers) in [(1usize, 64usize), (100, 64), (1000, 16)] {
            let dir = tempfile::tempdir().expect("tmp");
            let app = rt.block_on(meterd::AppHandle::start(config(dir.path(), durability, spacing))).expect("start");
            let (eps, rps) = rt.block_on(throughput(app.addr, size, workers, secs));
            let label = spacing.map(|s| format!("{durability}, spacing {s}")).unwrap_or_else(|| durability.to_string());
            println!("| {label} | {size} | {workers} | {eps:.0} | {rps:.0} |");
            rt.block_on(app.shutdown()).expect("shutdown");
        }
    }
    println!();
    println!("| what | time | rate |");
    println!("|---|---|---|");
    replay_bench(&rt);
}
