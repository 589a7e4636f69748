//! Remembered consume answers are bounded (`meterd::answers`): the whole answer
//! is held for minutes, yet a retry with the same id still gets the same
//! decision afterwards, and records nothing more. Allowed retries are answered
//! from the dedupe ids, denied ones from the denials kept for the window.

mod common;

use meterd::engine::Engine;
use meterd::limits::CheckRequest;
use meterd::model::answer::Reason;
use std::sync::Arc;

const PLANS: &str = r#"
[[meters]]
name = "calls"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
calls = { limit = 10, window = "month" }
"#;

async fn start(dir: &std::path::Path) -> Arc<Engine> {
    common::engine::start(dir, PLANS, "answers", Vec::new()).await
}

fn consume(quantity: i64, id: &str) -> CheckRequest {
    CheckRequest {
        customer: "acme".into(),
        meter: "calls".into(),
        quantity_text: Some(quantity.to_string().into()),
        consume: true,
        id: Some(id.into()),
        value: None,
    }
}

async fn decide(engine: &Engine, quantity: i64, id: &str) -> (bool, Reason, i64) {
    let a = engine.limits_ports().check(&consume(quantity, id)).await.expect("check");
    (a.allowed, a.reason, a.used.raw)
}

/// Forgets every whole answer, as the sweep does once they are older than
/// their lifetime (ten minutes), without waiting for it.
fn age_answers(engine: &Engine) {
    engine.limits_ports().sweep_consumes(meterd::engine::now_ms() + meterd::answers::RECENT_TTL_MS + 1);
}

#[tokio::test]
async fn retries_get_the_same_decision_after_the_whole_answer_is_forgotten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = start(dir.path()).await;
    assert_eq!(decide(&engine, 8, "a").await, (true, Reason::WithinLimit, 8));
    assert_eq!(decide(&engine, 5, "b").await, (false, Reason::LimitExceeded, 8));
    // While held, a retry gets the very answer.
    assert_eq!(decide(&engine, 5, "b").await, (false, Reason::LimitExceeded, 8));
    assert_eq!(engine.consumes().len(), (2, 1), "two whole answers, one denial");

    age_answers(&engine);
    assert_eq!(engine.consumes().len(), (0, 1), "the whole answers are gone, the denial stays");

    // A retry of the denial is denied again, even asking for what would fit now.
    assert_eq!(decide(&engine, 1, "b").await, (false, Reason::LimitExceeded, 8));
    // Its id was never claimed: a new consume still fits.
    assert_eq!(decide(&engine, 2, "c").await, (true, Reason::WithinLimit, 10));
    // Events are not limited: they take usage past the limit.
    let body = r#"[{"id":"e1","customer":"acme","meter":"calls","quantity":3}]"#;
    let outcome = engine.ingest(body.as_bytes(), meterd::ingest::BodyKind::Json).await.expect("ingest");
    assert_eq!(outcome.accepted, 1);
    // A retry of an allowed consume is allowed again and records nothing,
    // although usage is over the limit now.
    age_answers(&engine);
    assert_eq!(decide(&engine, 8, "a").await, (true, Reason::WithinLimit, 13));
    assert_eq!(decide(&engine, 2, "c").await, (true, Reason::WithinLimit, 13));
    // And the limit still holds for new ids.
    assert_eq!(decide(&engine, 1, "d").await, (false, Reason::LimitExceeded, 13));
}
