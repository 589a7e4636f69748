//! Reservations (issue 19) over HTTP on one instance: the scenarios of API.md
//! (hold 90 of 100, a check of 20 denied, settle 60; release; expiry; seats as
//! allocations), idempotency by id, validation, racing reservations on a hard
//! limit, and holds across a graceful restart; listing a customer's
//! reservations (issue 22): order, filters, bad parameters, portal tokens.

mod common;

use common::*;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[[meters]]
name = "minutes"
aggregation = "sum"

[[meters]]
name = "latest_level"
aggregation = "latest"

[[plans]]
name = "p"
default = true
[plans.limits]
minutes = { limit = 100, window = "month" }
latest_level = { limit = 10, window = "month" }
"#;

const SAAS: &str = include_str!("../config/examples/saas-seats.toml");

async fn reserve(c: &Client, body: Value) -> Resp {
    c.post_json("/v1/reservations", &body).await
}

async fn settle(c: &Client, id: &str, body: Value) -> Resp {
    c.post_json(&format!("/v1/reservations/{id}/settle"), &body).await
}

async fn release(c: &Client, id: &str) -> Resp {
    c.post_json(&format!("/v1/reservations/{id}/release"), &json!({})).await
}

async fn usage_row(c: &Client, customer: &str, meter: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["meters"].as_array().and_then(|m| m.iter().find(|x| x["meter"] == meter).cloned()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_90_deny_20_settle_60() {
    away_from_day_boundary().await;
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let r = reserve(&c, json!({"id": "iv-1", "customer": "u1", "meter": "minutes", "quantity": 90, "expires_in": "2h"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["allowed"], true, "{}", r.text);
    assert_eq!(r.body["reservation"]["status"], "held");
    assert_eq!(r.body["reservation"]["quantity"], 90);
    assert!(r.body["reservation"]["expires_at"].is_string(), "{}", r.text);
    assert_eq!((r.body["used"].clone(), r.body["held"].clone(), r.body["remaining"].clone()), (json!(0), json!(90), json!(10)));
    assert_eq!(r.body["limits"][0]["held"], 90, "{}", r.text);

    let denied = check(&c, "u1", "minutes", 20).await;
    assert_eq!(denied["allowed"], false, "{denied}");
    assert_eq!((denied["used"].clone(), denied["held"].clone(), denied["remaining"].clone()), (json!(0), json!(90), json!(10)));
    assert_eq!(check(&c, "u1", "minutes", 10).await["allowed"], true);
    // A consume cannot take what is held either.
    let consume = c.check(&json!({"customer": "u1", "meter": "minutes", "quantity": 11, "consume": true, "id": "k-1"})).await;
    assert_eq!(consume.body["allowed"], false, "{}", consume.text);

    let row = usage_row(&c, "u1", "minutes").await;
    assert_eq!((row["used"].clone(), row["held"].clone(), row["remaining"].clone()), (json!(0), json!(90), json!(10)), "{row}");
    // Holds are not usage: history stays empty.
    let from = rfc3339(now_ms() - 86_400_000);
    let to = rfc3339(now_ms() + 86_400_000);
    let h = c.get(&format!("/v1/usage?meter=minutes&customer=u1&from={from}&to={to}&granularity=day")).await;
    assert_eq!(h.status, 200, "{}", h.text);
    let total: u64 = h.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(0);
    assert_eq!(total, 0, "{}", h.text);

    let done = settle(&c, "iv-1", json!({"quantity": 60})).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(done.body["reservation"]["status"], "settled");
    assert_eq!(done.body["reservation"]["settled_quantity"], 60);
    let after = check(&c, "u1", "minutes", 20).await;
    assert_eq!((after["used"].clone(), after["held"].clone(), after["remaining"].clone()), (json!(60), json!(0), json!(40)), "{after}");
    // A second settle returns the first result and records nothing.
    let again = settle(&c, "iv-1", json!({"quantity": 30})).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["reservation"]["settled_quantity"], 60);
    assert_eq!(check(&c, "u1", "minutes", 1).await["used"], 60);
    let h = c.get(&format!("/v1/usage?meter=minutes&customer=u1&from={from}&to={to}&granularity=day")).await;
    let total: u64 = h.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(0);
    assert_eq!(total, 60, "{}", h.text);
    // The reservation id is the usage's event id: the same id as an event is a duplicate.
    let dup = c.events(&json!([{"id": "iv-1", "customer": "u1", "meter": "minutes", "quantity": 5}])).await;
    assert_eq!(dup.body["duplicates"], 1, "{}", dup.text);
    let got = c.get("/v1/reservations/iv-1").await;
    assert_eq!((got.status.as_u16(), got.body["reservation"]["status"].clone()), (200, json!("settled")), "{}", got.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_same_answer_and_settling_more_than_held_is_recorded() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let body = json!({"id": "r-1", "customer": "u2", "meter": "minutes", "quantity": 40, "expires_in": "1h"});
    let first = reserve(&c, body.clone()).await;
    let second = reserve(&c, body.clone()).await;
    assert_eq!(first.body, second.body);
    assert_eq!(check(&c, "u2", "minutes", 1).await["held"], 40, "the same id holds nothing more");
    let other = reserve(&c, json!({"id": "r-1", "customer": "u2", "meter": "minutes", "quantity": 41})).await;
    assert_eq!((other.status.as_u16(), other.code()), (409, "conflict"), "{}", other.text);
    let over = settle(&c, "r-1", json!({"quantity": 70})).await;
    assert_eq!(over.body["reservation"]["settled_quantity"], 70, "{}", over.text);
    let now = check(&c, "u2", "minutes", 1).await;
    assert_eq!((now["used"].clone(), now["held"].clone()), (json!(70), json!(0)));
    // A denied reservation holds nothing and answers the same again.
    let denied = reserve(&c, json!({"id": "r-2", "customer": "u2", "meter": "minutes", "quantity": 31})).await;
    assert_eq!((denied.body["allowed"].clone(), denied.body["reservation"]["status"].clone()), (json!(false), json!("denied")));
    assert_eq!(reserve(&c, json!({"id": "r-2", "customer": "u2", "meter": "minutes", "quantity": 31})).await.body, denied.body);
    assert_eq!(check(&c, "u2", "minutes", 1).await["held"], 0);
    let settle_denied = settle(&c, "r-2", json!({})).await;
    assert_eq!(settle_denied.status, 409, "{}", settle_denied.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    for (body, field) in [
        (json!({"customer": "u", "meter": "minutes", "quantity": 1}), "id"),
        (json!({"id": "x", "meter": "minutes", "quantity": 1}), "customer"),
        (json!({"id": "x", "customer": "u", "meter": "nope"}), "meter"),
        (json!({"id": "x", "customer": "u", "meter": "latest_level"}), "meter"),
        (json!({"id": "x", "customer": "u", "meter": "minutes", "quantity": -1}), "quantity"),
        (json!({"id": "x", "customer": "u", "meter": "minutes", "expires_in": "soon"}), "expires_in"),
    ] {
        let r = reserve(&c, body).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{}", r.text);
        assert!(message(&r).starts_with(field), "{field}: {}", r.text);
    }
    let missing = c.get("/v1/reservations/nope").await;
    assert_eq!(missing.status, 404, "{}", missing.text);
    assert_eq!(settle(&c, "nope", json!({})).await.status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_expiry_free_the_hold() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    reserve(&c, json!({"id": "a", "customer": "u3", "meter": "minutes", "quantity": 50})).await;
    reserve(&c, json!({"id": "b", "customer": "u3", "meter": "minutes", "quantity": 30, "expires_in": "300ms"})).await;
    assert_eq!(check(&c, "u3", "minutes", 1).await["held"], 80);
    let r = release(&c, "a").await;
    assert_eq!((r.status.as_u16(), r.body["reservation"]["status"].clone()), (200, json!("released")), "{}", r.text);
    assert_eq!(check(&c, "u3", "minutes", 1).await["held"], 30);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let got = c.get("/v1/reservations/b").await;
        if got.body["reservation"]["status"] == "expired" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never expired: {}", got.text);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let now = check(&c, "u3", "minutes", 1).await;
    assert_eq!((now["used"].clone(), now["held"].clone()), (json!(0), json!(0)), "{now}");
    // Released or expired: no usage, and settling is refused.
    assert_eq!(settle(&c, "b", json!({"quantity": 1})).await.status, 409);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_are_allocations() {
    let s = TestServer::start(SAAS).await;
    let c = s.client();
    for i in 0..3 {
        let r =
            reserve(&c, json!({"id": format!("seat-{i}"), "customer": "acme", "meter": "seats", "quantity": 1, "expires_in": null})).await;
        assert_eq!((r.status.as_u16(), r.body["allowed"].clone()), (200, json!(true)), "{}", r.text);
        assert_eq!(r.body["reservation"]["expires_at"], Value::Null);
    }
    let fourth = reserve(&c, json!({"id": "seat-3", "customer": "acme", "meter": "seats", "quantity": 1})).await;
    assert_eq!((fourth.body["allowed"].clone(), fourth.body["reason"].clone()), (json!(false), json!("limit_exceeded")), "{}", fourth.text);
    assert_eq!(release(&c, "seat-1").await.status, 200);
    let again = reserve(&c, json!({"id": "seat-4", "customer": "acme", "meter": "seats", "quantity": 1})).await;
    assert_eq!(again.body["allowed"], true, "{}", again.text);
    let row = usage_row(&c, "acme", "seats").await;
    assert_eq!((row["used"].clone(), row["held"].clone(), row["remaining"].clone()), (json!(0), json!(3), json!(0)), "{row}");
    // Allocations survive a restart.
    let s = s.restart().await;
    let c = s.client();
    let row = usage_row(&c, "acme", "seats").await;
    assert_eq!(row["held"], 3, "{row}");
    assert_eq!(reserve(&c, json!({"id": "seat-5", "customer": "acme", "meter": "seats", "quantity": 1})).await.body["allowed"], false);
    // And are listed after it, as is the released seat (from the journal).
    let mut held = ids(&c.get("/v1/reservations?customer=acme&status=held").await);
    held.sort();
    assert_eq!(held, ["seat-0", "seat-2", "seat-4"]);
    assert_eq!(ids(&c.get("/v1/reservations?customer=acme&status=released").await), ["seat-1"]);
    assert_eq!(ids(&c.get("/v1/reservations?customer=acme&status=denied").await), ["seat-5"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reservations_never_over_hold() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    // 40 reservations of 7 race for 100: exactly 14 fit.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let r = c
                    .post_json(
                        "/v1/reservations",
                        &json!({"id": format!("race-{i}"), "customer": "racer", "meter": "minutes", "quantity": 7, "expires_in": "1h"}),
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.text);
                r.body["allowed"] == true
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task") {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 14);
    let now = check(&c, "racer", "minutes", 1).await;
    assert_eq!((now["held"].clone(), now["remaining"].clone()), (json!(98), json!(2)), "{now}");
    s.stop().await;
}

const CREDITS: &str = include_str!("../config/examples/interview-credits.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_count_against_credit_balances() {
    let s = TestServer::start(CREDITS).await;
    let c = s.client();
    let g = c.post_json("/v1/customers/u9/grants", &json!({"id": "pack", "meter": "interviews", "amount": 5})).await;
    assert_eq!(g.status, 201, "{}", g.text);
    let r = reserve(&c, json!({"id": "iv-a", "customer": "u9", "meter": "interviews", "quantity": 4, "expires_in": "1h"})).await;
    assert_eq!(r.body["allowed"], true, "{}", r.text);
    assert_eq!((r.body["held"].clone(), r.body["remaining"].clone()), (json!(4), json!(1)), "{}", r.text);
    let two = reserve(&c, json!({"id": "iv-b", "customer": "u9", "meter": "interviews", "quantity": 2})).await;
    assert_eq!((two.body["allowed"].clone(), two.body["reason"].clone()), (json!(false), json!("insufficient_credits")), "{}", two.text);
    // A consume cannot spend held credits.
    let spend = c.check(&json!({"customer": "u9", "meter": "interviews", "quantity": 2, "consume": true, "id": "k"})).await;
    assert_eq!(spend.body["allowed"], false, "{}", spend.text);
    // Settling 3 spends 3 credits; the rest of the hold is released.
    let done = settle(&c, "iv-a", json!({"quantity": 3})).await;
    assert_eq!(done.body["reservation"]["status"], "settled", "{}", done.text);
    let now = check(&c, "u9", "interviews", 2).await;
    assert_eq!((now["allowed"].clone(), now["held"].clone(), now["remaining"].clone()), (json!(true), json!(0), json!(2)), "{now}");
    let b = c.get("/v1/customers/u9/balances").await;
    let balance = b.body["balances"].as_array().and_then(|l| l.iter().find(|x| x["meter"] == "interviews").cloned()).unwrap_or_default();
    assert_eq!(balance["balance"], 2, "{}", b.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_on_a_count_meter_records_that_many_uses() {
    let s = TestServer::start(SAAS).await;
    let c = s.client();
    let r = reserve(&c, json!({"id": "calls-1", "customer": "beta", "meter": "api_calls", "quantity": 5, "expires_in": "10m"})).await;
    assert_eq!(r.body["allowed"], true, "{}", r.text);
    let done = settle(&c, "calls-1", json!({"quantity": 3})).await;
    assert_eq!(done.body["reservation"]["settled_quantity"], 3, "{}", done.text);
    let now = check(&c, "beta", "api_calls", 1).await;
    assert_eq!((now["used"].clone(), now["held"].clone()), (json!(3), json!(0)), "{now}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_racing_consumes_never_pass_the_limit() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    // 20 reservations and 20 consumes of 7 race for 100 (a single hard limit:
    // consumes take the compare-and-swap path, without the lock).
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let r = if i % 2 == 0 {
                    c.post_json(
                        "/v1/reservations",
                        &json!({"id": format!("mix-{i}"), "customer": "mixed", "meter": "minutes", "quantity": 7}),
                    )
                    .await
                } else {
                    c.check(&json!({"customer": "mixed", "meter": "minutes", "quantity": 7, "consume": true, "id": format!("mix-{i}")}))
                        .await
                };
                assert_eq!(r.status, 200, "{}", r.text);
                r.body["allowed"] == true
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task") {
            allowed += 1;
        }
    }
    let now = check(&c, "mixed", "minutes", 1).await;
    let (used, held) = (now["used"].as_i64().unwrap_or(-1), now["held"].as_i64().unwrap_or(-1));
    assert_eq!(used + held, 7 * allowed, "every allowed one is used or held, nothing else: {now}");
    assert!(used + held <= 100, "never past the limit: {now}");
    // Both re-checks may deny in one tight race; most of the 14 that fit get through.
    assert!(allowed >= 10, "too few allowed: {allowed}");
    s.stop().await;
}

/// The ids of a listing, in order.
fn ids(r: &Resp) -> Vec<String> {
    r.body["reservations"].as_array().map(|a| a.iter().filter_map(|x| x["id"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_reservations_are_listed_newest_first() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(5));
    reserve(&c, json!({"id": "l-1", "customer": "ul", "meter": "minutes", "quantity": 10, "expires_in": "2h"})).await;
    pause().await;
    reserve(&c, json!({"id": "l-2", "customer": "ul", "meter": "minutes", "quantity": 20})).await;
    pause().await;
    let denied = reserve(&c, json!({"id": "l-3", "customer": "ul", "meter": "minutes", "quantity": 500})).await;
    assert_eq!(denied.body["reservation"]["status"], "denied", "{}", denied.text);
    reserve(&c, json!({"id": "l-other", "customer": "ul2", "meter": "minutes", "quantity": 1})).await;
    assert_eq!(release(&c, "l-1").await.status, 200);

    let all = c.get("/v1/reservations?customer=ul").await;
    assert_eq!(all.status, 200, "{}", all.text);
    assert_eq!(ids(&all), ["l-3", "l-2", "l-1"], "newest first, this customer's only: {}", all.text);
    // Each as GET /v1/reservations/{id} shows it.
    for item in all.body["reservations"].as_array().into_iter().flatten() {
        let one = c.get(&format!("/v1/reservations/{}", item["id"].as_str().unwrap_or(""))).await;
        assert_eq!(&one.body["reservation"], item, "{}", all.text);
    }
    let held = c.get("/v1/reservations?customer=ul&status=held").await;
    assert_eq!(ids(&held), ["l-2"], "{}", held.text);
    assert_eq!(held.body["reservations"][0]["quantity"], 20, "{}", held.text);
    assert_eq!(held.body["reservations"][0]["expires_at"], Value::Null, "{}", held.text);
    assert_eq!(ids(&c.get("/v1/reservations?customer=ul&status=released&meter=minutes").await), ["l-1"]);
    assert_eq!(ids(&c.get("/v1/reservations?customer=ul&limit=2").await), ["l-3", "l-2"]);
    assert_eq!(ids(&c.get("/v1/reservations?customer=nobody").await), Vec::<String>::new());
    // Settled: listed as settled.
    assert_eq!(settle(&c, "l-2", json!({"quantity": 5})).await.status, 200);
    let settled = c.get("/v1/reservations?customer=ul&status=settled").await;
    assert_eq!((ids(&settled), settled.body["reservations"][0]["settled_quantity"].clone()), (vec!["l-2".to_string()], json!(5)));
    assert_eq!(ids(&c.get("/v1/reservations?customer=ul&status=held").await), Vec::<String>::new());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_bad_parameters_name_the_field() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    for (query, field) in [
        ("", "customer"),
        ("meter=minutes", "customer"),
        ("customer=", "customer"),
        ("customer=u&meter=nope", "meter"),
        ("customer=u&meter=", "meter"),
        ("customer=u&status=open", "status"),
        ("customer=u&limit=0", "limit"),
        ("customer=u&limit=1001", "limit"),
        ("customer=u&limit=ten", "limit"),
        ("customer=u&colour=red", "query"),
    ] {
        let r = c.get(&format!("/v1/reservations?{query}")).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{query}: {}", r.text);
        assert!(message(&r).starts_with(field), "{query}: {field}: {}", r.text);
    }
    let r = c.get("/v1/reservations?customer=u&colour=red").await;
    assert!(message(&r).contains("colour"), "names the parameter: {}", r.text);
    let r = c.get("/v1/reservations?customer=u&limit=1000&status=denied&meter=minutes").await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_token_lists_its_own_customers_reservations_only() {
    let s = TestServer::start(CONFIG).await;
    let c = s.client();
    reserve(&c, json!({"id": "p-1", "customer": "mine", "meter": "minutes", "quantity": 3})).await;
    reserve(&c, json!({"id": "p-2", "customer": "theirs", "meter": "minutes", "quantity": 4})).await;
    let t = c.post_json("/v1/customers/mine/portal-tokens", &json!({})).await;
    let token = t.body["token"].as_str().unwrap_or_else(|| panic!("{}", t.text)).to_string();
    let portal = s.client().with_token(&token);
    let r = portal.get("/v1/reservations?customer=mine").await;
    assert_eq!((r.status.as_u16(), ids(&r)), (200, vec!["p-1".to_string()]), "{}", r.text);
    for query in ["customer=theirs", "customer=theirs&status=held", ""] {
        let r = portal.get(&format!("/v1/reservations?{query}")).await;
        assert_eq!((r.status.as_u16(), r.code()), (403, "forbidden"), "{query}: {}", r.text);
    }
    let r = s.client().with_token("mpt_00.00").get("/v1/reservations?customer=mine").await;
    assert_eq!(r.status, 401, "a forged token: {}", r.text);
    s.stop().await;
}
