//! The credit totals in `/metrics` (issue 18): granted and spent per meter, no
//! customer label. Alone in its binary: the metrics recorder is process-wide.

mod common;

use common::*;
use serde_json::json;

const CONFIG: &str = include_str!("../config/examples/interview-credits.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_and_spent_totals_per_meter() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let before = c.get("/metrics").await.text;
    assert!(before.contains("meterd_credits_granted_units{meter=\"ai_tokens\"} 0"), "registered at zero: {before}");
    for (customer, amount) in [("m1", 5000), ("m2", 700)] {
        let r = c.post_json(&format!("/v1/customers/{customer}/grants"), &json!({"id": "g", "meter": "ai_tokens", "amount": amount})).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    ingest(&c, json!([event("m1", "ai_tokens", 1200), event("m2", "ai_tokens", 800)])).await;
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.contains("meterd_credits_granted_units{meter=\"ai_tokens\"} 5700"), "{metrics}");
    assert!(metrics.contains("meterd_credits_spent_units{meter=\"ai_tokens\"} 2000"), "{metrics}");
    assert!(!metrics.lines().any(|l| l.starts_with("meterd_credits") && l.contains("m1")), "no customer label");
    s.stop().await;
}
