//! Dedupe in bounded RAM (issue 15), with the real binary and real disks: ids
//! over `ingest.dedupe_memory` are spilled to disk runs, a SIGKILL during the
//! spills loses no id and counts none twice, and a full disk under the runs
//! refuses ingest with 503 (not a forgotten id) until space comes back.
//!
//! Ids are spilled once they are two minutes old, so each test runs ~3 minutes.

mod common;

use common::load::{try_send, Rng};
use common::mount::Tmpfs;
use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::require::need;
use common::{away_from_day_boundary, Client, TestServer};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// 1MB: the table spills beyond 16,384 ids.
const SMALL: &str = "[ingest]\ndedupe_memory = \"1MB\"\n";

#[derive(Clone)]
struct Batch {
    body: Value,
    total: u64,
}

fn batch(tag: &str, from: u64, n: u64, q: u64) -> Batch {
    let events = (from..from + n).map(|i| json!({"id": format!("{tag}-{i}"), "customer": "c", "meter": "tokens", "quantity": q})).collect();
    Batch { body: Value::Array(events), total: n * q }
}

fn runs_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "run")).count())
        .unwrap_or(0)
}

async fn total(c: &Client) -> u64 {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let to = (now + chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let r = c.get(&format!("/v1/usage?meter=tokens&from={from}&to={to}&granularity=day")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(0)
}

#[derive(Default)]
struct Ledger {
    acked: Vec<Batch>,
    in_doubt: Vec<Batch>,
}

/// Sends batches of fresh ids until the server dies.
async fn load(c: Client, ledger: Arc<Mutex<Ledger>>, next: Arc<AtomicU64>, seed: u64) {
    let mut rng = Rng(seed);
    loop {
        let from = next.fetch_add(200, Ordering::Relaxed);
        let b = batch("k", from, 200, 1 + rng.below(5));
        let sent = tokio::time::timeout(Duration::from_secs(10), try_send(&c, &b.body)).await;
        {
            let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
            match sent {
                Ok(Some(202)) => l.acked.push(b),
                _ => {
                    l.in_doubt.push(b);
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_spills_loses_no_id_and_counts_none_twice() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = dir.path().join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"100ms\"\n{SMALL}{METERS}",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&config, text).expect("write config");
    let runs = dir.path().join("data/wal/dedupe");
    let c = Client { addr, token: None };
    let mut p = spawn(&config, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..2).map(|w| tokio::spawn(load(c.clone(), ledger.clone(), next.clone(), 0x5eed + w))).collect();
    // Past two minutes, ids start leaving RAM; kill while spills go on.
    let started = Instant::now();
    while runs_in(&runs) < 2 {
        assert!(started.elapsed() < Duration::from_secs(240), "no spill after 4 minutes; log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(Rng(started.elapsed().as_nanos() as u64 | 1).below(3000))).await;
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
    for w in workers {
        w.await.expect("worker");
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap_or_else(|e| e.into_inner()));
    assert!(runs_in(&runs) >= 2, "runs were written before the kill");

    let mut p = spawn(&config, dir.path().join("run2.log"));
    let restarted = Instant::now();
    wait_healthy(&mut p, addr).await;
    // Not asserted (no timing assertions): printed, so a slow restart shows in the output.
    let replay = p.log().lines().filter(|l| l.contains("replayed the WAL")).collect::<Vec<_>>().join("\n");
    eprintln!("restart answered /healthz after {:.1} s; {replay}", restarted.elapsed().as_secs_f64());
    let acked: u64 = ledger.acked.iter().map(|b| b.total).sum();
    let in_doubt: u64 = ledger.in_doubt.iter().map(|b| b.total).sum();
    let after = total(&c).await;
    assert!(after >= acked && after <= acked + in_doubt, "after the kill: {after}, acknowledged {acked} (+ up to {in_doubt} in doubt)");
    for b in &ledger.in_doubt {
        assert_eq!(c.events(&b.body).await.status, 202);
    }
    // The oldest batches (their ids on disk), and a sample of the rest: all duplicates.
    let sample = ledger.acked.iter().take(40).chain(ledger.acked.iter().step_by(25));
    for b in sample {
        let r = c.events(&b.body).await;
        assert_eq!(r.status, 202, "{}", r.text);
        assert_eq!(r.body["accepted"], json!(0), "an acknowledged batch was counted again: {}", r.text);
    }
    assert_eq!(total(&c).await, acked + in_doubt, "each event counted exactly once");
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}; log:\n{}", p.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_under_the_runs_refuses_with_503_and_forgets_nothing() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let runs = dir.path().join("wal").join("dedupe");
    let fs = need!(Tmpfs::mount(&runs, "4m", false));
    let config = format!("[storage]\ndurability = \"fsync\"\nflush_interval = \"100ms\"\n{SMALL}{METERS}");
    let server = TestServer::start_in(&config, dir).await;
    let c = server.client();
    // 20,000 ids: over the 16,384 the table may hold.
    let first: Vec<Batch> = (0..100).map(|i| batch("old", i * 200, 200, 1)).collect();
    for b in &first {
        let r = c.events(&b.body).await;
        assert_eq!(r.status, 202, "{}", r.text);
    }
    let filler = fs.fill();
    // Once the ids are old enough to spill, the spill fails: ingest is refused.
    let started = Instant::now();
    let mut accepted = first.len() as u64 * 200;
    let mut n = 0;
    let refused = loop {
        assert!(started.elapsed() < Duration::from_secs(240), "never refused with a full disk");
        let b = batch("new", n * 10, 10, 1);
        n += 1;
        let r = c.events(&b.body).await;
        if r.status == 503 {
            assert_eq!(r.code(), "unavailable", "{}", r.text);
            break b;
        }
        assert_eq!(r.status, 202, "{}", r.text);
        accepted += 10;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(runs_in(&runs), 0, "no run was written on the full disk");
    // Space comes back: the spill goes through, the refused batch is new.
    std::fs::remove_file(&filler).expect("remove filler");
    let started = Instant::now();
    loop {
        let r = c.events(&refused.body).await;
        if r.status == 202 {
            assert_eq!(r.body["accepted"], json!(10), "the refused batch was not taken: {}", r.text);
            accepted += 10;
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(started.elapsed() < Duration::from_secs(30), "still refused after space came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(runs_in(&runs) >= 1, "the ids went to disk");
    // Every id from before, now on disk, is still a duplicate.
    for b in &first {
        let r = c.events(&b.body).await;
        assert_eq!(r.body["accepted"], json!(0), "an old id was forgotten: {}", r.text);
    }
    assert_eq!(total(&c).await, accepted);
    server.stop().await;
}
