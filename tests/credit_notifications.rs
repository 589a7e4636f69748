//! Credit alerts as notifications (issues 17 + 18): a balance falling to its
//! `low_balance` sends `credits.low`, to zero `credits.depleted`, each once,
//! signed like every webhook; a top-up re-arms both and the next fall is a new
//! notification with a new `webhook-id`.

mod common;
mod notifications_support;

use common::{uid, Client, TestServer};
use notifications_support::{notifications, Delivery, Receiver};
use serde_json::{json, Value};
use std::time::Duration;

const METERS: &str = r#"
[[meters]]
name = "interviews"
aggregation = "count"

[[plans]]
name = "credits"
default = true
[plans.limits]
interviews = { limit = "credits", low_balance = 2 }
"#;

async fn grant(c: &Client, customer: &str, id: &str, amount: i64) {
    let r = c.post_json(&format!("/v1/customers/{customer}/grants"), &json!({"id": id, "meter": "interviews", "amount": amount})).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

async fn consume(c: &Client, customer: &str, n: usize) {
    for _ in 0..n {
        let r = c.check(&json!({"customer": customer, "meter": "interviews", "quantity": 1, "consume": true, "id": uid("iv")})).await;
        assert_eq!((r.status.as_u16(), &r.body["allowed"]), (200, &json!(true)), "{}", r.text);
    }
}

fn credit_alerts(d: &[Delivery], customer: &str) -> Vec<(String, Value)> {
    d.iter()
        .filter(|d| d.body["data"]["customer"] == customer && d.body["type"].as_str().is_some_and(|t| t.starts_with("credits.")))
        .map(|d| (d.body["type"].as_str().unwrap_or_default().to_string(), d.body["data"]["balance"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_and_depleted_fire_once_per_fall_and_a_top_up_rearms_them() {
    let rx = Receiver::start().await;
    let s = TestServer::start(&format!("{}{METERS}", notifications(&rx.url(), "METERD_TEST_WH_CREDITS", ""))).await;
    let c = s.client();
    let cust = uid("buyer");
    grant(&c, &cust, "first", 5).await;

    consume(&c, &cust, 2).await; // 5 → 3: above low_balance
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(credit_alerts(&rx.all(), &cust).is_empty(), "3 is above low_balance 2");
    consume(&c, &cust, 1).await; // → 2: low
    let got = rx.wait_for(Duration::from_secs(10), |d| credit_alerts(d, &cust).len() == 1).await;
    assert_eq!(credit_alerts(&got, &cust), [("credits.low".to_string(), json!(2))]);
    consume(&c, &cust, 2).await; // → 0: depleted (low already sent)
    let got = rx.wait_for(Duration::from_secs(10), |d| credit_alerts(d, &cust).len() == 2).await;
    assert_eq!(credit_alerts(&got, &cust)[1], ("credits.depleted".to_string(), json!(0)));
    let denied = c.check(&json!({"customer": cust, "meter": "interviews", "quantity": 1, "consume": true, "id": uid("iv")})).await;
    assert_eq!(denied.body["reason"], "insufficient_credits", "{}", denied.text);

    // A top-up lifts the balance above both levels: the next fall notifies again, as new notifications.
    grant(&c, &cust, "top-up", 5).await;
    consume(&c, &cust, 5).await; // 5 → 0: low and depleted in turn
    let got = rx.wait_for(Duration::from_secs(10), |d| credit_alerts(d, &cust).len() == 4).await;
    let kinds: Vec<String> = credit_alerts(&got, &cust).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["credits.low", "credits.depleted", "credits.low", "credits.depleted"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mine: Vec<Delivery> = rx.all().into_iter().filter(|d| d.body["data"]["customer"] == cust.as_str()).collect();
    assert_eq!(mine.len(), 4, "each fall once: {mine:?}");
    let ids: std::collections::HashSet<_> = mine.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids.len(), 4, "a new webhook-id per fall");
    assert!(mine.iter().all(|d| d.verified), "every signature verifies");
    assert_eq!(mine[0].body["data"]["low_balance"], json!(2));
    assert_eq!(mine[0].body["data"]["meter"], "interviews");

    let listed = c.get(&format!("/v1/notifications?customer={cust}")).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.body["notifications"].as_array().map(Vec::len), Some(4), "{}", listed.text);
    s.stop().await;
}
