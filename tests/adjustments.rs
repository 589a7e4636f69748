//! Adjustments (issue 19) through the embedded SQLite store: a decrease lowers
//! the window counters, `/v1/usage`, and the store's `sum(value)` exactly; one
//! that would go below zero is refused with nothing changed; a repeated id is
//! applied once; the audit list and the lowered totals survive a restart and
//! a SIGKILL.

mod common;

use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::{away_from_day_boundary, now_ms, uid, Client, TestServer, DAY};
use serde_json::{json, Value};
use std::time::Duration;

const CONFIG: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"
precision = 2

[[meters]]
name = "calls"
aggregation = "count"

[[meters]]
name = "peak"
aggregation = "max"

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = { limit = 1000, window = "month" }
calls = { limit = 100, window = "day" }
peak = { limit = 100, window = "day" }
"#;

fn used(body: &Value, meter: &str) -> Value {
    body["meters"].as_array().and_then(|m| m.iter().find(|r| r["meter"] == meter)).map(|r| r["used"].clone()).unwrap_or(Value::Null)
}

async fn usage(c: &Client, customer: &str, meter: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    used(&r.body, meter)
}

/// The day's total of `/v1/usage` for `meter` and `customer`, as text.
async fn history(c: &Client, customer: &str, meter: &str) -> f64 {
    let from = common::rfc3339((now_ms() - DAY).div_euclid(DAY) * DAY);
    let to = common::rfc3339((now_ms() + DAY).div_euclid(DAY) * DAY);
    let r = c.get(&format!("/v1/usage?meter={meter}&customer={customer}&from={from}&to={to}&granularity=day")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().expect("data").iter().filter(|p| p["customer"] == customer).filter_map(|p| p["value"].as_f64()).sum()
}

fn adjustment(id: &str, customer: &str, meter: &str, quantity: Value, reason: &str) -> Value {
    json!({"id": id, "customer": customer, "meter": meter, "quantity": quantity, "timestamp": now_ms(), "reason": reason})
}

fn store_sum(dir: &std::path::Path, customer: &str, meter: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("meterd.sqlite")).expect("open the store");
    conn.query_row("SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer = ?1 AND meter = ?2", [customer, meter], |r| r.get(0))
        .expect("sum(value)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decrease_lowers_counters_history_and_the_store_exactly() {
    away_from_day_boundary().await;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    let r = c.events(&json!([common::event("a1", "minutes", 30), common::event("a1", "minutes", 0.25)])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = c.post_json("/v1/adjustments", &adjustment("adj-1", "a1", "minutes", json!(-12.5), "call dropped on our side")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body["quantity"], json!(-12.5), "{}", r.text);
    assert_eq!(r.body["duplicate"], json!(false), "{}", r.text);
    assert_eq!(usage(&c, "a1", "minutes").await, json!(17.75));
    let r = c.check(&json!({"customer": "a1", "meter": "minutes", "quantity": 982.25})).await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    let r = c.check(&json!({"customer": "a1", "meter": "minutes", "quantity": 982.26})).await;
    assert_eq!(r.body["allowed"], json!(false), "{}", r.text);
    assert_eq!(history(&c, "a1", "minutes").await, 17.75);
    // An increase too, and a count meter.
    let r = c.post_json("/v1/adjustments", &adjustment("adj-2", "a1", "minutes", json!(0.5), "under-reported")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    for _ in 0..3 {
        assert_eq!(c.events(&common::event("a1", "calls", 1)).await.status, 202);
    }
    let r = c.post_json("/v1/adjustments", &adjustment("adj-3", "a1", "calls", json!(-2), "double-charged job")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(usage(&c, "a1", "calls").await, json!(1));

    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    // Exact in the store: 30 + 0.25 - 12.5 + 0.5 in hundredths; the adjustment is its own (negative) row.
    assert_eq!(store_sum(&server.data_dir(), "a1", "minutes"), 1825);
    assert_eq!(store_sum(&server.data_dir(), "a1", "calls"), 1);
    let conn = rusqlite::Connection::open(server.data_dir().join("meterd.sqlite")).expect("open");
    let negative: i64 = conn
        .query_row("SELECT count(*) FROM usage_minute WHERE customer = 'a1' AND meter = 'minutes' AND value = -1250", [], |r| r.get(0))
        .expect("rows");
    assert_eq!(negative, 1);
    assert_eq!(history(&c, "a1", "minutes").await, 18.25);

    let r = c.get("/v1/adjustments?customer=a1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ids: Vec<&str> = r.body["adjustments"].as_array().expect("list").iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(ids, ["adj-1", "adj-2", "adj-3"]);
    assert_eq!(r.body["adjustments"][0]["reason"], json!("call dropped on our side"));
    let r = c.get("/v1/adjustments?customer=a1&meter=calls&limit=5").await;
    assert_eq!(r.body["adjustments"].as_array().map(Vec::len), Some(1), "{}", r.text);
    let r = c.get("/v1/adjustments?customer=a1&limit=2").await;
    assert_eq!(r.body["adjustments"].as_array().map(Vec::len), Some(2), "{}", r.text);

    // The restart rebuilds the window from the store, negative row included.
    let server = server.restart().await;
    let c = server.client();
    assert_eq!(usage(&c, "a1", "minutes").await, json!(18.25));
    assert_eq!(usage(&c, "a1", "calls").await, json!(1));
    let r = c.get("/v1/adjustments?customer=a1").await;
    assert_eq!(r.body["adjustments"].as_array().map(Vec::len), Some(3), "{}", r.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_zero_is_refused_and_changes_nothing() {
    away_from_day_boundary().await;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    assert_eq!(c.events(&common::event("b1", "minutes", 10)).await.status, 202);
    let r = c.post_json("/v1/adjustments", &adjustment("adj-b", "b1", "minutes", json!(-10.01), "too much")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["details"][0]["field"], json!("quantity"), "{}", r.text);
    assert_eq!(usage(&c, "b1", "minutes").await, json!(10));
    let r = c.get("/v1/adjustments?customer=b1").await;
    assert_eq!(r.body["adjustments"], json!([]), "{}", r.text);
    // A customer with no usage at all.
    let r = c.post_json("/v1/adjustments", &adjustment("adj-n", "nobody", "minutes", json!(-1), "x")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // The refused id was not used: the same id applies once valid; down to exactly zero is fine.
    let r = c.post_json("/v1/adjustments", &adjustment("adj-b", "b1", "minutes", json!(-10), "all of it")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(usage(&c, "b1", "minutes").await, json!(0));
    meterd::flush::flush_all(&server.app().engine).await.expect("flush");
    assert_eq!(store_sum(&server.data_dir(), "b1", "minutes"), 0);
    let metrics = c.get("/metrics").await.text;
    let count = |result: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(&format!("meterd_adjustments_total{{result=\"{result}\"}} "))).map(str::to_owned)
    };
    assert_eq!(count("below_zero").as_deref(), Some("2"), "{metrics}");
    // Only this test is refused (the recorder is shared by the tests of this file); the others are registered.
    assert!(count("applied").is_some() && count("conflict").is_some(), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_applied_once() {
    away_from_day_boundary().await;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    assert_eq!(c.events(&common::event("i1", "minutes", 50)).await.status, 202);
    let body = adjustment("adj-i", "i1", "minutes", json!(-5), "refund");
    // Racing repeats: exactly one applies.
    let sends: Vec<_> = (0..8)
        .map(|_| {
            let (c, body) = (c.clone(), body.clone());
            tokio::spawn(async move { c.post_json("/v1/adjustments", &body).await })
        })
        .collect();
    let mut fresh = 0;
    for s in sends {
        let r = s.await.expect("task");
        assert_eq!(r.status, 202, "{}", r.text);
        assert_eq!(r.body["quantity"], json!(-5));
        if r.body["duplicate"] == json!(false) {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    // The same id with another body is a conflict; without a timestamp a repeat is the same.
    let mut changed = body.clone();
    changed["quantity"] = json!(-6);
    let r = c.post_json("/v1/adjustments", &changed).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.code(), "conflict");
    let mut untimed = body.clone();
    untimed.as_object_mut().expect("object").remove("timestamp");
    let r = c.post_json("/v1/adjustments", &untimed).await;
    assert_eq!(r.body["duplicate"], json!(true), "{}", r.text);
    assert_eq!(usage(&c, "i1", "minutes").await, json!(45));
    // The id space is the events': an event id cannot be reused for an adjustment, nor the reverse.
    let event_id = uid("e");
    let r = c.events(&json!({"id": event_id, "customer": "i1", "meter": "minutes", "quantity": 1})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = c.post_json("/v1/adjustments", &adjustment(&event_id, "i1", "minutes", json!(-1), "x")).await;
    assert_eq!(r.status, 409, "{}", r.text);
    let r = c.events(&json!({"id": "adj-i", "customer": "i1", "meter": "minutes", "quantity": 7})).await;
    assert_eq!(r.body, json!({"accepted": 0, "duplicates": 1}), "{}", r.text);
    assert_eq!(usage(&c, "i1", "minutes").await, json!(46));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_adjustments_name_the_field() {
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    let cases = [
        (json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": -1}), "reason"),
        (json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": -1, "reason": ""}), "reason"),
        (json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": -1, "reason": "r".repeat(257)}), "reason"),
        (json!({"id": "x", "customer": "c", "meter": "peak", "quantity": -1, "reason": "r"}), "meter"),
        (json!({"id": "x", "customer": "c", "meter": "nope", "quantity": -1, "reason": "r"}), "meter"),
        (json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": -1.001, "reason": "r"}), "quantity"),
        (json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": "1", "reason": "r"}), "quantity"),
        (json!({"id": "x", "customer": "c", "meter": "calls", "quantity": 1.5, "reason": "r"}), "quantity"),
        (json!({"customer": "c", "meter": "minutes", "quantity": 1, "reason": "r"}), "id"),
        (json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": 1, "reason": "r", "timestamp": now_ms() + DAY}), "timestamp"),
    ];
    for (body, field) in cases {
        let r = c.post_json("/v1/adjustments", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.body["error"]["details"][0]["field"], json!(field), "{body}: {}", r.text);
    }
    let r = c
        .post_json("/v1/adjustments", &json!({"id": "x", "customer": "c", "meter": "minutes", "quantity": 1, "reason": "r", "extra": 1}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(c.get("/v1/adjustments").await.status, 400);
    assert_eq!(c.get("/v1/adjustments?customer=c&limit=0").await.status, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adjustment_survives_sigkill() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let config = format!(
        "[server]\nlisten = \"{addr}\"\n[storage]\ndata_dir = \"{}\"\ndurability = \"fsync\"\n{CONFIG}",
        dir.path().join("data").display()
    );
    let path = dir.path().join("meterd.toml");
    std::fs::write(&path, config).expect("config");
    let mut p = spawn(&path, dir.path().join("log1"));
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: None };
    assert_eq!(c.events(&common::event("k1", "minutes", 20)).await.status, 202);
    let body = adjustment("adj-k", "k1", "minutes", json!(-7.5), "killed");
    let r = c.post_json("/v1/adjustments", &body).await;
    assert_eq!(r.status, 202, "{}", r.text);
    p.child.kill().expect("SIGKILL");
    p.wait_exit(Duration::from_secs(10)).await;
    let mut p = spawn(&path, dir.path().join("log2"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(usage(&c, "k1", "minutes").await, json!(12.5));
    let r = c.get("/v1/adjustments?customer=k1").await;
    assert_eq!(r.body["adjustments"][0]["id"], json!("adj-k"), "{}", r.text);
    // The id is still taken after the replay.
    let r = c.post_json("/v1/adjustments", &body).await;
    assert_eq!(r.body["duplicate"], json!(true), "{}", r.text);
    assert_eq!(usage(&c, "k1", "minutes").await, json!(12.5));
    p.sigterm();
    p.wait_exit(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posting_needs_admin_and_listing_needs_read() {
    use sha2::Digest;
    let key = |name: &str, secret: &str, scopes: &str| {
        format!(
            "\n[[auth.keys]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\nscopes = {scopes}\n",
            hex::encode(sha2::Sha256::digest(secret.as_bytes()))
        )
    };
    let config = format!(
        "{CONFIG}{}{}{}",
        key("admin", "adm-key-1234", "[\"admin\"]"),
        key("reader", "read-key-1234", "[\"read\"]"),
        key("ingest", "ing-key-1234", "[\"ingest\"]")
    );
    let server = TestServer::start(&config).await;
    let c = server.client();
    let (admin, reader, ingest) = (c.with_token("adm-key-1234"), c.with_token("read-key-1234"), c.with_token("ing-key-1234"));
    assert_eq!(ingest.events(&common::event("s1", "minutes", 5)).await.status, 202);
    let body = adjustment("adj-s", "s1", "minutes", json!(-1), "r");
    for who in [&reader, &ingest] {
        assert_eq!(who.post_json("/v1/adjustments", &body).await.status, 403);
    }
    assert_eq!(c.post_json("/v1/adjustments", &body).await.status, 401);
    assert_eq!(admin.post_json("/v1/adjustments", &body).await.status, 202);
    assert_eq!(ingest.get("/v1/adjustments?customer=s1").await.status, 403);
    let r = reader.get("/v1/adjustments?customer=s1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["adjustments"][0]["id"], json!("adj-s"));
    server.stop().await;
}

/// Stops `server`, runs `sql` on its audit list, starts it again on the same data dir.
async fn with_audit_edited(mut server: TestServer, sql: &str) -> TestServer {
    if let Some(app) = server.app.take() {
        app.shutdown().await.expect("clean shutdown");
    }
    let conn = rusqlite::Connection::open(server.dir.path().join("adjustments.sqlite")).expect("open the audit list");
    conn.execute_batch(sql).expect("edit the audit list");
    drop(conn);
    let config = server.config.clone();
    TestServer::start_in(&config, server.dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_completes_an_adjustment_left_pending() {
    away_from_day_boundary().await;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    assert_eq!(c.events(&common::event("r1", "minutes", 20)).await.status, 202);
    // Stopped after the WAL write, before the row was marked applied.
    let reached = adjustment("adj-reached", "r1", "minutes", json!(-3), "r");
    assert_eq!(c.post_json("/v1/adjustments", &reached).await.status, 202);
    // Stopped after the pending row, before the WAL write.
    let ts = now_ms();
    let server = with_audit_edited(
        server,
        &format!(
            "UPDATE adjustments SET applied = 0 WHERE id = 'adj-reached';
             INSERT INTO adjustments (id, customer, meter, raw, precision, ts, reason, created_ms, applied)
             VALUES ('adj-lost', 'r1', 'minutes', -400, 2, {ts}, 'r', {ts}, 0);"
        ),
    )
    .await;
    let c = server.client();
    assert_eq!(usage(&c, "r1", "minutes").await, json!(17));
    let r = c.get("/v1/adjustments?customer=r1").await;
    assert_eq!(r.body["adjustments"], json!([]), "pending rows are not listed: {}", r.text);
    let r = c.post_json("/v1/adjustments", &reached).await;
    assert_eq!((r.status.as_u16(), r.body["duplicate"].clone()), (202, json!(false)), "{}", r.text);
    assert_eq!(usage(&c, "r1", "minutes").await, json!(17), "the WAL already had it: not applied twice");
    let lost = json!({"id": "adj-lost", "customer": "r1", "meter": "minutes", "quantity": -4, "reason": "r"});
    let r = c.post_json("/v1/adjustments", &lost).await;
    assert_eq!((r.status.as_u16(), r.body["duplicate"].clone()), (202, json!(false)), "{}", r.text);
    assert_eq!(usage(&c, "r1", "minutes").await, json!(13), "applied now");
    let r = c.get("/v1/adjustments?customer=r1").await;
    assert_eq!(r.body["adjustments"].as_array().map(Vec::len), Some(2), "{}", r.text);
    let r = c.post_json("/v1/adjustments", &lost).await;
    assert_eq!(r.body["duplicate"], json!(true), "{}", r.text);
    assert_eq!(usage(&c, "r1", "minutes").await, json!(13));
    server.stop().await;
}
