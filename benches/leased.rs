//! Issue 16: `cached`, `leased` and `strict` consumes with three instances on
//! one `redis-server`, in one run, and a hard credit balance leased or strict. Three in-process meterd apps (their syncers
//! and lease upkeep running) share a private Redis; consumes go straight to
//! `Engine::check` (no HTTP), so the figures are the decision path's.
//!
//! Prints, per enforcement: consumes/s over all instances, p50/p99 latency,
//! and for `leased` the share of decisions made inside a held slice; then a
//! burst against a limit of 3000 (every task consumes until refused) with the
//! units granted in the burst and after a drain. Starts its own
//! `redis-server` (`METERD_TEST_REDIS_SERVER_BIN`, else from PATH).
//! Run with `cargo bench --bench leased` (release build).

use meterd::app::AppHandle;
use meterd::config::Config;
use meterd::limits::CheckRequest;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/redis_proc.rs"]
mod redis_proc;
#[path = "../tests/common/require.rs"]
mod require;
use redis_proc::start_redis;

const PLANS: &str = r#"
[[meters]]
name = "m_cached"
aggregation = "sum"
[[meters]]
name = "m_leased"
aggregation = "sum"
[[meters]]
name = "m_strict"
aggregation = "sum"
[[meters]]
name = "c_leased"
aggregation = "sum"
[[meters]]
name = "c_strict"
aggregation = "sum"
[[meters]]
name = "b_cached"
aggregation = "sum"
[[meters]]
name = "b_leased"
aggregation = "sum"
[[meters]]
name = "b_strict"
aggregation = "sum"
[[plans]]
name = "p"
default = true
[plans.limits]
m_cached = { limit = 1000000000000, window = "month" }
m_leased = { limit = 1000000000000, window = "month", enforcement = "leased" }
m_strict = { limit = 1000000000000, window = "month", enforcement = "strict" }
b_cached = { limit = 3000, window = "month" }
b_leased = { limit = 3000, window = "month", enforcement = "leased" }
b_strict = { limit = 3000, window = "month", enforcement = "strict" }
c_leased = { limit = "credits" }
c_strict = { limit = "credits", enforcement = "strict" }
"#;

const INSTANCES: usize = 3;
const TASKS: usize = 4;
const RUN: Duration = Duration::from_millis(2_000);

async fn app(dir: &std::path::Path, port: u16, n: usize) -> AppHandle {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ninstance_id = \"bench-{n}\"\n[storage]\ndata_dir = {:?}\ndurability = \"buffered\"\n\
         [redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n{PLANS}",
        dir.display().to_string()
    );
    let valid = Config::parse(&text, "bench").and_then(|c| c.validate("bench")).expect("config");
    AppHandle::start(valid).await.expect("meterd starts")
}

fn request(customer: &str, meter: &str, id: String) -> CheckRequest {
    CheckRequest {
        customer: customer.into(),
        meter: meter.into(),
        quantity_text: Some("1".into()),
        consume: true,
        id: Some(id.into()),
        value: None,
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0) as f64 / 1000.0
}

static IDS: AtomicU64 = AtomicU64::new(0);

fn next_id() -> String {
    format!("b{}", IDS.fetch_add(1, Ordering::Relaxed))
}

/// Every task consumes on `meter` for `RUN`; returns latencies (ns) and count.
async fn throughput(apps: &[Arc<AppHandle>], customer: &str, meter: &str) -> (Vec<u64>, f64) {
    let mut handles = Vec::new();
    let started = Instant::now();
    for a in apps {
        for _ in 0..TASKS {
            let (a, customer, meter) = (a.clone(), customer.to_string(), meter.to_string());
            handles.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while started.elapsed() < RUN {
                    let t = Instant::now();
                    let answer = a.engine.check(request(&customer, &meter, next_id())).await.expect("consume");
                    lat.push(t.elapsed().as_nanos() as u64);
                    assert!(answer.allowed, "{meter}: refused under a huge limit");
                }
                lat
            }));
        }
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("task"));
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let rate = all.len() as f64 / secs;
    (all, rate)
}

/// Every task consumes until refused; returns the consumes granted.
async fn burst(apps: &[Arc<AppHandle>], customer: &str, meter: &str) -> u64 {
    let granted = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for a in apps {
        for _ in 0..8 {
            let (a, customer, meter, granted) = (a.clone(), customer.to_string(), meter.to_string(), granted.clone());
            handles.push(tokio::spawn(async move {
                while a.engine.check(request(&customer, &meter, next_id())).await.expect("consume").allowed {
                    granted.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for h in handles {
        h.await.expect("task");
    }
    granted.load(Ordering::Relaxed)
}

fn decisions(apps: &[Arc<AppHandle>]) -> (u64, u64) {
    apps.iter().map(|a| a.engine.redis().expect("redis").leases.decisions()).fold((0, 0), |(l, r), (a, b)| (l + a, r + b))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (_redis, port) = require::need!(start_redis());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime");
    let dirs: Vec<tempfile::TempDir> = (0..INSTANCES).map(|_| tempfile::tempdir().expect("tmp")).collect();
    rt.block_on(async {
        let mut apps = Vec::new();
        for (n, d) in dirs.iter().enumerate() {
            apps.push(Arc::new(app(d.path(), port, n).await));
        }
        // No slice is taken while Redis is younger than two lease ttls (4 s at the default sync interval).
        tokio::time::sleep(Duration::from_millis(4_200)).await;
        println!(
            "{INSTANCES} instances × {TASKS} tasks, one hot customer per enforcement, {} s each, durability buffered",
            RUN.as_secs_f64()
        );
        println!("| enforcement | consumes/s (all instances) | p50 µs | p99 µs | decided locally |");
        println!("|---|---|---|---|---|");
        // Prepaid credits (issues 16, 18): a hard balance, leased (the default) or strict.
        for meter in ["c_leased", "c_strict"] {
            let spec = meterd::model::grant::GrantSpec::from_json(
                &serde_json::json!({"id": format!("g-{meter}"), "meter": meter, "amount": 1_000_000_000_000i64}),
            )
            .expect("grant spec");
            apps[0].engine.grant_ports().create_grant("hot", spec).await.expect("grant");
        }
        // Every instance loads the grants (refresh every sync interval).
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let runs = [
            ("m_cached", "cached"),
            ("m_leased", "leased"),
            ("m_strict", "strict"),
            ("c_leased", "credits leased"),
            ("c_strict", "credits strict"),
        ];
        for (meter, name) in runs {
            for a in &apps {
                a.engine.ensure_customer("hot").await;
            }
            let before = decisions(&apps);
            let (lat, rate) = throughput(&apps, "hot", meter).await;
            let after = decisions(&apps);
            let local = match name {
                "cached" => "100 %".to_string(),
                "strict" | "credits strict" => "0 %".to_string(),
                _ => {
                    let (l, r) = (after.0 - before.0, after.1 - before.1);
                    format!("{:.2} % ({l} of {})", 100.0 * l as f64 / (l + r).max(1) as f64, l + r)
                }
            };
            println!("| {name} | {rate:.0} | {:.1} | {:.1} | {local} |", percentile(&lat, 0.5), percentile(&lat, 0.99));
        }
        println!();
        println!("Burst: limit 3000, consumes of 1, {INSTANCES} instances × 8 tasks, each consuming until refused");
        println!("| enforcement | granted in the burst | fraction of the limit |");
        println!("|---|---|---|");
        for (meter, name) in [("b_cached", "cached"), ("b_leased", "leased"), ("b_strict", "strict")] {
            let customer = format!("burst-{name}");
            for a in &apps {
                a.engine.ensure_customer(&customer).await;
            }
            let granted = burst(&apps, &customer, meter).await;
            println!("| {name} | {granted} | {:.1} % |", 100.0 * granted as f64 / 3000.0);
        }
        for a in apps {
            if let Ok(a) = Arc::try_unwrap(a) {
                let _ = a.shutdown().await;
            }
        }
    });
}
