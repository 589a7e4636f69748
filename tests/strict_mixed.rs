//! A meter with a cached and a strict limit, under concurrent consumes against
//! a real Redis (a private `redis-server`, as in `tests/redis.rs`). The strict
//! path holds the `(customer, meter)` consume lock from the local decision of
//! the cached limit to the fold of the answer, so on one instance neither
//! limit is ever passed; across instances the strict one never is.

mod common;

use common::redis_server::RedisServer;
use common::require::need;
use common::{check, put, uid, TestServer};
use serde_json::json;
use std::time::{Duration, Instant};

const PLANS: &str = r#"
[[meters]]
name = "gpu"
aggregation = "sum"

[[plans]]
name = "cached_binds"
default = true
[plans.limits]
gpu = [ { limit = 30, window = "day" }, { limit = 1000, window = "month", enforcement = "strict" } ]

[[plans]]
name = "strict_binds"
[plans.limits]
gpu = [ { limit = 1000, window = "day" }, { limit = 25, window = "month", enforcement = "strict" } ]
"#;

fn config(redis_url: &str, instance: &str) -> String {
    format!(
        "[server]\ninstance_id = \"{instance}\"\n[storage]\ndurability = \"fsync\"\nflush_interval = \"200ms\"\n\
         [redis]\nurl = \"{redis_url}\"\nsync_interval = \"100ms\"\ntimeout = \"500ms\"\nentitlements_ttl = \"2s\"\n{PLANS}"
    )
}

/// The month total Redis holds for a customer's `gpu` window.
async fn redis_month_total(redis: &RedisServer, customer: &str) -> i64 {
    let mut conn = redis.conn().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("meterd:{{{customer}}}:w:gpu:month:*")).query_async(&mut conn).await.expect("keys");
    let mut total = 0;
    for k in keys {
        let t: Option<i64> = redis::cmd("HGET").arg(&k).arg("t").query_async(&mut conn).await.expect("hget");
        total += t.unwrap_or(0);
    }
    total
}

/// `tasks` concurrent consumers per server, `each` consumes of 1 unit each;
/// returns the units granted.
async fn race(servers: &[&TestServer], customer: &str, tasks: usize, each: usize) -> i64 {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(servers.len() * tasks));
    let mut handles = Vec::new();
    for s in servers {
        for _ in 0..tasks {
            let (c, customer, start) = (s.client(), customer.to_string(), start.clone());
            handles.push(tokio::spawn(async move {
                start.wait().await;
                let mut granted = 0i64;
                for _ in 0..each {
                    let r = c.check(&json!({"customer": customer, "meter": "gpu", "quantity": 1, "consume": true, "id": uid("m")})).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["allowed"] == json!(true) {
                        granted += 1;
                    }
                }
                granted
            }));
        }
    }
    let mut granted = 0;
    for h in handles {
        granted += h.await.expect("consumer");
    }
    granted
}

/// `used` of each of the meter's limits (day, month) as `server` sees them.
async fn used(server: &TestServer, customer: &str) -> Vec<i64> {
    let answer = check(&server.client(), customer, "gpu", 0).await;
    let limits = answer["limits"].as_array().cloned().unwrap_or_default();
    limits.iter().map(|l| l["used"].as_i64().unwrap_or(-1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_and_strict_limits_on_one_meter_hold_exactly_under_concurrent_consumes() {
    let redis = need!(RedisServer::start(false).await);
    let a = TestServer::start(&config(&redis.url(), "mixed-a")).await;
    let b = TestServer::start(&config(&redis.url(), "mixed-b")).await;

    // The cached day limit (30) binds: 16 consumers on one instance, 80 tries.
    let customer = uid("cached");
    let granted = race(&[&a], &customer, 16, 5).await;
    assert_eq!(granted, 30, "the cached limit is granted exactly, never passed");
    assert_eq!(used(&a, &customer).await, vec![30, 30]);
    assert_eq!(redis_month_total(&redis, &customer).await, 30, "the strict window in redis holds exactly what was granted");

    // The strict month limit (25) binds: 8 consumers on each of two instances.
    let customer = uid("strict");
    assert_eq!(put(&a.client(), &customer, json!({"plan": "strict_binds"})).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while check(&b.client(), &customer, "gpu", 0).await["limits"][1]["limit"] != json!(25) {
        assert!(Instant::now() < deadline, "the plan change did not reach the second instance");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let granted = race(&[&a, &b], &customer, 8, 5).await;
    assert_eq!(granted, 25, "the strict limit is granted exactly across instances");
    assert_eq!(redis_month_total(&redis, &customer).await, 25);
    // Each instance's day window holds its own consumes plus the other's once synced.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (ua, ub) = (used(&a, &customer).await, used(&b, &customer).await);
        if ua == vec![25, 25] && ub == vec![25, 25] {
            break;
        }
        assert!(Instant::now() < deadline, "instances disagree after sync: {ua:?} {ub:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One change as told: where from, raw units, (kind, local, total) per window.
type Told = (meterd::usage::Origin, i64, Vec<(meterd::model::WindowKind, i64, i64)>);

/// Records every change the usage seam tells.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<Told>>);

impl meterd::usage::UsageObserver for Recorder {
    fn changed(&self, change: &meterd::usage::UsageChange<'_>) {
        let mut windows: Vec<_> = change.windows.iter().map(|w| (w.key.kind, w.local, w.total)).collect();
        windows.sort_by_key(|w| w.0.index());
        if let Ok(mut all) = self.0.lock() {
            all.push((change.origin, change.raw, windows));
        }
    }
}

fn strict_consume(customer: &str) -> meterd::limits::CheckRequest {
    meterd::limits::CheckRequest {
        customer: customer.into(),
        meter: "gpu".into(),
        quantity_text: Some("1".into()),
        consume: true,
        id: Some(uid("s").into()),
        value: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_usage_observer_sees_strict_consumes_and_the_totals_redis_answers() {
    use meterd::model::WindowKind::{Day, Month};
    use meterd::usage::Origin;
    let redis = need!(RedisServer::start(false).await);
    // The watched instance syncs rarely: the totals it sees come from the strict answers.
    let watched_config = config(&redis.url(), "watched").replace("sync_interval = \"100ms\"", "sync_interval = \"1h\"");
    let dir = tempfile::tempdir().expect("tmp");
    let valid = meterd::config::Config::parse(&common::with_dirs(&watched_config, dir.path()), "watched.toml")
        .and_then(|c| c.validate("watched.toml"))
        .expect("config");
    let recorder = std::sync::Arc::new(Recorder::default());
    let app = meterd::AppHandle::start_observed(valid, vec![recorder.clone()]).await.expect("meterd starts");
    let take = || std::mem::take(&mut *recorder.0.lock().expect("lock"));
    take();

    let customer = uid("watched");
    assert!(app.engine.check(strict_consume(&customer)).await.expect("consume").allowed);
    assert_eq!(take(), vec![(Origin::Live, 1, vec![(Day, 1, 1), (Month, 1, 1)])]);

    // Another instance consumes 2; the next strict answer here brings its usage.
    let other = TestServer::start(&config(&redis.url(), "other")).await;
    for _ in 0..2 {
        let r = other.client().check(&json!({"customer": customer, "meter": "gpu", "quantity": 1, "consume": true, "id": uid("o")})).await;
        assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    }
    assert!(app.engine.check(strict_consume(&customer)).await.expect("consume").allowed);
    let seen = take();
    assert_eq!(seen.iter().filter(|(o, _, _)| *o == Origin::Live).count(), 1, "{seen:?}");
    assert!(seen.iter().all(|(o, _, _)| matches!(o, Origin::Live | Origin::Sync)), "{seen:?}");
    let month = seen.last().and_then(|(_, _, w)| w.iter().find(|(k, _, _)| *k == Month).copied());
    assert_eq!(month, Some((Month, 2, 4)), "own usage 2, total over both instances 4: {seen:?}");
    assert_eq!(redis_month_total(&redis, &customer).await, 4);
    app.shutdown().await.expect("shutdown");
}
