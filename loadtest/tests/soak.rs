//! The soak's 60-second correctness version (issue 15, point 5), run by CI:
//! meterd in-process with a short dedupe window and a minute limit window,
//! customers churning and retries of acknowledged ids (old ones included)
//! mixed into every batch by racing workers. Every duplicate must be refused,
//! every new id accepted, and the server's total must equal the sum of the
//! accepted new ids' quantities exactly. Memory is not judged here (the real
//! soak, `meterd-loadtest soak`, plots it; see BENCHMARKS.md).

use loadtest::soak::{self, SoakConfig};
use meterd::config::Config;
use meterd::AppHandle;
use std::time::Duration;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[storage]
data_dir = "DATA_DIR"
durability = "buffered"
flush_interval = "1s"

[ingest]
max_lateness = "3m"
dedupe_window = "30s"
dedupe_memory = "1MB"

[[meters]]
name = "tokens"
aggregation = "sum"

[[plans]]
name = "soak"
default = true
[plans.limits]
tokens = { limit = 1000000000, window = "minute" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_seconds_of_churn_and_retries_refuse_every_duplicate_and_count_exactly() {
    let dir = std::env::temp_dir().join(format!("meterd-soak-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let toml = CONFIG.replace("DATA_DIR", &dir.display().to_string());
    let config = Config::parse(&toml, "soak.toml").and_then(|c| c.validate("soak.toml")).expect("valid soak config");
    let app = AppHandle::start(config).await.expect("meterd starts");

    let mut cfg = SoakConfig::new(app.addr);
    cfg.server_pid = Some(std::process::id());
    cfg.duration = Duration::from_secs(60);
    cfg.connections = 4;
    cfg.batch = 50;
    cfg.customers = 20_000;
    cfg.active = 500;
    cfg.lap = Duration::from_secs(20);
    cfg.retry_percent = 10;
    cfg.dedupe_window = Duration::from_secs(30);
    cfg.retry_margin = Duration::from_secs(5);
    cfg.rate = Some(100.0);
    cfg.quiet = true;
    let report = soak::run(cfg).await.expect("the soak runs");

    assert_eq!(report.first_problem, None);
    assert_eq!((report.wrong, report.errors), (0, 0));
    assert!(report.requests > 1000, "only {} requests", report.requests);
    assert!(report.sent_retries > 10_000, "only {} retries", report.sent_retries);
    assert_eq!(report.accepted, report.sent_new, "every new id accepted");
    assert_eq!(report.duplicates, report.sent_retries, "every retry refused as a duplicate");
    assert_eq!(soak::server_total(app.addr, "tokens", 20_000).await, Ok(report.expected_total), "exact total");
    assert!(report.samples.len() >= 5, "{} samples", report.samples.len());

    app.shutdown().await.expect("clean shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
