//! Prepaid credits across instances (issue 18): three instances on one
//! `redis-server` racing consumes on one balance take exactly what it holds and
//! never overdraw it; grants live in Redis (idempotent across instances, kept
//! over a restart) and every instance converges on the same balance.

mod common;

use common::redis_server::RedisServer;
use common::require::need;
use common::{uid, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PLANS: &str = r#"
[[meters]]
name = "ai_tokens"
aggregation = "sum"

[[meters]]
name = "gpu"
aggregation = "sum"

[[meters]]
name = "lz"
aggregation = "sum"

[[plans]]
name = "credits"
default = true
[plans.limits]
ai_tokens = { limit = "credits" }
gpu = [ { limit = "credits" }, { limit = 100000, window = "month", enforcement = "strict" } ]
lz = [ { limit = "credits" }, { limit = 100000, window = "month", enforcement = "leased" } ]
"#;

fn config(redis_url: &str, instance: &str) -> String {
    format!(
        "[server]\ninstance_id = \"{instance}\"\n[storage]\ndurability = \"fsync\"\nflush_interval = \"200ms\"\n\
         [redis]\nurl = \"{redis_url}\"\nsync_interval = \"100ms\"\ntimeout = \"500ms\"\nentitlements_ttl = \"2s\"\n{PLANS}"
    )
}

async fn balance(s: &TestServer, customer: &str) -> Value {
    balance_of(s, customer, "ai_tokens").await
}

async fn balance_of(s: &TestServer, customer: &str, meter: &str) -> Value {
    let r = s.client().get(&format!("/v1/customers/{customer}/balances")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["balances"].as_array().and_then(|b| b.iter().find(|x| x["meter"] == meter).cloned()).unwrap_or_default()
}

async fn wait_for(s: &TestServer, customer: &str, field: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = balance(s, customer).await;
        if b[field] == json!(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{field} never reached {want}: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_racing_on_one_balance_never_overdraw_it() {
    let redis = need!(RedisServer::start(false).await);
    let servers = [
        TestServer::start(&config(&redis.url(), "cr-a")).await,
        TestServer::start(&config(&redis.url(), "cr-b")).await,
        TestServer::start(&config(&redis.url(), "cr-c")).await,
    ];
    let customer = uid("cr");
    let body = json!({"id": "topup", "meter": "ai_tokens", "amount": 1000});
    let r = servers[0].client().post_json(&format!("/v1/customers/{customer}/grants"), &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // The same grant on another instance is the same grant.
    let again = servers[1].client().post_json(&format!("/v1/customers/{customer}/grants"), &body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    for s in &servers {
        wait_for(s, &customer, "granted", 1000).await;
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(12));
    let mut handles = Vec::new();
    for (n, s) in servers.iter().enumerate() {
        for t in 0..4 {
            let (c, customer, start) = (s.client(), customer.clone(), start.clone());
            handles.push(tokio::spawn(async move {
                start.wait().await;
                let mut allowed = 0;
                for i in 0..8 {
                    let id = format!("c-{n}-{t}-{i}");
                    let r = c.check(&json!({"customer": customer, "meter": "ai_tokens", "quantity": 30, "consume": true, "id": id})).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["allowed"] == true {
                        allowed += 1;
                        assert!(r.body["remaining"].as_i64().unwrap_or(-1) >= 0, "{}", r.text);
                    } else {
                        assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text);
                    }
                }
                allowed
            }));
        }
    }
    let mut allowed = 0;
    for h in handles {
        allowed += h.await.expect("consumer");
    }
    assert_eq!(allowed, 33, "1000 credits buy exactly 33 consumes of 30, across three instances");
    let mut conn = redis.conn().await;
    let t: Option<i64> =
        redis::cmd("HGET").arg(format!("meterd:{{{customer}}}:credits:ai_tokens")).arg("t").query_async(&mut conn).await.expect("hget");
    assert_eq!(t, Some(990));
    for s in &servers {
        wait_for(s, &customer, "balance", 10).await;
    }
    // Grants live in Redis: a restarted instance has them, and the balance.
    let [a, b, c] = servers;
    let a = a.restart().await;
    wait_for(&a, &customer, "balance", 10).await;
    let grants = a.client().get(&format!("/v1/customers/{customer}/grants")).await;
    assert_eq!(grants.body["grants"][0]["id"], "topup", "{}", grants.text);
    for s in [a, b, c] {
        s.stop().await;
    }
}

/// `per` consumers on each server, 8 consumes of 30 each on `meter`; the
/// number allowed.
async fn race(servers: &[&TestServer], customer: &str, meter: &str, per: usize) -> usize {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(servers.len() * per));
    let mut handles = Vec::new();
    for (n, s) in servers.iter().enumerate() {
        for t in 0..per {
            let (c, customer, meter, start) = (s.client(), customer.to_string(), meter.to_string(), start.clone());
            handles.push(tokio::spawn(async move {
                start.wait().await;
                let mut allowed = 0;
                for i in 0..8 {
                    let id = format!("{meter}-{n}-{t}-{i}");
                    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": 30, "consume": true, "id": id})).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["allowed"] == true {
                        allowed += 1;
                    } else {
                        assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text);
                    }
                }
                allowed
            }));
        }
    }
    let mut allowed = 0;
    for h in handles {
        allowed += h.await.expect("consumer");
    }
    allowed
}

/// Waits until `field` of `meter`'s balance on every server is `want`.
async fn wait_balances(servers: &[&TestServer], customer: &str, meter: &str, field: &str, want: i64) {
    for s in servers {
        let deadline = Instant::now() + Duration::from_secs(10);
        while balance_of(s, customer, meter).await[field] != json!(want) {
            assert!(Instant::now() < deadline, "{field} of {meter} never reached {want} on an instance");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Two instances and a customer granted `amount` of `meter`, seen by both.
async fn two_granted(redis: &RedisServer, tag: &str, meter: &str, amount: i64) -> (TestServer, TestServer, String) {
    let a = TestServer::start(&config(&redis.url(), &format!("{tag}-a"))).await;
    let b = TestServer::start(&config(&redis.url(), &format!("{tag}-b"))).await;
    let customer = uid(tag);
    let body = json!({"id": "g", "meter": meter, "amount": amount});
    let r = a.client().post_json(&format!("/v1/customers/{customer}/grants"), &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    wait_balances(&[&a, &b], &customer, meter, "granted", amount).await;
    (a, b, customer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_beside_a_strict_limit_are_taken_in_redis_too() {
    let redis = need!(RedisServer::start(false).await);
    let (a, b, customer) = two_granted(&redis, "cs", "gpu", 500).await;
    assert_eq!(race(&[&a, &b], &customer, "gpu", 4).await, 16, "500 credits buy exactly 16 consumes of 30");
    // The strict window holds exactly what was allowed: refusals were given back.
    let mut conn = redis.conn().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("meterd:{{{customer}}}:w:gpu:month:*")).query_async(&mut conn).await.expect("keys");
    let mut month = 0;
    for k in keys {
        let t: Option<i64> = redis::cmd("HGET").arg(&k).arg("t").query_async(&mut conn).await.expect("hget");
        month += t.unwrap_or(0);
    }
    assert_eq!(month, 480);
    wait_balances(&[&a, &b], &customer, "gpu", "balance", 20).await;
    a.stop().await;
    b.stop().await;
}

/// A leased window beside a hard credits balance: the leased path has no credit
/// take, so such a consume is decided in Redis like a strict one, and racing
/// instances never overdraw the balance (it once decided the credits locally).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_beside_a_leased_limit_are_taken_in_redis_too() {
    let redis = need!(RedisServer::start(false).await);
    let (a, b, customer) = two_granted(&redis, "cl", "lz", 500).await;
    assert_eq!(race(&[&a, &b], &customer, "lz", 4).await, 16, "500 credits buy exactly 16 consumes of 30, across two instances");
    let mut conn = redis.conn().await;
    let t: Option<i64> =
        redis::cmd("HGET").arg(format!("meterd:{{{customer}}}:credits:lz")).arg("t").query_async(&mut conn).await.expect("hget");
    assert_eq!(t, Some(480));
    wait_balances(&[&a, &b], &customer, "lz", "balance", 20).await;
    a.stop().await;
    b.stop().await;
}
