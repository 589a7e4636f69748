//! Holds survive SIGKILL (issue 19): the real binary takes a hold and an
//! allocation, is killed with SIGKILL, and after the restart both still count;
//! a hold whose expiry passed while meterd was down is released at start; the
//! settle after the restart records exactly once.

mod common;

use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::{check, Client};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const CONFIG: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = { limit = 100, window = "month" }
"#;

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("meterd.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"150ms\"\n{CONFIG}",
        dir.join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_survive_sigkill_and_expire_while_down() {
    common::away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), port);
    let c = Client { addr, token: None };

    let mut p = spawn(&config, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    for body in [
        json!({"id": "iv-1", "customer": "u", "meter": "minutes", "quantity": 50, "expires_in": "1h"}),
        json!({"id": "seat", "customer": "u", "meter": "minutes", "quantity": 20}),
        json!({"id": "short", "customer": "u", "meter": "minutes", "quantity": 25, "expires_in": "1s"}),
    ] {
        let r = c.post_json("/v1/reservations", &body).await;
        assert_eq!((r.status.as_u16(), r.body["allowed"].clone()), (200, json!(true)), "{}", r.text);
    }
    assert_eq!(check(&c, "u", "minutes", 1).await["held"], 95);
    p.child.kill().expect("SIGKILL");
    p.wait_exit(Duration::from_secs(10)).await;
    // "short" expires while meterd is down.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut p = spawn(&config, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.get("/v1/reservations/short").await;
        if r.body["reservation"]["status"] == "expired" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the hold that expired while down was never released: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = check(&c, "u", "minutes", 31).await;
    assert_eq!((now["used"].clone(), now["held"].clone(), now["allowed"].clone()), (json!(0), json!(70), json!(false)), "{now}");
    let settled = c.post_json("/v1/reservations/iv-1/settle", &json!({"quantity": 22})).await;
    assert_eq!(settled.body["reservation"]["status"], "settled", "{}", settled.text);
    p.child.kill().expect("SIGKILL");
    p.wait_exit(Duration::from_secs(10)).await;

    let mut p = spawn(&config, dir.path().join("run3.log"));
    wait_healthy(&mut p, addr).await;
    let now = check(&c, "u", "minutes", 1).await;
    assert_eq!((now["used"].clone(), now["held"].clone()), (json!(22), json!(20)), "{now}");
    let again = c.post_json("/v1/reservations/iv-1/settle", &json!({"quantity": 22})).await;
    assert_eq!(again.body["reservation"]["settled_quantity"], 22, "{}", again.text);
    assert_eq!(check(&c, "u", "minutes", 1).await["used"], 22, "a second settle after the restart records nothing");
    p.sigterm();
    p.wait_exit(Duration::from_secs(20)).await;
}
