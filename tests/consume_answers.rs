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
tokens = { limit = 1000000, window = "month" }

[[meters]]
name = "tokens"
aggregation = "sum"
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

/// Duplicates of a consume sent at once (a client's retry racing its first
/// try) share one decision: exactly one of them decides and records, the
/// others wait for it and get the very same answer (one shared value, not an
/// equal one decided again), and usage counts each id once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicates_share_one_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = start(dir.path()).await;
    const IDS: usize = 300;
    const COPIES: usize = 6;
    let mut tasks = Vec::new();
    for id in 0..IDS {
        for _ in 0..COPIES {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let req = CheckRequest { meter: "tokens".into(), ..consume(2, &format!("race-{id}")) };
                (id, engine.limits_ports().check(&req).await.expect("check"))
            }));
        }
    }
    let mut answers: Vec<Vec<Arc<meterd::model::answer::CheckAnswer>>> = vec![Vec::new(); IDS];
    for task in tasks {
        let (id, answer) = task.await.expect("task");
        answers[id].push(answer);
    }
    for (id, copies) in answers.iter().enumerate() {
        assert_eq!(copies.len(), COPIES);
        assert!(copies.iter().all(|a| a.allowed), "id {id}");
        assert!(copies.iter().all(|a| Arc::ptr_eq(a, &copies[0])), "id {id}: its copies got answers decided apart");
    }
    let last = engine.limits_ports().check(&CheckRequest { meter: "tokens".into(), ..consume(1, "after") }).await.expect("check");
    assert_eq!(last.used.raw, (IDS * 2 + 1) as i64, "each id recorded once");
}
