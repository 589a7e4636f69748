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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_serves_only_operational_routes() {
    let config = format!("{INTERVIEW}\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let server = TestServer::start(&config).await;
    let addr = server.app().metrics_addr.expect("metrics listener bound");
    let ops = common::Client { addr, token: None };
    let r = ops.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("meterd_"), "{}", r.text);
    assert_eq!(ops.get("/healthz").await.status, 200);
    let r = ops.events(&json!({"id": uid("e"), "customer": "u", "meter": "interviews"})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.code(), "not_found");
    let r = ops.get("/v1/customers/u/usage").await;
    assert_eq!(r.status, 404);
    server.stop().await;
}
