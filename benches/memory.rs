//! Memory per active window counter and per remembered event id, measured as the
//! growth of the process's resident set while N entries are created.
//! Run with `cargo bench --bench memory` (prints a table; not a criterion bench).

use meterd::config::Config;
use meterd::counters::{Counters, Usage};
use meterd::engine::now_ms;
use meterd::ingest::dedupe::{hash_id, Deduper};
use meterd::model::{BillingAnchor, WindowKind};

const CONFIG: &str = include_str!("../config/examples/interview-platform.toml");

/// Resident set size in bytes, from /proc/self/statm.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and this
    // measurement (10M ids, ~1 GB) has no place in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("memory bench: run it with `cargo bench --bench memory`");
        return;
    }
    let valid = Config::parse(CONFIG, "bench").and_then(|c| c.validate("bench")).expect("config");
    let meter = valid.catalog.meter_by_name("interview_minutes").expect("meter").clone();
    let now = now_ms();
    println!("| what | entries | bytes | bytes per entry |");
    println!("|---|---|---|---|");
    // Measured first: later figures would reuse memory these free.
    for &n in &[10_000_000u64] {
        let d = Deduper::new(86_400_000);
        let before = rss();
        for i in 0..n {
            d.insert(hash_id(&format!("evt-{i}")), now);
        }
        let after = rss();
        println!("| dedupe id (in-memory map) | {n} | {} | {} |", after - before, (after - before) / n);
    }
    for &n in &[100_000u32, 1_000_000] {
        let counters = Counters::new(&valid.catalog, 1);
        // Intern first so the figure is the counter alone; then the interned
        // customer strings are measured separately.
        let before_intern = rss();
        for c in 0..n {
            let _ = counters.interner.intern(&format!("customer_{c:08}"));
        }
        let after_intern = rss();
        // Window counters alone, then minute buckets (apply finds the counters
        // existing, so only buckets grow).
        for c in 0..n {
            let key = Counters::key(c, meter.id, WindowKind::Month, now, BillingAnchor::default());
            counters.windows.with_cell(key, |cell| cell.fold(meter.aggregation, 100, now));
        }
        let after_counters = rss();
        for c in 0..n {
            let usage =
                Usage { customer: c, meter: &meter, raw: 100, ts: now, properties: &[], props_hash: 0, anchor: BillingAnchor::default() };
            counters.apply(std::slice::from_ref(&usage));
        }
        let after_buckets = rss();
        let window = counters.windows.len() as u64;
        let buckets = counters.buckets.pending_len() as u64;
        let counter_bytes = after_counters - after_intern;
        let bucket_bytes = after_buckets - after_counters;
        println!(
            "| interned customer (id ↔ name, 17-byte names) | {n} | {} | {} |",
            after_intern - before_intern,
            (after_intern - before_intern) / u64::from(n)
        );
        println!("| window counter (customer, meter, month) | {window} | {counter_bytes} | {} |", counter_bytes / window.max(1));
        println!("| minute bucket (until flushed) | {buckets} | {bucket_bytes} | {} |", bucket_bytes / buckets.max(1));
    }
}
