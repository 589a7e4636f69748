//! Restarts keep everything acknowledged: in process (graceful shutdown and start
//! on the same data dir) and as a real process stopped with SIGTERM. A config
//! with problems stops the process before it binds anything.

mod common;

use chrono::{TimeZone, Utc};
use common::ports::free_port;
use common::process::{meterd_command, spawn, wait_healthy, Proc};
use common::{away_from_hour_boundary, now_ms, uid, Client, TestServer, DAY, HOUR};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// `common::ingest` (asserts 202), and asserts that no event was a duplicate.
async fn ingest(c: &Client, body: Value) {
    let body = common::ingest(c, body).await;
    assert_eq!(body["duplicates"], json!(0), "{body}");
}

/// `common::put`, asserting 200.
async fn put(c: &Client, customer: &str, doc: Value) {
    let r = common::put(c, customer, doc).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

async fn get_ok(c: &Client, path: &str) -> Value {
    let r = c.get(path).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text);
    r.body
}

const CONFIG: &str = r#"
[[meters]]
name = "interview_minutes"
aggregation = "sum"
precision = 2

[[meters]]
name = "interviews"
aggregation = "count"

[[meters]]
name = "storage_gb"
aggregation = "latest"
precision = 3

[[meters]]
name = "seats"
aggregation = "max"

[[meters]]
name = "tokens"
aggregation = "sum"

[[plans]]
name = "starter"
default = true
features = { advanced_analytics = false }
[plans.limits]
interview_minutes = { limit = 300, window = "month" }
interviews = [ { limit = 3, window = "day" }, { limit = 50, window = "month" } ]
storage_gb = { limit = 10, window = "month" }
seats = { limit = 5, window = "total" }
tokens = { limit = 1000, window = "billing_cycle" }

[[plans]]
name = "premium"
features = { advanced_analytics = true }
[plans.limits]
interview_minutes = { limit = "unlimited" }
interviews = { limit = "unlimited" }
storage_gb = { limit = 100, window = "month" }
seats = { limit = 50, window = "total" }
tokens = { limit = 100000, window = "billing_cycle" }
"#;

const CUSTOMERS: [&str; 5] = ["r1", "r2", "r3", "r4", "r5"];
const METERS: [&str; 5] = ["interview_minutes", "interviews", "storage_gb", "seats", "tokens"];

fn ev(customer: &str, meter: &str, quantity: Value, ts: Option<i64>, props: Option<Value>) -> Value {
    let mut e = json!({"id": uid("r"), "customer": customer, "meter": meter, "quantity": quantity});
    if let Some(ts) = ts {
        e["timestamp"] = json!(ts);
    }
    if let Some(p) = props {
        e["properties"] = p;
    }
    e
}

/// Everything observable about the usage: summaries, entitlements, a check of
/// every meter for every customer, and usage series.
async fn snapshot(c: &Client, from: i64, to: i64) -> Value {
    let mut out = serde_json::Map::new();
    for customer in CUSTOMERS {
        out.insert(format!("usage {customer}"), get_ok(c, &format!("/v1/customers/{customer}/usage")).await);
        out.insert(format!("entitlements {customer}"), get_ok(c, &format!("/v1/customers/{customer}/entitlements")).await);
        for meter in METERS {
            let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": 0})).await;
            assert_eq!(r.status, 200, "{}", r.text);
            out.insert(format!("check {customer} {meter}"), r.body);
        }
    }
    for meter in METERS {
        for g in ["minute", "hour", "day"] {
            let q = format!("/v1/usage?meter={meter}&from={from}&to={to}&granularity={g}");
            out.insert(format!("series {meter} {g}"), get_ok(c, &q).await);
        }
    }
    Value::Object(out)
}

fn used(snapshot: &Value, customer: &str, meter: &str, window: &str) -> Value {
    snapshot[format!("usage {customer}")]["meters"]
        .as_array()
        .expect("meters")
        .iter()
        .find(|r| r["meter"] == meter && r["window"] == window)
        .map(|r| r["used"].clone())
        .unwrap_or_else(|| panic!("no {meter}/{window} row for {customer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_usage_and_entitlements() {
    away_from_hour_boundary().await;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    let now = now_ms();
    let today = now.div_euclid(DAY) * DAY;
    let yesterday_noon = today - DAY + 12 * HOUR;
    let hour_start = now.div_euclid(HOUR) * HOUR;

    // Entitlements first (so anchored and overridden windows are tracked).
    put(&c, "r3", json!({"plan": "premium", "features": {"beta": true}, "stripe_customer_id": "cus_r3"})).await;
    let yesterday = Utc.timestamp_millis_opt(today - DAY).unwrap();
    let anchor = format!("{}T00:00:00Z", yesterday.format("%Y-%m-%d"));
    put(&c, "r4", json!({"billing_anchor": anchor})).await;
    put(&c, "r5", json!({"overrides": {"interviews": {"limit": 10, "window": "hour"}}})).await;

    let room = |r: &str| Some(json!({"room": r}));
    ingest(
        &c,
        json!([
            ev("r1", "interview_minutes", json!(12.5), None, room("a")),
            ev("r1", "interview_minutes", json!(7.25), None, None),
            ev("r1", "interview_minutes", json!(3), None, room("b")),
            ev("r1", "interviews", json!(1), None, room("a")),
            ev("r1", "interviews", json!(1), None, None),
            ev("r1", "storage_gb", json!(2.5), Some(now - 2_000), room("a")),
            ev("r1", "seats", json!(3), None, None),
            ev("r1", "seats", json!(4), None, room("b")),
            ev("r1", "tokens", json!(40), None, None),
        ]),
    )
    .await;
    // Part of it reaches the store before the restart, part only at shutdown.
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    ingest(
        &c,
        json!([
            ev("r1", "storage_gb", json!(1.75), Some(now - 1_000), None),
            ev("r1", "seats", json!(2), None, None),
            ev("r2", "interview_minutes", json!(100), None, None),
            ev("r2", "interview_minutes", json!(20), Some(yesterday_noon), room("late")),
            ev("r2", "interviews", json!(1), None, None),
            ev("r2", "storage_gb", json!(9.999), None, None),
            ev("r2", "seats", json!(1), None, None),
            ev("r2", "tokens", json!(5), None, None),
            ev("r3", "interview_minutes", json!(500), None, None),
            ev("r3", "storage_gb", json!(50), None, None),
            ev("r4", "tokens", json!(30), None, None),
            ev("r4", "tokens", json!(20), Some(now - 3 * DAY), None),
            ev("r5", "interviews", json!(1), None, None),
            ev("r5", "interviews", json!(1), None, None),
            ev("r5", "interviews", json!(1), Some(hour_start - 60_000), None),
        ]),
    )
    .await;
    let consumed =
        c.check(&json!({"customer": "r1", "meter": "interview_minutes", "quantity": 0.5, "consume": true, "id": "r1-consume"})).await;
    assert_eq!(consumed.body["allowed"], json!(true), "{}", consumed.text);

    let (from, to) = (today - 5 * DAY, now + HOUR);
    let before = snapshot(&c, from, to).await;
    // Spot checks that the snapshot holds what was sent.
    assert_eq!(used(&before, "r1", "interview_minutes", "month"), json!(23.25));
    assert_eq!(used(&before, "r1", "interviews", "day"), json!(2));
    assert_eq!(used(&before, "r1", "storage_gb", "month"), json!(1.75));
    assert_eq!(used(&before, "r1", "seats", "total"), json!(4));
    assert_eq!(used(&before, "r3", "interview_minutes", "month"), json!(500));
    assert_eq!(used(&before, "r4", "tokens", "billing_cycle"), json!(30));
    assert_eq!(used(&before, "r5", "interviews", "hour"), json!(2));
    assert_eq!(before["entitlements r3"]["plan"], "premium");

    let server = server.restart().await;
    let c = server.client();
    let after = snapshot(&c, from, to).await;
    for (key, value) in before.as_object().unwrap() {
        assert_eq!(&after[key], value, "{key} changed across the restart");
    }
    assert_eq!(after, before);

    // Usage after the restart adds to the rebuilt counters exactly once.
    ingest(
        &c,
        json!([
            ev("r1", "interview_minutes", json!(1), None, None),
            ev("r4", "tokens", json!(1), None, None),
            ev("r5", "interviews", json!(1), None, None),
        ]),
    )
    .await;
    // Gauges keep their reading's time: an older reading or a smaller maximum
    // sent after the restart changes nothing.
    ingest(&c, json!([ev("r1", "storage_gb", json!(8), Some(now - 1_500), None), ev("r1", "seats", json!(1), None, None),])).await;
    let more = snapshot(&c, from, to).await;
    assert_eq!(used(&more, "r1", "storage_gb", "month"), json!(1.75));
    assert_eq!(used(&more, "r1", "seats", "total"), json!(4));
    assert_eq!(used(&more, "r1", "interview_minutes", "month"), json!(24.25));
    assert_eq!(used(&more, "r4", "tokens", "billing_cycle"), json!(31));
    assert_eq!(used(&more, "r5", "interviews", "hour"), json!(3));

    // And a second restart changes nothing either.
    let server = server.restart().await;
    let again = snapshot(&server.client(), from, to).await;
    assert_eq!(again, more);
    server.stop().await;
}

/// Kills the child when dropped, so a failing test leaves no process behind.
fn process_config(port: u16, data_dir: &Path) -> String {
    format!("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\ndata_dir = {:?}\n{CONFIG}", data_dir.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_the_next_process_keeps_totals() {
    away_from_hour_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = dir.path().join("meterd.toml");
    std::fs::write(&config, process_config(port, &dir.path().join("data"))).expect("write config");

    let mut p = spawn(&config, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: None };
    put(&c, "p2", json!({"plan": "premium", "stripe_customer_id": "cus_p2"})).await;
    ingest(
        &c,
        json!([
            ev("p1", "interview_minutes", json!(12.34), None, None),
            ev("p1", "interview_minutes", json!(0.66), None, Some(json!({"k": "v"}))),
            ev("p1", "interviews", json!(1), None, None),
            ev("p2", "interview_minutes", json!(450), None, None),
            ev("p2", "storage_gb", json!(3.5), None, None),
        ]),
    )
    .await;
    // Right before the signal: nothing of this has been flushed by the ticker
    // necessarily; the shutdown's final flush must store it.
    ingest(&c, json!(ev("p1", "tokens", json!(77), None, None))).await;
    let now = now_ms();
    let (from, to) = (now - DAY, now + HOUR);
    let before = snapshot_small(&c, from, to).await;
    assert_eq!(before["p1"]["meters"][0]["used"], json!(13), "{before}");
    assert_eq!(before["p2"]["plan"], "premium", "{before}");

    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", p.log());
    drop(p);

    let mut p = spawn(&config, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    let after = snapshot_small(&c, from, to).await;
    assert_eq!(after, before, "log:\n{}", p.log());
    let ent = get_ok(&c, "/v1/customers/p2/entitlements").await;
    assert_eq!(ent["stripe_customer_id"], "cus_p2");
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", p.log());
}

async fn snapshot_small(c: &Client, from: i64, to: i64) -> Value {
    let mut out = serde_json::Map::new();
    for customer in ["p1", "p2"] {
        out.insert(customer.into(), get_ok(c, &format!("/v1/customers/{customer}/usage")).await);
    }
    for meter in METERS {
        let q = format!("/v1/usage?meter={meter}&from={from}&to={to}&granularity=minute");
        out.insert(meter.into(), get_ok(c, &q).await);
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_problems_exits_2_before_binding() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Hold the port: a process that bound before validating would fail to bind
    // (exit 1, a bind error) instead of reporting the config's problems.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let data_dir = dir.path().join("data");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"

[storage]
data_dir = {:?}

[[meters]]
name = "minutes"
aggregation = "average"

[[plans]]
name = "a"
default = true
[plans.limits]
minutes = {{ limit = 10, window = "month" }}
hours = {{ limit = 1, window = "day" }}

[[plans]]
name = "b"
default = true
"#,
        data_dir.display().to_string()
    );
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, text).expect("write config");

    for check_only in [false, true] {
        let mut cmd = meterd_command(&config);
        if check_only {
            cmd.arg("check-config");
        }
        let log = dir.path().join(format!("bad-{check_only}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::from(out)).spawn().expect("spawn meterd");
        let mut p = Proc { child, log };
        let status = p.wait_exit(Duration::from_secs(20)).await;
        let stderr = p.log();
        assert_eq!(status.code(), Some(2), "check-config={check_only}; stderr:\n{stderr}");
        for needle in ["meters.minutes.aggregation", "plans.a.limits.hours", "unknown meter \"hours\"", "exactly one plan"] {
            assert!(stderr.contains(needle), "check-config={check_only}: {needle:?} missing from:\n{stderr}");
        }
        assert!(stderr.contains(&config.display().to_string()), "names the file:\n{stderr}");
        assert!(!stderr.contains("bind"), "tried to bind:\n{stderr}");
        assert!(!data_dir.exists(), "created the data dir before validating");
    }
    // The port stayed ours all along, and is free once we let it go.
    drop(held);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port is free");

    // An unknown key is a problem too, named with its file.
    std::fs::write(&config, "[server]\nlisen = \"127.0.0.1:1\"\n").expect("write config");
    let out = meterd_command(&config).arg("check-config").output().expect("run check-config");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lisen") && stderr.contains("bad.toml"), "{stderr}");
    // A valid config passes check-config.
    std::fs::write(&config, process_config(free_port(), &data_dir)).expect("write config");
    let out = meterd_command(&config).arg("check-config").output().expect("run check-config");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!data_dir.exists());
}
