//! `/readyz` reports the background tasks: all running → ready; a critical one
//! died → 503 naming it; a non-critical one → 200 degraded, naming it. (A real
//! death: the Stripe reporter stopped by a refused key, in `tests/stripe.rs`;
//! the supervisor's restarts and panics: unit tests in `src/health.rs`.)

mod common;

use common::{TestServer, INTERVIEW};
use meterd::health::{Restart, Task, TaskState};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_task_that_died() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let health = &server.app().health;
    assert_eq!(
        health.tasks(),
        vec![("flusher", TaskState::Running), /* issue 19 */ ("hold_expiry", TaskState::Running)],
        "the flusher and the hold expiry run supervised"
    );
    let r = c.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"status": "ready"}));

    let export = Task { name: "raw_events_export", critical: false, restart: Restart::Never };
    health.set(export, TaskState::Died { reason: "table dropped".into() });
    let r = c.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"status": "degraded", "reason": "background task raw_events_export died: table dropped"}));

    let syncer = Task { name: "counter_syncer", critical: true, restart: Restart::Never };
    health.set(syncer, TaskState::Died { reason: "panicked: boom".into() });
    let r = c.get("/readyz").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.code(), "unavailable");
    assert_eq!(r.body["error"]["message"], "background task counter_syncer died: panicked: boom", "{}", r.text);
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.contains(r#"meterd_task_running{task="counter_syncer"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"meterd_task_running{task="flusher"} 1"#), "{metrics}");
    server.stop().await;
}
