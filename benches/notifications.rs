//! Threshold notifications' cost on the hot path (issue 17): batched ingest
//! (1000 events over 5000 customers, no WAL) through an engine without
//! observers, one with a no-op observer (what the seam itself costs any
//! observer) and one with the threshold observer, in the same run. Limits are
//! high, so after the first sight of each window the observer pays its map
//! lookup and comparison only — the steady state. Run with
//! `cargo bench --bench notifications`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meterd::config::Config;
use meterd::engine::Engine;
use meterd::ingest::BodyKind;
use meterd::store::sqlite::SqliteStore;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const PLANS: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"
precision = 1
[[plans]]
name = "p"
default = true
[plans.limits]
tokens = [ { limit = 1000000000000, window = "month" }, { limit = 1000000000000, window = "day" } ]
"#;

fn notifications_section() -> String {
    std::env::set_var("METERD_BENCH_WHSEC", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=");
    "[notifications]\n[[notifications.endpoints]]\nname = \"app\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret_env = \"METERD_BENCH_WHSEC\"\n"
        .into()
}

fn batch(n: usize, seed: usize) -> String {
    let events: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"id":"evt-{seed}-{i}","customer":"cust_{}","meter":"tokens","quantity":12.5}}"#, (seed * n + i) % 5000))
        .collect();
    format!("[{}]", events.join(","))
}

/// An engine, and its notifier (kept alive: the observer holds it weakly).
/// Sees every change, does nothing.
struct NoOp;

impl meterd::usage::UsageObserver for NoOp {
    fn changed(&self, change: &meterd::usage::UsageChange<'_>) {
        std::hint::black_box(change);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Observer {
    None,
    NoOp,
    Thresholds,
}

fn engine(rt: &tokio::runtime::Runtime, dir: &std::path::Path, observer: Observer) -> (Arc<Engine>, Option<Arc<meterd::notify::Notifier>>) {
    let notify = observer == Observer::Thresholds;
    let text = if notify { format!("{}{PLANS}", notifications_section()) } else { PLANS.to_string() };
    let valid = Config::parse(&text, "bench").and_then(|c| c.validate("bench")).expect("config");
    let store = Arc::new(SqliteStore::open(&dir.join("bench.sqlite")).expect("store"));
    let notifier = valid.notifications.as_ref().map(|n| meterd::notify::Notifier::open(n, dir, false).expect("outbox"));
    let mut observers: Vec<Arc<dyn meterd::usage::UsageObserver>> = notifier.iter().map(|n| n.observer()).collect();
    if observer == Observer::NoOp {
        observers.push(Arc::new(NoOp));
    }
    let wal = meterd::wal::WalConfig::off(dir.join("wal"));
    let engine =
        Arc::new(rt.block_on(Engine::start_observed(&valid, "bench".into(), store.clone(), store, wal, None, observers)).expect("engine"));
    if let Some(n) = &notifier {
        n.bind(&engine, None);
    }
    (engine, notifier)
}

fn ingest_on_off(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dirs = [tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp")];
    let (off, _) = engine(&rt, dirs[0].path(), Observer::None);
    let (noop, _) = engine(&rt, dirs[1].path(), Observer::NoOp);
    let (on, _notifier) = engine(&rt, dirs[2].path(), Observer::Thresholds);
    let seed = AtomicUsize::new(0);
    // Warm: every customer's windows seen (and armed) on both.
    for _ in 0..10 {
        let body = batch(1000, seed.fetch_add(1, Ordering::Relaxed));
        for e in [&off, &noop, &on] {
            rt.block_on(e.ingest(body.as_bytes(), BodyKind::Json)).expect("ingest");
        }
    }
    let mut g = c.benchmark_group("notifications");
    g.throughput(Throughput::Elements(1000));
    g.warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(4));
    for (name, engine) in [("ingest_batch_1000/off", &off), ("ingest_batch_1000/noop_observer", &noop), ("ingest_batch_1000/on", &on)] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || batch(1000, seed.fetch_add(1, Ordering::Relaxed)),
                |body| rt.block_on(engine.ingest(body.as_bytes(), BodyKind::Json)).expect("ingest"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, ingest_on_off);
criterion_main!(benches);
