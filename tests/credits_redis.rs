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
                    let id = uid(&format!("{meter}-{n}-{t}-{i}"));
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

/// No slice is granted while Redis is younger than two lease ttls (1 s each
/// at a 100 ms sync interval); consumes meanwhile are taken per call.
const RECOVERY: Duration = Duration::from_millis(2_100);
const LEASE_TTL: Duration = Duration::from_millis(1_000);

/// Consumes of `q` on `meter` from the clients in turn until every one is
/// refused; the number allowed. Every refusal is `insufficient_credits`.
async fn drain(clients: &[common::Client], customer: &str, meter: &str, q: i64) -> i64 {
    let mut allowed = 0;
    let mut refused_in_a_row = 0;
    let mut n = 0usize;
    while refused_in_a_row < clients.len() {
        let c = &clients[n % clients.len()];
        n += 1;
        let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": q, "consume": true, "id": uid("d")})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.body["allowed"] == true {
            allowed += 1;
            refused_in_a_row = 0;
        } else {
            assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text);
            refused_in_a_row += 1;
        }
    }
    allowed
}

async fn credit_total(redis: &RedisServer, customer: &str, meter: &str) -> i64 {
    let mut conn = redis.conn().await;
    let t: Option<i64> =
        redis::cmd("HGET").arg(format!("meterd:{{{customer}}}:credits:{meter}")).arg("t").query_async(&mut conn).await.expect("hget");
    t.unwrap_or(0)
}

/// `meterd_leased_decisions_total{where="local"}` of one instance.
async fn local_decisions(s: &TestServer) -> i64 {
    let r = s.client().get("/metrics").await;
    r.text
        .lines()
        .find(|l| l.starts_with("meterd_leased_decisions_total{where=\"local\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

/// Issue 16 for credits: a hard balance is leased by default. Three instances
/// racing consumes take exactly what it holds, most decisions inside slices;
/// a top-up reaches every instance; holds racing leased consumes never pass
/// the balance; a void leaves what slices stand on and nobody overdraws.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_credits_on_three_instances_are_exact_and_mostly_local() {
    let redis = need!(RedisServer::start(false).await);
    let servers = [
        TestServer::start(&config(&redis.url(), "lc-a")).await,
        TestServer::start(&config(&redis.url(), "lc-b")).await,
        TestServer::start(&config(&redis.url(), "lc-c")).await,
    ];
    let all: Vec<&TestServer> = servers.iter().collect();
    tokio::time::sleep(RECOVERY).await;
    let customer = uid("lc");
    let grant = |id: &str, amount: i64| json!({"id": id, "meter": "ai_tokens", "amount": amount});
    let r = servers[0].client().post_json(&format!("/v1/customers/{customer}/grants"), &grant("g1", 1000)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    wait_balances(&all, &customer, "ai_tokens", "granted", 1000).await;
    // 12 tasks × 8 consumes of 30 on 1000: exactly 33, balance 10 everywhere.
    assert_eq!(race(&all, &customer, "ai_tokens", 4).await, 33, "1000 credits buy exactly 33 consumes of 30, leased");
    wait_balances(&all, &customer, "ai_tokens", "balance", 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while credit_total(&redis, &customer, "ai_tokens").await != 990 {
        assert!(Instant::now() < deadline, "the instances never pushed their usage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut local = 0;
    while local == 0 {
        assert!(Instant::now() < deadline, "no consume was decided inside a slice");
        tokio::time::sleep(Duration::from_millis(50)).await;
        local = 0;
        for s in &servers {
            local += local_decisions(s).await;
        }
    }

    // A top-up on one instance is spendable on every instance.
    let r = servers[2].client().post_json(&format!("/v1/customers/{customer}/grants"), &grant("g2", 300)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    wait_balances(&all, &customer, "ai_tokens", "balance", 310).await;
    assert_eq!(race(&all, &customer, "ai_tokens", 2).await, 10, "310 credits buy exactly 10 consumes of 30");
    wait_balances(&all, &customer, "ai_tokens", "balance", 10).await;

    // Holds of 50 racing leased consumes of 30 on 610: never past it; drained
    // by consumes of 10, used + held is exactly the balance.
    let r = servers[1].client().post_json(&format!("/v1/customers/{customer}/grants"), &grant("g3", 600)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    wait_balances(&all, &customer, "ai_tokens", "balance", 610).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(6));
    let mut handles = Vec::new();
    for (n, s) in servers.iter().enumerate() {
        for kind in 0..2 {
            let (c, customer, start) = (s.client(), customer.clone(), start.clone());
            handles.push(tokio::spawn(async move {
                start.wait().await;
                let (mut held, mut used) = (0, 0);
                for i in 0..8 {
                    if kind == 0 {
                        let id = format!("h-{n}-{i}");
                        let body = json!({"id": id, "customer": customer, "meter": "ai_tokens", "quantity": 50});
                        let r = c.post_json("/v1/reservations", &body).await;
                        assert_eq!(r.status, 200, "{}", r.text);
                        if r.body["reservation"]["status"] == "held" {
                            held += 50;
                        }
                    } else {
                        let id = format!("hc-{n}-{i}");
                        let r =
                            c.check(&json!({"customer": customer, "meter": "ai_tokens", "quantity": 30, "consume": true, "id": id})).await;
                        assert_eq!(r.status, 200, "{}", r.text);
                        if r.body["allowed"] == true {
                            used += 30;
                        }
                    }
                }
                (held, used)
            }));
        }
    }
    let (mut held, mut used) = (0, 0);
    for h in handles {
        let (a, b) = h.await.expect("racer");
        held += a;
        used += b;
    }
    assert!(held > 0 && used > 0, "both holds and consumes got through: {held} held, {used} used");
    assert!(held + used <= 610, "holds and consumes took {held} + {used} of 610");
    // Idle slices go back after two sync intervals; then consumes of 10 take the rest.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let clients: Vec<common::Client> = servers.iter().map(TestServer::client).collect();
    let rest = drain(&clients, &customer, "ai_tokens", 10).await;
    assert_eq!(held + used + 10 * rest, 610, "holds + consumes + the drain took exactly the balance");
    // The balance still carries the held units (holds are not usage).
    wait_balances(&all, &customer, "ai_tokens", "balance", held).await;

    // A void while an instance holds a slice: it takes only what no slice
    // (nor hold, nor usage unseen) stands on; the rest stays spendable and
    // nobody overdraws.
    let r = servers[0].client().post_json(&format!("/v1/customers/{customer}/grants"), &grant("g4", 1000)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    wait_balances(&all, &customer, "ai_tokens", "balance", held + 1000).await;
    let r =
        servers[1].client().check(&json!({"customer": customer, "meter": "ai_tokens", "quantity": 10, "consume": true, "id": "v-0"})).await;
    assert_eq!(r.body["allowed"], true, "{}", r.text);
    let r = servers[0].client().send(hyper::Method::DELETE, &format!("/v1/customers/{customer}/grants/g4"), None, "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Spent inside the slice right after the void (no round trip): it must
    // still be covered, so the balance never falls below what is held.
    let r =
        servers[1].client().check(&json!({"customer": customer, "meter": "ai_tokens", "quantity": 10, "consume": true, "id": "v-1"})).await;
    assert_eq!(r.body["allowed"], true, "{}", r.text);
    for s in &servers {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let grants = s.client().get(&format!("/v1/customers/{customer}/grants")).await;
            let g4 = grants.body["grants"].as_array().and_then(|g| g.iter().find(|g| g["id"] == "g4").cloned()).unwrap_or_default();
            if g4["status"] == "voided" {
                break;
            }
            assert!(Instant::now() < deadline, "an instance never saw the void: {g4}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let after_void = drain(&clients, &customer, "ai_tokens", 10).await;
    assert!(after_void > 0, "what the slice stood on stays spendable");
    // Never below what is held: the void took nothing a slice stood on.
    assert!(10 * (2 + after_void) < 1000, "the void took something: {after_void} consumes of 10 after it");
    wait_balances(&all, &customer, "ai_tokens", "balance", held).await;
    for s in servers {
        s.stop().await;
    }
}

/// A SIGKILLed slice holder: its unused slice stays out of reach until the
/// lease ttl, then returns all but its unreported allowance, which returns
/// once the holder is back and has pushed its usage. Never more than the
/// balance, exactly the balance in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_credit_slice_holder_returns_its_slice_after_the_lease_ttl() {
    use common::ports::free_port;
    use common::process::{spawn, wait_healthy};
    let redis = need!(RedisServer::start(false).await);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ninstance_id = \"ck-holder\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\n\
         [redis]\nurl = \"{}\"\nsync_interval = \"100ms\"\ntimeout = \"500ms\"\n{PLANS}",
        dir.path().join("data").display().to_string(),
        redis.url()
    );
    std::fs::write(&path, text).expect("config");
    let mut holder = spawn(&path, dir.path().join("holder.log"));
    wait_healthy(&mut holder, addr).await;
    let others = [TestServer::start(&config(&redis.url(), "ck-1")).await, TestServer::start(&config(&redis.url(), "ck-2")).await];
    tokio::time::sleep(RECOVERY).await;
    let customer = uid("ck");
    let r = others[0]
        .client()
        .post_json(&format!("/v1/customers/{customer}/grants"), &json!({"id": "g", "meter": "ai_tokens", "amount": 1200}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let killed = common::Client { addr, token: None };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = killed.get(&format!("/v1/customers/{customer}/balances")).await;
        if r.body["balances"][0]["granted"] == json!(1200) {
            break;
        }
        assert!(Instant::now() < deadline, "the holder never saw the grant: {}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The holder takes a slice (half the free balance: cap 600, unreported
    // allowance a quarter: 150) and uses 40 of it, which it pushes.
    let r = killed.check(&json!({"customer": customer, "meter": "ai_tokens", "quantity": 40, "consume": true, "id": "k-0"})).await;
    assert_eq!(r.body["allowed"], true, "{}", r.text);
    let deadline = Instant::now() + Duration::from_secs(5);
    while credit_total(&redis, &customer, "ai_tokens").await != 40 {
        assert!(Instant::now() < deadline, "the holder never pushed its usage");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    holder.child.kill().expect("SIGKILL");
    let _ = holder.child.wait();
    let clients: Vec<common::Client> = others.iter().map(TestServer::client).collect();
    // Its unused 560 stay out of reach until the lease times out: 600 left.
    let first = drain(&clients, &customer, "ai_tokens", 50).await;
    assert_eq!(first, 12, "the killed holder's slice is still held");
    tokio::time::sleep(LEASE_TTL + Duration::from_millis(200)).await;
    // Expired: all but the unreported allowance (150) returns: 1200 - 40 - 600 - 150 = 410.
    let second = drain(&clients, &customer, "ai_tokens", 10).await;
    assert_eq!(second, 41, "the expired slice returned, less what the holder could have used unreported");
    // Back: the WAL replay restores its 40, its first sync push drops the
    // expired slice; the last 150 can be spent.
    let mut holder = spawn(&path, dir.path().join("holder-again.log"));
    wait_healthy(&mut holder, addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut third = 0;
    while third < 15 && Instant::now() < deadline {
        third += drain(&clients, &customer, "ai_tokens", 10).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(third, 15, "once the holder is back, every unit is spendable, and no more");
    assert_eq!(drain(&[killed], &customer, "ai_tokens", 10).await, 0, "the restarted holder spends nothing more");
    let deadline = Instant::now() + Duration::from_secs(5);
    while credit_total(&redis, &customer, "ai_tokens").await != 1200 {
        assert!(Instant::now() < deadline, "redis never held all the usage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_balances(&[&others[0], &others[1]], &customer, "ai_tokens", "balance", 0).await;
    let _ = holder.child.kill();
    let _ = holder.child.wait();
    for s in others {
        s.stop().await;
    }
}
