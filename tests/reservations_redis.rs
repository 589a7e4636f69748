//! Reservations (issue 19) across instances sharing a real Redis (a private
//! `redis-server`, as in `tests/redis.rs`): a hold taken on one instance
//! counts on the other (`strict`: at once, in the script; `cached`: once the
//! sync round or the stale refresh read it), is settled there exactly once
//! (store totals exact, a second settle answers the first result) or released
//! there; racing reservations on two instances never hold past a strict hard
//! limit; expiry with two instances running the task releases each hold once.
//! A hold survives its instance's SIGKILL (it lives in Redis): another
//! instance settles it and expires it meanwhile. Records expire (nothing
//! grows forever). On a hard credits balance, holds racing on three instances
//! hold exactly what the balance has (one script on the credit key), also
//! racing consumes, and a settled hold is spent at once everywhere. A
//! customer's reservations are listed on every instance, and their index
//! expires with them. Without `redis-server` skipped with a note, or failed under
//! `METERD_TEST_REQUIRE_SERVICES`.

mod common;

use common::redis_server::RedisServer;
use common::require::need;
use common::{away_from_day_boundary, now_ms, rfc3339, Client, Resp, TestServer, DAY};
use serde_json::{json, Value};
use std::time::Duration;

const PLANS: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"

[[meters]]
name = "gpu"
aggregation = "sum"

[[meters]]
name = "tokens"
aggregation = "sum"

[[meters]]
name = "prepaid"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = { limit = 100, window = "month" }
gpu = { limit = 100, window = "month", enforcement = "strict" }
tokens = { limit = 100, window = "month", enforcement = "leased" }
prepaid = { limit = "credits" }
"#;

/// Sync interval of the instances.
const SYNC: Duration = Duration::from_millis(50);

fn config(urls: &str, instance: &str) -> String {
    format!(
        "[server]\ninstance_id = \"{instance}\"\n[storage]\ndurability = \"fsync\"\nflush_interval = \"200ms\"\n\
         [redis]\nurls = [{urls}]\nsync_interval = \"50ms\"\ntimeout = \"500ms\"\n{PLANS}"
    )
}

async fn two(urls: &str, tag: &str) -> (TestServer, TestServer) {
    (TestServer::start(&config(urls, &format!("{tag}-a"))).await, TestServer::start(&config(urls, &format!("{tag}-b"))).await)
}

async fn reserve(c: &Client, body: Value) -> Resp {
    let r = c.post_json("/v1/reservations", &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r
}

async fn settle(c: &Client, id: &str, body: Value) -> Resp {
    c.post_json(&format!("/v1/reservations/{id}/settle"), &body).await
}

async fn release(c: &Client, id: &str) -> Resp {
    c.post_json(&format!("/v1/reservations/{id}/release"), &json!({})).await
}

async fn check(c: &Client, customer: &str, meter: &str, quantity: i64) -> Value {
    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": quantity})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

async fn consume(c: &Client, customer: &str, meter: &str, quantity: i64, id: &str) -> Value {
    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": quantity, "consume": true, "id": id})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn numbers(v: &Value) -> (Value, Value, Value) {
    (v["used"].clone(), v["held"].clone(), v["remaining"].clone())
}

/// What Redis holds of `meter` for `customer` over all instances.
async fn redis_held(redis: &RedisServer, customer: &str, meter: &str) -> i64 {
    let mut conn = redis.conn().await;
    let t: Option<i64> =
        redis::cmd("HGET").arg(format!("meterd:{{{customer}}}:held:{meter}")).arg("t").query_async(&mut conn).await.expect("hget");
    t.unwrap_or(0)
}

/// The store total of `meter` for `customer` on one instance (its own SQLite).
async fn store_total(s: &TestServer, customer: &str, meter: &str) -> f64 {
    meterd::flush::flush_all(&s.app().engine).await.expect("flush");
    let from = rfc3339((now_ms() - DAY).div_euclid(DAY) * DAY);
    let to = rfc3339((now_ms() + DAY).div_euclid(DAY) * DAY);
    let r = s.client().get(&format!("/v1/usage?meter={meter}&customer={customer}&from={from}&to={to}&granularity=day")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().expect("data").iter().filter_map(|p| p["value"].as_f64()).sum()
}

fn url_list(redis: &RedisServer) -> String {
    format!("\"{}\"", redis.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_hold_counts_at_once_on_the_other_instance_and_is_released_there() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "strict").await;
    let (ca, cb) = (a.client(), b.client());
    let r = reserve(&ca, json!({"id": "s-1", "customer": "s1", "meter": "gpu", "quantity": 90, "expires_in": "1h"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    assert_eq!(numbers(&r.body), (json!(0), json!(90), json!(10)), "{}", r.text);
    // B's strict consume is decided by the script, which reads the held total.
    let denied = consume(&cb, "s1", "gpu", 11, "s1-c1").await;
    assert_eq!(denied["allowed"], false, "{denied}");
    assert_eq!(denied["held"], 90, "{denied}");
    let allowed = consume(&cb, "s1", "gpu", 10, "s1-c2").await;
    assert_eq!(allowed["allowed"], true, "{allowed}");
    assert_eq!(numbers(&allowed), (json!(10), json!(90), json!(0)), "{allowed}");
    // A's own strict consume sees it too.
    assert_eq!(consume(&ca, "s1", "gpu", 1, "s1-c3").await["allowed"], false);
    // Released on B: the quota is free on A at once.
    let rel = release(&cb, "s-1").await;
    assert_eq!(rel.status, 200, "{}", rel.text);
    assert_eq!(rel.body["reservation"]["status"], "released", "{}", rel.text);
    assert_eq!(redis_held(&redis, "s1", "gpu").await, 0);
    let after = consume(&ca, "s1", "gpu", 90, "s1-c4").await;
    assert_eq!(after["allowed"], true, "{after}");
    assert_eq!(numbers(&after), (json!(100), json!(0), json!(0)), "{after}");
    // A release again (on A) answers the reservation as it stands.
    let again = release(&ca, "s-1").await;
    assert_eq!(again.body["reservation"]["status"], "released", "{}", again.text);
    assert_eq!(redis_held(&redis, "s1", "gpu").await, 0);
    // GET on either instance finds it.
    let g = ca.get("/v1/reservations/s-1").await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.body["reservation"]["status"], "released", "{}", g.text);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_hold_counts_on_the_other_instance_within_the_staleness_bound() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "cached").await;
    let (ca, cb) = (a.client(), b.client());
    assert_eq!(numbers(&check(&cb, "c1", "minutes", 20).await), (json!(0), json!(0), json!(100)));
    let r = reserve(&ca, json!({"id": "c-1", "customer": "c1", "meter": "minutes", "quantity": 90, "expires_in": "1h"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    // Totals are never older than two sync intervals when decided on.
    tokio::time::sleep(SYNC * 3).await;
    let seen = check(&cb, "c1", "minutes", 20).await;
    assert_eq!(seen["allowed"], false, "{seen}");
    assert_eq!(numbers(&seen), (json!(0), json!(90), json!(10)), "{seen}");
    let row = cb.get("/v1/customers/c1/usage").await;
    let row = row.body["meters"].as_array().and_then(|m| m.iter().find(|x| x["meter"] == "minutes").cloned()).unwrap_or(Value::Null);
    assert_eq!(numbers(&row), (json!(0), json!(90), json!(10)), "{row}");
    // Released on B: A sees the quota again after the same bound.
    assert_eq!(release(&cb, "c-1").await.body["reservation"]["status"], "released");
    tokio::time::sleep(SYNC * 3).await;
    assert_eq!(numbers(&check(&ca, "c1", "minutes", 20).await), (json!(0), json!(0), json!(100)));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_taken_on_one_instance_is_settled_on_the_other_exactly_once() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "settle").await;
    let (ca, cb) = (a.client(), b.client());
    let r = reserve(&ca, json!({"id": "iv-9", "customer": "x1", "meter": "minutes", "quantity": 90, "expires_in": "2h"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    let done = settle(&cb, "iv-9", json!({"quantity": 60})).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.body["reservation"]["status"], "settled", "{}", done.text);
    assert_eq!(done.body["reservation"]["settled_quantity"], 60, "{}", done.text);
    // A second settle, on A and with another quantity, answers the first result.
    let again = settle(&ca, "iv-9", json!({"quantity": 70})).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["reservation"]["settled_quantity"], 60, "{}", again.text);
    let third = settle(&cb, "iv-9", json!({})).await;
    assert_eq!(third.body["reservation"]["settled_quantity"], 60, "{}", third.text);
    assert_eq!(redis_held(&redis, "x1", "minutes").await, 0);
    // The usage is recorded once: B's store has it, A's has nothing.
    assert_eq!(store_total(&b, "x1", "minutes").await, 60.0);
    assert_eq!(store_total(&a, "x1", "minutes").await, 0.0);
    // And both instances count it once after a sync.
    tokio::time::sleep(SYNC * 3).await;
    for c in [&ca, &cb] {
        assert_eq!(numbers(&check(c, "x1", "minutes", 1).await), (json!(60), json!(0), json!(40)));
    }
    // A released reservation cannot be settled anywhere.
    reserve(&cb, json!({"id": "iv-10", "customer": "x1", "meter": "minutes", "quantity": 5, "expires_in": "2h"})).await;
    assert_eq!(release(&ca, "iv-10").await.status, 200);
    assert_eq!(settle(&cb, "iv-10", json!({"quantity": 5})).await.status, 409);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_on_the_other_instance_holds_nothing_more() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "idem").await;
    let (ca, cb) = (a.client(), b.client());
    let body = json!({"id": "dup-1", "customer": "d1", "meter": "gpu", "quantity": 30, "expires_in": "1h"});
    assert_eq!(reserve(&ca, body.clone()).await.body["reservation"]["status"], "held");
    let r = reserve(&cb, body.clone()).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    assert_eq!(redis_held(&redis, "d1", "gpu").await, 30);
    let other = cb.post_json("/v1/reservations", &json!({"id": "dup-1", "customer": "d2", "meter": "gpu", "quantity": 30})).await;
    assert_eq!(other.status, 409, "{}", other.text);
    let other = cb.post_json("/v1/reservations", &json!({"id": "dup-1", "customer": "d1", "meter": "gpu", "quantity": 31})).await;
    assert_eq!(other.status, 409, "{}", other.text);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reservations_on_two_instances_never_over_hold_a_strict_limit() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "race").await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for (n, c) in [a.client(), b.client()].into_iter().cycle().take(16).enumerate() {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut held = 0;
            for k in 0..5 {
                let body = json!({"id": format!("r-{n}-{k}"), "customer": "r1", "meter": "gpu", "quantity": 3});
                let r = c.post_json("/v1/reservations", &body).await;
                assert_eq!(r.status, 200, "{}", r.text);
                if r.body["reservation"]["status"] == "held" {
                    held += 1;
                }
            }
            held
        }));
    }
    let mut held = 0;
    for t in tasks {
        held += t.await.expect("task");
    }
    // 80 asked for 3 each against 100: exactly 33 fit.
    assert_eq!(held, 33);
    assert_eq!(redis_held(&redis, "r1", "gpu").await, 99);
    let c = consume(&a.client(), "r1", "gpu", 2, "r1-c").await;
    assert_eq!(c["allowed"], false, "{c}");
    assert_eq!(consume(&b.client(), "r1", "gpu", 1, "r1-d").await["allowed"], true);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reservations_and_leased_consumes_never_pass_the_limit() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "lease").await;
    // No slice is granted while the new server is up less than two lease ttls.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for (n, c) in [a.client(), b.client()].into_iter().cycle().take(8).enumerate() {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let (mut held, mut used) = (0, 0);
            for k in 0..30 {
                if (n + k) % 3 == 0 {
                    let body = json!({"id": format!("l-{n}-{k}"), "customer": "l1", "meter": "tokens", "quantity": 4});
                    let r = c.post_json("/v1/reservations", &body).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["reservation"]["status"] == "held" {
                        held += 4;
                    }
                } else {
                    let r = c
                        .check(&json!({"customer": "l1", "meter": "tokens", "quantity": 1, "consume": true, "id": format!("lc-{n}-{k}")}))
                        .await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["allowed"] == true {
                        used += 1;
                    }
                }
            }
            (held, used)
        }));
    }
    let (mut held, mut used) = (0, 0);
    for t in tasks {
        let (h, u) = t.await.expect("task");
        held += h;
        used += u;
    }
    assert!(held > 0 && used > 0, "held {held}, used {used}");
    assert!(held + used <= 100, "held {held} + used {used} passed the limit of 100");
    assert_eq!(redis_held(&redis, "l1", "tokens").await, held);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_with_two_instances_releases_each_hold_once() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "expiry").await;
    let (ca, cb) = (a.client(), b.client());
    // An allocation stays; twenty short holds, taken on both, expire.
    reserve(&ca, json!({"id": "seat-1", "customer": "e1", "meter": "gpu", "quantity": 5})).await;
    for k in 0..20 {
        let c = if k % 2 == 0 { &ca } else { &cb };
        let r = reserve(c, json!({"id": format!("e-{k}"), "customer": "e1", "meter": "gpu", "quantity": 4, "expires_in": "1s"})).await;
        assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    }
    assert_eq!(redis_held(&redis, "e1", "gpu").await, 85);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Released once each: a second release of any would take the total below 5.
    assert_eq!(redis_held(&redis, "e1", "gpu").await, 5);
    for k in 0..20 {
        let c = if k % 2 == 0 { &cb } else { &ca };
        let g = c.get(&format!("/v1/reservations/e-{k}")).await;
        assert_eq!(g.body["reservation"]["status"], "expired", "{}", g.text);
    }
    assert_eq!(cb.get("/v1/reservations/seat-1").await.body["reservation"]["status"], "held");
    let c = consume(&cb, "e1", "gpu", 95, "e1-c").await;
    assert_eq!(c["allowed"], true, "{c}");
    assert_eq!(numbers(&c), (json!(95), json!(5), json!(0)), "{c}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_work_across_instances_on_a_redis_cluster() {
    let cluster = need!(common::redis_server::RedisCluster::start().await);
    away_from_day_boundary().await;
    let urls = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
    let (a, b) = two(&urls, "cluster").await;
    let (ca, cb) = (a.client(), b.client());
    let r = reserve(&ca, json!({"id": "k-1", "customer": "k1", "meter": "gpu", "quantity": 90, "expires_in": "1s"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    assert_eq!(consume(&cb, "k1", "gpu", 11, "k1-c1").await["allowed"], false);
    let done = settle(&cb, "k-1", json!({"quantity": 50})).await;
    assert_eq!(done.body["reservation"]["settled_quantity"], 50, "{}", done.text);
    assert_eq!(settle(&ca, "k-1", json!({"quantity": 1})).await.body["reservation"]["settled_quantity"], 50);
    let c = consume(&ca, "k1", "gpu", 50, "k1-c2").await;
    assert_eq!(numbers(&c), (json!(100), json!(0), json!(0)), "{c}");
    reserve(&cb, json!({"id": "k-2", "customer": "k1", "meter": "minutes", "quantity": 7, "expires_in": "1s"})).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(ca.get("/v1/reservations/k-2").await.body["reservation"]["status"], "expired");
    // Listing reads the customer's slot on a cluster too.
    assert_eq!(ids(&list(&ca, "customer=k1").await), ["k-2", "k-1"]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_settles_on_two_instances_record_once_and_answer_alike() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "settlerace").await;
    let (ca, cb) = (a.client(), b.client());
    for k in 0..10 {
        let id = format!("sr-{k}");
        reserve(&ca, json!({"id": id, "customer": "sr", "meter": "minutes", "quantity": 9, "expires_in": "1h"})).await;
        let (ra, rb) = tokio::join!(settle(&ca, &id, json!({"quantity": 4})), settle(&cb, &id, json!({"quantity": 5})));
        assert!(ra.status == 200 && rb.status == 200, "{} / {}", ra.text, rb.text);
        let (qa, qb) = (&ra.body["reservation"]["settled_quantity"], &rb.body["reservation"]["settled_quantity"]);
        assert_eq!(qa, qb, "both settles answer the first result");
        assert!(qa == &json!(4) || qa == &json!(5), "{qa}");
    }
    // Each usage recorded once, on one of the two: the stores together hold
    // exactly the settled quantities.
    let mut expected = 0.0;
    for k in 0..10 {
        let g = ca.get(&format!("/v1/reservations/sr-{k}")).await;
        expected += g.body["reservation"]["settled_quantity"].as_f64().expect("settled");
    }
    let total = store_total(&a, "sr", "minutes").await + store_total(&b, "sr", "minutes").await;
    assert_eq!(total, expected);
    assert_eq!(redis_held(&redis, "sr", "minutes").await, 0);
    // Nothing grows forever: the finished records, their owners and the
    // emptied held total all expire.
    let mut conn = redis.conn().await;
    for key in ["meterd:{sr}:r:sr-0", "meterd:res:sr-0", "meterd:{sr}:held:minutes"] {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await.expect("pttl");
        assert!(ttl > 0 && ttl <= 86_400_000, "{key} expires: {ttl}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_survives_its_instance_sigkill_and_is_settled_and_expired_elsewhere() {
    use common::ports::free_port;
    use common::process::{spawn, wait_healthy};
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ninstance_id = \"kill-a\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\n\
         flush_interval = \"150ms\"\n[redis]\nurl = \"{}\"\nsync_interval = \"50ms\"\ntimeout = \"500ms\"\n{PLANS}",
        dir.path().join("data").display().to_string(),
        redis.url()
    );
    std::fs::write(&path, text).expect("write config");
    let ca = Client { addr, token: None };
    let mut p = spawn(&path, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    let b = TestServer::start(&config(&url_list(&redis), "kill-b")).await;
    let cb = b.client();
    for body in [
        json!({"id": "k-iv", "customer": "kk", "meter": "gpu", "quantity": 90, "expires_in": "1h"}),
        json!({"id": "k-short", "customer": "kk", "meter": "minutes", "quantity": 30, "expires_in": "1s"}),
    ] {
        let r = reserve(&ca, body).await;
        assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    }
    p.child.kill().expect("SIGKILL");
    p.wait_exit(Duration::from_secs(10)).await;
    // The hold still counts: B's strict consume cannot take it.
    assert_eq!(consume(&cb, "kk", "gpu", 11, "kk-c1").await["allowed"], false);
    // B settles A's hold, and its own expiry task releases A's short one.
    let done = settle(&cb, "k-iv", json!({"quantity": 60})).await;
    assert_eq!(done.body["reservation"]["settled_quantity"], 60, "{}", done.text);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cb.get("/v1/reservations/k-short").await.body["reservation"]["status"], "expired");
    assert_eq!(redis_held(&redis, "kk", "minutes").await, 0);
    assert_eq!(redis_held(&redis, "kk", "gpu").await, 0);
    let c = consume(&cb, "kk", "gpu", 40, "kk-c2").await;
    assert_eq!(numbers(&c), (json!(100), json!(0), json!(0)), "{c}");
    // A again: the settle answers the first result; the usage is B's, once.
    let mut p = spawn(&path, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    let again = settle(&ca, "k-iv", json!({"quantity": 70})).await;
    assert_eq!(again.body["reservation"]["settled_quantity"], 60, "{}", again.text);
    assert_eq!(store_total(&b, "kk", "gpu").await, 100.0);
    p.sigterm();
    p.wait_exit(Duration::from_secs(20)).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_on_a_credit_balance_is_not_spendable_on_the_other_instance() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "credits").await;
    let (ca, cb) = (a.client(), b.client());
    let r = ca.post_json("/v1/customers/cr/grants", &json!({"id": "topup", "meter": "prepaid", "amount": 100})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = cb.get("/v1/customers/cr/balances").await;
        let granted = r.body["balances"].as_array().and_then(|b| b.iter().find(|x| x["meter"] == "prepaid").map(|x| x["granted"].clone()));
        if granted == Some(json!(100)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "B never saw the grant: {}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = reserve(&ca, json!({"id": "cr-1", "customer": "cr", "meter": "prepaid", "quantity": 90, "expires_in": "1h"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    // B's hard credits consume is taken in Redis, which reads the held total.
    let c = consume(&cb, "cr", "prepaid", 20, "cr-c1").await;
    assert_eq!(c["allowed"], false, "{c}");
    assert_eq!(consume(&cb, "cr", "prepaid", 10, "cr-c2").await["allowed"], true);
    a.stop().await;
    b.stop().await;
}

/// Found by schemathesis: a quantity beyond what Redis scripts count exactly
/// (2^53 raw units) is bad input, a 400 naming `quantity` that changes nothing,
/// not a 503 from the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantity_beyond_two_to_the_53_is_refused_and_changes_nothing() {
    let redis = need!(RedisServer::start(false).await);
    let a = TestServer::start(&config(&url_list(&redis), "big-a")).await;
    let c = a.client();
    let huge = json!(6.743798490739995e16);
    let r = c.post_json("/v1/reservations", &json!({"id": "big-0", "customer": "big", "meter": "minutes", "quantity": huge})).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{}", r.text);
    assert!(r.text.contains("quantity") && r.text.contains("2^53"), "{}", r.text);
    let held = reserve(&c, json!({"id": "big-1", "customer": "big", "meter": "minutes", "quantity": 10, "expires_in": "1h"})).await;
    assert_eq!(held.body["reservation"]["status"], "held", "{}", held.text);
    let r = settle(&c, "big-1", json!({"quantity": huge})).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{}", r.text);
    assert!(r.text.contains("quantity"), "{}", r.text);
    let r = c.get("/v1/reservations/big-1").await;
    assert_eq!(r.body["reservation"]["status"], "held", "nothing changed: {}", r.text);
    assert_eq!(redis_held(&redis, "big", "minutes").await, 10);
    let r = settle(&c, "big-1", json!({"quantity": 4})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    a.stop().await;
}

/// Three instances; `customer` granted `amount` credits of `prepaid` on the
/// first, seen by all three.
async fn three_with_credits(urls: &str, tag: &str, customer: &str, amount: i64) -> [TestServer; 3] {
    let servers = [
        TestServer::start(&config(urls, &format!("{tag}-a"))).await,
        TestServer::start(&config(urls, &format!("{tag}-b"))).await,
        TestServer::start(&config(urls, &format!("{tag}-c"))).await,
    ];
    let body = json!({"id": "topup", "meter": "prepaid", "amount": amount});
    let r = servers[0].client().post_json(&format!("/v1/customers/{customer}/grants"), &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    for s in &servers {
        wait_balance(s, customer, "granted", amount).await;
    }
    servers
}

/// Waits until `field` of the customer's `prepaid` balance on `s` is `want`.
async fn wait_balance(s: &TestServer, customer: &str, field: &str, want: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.client().get(&format!("/v1/customers/{customer}/balances")).await;
        let b = r.body["balances"].as_array().and_then(|b| b.iter().find(|x| x["meter"] == "prepaid").cloned()).unwrap_or_default();
        if b[field] == json!(want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{field} never reached {want}: {}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What every instance used of `customer`'s `prepaid` credits, in Redis.
async fn redis_credits_used(redis: &RedisServer, customer: &str) -> i64 {
    let mut conn = redis.conn().await;
    let t: Option<i64> =
        redis::cmd("HGET").arg(format!("meterd:{{{customer}}}:credits:prepaid")).arg("t").query_async(&mut conn).await.expect("hget");
    t.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_credit_reservations_on_three_instances_hold_exactly_the_balance() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let servers = three_with_credits(&url_list(&redis), "crrace", "rc", 1000).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(12));
    let mut tasks = Vec::new();
    for (n, s) in servers.iter().enumerate() {
        for t in 0..4 {
            let (c, start) = (s.client(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let mut held = Vec::new();
                for k in 0..4 {
                    let id = format!("rc-{n}-{t}-{k}");
                    let body = json!({"id": id, "customer": "rc", "meter": "prepaid", "quantity": 30, "expires_in": "1h"});
                    let r = c.post_json("/v1/reservations", &body).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    match r.body["reservation"]["status"].as_str() {
                        Some("held") => {
                            assert!(r.body["remaining"].as_i64().unwrap_or(-1) >= 0, "{}", r.text);
                            held.push((n, id));
                        }
                        _ => assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text),
                    }
                }
                held
            }));
        }
    }
    let mut held = Vec::new();
    for t in tasks {
        held.extend(t.await.expect("task"));
    }
    // 48 asked for 30 each of 1000 credits: exactly 33 fit, on whichever instance.
    assert_eq!(held.len(), 33, "{held:?}");
    assert_eq!(redis_held(&redis, "rc", "prepaid").await, 990);
    assert_eq!(redis_credits_used(&redis, "rc").await, 0, "holds are not usage");
    // 10 left: 20 is refused on every instance, 10 allowed once, then nothing.
    let clients: Vec<Client> = servers.iter().map(TestServer::client).collect();
    for (n, c) in clients.iter().enumerate() {
        let r = consume(c, "rc", "prepaid", 20, &format!("rc-c20-{n}")).await;
        assert_eq!(r["allowed"], false, "{r}");
        assert_eq!(r["reason"], "insufficient_credits", "{r}");
    }
    let r = consume(&clients[1], "rc", "prepaid", 10, "rc-c10").await;
    assert_eq!(r["allowed"], true, "{r}");
    for (n, c) in clients.iter().enumerate() {
        assert_eq!(consume(c, "rc", "prepaid", 1, &format!("rc-c1-{n}")).await["allowed"], false);
    }
    assert_eq!(redis_credits_used(&redis, "rc").await, 10);
    // A hold taken on one instance, released on the next: 30 free everywhere
    // (the release counts at once in Redis; local views within two syncs).
    let (n, id) = held.first().cloned().expect("a hold");
    let rel = release(&clients[(n + 1) % 3], &id).await;
    assert_eq!(rel.body["reservation"]["status"], "released", "{}", rel.text);
    assert_eq!(redis_held(&redis, "rc", "prepaid").await, 960);
    tokio::time::sleep(SYNC * 3).await;
    for c in &clients {
        let seen = check(c, "rc", "prepaid", 30).await;
        assert_eq!(seen["allowed"], true, "{seen}");
        assert_eq!(seen["held"], 960, "{seen}");
    }
    let r = consume(&clients[(n + 2) % 3], "rc", "prepaid", 30, "rc-c30").await;
    assert_eq!(r["allowed"], true, "{r}");
    for (k, c) in clients.iter().enumerate() {
        assert_eq!(consume(c, "rc", "prepaid", 1, &format!("rc-c1b-{k}")).await["allowed"], false);
    }
    for s in servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_credit_reservations_and_consumes_never_pass_the_balance() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let servers = three_with_credits(&url_list(&redis), "crmix", "mx", 1000).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(12));
    let mut tasks = Vec::new();
    for (n, s) in servers.iter().enumerate() {
        for t in 0..4 {
            let (c, start) = (s.client(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let (mut held, mut used) = (0i64, 0i64);
                for k in 0..8 {
                    if (n + t + k) % 2 == 0 {
                        let id = format!("mx-{n}-{t}-{k}");
                        let body = json!({"id": id, "customer": "mx", "meter": "prepaid", "quantity": 30, "expires_in": "1h"});
                        let r = c.post_json("/v1/reservations", &body).await;
                        assert_eq!(r.status, 200, "{}", r.text);
                        if r.body["reservation"]["status"] == "held" {
                            held += 30;
                        }
                    } else {
                        let id = format!("mxc-{n}-{t}-{k}");
                        let r = c.check(&json!({"customer": "mx", "meter": "prepaid", "quantity": 20, "consume": true, "id": id})).await;
                        assert_eq!(r.status, 200, "{}", r.text);
                        if r.body["allowed"] == true {
                            used += 20;
                        } else {
                            assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text);
                        }
                    }
                }
                (held, used)
            }));
        }
    }
    let (mut held, mut used) = (0, 0);
    for t in tasks {
        let (h, u) = t.await.expect("task");
        held += h;
        used += u;
    }
    // 48 holds of 30 and 48 consumes of 20 asked: the balance runs out, and
    // what was held and used together never passes it.
    assert!(held > 0 && used > 0, "held {held}, used {used}");
    assert!(held + used <= 1000, "held {held} + used {used} passed the balance of 1000");
    assert!(held + used > 1000 - 30, "held {held} + used {used}: the balance was not used up");
    assert_eq!(redis_held(&redis, "mx", "prepaid").await, held);
    assert_eq!(redis_credits_used(&redis, "mx").await, used);
    for s in &servers {
        wait_balance(s, "mx", "balance", 1000 - used).await;
        let seen = check(&s.client(), "mx", "prepaid", 1).await;
        assert!(seen["remaining"].as_i64().unwrap_or(-1) >= 0, "{seen}");
    }
    for s in servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_credit_hold_is_spent_at_once_on_every_instance() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let servers = three_with_credits(&url_list(&redis), "crsettle", "cs", 100).await;
    let (ca, cb) = (servers[0].client(), servers[1].client());
    for k in 0..5 {
        // 10 held on A, settled on B: C cannot spend it, even before a sync.
        let id = format!("cs-{k}");
        let r = reserve(&ca, json!({"id": id, "customer": "cs", "meter": "prepaid", "quantity": 10, "expires_in": "1h"})).await;
        assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
        let done = settle(&cb, &id, json!({"quantity": 10})).await;
        assert_eq!(done.status, 200, "{}", done.text);
        // The settled usage is in Redis before any sync: no instance can spend it.
        assert_eq!(redis_credits_used(&redis, "cs").await, 10 * (k + 1));
        assert_eq!(redis_held(&redis, "cs", "prepaid").await, 0);
        let c = consume(&servers[2].client(), "cs", "prepaid", 100 - 10 * k, &format!("cs-c-{k}")).await;
        assert_eq!(c["allowed"], false, "{c}");
    }
    assert_eq!(consume(&ca, "cs", "prepaid", 50, "cs-last").await["allowed"], true);
    assert_eq!(redis_credits_used(&redis, "cs").await, 100);
    // Every instance converges on the exact balance: nothing counted twice.
    for s in &servers {
        wait_balance(s, "cs", "balance", 0).await;
    }
    for s in servers {
        s.stop().await;
    }
}

/// Instances whose background rounds (credits sync, counter sync, stale
/// refresh) do not run during a test: the test drives each sync itself.
fn config_quiet(urls: &str, instance: &str) -> String {
    config(urls, instance).replace("sync_interval = \"50ms\"", "sync_interval = \"1h\"")
}

/// One credits sync round of `s` (`grants::refresh` runs it every interval).
async fn credits_sync(s: &TestServer) {
    let engine = &s.app().engine;
    meterd::grants::sync_credits(engine, engine.redis().expect("redis")).await;
}

/// A settle on B moves the hold's units from the held total to the credit
/// usage in one script. A credits sync on A that learns the usage must not
/// leave A counting the same units as still held too (it once did: A's held
/// total was the one its reserve answered, its usage the sync's, and A denied
/// locally what the balance covers). Driven step by step: no timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credits_sync_after_a_settle_elsewhere_does_not_count_the_hold_twice() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let urls = url_list(&redis);
    let (a, b) = (TestServer::start(&config_quiet(&urls, "twice-a")).await, TestServer::start(&config_quiet(&urls, "twice-b")).await);
    let (ca, cb) = (a.client(), b.client());
    let r = ca.post_json("/v1/customers/tw/grants", &json!({"id": "topup", "meter": "prepaid", "amount": 100})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = reserve(&ca, json!({"id": "tw-1", "customer": "tw", "meter": "prepaid", "quantity": 10, "expires_in": "1h"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    let done = settle(&cb, "tw-1", json!({"quantity": 10})).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!((redis_credits_used(&redis, "tw").await, redis_held(&redis, "tw", "prepaid").await), (10, 0));
    // A learns B's usage; the hold it counted is the same 10 credits.
    credits_sync(&a).await;
    wait_balance(&a, "tw", "balance", 90).await;
    let c = check(&ca, "tw", "prepaid", 90).await;
    assert_eq!((c["allowed"].clone(), c["held"].clone(), c["remaining"].clone()), (json!(true), json!(0), json!(90)), "{c}");
    let c = consume(&ca, "tw", "prepaid", 90, "tw-c").await;
    assert_eq!(c["allowed"], true, "{c}");
    assert_eq!(redis_credits_used(&redis, "tw").await, 100);
    // Nothing is left: one more credit is refused.
    assert_eq!(consume(&ca, "tw", "prepaid", 1, "tw-c2").await["allowed"], false);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_hold_counts_usage_on_other_instances_not_yet_synced() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let servers = three_with_credits(&url_list(&redis), "crstale", "st", 1000).await;
    let (ca, cc) = (servers[0].client(), servers[2].client());
    for k in 0..5i64 {
        // C spends 100; A, right after (before its sync learns it), asks for
        // one more than is left: the script sees C's usage and refuses.
        assert_eq!(consume(&cc, "st", "prepaid", 100, &format!("st-c-{k}")).await["allowed"], true);
        let left = 1000 - 100 * (k + 1);
        let body = json!({"id": format!("st-{k}"), "customer": "st", "meter": "prepaid", "quantity": left + 1, "expires_in": "1h"});
        let r = reserve(&ca, body).await;
        assert_eq!(r.body["reservation"]["status"], "denied", "{}", r.text);
        assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text);
        assert_eq!(redis_held(&redis, "st", "prepaid").await, 0);
    }
    // Exactly what is left can be held, and then nothing is spendable anywhere.
    let r = reserve(&ca, json!({"id": "st-all", "customer": "st", "meter": "prepaid", "quantity": 500, "expires_in": "1h"})).await;
    assert_eq!(r.body["reservation"]["status"], "held", "{}", r.text);
    assert_eq!(r.body["remaining"], 0, "{}", r.text);
    for (n, s) in servers.iter().enumerate() {
        assert_eq!(consume(&s.client(), "st", "prepaid", 1, &format!("st-last-{n}")).await["allowed"], false);
    }
    for s in servers {
        s.stop().await;
    }
}

/// The ids of a listing, in order.
fn ids(r: &Resp) -> Vec<String> {
    r.body["reservations"].as_array().map(|a| a.iter().filter_map(|x| x["id"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

async fn list(c: &Client, query: &str) -> Resp {
    let r = c.get(&format!("/v1/reservations?{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.text);
    r
}

/// The milliseconds `key` has to live (-1: no expiry, -2: none).
async fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let mut conn = redis.conn().await;
    redis::cmd("PTTL").arg(key).query_async(&mut conn).await.expect("pttl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_taken_on_one_instance_are_listed_on_the_other_and_their_index_expires() {
    let redis = need!(RedisServer::start(false).await);
    away_from_day_boundary().await;
    let (a, b) = two(&url_list(&redis), "list").await;
    let (ca, cb) = (a.client(), b.client());
    let pause = || tokio::time::sleep(Duration::from_millis(5));
    reserve(&ca, json!({"id": "ls-1", "customer": "ls", "meter": "minutes", "quantity": 10, "expires_in": "1h"})).await;
    pause().await;
    reserve(&cb, json!({"id": "ls-2", "customer": "ls", "meter": "gpu", "quantity": 5})).await;
    pause().await;
    let denied = reserve(&ca, json!({"id": "ls-3", "customer": "ls", "meter": "gpu", "quantity": 500, "expires_in": "1h"})).await;
    assert_eq!(denied.body["reservation"]["status"], "denied", "{}", denied.text);
    reserve(&ca, json!({"id": "ls-x", "customer": "ls-other", "meter": "gpu", "quantity": 1})).await;
    assert_eq!(release(&cb, "ls-1").await.status, 200);

    for c in [&ca, &cb] {
        let all = list(c, "customer=ls").await;
        assert_eq!(ids(&all), ["ls-3", "ls-2", "ls-1"], "newest first, on either instance: {}", all.text);
        for item in all.body["reservations"].as_array().into_iter().flatten() {
            let one = c.get(&format!("/v1/reservations/{}", item["id"].as_str().unwrap_or(""))).await;
            assert_eq!(&one.body["reservation"], item, "{}", all.text);
        }
        assert_eq!(ids(&list(c, "customer=ls&status=held").await), ["ls-2"]);
        assert_eq!(ids(&list(c, "customer=ls&meter=gpu").await), ["ls-3", "ls-2"]);
        assert_eq!(ids(&list(c, "customer=ls&limit=1").await), ["ls-3"]);
    }
    let bad = cb.get("/v1/reservations?customer=ls&limit=0").await;
    assert_eq!(bad.status, 400, "{}", bad.text);

    // A held allocation keeps the index; once nothing is held it expires with
    // the last record (a day after it finished, plus a minute's grace).
    let (created, end) = ("meterd:{ls}:rl:created", "meterd:{ls}:rl:end");
    assert_eq!((pttl(&redis, created).await, pttl(&redis, end).await), (-1, -1), "an allocation is held");
    assert_eq!(release(&ca, "ls-2").await.status, 200);
    for key in [created, end] {
        let ttl = pttl(&redis, key).await;
        assert!(ttl > DAY - 60_000 && ttl <= DAY + 60_000, "{key} expires with its records: {ttl}");
    }
    // Members past their end are dropped by the next tracking (a reserve or a
    // finish); a member whose record is gone is skipped and dropped by a listing.
    let mut conn = redis.conn().await;
    let _: i64 = redis::cmd("ZADD").arg(created).arg(1).arg("ghost").query_async(&mut conn).await.expect("zadd");
    let _: i64 = redis::cmd("ZADD").arg(end).arg(1).arg("ghost").query_async(&mut conn).await.expect("zadd");
    reserve(&cb, json!({"id": "ls-4", "customer": "ls", "meter": "minutes", "quantity": 1, "expires_in": "1h"})).await;
    for key in [created, end] {
        let score: Option<f64> = redis::cmd("ZSCORE").arg(key).arg("ghost").query_async(&mut conn).await.expect("zscore");
        assert_eq!(score, None, "{key}: pruned by the reserve");
    }
    let _: i64 = redis::cmd("DEL").arg("meterd:{ls}:r:ls-1").query_async(&mut conn).await.expect("del");
    assert_eq!(ids(&list(&ca, "customer=ls").await), ["ls-4", "ls-3", "ls-2"], "a record gone is not listed");
    for key in [created, end] {
        let score: Option<f64> = redis::cmd("ZSCORE").arg(key).arg("ls-1").query_async(&mut conn).await.expect("zscore");
        assert_eq!(score, None, "{key}: dropped by the listing");
    }
    assert_eq!(ids(&list(&ca, "customer=ls&status=held").await), ["ls-4"]);
    a.stop().await;
    b.stop().await;
}
