//! Prepaid credits and grants (issue 18) over HTTP on one instance: grant
//! idempotency and validation, burn-down at the boundaries, overage paid by a
//! top-up, consumes racing on one balance, balances after a restart, and the
//! low / depleted alerts.

mod common;

use common::*;
use meterd::credits::{CreditAlert, CreditAlertKind, CreditAlertSink};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const CONFIG: &str = include_str!("../config/examples/interview-credits.toml");

async fn grant(c: &Client, customer: &str, body: Value) -> Resp {
    c.post_json(&format!("/v1/customers/{customer}/grants"), &body).await
}

async fn balance(c: &Client, customer: &str, meter: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/balances")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["balances"].as_array().and_then(|b| b.iter().find(|x| x["meter"] == meter).cloned()).unwrap_or(Value::Null)
}

async fn consume(c: &Client, customer: &str, meter: &str, q: i64, id: &str) -> Value {
    let r = c.check(&json!({"customer": customer, "meter": meter, "quantity": q, "consume": true, "id": id})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_idempotent_validated_listed_and_voided() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let body = json!({"id": "topup-1", "meter": "interviews", "amount": 5, "reason": "top-up"});
    let r = grant(&c, "u1", body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["remaining"], 5);
    assert_eq!(r.body["status"], "active");
    assert_eq!(r.body["priority"], 10);
    let again = grant(&c, "u1", body.clone()).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["effective_at"], r.body["effective_at"]);
    let changed = grant(&c, "u1", json!({"id": "topup-1", "meter": "interviews", "amount": 10})).await;
    assert_eq!((changed.status.as_u16(), changed.code()), (409, "conflict"), "{}", changed.text);
    for (bad, field) in [
        (json!({"id": "x", "meter": "interviews", "amount": 0}), "amount"),
        (json!({"id": "x", "meter": "nope", "amount": 1}), "meter"),
        (json!({"meter": "interviews", "amount": 1}), "id"),
        (json!({"id": "x", "meter": "interviews", "amount": 1, "expires_at": "tomorrow"}), "expires_at"),
    ] {
        let r = grant(&c, "u1", bad).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{}", r.text);
        assert!(message(&r).starts_with(field), "{field}: {}", r.text);
    }
    assert_eq!(balance(&c, "u1", "interviews").await["balance"], 5);
    assert_eq!(consume(&c, "u1", "interviews", 2, "iv-1").await["remaining"], 3);
    let list = c.get("/v1/customers/u1/grants?meter=interviews").await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.body["grants"][0]["remaining"], 3, "{}", list.text);
    let voided = c.send(hyper::Method::DELETE, "/v1/customers/u1/grants/topup-1", None, "").await;
    assert_eq!(voided.status, 200, "{}", voided.text);
    assert_eq!(voided.body["status"], "voided", "{}", voided.text);
    let b = balance(&c, "u1", "interviews").await;
    assert_eq!((b["balance"].clone(), b["used"].clone()), (json!(0), json!(2)), "what it paid stays paid: {b}");
    let denied = consume(&c, "u1", "interviews", 1, "iv-2").await;
    assert_eq!((denied["allowed"].clone(), denied["reason"].clone()), (json!(false), json!("insufficient_credits")), "{denied}");
    let missing = c.send(hyper::Method::DELETE, "/v1/customers/u1/grants/nope", None, "").await;
    assert_eq!((missing.status.as_u16(), missing.code()), (404, "not_found"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_with_a_credits_entry_and_the_summary_has_the_row() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let expires = rfc3339(now_ms() + 30 * DAY);
    assert_eq!(grant(&c, "u2", json!({"id": "g", "meter": "ai_tokens", "amount": 5000, "expires_at": expires})).await.status, 201);
    let a = check(&c, "u2", "ai_tokens", 100).await;
    assert_eq!(a["allowed"], true, "{a}");
    let credits = a["limits"].as_array().and_then(|l| l.iter().find(|x| x["window"] == "credits").cloned()).unwrap_or_default();
    assert_eq!(
        credits,
        json!({"window": "credits", "limit": 5000, "used": 0, "held": 0, "remaining": 5000, "resets_at": expires, "hard": true})
    );
    let over = check(&c, "u2", "ai_tokens", 5001).await;
    assert_eq!((over["allowed"].clone(), over["reason"].clone()), (json!(false), json!("insufficient_credits")), "{over}");
    ingest(&c, json!(event("u2", "ai_tokens", 1200))).await;
    let summary = c.get("/v1/customers/u2/usage").await;
    let row = summary.body["meters"]
        .as_array()
        .and_then(|m| m.iter().find(|r| r["window"] == "credits" && r["meter"] == "ai_tokens").cloned())
        .unwrap_or_default();
    assert_eq!((row["used"].clone(), row["remaining"].clone(), row["limit"].clone()), (json!(1200), json!(3800), json!(5000)), "{row}");
    let b = balance(&c, "u2", "ai_tokens").await;
    assert_eq!(b["next_expiry"], json!({"amount": 3800, "expires_at": expires}), "{b}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_at_a_minute_boundary_and_priority() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let minute = 60_000;
    let t1 = (now_ms() / minute - 5) * minute; // expiry, 5 minutes ago
    let t0 = t1 - 5 * minute;
    let g = |id: &str, amount: i64, priority: i64, expires: Option<i64>| {
        json!({"id": id, "meter": "ai_tokens", "amount": amount, "priority": priority,
               "effective_at": rfc3339(t0), "expires_at": expires.map(rfc3339)})
    };
    assert_eq!(grant(&c, "u3", g("expiring", 10, 10, Some(t1))).await.status, 201);
    assert_eq!(grant(&c, "u3", g("lasting", 100, 20, None)).await.status, 201);
    // Just before the expiry: the expiring grant (lower priority) pays.
    ingest(&c, json!({"id": uid("e"), "customer": "u3", "meter": "ai_tokens", "quantity": 4, "timestamp": t1 - 1})).await;
    // At the expiry: it no longer acts; its remaining 6 are gone.
    ingest(&c, json!({"id": uid("e"), "customer": "u3", "meter": "ai_tokens", "quantity": 3, "timestamp": t1})).await;
    let list = c.get("/v1/customers/u3/grants").await.body;
    let by_id = |id: &str| list["grants"].as_array().and_then(|l| l.iter().find(|x| x["id"] == id).cloned()).unwrap_or_default();
    assert_eq!((by_id("expiring")["status"].clone(), by_id("expiring")["remaining"].clone()), (json!("expired"), json!(6)), "{list}");
    assert_eq!(by_id("lasting")["remaining"], 97, "{list}");
    let b = balance(&c, "u3", "ai_tokens").await;
    assert_eq!((b["balance"].clone(), b["granted"].clone()), (json!(97), json!(100)), "{b}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_then_a_top_up_pays_it_first() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    assert_eq!(put(&c, "u4", json!({"plan": "invoiced"})).await.status, 200);
    assert_eq!(grant(&c, "u4", json!({"id": "g1", "meter": "interviews", "amount": 5})).await.status, 201);
    for i in 0..7 {
        let a = consume(&c, "u4", "interviews", 1, &format!("iv-{i}")).await;
        assert_eq!(a["allowed"], true, "{a}");
    }
    let a = check(&c, "u4", "interviews", 1).await;
    assert_eq!((a["reason"].clone(), a["remaining"].clone()), (json!("soft_limit_exceeded"), json!(-2)), "{a}");
    assert_eq!(balance(&c, "u4", "interviews").await["balance"], -2);
    assert_eq!(grant(&c, "u4", json!({"id": "g2", "meter": "interviews", "amount": 10})).await.status, 201);
    let b = balance(&c, "u4", "interviews").await;
    assert_eq!(b["balance"], 8, "{b}");
    let list = c.get("/v1/customers/u4/grants").await.body;
    let g2 = list["grants"].as_array().and_then(|l| l.iter().find(|x| x["id"] == "g2").cloned()).unwrap_or_default();
    assert_eq!(g2["remaining"], 8, "the top-up paid the overage first: {list}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_consumes_never_overdraw_a_hard_balance() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    assert_eq!(grant(&c, "u5", json!({"id": "g", "meter": "ai_tokens", "amount": 1000})).await.status, 201);
    let handles: Vec<_> = (0..12)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for i in 0..8 {
                    let r = c
                        .check(
                            &json!({"customer": "u5", "meter": "ai_tokens", "quantity": 30, "consume": true, "id": format!("r-{t}-{i}")}),
                        )
                        .await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    if r.body["allowed"] == true {
                        allowed += 1;
                    } else {
                        assert_eq!(r.body["reason"], "insufficient_credits", "{}", r.text);
                    }
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for h in handles {
        allowed += h.await.expect("task");
    }
    assert_eq!(allowed, 33);
    assert_eq!(balance(&c, "u5", "ai_tokens").await["balance"], 10);
    // Retrying a consume changes nothing.
    let again = c.check(&json!({"customer": "u5", "meter": "ai_tokens", "quantity": 30, "consume": true, "id": "r-0-0"})).await;
    assert_eq!(again.status, 200);
    assert_eq!(balance(&c, "u5", "ai_tokens").await["balance"], 10);
    // And a restart (flushed, then loaded from the store) keeps it exact.
    let s = s.restart().await;
    let c = s.client();
    assert_eq!(balance(&c, "u5", "ai_tokens").await["balance"], 10);
    assert_eq!(consume(&c, "u5", "ai_tokens", 11, "after").await["allowed"], false);
    s.stop().await;
}

/// Records every alert.
#[derive(Default)]
struct Recorder(Mutex<Vec<CreditAlert>>);

impl CreditAlertSink for Recorder {
    fn alert(&self, alert: CreditAlert) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(alert);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_and_depleted_fire_once_until_a_grant_lifts_the_balance() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let rec = Arc::new(Recorder::default());
    s.app().engine.credits().set_alert_sink(rec.clone());
    let kinds = |rec: &Recorder| -> Vec<(CreditAlertKind, String)> {
        rec.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|a| (a.kind, a.balance.to_string())).collect()
    };
    assert_eq!(check(&c, "u6", "interviews", 1).await["allowed"], false, "no credit yet");
    assert_eq!(grant(&c, "u6", json!({"id": "g1", "meter": "interviews", "amount": 5})).await.status, 201);
    for i in 0..3 {
        consume(&c, "u6", "interviews", 1, &format!("a{i}")).await;
    }
    assert_eq!(kinds(&rec), vec![(CreditAlertKind::Low, "2".to_string())]);
    consume(&c, "u6", "interviews", 1, "a3").await;
    consume(&c, "u6", "interviews", 1, "a4").await;
    assert_eq!(kinds(&rec).len(), 2);
    assert_eq!(kinds(&rec)[1], (CreditAlertKind::Depleted, "0".to_string()));
    let last = rec.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last().cloned();
    assert_eq!(
        last.map(|a| (a.customer, a.meter, a.low_balance.map(|d| d.to_string()))),
        Some(("u6".into(), "interviews".into(), Some("2".into())))
    );
    assert_eq!(consume(&c, "u6", "interviews", 1, "a5").await["allowed"], false);
    assert_eq!(kinds(&rec).len(), 2, "denied consumes change nothing");
    assert_eq!(grant(&c, "u6", json!({"id": "g2", "meter": "interviews", "amount": 10})).await.status, 201);
    for i in 0..8 {
        consume(&c, "u6", "interviews", 1, &format!("b{i}")).await;
    }
    assert_eq!(kinds(&rec)[2..], [(CreditAlertKind::Low, "2".to_string())], "re-armed by the top-up");
    // Ingested usage that is never checked crosses too.
    assert_eq!(grant(&c, "u7", json!({"id": "g", "meter": "interviews", "amount": 3})).await.status, 201);
    ingest(&c, json!(event("u7", "interviews", 1))).await;
    let last = rec.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last().cloned();
    assert_eq!(last.map(|a| (a.kind, a.customer)), Some((CreditAlertKind::Low, "u7".to_string())));
    s.stop().await;
}
