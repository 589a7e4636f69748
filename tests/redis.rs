//! Several meterd instances sharing one real Redis (a private `redis-server` per
//! test, so a test may stop it or restart it empty): entitlement propagation,
//! exact global totals, cross-instance dedupe, strict limits that never
//! overshoot, the cached-limit overshoot against its bound, Redis down and back
//! empty, and SIGKILL of an instance with no double count.

mod common;

use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::redis_server::RedisServer;
use common::require::need;
use common::{check, event, ingest, put, uid, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PLANS: &str = r#"
[[meters]]
name = "calls"
aggregation = "sum"

[[meters]]
name = "gpu"
aggregation = "sum"

[[plans]]
name = "base"
default = true
[plans.limits]
calls = { limit = 1000000, window = "month" }
gpu = { limit = 100, window = "month", enforcement = "strict" }

[[plans]]
name = "small"
[plans.limits]
calls = { limit = 60, window = "month" }
gpu = { limit = 100, window = "month", enforcement = "strict" }
"#;

fn config(redis_url: &str, instance: &str, sync: &str) -> String {
    format!(
        "[server]\ninstance_id = \"{instance}\"\n[storage]\ndurability = \"fsync\"\nflush_interval = \"200ms\"\n\
         [redis]\nurl = \"{redis_url}\"\nsync_interval = \"{sync}\"\ntimeout = \"300ms\"\nentitlements_ttl = \"2s\"\n{PLANS}"
    )
}

async fn instances(redis: &RedisServer, n: usize, sync: &str) -> Vec<TestServer> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(TestServer::start(&config(&redis.url(), &format!("inst{i}"), sync)).await);
    }
    out
}

/// `used` of a check on each instance.
async fn used_everywhere(servers: &[TestServer], customer: &str, meter: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for s in servers {
        out.push(check(&s.client(), customer, meter, 0).await["used"].as_i64().unwrap_or(-1));
    }
    out
}

/// Polls until every instance reports `want` (or the deadline passes).
async fn wait_used(servers: &[TestServer], customer: &str, meter: &str, want: i64, limit: Duration) -> Vec<i64> {
    let deadline = Instant::now() + limit;
    loop {
        let used = used_everywhere(servers, customer, meter).await;
        if used.iter().all(|&u| u == want) || Instant::now() > deadline {
            return used;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The window total Redis holds for a customer's month window of `meter`.
async fn redis_total(redis: &RedisServer, customer: &str, meter: &str) -> i64 {
    let mut conn = redis.conn().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("meterd:{{{customer}}}:w:{meter}:month:*")).query_async(&mut conn).await.expect("keys");
    let mut total = 0;
    for k in keys {
        let t: Option<i64> = redis::cmd("HGET").arg(&k).arg("t").query_async(&mut conn).await.expect("hget");
        total += t.unwrap_or(0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plan_change_on_one_instance_is_seen_by_all_within_a_second() {
    let redis = need!(RedisServer::start(false).await);
    let servers = instances(&redis, 3, "50ms").await;
    let customer = uid("plan");
    assert_eq!(check(&servers[1].client(), &customer, "calls", 0).await["limit"], json!(1000000));
    let started = Instant::now();
    let r = put(&servers[0].client(), &customer, json!({"plan": "small"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut seen = vec![None; 3];
    while seen.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(5) {
        for (i, s) in servers.iter().enumerate() {
            if seen[i].is_none() && check(&s.client(), &customer, "calls", 0).await["limit"] == json!(60) {
                seen[i] = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("plan change seen after {seen:?}");
    for (i, t) in seen.iter().enumerate() {
        let t = t.unwrap_or_else(|| panic!("instance {i} never saw the plan change"));
        assert!(t < Duration::from_secs(1), "instance {i} saw the change after {t:?}");
    }
    // An instance started later loads it from Redis.
    let late = TestServer::start(&config(&redis.url(), "late", "50ms")).await;
    assert_eq!(check(&late.client(), &customer, "calls", 0).await["limit"], json!(60));
    assert_eq!(late.client().get(&format!("/v1/customers/{customer}/entitlements")).await.body["plan"], json!("small"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn totals_agree_across_instances_and_ids_dedupe_across_them() {
    let redis = need!(RedisServer::start(false).await);
    let servers = instances(&redis, 3, "50ms").await;
    let customer = uid("tot");
    let mut tasks = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let c = s.client();
        let customer = customer.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20 {
                let batch: Vec<Value> = (0..10).map(|k| event(&customer, "calls", 1 + ((i + round + k) % 3))).collect();
                ingest(&c, Value::Array(batch)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let expected: i64 =
        (0..3usize).map(|i| (0..20usize).map(|r| (0..10usize).map(|k| 1 + ((i + r + k) % 3) as i64).sum::<i64>()).sum::<i64>()).sum();
    let used = wait_used(&servers, &customer, "calls", expected, Duration::from_secs(5)).await;
    assert_eq!(used, vec![expected; 3], "every instance reports the global total");
    assert_eq!(redis_total(&redis, &customer, "calls").await, expected);

    // The same event id sent to two instances counts once.
    let e = event(&customer, "calls", 7);
    assert_eq!(ingest(&servers[0].client(), e.clone()).await["accepted"], json!(1));
    let again = ingest(&servers[1].client(), e.clone()).await;
    assert_eq!((again["accepted"].clone(), again["duplicates"].clone()), (json!(0), json!(1)), "{again}");
    assert_eq!(ingest(&servers[2].client(), e).await["duplicates"], json!(1));
    let used = wait_used(&servers, &customer, "calls", expected + 7, Duration::from_secs(5)).await;
    assert_eq!(used, vec![expected + 7; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_limits_never_overshoot_and_cached_overshoot_stays_within_its_bound() {
    let redis = need!(RedisServer::start(false).await);
    let servers = instances(&redis, 3, "100ms").await;
    // Strict: 100 units a month, 3 instances × 4 tasks × 20 consumes of 1.
    let customer = uid("strict");
    let mut tasks = Vec::new();
    for s in &servers {
        for _ in 0..4 {
            let c = s.client();
            let customer = customer.clone();
            tasks.push(tokio::spawn(async move {
                let mut granted = 0;
                for _ in 0..20 {
                    let r = c.check(&json!({"customer": customer, "meter": "gpu", "quantity": 1, "consume": true, "id": uid("c")})).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["allowed"] == json!(true) {
                        granted += 1;
                    } else {
                        assert_eq!(r.body["reason"], json!("limit_exceeded"), "{}", r.text);
                    }
                }
                granted
            }));
        }
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.expect("consumer");
    }
    assert_eq!(granted, 100, "strict: exactly the limit is granted across instances");
    assert_eq!(redis_total(&redis, &customer, "gpu").await, 100);
    assert_eq!(wait_used(&servers, &customer, "gpu", 100, Duration::from_secs(5)).await, vec![100; 3]);

    // Cached: 60 a month on the small plan; every instance consumes as fast as
    // it can. The documented bound: each instance may pass what the others
    // accepted within one sync interval, so at most 60 + (instances - 1) ×
    // (what one instance grants in an interval). With consumes of 1 unit, one
    // instance can never pass 60 on its own, so the total is below 3 × 60.
    let customer = uid("cached");
    assert_eq!(put(&servers[0].client(), &customer, json!({"plan": "small"})).await.status, 200);
    wait_limit(&servers, &customer, 60).await;
    let mut tasks = Vec::new();
    for s in &servers {
        let c = s.client();
        let customer = customer.clone();
        tasks.push(tokio::spawn(async move {
            let mut granted = 0;
            for _ in 0..80 {
                let r = c.check(&json!({"customer": customer, "meter": "calls", "quantity": 1, "consume": true, "id": uid("c")})).await;
                if r.body["allowed"] == json!(true) {
                    granted += 1;
                }
            }
            granted
        }));
    }
    let mut per_instance = Vec::new();
    for t in tasks {
        per_instance.push(t.await.expect("consumer"));
    }
    let total: i64 = per_instance.iter().sum();
    eprintln!("cached limit 60: granted {total} ({per_instance:?})");
    assert!(total >= 60, "the limit itself is always reachable: {per_instance:?}");
    assert!(per_instance.iter().all(|&g| g <= 60), "no instance passes the limit on its own: {per_instance:?}");
    assert!(total <= 3 * 60, "overshoot beyond the bound: {per_instance:?}");
    // Once synced, every instance refuses and agrees on the total.
    assert_eq!(wait_used(&servers, &customer, "calls", total, Duration::from_secs(5)).await, vec![total; 3]);
    for s in &servers {
        let r = s.client().check(&json!({"customer": customer, "meter": "calls", "quantity": 1, "consume": true, "id": uid("c")})).await;
        assert_eq!(r.body["allowed"], json!(false), "{}", r.text);
    }
}

async fn wait_limit(servers: &[TestServer], customer: &str, limit: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for s in servers {
        while check(&s.client(), customer, "calls", 0).await["limit"] != json!(limit) {
            assert!(Instant::now() < deadline, "plan change not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_and_restarted_empty_mid_load_loses_nothing() {
    let mut redis = need!(RedisServer::start(false).await);
    let servers = instances(&redis, 2, "50ms").await;
    let customer = uid("down");
    // Writers on both instances run through the whole outage; every 202 counts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for s in &servers {
        let (c, customer, stop) = (s.client(), customer.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = 0i64;
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                n += 1;
                let q = 1 + n % 3;
                let r = c.events(&Value::Array((0..10).map(|_| event(&customer, "calls", q)).collect())).await;
                assert_eq!(r.status, 202, "ingest must go on while redis is away: {}", r.text);
                acked += 10 * q;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Cached checks go on; strict consumes fail closed (the default).
    let c = check(&servers[0].client(), &customer, "calls", 1).await;
    assert_eq!(c["allowed"], json!(true), "{c}");
    let strict =
        servers[0].client().check(&json!({"customer": customer, "meter": "gpu", "quantity": 1, "consume": true, "id": uid("s")})).await;
    assert_eq!((strict.body["allowed"].clone(), strict.body["reason"].clone()), (json!(false), json!("unavailable")), "{}", strict.text);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = servers[1].client().get("/readyz").await;
        assert_eq!(ready.status, 200, "readiness stays up without redis");
        if ready.body["status"] == json!("degraded") {
            break;
        }
        assert!(Instant::now() < deadline, "readyz never said degraded: {}", ready.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (The gauge is process-wide, shared by the in-process instances of every
    // test running now: only its presence is checked here.)
    let metrics = servers[1].client().get("/metrics").await.text;
    assert!(metrics.contains("meterd_redis_up") && metrics.contains("meterd_redis_pending_units"), "{metrics}");

    // Back, but empty, while the writers go on: the totals are rebuilt from
    // each instance's own usage.
    redis.restart_empty().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut expected = 0;
    for w in writers {
        expected += w.await.expect("writer");
    }
    let used = wait_used(&servers, &customer, "calls", expected, Duration::from_secs(15)).await;
    assert_eq!(used, vec![expected, expected]);
    assert_eq!(redis_total(&redis, &customer, "calls").await, expected);
    assert_eq!(servers[0].client().get("/readyz").await.body["status"], json!("ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_limits_may_fail_open_while_redis_is_down() {
    let mut redis = need!(RedisServer::start(false).await);
    let text = config(&redis.url(), "open", "50ms").replace("entitlements_ttl", "strict_when_unavailable = \"allow\"\nentitlements_ttl");
    let server = TestServer::start(&text).await;
    let customer = uid("open");
    let consume = |id: String| json!({"customer": customer, "meter": "gpu", "quantity": 1, "consume": true, "id": id});
    assert_eq!(server.client().check(&consume(uid("o"))).await.body["allowed"], json!(true));
    redis.stop();
    let r = server.client().check(&consume(uid("o"))).await;
    assert_eq!((r.body["allowed"].clone(), r.body["reason"].clone()), (json!(true), json!("within_limit")), "{}", r.text);
    assert_eq!(check(&server.client(), &customer, "gpu", 0).await["used"], json!(2), "decided and recorded locally");
    // When redis returns (empty), the local usage is pushed.
    redis.restart_empty().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_total(&redis, &customer, "gpu").await != 2 {
        assert!(Instant::now() < deadline, "usage consumed while redis was down never reached it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_an_instance_never_counts_its_usage_twice() {
    let redis = need!(RedisServer::start(false).await);
    let other = TestServer::start(&config(&redis.url(), "other", "50ms")).await;
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let text =
        format!(
            "{}\n",
            config(&redis.url(), "victim", "50ms")
                .replacen("[server]\n", &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"), 1)
                .replacen("[storage]\n", &format!("[storage]\ndata_dir = \"{}\"\n", dir.path().join("data").display()), 1)
        );
    let path = dir.path().join("meterd.toml");
    std::fs::write(&path, text).expect("config");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let customer = uid("kill");
    let mut expected = 0;
    for round in 0..3 {
        let mut proc = spawn(&path, dir.path().join(format!("log{round}")));
        wait_healthy(&mut proc, addr).await;
        let c = common::Client { addr, token: None };
        for _ in 0..10 {
            ingest(&c, Value::Array((0..50).map(|_| event(&customer, "calls", 1)).collect())).await;
            expected += 50;
        }
        // Some rounds die before their usage is synced, some after.
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = proc.child.kill();
        let _ = proc.child.wait();
    }
    let mut proc = spawn(&path, dir.path().join("log-final"));
    wait_healthy(&mut proc, addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_total(&redis, &customer, "calls").await != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis_total(&redis, &customer, "calls").await, expected, "the restarted instance's replay adds nothing twice");
    assert_eq!(wait_used(std::slice::from_ref(&other), &customer, "calls", expected, Duration::from_secs(5)).await, vec![expected]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_master_cluster_shares_entitlements_totals_strict_limits_and_ids() {
    let cluster = need!(common::redis_server::RedisCluster::start().await);
    let urls = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let cfg = |instance: &str| {
        format!(
            "[server]\ninstance_id = \"{instance}\"\n[storage]\ndurability = \"fsync\"\n\
             [redis]\nurls = [{urls}]\nsync_interval = \"50ms\"\ntimeout = \"500ms\"\n{PLANS}"
        )
    };
    let servers = vec![TestServer::start(&cfg("c0")).await, TestServer::start(&cfg("c1")).await];
    // Customers spread over the three masters' slots: two in each third.
    let mut conn = cluster.conn().await;
    let mut per_range: [Vec<String>; 3] = Default::default();
    for i in 0..1000 {
        let c = uid(&format!("cl{i}"));
        let slot: i64 =
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(format!("meterd:{{{c}}}:ent")).query_async(&mut conn).await.expect("keyslot");
        let range = &mut per_range[usize::try_from(slot * 3 / 16384).expect("slot")];
        if range.len() < 2 {
            range.push(c);
        }
        if per_range.iter().all(|r| r.len() == 2) {
            break;
        }
    }
    let customers: Vec<String> = per_range.concat();
    assert_eq!(customers.len(), 6, "customers in every third of the slots");
    for c in &customers {
        assert_eq!(put(&servers[0].client(), c, json!({"plan": "small"})).await.status, 200);
    }
    wait_limit(&servers[1..], &customers[5], 60).await;
    for (i, c) in customers.iter().enumerate() {
        ingest(&servers[i % 2].client(), Value::Array((0..5).map(|_| event(c, "calls", 2)).collect())).await;
        ingest(&servers[(i + 1) % 2].client(), Value::Array((0..5).map(|_| event(c, "calls", 1)).collect())).await;
    }
    for c in &customers {
        assert_eq!(wait_used(&servers, c, "calls", 15, Duration::from_secs(5)).await, vec![15, 15], "{c}");
    }
    // Strict across the cluster: exactly the limit.
    let customer = &customers[0];
    let mut tasks = Vec::new();
    for s in &servers {
        for _ in 0..3 {
            let c = s.client();
            let customer = customer.clone();
            tasks.push(tokio::spawn(async move {
                let mut granted = 0;
                for _ in 0..25 {
                    let r = c.check(&json!({"customer": customer, "meter": "gpu", "quantity": 1, "consume": true, "id": uid("c")})).await;
                    if r.body["allowed"] == json!(true) {
                        granted += 1;
                    }
                }
                granted
            }));
        }
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.expect("consumer");
    }
    assert_eq!(granted, 100);
    // One id, two instances: counted once.
    let e = event(&customers[1], "calls", 5);
    assert_eq!(ingest(&servers[0].client(), e.clone()).await["accepted"], json!(1));
    assert_eq!(ingest(&servers[1].client(), e).await["duplicates"], json!(1));
    assert_eq!(wait_used(&servers, &customers[1], "calls", 20, Duration::from_secs(5)).await, vec![20, 20]);
}

/// Calls of one command recorded by Redis (scripts' inner calls included).
async fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let mut conn = redis.conn().await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_is_loaded_once_for_many_concurrent_misses_and_cached_checks_stay_local() {
    let redis = need!(RedisServer::start(false).await);
    // No sync round during the test: every Redis call counted is a load. The
    // entitlements TTL is long too: past it, a check refreshes the customer in
    // the background (a Redis read), which a loaded machine could reach while the
    // 150 checks below run (seen once in CI-like runs with the 2 s of `config`).
    // And a long Redis timeout: a first load or refresh that outlives 300 ms on a
    // loaded machine still ran in Redis (counted) but is given up and retried by a
    // later check (seen once in a fresh-clone CI run: one load and one refresh more).
    let config = config(&redis.url(), "solo", "60s")
        .replace("entitlements_ttl = \"2s\"", "entitlements_ttl = \"60s\"")
        .replace("timeout = \"300ms\"", "timeout = \"10s\"");
    assert!(config.contains("entitlements_ttl = \"60s\"") && config.contains("timeout = \"10s\""), "{config}");
    let server = TestServer::start(&config).await;
    let customer = uid("miss");
    // An application writes entitlements directly, as the README documents.
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("meterd:{{{customer}}}:ent"))
        .arg("doc")
        .arg(r#"{"plan": "small"}"#)
        .query_async(&mut conn)
        .await
        .expect("hset");
    let _: () = redis::cmd("SADD").arg("meterd:{index}:customers").arg(&customer).query_async(&mut conn).await.expect("sadd");
    let before = command_calls(&redis, "hget").await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = server.client();
        let customer = customer.clone();
        tasks.push(tokio::spawn(async move { check(&c, &customer, "calls", 1).await["limit"].clone() }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("check"), json!(60), "every concurrent first check sees the stored plan");
    }
    assert_eq!(command_calls(&redis, "hget").await - before, 1, "50 concurrent misses, one load");
    // Cached: no Redis command at all for further checks.
    let (hget, hmget) = (command_calls(&redis, "hget").await, command_calls(&redis, "hmget").await);
    for _ in 0..100 {
        assert_eq!(check(&server.client(), &customer, "calls", 1).await["allowed"], json!(true));
    }
    assert_eq!((command_calls(&redis, "hget").await, command_calls(&redis, "hmget").await), (hget, hmget));
    // A direct change announced on the channel is applied.
    let _: () = redis::cmd("HSET")
        .arg(format!("meterd:{{{customer}}}:ent"))
        .arg("doc")
        .arg(r#"{"plan": "base"}"#)
        .query_async(&mut conn)
        .await
        .expect("hset");
    let _: () = redis::cmd("PUBLISH").arg("meterd:entitlements").arg(&customer).query_async(&mut conn).await.expect("publish");
    let deadline = Instant::now() + Duration::from_secs(1);
    while check(&server.client(), &customer, "calls", 0).await["limit"] != json!(1000000) {
        assert!(Instant::now() < deadline, "a published change was not applied within 1 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
