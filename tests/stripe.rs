//! Stripe reporting against the in-process fake (tests/common/stripe_fake.rs):
//! the totals Stripe ends up with equal the stored totals exactly, whatever fails
//! on the way (injected 500s, 429s, answers lost after processing, slow answers,
//! expired v2 sessions, a SIGKILL of the real binary mid-report), in v1 and v2
//! modes; customers without a Stripe id are never reported; late usage becomes a
//! delta; a decrease is cancelled; periods Stripe no longer accepts are recorded
//! as failed; a bad key stops the reporter while ingest and checks go on.
//!
//! Periods are minutes with no grace, and events carry timestamps in past
//! minutes, so nothing waits for a period to close.

mod common;

use common::ports::free_port;
use common::process::{meterd_command, wait_healthy, Proc};
use common::require::{self, need};
use common::stripe_fake::{Fault, StripeFake};
use common::{now_ms, Client, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Once;
use std::time::{Duration, Instant};

const MINUTE: i64 = 60_000;
const GOOD_KEY: &str = "sk_test_fake_good_key_4242";
const BAD_KEY: &str = "sk_test_revoked_key_9999";
const GOOD_ENV: &str = "METERD_TEST_STRIPE_GOOD_KEY";
const BAD_ENV: &str = "METERD_TEST_STRIPE_BAD_KEY";

/// Sets the key variables once, before any server reads the environment.
fn keys() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var(GOOD_ENV, GOOD_KEY);
        std::env::set_var(BAD_ENV, BAD_KEY);
    });
}

/// A config reporting to `fake` every 100 ms, per minute, without grace.
fn config(fake: &StripeFake, mode: &str, key_env: &str, extra: &str) -> String {
    format!(
        r#"
[storage]
flush_interval = "100ms"
{extra}
[stripe]
api_key_env = "{key_env}"
api_base = "{base}"
meter_events_base = "{base}"
mode = "{mode}"
period = "minute"
grace = "0s"
interval = "100ms"
max_requests_per_second = 2000
request_timeout = "500ms"

[[meters]]
name = "tokens"
stripe_event_name = "tokens"

[[meters]]
name = "minutes"
precision = 2
stripe_event_name = "interview_minutes"

[[meters]]
name = "seats"
aggregation = "latest"
stripe_event_name = "seats"

[[meters]]
name = "api_calls"
aggregation = "count"

[[plans]]
name = "p"
default = true
[plans.limits]
tokens = {{ limit = "unlimited", window = "month" }}
minutes = {{ limit = "unlimited", window = "month" }}
seats = {{ limit = "unlimited", window = "month" }}
api_calls = {{ limit = "unlimited", window = "month" }}
"#,
        base = fake.base()
    )
}

/// Start of the minute `k` minutes before the current one.
fn minute_ago(k: i64) -> i64 {
    let now = now_ms();
    now - now.rem_euclid(MINUTE) - k * MINUTE
}

fn ev(id: &str, customer: &str, meter: &str, quantity: Value, ts: i64) -> Value {
    json!({"id": id, "customer": customer, "meter": meter, "quantity": quantity, "timestamp": ts})
}

async fn ingest(c: &Client, events: Vec<Value>) {
    let r = c.events(&Value::Array(events)).await;
    assert_eq!(r.status, 202, "{}", r.text);
}

async fn link(c: &Client, customer: &str, stripe_id: &str) {
    let r = common::put(c, customer, json!({"stripe_customer_id": stripe_id})).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

fn key(event_name: &str, customer: &str) -> (String, String) {
    (event_name.to_string(), customer.to_string())
}

/// Polls until `done` holds (at most 60 s; the caller asserts afterwards).
async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_totals(fake: &StripeFake, expected: &BTreeMap<(String, String), i64>) {
    wait_until(|| fake.totals() == *expected).await;
    let s = fake.lock();
    assert_eq!(s.totals(), *expected, "Stripe's totals; violations: {:?}", s.violations);
}

async fn status(c: &Client) -> Value {
    let r = c.get("/v1/stripe/status").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn meter_status<'a>(status: &'a Value, meter: &str) -> &'a Value {
    status["meters"].as_array().and_then(|m| m.iter().find(|m| m["meter"] == meter)).unwrap_or(&Value::Null)
}

/// Waits until the status shows `meter` with `stored` units and every Stripe
/// meter fully reported (a status from a run before the usage was stored would
/// also look settled: hence `stored`).
async fn wait_status_settled(c: &Client, meter: &str, stored: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(c).await;
        let settled = s["meters"].as_array().is_some_and(|ms| {
            !ms.is_empty()
                && ms.iter().all(|m| {
                    m["pending"] == 0
                        && m["stored"].as_i64() == Some(m["reported"].as_i64().unwrap_or(-1) + m["failed"].as_i64().unwrap_or(0))
                })
        });
        if (settled && meter_status(&s, meter)["stored"] == stored) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_totals_exact_after_faults_late_usage_and_a_decrease() {
    keys();
    // One base minute per test: events keep their minute whatever the clock does.
    let base = minute_ago(0);
    let fake = StripeFake::start(GOOD_KEY).await;
    // Each fault hits one request; the ambiguous ones (processed, answer lost or
    // late) make the retry meet Stripe's "already exists".
    fake.fault(&[
        Fault::Status(500),
        Fault::Status(429),
        Fault::CloseAfterProcessing,
        Fault::Slow(Duration::from_millis(1500)),
        Fault::Status(503),
        Fault::CloseAfterProcessing,
    ]);
    let server = TestServer::start(&config(&fake, "v1", GOOD_ENV, "")).await;
    let c = server.client();
    link(&c, "c1", "cus_1").await;
    link(&c, "c2", "cus_2").await;
    // c3 has no Stripe id: never reported.
    let mut events = Vec::new();
    let mut want_tokens_c1 = 0;
    for k in 2..=6 {
        let t = base - k * MINUTE + 1_000;
        events.push(ev(&format!("t1-{k}"), "c1", "tokens", json!(k * 10 + 1), t));
        want_tokens_c1 += k * 10 + 1;
        events.push(ev(&format!("t2-{k}"), "c2", "tokens", json!(7), t));
        events.push(ev(&format!("t3-{k}"), "c3", "tokens", json!(100), t));
        // 1.25 + 1.25 = 2.50 a minute: 2 whole units are billed per minute.
        events.push(ev(&format!("m1a-{k}"), "c1", "minutes", json!(1.25), t));
        events.push(ev(&format!("m1b-{k}"), "c1", "minutes", json!(1.25), t + 1));
        // 0.75 a minute: below one unit, nothing to send.
        events.push(ev(&format!("m2-{k}"), "c2", "minutes", json!(0.75), t));
        events.push(ev(&format!("a1-{k}"), "c1", "api_calls", json!(1), t));
    }
    ingest(&c, events).await;
    let mut expected =
        BTreeMap::from([(key("tokens", "cus_1"), want_tokens_c1), (key("tokens", "cus_2"), 35), (key("interview_minutes", "cus_1"), 10)]);
    wait_totals(&fake, &expected).await;
    {
        let s = fake.lock();
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        assert!(s.faults.is_empty(), "every fault was met");
        assert!(s.duplicates >= 1, "a resend after a lost answer met the duplicate answer");
        assert!(s.events.values().all(|e| e.customer == "cus_1" || e.customer == "cus_2"), "only customers with Stripe ids");
        assert!(s.events.values().all(|e| e.event_name != "api_calls"), "only meters with a Stripe event name");
    }

    // Late usage for a reported minute: a new delta with the next identifier.
    let late_minute = base - 3 * MINUTE;
    ingest(&c, vec![ev("late-1", "c1", "tokens", json!(5), late_minute + 30_000)]).await;
    *expected.entry(key("tokens", "cus_1")).or_insert(0) += 5;
    wait_totals(&fake, &expected).await;
    let deltas: Vec<i64> = fake
        .lock()
        .events
        .values()
        .filter(|e| e.customer == "cus_1" && e.event_name == "tokens" && e.timestamp_s == late_minute / 1000)
        .map(|e| e.value)
        .collect();
    assert_eq!(deltas.iter().sum::<i64>(), 31 + 5);
    assert_eq!(deltas.len(), 2, "the late usage went as its own event: {deltas:?}");

    // A gauge going down in a reported minute: cancelled and sent again.
    let g = base - 4 * MINUTE;
    ingest(&c, vec![ev("seat-1", "c1", "seats", json!(10), g + 1_000)]).await;
    expected.insert(key("seats", "cus_1"), 10);
    wait_totals(&fake, &expected).await;
    ingest(&c, vec![ev("seat-2", "c1", "seats", json!(4), g + 50_000)]).await;
    expected.insert(key("seats", "cus_1"), 4);
    wait_totals(&fake, &expected).await;
    assert_eq!(fake.lock().cancelled.len(), 1, "the first seats event was cancelled");

    // The status shows everything reported; c3's usage as unmapped.
    let s = wait_status_settled(&c, "tokens", want_tokens_c1 + 5 + 35).await;
    assert_eq!(s["state"], "reporting", "{s}");
    let tokens = meter_status(&s, "tokens");
    assert_eq!(tokens["stored"], want_tokens_c1 + 5 + 35, "{s}");
    assert_eq!(tokens["reported"], tokens["stored"], "{s}");
    assert_eq!(tokens["unmapped"], 500, "{s}");
    assert_eq!(tokens["oldest_pending_period"], Value::Null, "{s}");
    assert_eq!(meter_status(&s, "minutes")["reported"], 10, "{s}");
    assert_eq!(meter_status(&s, "seats")["reported"], 4, "{s}");
    assert!(!s.to_string().contains(GOOD_KEY));
    let metrics = c.get("/metrics").await.text;
    for name in [
        "meterd_stripe_events_sent_total",
        "meterd_stripe_duplicates_total",
        "meterd_stripe_events_cancelled_total",
        "meterd_stripe_lag_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_totals_exact_in_batches_of_100_across_session_expiry_and_faults() {
    keys();
    // One base minute per test: events keep their minute whatever the clock does.
    let base = minute_ago(0);
    let fake = StripeFake::start(GOOD_KEY).await;
    fake.lock().expire_sessions_after = Some(1);
    fake.fault(&[Fault::Status(500), Fault::CloseAfterProcessing, Fault::Status(429), Fault::Slow(Duration::from_millis(1500))]);
    let server = TestServer::start(&config(&fake, "v2", GOOD_ENV, "")).await;
    let c = server.client();
    link(&c, "c1", "cus_1").await;
    link(&c, "c2", "cus_2").await;
    let mut events = Vec::new();
    let (mut want1, mut want2) = (0, 0);
    for k in 2..=131 {
        let t = base - k * MINUTE + 500;
        events.push(ev(&format!("v2a-{k}"), "c1", "tokens", json!(k), t));
        events.push(ev(&format!("v2b-{k}"), "c2", "tokens", json!(1), t));
        events.push(ev(&format!("v2c-{k}"), "nobody", "tokens", json!(1000), t));
        want1 += k;
        want2 += 1;
    }
    ingest(&c, events).await;
    let expected = BTreeMap::from([(key("tokens", "cus_1"), want1), (key("tokens", "cus_2"), want2)]);
    wait_totals(&fake, &expected).await;
    {
        let s = fake.lock();
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        assert_eq!(s.events.len(), 260, "one event per customer and minute");
        assert_eq!(s.max_batch, 100, "batches are filled up to Stripe's cap and never above");
        assert!(s.stream_requests >= 3, "{} stream requests", s.stream_requests);
        assert!(s.sessions_opened >= 2, "a new session after expiry ({} opened)", s.sessions_opened);
    }
    let st = wait_status_settled(&c, "tokens", want1 + want2).await;
    assert_eq!(meter_status(&st, "tokens")["reported"], want1 + want2, "{st}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_stops_the_reporter_while_ingest_and_checks_go_on() {
    keys();
    // One base minute per test: events keep their minute whatever the clock does.
    let base = minute_ago(0);
    let fake = StripeFake::start(GOOD_KEY).await;
    let server = TestServer::start(&config(&fake, "v1", BAD_ENV, "")).await;
    let c = server.client();
    link(&c, "c1", "cus_1").await;
    ingest(&c, vec![ev("bk-1", "c1", "tokens", json!(3), base - 2 * MINUTE)]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = status(&c).await;
    while s["state"] != "stopped_unauthorized" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(&c).await;
    }
    assert_eq!(s["state"], "stopped_unauthorized", "{s}");
    assert!(s["last_error"].as_str().unwrap_or("").contains("401"), "{s}");
    assert!(!s.to_string().contains(BAD_KEY), "the key must not show: {s}");
    {
        let f = fake.lock();
        assert!(f.events.is_empty(), "nothing reported with a bad key");
        assert!(f.unauthorized >= 1);
        assert!(f.violations.is_empty(), "{:?}", f.violations);
    }
    // Ingest, checks and readiness are untouched.
    ingest(&c, vec![ev("bk-2", "c1", "tokens", json!(4), now_ms())]).await;
    let r = c.check(&json!({"customer": "c1", "meter": "tokens", "quantity": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Ready (the reporter is not needed to take events), and saying what stopped.
    let ready = c.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.body["status"], "degraded", "{}", ready.text);
    assert_eq!(ready.body["reason"], "background task stripe_reporter stopped: ended on its own", "{}", ready.text);
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.contains("meterd_stripe_unauthorized 1"), "the stop is visible in /metrics");
    assert!(metrics.contains(r#"meterd_task_running{task="stripe_reporter"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"meterd_task_running{task="flusher"} 1"#), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periods_older_than_stripe_accepts_are_recorded_failed_not_sent() {
    keys();
    // One base minute per test: events keep their minute whatever the clock does.
    let base = minute_ago(0);
    let fake = StripeFake::start(GOOD_KEY).await;
    let server = TestServer::start(&config(&fake, "v1", GOOD_ENV, "[ingest]\nmax_lateness = \"40d\"")).await;
    let c = server.client();
    link(&c, "c1", "cus_1").await;
    let old = base - 36 * 24 * 60 * MINUTE;
    ingest(
        &c,
        vec![ev("old-1", "c1", "tokens", json!(9), old + 1_000), ev("new-1", "c1", "tokens", json!(3), (base - 2 * MINUTE) + 1_000)],
    )
    .await;
    wait_totals(&fake, &BTreeMap::from([(key("tokens", "cus_1"), 3)])).await;
    let s = wait_status_settled(&c, "tokens", 12).await;
    let tokens = meter_status(&s, "tokens");
    assert_eq!((tokens["failed"].as_i64(), tokens["reported"].as_i64(), tokens["pending"].as_i64()), (Some(9), Some(3), Some(0)), "{s}");
    assert!(fake.lock().violations.is_empty(), "nothing outside Stripe's window was sent: {:?}", fake.lock().violations);
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.contains("meterd_stripe_events_failed_total{reason=\"too_old\"}"), "alerted through a metric");
    server.stop().await;
}

/// Spawns the real binary with the Stripe key in its environment.
fn spawn_meterd(dir: &std::path::Path, config_text: &str, port: u16, tag: &str) -> Proc {
    let text = common::with_dirs(config_text, &dir.join("data")).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = dir.join("meterd.toml");
    std::fs::write(&path, text).expect("write config");
    let log = dir.join(format!("meterd-{tag}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child =
        meterd_command(&path).env(GOOD_ENV, GOOD_KEY).stdout(Stdio::from(out)).stderr(Stdio::from(err)).spawn().expect("spawn meterd");
    Proc { child, log }
}

/// SIGKILLs the real binary while it reports, restarts it, and checks Stripe's
/// totals: nothing lost, nothing twice.
async fn sigkill_mid_report(mode: &str) {
    keys();
    // One base minute per test: events keep their minute whatever the clock does.
    let base = minute_ago(0);
    let fake = StripeFake::start(GOOD_KEY).await;
    // Once `threshold` events are in, Stripe holds every answer: the kill lands
    // after Stripe took a request and before meterd heard back (so before its
    // ledger row was written).
    let threshold = if mode == "v1" { 40 } else { 100 };
    fake.lock().hold_from_events = Some(threshold);
    fake.fault(&[Fault::CloseAfterProcessing]);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let text = config(&fake, mode, GOOD_ENV, "");
    let mut p = spawn_meterd(dir.path(), &text, port, "1");
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: None };
    link(&c, "c1", "cus_1").await;
    link(&c, "c2", "cus_2").await;
    let mut events = Vec::new();
    let mut want = BTreeMap::new();
    for k in 2..=151 {
        let t = base - k * MINUTE + 2_000;
        for (customer, sid, q) in [("c1", "cus_1", k), ("c2", "cus_2", 2)] {
            events.push(ev(&format!("k-{customer}-{k}"), customer, "tokens", json!(q), t));
            *want.entry(key("tokens", sid)).or_insert(0) += q;
        }
    }
    ingest(&c, events).await;
    wait_until(|| fake.lock().held >= 1).await;
    let before = fake.lock().events.len();
    assert!(fake.lock().held >= 1 && before < 300, "the kill must land mid-report ({before} of 300 events at Stripe)");
    let _ = p.child.kill();
    let _ = p.child.wait();

    fake.lock().hold_from_events = None;
    let mut p = spawn_meterd(dir.path(), &text, port, "2");
    wait_healthy(&mut p, addr).await;
    wait_totals(&fake, &want).await;
    {
        let s = fake.lock();
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        assert_eq!(s.events.len(), 300, "each customer-minute once");
        assert!(s.duplicates >= 1, "the restarted reporter resent what was in flight at the kill, and Stripe knew it");
    }
    let st = wait_status_settled(&c, "tokens", want.values().sum::<i64>()).await;
    assert_eq!(meter_status(&st, "tokens")["reported"], want.values().sum::<i64>(), "{st}");
    p.sigterm();
    p.wait_exit(Duration::from_secs(20)).await;
    let logs = std::fs::read_to_string(dir.path().join("meterd-1.log")).unwrap_or_default() + &p.log();
    assert!(logs.contains("Stripe reporting enabled"), "{logs}");
    assert!(!logs.contains(GOOD_KEY), "the key must never be logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_sigkill_mid_report_totals_exact_after_restart() {
    sigkill_mid_report("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_sigkill_mid_report_totals_exact_after_restart() {
    sigkill_mid_report("v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_needs_the_admin_scope_and_says_when_reporting_is_off() {
    keys();
    let fake = StripeFake::start(GOOD_KEY).await;
    let auth = format!(
        "[[auth.keys]]\nname = \"admin\"\nkey_sha256 = \"{}\"\nscopes = [\"admin\"]\n[[auth.keys]]\nname = \"reader\"\nkey_sha256 = \"{}\"\nscopes = [\"read\", \"ingest\", \"check\"]\n",
        hex::encode(meterd::config::sha256_of(b"admin-secret")),
        hex::encode(meterd::config::sha256_of(b"reader-secret")),
    );
    let server = TestServer::start(&format!("{}{auth}", config(&fake, "v1", GOOD_ENV, ""))).await;
    let c = server.client();
    assert_eq!(c.get("/v1/stripe/status").await.status, 401);
    assert_eq!(c.with_token("reader-secret").get("/v1/stripe/status").await.status, 403);
    let r = c.with_token("admin-secret").get("/v1/stripe/status").await;
    assert_eq!((r.status.as_u16(), r.body["enabled"].clone(), r.body["mode"].clone()), (200, json!(true), json!("v1")), "{}", r.text);
    server.stop().await;

    let plain = "[[meters]]\nname = \"tokens\"\n[[plans]]\nname = \"p\"\ndefault = true\n";
    let server = TestServer::start(plain).await;
    assert_eq!(status(&server.client()).await, json!({"enabled": false}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_between_a_lost_answer_and_the_resend_is_not_lost() {
    keys();
    // One base minute per test: events keep their minute whatever the clock does.
    let base = minute_ago(0);
    let fake = StripeFake::start(GOOD_KEY).await;
    // Stripe takes the first event but the answer is lost, and the next four
    // attempts fail: the run gives up with the outcome unknown.
    fake.fault(&[Fault::CloseAfterProcessing, Fault::Status(500), Fault::Status(500), Fault::Status(500), Fault::Status(500)]);
    let server = TestServer::start(&config(&fake, "v1", GOOD_ENV, "")).await;
    let c = server.client();
    link(&c, "c1", "cus_1").await;
    let t = base - 3 * MINUTE;
    ingest(&c, vec![ev("lost-1", "c1", "tokens", json!(10), t + 1_000)]).await;
    wait_until(|| fake.lock().events.len() == 1).await;
    // Late usage for the same minute arrives before the resend.
    ingest(&c, vec![ev("lost-2", "c1", "tokens", json!(4), t + 2_000)]).await;
    wait_totals(&fake, &BTreeMap::from([(key("tokens", "cus_1"), 14)])).await;
    let values: Vec<i64> = fake.lock().events.values().map(|e| e.value).collect();
    assert_eq!(values.len(), 2, "the lost event was resent as it was, the late usage went as its own delta: {values:?}");
    assert!(fake.lock().duplicates >= 1, "the resend met Stripe's duplicate answer");
    let s = wait_status_settled(&c, "tokens", 14).await;
    assert_eq!(meter_status(&s, "tokens")["reported"], 14, "{s}");
    server.stop().await;
}

/// Two instances sharing Redis (the lease) and ClickHouse (the stored totals):
/// exactly one reports, Stripe never sees an identifier twice, the totals are
/// exact; when the reporter stops, the other takes over and reports what came
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_one_reporter_and_a_takeover() {
    keys();
    let redis = need!(common::redis_server::RedisServer::start(false).await);
    let ch_url = need!(require::clickhouse_url());
    let db = common::ch::unique_db();
    let fake = StripeFake::start(GOOD_KEY).await;
    let extra = |instance: &str| {
        format!(
            "[server]\ninstance_id = \"{instance}\"\n[redis]\nurl = \"{}\"\nsync_interval = \"50ms\"\n\
             [clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{db}\"\nflush_interval = \"100ms\"\n",
            redis.url()
        )
    };
    let a = TestServer::start(&config(&fake, "v1", GOOD_ENV, &extra("a"))).await;
    let b = TestServer::start(&config(&fake, "v1", GOOD_ENV, &extra("b"))).await;
    let base = minute_ago(1);
    link(&a.client(), "two-1", "cus_two_1").await;
    link(&b.client(), "two-2", "cus_two_2").await;
    ingest(&a.client(), (0..10).map(|i| ev(&format!("a{i}"), "two-1", "tokens", json!(3), base + i)).collect()).await;
    ingest(&b.client(), (0..10).map(|i| ev(&format!("b{i}"), "two-1", "tokens", json!(2), base + i)).collect()).await;
    ingest(&b.client(), (0..5).map(|i| ev(&format!("c{i}"), "two-2", "tokens", json!(7), base + i)).collect()).await;
    let expected = BTreeMap::from([(key("tokens", "cus_two_1"), 50), (key("tokens", "cus_two_2"), 35)]);
    wait_totals(&fake, &expected).await;
    let states = [status(&a.client()).await["state"].clone(), status(&b.client()).await["state"].clone()];
    let reporting: Vec<usize> = (0..2).filter(|&i| states[i] == json!("reporting")).collect();
    assert_eq!(reporting.len(), 1, "exactly one reporter: {states:?}");
    assert!(states.contains(&json!("standby")), "{states:?}");
    assert_eq!(fake.lock().duplicates, 0, "no identifier was sent twice");

    // The reporter stops (releasing the lease); the other takes over.
    let (leader, other) = if reporting[0] == 0 { (a, b) } else { (b, a) };
    leader.stop().await;
    // Late usage for the reported minute: a delta, sent by the new reporter.
    ingest(&other.client(), (0..4).map(|i| ev(&format!("d{i}"), "two-2", "tokens", json!(5), base + 20 + i)).collect()).await;
    let expected = BTreeMap::from([(key("tokens", "cus_two_1"), 50), (key("tokens", "cus_two_2"), 55)]);
    wait_totals(&fake, &expected).await;
    assert_eq!(status(&other.client()).await["state"], json!("reporting"));
    let _ = common::ch::query(&ch_url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

/// `max_requests_per_second` holds: 12 events (12 v1 requests) at 5/s cannot
/// all go out within a second: after the burst of 5, one every 200 ms. (A
/// slower machine only spreads them more; this can only fail if the limiter
/// lets requests through faster.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_under_max_requests_per_second() {
    keys();
    let fake = StripeFake::start(GOOD_KEY).await;
    let text = config(&fake, "v1", GOOD_ENV, "").replace("max_requests_per_second = 2000", "max_requests_per_second = 5");
    let server = TestServer::start(&text).await;
    let base = minute_ago(1);
    let mut expected = BTreeMap::new();
    for i in 0..12 {
        let customer = format!("rate-{i}");
        link(&server.client(), &customer, &format!("cus_rate_{i}")).await;
        ingest(&server.client(), vec![ev(&format!("r{i}"), &customer, "tokens", json!(1), base + i)]).await;
        expected.insert(key("tokens", &format!("cus_rate_{i}")), 1);
    }
    wait_totals(&fake, &expected).await;
    let s = fake.lock();
    let times = &s.request_times;
    assert!(times.len() >= 12, "{} requests", times.len());
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|u| u.duration_since(*t) < Duration::from_secs(1)).count();
        assert!(in_window <= 10, "{in_window} requests within one second (limit 5/s, burst 5)");
    }
    let span = times[times.len() - 1].duration_since(times[0]);
    assert!(span >= Duration::from_millis(1200), "12 requests at 5/s took only {span:?}");
}
