//! Stripe subscription sync over HTTP: `POST /v1/webhooks/stripe` verifies
//! `Stripe-Signature`, sets plans from subscription events once and in order
//! (across restarts and instances), falls back to the default plan when a
//! subscription ends, and turns paid checkout sessions into credit grants.

mod common;

use bytes::Bytes;
use common::redis_server::RedisServer;
use common::require::need;
use common::{check, put, uid, Client, Resp, TestServer, INTERVIEW};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use meterd::billing_sync::signature::sign;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const SECRET_ENV: &str = "METERD_TEST_STRIPE_WHSEC";
const SECRET: &str = "whsec_meterd_integration_secret";

/// The interview platform with webhooks: `price_pro` → professional,
/// lookup_key `premium_monthly` → premium (starter is the default).
fn config(tolerance: &str) -> String {
    std::env::set_var(SECRET_ENV, SECRET);
    format!(
        "{INTERVIEW}\n[stripe.webhooks]\nsecret_env = \"{SECRET_ENV}\"\ntolerance = \"{tolerance}\"\n\
         [stripe.webhooks.plans]\nprice_pro = \"professional\"\npremium_monthly = \"premium\"\nprice_1PqStarter = \"professional\"\n"
    )
}

fn now_secs() -> i64 {
    common::now_ms() / 1000
}

/// POST /v1/webhooks/stripe with a raw body and an optional signature header.
async fn deliver(c: &Client, body: &str, signature: Option<&str>) -> Resp {
    let stream = common::connect_listening(c.addr).await.unwrap_or_else(|| panic!("nothing listens on {}", c.addr));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap_or_else(|e| panic!("handshake: {e}"));
    tokio::spawn(conn);
    let mut req =
        Request::builder().method("POST").uri("/v1/webhooks/stripe").header("host", "localhost").header("content-type", "application/json");
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap_or_else(|e| panic!("request: {e}"));
    let resp = sender.send_request(req).await.unwrap_or_else(|e| panic!("response: {e}"));
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap_or_else(|e| panic!("body: {e}")).to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    Resp { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null), text }
}

/// Delivers `event` signed now with the endpoint's secret; returns `applied`.
async fn send(c: &Client, event: &Value) -> bool {
    let body = event.to_string();
    let r = deliver(c, &body, Some(&sign(SECRET, now_secs(), body.as_bytes()))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["received"], json!(true), "{}", r.text);
    r.body["applied"].as_bool().unwrap_or_else(|| panic!("no applied in {}", r.text))
}

struct Sub<'a> {
    event: &'a str,
    kind: &'a str,
    created: i64,
    sub: &'a str,
    cus: &'a str,
    customer: Option<&'a str>,
    status: &'a str,
    price: (&'a str, Option<&'a str>),
}

fn subscription(s: &Sub<'_>) -> Value {
    let metadata = match s.customer {
        Some(c) => json!({"meterd_customer": c}),
        None => json!({}),
    };
    json!({
        "id": s.event, "object": "event", "type": s.kind, "created": s.created,
        "data": {"object": {
            "id": s.sub, "object": "subscription", "customer": s.cus, "status": s.status,
            "billing_cycle_anchor": 1_763_164_800, "metadata": metadata,
            "items": {"object": "list", "data": [{"price": {"id": s.price.0, "lookup_key": s.price.1}}]}
        }}
    })
}

async fn entitlements(c: &Client, customer: &str) -> Value {
    let r = c.get(&format!("/v1/customers/{customer}/entitlements")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sets_the_plan_once_and_keeps_overrides() {
    let server = TestServer::start(&config("5m")).await;
    let c = server.client();
    let (customer, event) = (uid("wh"), uid("evt"));
    let overrides = json!({"interviews": [{"limit": 9, "window": "day"}]});
    let r = put(&c, &customer, json!({"overrides": overrides, "features": {"beta": true}})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let created = Sub {
        event: &event,
        kind: "customer.subscription.created",
        created: now_secs(),
        sub: "sub_a",
        cus: "cus_a",
        customer: Some(&customer),
        status: "active",
        price: ("price_pro", None),
    };
    assert!(send(&c, &subscription(&created)).await, "applied");
    let view = entitlements(&c, &customer).await;
    assert_eq!(view["plan"], json!("professional"));
    assert_eq!(view["stripe_customer_id"], json!("cus_a"));
    assert_eq!(view["billing_anchor"], json!("2025-11-15T00:00:00Z"), "from billing_cycle_anchor");
    assert_eq!(view["overrides"], overrides, "overrides kept");
    assert_eq!(view["features"]["beta"], json!(true), "features kept");
    assert_eq!(check(&c, &customer, "interview_minutes", 0).await["limit"], json!(800), "checks see the plan at once");

    // The same event again (a retry, a replay): acknowledged, changes nothing.
    let r = put(&c, &customer, json!({"plan": "premium", "stripe_customer_id": "cus_a"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!send(&c, &subscription(&created)).await, "a replay is not applied");
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("premium"), "the replay did not set the plan back");

    // A lookup_key maps too.
    let key_event = uid("evt");
    let by_key = Sub {
        event: &key_event,
        kind: "customer.subscription.updated",
        price: ("price_unlisted", Some("premium_monthly")),
        created: now_secs() + 1,
        ..created
    };
    let r = put(&c, &customer, json!({"plan": "starter"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(send(&c, &subscription(&by_key)).await);
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("premium"));

    // Other event types are acknowledged and ignored.
    let other = json!({"id": uid("evt"), "type": "invoice.paid", "created": now_secs(), "data": {"object": {"id": "in_1"}}});
    assert!(!send(&c, &other).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_event_never_undoes_a_newer_one() {
    let server = TestServer::start(&config("5m")).await;
    let c = server.client();
    let customer = uid("ooo");
    let t = now_secs();
    let base = Sub {
        event: "",
        kind: "customer.subscription.updated",
        created: t,
        sub: "sub_ooo",
        cus: "cus_ooo",
        customer: Some(&customer),
        status: "active",
        price: ("price_pro", None),
    };
    let (newer_id, older_id) = (uid("evt-new"), uid("evt-old"));
    let newer = Sub { event: &newer_id, created: t + 10, price: ("x", Some("premium_monthly")), ..base };
    let older = Sub { event: &older_id, created: t, ..base };
    assert!(send(&c, &subscription(&newer)).await);
    assert!(!send(&c, &subscription(&older)).await, "older than the newest applied to sub_ooo");
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("premium"));
    // Another subscription has its own order.
    let other_id = uid("evt");
    let other = Sub { event: &other_id, sub: "sub_other", created: t, ..base };
    assert!(send(&c, &subscription(&other)).await);
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("professional"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_must_verify_and_be_fresh() {
    let server = TestServer::start(&config("5m")).await;
    let c = server.client();
    let customer = uid("sig");
    let event_id = uid("evt");
    let s = Sub {
        event: &event_id,
        kind: "customer.subscription.created",
        created: now_secs(),
        sub: "sub_sig",
        cus: "cus_sig",
        customer: Some(&customer),
        status: "active",
        price: ("price_pro", None),
    };
    let body = subscription(&s).to_string();
    let now = now_secs();
    let refused = |r: &Resp, why: &str| {
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_signature"), "{why}: {}", r.text);
    };
    refused(&deliver(&c, &body, Some(&sign("whsec_wrong", now, body.as_bytes()))).await, "wrong secret");
    refused(&deliver(&c, &body, Some(&sign(SECRET, now - 301, body.as_bytes()))).await, "stale timestamp");
    refused(&deliver(&c, &body, Some(&sign(SECRET, now + 301, body.as_bytes()))).await, "future timestamp");
    refused(&deliver(&c, &body, None).await, "no header");
    let tampered = body.replace("price_pro", "price_xxx");
    refused(&deliver(&c, &tampered, Some(&sign(SECRET, now, body.as_bytes()))).await, "body changed after signing");
    // Nothing of the refused deliveries was applied, or recorded as seen.
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("starter"));
    // Several v1 values (Stripe sends two while a secret is rolled): one match is enough.
    let good = sign(SECRET, now, body.as_bytes());
    let good_sig = good.split_once(",v1=").map(|(_, s)| s).unwrap_or("");
    let rolled = format!("t={now},v1={},v1={good_sig}", "ab".repeat(32));
    let r = deliver(&c, &body, Some(&rolled)).await;
    assert_eq!((r.status.as_u16(), r.body["applied"].clone()), (200, json!(true)), "{}", r.text);
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("professional"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_made_by_stripes_library_is_accepted() {
    // The committed vector (tests/vectors/make_stripe_signature.py) was signed
    // in 2025 with stripe-python; a tolerance of ten years lets it through.
    let vector: Value = serde_json::from_str(include_str!("vectors/stripe_signature.json")).unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("METERD_TEST_VECTOR_WHSEC", vector["secret"].as_str().unwrap_or(""));
    let text = config("3650d").replace(SECRET_ENV, "METERD_TEST_VECTOR_WHSEC");
    let server = TestServer::start(&text).await;
    let c = server.client();
    let (payload, header) = (vector["payload"].as_str().unwrap_or(""), vector["header"].as_str().unwrap_or(""));
    let r = deliver(&c, payload, Some(header)).await;
    assert_eq!((r.status.as_u16(), r.body["applied"].clone()), (200, json!(true)), "{}", r.text);
    let view = entitlements(&c, "u_vector").await;
    assert_eq!((view["plan"].clone(), view["stripe_customer_id"].clone()), (json!("professional"), json!("cus_Vector")));
    // The same header under the default 5-minute tolerance is stale.
    let strict = TestServer::start(&config("5m").replace(SECRET_ENV, "METERD_TEST_VECTOR_WHSEC")).await;
    let r = deliver(&strict.client(), payload, Some(header)).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_signature"), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_comes_from_metadata_or_the_stripe_customer_id() {
    let server = TestServer::start(&config("5m")).await;
    let c = server.client();
    let customer = uid("byid");
    let cus = uid("cus");
    let first_id = uid("evt");
    let s = Sub {
        event: &first_id,
        kind: "customer.subscription.created",
        created: now_secs(),
        sub: "sub_byid",
        cus: &cus,
        customer: None,
        status: "active",
        price: ("price_pro", None),
    };
    assert!(!send(&c, &subscription(&s)).await, "unknown customer: acknowledged, ignored");
    let r = c.get("/v1/customers?limit=1000").await;
    assert!(!r.text.contains(&cus), "nobody got the Stripe id: {}", r.text);
    let r = put(&c, &customer, json!({"stripe_customer_id": cus})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Stripe retries the ignored event (it was not recorded as applied).
    assert!(send(&c, &subscription(&s)).await, "now the customer is found by stripe_customer_id");
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("professional"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_subscription_returns_to_the_default_plan_and_restarts_remember_events() {
    let server = TestServer::start(&config("5m")).await;
    let c = server.client();
    let customer = uid("cancel");
    let t = now_secs();
    let ids: Vec<String> = (0..4).map(|_| uid("evt")).collect();
    let base = Sub {
        event: &ids[0],
        kind: "customer.subscription.created",
        created: t,
        sub: "sub_c",
        cus: "cus_c",
        customer: Some(&customer),
        status: "trialing",
        price: ("price_pro", None),
    };
    assert!(send(&c, &subscription(&base)).await);
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("professional"), "a trial has the plan");
    let past_due = Sub { event: &ids[1], kind: "customer.subscription.updated", created: t + 1, status: "past_due", ..base };
    assert!(send(&c, &subscription(&past_due)).await);
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("professional"), "past_due keeps it");
    let unpaid = Sub { event: &ids[2], kind: "customer.subscription.updated", created: t + 2, status: "unpaid", ..base };
    assert!(send(&c, &subscription(&unpaid)).await);
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("starter"), "unpaid: the default plan");
    let deleted = Sub { event: &ids[3], kind: "customer.subscription.deleted", created: t + 3, status: "canceled", ..base };
    let r = put(&c, &customer, json!({"plan": "premium", "stripe_customer_id": "cus_c"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(send(&c, &subscription(&deleted)).await);
    let view = entitlements(&c, &customer).await;
    assert_eq!((view["plan"].clone(), view["stripe_customer_id"].clone()), (json!("starter"), json!("cus_c")), "deleted: default plan");

    // After a restart the applied events are still known: a replay changes nothing.
    let server = server.restart().await;
    let c = server.client();
    let r = put(&c, &customer, json!({"plan": "premium"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!send(&c, &subscription(&deleted)).await, "applied before the restart");
    assert!(!send(&c, &subscription(&base)).await, "applied before the restart");
    assert_eq!(entitlements(&c, &customer).await["plan"], json!("premium"));
}

fn checkout(event: &str, session: &str, customer: &str, payment_status: &str, meter: &str) -> Value {
    json!({"id": event, "type": "checkout.session.completed", "created": now_secs(),
        "data": {"object": {"id": session, "object": "checkout.session", "client_reference_id": customer, "payment_status": payment_status,
            "metadata": {"meterd_grant_meter": meter, "meterd_grant_amount": "120.5"}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_checkout_with_grant_metadata_becomes_a_credit_grant_once() {
    let server = TestServer::start(&config("5m")).await;
    let c = server.client();
    let customer = uid("buyer");
    let (first, session) = (uid("evt"), uid("cs"));
    assert!(send(&c, &checkout(&first, &session, &customer, "paid", "interview_minutes")).await, "a paid session makes a grant");
    assert!(!send(&c, &checkout(&first, &session, &customer, "paid", "interview_minutes")).await, "a replay");
    assert!(
        !send(&c, &checkout(&uid("evt"), &session, &customer, "paid", "interview_minutes")).await,
        "another event for the same session"
    );
    assert!(!send(&c, &checkout(&uid("evt"), &uid("cs"), &customer, "unpaid", "interview_minutes")).await, "not paid yet");
    assert!(!send(&c, &checkout(&uid("evt"), &uid("cs"), &customer, "paid", "no_such_meter")).await, "an unknown meter is refused");
    let r = c.get(&format!("/v1/customers/{customer}/grants")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let grants = r.body["grants"].as_array().cloned().unwrap_or_default();
    assert_eq!(grants.len(), 1, "exactly one grant: {}", r.text);
    assert_eq!(grants[0]["id"], json!(session));
    assert_eq!(grants[0]["meter"], json!("interview_minutes"));
    assert_eq!(grants[0]["amount"], json!(120.5));
    assert_eq!(grants[0]["status"], json!("active"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_receiving_the_same_event_apply_it_once_and_both_see_the_plan() {
    let redis = need!(RedisServer::start(false).await);
    let text = |instance: &str| {
        let with_id = config("5m").replacen("[server]\n", &format!("[server]\ninstance_id = \"{instance}\"\n"), 1);
        format!("{with_id}\n[redis]\nurl = \"{}\"\nsync_interval = \"50ms\"\nentitlements_ttl = \"2s\"\n", redis.url())
    };
    let (a, b) = (TestServer::start(&text("a")).await, TestServer::start(&text("b")).await);
    for round in 0..5 {
        let customer = uid("two");
        // Both instances have the customer loaded (the pub/sub path).
        assert_eq!(check(&b.client(), &customer, "interview_minutes", 0).await["limit"], json!(300));
        let event_id = uid("evt");
        let s = Sub {
            event: &event_id,
            kind: "customer.subscription.created",
            created: now_secs(),
            sub: &format!("sub_two_{round}"),
            cus: "cus_two",
            customer: Some(&customer),
            status: "active",
            price: ("price_pro", None),
        };
        let body = subscription(&s).to_string();
        let header = sign(SECRET, now_secs(), body.as_bytes());
        let started = Instant::now();
        let (ca, cb) = (a.client(), b.client());
        let (ra, rb) = tokio::join!(deliver(&ca, &body, Some(&header)), deliver(&cb, &body, Some(&header)));
        let applied: Vec<bool> = [&ra, &rb]
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.body["applied"].as_bool().unwrap_or_else(|| panic!("{}", r.text)))
            .collect();
        // The loser answers 200 applied:false, or 503 while the winner is mid-apply (Stripe retries).
        for r in [&ra, &rb] {
            assert!(r.status == 200 || (r.status == 503 && r.code() == "unavailable"), "{}", r.text);
        }
        assert_eq!(applied.iter().filter(|&&x| x).count(), 1, "round {round}: applied exactly once: {} / {}", ra.text, rb.text);
        // A retry later, on either instance, is a duplicate.
        for s in [&a, &b] {
            let r = deliver(&s.client(), &body, Some(&sign(SECRET, now_secs(), body.as_bytes()))).await;
            assert_eq!((r.status.as_u16(), r.body["applied"].clone()), (200, json!(false)), "{}", r.text);
        }
        // An older event of the same subscription, on the other instance: recorded, not applied.
        let older_id = uid("evt-old");
        let older = Sub { event: &older_id, created: s.created - 100, price: ("x", Some("premium_monthly")), ..s };
        assert!(!send(&b.client(), &subscription(&older)).await, "round {round}: older than the applied event");
        // Both instances enforce the new plan within a second.
        for s in [&a, &b] {
            loop {
                if check(&s.client(), &customer, "interview_minutes", 0).await["limit"] == json!(800) {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(1), "round {round}: an instance still has the old plan after 1 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Delivers `body` until it is not 503 (as Stripe retries); returns `applied`.
async fn deliver_until_taken(c: &Client, body: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = deliver(c, body, Some(&sign(SECRET, now_secs(), body.as_bytes()))).await;
        if r.status == 200 {
            return r.body["applied"].as_bool().unwrap_or_else(|| panic!("{}", r.text));
        }
        assert!(r.status == 503 && Instant::now() < deadline, "{}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_events_of_one_subscription_racing_on_two_instances_end_in_created_order() {
    let redis = need!(RedisServer::start(false).await);
    let text = |instance: &str| {
        let with_id = config("5m").replacen("[server]\n", &format!("[server]\ninstance_id = \"{instance}\"\n"), 1);
        format!("{with_id}\n[redis]\nurl = \"{}\"\nsync_interval = \"50ms\"\nentitlements_ttl = \"2s\"\n", redis.url())
    };
    let (a, b) = (TestServer::start(&text("ra")).await, TestServer::start(&text("rb")).await);
    for round in 0..10 {
        let customer = uid("order");
        let t = now_secs();
        let (old_id, new_id, sub) = (uid("evt-old"), uid("evt-new"), format!("sub_order_{round}"));
        let base = Sub {
            event: &old_id,
            kind: "customer.subscription.updated",
            created: t,
            sub: &sub,
            cus: "cus_order",
            customer: Some(&customer),
            status: "active",
            price: ("price_pro", None),
        };
        let newer = Sub { event: &new_id, created: t + 1, price: ("x", Some("premium_monthly")), ..base };
        let (old_body, new_body) = (subscription(&base).to_string(), subscription(&newer).to_string());
        // Alternate which instance gets which, and which is sent first.
        let (ca, cb) = if round % 2 == 0 { (a.client(), b.client()) } else { (b.client(), a.client()) };
        let (old_applied, new_applied) = tokio::join!(deliver_until_taken(&ca, &old_body), deliver_until_taken(&cb, &new_body));
        assert!(new_applied, "round {round}: the newest event always applies");
        eprintln!("round {round}: older applied: {old_applied}");
        for s in [&a, &b] {
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                let plan = entitlements(&s.client(), &customer).await["plan"].clone();
                if plan == json!("premium") {
                    break;
                }
                assert!(Instant::now() < deadline, "round {round}: the older event won: {plan}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_of_one_event_apply_it_once() {
    let server = TestServer::start(&config("5m")).await;
    for round in 0..3 {
        let customer = uid("race");
        let event_id = uid("evt");
        let s = Sub {
            event: &event_id,
            kind: "customer.subscription.created",
            created: now_secs(),
            sub: &format!("sub_race_{round}"),
            cus: "cus_race",
            customer: Some(&customer),
            status: "active",
            price: ("price_pro", None),
        };
        let body = subscription(&s).to_string();
        let header = sign(SECRET, now_secs(), body.as_bytes());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, body, header) = (server.client(), body.clone(), header.clone());
            tasks.push(tokio::spawn(async move { deliver(&c, &body, Some(&header)).await }));
        }
        let mut applied = 0;
        for task in tasks {
            let r = task.await.unwrap_or_else(|e| panic!("delivery task: {e}"));
            match (r.status.as_u16(), r.body["applied"].as_bool()) {
                (200, Some(true)) => applied += 1,
                (200, Some(false)) => {}
                (503, _) if r.code() == "unavailable" => {}
                _ => panic!("unexpected answer: {} {}", r.status, r.text),
            }
        }
        assert_eq!(applied, 1, "round {round}: eight concurrent deliveries, one applied");
        assert_eq!(entitlements(&server.client(), &customer).await["plan"], json!("professional"));
    }
    let metrics = server.client().get("/metrics").await.text;
    let applied = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"meterd_stripe_webhooks_total{outcome="applied"} "#))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(applied.is_some_and(|n| n >= 3.0), "the outcome counter moves: {metrics}");
}
