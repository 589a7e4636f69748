//! The embedded store's flush: one second's minute rows written to SQLite, as
//! the flusher does once per `flush_interval`. At 20 k consumes/s over 10,000
//! customers every flush holds ~10,000 rows, and for the rest of the minute
//! they are the same (customer, meter, minute) keys as the flush before.
//!
//! - `sqlite_flush/new_minute_10k`: every row a key the store has not seen (the
//!   first flush of a minute);
//! - `sqlite_flush/same_minute_10k`: every row a key the previous flush wrote
//!   (the other 59 flushes of a minute at `flush_interval = "1s"`).
//!
//! Run with `cargo bench --bench sqlite_flush`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meterd::store::sqlite::SqliteStore;
use meterd::store::{FlushBatch, Fold, UsageRow, UsageStore};
use std::time::{Duration, Instant};

const CUSTOMERS: usize = 10_000;
const MINUTE: i64 = 60_000;

fn rows(minute: i64) -> Vec<UsageRow> {
    (0..CUSTOMERS)
        .map(|c| UsageRow {
            meter: "tokens".to_owned(),
            customer: format!("c{c}"),
            minute_ms: minute * MINUTE,
            properties: Vec::new(),
            value: 3,
            last_ts: minute * MINUTE + 1_000,
            fold: Fold::Sum,
        })
        .collect()
}

fn flushes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("sqlite_flush");
    group.sample_size(10).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(CUSTOMERS as u64));
    for (name, same_minute) in [("new_minute_10k", false), ("same_minute_10k", true)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("bench.sqlite")).expect("store");
        let mut seq = 0u64;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    seq += 1;
                    let minute = if same_minute { 29_000_000 } else { 29_000_000 + seq as i64 };
                    let batch =
                        FlushBatch { instance_id: "bench".to_owned(), seq, wal_seq: seq, wal_extras: Vec::new(), rows: rows(minute) };
                    let started = Instant::now();
                    rt.block_on(store.write_flush(&batch)).expect("flush");
                    spent += started.elapsed();
                }
                spent
            })
        });
    }
    group.finish();
}

criterion_group!(benches, flushes);
criterion_main!(benches);
