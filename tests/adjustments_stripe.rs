//! Adjustments (issue 19) reach Stripe through the reporter's decrease path:
//! a negative adjustment in a reported period lowers the stored total, the
//! period's events are cancelled (they are within Stripe's 24 h) and the new
//! total is sent, so Stripe's total ends equal to the corrected usage. Against
//! the in-process fake (tests/common/stripe_fake.rs); periods are minutes
//! without grace, in the past, so nothing waits for a period to close.

mod common;

use common::stripe_fake::StripeFake;
use common::{now_ms, Client, TestServer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const MINUTE: i64 = 60_000;
const KEY: &str = "sk_test_fake_adjust_key_4242";
const KEY_ENV: &str = "METERD_TEST_STRIPE_ADJUST_KEY";

fn config(fake: &StripeFake) -> String {
    format!(
        r#"
[storage]
flush_interval = "100ms"

[stripe]
api_key_env = "{KEY_ENV}"
api_base = "{base}"
meter_events_base = "{base}"
mode = "v1"
period = "minute"
grace = "0s"
interval = "100ms"
max_requests_per_second = 2000
request_timeout = "500ms"

[[meters]]
name = "minutes"
precision = 2
stripe_event_name = "interview_minutes"

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = {{ limit = "unlimited", window = "month" }}
"#,
        base = fake.base()
    )
}

async fn wait_totals(fake: &StripeFake, expected: &BTreeMap<(String, String), i64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while fake.totals() != *expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = fake.lock();
    assert_eq!(s.totals(), *expected, "Stripe's totals; violations: {:?}", s.violations);
}

async fn post(c: &Client, path: &str, body: Value) {
    let r = c.post_json(path, &body).await;
    assert_eq!(r.status, 202, "{path}: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_adjustment_is_cancelled_and_resent_to_stripe() {
    std::env::set_var(KEY_ENV, KEY);
    let now = now_ms();
    let minute = now - now.rem_euclid(MINUTE) - 3 * MINUTE;
    let fake = StripeFake::start(KEY).await;
    let server = TestServer::start(&config(&fake)).await;
    let c = server.client();
    let r = common::put(&c, "s1", json!({"stripe_customer_id": "cus_s1"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    post(&c, "/v1/events", json!({"id": "s-e1", "customer": "s1", "meter": "minutes", "quantity": 30.5, "timestamp": minute + 1_000}))
        .await;
    let mut expected = BTreeMap::from([(("interview_minutes".to_string(), "cus_s1".to_string()), 30)]);
    wait_totals(&fake, &expected).await;
    assert!(fake.lock().cancelled.is_empty());

    // 30.5 - 12.25 = 18.25: Stripe bills 18 whole units for the minute.
    let adjustment = json!({"id": "s-adj", "customer": "s1", "meter": "minutes", "quantity": -12.25,
                            "timestamp": minute + 30_000, "reason": "call dropped on our side"});
    post(&c, "/v1/adjustments", adjustment).await;
    expected.insert(("interview_minutes".to_string(), "cus_s1".to_string()), 18);
    wait_totals(&fake, &expected).await;
    {
        let s = fake.lock();
        assert_eq!(s.cancelled.len(), 1, "the minute's first event was cancelled");
        assert!(s.violations.is_empty(), "{:?}", s.violations);
    }
    // An increase is a plain delta.
    post(
        &c,
        "/v1/adjustments",
        json!({"id": "s-adj2", "customer": "s1", "meter": "minutes", "quantity": 2,
                                         "timestamp": minute + 40_000, "reason": "under-reported"}),
    )
    .await;
    expected.insert(("interview_minutes".to_string(), "cus_s1".to_string()), 20);
    wait_totals(&fake, &expected).await;
    assert_eq!(fake.lock().cancelled.len(), 1);
    server.stop().await;
}
