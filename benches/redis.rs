//! What Redis costs: a check on a cached customer with Redis configured against
//! the embedded one (both from memory: they should be equal), a strict consume
//! (one Lua round trip), and a sync round at 100k active window counters (every
//! counter changed, and none changed). Starts its own `redis-server`
//! (`METERD_TEST_REDIS_SERVER_BIN`, else from PATH) on a free port; without one
//! it prints a notice and measures nothing, or fails under
//! `METERD_TEST_REQUIRE_SERVICES` (tests/common/require.rs).
//! Run with `cargo bench --bench redis`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use meterd::config::Config;
use meterd::engine::Engine;
use meterd::limits::CheckRequest;
use meterd::store::sqlite::SqliteStore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[path = "support/redis_proc.rs"]
mod redis_proc;
#[path = "../tests/common/require.rs"]
mod require;
use redis_proc::start_redis;

const PLANS: &str = r#"
[[meters]]
name = "calls"
aggregation = "sum"
[[meters]]
name = "gpu"
aggregation = "sum"
[[plans]]
name = "p"
default = true
[plans.limits]
calls = [ { limit = 1000000000, window = "month" }, { limit = 1000000000, window = "day" } ]
gpu = { limit = 1000000000000, window = "month", enforcement = "strict" }
"#;

fn engine(rt: &tokio::runtime::Runtime, dir: &std::path::Path, redis_port: Option<u16>) -> Arc<Engine> {
    let redis_section = redis_port.map(|p| format!("[redis]\nurl = \"redis://127.0.0.1:{p}/0\"\n")).unwrap_or_default();
    let text = format!("[server]\ninstance_id = \"bench\"\n[storage]\ndata_dir = {:?}\n{redis_section}{PLANS}", dir.display().to_string());
    let valid = Config::parse(&text, "bench").and_then(|c| c.validate("bench")).expect("config");
    let store = Arc::new(SqliteStore::open(&dir.join("bench.sqlite")).expect("store"));
    rt.block_on(async {
        let redis = match redis_port {
            Some(p) => Some(
                meterd::redis_link::Redis::connect(&[format!("redis://127.0.0.1:{p}/0")], "meterd:", Duration::from_secs(1))
                    .await
                    .expect("redis"),
            ),
            None => None,
        };
        let wal = meterd::wal::WalConfig::off(dir.join("wal"));
        Arc::new(Engine::start(&valid, "bench".into(), store.clone(), store, wal, redis).await.expect("engine"))
    })
}

fn request(customer: &str, meter: &str, consume: bool, id: Option<String>) -> CheckRequest {
    CheckRequest {
        customer: customer.into(),
        meter: meter.into(),
        quantity_text: Some("1".into()),
        consume,
        id: id.map(Into::into),
        value: None,
    }
}

fn benches(c: &mut Criterion) {
    let (_redis, port) = require::need!(start_redis());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dirs = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let embedded = engine(&rt, dirs.0.path(), None);
    let shared = engine(&rt, dirs.1.path(), Some(port));
    // Warm both: the customer is loaded and has usage.
    for e in [&embedded, &shared] {
        rt.block_on(async {
            e.ensure_customer("warm").await;
            e.check(request("warm", "calls", true, Some("warm-1".into()))).await.expect("consume");
        });
    }
    let mut group = c.benchmark_group("check_cached_customer");
    group.bench_function("embedded", |b| {
        b.iter(|| rt.block_on(async { embedded.check(request("warm", "calls", false, None)).await.expect("check") }))
    });
    group.bench_function("redis_configured", |b| {
        b.iter(|| {
            rt.block_on(async {
                shared.ensure_customer("warm").await;
                shared.check(request("warm", "calls", false, None)).await.expect("check")
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("consume");
    let mut n = 0u64;
    group.bench_function("cached_limit_redis_configured", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(async { shared.check(request("warm", "calls", true, Some(format!("c-{n}")))).await.expect("consume") })
        })
    });
    group.bench_function("strict_limit_lua_round_trip", |b| {
        b.iter(|| {
            n += 1;
            let answer = rt.block_on(async { shared.check(request("warm", "gpu", true, Some(format!("s-{n}")))).await.expect("consume") });
            assert!(answer.allowed);
        })
    });
    group.finish();

    // 100k active counters: 50k customers × (month, day) windows of `calls`.
    rt.block_on(async {
        for chunk in 0..50 {
            let body: Vec<String> = (0..1000)
                .map(|i| format!(r#"{{"id":"s-{chunk}-{i}","customer":"c{}","meter":"calls","quantity":1}}"#, chunk * 1000 + i))
                .collect();
            shared.ingest(format!("[{}]", body.join(",")).as_bytes(), meterd::ingest::BodyKind::Json).await.expect("ingest");
        }
    });
    let sync = std::sync::Arc::new(meterd::sync::counters::CounterSync::new(
        shared.redis().cloned().expect("redis configured"),
        shared.instance_id(),
    ));
    rt.block_on(async { sync.sync_once(&shared).await.expect("first sync") });
    eprintln!("active window counters: {}", shared.counters().windows.len());
    let mut group = c.benchmark_group("sync_round_100k_counters");
    group.sample_size(10);
    group.bench_function("all_changed", |b| {
        b.iter_batched(
            || {
                shared.counters().windows.for_each(|_, cell| {
                    cell.value.fetch_add(1, Ordering::AcqRel);
                })
            },
            |()| rt.block_on(async { sync.sync_once(&shared).await.expect("sync") }),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("none_changed", |b| b.iter(|| rt.block_on(async { sync.sync_once(&shared).await.expect("sync") })));
    group.finish();
}

criterion_group!(redis_benches, benches);
criterion_main!(redis_benches);
