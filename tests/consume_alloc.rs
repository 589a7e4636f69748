//! A consume decided from memory (one hard limit on a `sum` meter, no WAL)
//! allocates two times on the calling thread: its remembered answer's cell and
//! the answer it shares with retries. Issue 24 took the others out (the
//! answer's customer, meter and limits, the decision's limit states, the
//! dedupe answer: seven in all before); this keeps them out. A counting
//! allocator, per thread, around the calls; the requests are built before.

mod common;

use meterd::engine::Engine;
use meterd::limits::CheckRequest;
use std::sync::Arc;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::allocations;

const PLANS: &str = r#"
[[meters]]
name = "calls"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
calls = { limit = 1000000000, window = "month" }
"#;

const CUSTOMERS: usize = 50;

fn consume(customer: usize, id: u64) -> CheckRequest {
    CheckRequest {
        customer: compact_str::format_compact!("c{customer}"),
        meter: "calls".into(),
        quantity_text: Some("1".into()),
        consume: true,
        id: Some(compact_str::format_compact!("id-{id}")),
        value: None,
    }
}

async fn engine(dir: &std::path::Path) -> Engine {
    let config = common::engine::config(dir, PLANS);
    let store = Arc::new(meterd::store::sqlite::SqliteStore::open(&dir.join("meterd.sqlite")).expect("store"));
    // No sync policy: no WAL, as with `durability = "none"`.
    let wal = meterd::wal::WalConfig {
        dir: dir.join("wal"),
        sync: None,
        segment_bytes: 1 << 20,
        dedupe_window_ms: 3_600_000,
        hold: None,
        sync_spacing: std::time::Duration::ZERO,
    };
    Engine::start_observed(&config, "alloc".into(), store.clone(), store, wal, None, Vec::new()).await.expect("engine")
}

#[tokio::test(flavor = "current_thread")]
async fn a_consume_decided_from_memory_allocates_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    // As the server does at start: the meter's series registered, so counting
    // a decision by meter allocates nothing (tests/telemetry_alloc.rs).
    let _metrics = meterd::telemetry::prometheus();
    meterd::telemetry::register_known(&meterd::telemetry::Known { meters: vec![(0, "calls")], ..meterd::telemetry::Known::default() });
    let engine = engine(dir.path()).await;
    let ports = engine.limits_ports();
    // Warm: every customer interned, its counters and usage buckets made, the
    // tables of ids and answers grown past their first sizes.
    let warm: Vec<CheckRequest> = (0..20_000u64).map(|k| consume(k as usize % CUSTOMERS, k)).collect();
    for req in &warm {
        assert!(ports.check(req).await.expect("consume").allowed);
    }
    const N: u64 = 2_000;
    let asks: Vec<CheckRequest> = (0..N).map(|k| consume(k as usize % CUSTOMERS, 1_000_000 + k)).collect();
    let mut answers = Vec::with_capacity(asks.len());
    let before = allocations();
    for req in &asks {
        answers.push(ports.check(req).await.expect("consume"));
    }
    let spent = allocations() - before;
    // The control: they were consumes, each allowed and counted.
    assert!(answers.iter().all(|a| a.allowed), "every consume is allowed");
    let used: i64 = answers.iter().filter(|a| a.customer == "c0").map(|a| a.used.raw).max().unwrap_or(0);
    assert_eq!(used, (20_000 + N as i64) / CUSTOMERS as i64, "c0's usage counts every consume");
    // Two per consume; a little more while a table grows (a shard of the
    // remembered answers or of the ids doubling now and then).
    let per = spent as f64 / N as f64;
    eprintln!("{per:.3} allocations per consume ({spent} for {N})");
    assert!(per < 2.5, "{per:.2} allocations per consume ({spent} for {N})");
    assert!(per >= 2.0, "{per:.2} allocations per consume: the cell and the answer are counted (the counter works)");
}
