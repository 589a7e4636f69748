//! The customer directory and catalog routes (`GET /v1/customers`, `/v1/plans`,
//! `/v1/meters`), `DELETE /v1/customers/{c}/entitlements`, and portal tokens:
//! good only for reading one customer's usage and history, refused everywhere
//! else, and only until they expire.

mod common;

use common::{event, ingest, put, uid, Client, Resp, TestServer, INTERVIEW};
use hyper::Method;
use serde_json::{json, Value};
use sha2::Digest;

const ADMIN: &str = "key-admin-all-scopes-20";
const INGEST: &str = "key-ingest-only-20";

fn keyed() -> String {
    let sha = |k: &str| hex::encode(sha2::Sha256::digest(k.as_bytes()));
    format!(
        "{INTERVIEW}\n[[auth.keys]]\nname = \"admin\"\nkey_sha256 = \"{}\"\nscopes = [\"ingest\", \"check\", \"read\", \"admin\"]\n\
         [[auth.keys]]\nname = \"ingest\"\nkey_sha256 = \"{}\"\nscopes = [\"ingest\"]\n",
        sha(ADMIN),
        sha(INGEST)
    )
}

async fn page(c: &Client, query: &str) -> Value {
    let r = c.get(&format!("/v1/customers?{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

fn names(page: &Value) -> Vec<String> {
    page["customers"].as_array().map(|a| a.iter().filter_map(|c| c["customer"].as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_listed_in_name_order_a_page_at_a_time() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let p = uid("dir");
    // Two with entitlements, two with usage only, in scrambled order.
    for (name, doc) in [("d", json!({"plan": "premium", "stripe_customer_id": "cus_d"})), ("a", json!({"plan": "professional"}))] {
        let r = put(&c, &format!("{p}-{name}"), doc).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    ingest(&c, json!([event(&format!("{p}-c"), "interviews", 1), event(&format!("{p}-b"), "interview_minutes", 2)])).await;
    ingest(&c, json!([event("other-customer", "interviews", 1)])).await;

    let all = page(&c, &format!("prefix={p}-")).await;
    assert_eq!(names(&all), ["a", "b", "c", "d"].map(|n| format!("{p}-{n}")));
    assert_eq!(all["next"], Value::Null);
    assert_eq!(all["customers"][0], json!({"customer": format!("{p}-a"), "plan": "professional", "stripe_customer_id": null}));
    assert_eq!(all["customers"][1]["plan"], json!("starter"), "usage only: the default plan");
    assert_eq!(all["customers"][3], json!({"customer": format!("{p}-d"), "plan": "premium", "stripe_customer_id": "cus_d"}));

    // Pages of 3, then the rest from the cursor.
    let first = page(&c, &format!("prefix={p}-&limit=3")).await;
    assert_eq!(names(&first), ["a", "b", "c"].map(|n| format!("{p}-{n}")));
    let cursor = first["next"].as_str().unwrap_or_else(|| panic!("no cursor: {first}")).to_string();
    let second = page(&c, &format!("prefix={p}-&limit=3&after={cursor}")).await;
    assert_eq!((names(&second), second["next"].clone()), (vec![format!("{p}-d")], Value::Null));

    for bad in ["limit=0", "limit=1001", "limit=x", "colour=red"] {
        let r = c.get(&format!("/v1/customers?{bad}")).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{bad}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_and_meters_are_listed_as_configured() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let r = c.get("/v1/plans").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let plans = r.body["plans"].as_array().cloned().unwrap_or_default();
    let listed: Vec<(&str, bool)> = plans.iter().map(|p| (p["name"].as_str().unwrap_or(""), p["default"] == json!(true))).collect();
    assert_eq!(listed, [("starter", true), ("professional", false), ("premium", false)]);
    assert_eq!(
        plans[0]["limits"]["interviews"],
        json!([{"limit": 3, "window": "day", "hard": true, "enforcement": "cached"}]),
        "the same shape as entitlements"
    );
    assert_eq!(plans[0]["features"], json!({"advanced_analytics": false}));
    let r = c.get("/v1/meters").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let minutes = r.body["meters"].as_array().and_then(|m| m.iter().find(|m| m["name"] == json!("interview_minutes")).cloned());
    assert_eq!(
        minutes,
        Some(json!({"name": "interview_minutes", "aggregation": "sum", "precision": 2, "stripe_event_name": "interview_minutes"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_entitlements_returns_to_the_default_plan_and_survives_a_restart() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let customer = uid("del");
    let r = put(&c, &customer, json!({"plan": "premium", "stripe_customer_id": "cus_del"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c.send(Method::DELETE, &format!("/v1/customers/{customer}/entitlements"), None, "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!((r.body["plan"].clone(), r.body["stripe_customer_id"].clone()), (json!("starter"), Value::Null));
    assert_eq!(common::check(&c, &customer, "interviews", 0).await["limit"], json!(3));
    assert!(!names(&page(&c, &format!("prefix={customer}")).await).contains(&customer), "no longer listed");
    let server = server.restart().await;
    let r = server.client().get(&format!("/v1/customers/{customer}/entitlements")).await;
    assert_eq!(r.body["plan"], json!("starter"), "deleted from the store, not only the cache");
}

async fn issue(c: &Client, customer: &str, expires_in: &str) -> Resp {
    c.post_json(&format!("/v1/customers/{customer}/portal-tokens"), &json!({"expires_in": expires_in})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_token_reads_one_customers_usage_and_nothing_else() {
    let server = TestServer::start(&keyed()).await;
    let admin = server.client().with_token(ADMIN);
    let (mine, theirs) = (uid("portal"), uid("other"));
    ingest(&admin, json!([event(&mine, "interviews", 1), event(&theirs, "interviews", 1)])).await;

    let r = issue(&server.client().with_token(INGEST), &mine, "1h").await;
    assert_eq!(r.status, 403, "issuing needs admin: {}", r.text);
    let r = issue(&admin, &mine, "1h").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = r.body["token"].as_str().unwrap_or_else(|| panic!("{}", r.text)).to_string();
    let expires_at = common::now_ms() + 3_600_000;
    let at = r.body["expires_at"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp_millis());
    assert!(at.is_some_and(|t| (t - expires_at).abs() < 5_000), "expires in an hour: {}", r.text);
    let portal = server.client().with_token(&token);

    // Its own customer's usage and history.
    let r = portal.get(&format!("/v1/customers/{mine}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["customer"], json!(mine));
    let day = 86_400_000;
    let history = |c: &str| {
        format!("/v1/usage?meter=interviews&from={}&to={}&granularity=day&customer={c}", common::now_ms() - day, common::now_ms() + day)
    };
    assert_eq!(portal.get(&history(&mine)).await.status, 200);

    // Another customer: 403. Without a customer, ingest, checks, admin and
    // other reads: the token is no key (401).
    for path in [format!("/v1/customers/{theirs}/usage"), history(&theirs)] {
        let r = portal.get(&path).await;
        assert_eq!((r.status.as_u16(), r.code()), (403, "forbidden"), "{path}: {}", r.text);
    }
    let refused = [
        portal.events(&event(&mine, "interviews", 1)).await,
        portal.check(&json!({"customer": mine, "meter": "interviews", "quantity": 1})).await,
        portal.put_json(&format!("/v1/customers/{mine}/entitlements"), &json!({"plan": "premium"})).await,
        portal.send(Method::DELETE, &format!("/v1/customers/{mine}/entitlements"), None, "").await,
        portal.get(&format!("/v1/customers/{mine}/entitlements")).await,
        issue(&portal, &mine, "30d").await,
        portal.get("/v1/customers").await,
        portal.get("/v1/plans").await,
        portal.get("/v1/stripe/status").await,
        portal.get(&format!("/v1/usage?meter=interviews&from={}&to={}", common::now_ms() - day, common::now_ms())).await,
    ];
    for r in refused {
        assert_eq!((r.status.as_u16(), r.code()), (401, "unauthorized"), "{}", r.text);
    }
    assert_eq!(common::check(&admin, &mine, "interviews", 0).await["used"], json!(1), "nothing was ingested with the token");

    // A forged token (its customer changed) and garbage are refused.
    let (_, mac) = token.split_once('.').unwrap_or_default();
    let forged = format!("mpt_{}.{mac}", hex::encode(format!("{{\"c\":\"{theirs}\",\"exp\":99999999999999}}")));
    let r = server.client().with_token(&forged).get(&format!("/v1/customers/{theirs}/usage")).await;
    assert_eq!(r.status, 401, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_token_expires() {
    let server = TestServer::start(&keyed()).await;
    let admin = server.client().with_token(ADMIN);
    let customer = uid("exp");
    for bad in ["0s", "31d", "soon"] {
        let r = issue(&admin, &customer, bad).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"), "{bad}: {}", r.text);
    }
    let r = issue(&admin, &customer, "1s").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let portal = server.client().with_token(r.body["token"].as_str().unwrap_or(""));
    let path = format!("/v1/customers/{customer}/usage");
    assert_eq!(portal.get(&path).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let r = portal.get(&path).await;
    assert_eq!((r.status.as_u16(), r.message_text()), (401, "portal token expired".to_string()), "{}", r.text);
    // A restart keeps the key (kept in data_dir): a fresh token from before it still reads.
    let token = issue(&admin, &customer, "1h").await.body["token"].as_str().unwrap_or("").to_string();
    let server = server.restart().await;
    assert_eq!(server.client().with_token(&token).get(&path).await.status, 200);
}

trait MessageText {
    fn message_text(&self) -> String;
}

impl MessageText for Resp {
    fn message_text(&self) -> String {
        self.body["error"]["message"].as_str().unwrap_or("").to_string()
    }
}
