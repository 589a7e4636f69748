//! The harness itself works: start, ingest, check, restart keeps totals.

mod common;

use common::{uid, TestServer, INTERVIEW};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_totals() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let r = c
        .events(&json!({"id": uid("e"), "customer": "u_1", "meter": "interview_minutes", "quantity": 12.5}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 0}));
    let server = server.restart().await;
    let r = server.client().get("/v1/customers/u_1/usage").await;
    assert_eq!(r.body["meters"][0]["used"], json!(12.5), "{}", r.text);
    server.stop().await;
}
