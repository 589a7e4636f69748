//! A balance is grants minus acknowledged usage, exactly, after a SIGKILL
//! (issue 18): the real binary takes consumes and events against a grant, part
//! of them flushed to the store and part only in the WAL, and is killed before
//! the next flush. After the restart the balance is exact, and retried
//! consumes change nothing.

mod common;

use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::Client;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

const CONFIG: &str = r#"
[[meters]]
name = "ai_tokens"
aggregation = "sum"

[[plans]]
name = "credits"
default = true
[plans.limits]
ai_tokens = { limit = "credits" }
"#;

async fn balance(c: &Client) -> serde_json::Value {
    let r = c.get("/v1/customers/k1/balances").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["balances"][0].clone()
}

async fn consume(c: &Client, id: &str, q: i64) -> serde_json::Value {
    let r = c.check(&json!({"customer": "k1", "meter": "ai_tokens", "quantity": q, "consume": true, "id": id})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_consume_and_flush_keeps_the_balance_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = dir.path().join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"500ms\"\n{CONFIG}",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&config, text).expect("config");
    let c = Client { addr, token: None };

    let mut p = spawn(&config, dir.path().join("run0.log"));
    wait_healthy(&mut p, addr).await;
    let r = c.post_json("/v1/customers/k1/grants", &json!({"id": "g", "meter": "ai_tokens", "amount": 1000})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Flushed to the store before the kill.
    for i in 0..5 {
        assert_eq!(consume(&c, &format!("a{i}"), 40).await["allowed"], true);
    }
    let r = c.events(&json!([{"id": "e1", "customer": "k1", "meter": "ai_tokens", "quantity": 100}])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Only in the WAL: killed right after the answers.
    for i in 0..7 {
        assert_eq!(consume(&c, &format!("b{i}"), 30).await["allowed"], true);
    }
    let r = c.events(&json!([{"id": "e2", "customer": "k1", "meter": "ai_tokens", "quantity": 55}])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let before = balance(&c).await;
    assert_eq!(before["balance"], 1000 - 200 - 100 - 210 - 55, "{before}");
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();

    let mut p = spawn(&config, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(balance(&c).await, before, "the same balance after the restart; log:\n{}", p.log());
    // Retries of acknowledged consumes and events record nothing more.
    consume(&c, "b6", 30).await;
    let r = c.events(&json!([{"id": "e2", "customer": "k1", "meter": "ai_tokens", "quantity": 55}])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(balance(&c).await, before);
    // And the balance still decides: 435 left, 436 is refused.
    assert_eq!(consume(&c, "c0", 436).await["reason"], "insufficient_credits");
    assert_eq!(consume(&c, "c1", 435).await["allowed"], true);
    assert_eq!(balance(&c).await["balance"], 0);
    p.sigterm();
    p.wait_exit(Duration::from_secs(20)).await;
    // After a clean stop (everything flushed) it is still exact.
    let mut p = spawn(&config, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(balance(&c).await["balance"], 0, "log:\n{}", p.log());
}
