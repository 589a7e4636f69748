//! The dedupe probe at large id counts (issue 15): a deduper holding N ids in
//! the window (`METERD_BENCH_DEDUPE_IDS`, default 10M), most spilled to disk
//! runs and the newest 4M in the RAM table, as a budget of 512MB leaves them.
//! Measured per id, in batches of 1000 fresh ids: with a timestamp (only
//! the runs of the last minutes are searched), without one (every run's filter),
//! and re-sent old ids (a filter hit and a read of the run, page cache warm).
//! Setup prints RAM and disk per id and the restart time (open the runs, load
//! the un-spilled tail from the id files). Right after the restart the gate
//! (one filter over every run) is not built yet: ids without a timestamp are
//! measured then, and again once it is rebuilt (the rebuild is timed). The
//! same run measures the RAM-only table it replaced, filled with
//! `METERD_BENCH_DEDUPE_BASELINE_IDS` ids (default 33M, as issue 15 measured
//! it; 0 skips it). Run with `cargo bench --bench dedupe`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meterd::dedupe::{hash_id, Deduper, IdHash, SpillConfig};
use meterd::wal::ids::{self, IdLog};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const MIN: i64 = 60_000;
const WINDOW: i64 = 24 * 60 * MIN;
/// Ids kept in RAM (the rest are spilled), and ids per spill.
const RECENT: u64 = 4_000_000;
const PER_SPILL: u64 = 8_000_000;

fn id(i: u64) -> IdHash {
    hash_id(&format!("evt-{i}"))
}

fn config(dir: &Path) -> SpillConfig {
    SpillConfig { dir: dir.join("dedupe"), ids_dir: Some(dir.join("ids")), memory_bytes: 512 << 20, lag_minutes: 0, keep_existing: true }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// Fills a deduper with `n` ids over the minutes before `now`, spilling all
/// but the newest [`RECENT`]; those go to the id files too. Returns it reopened
/// as at a restart.
fn build(dir: &Path, n: u64, now: i64) -> Deduper {
    let d = Deduper::open(WINDOW, config(dir), now).expect("open");
    let mut log = IdLog::new(dir.join("ids"), WINDOW).expect("id log");
    let spilled_upto = n.saturating_sub(RECENT);
    let started = Instant::now();
    let mut i = 0;
    let mut minute_ms = now - 600 * MIN;
    while i < n {
        let end = if i < spilled_upto { (i + PER_SPILL).min(spilled_upto) } else { n };
        let chunk: Vec<IdHash> = (i..end).map(id).collect();
        for c in chunk.chunks(1000) {
            d.insert_batch(c, minute_ms);
        }
        if end <= spilled_upto {
            d.spill_upto_minute((minute_ms / MIN) as u32, 0).expect("spill");
        } else {
            log.append(&chunk, minute_ms, end).expect("append ids");
        }
        i = end;
        minute_ms += 10 * MIN;
    }
    log.sync().expect("sync ids");
    eprintln!("built {n} ids in {:.1}s", started.elapsed().as_secs_f64());
    drop(d);
    let started = Instant::now();
    let d = Deduper::open(WINDOW, config(dir), now).expect("reopen");
    let opened = started.elapsed();
    let loaded = ids::load(&dir.join("ids"), now, WINDOW, |id, at, seq| {
        d.restore_batch(&[(id, at, seq)]);
    })
    .expect("load ids");
    eprintln!(
        "restart with {n} ids: runs opened in {:.2}s, {loaded} un-spilled ids loaded, ready in {:.2}s",
        opened.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let spilled = d.spilled();
    let runs_disk = dir_bytes(&dir.join("dedupe"));
    eprintln!(
        "RAM: {} ids in the table, {} bytes ({:.1} B/id); {} spilled ids, run filters+indexes {} bytes ({:.2} B/id); disk: runs {:.1} B/id, id files {} bytes",
        d.len(),
        d.ram_bytes() - run_ram(&d),
        (d.ram_bytes() - run_ram(&d)) as f64 / d.len().max(1) as f64,
        spilled,
        run_ram(&d),
        run_ram(&d) as f64 / spilled.max(1) as f64,
        runs_disk as f64 / spilled.max(1) as f64,
        dir_bytes(&dir.join("ids")),
    );
    d
}

fn run_ram(d: &Deduper) -> usize {
    d.ram_bytes() - d.table_bytes()
}

fn probe(c: &mut Criterion) {
    let n: u64 = std::env::var("METERD_BENCH_DEDUPE_IDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let tmp = tempfile::tempdir_in(std::env::var("METERD_BENCH_DIR").unwrap_or_else(|_| ".".into())).expect("temp dir");
    let now = meterd::engine::now_ms();
    let d = build(tmp.path(), n, now);
    let next = AtomicU64::new(1 << 40);
    let fresh = |k: u64| -> Vec<IdHash> { (0..k).map(|_| id(next.fetch_add(1, Ordering::Relaxed))).collect() };
    let mut g = c.benchmark_group(format!("dedupe_{}m", n / 1_000_000));
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("fresh_without_timestamp_no_gate_yet_1000", |b| {
        b.iter_batched(|| fresh(1000), |ids| d.admit_batch::<Vec<bool>>(&ids, &[], now).expect("admit"), criterion::BatchSize::LargeInput)
    });
    let ram = d.ram_bytes();
    let started = Instant::now();
    let gated = d.rebuild_gate().expect("gate");
    eprintln!(
        "gate rebuilt over {gated} spilled ids in {:.2}s: +{:.2} B/id of RAM",
        started.elapsed().as_secs_f64(),
        (d.ram_bytes() - ram) as f64 / gated.max(1) as f64
    );
    let since_now = vec![Deduper::since_of_timestamp(now); 1000];
    g.bench_function("fresh_with_timestamp_1000", |b| {
        b.iter_batched(
            || fresh(1000),
            |ids| d.admit_batch::<Vec<bool>>(&ids, &since_now, now).expect("admit"),
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("fresh_without_timestamp_1000", |b| {
        b.iter_batched(|| fresh(1000), |ids| d.admit_batch::<Vec<bool>>(&ids, &[], now).expect("admit"), criterion::BatchSize::LargeInput)
    });
    let old = AtomicU64::new(0);
    let spilled = n.saturating_sub(RECENT).max(1);
    g.bench_function("old_duplicate_without_timestamp_1000", |b| {
        b.iter_batched(
            || (0..1000).map(|_| id((old.fetch_add(7919, Ordering::Relaxed)) % spilled)).collect::<Vec<_>>(),
            |ids| {
                let f: Vec<bool> = d.admit_batch(&ids, &[], now).expect("admit");
                assert!(n <= RECENT || f.iter().all(|&x| !x), "an old id was taken as new");
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
    drop(d);
    let base_n: u64 = std::env::var("METERD_BENCH_DEDUPE_BASELINE_IDS").ok().and_then(|v| v.parse().ok()).unwrap_or(33_000_000);
    if base_n == 0 {
        return;
    }
    // The RAM-only table as before issue 15 (no budget, no runs), same run.
    let base = Deduper::new(WINDOW);
    for chunk in (0..base_n).collect::<Vec<_>>().chunks(1000) {
        base.insert_batch(&chunk.iter().map(|&i| id(i)).collect::<Vec<_>>(), now - 60 * MIN);
    }
    let mut g = c.benchmark_group(format!("dedupe_ram_only_{}m", base_n / 1_000_000));
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("fresh_without_timestamp_1000", |b| {
        b.iter_batched(
            || fresh(1000),
            |ids| base.admit_batch::<Vec<bool>>(&ids, &[], now).expect("admit"),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, probe);
criterion_main!(benches);
