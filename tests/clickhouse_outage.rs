//! ClickHouse failing under load: a private `clickhouse-server` SIGKILLed and
//! restarted while meterd ingests (nothing acknowledged is lost, ingest and
//! checks never stop, the flusher catches up), and meterd itself SIGKILLed
//! again and again while it flushes to ClickHouse every 20 ms (nothing counted
//! twice). Without the ClickHouse of `scripts/test` skipped with a note, or
//! failed under `METERD_TEST_REQUIRE_SERVICES` (see `common::require`).

mod common;

use common::ch::{self, ClickHouseServer};
use common::load::{try_send, Rng};
use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::require::{self, need};
use common::{away_from_day_boundary, Client, TestServer};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const METERS: &str = "[[meters]]\nname = \"tokens\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = { limit = 1000000000, window = \"month\" }\n";

fn batch(tag: &str, n: usize, rng: &mut Rng) -> (Value, u64) {
    let mut total = 0;
    let events: Vec<Value> = (0..n)
        .map(|i| {
            let q = 1 + rng.below(9);
            total += q;
            json!({"id": format!("{tag}-{i}"), "customer": format!("c{}", rng.below(13)), "meter": "tokens", "quantity": q})
        })
        .collect();
    (Value::Array(events), total)
}

/// Waits until ClickHouse holds `want` (the flusher retries on its own).
async fn wait_sum(url: &str, db: &str, want: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let got = ch::sum(url, db, "tokens").await;
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_and_restarted_mid_load_loses_nothing() {
    let mut clickhouse = need!(ClickHouseServer::start().await);
    away_from_day_boundary().await;
    let db = ch::unique_db();
    let config = format!(
        "[storage]\nflush_interval = \"100ms\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\nflush_interval = \"100ms\"\n{METERS}",
        clickhouse.url()
    );
    let server = TestServer::start(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (c, stop, acked) = (server.client(), stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x0ddba11 + w);
            let mut n = 0;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let (body, total) = batch(&format!("w{w}-{n}"), 100, &mut rng);
                let r = c.events(&body).await;
                assert_eq!(r.status, 202, "ingest goes on while ClickHouse is away: {}", r.text);
                acked.fetch_add(total, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    clickhouse.kill();
    let down_at = acked.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Checks answer from memory, with every acknowledged unit counted.
    let used = common::check(&server.client(), "c1", "tokens", 1).await;
    assert_eq!(used["allowed"], json!(true), "{used}");
    assert!(acked.load(Ordering::Acquire) > down_at, "ingest went on during the outage");
    let metrics = server.client().get("/metrics").await.text;
    assert!(metrics.contains("meterd_flush_errors_total"), "failed flushes are counted");
    clickhouse.restart().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Release);
    for w in writers {
        w.await.expect("writer");
    }
    let expected = acked.load(Ordering::Acquire);
    let stored = wait_sum(&clickhouse.url(), &db, expected, Duration::from_secs(60)).await;
    assert_eq!(stored, expected, "after the outage ClickHouse holds every acknowledged unit, once");
    // The in-memory totals agree.
    let mut counted = 0;
    for i in 0..13 {
        counted += server.client().get(&format!("/v1/customers/c{i}/usage")).await.body["meters"][0]["used"].as_u64().unwrap_or(0);
    }
    assert_eq!(counted, expected);
    server.stop().await;
}

#[derive(Default)]
struct Ledger {
    acked: u64,
    in_doubt: Vec<(Value, u64)>,
}

/// Sends until the server dies; the batch whose answer never came is in doubt.
async fn load(c: Client, ledger: Arc<Mutex<Ledger>>, tag: String, seed: u64) {
    let mut rng = Rng(seed);
    for n in 0.. {
        let (body, total) = batch(&format!("{tag}-{n}"), 50, &mut rng);
        let sent = tokio::time::timeout(Duration::from_secs(10), try_send(&c, &body)).await;
        let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        match sent {
            Ok(Some(202)) => l.acked += total,
            _ => {
                l.in_doubt.push((body, total));
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_flushing_to_clickhouse_counts_nothing_twice() {
    let url = need!(require::clickhouse_url());
    away_from_day_boundary().await;
    let db = ch::unique_db();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\n\
         [clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nflush_interval = \"20ms\"\n{METERS}",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("config");
    let c = Client { addr, token: None };
    let mut rng = Rng(0xfee1_600d);
    let mut expected = 0;
    for round in 0..4 {
        let mut p = spawn(&path, dir.path().join(format!("run{round}.log")));
        wait_healthy(&mut p, addr).await;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let workers: Vec<_> =
            (0..3).map(|w| tokio::spawn(load(c.clone(), ledger.clone(), format!("r{round}w{w}"), rng.next() | 1))).collect();
        tokio::time::sleep(Duration::from_millis(300 + rng.below(600))).await;
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
        for w in workers {
            w.await.expect("worker");
        }
        let ledger = std::mem::take(&mut *ledger.lock().unwrap_or_else(|e| e.into_inner()));
        assert!(ledger.acked > 0, "round {round}: load ran before the kill");
        // Restart and resend what is in doubt, as a client would.
        let mut p = spawn(&path, dir.path().join(format!("run{round}b.log")));
        wait_healthy(&mut p, addr).await;
        for (body, _) in &ledger.in_doubt {
            assert_eq!(c.events(body).await.status, 202);
        }
        expected += ledger.acked + ledger.in_doubt.iter().map(|(_, t)| t).sum::<u64>();
        eprintln!("round {round}: acked {}, in doubt {}, expected {expected}", ledger.acked, ledger.in_doubt.len());
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
    }
    // A clean start flushes what the last kill left in the WAL.
    let mut p = spawn(&path, dir.path().join("final.log"));
    wait_healthy(&mut p, addr).await;
    let stored = wait_sum(&url, &db, expected, Duration::from_secs(30)).await;
    if stored != expected {
        let flushes = ch::query(
            &url,
            &format!("SELECT flush_seq, count(), any(flush_rows), sum(value), any(wal_seq), any(wal_extras) FROM {db}.usage_minute GROUP BY flush_seq ORDER BY flush_seq"),
        )
        .await;
        eprintln!("flushes:\n{flushes}");
        for round in 0..4 {
            for suffix in ["", "b"] {
                let log = std::fs::read_to_string(dir.path().join(format!("run{round}{suffix}.log"))).unwrap_or_default();
                eprintln!(
                    "--- run{round}{suffix}.log\n{}",
                    log.lines().filter(|l| !l.contains(" INFO ") || l.contains("replay")).collect::<Vec<_>>().join("\n")
                );
            }
        }
        eprintln!("--- final\n{}", p.log());
    }
    assert_eq!(stored, expected, "ClickHouse holds every acknowledged unit exactly once");
    p.sigterm();
    assert!(p.wait_exit(Duration::from_secs(20)).await.success(), "{}", p.log());
    assert_eq!(ch::sum(&url, &db, "tokens").await, expected);
    let _ = ch::query(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
