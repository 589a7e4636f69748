//! Adjustments (issue 19) in a backup: `backup` of a running instance and
//! `restore` into another data dir keep the audit list and the corrected usage.

mod common;

use common::{with_dirs, TestServer};
use meterd::config::Config;
use serde_json::json;

const CONFIG: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"
precision = 2

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = { limit = 1000, window = "month" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_keep_the_audit_list() {
    common::away_from_day_boundary().await;
    let server = TestServer::start(CONFIG).await;
    let c = server.client();
    assert_eq!(c.events(&common::event("b1", "minutes", 10)).await.status, 202);
    let adj = json!({"id": "bk-adj", "customer": "b1", "meter": "minutes", "quantity": -2.5, "reason": "refund"});
    assert_eq!(c.post_json("/v1/adjustments", &adj).await.status, 202);
    let valid = Config::parse(&with_dirs(CONFIG, &server.data_dir()), "a.toml").and_then(|c| c.validate("a.toml")).expect("valid");
    let copy = tempfile::tempdir().expect("dir");
    let to = copy.path().join("backup");
    meterd::backup::backup(&valid, &to).await.expect("backup");
    server.stop().await;
    let restored = tempfile::tempdir().expect("dir");
    meterd::backup::restore(&to, restored.path()).expect("restore");
    let server = TestServer::start_in(CONFIG, restored).await;
    let c = server.client();
    let r = c.get("/v1/customers/b1/usage").await;
    assert_eq!(r.body["meters"][0]["used"], json!(7.5), "{}", r.text);
    let r = c.get("/v1/adjustments?customer=b1").await;
    assert_eq!(r.body["adjustments"][0]["id"], json!("bk-adj"), "{}", r.text);
    let r = c.post_json("/v1/adjustments", &adj).await;
    assert_eq!(r.body["duplicate"], json!(true), "{}", r.text);
    server.stop().await;
}
