//! Hot-path costs: parse + validate per event, parse + validate + count per event
//! (the whole ingest path minus HTTP), a counter add, a batch of counter folds
//! over 1M customers, a check decision on a warm key, the dedupe table's growth,
//! and the usage seam's cost (`seam/*`: the seam with no observer and with one
//! no-op observer against the direct counters call it wraps). Run with
//! `cargo bench --bench hot_path` (`-- seam` for the seam alone).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meterd::config::Config;
use meterd::counters::{Counters, Usage};
use meterd::engine::{now_ms, Engine};
use meterd::ingest::parse::{parse_batch, split_json, validate_batch, Rules};
use meterd::ingest::BodyKind;
use meterd::limits::decide::{decide, LimitState};
use meterd::model::{BillingAnchor, Enforcement, Limit, LimitAmount, Meter, WindowKind};
use meterd::store::sqlite::SqliteStore;
use meterd::usage::{Origin, UsageChange, UsageObserver, UsageSeam};
use std::sync::Arc;

const CONFIG: &str = include_str!("../config/examples/interview-platform.toml");

fn batch(n: usize, seed: usize) -> String {
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":"evt-{seed}-{i}","customer":"cust_{}","meter":"interview_minutes","quantity":12.5,"properties":{{"region":"eu"}}}}"#,
                i % 5000
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

fn engine(dir: &std::path::Path) -> (tokio::runtime::Runtime, Arc<Engine>) {
    engine_of(CONFIG, dir)
}

/// An engine of `config` without a WAL, on a runtime of its own.
fn engine_of(config: &str, dir: &std::path::Path) -> (tokio::runtime::Runtime, Arc<Engine>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let valid = Config::parse(config, "bench").and_then(|c| c.validate("bench")).expect("config");
    let store = Arc::new(SqliteStore::open(&dir.join("bench.sqlite")).expect("store"));
    let engine = rt
        .block_on(Engine::start(
            &valid,
            "bench".into(),
            store.clone(),
            store,
            // No WAL: these benches measure the in-memory path.
            meterd::wal::WalConfig::off(dir.join("wal")),
            None,
        ))
        .expect("engine");
    (rt, Arc::new(engine))
}

fn parse_validate(c: &mut Criterion) {
    let valid = Config::parse(CONFIG, "bench").and_then(|c| c.validate("bench")).expect("config");
    let body = batch(1000, 0);
    let rules = Rules { now_ms: now_ms(), max_lateness_ms: 35 * 86_400_000, max_batch_events: 10_000 };
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("parse_validate_1000", |b| {
        b.iter(|| parse_batch(body.as_bytes(), false, &valid.catalog, &rules).expect("valid").len())
    });
    // The two-pass form (split, then validate each value): the comparison for the
    // one-pass parser above.
    g.bench_function("parse_validate_two_pass_1000", |b| {
        b.iter(|| {
            let values = split_json(body.as_bytes(), 10_000).expect("split");
            validate_batch(&values, &valid.catalog, &rules).expect("valid").len()
        })
    });
    let dir = tempfile::tempdir().expect("tmp");
    let (rt, engine) = engine(dir.path());
    // Fresh ids each iteration so nothing is a duplicate; bodies prepared outside
    // the timed part.
    let mut seed = 1;
    g.bench_function("parse_validate_count_1000", |b| {
        b.iter_batched(
            || {
                seed += 1;
                batch(1000, seed)
            },
            |body| rt.block_on(engine.ingest(body.as_bytes(), BodyKind::Json)).expect("ingest"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn counter_add(c: &mut Criterion) {
    let (counters, meter) = counters_and_meter();
    let usage = usage_of(&meter, 42, now_ms());
    c.bench_function("counter_add_warm", |b| b.iter(|| counters.apply(std::slice::from_ref(&usage))));
}

/// An observer that does nothing: what one subscriber costs the hot path.
struct NoOp;

impl UsageObserver for NoOp {
    fn changed(&self, change: &UsageChange<'_>) {
        std::hint::black_box(change);
    }
}

/// The usage seam against the counters call it wraps, on a warm key and on a
/// batch of 1000 usages of 10k warm customers: direct (the counters the quiet
/// seam owns, so both work on the same memory), through the seam with no
/// observer, through a seam with one no-op observer.
fn seam(c: &mut Criterion) {
    let now = now_ms();
    let (quiet, meter) = counters_and_meter();
    let (watched, _) = counters_and_meter();
    let quiet = UsageSeam::new(quiet, Vec::new());
    let direct = quiet.counters();
    let watched = UsageSeam::new(watched, vec![Arc::new(NoOp)]);
    let usage = usage_of(&meter, 42, now);
    let batches = usage_batches(&meter, 10_000, now);
    let mut g = c.benchmark_group("seam");
    g.warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    g.bench_function("one_usage/direct_counters", |b| b.iter(|| direct.apply(std::slice::from_ref(&usage))));
    g.bench_function("one_usage/seam_no_observer", |b| b.iter(|| quiet.apply(std::slice::from_ref(&usage), Origin::Live)));
    g.bench_function("one_usage/seam_one_noop_observer", |b| b.iter(|| watched.apply(std::slice::from_ref(&usage), Origin::Live)));
    g.throughput(Throughput::Elements(1000));
    let mut next = 0;
    g.bench_function("batch_1000/direct_counters", |b| {
        b.iter(|| {
            next = (next + 1) % batches.len();
            direct.apply(&batches[next]);
        })
    });
    g.bench_function("batch_1000/seam_no_observer", |b| {
        b.iter(|| {
            next = (next + 1) % batches.len();
            quiet.apply(&batches[next], Origin::Live);
        })
    });
    g.bench_function("batch_1000/seam_one_noop_observer", |b| {
        b.iter(|| {
            next = (next + 1) % batches.len();
            watched.apply(&batches[next], Origin::Live);
        })
    });
    g.finish();
}

/// Counters for the example config, and its `interview_minutes` meter.
fn counters_and_meter() -> (Counters, Meter) {
    let valid = Config::parse(CONFIG, "bench").and_then(|c| c.validate("bench")).expect("config");
    let meter = valid.catalog.meter_by_name("interview_minutes").expect("meter").clone();
    (Counters::new(&valid.catalog, 1), meter)
}

/// One usage of `meter` by `customer` at `ts`.
fn usage_of(meter: &Meter, customer: u32, ts: i64) -> Usage<'_> {
    Usage { customer, meter, raw: 1250, ts, properties: &[], props_hash: 0, anchor: BillingAnchor::default() }
}

/// 64 batches of 1000 usages at `ts`: a fixed pseudo-random walk over `customers`.
fn usage_batches(meter: &Meter, customers: u32, ts: i64) -> Vec<Vec<Usage<'_>>> {
    (0..64_u32)
        .map(|b| (0..1000_u32).map(|i| usage_of(meter, (b * 1000 + i).wrapping_mul(2_654_435_761) % customers, ts)).collect())
        .collect()
}

/// Folding a batch of 1000 usages spread over 1M customers (counters far larger
/// than the caches, as under load): the batch path, which visits each map shard
/// by shard and prefetches slots a few usages ahead, against folding the same
/// usages one call each (no prefetch), in the same run. Per-usage cost in the
/// output.
fn counter_batch(c: &mut Criterion) {
    const CUSTOMERS: u32 = 1_000_000;
    let (counters, meter) = counters_and_meter();
    let now = now_ms();
    let all: Vec<Usage> = (0..CUSTOMERS).map(|c| usage_of(&meter, c, now)).collect();
    for chunk in all.chunks(1000) {
        counters.apply(chunk);
    }
    let batches = usage_batches(&meter, CUSTOMERS, now);
    let mut g = c.benchmark_group("counters");
    g.throughput(Throughput::Elements(1000));
    let mut next = 0;
    g.bench_function("fold_batch_1000_of_1m_customers", |b| {
        b.iter(|| {
            next = (next + 1) % batches.len();
            counters.apply(&batches[next]);
        })
    });
    g.bench_function("fold_1000_one_by_one_of_1m_customers", |b| {
        b.iter(|| {
            next = (next + 1) % batches.len();
            for u in &batches[next] {
                counters.apply(std::slice::from_ref(u));
            }
        })
    });
    g.finish();
}

/// Two threads folding batches of 1000 usages over the same 10,000 customers
/// at once, as two tokio workers do under batched ingest: the batch path (one
/// lock per shard a batch touches) against one call per usage (one lock per
/// key, each lock word pulled from the other core), in the same run. Per-usage
/// cost in the output (wall time, both threads together).
fn counter_batch_two_threads(c: &mut Criterion) {
    let (counters, meter) = counters_and_meter();
    let batches = usage_batches(&meter, 10_000, now_ms());
    for batch in &batches {
        counters.apply(batch);
    }
    let run = |iters: u64, one_by_one: bool| {
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            for t in 0..2_usize {
                let (counters, batches) = (&counters, &batches);
                s.spawn(move || {
                    for i in 0..iters as usize {
                        let batch = &batches[(i * 2 + t) % batches.len()];
                        if one_by_one {
                            batch.iter().for_each(|u| counters.apply(std::slice::from_ref(u)));
                        } else {
                            counters.apply(batch);
                        }
                    }
                });
            }
        });
        started.elapsed()
    };
    let mut g = c.benchmark_group("counters");
    g.throughput(Throughput::Elements(2000));
    g.bench_function("fold_batch_1000_two_threads_10k_customers", |b| b.iter_custom(|iters| run(iters, false)));
    g.bench_function("fold_1000_one_by_one_two_threads_10k_customers", |b| b.iter_custom(|iters| run(iters, true)));
    g.finish();
}

/// The WAL record of a batch of 1000 events with 1000 distinct customers, as
/// the ingest path makes it (builder, rkyv encoding, framing with its CRC):
/// what `durability = "buffered"` or `"fsync"` adds per event before the
/// writer thread's `write`. Per-event cost in the output.
fn wal_record(c: &mut Criterion) {
    use meterd::wal::record::{frame, RecordBuilder};
    let names: Vec<String> = (0..1000).map(|i| format!("cust_{i:06}")).collect();
    let now = now_ms();
    let mut g = c.benchmark_group("wal");
    g.throughput(Throughput::Elements(1000));
    let mut out = Vec::with_capacity(1 << 20);
    g.bench_function("build_encode_frame_1000", |b| {
        b.iter(|| {
            let mut builder = RecordBuilder::new(now, names.len());
            for (i, name) in names.iter().enumerate() {
                builder.push::<&str, &str>(i as u128, i as u32, name, 0, "interview_minutes", 1250, now, &[]);
            }
            let record = builder.finish().expect("encode");
            out.clear();
            frame(&mut out, 1, &record.payload);
            std::hint::black_box(out.len())
        })
    });
    g.throughput(Throughput::Elements(1));
    // One event: the record of every consume and of a single-event ingest.
    g.bench_function("build_encode_frame_one", |b| {
        b.iter(|| {
            let mut builder = RecordBuilder::new(now, 1);
            builder.push::<&str, &str>(7, 7, &names[7], 0, "interview_minutes", 1250, now, &[]);
            let record = builder.finish().expect("encode");
            out.clear();
            frame(&mut out, 1, &record.payload);
            std::hint::black_box(out.len())
        })
    });
    g.finish();
}

fn check_decision(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let (rt, engine) = engine(dir.path());
    rt.block_on(engine.ingest(batch(10, 99).as_bytes(), BodyKind::Json)).expect("warm");
    let meter = engine.catalog().meter_by_name("interview_minutes").expect("meter").clone();
    let interviews = engine.catalog().meter_by_name("interviews").expect("meter").clone();
    let now = now_ms();
    let mut g = c.benchmark_group("check");
    g.bench_function("evaluate_warm_key", |b| b.iter(|| engine.evaluate("cust_3", &meter, 1000, now).1));
    g.bench_function("evaluate_unknown_customer", |b| b.iter(|| engine.evaluate("nobody", &interviews, 1, now).1));
    let limit = Limit {
        window: WindowKind::Month,
        amount: LimitAmount::Finite(30_000),
        hard: true,
        enforcement: Enforcement::Cached,
        notify: None,
    };
    let states = [LimitState { limit, window: WindowKind::Month.bounds(now, BillingAnchor::default()), used: 29_500, held: 0 }];
    g.bench_function("decide_only", |b| b.iter(|| decide(std::hint::black_box(&states), 1000)));
    // A whole plain check as the handler runs it, from the parsed request to
    // the answer's JSON: evaluate, build the answer (one view per limit, times
    // written as RFC 3339), serialize.
    let ask = meterd::limits::CheckRequest {
        customer: "cust_3".into(),
        meter: "interview_minutes".into(),
        quantity_text: Some("10".into()),
        consume: false,
        id: None,
        value: None,
    };
    g.bench_function("answer_json_warm_key", |b| {
        b.iter(|| {
            let answer = rt.block_on(engine.limits_ports().check(&ask)).expect("check");
            answer.to_json().map(|v| v.len()).unwrap_or(0)
        })
    });
    // The answer's JSON alone, both ways: serde's derived `Serialize` (the
    // answer's definition of its shape) and the hand-written fast path the
    // handler uses (`CheckAnswer::to_json`, equal byte for byte).
    let answer = rt.block_on(engine.limits_ports().check(&ask)).expect("check");
    g.bench_function("answer_serialize_serde", |b| {
        b.iter(|| serde_json::to_vec(std::hint::black_box(&*answer)).map(|v| v.len()).unwrap_or(0))
    });
    g.bench_function("answer_serialize_written", |b| b.iter(|| std::hint::black_box(&*answer).to_json().map(|v| v.len()).unwrap_or(0)));
    // The body of a consume as the load tests send it (`POST /v1/check`).
    let body = br#"{"customer":"c4242","meter":"interview_minutes","quantity":1,"consume":true,"id":"r1733450000000000000-1-123456"}"#;
    g.bench_function("parse_consume_request", |b| {
        b.iter(|| meterd::limits::CheckRequest::from_json(std::hint::black_box(body)).map(|r| r.consume))
    });
    g.finish();
}

/// The dedupe table from empty to 4M ids in batches of 1000 (what a fresh
/// instance under load does): the probes' cache misses plus every growth step,
/// and the page faults of the memory each step takes. Per-id cost in the output.
fn dedupe_growth(c: &mut Criterion) {
    use meterd::ingest::dedupe::{hash_id, Deduper};
    const IDS: usize = 4_000_000;
    let ids: Vec<_> = (0..IDS).map(|i| hash_id(&format!("evt-{i}"))).collect();
    let mut g = c.benchmark_group("dedupe");
    g.sample_size(10);
    g.throughput(Throughput::Elements(IDS as u64));
    g.bench_function("grow_to_4m_in_batches_of_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let d = Deduper::new(3_600_000);
                let started = std::time::Instant::now();
                for chunk in ids.chunks(1000) {
                    std::hint::black_box(d.insert_batch(chunk, 0));
                }
                total += started.elapsed();
            }
            total
        })
    });
    // The housekeeping sweep (every ten seconds) of a table of 4M ids none of
    // which has expired: what it costs to find there is nothing to drop.
    let full = Deduper::new(3_600_000);
    for chunk in ids.chunks(1000) {
        std::hint::black_box(full.insert_batch(chunk, 0));
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("sweep_4m_nothing_expired", |b| b.iter(|| full.sweep(60_000)));
    g.finish();
}

/// A whole consume without a WAL (`durability = "none"`), as the handler runs
/// it from the parsed request: one hard limit (compare-and-swap), a new id
/// each time (its remembered answer), 10k customers, the answer's JSON.
fn consume_none(c: &mut Criterion) {
    const CONFIG: &str = "[[meters]]\nname = \"calls\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\n\
                          calls = { limit = 1000000000000, window = \"month\" }\n";
    let dir = tempfile::tempdir().expect("tmp");
    let (rt, engine) = engine_of(CONFIG, dir.path());
    let customers: Vec<String> = (0..10_000).map(|i| format!("c{i}")).collect();
    let mut n = 0_u64;
    let mut g = c.benchmark_group("check");
    g.bench_function("consume_cas_new_id_no_wal", |b| {
        b.iter(|| {
            n += 1;
            let ask = meterd::limits::CheckRequest {
                customer: customers[(n % 10_000) as usize].as_str().into(),
                meter: "calls".into(),
                quantity_text: Some("1".into()),
                consume: true,
                id: Some(compact_str::format_compact!("b{n}")),
                value: None,
            };
            let answer = rt.block_on(engine.limits_ports().check(&ask)).expect("consume");
            assert!(answer.allowed);
            answer.to_json().map(|v| v.len()).unwrap_or(0)
        })
    });
    g.finish();
}

/// A batch of 1000 events of a `unique_count` meter through the whole ingest
/// path without a WAL (parse, the cap check per window, dedupe, fold): 100
/// customers, 1000 values between them, day and month windows. After the first
/// batch every value is counted, as in a steady month. Per-event cost.
fn unique_ingest(c: &mut Criterion) {
    const CONFIG: &str = "[[meters]]\nname = \"users\"\naggregation = \"unique_count\"\nunique_property = \"user_id\"\n\
                          [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\n\
                          users = [{ limit = 1000000, window = \"month\" }, { limit = 1000000, window = \"day\" }]\n";
    let dir = tempfile::tempdir().expect("tmp");
    let (rt, engine) = engine_of(CONFIG, dir.path());
    let body = |seed: usize| {
        let events: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    r#"{{"id":"u-{seed}-{i}","customer":"team_{}","meter":"users","properties":{{"user_id":"u{}"}}}}"#,
                    i % 100,
                    (i * 7) % 1000
                )
            })
            .collect();
        format!("[{}]", events.join(","))
    };
    rt.block_on(engine.ingest(body(0).as_bytes(), BodyKind::Json)).expect("warm");
    let mut seed = 1;
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("unique_count_1000_counted_values", |b| {
        b.iter_batched(
            || {
                seed += 1;
                body(seed)
            },
            |body| rt.block_on(engine.ingest(body.as_bytes(), BodyKind::Json)).expect("ingest"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Unique counts (issue 25): a batch of 1000 usages of a `unique_count` meter
/// (each window's set decides what it adds; one usage at a time) against the
/// same usages on a `sum` meter with the same properties, 10k customers with
/// 1000 values between them, month windows warm. Same run, per-usage cost.
fn unique_count(c: &mut Criterion) {
    const CONFIG: &str = "[[meters]]\nname = \"users\"\naggregation = \"unique_count\"\nunique_property = \"user_id\"\n\
                          [[meters]]\nname = \"calls\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\n\
                          users = { limit = 1000000, window = \"month\" }\ncalls = { limit = 1000000, window = \"month\" }\n";
    let valid = Config::parse(CONFIG, "bench").and_then(|c| c.validate("bench")).expect("config");
    let counters = Counters::new(&valid.catalog, 1);
    let (users, calls) = (valid.catalog.meter_by_name("users").expect("users"), valid.catalog.meter_by_name("calls").expect("calls"));
    let now = now_ms();
    type Props = Vec<(std::borrow::Cow<'static, str>, std::borrow::Cow<'static, str>)>;
    let props: Vec<Props> = (0..1000).map(|i| vec![("user_id".into(), format!("u{i}").into())]).collect();
    let batches = |meter: &'static Meter| -> Vec<Vec<Usage<'static>>> {
        let props: &'static [Props] = Box::leak(props.clone().into_boxed_slice());
        (0..64_u32)
            .map(|b| {
                (0..1000_u32)
                    .map(|i| {
                        let p = &props[((b * 7 + i) % 1000) as usize];
                        Usage {
                            customer: (b * 1000 + i).wrapping_mul(2_654_435_761) % 10_000,
                            meter,
                            raw: 1,
                            ts: now,
                            properties: p,
                            props_hash: meterd::counters::props_hash(p),
                            anchor: BillingAnchor::default(),
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let (users, calls): (&'static Meter, &'static Meter) = (Box::leak(Box::new(users.clone())), Box::leak(Box::new(calls.clone())));
    let (unique, sum) = (batches(users), batches(calls));
    for b in unique.iter().chain(&sum) {
        counters.apply(b);
    }
    let mut g = c.benchmark_group("unique");
    g.warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    g.throughput(Throughput::Elements(1000));
    let mut next = 0;
    g.bench_function("batch_1000/sum_meter_with_properties", |b| {
        b.iter(|| {
            next = (next + 1) % sum.len();
            counters.apply(&sum[next]);
        })
    });
    g.bench_function("batch_1000/unique_count_meter", |b| {
        b.iter(|| {
            next = (next + 1) % unique.len();
            counters.apply(&unique[next]);
        })
    });
    g.finish();
}

/// Remembered consume answers (`meterd::answers`): taking the cell of a new id
/// in a table at its cap (which drops the oldest of its set), the
/// housekeeping sweep of a table at its cap with nothing aged out
/// (`sweep_90k_over_cap`: before the caps were kept per insert, the table then
/// held 90k more and the sweep cut them), and a whole second of consumes at
/// 90 k/s at the cap followed by the sweep (`second_at_cap_90k`: all that
/// keeping to the cap costs, wherever it is paid).
fn consume_answers(c: &mut Criterion) {
    use meterd::answers::{AnswerLimits, ConsumeAnswers, MAX_RECENT};
    let limits = AnswerLimits::for_window(86_400_000);
    let filled = |n: usize| {
        let a = ConsumeAnswers::new(limits);
        for i in 0..n {
            let cell = a.cell(i as u128 * 0x9E37_79B9_7F4A_7C15, i as i64 / 90);
            let _ = cell.set(Arc::new(answer()));
        }
        a
    };
    let mut g = c.benchmark_group("answers");
    let full = filled(MAX_RECENT);
    let mut id = u128::MAX / 2;
    g.bench_function("cell_new_id_at_cap", |b| {
        b.iter(|| {
            id += 1;
            // Decided, as every consume's cell is (an empty one is kept a minute).
            let cell = full.cell(id, 0);
            let _ = cell.set(Arc::new(answer()));
            cell
        })
    });
    g.sample_size(10);
    g.bench_function("sweep_90k_over_cap", |b| {
        b.iter_batched(|| filled(MAX_RECENT + 90_000), |a| (a.sweep(5_000), a), BatchSize::PerIteration)
    });
    // A second of consumes at 90 k/s into a table at its cap, then the sweep
    // of the tick: all that keeping to the cap costs, wherever it is paid.
    g.bench_function("second_at_cap_90k", |b| {
        b.iter_batched(
            || filled(MAX_RECENT),
            |a| {
                for i in 0..90_000u128 {
                    let cell = a.cell(u128::MAX / 3 + i * 0x9E37_79B9_7F4A_7C15, 3_000);
                    let _ = cell.set(Arc::new(answer()));
                }
                (a.sweep(3_000), a)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn answer() -> meterd::model::answer::CheckAnswer {
    let d = meterd::model::quantity::Decimal { raw: 1, precision: 0 };
    meterd::model::answer::CheckAnswer {
        allowed: true,
        customer: "cust_42".into(),
        meter: "interview_minutes".into(),
        quantity: d,
        used: d,
        held: d,
        limit: Some(d),
        remaining: Some(d),
        window: Some("month"),
        resets_at: Some(meterd::model::window::Rfc3339(1_798_761_600_000)), // 2027-01-01T00:00:00Z
        hard: true,
        reason: meterd::model::answer::Reason::WithinLimit,
        limits: Default::default(),
    }
}

criterion_group!(
    benches,
    consume_answers,
    consume_none,
    unique_ingest,
    parse_validate,
    counter_add,
    seam,
    counter_batch,
    counter_batch_two_threads,
    wal_record,
    check_decision,
    dedupe_growth,
    unique_count
);
criterion_main!(benches);
