//! The OpenAPI document (`docs/openapi.json`, served at `GET /openapi.json`)
//! held to the code, so it cannot drift: every route of the route table has its
//! operation and no operation is missing a route; the `Error` codes are the
//! code's [`CODES`]; each operation's scopes and portal-token flag are what the
//! running server enforces (every key of one scope, a portal token and no key
//! tried on every operation); and real answers of a running meterd, 2xx and
//! errors, for every operation, validate against the document's schemas.
//!
//! Schemas are checked by a small validator of the JSON Schema keywords the
//! document uses; a keyword it does not know fails the test, so the document
//! cannot grow a rule that goes unchecked here. (`scripts/test.d/20-openapi`
//! also runs the third-party validators: openapi-spec-validator and
//! schemathesis.)

mod common;

use common::{now_ms, uid, Client, Resp, TestServer};
use hyper::Method;
use meterd::http::error::CODES;
use meterd::http::handlers::OPENAPI;
use meterd::http::routes::ROUTES;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const CONFIG: &str = include_str!("openapi/meterd.toml");
const ALL: &str = "key-oa-admin-all-21";
const SCOPE_KEYS: [(&str, &str); 4] =
    [("ingest", "key-oa-ingest-21"), ("check", "key-oa-check-21"), ("read", "key-oa-read-21"), ("admin", "key-oa-admin-21")];
const STRIPE_SECRET: &str = "whsec_openapi_test_secret_21";
const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON")
}

/// Starts meterd with [`CONFIG`]; its secrets' variables set first.
async fn server() -> TestServer {
    // SAFETY (edition 2021: not unsafe): set before any server of this test
    // binary reads them, to the same values by every test.
    std::env::set_var("METERD_OPENAPI_STRIPE_SECRET", STRIPE_SECRET);
    std::env::set_var("METERD_OPENAPI_STRIPE_KEY", "sk_test_openapi_21");
    std::env::set_var("METERD_OPENAPI_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    TestServer::start(CONFIG).await
}

// ---------------------------------------------------------------------------
// a validator of the JSON Schema keywords the document uses

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = r.strip_prefix('#').and_then(|p| doc.pointer(p)).unwrap_or_else(|| panic!("unresolvable $ref {r}"));
            resolve(doc, target)
        }
        None => schema,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => panic!("unknown type {other}"),
    }
}

/// Every way `value` breaks `schema`, each with its JSON pointer.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    let Some(map) = schema.as_object() else { panic!("schema at {at} is not an object: {schema}") };
    let fail = |errors: &mut Vec<String>, why: String| errors.push(format!("{at}: {why} (value {value})"));
    for (keyword, rule) in map {
        match keyword.as_str() {
            "description" | "examples" | "required" | "additionalProperties" => {}
            "type" => {
                let ok = match rule {
                    Value::String(t) => type_ok(t, value),
                    Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().unwrap_or(""), value)),
                    _ => panic!("bad type at {at}"),
                };
                if !ok {
                    fail(errors, format!("is not of type {rule}"));
                }
            }
            "enum" => {
                if !rule.as_array().is_some_and(|a| a.contains(value)) {
                    fail(errors, format!("is not one of {rule}"));
                }
            }
            "const" => {
                if rule != value {
                    fail(errors, format!("is not {rule}"));
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" => {
                let (Some(bound), Some(v)) = (rule.as_f64(), value.as_f64()) else { continue };
                let ok = match keyword.as_str() {
                    "minimum" => v >= bound,
                    "maximum" => v <= bound,
                    _ => v > bound,
                };
                if !ok {
                    fail(errors, format!("breaks {keyword} {bound}"));
                }
            }
            "minLength" => {
                if value.as_str().is_some_and(|s| (s.chars().count() as u64) < rule.as_u64().unwrap_or(0)) {
                    fail(errors, format!("is shorter than {rule}"));
                }
            }
            "pattern" => {
                let p = rule.as_str().unwrap_or("");
                let prefix = p.strip_prefix('^').filter(|rest| rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                let prefix = prefix.unwrap_or_else(|| panic!("pattern {p} at {at}: only ^literal prefixes are supported here"));
                if value.as_str().is_some_and(|s| !s.starts_with(prefix)) {
                    fail(errors, format!("does not match {p}"));
                }
            }
            "maxItems" => {
                if value.as_array().is_some_and(|a| a.len() as u64 > rule.as_u64().unwrap_or(0)) {
                    fail(errors, format!("has more than {rule} items"));
                }
            }
            "maxProperties" => {
                if value.as_object().is_some_and(|o| o.len() as u64 > rule.as_u64().unwrap_or(0)) {
                    fail(errors, format!("has more than {rule} properties"));
                }
            }
            "properties" => {
                let Some(obj) = value.as_object() else { continue };
                let props = rule.as_object().expect("properties is an object");
                for (k, v) in obj {
                    match props.get(k) {
                        Some(s) => validate(doc, s, v, &format!("{at}/{k}"), errors),
                        None => match map.get("additionalProperties") {
                            Some(Value::Bool(false)) => errors.push(format!("{at}: unexpected property {k:?}")),
                            Some(s @ Value::Object(_)) => validate(doc, s, v, &format!("{at}/{k}"), errors),
                            _ => {}
                        },
                    }
                }
                for r in map.get("required").and_then(Value::as_array).into_iter().flatten() {
                    let r = r.as_str().unwrap_or("");
                    if !obj.contains_key(r) {
                        errors.push(format!("{at}: required property {r:?} is missing"));
                    }
                }
            }
            "items" => {
                for (i, v) in value.as_array().into_iter().flatten().enumerate() {
                    validate(doc, rule, v, &format!("{at}/{i}"), errors);
                }
            }
            "oneOf" | "anyOf" => {
                let passing = rule
                    .as_array()
                    .expect("an array of schemas")
                    .iter()
                    .filter(|s| {
                        let mut e = Vec::new();
                        validate(doc, s, value, at, &mut e);
                        e.is_empty()
                    })
                    .count();
                if (keyword == "oneOf" && passing != 1) || passing == 0 {
                    fail(errors, format!("matches {passing} of the {keyword} schemas"));
                }
            }
            "not" => {
                let mut e = Vec::new();
                validate(doc, rule, value, at, &mut e);
                if e.is_empty() {
                    fail(errors, format!("matches the `not` schema {rule}"));
                }
            }
            other => panic!("schema keyword {other:?} at {at} is not checked by tests/openapi.rs: teach `validate` it"),
        }
    }
    // additionalProperties on an object schema without `properties`.
    if !map.contains_key("properties") {
        if let (Some(obj), Some(s @ Value::Object(_))) = (value.as_object(), map.get("additionalProperties")) {
            for (k, v) in obj {
                validate(doc, s, v, &format!("{at}/{k}"), errors);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// operations

/// The document's operation for `method` on the route table path `path`.
fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    doc["paths"][path].get(method.to_ascii_lowercase()).unwrap_or_else(|| panic!("no operation {method} {path} in docs/openapi.json"))
}

/// Checks one real answer against its operation: the status is documented, and
/// the body (JSON) matches that status's schema. Returns the answer.
fn conforms(doc: &Value, method: &str, path: &str, r: Resp) -> Resp {
    let op = operation(doc, method, path);
    let status = r.status.as_u16().to_string();
    let response = op["responses"]
        .get(&status)
        .or_else(|| op["responses"].get("default"))
        .unwrap_or_else(|| panic!("{method} {path} answered {status}, which the document does not list: {}", r.text));
    let response = resolve(doc, response);
    if let Some(retry) = response.pointer("/headers/Retry-After") {
        assert!(retry.is_object());
        let value = r.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        assert!(value.is_some_and(|s| s >= 1), "{method} {path} {status}: Retry-After is documented, got {:?}", r.headers);
    }
    let content_type =
        r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").split(';').next().unwrap_or("").to_string();
    let media = response["content"]
        .get(&content_type)
        .unwrap_or_else(|| panic!("{method} {path} {status} answered {content_type:?}, not documented: {}", response["content"]));
    let schema = &media["schema"];
    let body = if content_type == "application/json" {
        serde_json::from_str::<Value>(&r.text).unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {}", r.text))
    } else {
        Value::String(r.text.clone())
    };
    let mut errors = Vec::new();
    validate(doc, schema, &body, "", &mut errors);
    assert!(errors.is_empty(), "{method} {path} {status}: the answer does not match its schema:\n{}\nbody: {}", errors.join("\n"), r.text);
    r
}

/// One request of an operation: method, route table path, the path to send,
/// and a JSON body.
struct Call {
    method: &'static str,
    route: &'static str,
    path: String,
    body: Option<Value>,
}

impl Call {
    fn new(method: &'static str, route: &'static str, path: impl Into<String>, body: Option<Value>) -> Call {
        Call { method, route, path: path.into(), body }
    }

    async fn send(&self, c: &Client, doc: &Value) -> Resp {
        let method = Method::from_bytes(self.method.as_bytes()).expect("method");
        let r = match &self.body {
            Some(b) => c.send(method, &self.path, Some("application/json"), b.to_string()).await,
            None => c.send(method, &self.path, None, bytes::Bytes::new()).await,
        };
        conforms(doc, self.method, self.route, r)
    }
}

/// A Stripe-Signature header for `body`, signed now.
fn stripe_signature(body: &str) -> String {
    let t = now_ms() / 1000;
    let mac = meterd::mac::hmac_sha256(STRIPE_SECRET.as_bytes(), &[t.to_string().as_bytes(), b".", body.as_bytes()]);
    format!("t={t},v1={}", hex::encode(mac))
}

async fn stripe_webhook(c: &Client, doc: &Value, body: &str, signature: Option<&str>) -> Resp {
    use http_body_util::{BodyExt, Full};
    let stream = common::connect_listening(c.addr).await.expect("meterd listens");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/webhooks/stripe")
        .header("host", "localhost")
        .header("content-type", "application/json");
    if let Some(s) = signature {
        req = req.header("stripe-signature", s);
    }
    let resp = sender.send_request(req.body(Full::new(bytes::Bytes::from(body.to_string()))).expect("request")).await.expect("answer");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes()).to_string();
    let r = Resp { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::Null), text };
    conforms(doc, "POST", "/v1/webhooks/stripe", r)
}

// ---------------------------------------------------------------------------
// the tests

#[test]
fn every_route_has_its_operation_and_every_operation_its_route() {
    let doc = doc();
    let table: BTreeSet<(String, String)> =
        ROUTES.iter().flat_map(|r| r.methods.iter().map(|(m, _)| (m.as_str().to_ascii_lowercase(), r.path.to_string()))).collect();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| METHODS.iter().filter(|m| item.get(**m).is_some()).map(|m| (m.to_string(), path.clone())))
        .collect();
    assert_eq!(table, documented, "the route table (left) and docs/openapi.json (right) disagree");
    let ids: Vec<&str> = documented.iter().map(|(m, p)| doc["paths"][p][m]["operationId"].as_str().expect("operationId")).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "operationIds are unique");
}

#[test]
fn error_codes_and_statuses_are_the_codes() {
    let doc = doc();
    let codes: Vec<&str> = doc
        .pointer("/components/schemas/Error/properties/error/properties/code/enum")
        .and_then(Value::as_array)
        .expect("code enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(codes, CODES.iter().map(|(c, _)| *c).collect::<Vec<_>>(), "Error.code must list meterd::http::error::CODES, in order");
    let statuses: BTreeSet<String> = CODES.iter().map(|(_, s)| s.to_string()).collect();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            for (status, response) in op["responses"].as_object().expect("responses") {
                // Successes, and the console's redirect and not-modified (no body).
                if status.starts_with('2') || status == "308" || status == "304" {
                    continue;
                }
                assert!(statuses.contains(status), "{method} {path}: {status} is no status of CODES");
                let schema = resolve(&doc, response).pointer("/content/application~1json/schema").expect("an error has a JSON body");
                assert_eq!(resolve(&doc, schema), &doc["components"]["schemas"]["Error"], "{method} {path} {status}: not the Error body");
            }
            // A /v1/ operation that takes a key: its errors include 401, 403, 429.
            if op.get("x-meterd-scopes").is_some() {
                for s in ["401", "403", "429", "503"] {
                    assert!(op["responses"].get(s).is_some(), "{method} {path} lacks {s}");
                }
            }
        }
    }
    // Scopes are the config's.
    let mut scopes = BTreeSet::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("path item").values() {
            for s in op["x-meterd-scopes"].as_array().into_iter().flatten() {
                scopes.insert(s.as_str().unwrap_or("").to_string());
            }
        }
    }
    assert_eq!(scopes, SCOPE_KEYS.iter().map(|(s, _)| s.to_string()).collect::<BTreeSet<_>>());
}

/// A call of every `/v1/` operation that needs a key, for customer `c`, with
/// ids made unique by `n`. The reservation `r` and grant `g` exist.
fn keyed_calls(c: &str, r: &str, g: &str, n: &str) -> Vec<Call> {
    let now = now_ms();
    vec![
        Call::new("POST", "/v1/events", "/v1/events", Some(json!({"id": format!("e-{n}"), "customer": c, "meter": "api_calls"}))),
        Call::new("POST", "/v1/check", "/v1/check", Some(json!({"customer": c, "meter": "minutes", "quantity": 0.5}))),
        Call::new("GET", "/v1/usage", format!("/v1/usage?meter=api_calls&from={}&to={}&customer={c}", now - 3_600_000, now + 60_000), None),
        Call::new("GET", "/v1/customers", "/v1/customers?limit=3", None),
        Call::new("GET", "/v1/customers/{customer}/usage", format!("/v1/customers/{c}/usage"), None),
        Call::new("GET", "/v1/customers/{customer}/entitlements", format!("/v1/customers/{c}/entitlements"), None),
        Call::new("PUT", "/v1/customers/{customer}/entitlements", format!("/v1/customers/{c}/entitlements"), Some(json!({}))),
        Call::new("DELETE", "/v1/customers/{customer}/entitlements", format!("/v1/customers/{c}/entitlements"), None),
        Call::new("GET", "/v1/customers/{customer}/grants", format!("/v1/customers/{c}/grants"), None),
        Call::new(
            "POST",
            "/v1/customers/{customer}/grants",
            format!("/v1/customers/{c}/grants"),
            Some(json!({"id": format!("g-{n}"), "meter": "tokens", "amount": 1})),
        ),
        Call::new("DELETE", "/v1/customers/{customer}/grants/{id}", format!("/v1/customers/{c}/grants/{g}"), None),
        Call::new("GET", "/v1/customers/{customer}/balances", format!("/v1/customers/{c}/balances"), None),
        Call::new("POST", "/v1/customers/{customer}/portal-tokens", format!("/v1/customers/{c}/portal-tokens"), Some(json!({}))),
        Call::new(
            "POST",
            "/v1/reservations",
            "/v1/reservations",
            Some(json!({"id": format!("r-{n}"), "customer": c, "meter": "interviews", "expires_in": "1h"})),
        ),
        Call::new("GET", "/v1/reservations", format!("/v1/reservations?customer={c}"), None),
        Call::new("GET", "/v1/reservations/{id}", format!("/v1/reservations/{r}"), None),
        Call::new("POST", "/v1/reservations/{id}/settle", format!("/v1/reservations/{r}/settle"), Some(json!({}))),
        Call::new("POST", "/v1/reservations/{id}/release", format!("/v1/reservations/{r}/release"), None),
        Call::new("GET", "/v1/stripe/status", "/v1/stripe/status", None),
        Call::new("GET", "/v1/plans", "/v1/plans", None),
        Call::new("GET", "/v1/meters", "/v1/meters", None),
        Call::new("GET", "/v1/notifications", "/v1/notifications?limit=5", None),
        Call::new("POST", "/v1/notifications/{id}/redeliver", "/v1/notifications/ntf_unknown/redeliver", None),
        Call::new(
            "POST",
            "/v1/adjustments",
            "/v1/adjustments",
            Some(json!({"id": format!("a-{n}"), "customer": c, "meter": "api_calls", "quantity": 1, "reason": "openapi test"})),
        ),
        Call::new("GET", "/v1/adjustments", format!("/v1/adjustments?customer={c}"), None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_portal_tokens_are_what_the_server_enforces() {
    let doc = doc();
    let server = server().await;
    let all = server.client().with_token(ALL);
    let c = uid("scoped");
    let r = all.post_json("/v1/reservations", &json!({"id": uid("res"), "customer": c, "meter": "interviews"})).await;
    let reservation = r.body["reservation"]["id"].as_str().unwrap_or_else(|| panic!("{}", r.text)).to_string();
    let g = all.post_json(&format!("/v1/customers/{c}/grants"), &json!({"id": uid("grant"), "meter": "tokens", "amount": 5})).await;
    let grant = g.body["id"].as_str().unwrap_or_else(|| panic!("{}", g.text)).to_string();
    let t = all.post_json(&format!("/v1/customers/{c}/portal-tokens"), &json!({})).await;
    let token = t.body["token"].as_str().unwrap_or_else(|| panic!("{}", t.text)).to_string();

    // Every keyed operation is in this list, and only those.
    let calls = keyed_calls(&c, &reservation, &grant, "x");
    let called: BTreeSet<(String, String)> = calls.iter().map(|k| (k.method.to_ascii_lowercase(), k.route.to_string())).collect();
    let keyed: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(_, op)| op.get("x-meterd-scopes").is_some())
                .map(|(m, _)| (m.clone(), p.clone()))
        })
        .collect();
    assert_eq!(called, keyed, "keyed_calls must try every operation that takes a key");

    let mut n = 0;
    for call in &calls {
        let op = operation(&doc, call.method, call.route);
        let scopes: Vec<&str> = op["x-meterd-scopes"].as_array().expect("scopes").iter().filter_map(Value::as_str).collect();
        let portal = op["x-meterd-portal-token"].as_bool().expect("portal flag");
        let security: Vec<Value> = op["security"].as_array().expect("security").clone();
        let mut expected: Vec<Value> = scopes.iter().map(|s| json!({"apiKey": [s]})).collect();
        if portal {
            expected.push(json!({"portalToken": []}));
        }
        assert_eq!(security, expected, "{} {}: security and x-meterd-scopes disagree", call.method, call.route);
        for (scope, key) in SCOPE_KEYS {
            n += 1;
            let fresh = keyed_calls(&c, &reservation, &grant, &format!("{scope}-{n}"));
            let call = fresh.iter().find(|k| k.method == call.method && k.route == call.route).expect("the same operation");
            let r = call.send(&server.client().with_token(key), &doc).await;
            if scopes.contains(&scope) {
                assert!(
                    ![401, 403].contains(&r.status.as_u16()),
                    "{} {} with a {scope} key: {} {}",
                    call.method,
                    call.route,
                    r.status,
                    r.text
                );
            } else {
                assert_eq!(r.status, 403, "{} {} with a {scope} key must be forbidden: {}", call.method, call.route, r.text);
            }
        }
        let r = call.send(&server.client(), &doc).await;
        assert_eq!(r.status, 401, "{} {} without a key: {}", call.method, call.route, r.text);
        let r = call.send(&server.client().with_token(&token), &doc).await;
        if portal {
            assert!(
                ![401, 403].contains(&r.status.as_u16()),
                "{} {} with a portal token: {} {}",
                call.method,
                call.route,
                r.status,
                r.text
            );
        } else {
            assert_eq!(r.status, 401, "{} {} with a portal token must be refused: {}", call.method, call.route, r.text);
        }
    }
    // A portal token of another customer: 403 where portal tokens are taken.
    let other = all.post_json("/v1/customers/someone-else/portal-tokens", &json!({})).await;
    let other = server.client().with_token(other.body["token"].as_str().unwrap_or(""));
    let r = Call::new("GET", "/v1/customers/{customer}/usage", format!("/v1/customers/{c}/usage"), None).send(&other, &doc).await;
    assert_eq!(r.status, 403, "{}", r.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_of_every_operation_match_the_document() {
    let doc = doc();
    let server = server().await;
    let c = server.client().with_token(ALL);
    let anon = server.client();
    let cust = uid("oa");
    let ok = |r: &Resp, want: u16| assert_eq!(r.status.as_u16(), want, "{}", r.text);

    // The served document is the committed one.
    let r = Call::new("GET", "/openapi.json", "/openapi.json", None).send(&anon, &doc).await;
    ok(&r, 200);
    assert_eq!(r.body, doc);
    ok(&Call::new("GET", "/healthz", "/healthz", None).send(&anon, &doc).await, 200);
    ok(&Call::new("GET", "/readyz", "/readyz", None).send(&anon, &doc).await, 200);
    ok(&Call::new("GET", "/metrics", "/metrics", None).send(&anon, &doc).await, 200);
    // The console's files (issue 22): each content type documented; unknown is 404.
    for file in ["index.html", "console.js", "console.css", "favicon.svg", "widget.js", "settings.json"] {
        ok(&Call::new("GET", "/ui/{file}", format!("/ui/{file}"), None).send(&anon, &doc).await, 200);
    }
    ok(&Call::new("GET", "/ui/{file}", "/ui/nope.js", None).send(&anon, &doc).await, 404);
    let r = anon.get("/ui").await;
    assert_eq!(r.status, 308, "{}", r.text);
    assert!(operation(&doc, "GET", "/ui")["responses"].get("308").is_some());

    // Events: one, an array, NDJSON; an invalid batch with details; 415.
    let ev = |id: String, meter: &str, q: Value| json!({"id": id, "customer": cust, "meter": meter, "quantity": q, "properties": {"region": "eu"}});
    let r = Call::new("POST", "/v1/events", "/v1/events", Some(ev(uid("e"), "api_calls", json!(3)))).send(&c, &doc).await;
    ok(&r, 202);
    let batch = json!([
        ev(uid("e"), "minutes", json!(1.25)),
        ev(uid("e"), "storage_gb", json!(2.5)),
        ev(uid("e"), "peak", json!(7)),
        ev(uid("e"), "interviews", json!(1))
    ]);
    ok(&Call::new("POST", "/v1/events", "/v1/events", Some(batch)).send(&c, &doc).await, 202);
    let ndjson = format!("{}\n\n{}\n", ev(uid("e"), "api_calls", json!(1)), ev(uid("e"), "api_calls", json!(2)));
    let r = conforms(&doc, "POST", "/v1/events", c.send(Method::POST, "/v1/events", Some("application/x-ndjson"), ndjson).await);
    ok(&r, 202);
    let bad = json!([{"id": "", "customer": cust, "meter": "nope", "quantity": -1}]);
    let r = Call::new("POST", "/v1/events", "/v1/events", Some(bad)).send(&c, &doc).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_event"), "{}", r.text);
    let r = conforms(&doc, "POST", "/v1/events", c.send(Method::POST, "/v1/events", Some("text/plain"), "x").await);
    ok(&r, 415);
    let r = conforms(&doc, "POST", "/v1/events", c.send(Method::POST, "/v1/events", Some("application/json"), "{").await);
    assert_eq!(r.code(), "invalid_json");

    // Checks: each kind of limit and reason.
    for (meter, q, consume) in [
        ("minutes", json!(2.5), true),
        ("api_calls", json!(1), false),
        ("peak", json!(1), false),
        ("storage_gb", json!(20), false),
        ("tokens", json!(1), false),
    ] {
        let body = json!({"customer": cust, "meter": meter, "quantity": q, "consume": consume, "id": uid("chk")});
        ok(&Call::new("POST", "/v1/check", "/v1/check", Some(body)).send(&c, &doc).await, 200);
    }
    let r = Call::new("POST", "/v1/check", "/v1/check", Some(json!({"customer": cust, "meter": "minutes", "consume": true})))
        .send(&c, &doc)
        .await;
    assert_eq!(r.code(), "invalid_request");
    // Two interviews of 3 a day: past 50 %, a notification.
    for _ in 0..2 {
        let body = json!({"customer": cust, "meter": "interviews", "consume": true, "id": uid("iv")});
        ok(&Call::new("POST", "/v1/check", "/v1/check", Some(body)).send(&c, &doc).await, 200);
    }

    // Usage.
    let now = now_ms();
    for q in [
        format!("meter=minutes&from={}&to={}&granularity=minute", now - 600_000, now + 60_000),
        format!("meter=api_calls&from={}&to={}&customer={cust}", now - 7_200_000, now + 60_000),
    ] {
        ok(&Call::new("GET", "/v1/usage", format!("/v1/usage?{q}"), None).send(&c, &doc).await, 200);
    }
    let r = Call::new("GET", "/v1/usage", "/v1/usage?meter=minutes", None).send(&c, &doc).await;
    ok(&r, 400);
    ok(&Call::new("GET", "/v1/customers/{customer}/usage", format!("/v1/customers/{cust}/usage"), None).send(&c, &doc).await, 200);

    // Entitlements.
    let ent = format!("/v1/customers/{cust}/entitlements");
    ok(&Call::new("GET", "/v1/customers/{customer}/entitlements", ent.clone(), None).send(&c, &doc).await, 200);
    let put = json!({"plan": "premium", "overrides": {"interviews": [{"limit": 5, "window": "day"}, {"limit": "unlimited", "window": "month"}], "tokens": {"limit": "credits", "low_balance": 3}},
                     "features": {"beta": true}, "stripe_customer_id": "cus_oa", "billing_anchor": "2026-11-15T00:00:00Z"});
    ok(&Call::new("PUT", "/v1/customers/{customer}/entitlements", ent.clone(), Some(put)).send(&c, &doc).await, 200);
    let r = Call::new("PUT", "/v1/customers/{customer}/entitlements", ent.clone(), Some(json!({"plan": "nope"}))).send(&c, &doc).await;
    ok(&r, 400);
    ok(&Call::new("GET", "/v1/customers", "/v1/customers?prefix=oa-&limit=2", None).send(&c, &doc).await, 200);
    ok(&Call::new("DELETE", "/v1/customers/{customer}/entitlements", ent.clone(), None).send(&c, &doc).await, 200);
    ok(&Call::new("GET", "/v1/plans", "/v1/plans", None).send(&c, &doc).await, 200);
    ok(&Call::new("GET", "/v1/meters", "/v1/meters", None).send(&c, &doc).await, 200);

    // Credits.
    let grants = format!("/v1/customers/{cust}/grants");
    let gid = uid("g");
    let grant =
        json!({"id": gid, "meter": "tokens", "amount": 50, "priority": 5, "expires_at": "2099-01-01T00:00:00Z", "reason": "top-up"});
    ok(&Call::new("POST", "/v1/customers/{customer}/grants", grants.clone(), Some(grant.clone())).send(&c, &doc).await, 201);
    ok(&Call::new("POST", "/v1/customers/{customer}/grants", grants.clone(), Some(grant)).send(&c, &doc).await, 200);
    let changed = json!({"id": gid, "meter": "tokens", "amount": 51});
    ok(&Call::new("POST", "/v1/customers/{customer}/grants", grants.clone(), Some(changed)).send(&c, &doc).await, 409);
    let body = json!({"customer": cust, "meter": "tokens", "quantity": 4, "consume": true, "id": uid("tok")});
    ok(&Call::new("POST", "/v1/check", "/v1/check", Some(body)).send(&c, &doc).await, 200);
    ok(&Call::new("GET", "/v1/customers/{customer}/grants", format!("{grants}?meter=tokens"), None).send(&c, &doc).await, 200);
    ok(&Call::new("GET", "/v1/customers/{customer}/balances", format!("/v1/customers/{cust}/balances"), None).send(&c, &doc).await, 200);
    ok(&Call::new("DELETE", "/v1/customers/{customer}/grants/{id}", format!("{grants}/{gid}"), None).send(&c, &doc).await, 200);
    ok(&Call::new("DELETE", "/v1/customers/{customer}/grants/{id}", format!("{grants}/nope"), None).send(&c, &doc).await, 404);

    // Reservations.
    let (held, kept) = (uid("r"), uid("r"));
    let reserve =
        |id: &str, q: Value, exp: Value| json!({"id": id, "customer": cust, "meter": "minutes", "quantity": q, "expires_in": exp});
    ok(&Call::new("POST", "/v1/reservations", "/v1/reservations", Some(reserve(&held, json!(1.5), json!("1h")))).send(&c, &doc).await, 200);
    ok(&Call::new("POST", "/v1/reservations", "/v1/reservations", Some(reserve(&kept, json!(1), Value::Null))).send(&c, &doc).await, 200);
    ok(&Call::new("POST", "/v1/reservations", "/v1/reservations", Some(reserve(&held, json!(2), json!("1h")))).send(&c, &doc).await, 409);
    ok(&Call::new("GET", "/v1/reservations/{id}", format!("/v1/reservations/{held}"), None).send(&c, &doc).await, 200);
    ok(&Call::new("GET", "/v1/reservations/{id}", "/v1/reservations/nope", None).send(&c, &doc).await, 404);
    let settle = json!({"quantity": 1.25});
    ok(
        &Call::new("POST", "/v1/reservations/{id}/settle", format!("/v1/reservations/{held}/settle"), Some(settle)).send(&c, &doc).await,
        200,
    );
    ok(&Call::new("POST", "/v1/reservations/{id}/release", format!("/v1/reservations/{kept}/release"), None).send(&c, &doc).await, 200);
    ok(&Call::new("POST", "/v1/reservations/{id}/settle", format!("/v1/reservations/{kept}/settle"), None).send(&c, &doc).await, 409);
    // Listed: one held (an allocation), then settled and released ones.
    let (open, list) = (uid("r"), format!("/v1/reservations?customer={cust}"));
    ok(&Call::new("POST", "/v1/reservations", "/v1/reservations", Some(reserve(&open, json!(0.5), Value::Null))).send(&c, &doc).await, 200);
    let r = Call::new("GET", "/v1/reservations", list.clone(), None).send(&c, &doc).await;
    ok(&r, 200);
    let mut statuses: Vec<&str> = r.body["reservations"].as_array().into_iter().flatten().filter_map(|x| x["status"].as_str()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, ["held", "released", "settled"], "{}", r.text);
    let r = Call::new("GET", "/v1/reservations", format!("{list}&meter=minutes&status=held&limit=10"), None).send(&c, &doc).await;
    ok(&r, 200);
    assert_eq!(r.body["reservations"][0]["id"], json!(open), "{}", r.text);
    ok(&Call::new("GET", "/v1/reservations", format!("{list}&limit=0"), None).send(&c, &doc).await, 400);
    ok(&Call::new("GET", "/v1/reservations", "/v1/reservations", None).send(&c, &doc).await, 400);

    // Adjustments.
    let adj = json!({"id": uid("a"), "customer": cust, "meter": "api_calls", "quantity": -1, "reason": "refund"});
    ok(&Call::new("POST", "/v1/adjustments", "/v1/adjustments", Some(adj.clone())).send(&c, &doc).await, 202);
    ok(&Call::new("POST", "/v1/adjustments", "/v1/adjustments", Some(adj)).send(&c, &doc).await, 202);
    let below = json!({"id": uid("a"), "customer": cust, "meter": "api_calls", "quantity": -1000, "reason": "too much"});
    ok(&Call::new("POST", "/v1/adjustments", "/v1/adjustments", Some(below)).send(&c, &doc).await, 400);
    ok(&Call::new("GET", "/v1/adjustments", format!("/v1/adjustments?customer={cust}&limit=10"), None).send(&c, &doc).await, 200);

    // Portal tokens.
    let r = Call::new(
        "POST",
        "/v1/customers/{customer}/portal-tokens",
        format!("/v1/customers/{cust}/portal-tokens"),
        Some(json!({"expires_in": "5m"})),
    )
    .send(&c, &doc)
    .await;
    ok(&r, 200);

    // A blank body is no body (tests/openapi/schemathesis.toml relies on it).
    let blank = c.send(Method::POST, &format!("/v1/customers/{cust}/portal-tokens"), Some("application/json"), " \n").await;
    ok(&conforms(&doc, "POST", "/v1/customers/{customer}/portal-tokens", blank), 200);

    // Notifications: the interviews crossing is listed, and redelivered.
    let r = Call::new("GET", "/v1/notifications", format!("/v1/notifications?customer={cust}"), None).send(&c, &doc).await;
    ok(&r, 200);
    let id = r.body["notifications"][0]["id"].as_str().unwrap_or_else(|| panic!("no notification: {}", r.text)).to_string();
    ok(&Call::new("POST", "/v1/notifications/{id}/redeliver", format!("/v1/notifications/{id}/redeliver"), None).send(&c, &doc).await, 202);
    ok(&Call::new("POST", "/v1/notifications/{id}/redeliver", "/v1/notifications/ntf_nope/redeliver", None).send(&c, &doc).await, 404);

    // Stripe.
    let r = Call::new("GET", "/v1/stripe/status", "/v1/stripe/status", None).send(&c, &doc).await;
    ok(&r, 200);
    assert_eq!(r.body["enabled"], true, "reporting is configured: {}", r.text);
    let event = json!({"id": uid("evt"), "type": "invoice.paid", "created": now / 1000, "data": {"object": {}}}).to_string();
    let r = stripe_webhook(&anon, &doc, &event, Some(&stripe_signature(&event))).await;
    ok(&r, 200);
    let r = stripe_webhook(&anon, &doc, &event, Some("t=1,v1=00")).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_signature"), "{}", r.text);

    // Auth errors.
    let r = Call::new("GET", "/v1/plans", "/v1/plans", None).send(&anon, &doc).await;
    ok(&r, 401);
    let r = Call::new("GET", "/v1/plans", "/v1/plans", None).send(&server.client().with_token("key-oa-ingest-21"), &doc).await;
    ok(&r, 403);
    server.stop().await;
}
