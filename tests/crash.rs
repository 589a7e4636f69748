//! Nothing acknowledged is lost, nothing is counted twice: the real binary under
//! concurrent load is SIGKILLed at a random moment, several rounds in a row.
//! After each restart the client does what a real one would: it re-sends every
//! batch whose answer it never got, and (to prove dedupe survived the restart)
//! a sample of batches that were acknowledged. The store's totals must then be
//! exactly the sum of every distinct event ever sent.

mod common;

use common::load::{try_send, Rng};
use common::ports::free_port;
use common::process::{spawn, wait_healthy, Proc};
use common::{away_from_day_boundary, Client};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONFIG: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
"#;

/// One batch: its body and the total quantity it carries.
#[derive(Clone)]
struct Batch {
    body: Value,
    total: u64,
}

#[derive(Default)]
struct Ledger {
    acked: Vec<Batch>,
    in_doubt: Vec<Batch>,
}

fn make_batch(next_id: &AtomicU64, rng: &mut Rng, round: usize) -> Batch {
    let mut events = Vec::new();
    let mut total = 0;
    for _ in 0..25 {
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let q = 1 + rng.below(9);
        total += q;
        events.push(json!({"id": format!("r{round}-e{id}"), "customer": format!("c{}", rng.below(7)), "meter": "tokens", "quantity": q}));
    }
    Batch { body: Value::Array(events), total }
}

/// Sends until the server stops answering; sorts batches into acked / in doubt.
async fn load(c: Client, ledger: Arc<Mutex<Ledger>>, next_id: Arc<AtomicU64>, seed: u64, round: usize) {
    let mut rng = Rng(seed);
    loop {
        let batch = make_batch(&next_id, &mut rng, round);
        let sent = tokio::time::timeout(Duration::from_secs(10), try_send(&c, &batch.body)).await;
        let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        match sent {
            Ok(Some(202)) => l.acked.push(batch),
            _ => {
                l.in_doubt.push(batch);
                return;
            }
        }
    }
}

/// The store's total over all customers, from `/v1/usage` (store + unflushed).
async fn total(c: &Client) -> u64 {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let to = (now + chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let r = c.get(&format!("/v1/usage?meter=tokens&from={from}&to={to}&granularity=day")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(0)
}

/// The month-window counters (what checks read), summed over the customers.
async fn counters_total(c: &Client) -> u64 {
    let mut sum = 0;
    for i in 0..7 {
        let r = c.get(&format!("/v1/customers/c{i}/usage")).await;
        sum += r.body["meters"][0]["used"].as_u64().unwrap_or(0);
    }
    sum
}

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"150ms\"\nwal_segment_bytes = 65536\nmax_wal_bytes = 1073741824\n{CONFIG}",
        dir.join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_and_counts_nothing_twice() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port);
    let c = Client { addr, token: None };
    let next_id = Arc::new(AtomicU64::new(0));
    let mut expected: u64 = 0;
    let mut rng = Rng(0x5eed_1234);
    let mut acked_total = 0;
    for round in 0..4 {
        let mut p: Proc = spawn(&config, dir.path().join(format!("run{round}.log")));
        wait_healthy(&mut p, addr).await;
        // Everything from earlier rounds is there after the restart...
        assert_eq!(total(&c).await, expected, "round {round}: store total after restart");
        assert_eq!(counters_total(&c).await, expected, "round {round}: window counters after restart");

        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let workers: Vec<_> =
            (0..4).map(|w| tokio::spawn(load(c.clone(), ledger.clone(), next_id.clone(), rng.next() | 1, round * 10 + w))).collect();
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
        for w in workers {
            w.await.expect("worker");
        }
        let ledger = std::mem::take(&mut *ledger.lock().unwrap_or_else(|e| e.into_inner()));
        assert!(!ledger.acked.is_empty(), "round {round}: the load ran before the kill");

        // ...and the retries after it count each event once.
        let mut p = spawn(&config, dir.path().join(format!("run{round}b.log")));
        wait_healthy(&mut p, addr).await;
        let acked_here: u64 = ledger.acked.iter().map(|b| b.total).sum();
        acked_total += acked_here;
        let after_restart = total(&c).await;
        let in_doubt: u64 = ledger.in_doubt.iter().map(|b| b.total).sum();
        assert!(
            after_restart >= expected + acked_here && after_restart <= expected + acked_here + in_doubt,
            "round {round}: after the kill the store has {after_restart}, acknowledged {} (+ up to {in_doubt} in doubt)",
            expected + acked_here
        );
        for batch in &ledger.in_doubt {
            let r = c.events(&batch.body).await;
            eprintln!("round {round}: in-doubt retry of {} -> {}", batch.total, r.text);
            assert_eq!(r.status, 202);
        }
        // Re-send every fifth acknowledged batch: all duplicates.
        for batch in ledger.acked.iter().step_by(5) {
            let r = c.events(&batch.body).await;
            assert_eq!(r.status, 202);
            assert_eq!(r.body["accepted"], json!(0), "round {round}: an acknowledged batch was counted again: {}", r.text);
        }
        eprintln!("round {round}: acked {acked_here}, in doubt {in_doubt}, after restart {after_restart}, expected before {expected}");
        expected += acked_here + in_doubt;
        assert_eq!(total(&c).await, expected, "round {round}: after retries");
        assert_eq!(counters_total(&c).await, expected, "round {round}: counters after retries");
        // Kill this one too, right away: a crash with nothing in flight.
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
    }
    // A last clean start and SIGTERM: everything still there, exit 0.
    let mut p = spawn(&config, dir.path().join("final.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(total(&c).await, expected);
    assert!(acked_total > 0);
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}; log:\n{}", p.log());
}

/// An allowed consume is logged like an event: after SIGKILL it is still
/// counted, and retrying it with the same id records nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_consume_survives_sigkill() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    // No flush for an hour: the consumes live only in the WAL when killed.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\nflush_interval = \"1h\"\n\
         [[meters]]\nname = \"minutes\"\n[[meters]]\nname = \"runs\"\naggregation = \"count\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nminutes = {{ limit = 10, window = \"month\" }}\n\
         runs = [ {{ limit = 5, window = \"month\" }}, {{ limit = 2, window = \"day\" }} ]\n",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("config");
    let c = Client { addr, token: None };
    let consume = |meter: &str, q: u64, id: &str| json!({"customer": "u", "meter": meter, "quantity": q, "consume": true, "id": id});
    let mut p = spawn(&path, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    // The single-limit (compare-and-swap) path and the several-limits path.
    let r = c.check(&consume("minutes", 7, "m1")).await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    let r = c.check(&consume("runs", 1, "r1")).await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();

    let mut p = spawn(&path, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    let used = |b: &Value, i: usize| b["meters"][i]["used"].clone();
    let summary = c.get("/v1/customers/u/usage").await.body;
    assert_eq!(used(&summary, 0), json!(7), "{summary}");
    assert_eq!(used(&summary, 1), json!(1), "{summary}");
    // Retries with the same ids record nothing more.
    assert_eq!(c.check(&consume("minutes", 7, "m1")).await.status, 200);
    assert_eq!(c.check(&consume("runs", 1, "r1")).await.status, 200);
    let summary = c.get("/v1/customers/u/usage").await.body;
    assert_eq!(used(&summary, 0), json!(7), "{summary}");
    assert_eq!(used(&summary, 1), json!(1), "{summary}");
    // And the limit still holds: 3 more minutes fit, 4 do not.
    assert_eq!(c.check(&consume("minutes", 4, "m2")).await.body["allowed"], json!(false));
    assert_eq!(c.check(&consume("minutes", 3, "m3")).await.body["allowed"], json!(true));
    p.sigterm();
    assert!(p.wait_exit(Duration::from_secs(20)).await.success());
}
