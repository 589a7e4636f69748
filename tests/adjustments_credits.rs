//! Adjustments (issue 19) on a credits meter (issue 18): taking usage back
//! gives the credits back to the balance, never beyond what was granted.

mod common;

use common::*;
use serde_json::{json, Value};

const CONFIG: &str = include_str!("../config/examples/interview-credits.toml");

async fn balance(c: &Client, customer: &str, meter: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/balances")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["balances"].as_array().and_then(|b| b.iter().find(|x| x["meter"] == meter).cloned()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_adjustment_gives_credits_back() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let r = c.post_json("/v1/customers/k1/grants", &json!({"id": "pack-1", "meter": "interviews", "amount": 5})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    for i in 0..3 {
        let r = c.check(&json!({"customer": "k1", "meter": "interviews", "quantity": 1, "consume": true, "id": format!("k1-{i}")})).await;
        assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    }
    assert_eq!(balance(&c, "k1", "interviews").await["balance"], 2);
    let adj = json!({"id": "k1-adj", "customer": "k1", "meter": "interviews", "quantity": -2, "reason": "interviews failed on our side"});
    let r = c.post_json("/v1/adjustments", &adj).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let b = balance(&c, "k1", "interviews").await;
    assert_eq!((b["balance"].clone(), b["used"].clone()), (json!(4), json!(1)), "{b}");
    // No limit window on a credits meter: the month's usage (1 left) bounds a decrease.
    let r = c
        .post_json("/v1/adjustments", &json!({"id": "k1-adj2", "customer": "k1", "meter": "interviews", "quantity": -2, "reason": "x"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(balance(&c, "k1", "interviews").await["balance"], 4);
    // The balance survives a restart (the usage store's minutes replay the ledger).
    let s = s.restart().await;
    let b = balance(&s.client(), "k1", "interviews").await;
    assert_eq!((b["balance"].clone(), b["used"].clone()), (json!(4), json!(1)), "{b}");
    s.stop().await;
}
