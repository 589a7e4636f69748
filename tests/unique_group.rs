//! Issue 25: unique counts and usage grouped by property, over real sockets.
//! Exact distinct counts through duplicates, a SIGKILL (WAL replay), a graceful
//! restart (rebuild from the store) and three instances on one Redis; a limit
//! of three active users that denies a fourth and allows a returning one;
//! group-by totals that add up to the ungrouped total with SQLite and with
//! ClickHouse; the cap of distinct values; config errors named by key.

mod common;

use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::redis_server::RedisServer;
use common::require::{clickhouse_url, need};
use common::{away_from_day_boundary, message, now_ms, uid, Client, TestServer, DAY};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const METERS: &str = r#"
[[meters]]
name = "active_users"
aggregation = "unique_count"
unique_property = "user_id"
group_by = ["region"]

[[meters]]
name = "visitors"
aggregation = "unique_count"
unique_property = "user_id"

[[meters]]
name = "ai_tokens"
aggregation = "sum"
group_by = ["model", "region"]

[[plans]]
name = "p"
default = true
[plans.limits]
active_users = { limit = 3, window = "month" }
visitors = [{ limit = "unlimited", window = "day" }, { limit = "unlimited", window = "month" }]
ai_tokens = { limit = "unlimited", window = "month" }
"#;

fn config(extra: &str) -> String {
    format!("[storage]\ndurability = \"fsync\"\nflush_interval = \"200ms\"\n{extra}\n{METERS}")
}

fn visit(customer: &str, user: &str) -> Value {
    json!({"id": uid("v"), "customer": customer, "meter": "visitors", "properties": {"user_id": user}})
}

/// `used` of a plain check (with `value` when given).
async fn used(c: &Client, customer: &str, meter: &str, value: Option<&str>) -> Value {
    let mut body = json!({"customer": customer, "meter": meter});
    if let Some(v) = value {
        body["value"] = json!(v);
    }
    let r = c.check(&body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

async fn usage(c: &Client, query: &str) -> Value {
    let r = c.get(&format!("/v1/usage?{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn day_range() -> String {
    let now = now_ms();
    format!("from={}&to={}", now - now.rem_euclid(DAY), now - now.rem_euclid(DAY) + DAY)
}

/// A value counted twice in a window counts once: across duplicate events
/// and resent batches, a SIGKILL (the WAL replays) and a graceful restart
/// (windows rebuilt from the store's distinct values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_counts_are_exact_through_duplicates_a_kill_and_a_restart() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let path = dir.path().join("meterd.toml");
    // Nothing is flushed before the kill: the WAL holds every value.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"1h\"\n{METERS}",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("config");
    let mut p = spawn(&path, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: None };
    let batch: Vec<Value> = (0..60).map(|i| visit("acme", &format!("u{}", i % 20))).collect();
    let r = c.events(&json!(batch)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    // The same batch again: duplicates by id.
    let r = c.events(&json!(batch)).await;
    assert_eq!(r.body, json!({"accepted": 0, "duplicates": 60}));
    // New ids, values already counted.
    let again: Vec<Value> = (0..40).map(|i| visit("acme", &format!("u{}", i % 20))).collect();
    assert_eq!(c.events(&json!(again)).await.status, 202);
    let body = used(&c, "acme", "visitors", None).await;
    assert_eq!(body["used"], json!(20), "{body}");
    assert_eq!(
        body["limits"].as_array().map(|l| l.iter().map(|l| l["used"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(20), json!(20)])
    );
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();

    let mut p = spawn(&path, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(used(&c, "acme", "visitors", None).await["used"], json!(20), "after the WAL replay");
    let more = json!([visit("acme", "u5"), visit("acme", "u20"), visit("acme", "u20"), visit("other", "u5")]);
    assert_eq!(c.events(&more).await.status, 202);
    assert_eq!(used(&c, "acme", "visitors", None).await["used"], json!(21));
    assert_eq!(used(&c, "other", "visitors", None).await["used"], json!(1));
    p.sigterm();
    assert!(p.wait_exit(Duration::from_secs(20)).await.success(), "{}", p.log());

    // Graceful stop flushed everything: now the store alone holds the values.
    let mut p = spawn(&path, dir.path().join("run3.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(used(&c, "acme", "visitors", None).await["used"], json!(21), "rebuilt from the store");
    let counted = used(&c, "acme", "visitors", Some("u20")).await;
    assert_eq!(counted["quantity"], json!(0), "u20 is counted already: {counted}");
    assert_eq!(c.events(&json!([visit("acme", "u3")])).await.status, 202);
    assert_eq!(used(&c, "acme", "visitors", None).await["used"], json!(21));
    // /v1/usage: distinct values per point, stored and unflushed merged.
    let series = usage(&c, &format!("meter=visitors&granularity=day&customer=acme&{}", day_range())).await;
    assert_eq!(series["data"].as_array().map(Vec::len), Some(1), "{series}");
    assert_eq!(series["data"][0]["value"], json!(21), "{series}");
    let minutes = usage(&c, &format!("meter=visitors&granularity=minute&customer=acme&{}", day_range())).await;
    let by_minute: i64 = minutes["data"].as_array().into_iter().flatten().filter_map(|p| p["value"].as_i64()).sum();
    assert!(by_minute >= 21, "distinct per minute adds up to at least the day's: {minutes}");
    p.sigterm();
    assert!(p.wait_exit(Duration::from_secs(20)).await.success(), "{}", p.log());
}

/// "May this customer add another active user this month?": a limit of 3
/// denies a fourth new user and allows a returning one, on checks with `value`
/// and on consumes; a consume of a counted value adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_three_active_users_denies_a_fourth_and_allows_a_returning_one() {
    let server = TestServer::start(&config("[ingest]\nmax_unique_values = 45")).await;
    let c = server.client();
    let consume = |user: &str, id: &str| json!({"customer": "team", "meter": "active_users", "consume": true, "id": id, "value": user});
    for (i, user) in ["ann", "bob", "cy"].iter().enumerate() {
        let r = c.check(&consume(user, &format!("c-{user}"))).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!((r.body["allowed"].clone(), r.body["used"].clone()), (json!(true), json!(i + 1)), "{}", r.text);
    }
    let fourth = used(&c, "team", "active_users", Some("dee")).await;
    assert_eq!((fourth["allowed"].clone(), fourth["reason"].clone()), (json!(false), json!("limit_exceeded")), "{fourth}");
    let returning = used(&c, "team", "active_users", Some("bob")).await;
    assert_eq!((returning["allowed"].clone(), returning["quantity"].clone()), (json!(true), json!(0)), "{returning}");
    assert_eq!(used(&c, "team", "active_users", None).await["allowed"], json!(false), "one more new user does not fit");
    let denied = c.check(&consume("dee", "c-dee")).await;
    assert_eq!((denied.body["allowed"].clone(), denied.body["used"].clone()), (json!(false), json!(3)), "{}", denied.text);
    let back = c.check(&consume("ann", "c-ann-again")).await;
    assert_eq!((back.body["allowed"].clone(), back.body["used"].clone()), (json!(true), json!(3)), "{}", back.text);
    // A retried consume gets its first answer.
    let retry = c.check(&consume("cy", "c-cy")).await;
    assert_eq!((retry.body["allowed"].clone(), retry.body["used"].clone()), (json!(true), json!(3)), "{}", retry.text);
    assert_eq!(used(&c, "team", "active_users", None).await["used"], json!(3));
    // An override starts a day window: seeded with the distinct values so far
    // (3, though 4 events carry them).
    let again = json!({"id": uid("e"), "customer": "team", "meter": "active_users", "properties": {"user_id": "bob"}});
    assert_eq!(c.events(&again).await.status, 202);
    let doc = json!({"overrides": {"active_users": [{"limit": 3, "window": "month"}, {"limit": 10, "window": "day"}]}});
    assert_eq!(common::put(&c, "team", doc).await.status, 200);
    let both = used(&c, "team", "active_users", Some("bob")).await;
    let windows: Vec<(Value, Value)> =
        both["limits"].as_array().into_iter().flatten().map(|l| (l["window"].clone(), l["used"].clone())).collect();
    assert_eq!(windows, vec![(json!("month"), json!(3)), (json!("day"), json!(3))], "{both}");
    assert_eq!(both["allowed"], json!(true), "{both}");

    // A race: 16 new users at once on a fresh customer, 4 of them twice
    // (two consumes of one value, different ids): exactly 3 values get in.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let c = c.clone();
            let value = format!("r{}", i % 16);
            let body = json!({"customer": "race", "meter": "active_users", "consume": true, "id": format!("race-{i}"), "value": value});
            tokio::spawn(async move { (value, c.check(&body).await.body["allowed"] == json!(true)) })
        })
        .collect();
    let mut allowed_values = std::collections::BTreeSet::new();
    for t in tasks {
        let (value, allowed) = t.await.expect("task");
        if allowed {
            allowed_values.insert(value);
        }
    }
    assert_eq!(allowed_values.len(), 3, "{allowed_values:?}");
    assert_eq!(used(&c, "race", "active_users", None).await["used"], json!(3), "exactly three distinct users get in");
    let series = usage(&c, &format!("meter=active_users&granularity=day&customer=race&{}", day_range())).await;
    assert_eq!(series["data"][0]["value"], json!(3), "{series}");
    // Concurrent events with overlapping values: exact.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            let batch: Vec<Value> = (0..50).map(|i| visit("crowd", &format!("p{}", (i * 7 + t) % 40))).collect();
            tokio::spawn(async move { c.events(&json!(batch)).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 202);
    }
    assert_eq!(used(&c, "crowd", "visitors", None).await["used"], json!(40));

    // Refusals name the field.
    let r = c.check(&json!({"customer": "team", "meter": "active_users", "consume": true, "id": "x"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(message(&r).starts_with("value:"), "{}", r.text);
    let r = c.check(&json!({"customer": "team", "meter": "ai_tokens", "value": "x"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(message(&r).starts_with("value:"), "{}", r.text);
    let r = c.events(&json!({"id": uid("e"), "customer": "team", "meter": "visitors", "properties": {"other": "x"}})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["details"][0]["field"], json!("properties.user_id"), "{}", r.text);

    // The cap (45 per window): a 46th new value is refused, a counted one is not.
    let five: Vec<Value> = (0..45).map(|i| visit("big", &format!("u{i}"))).collect();
    assert_eq!(c.events(&json!(five)).await.status, 202);
    let r = c.events(&json!([visit("big", "u1"), visit("big", "u99")])).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["details"][0]["index"], json!(1), "{}", r.text);
    assert_eq!(r.body["error"]["details"][0]["field"], json!("properties.user_id"), "{}", r.text);
    assert!(r.text.contains("max_unique_values"), "{}", r.text);
    assert_eq!(c.events(&json!([visit("big", "u1")])).await.status, 202);
    assert_eq!(used(&c, "big", "visitors", None).await["used"], json!(45));
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.lines().any(|l| l.starts_with("meterd_unique_values_refused_total ") && !l.ends_with(" 0")), "{metrics}");
    server.stop().await;
}

/// Points of a series: (customer, start, group value) → value.
fn points(series: &Value, group: Option<&str>) -> BTreeMap<(String, String, Option<String>), i64> {
    let mut out = BTreeMap::new();
    for p in series["data"].as_array().into_iter().flatten() {
        let g = group.map(|g| {
            assert!(p["group"].as_object().is_some_and(|o| o.contains_key(g)), "{p}");
            p["group"][g].as_str().map(str::to_string)
        });
        if group.is_none() {
            assert!(p.get("group").is_none(), "{p}");
        }
        let key = (p["customer"].as_str().unwrap_or("").to_string(), p["start"].as_str().unwrap_or("").to_string(), g.flatten());
        *out.entry(key).or_default() += p["value"].as_i64().unwrap_or(0);
    }
    out
}

/// Ingests tokens by model and region (some without), half flushed, half not;
/// grouped series must add up to the ungrouped one and unique counts group too.
async fn group_by_adds_up(c: &Client) {
    away_from_day_boundary().await;
    let models = [Some("gpt"), Some("claude"), None];
    let regions = [Some("eu"), Some("us")];
    let mut expected: BTreeMap<Option<&str>, i64> = BTreeMap::new();
    for round in 0..2 {
        let mut batch = Vec::new();
        for i in 0..30_i64 {
            let model = models[(i % 3) as usize];
            let mut props = serde_json::Map::new();
            if let Some(m) = model {
                props.insert("model".into(), json!(m));
            }
            if let Some(r) = regions[(i % 2) as usize] {
                props.insert("region".into(), json!(r));
            }
            props.insert("note".into(), json!(format!("quote \" and \\ {i}")));
            *expected.entry(model).or_default() += i + 1;
            batch.push(
                json!({"id": uid("t"), "customer": format!("c{}", i % 2), "meter": "ai_tokens", "quantity": i + 1, "properties": props}),
            );
            batch.push(json!({"id": uid("a"), "customer": "c0", "meter": "active_users", "properties": {"user_id": format!("u{}", i % 7), "region": if i % 7 < 3 { "eu" } else { "us" }}}));
        }
        assert_eq!(c.events(&json!(batch)).await.status, 202);
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(800)).await; // flushed
        }
    }
    let range = day_range();
    let whole = usage(c, &format!("meter=ai_tokens&granularity=day&{range}")).await;
    let by_model = usage(c, &format!("meter=ai_tokens&granularity=day&group_by=model&{range}")).await;
    let whole = points(&whole, None);
    let grouped = points(&by_model, Some("model"));
    let mut summed: BTreeMap<(String, String, Option<String>), i64> = BTreeMap::new();
    for ((customer, start, _), v) in &grouped {
        *summed.entry((customer.clone(), start.clone(), None)).or_default() += v;
    }
    assert_eq!(summed, whole, "grouped {by_model}");
    let mut per_model: BTreeMap<Option<String>, i64> = BTreeMap::new();
    for ((_, _, g), v) in grouped {
        *per_model.entry(g).or_default() += v;
    }
    let expected: BTreeMap<Option<String>, i64> = expected.into_iter().map(|(k, v)| (k.map(str::to_string), v)).collect();
    assert_eq!(per_model, expected, "{by_model}");
    let hourly = usage(c, &format!("meter=ai_tokens&granularity=hour&group_by=region&{range}")).await;
    let total: i64 = points(&hourly, Some("region")).values().sum();
    assert_eq!(total, per_model.values().sum::<i64>());
    // Unique counts by region: 3 users in eu, 4 in us, 7 in all.
    let users = usage(c, &format!("meter=active_users&granularity=day&customer=c0&group_by=region&{range}")).await;
    let by_region: BTreeMap<Option<String>, i64> = points(&users, Some("region")).into_iter().map(|((_, _, g), v)| (g, v)).collect();
    assert_eq!(by_region, BTreeMap::from([(Some("eu".to_string()), 3), (Some("us".to_string()), 4)]), "{users}");
    let all = usage(c, &format!("meter=active_users&granularity=day&customer=c0&{range}")).await;
    assert_eq!(all["data"][0]["value"], json!(7), "{all}");
    // Only declared properties.
    let r = c.get(&format!("/v1/usage?meter=ai_tokens&group_by=note&{range}")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(message(&r).starts_with("group_by:"), "{}", r.text);
    let r = c.get(&format!("/v1/usage?meter=visitors&group_by=region&{range}")).await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_totals_add_up_with_sqlite() {
    let server = TestServer::start(&config("")).await;
    group_by_adds_up(&server.client()).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_totals_add_up_with_clickhouse() {
    let url = need!(clickhouse_url());
    let db = common::ch::unique_db();
    let server =
        TestServer::start(&config(&format!("[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nflush_interval = \"200ms\""))).await;
    group_by_adds_up(&server.client()).await;
    // Restarted, the unique windows are rebuilt from ClickHouse's distinct values.
    let server = server.restart().await;
    assert_eq!(used(&server.client(), "c0", "active_users", None).await["used"], json!(7));
    server.stop().await;
}

/// Three instances on one Redis: each value counted once over all of them,
/// and a returning user seen on another instance is allowed at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_count_each_value_once() {
    let mut redis = need!(RedisServer::start(false).await);
    let mut servers = Vec::new();
    for i in 0..3 {
        let extra =
            format!("[server]\ninstance_id = \"u{i}\"\n[redis]\nurl = \"{}\"\nsync_interval = \"50ms\"\ntimeout = \"500ms\"", redis.url());
        servers.push(TestServer::start(&config(&extra)).await);
    }
    // Users u0..u9 on every instance, plus five of each instance's own: 25.
    for (i, s) in servers.iter().enumerate() {
        let mut batch: Vec<Value> = (0..10).map(|u| visit("acme", &format!("u{u}"))).collect();
        batch.extend((0..5).map(|u| visit("acme", &format!("own{i}-{u}"))));
        assert_eq!(s.client().events(&json!(batch)).await.status, 202);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for s in &servers {
            seen.push(used(&s.client(), "acme", "visitors", None).await["used"].as_i64().unwrap_or(-1));
        }
        if seen == vec![25, 25, 25] {
            break;
        }
        assert!(Instant::now() < deadline, "every instance should see 25 distinct users: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Redis restarted empty: the sets are refilled from every instance's values.
    redis.restart_empty().await;
    assert_eq!(servers[0].client().events(&json!([visit("acme", "late")])).await.status, 202);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut seen = Vec::new();
        for s in &servers {
            seen.push(used(&s.client(), "acme", "visitors", None).await["used"].as_i64().unwrap_or(-1));
        }
        let mut conn = redis.conn().await;
        let keys: Vec<String> = redis::cmd("KEYS").arg("*acme*:u").query_async(&mut conn).await.unwrap_or_default();
        let mut size = 0;
        for k in &keys {
            size += redis::cmd("SCARD").arg(k).query_async::<i64>(&mut conn).await.unwrap_or(0);
        }
        // Two windows (day and month) of 26 values each.
        if seen == vec![26, 26, 26] && size == 52 {
            break;
        }
        assert!(Instant::now() < deadline, "after the restart: instances {seen:?}, redis sets {size} over {keys:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The limit of 3 across instances.
    let consume = |user: &str| json!({"customer": "team", "meter": "active_users", "consume": true, "id": uid("c"), "value": user});
    for (s, user) in servers.iter().zip(["ann", "bob", "cy"]) {
        let r = s.client().check(&consume(user)).await;
        assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while used(&servers[2].client(), "team", "active_users", None).await["used"] != json!(3) {
        assert!(Instant::now() < deadline, "instance 2 should see the three users");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fourth = used(&servers[2].client(), "team", "active_users", Some("dee")).await;
    assert_eq!(fourth["allowed"], json!(false), "{fourth}");
    let returning = servers[2].client().check(&consume("ann")).await;
    assert_eq!((returning.body["allowed"].clone(), returning.body["used"].clone()), (json!(true), json!(3)), "{}", returning.text);
    for s in servers {
        s.stop().await;
    }
}

/// Config errors name the key and say why.
#[test]
fn config_errors_name_the_key() {
    let cases = [
        ("[[meters]]\nname = \"u\"\naggregation = \"unique_count\"", "meters.u.unique_property", "is required"),
        ("[[meters]]\nname = \"u\"\nunique_property = \"user_id\"", "meters.u.unique_property", "only for"),
        ("[[meters]]\nname = \"u\"\ngroup_by = [\"model\", \"model\"]", "meters.u.group_by", "twice"),
        (
            "[[meters]]\nname = \"u\"\naggregation = \"unique_count\"\nunique_property = \"user_id\"\nstripe_event_name = \"users\"",
            "meters.u.stripe_event_name",
            "Stripe",
        ),
        ("[ingest]\nmax_unique_values = 0\n[[meters]]\nname = \"u\"", "ingest.max_unique_values", ""),
    ];
    for (meters, key, reason) in cases {
        let text = format!("{meters}\n[[plans]]\nname = \"p\"\ndefault = true\n");
        let err = meterd::config::Config::parse(&text, "t.toml").and_then(|c| c.validate("t.toml")).err().map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("{meters} should be refused"));
        assert!(err.contains(key) && err.contains(reason), "{key} / {reason} not in: {err}");
    }
    let strict = "[[meters]]\nname = \"u\"\naggregation = \"unique_count\"\nunique_property = \"user_id\"\n\
                  [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nu = { limit = 3, enforcement = \"strict\" }\n";
    let err = meterd::config::Config::parse(strict, "t.toml").and_then(|c| c.validate("t.toml")).err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("plans.p.limits.u.enforcement")), "{err:?}");
}
