//! Every error of docs/api.md's error table, with its status, code and JSON body shape;
//! batch atomicity; and the success shapes of `POST /v1/events`.

mod common;

use common::{message, now_ms, uid, Client, Resp, TestServer, INTERVIEW};
use hyper::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// helpers

/// Asserts `r` is an API error: `status`, `code`, and exactly the body shape
/// `{"error": {"code", "message"[, "details"]}}` with a non-empty message.
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "wrong status: {}", r.text);
    let ct = r.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}: {}", r.text);
    let top = r.body.as_object().unwrap_or_else(|| panic!("body is not a JSON object: {:?}", r.text));
    assert_eq!(top.keys().collect::<Vec<_>>(), vec!["error"], "{}", r.text);
    let err = r.body["error"].as_object().unwrap_or_else(|| panic!("error is not an object: {}", r.text));
    for k in err.keys() {
        assert!(matches!(k.as_str(), "code" | "message" | "details"), "unexpected key {k:?}: {}", r.text);
    }
    assert_eq!(err.get("code").and_then(Value::as_str), Some(code), "{}", r.text);
    let message = err.get("message").and_then(Value::as_str).unwrap_or("");
    assert!(!message.is_empty(), "empty message: {}", r.text);
    if let Some(d) = err.get("details") {
        assert!(d.is_array(), "details is not an array: {}", r.text);
    }
}

/// Asserts an error whose message names `needle`.
fn assert_error_naming(r: &Resp, status: u16, code: &str, needle: &str) {
    assert_error(r, status, code);
    assert!(message(r).contains(needle), "message does not name {needle:?}: {}", r.text);
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).expect("valid ts").to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn ev(customer: &str, quantity: Value) -> Value {
    json!({"id": uid("ev"), "customer": customer, "meter": "interview_minutes", "quantity": quantity})
}

/// The `used` of `meter` in the customer's usage summary (first row).
async fn used(c: &Client, customer: &str, meter: &str) -> f64 {
    let r = c.get(&format!("/v1/customers/{customer}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rows = r.body["meters"].as_array().unwrap_or_else(|| panic!("no meters: {}", r.text));
    let row = rows.iter().find(|row| row["meter"] == meter).unwrap_or_else(|| panic!("no row for {meter}: {}", r.text));
    row["used"].as_f64().unwrap_or_else(|| panic!("used is not a number: {}", r.text))
}

async fn post_raw(c: &Client, ct: Option<&str>, body: impl Into<bytes::Bytes>) -> Resp {
    c.send(Method::POST, "/v1/events", ct, body).await
}

/// `(index, field)` pairs of an invalid_event answer, checking each detail's shape.
fn detail_pairs(r: &Resp) -> Vec<(u64, String, String)> {
    assert_error(r, 400, "invalid_event");
    let details = r.body["error"]["details"].as_array().unwrap_or_else(|| panic!("no details: {}", r.text));
    details
        .iter()
        .map(|d| {
            let o = d.as_object().unwrap_or_else(|| panic!("detail not an object: {d}"));
            let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, vec!["field", "index", "reason"], "detail shape: {d}");
            let reason = d["reason"].as_str().expect("reason is a string").to_string();
            assert!(!reason.is_empty(), "empty reason: {d}");
            (d["index"].as_u64().expect("index is an integer"), d["field"].as_str().expect("field is a string").to_string(), reason)
        })
        .collect()
}

fn has(pairs: &[(u64, String, String)], index: u64, field: &str, reason_part: &str) -> bool {
    pairs.iter().any(|(i, f, r)| *i == index && f == field && r.to_lowercase().contains(&reason_part.to_lowercase()))
}

fn limited_config() -> String {
    format!("{INTERVIEW}\n[ingest]\nmax_body_bytes = 2048\nmax_batch_events = 10\n")
}

// ---------------------------------------------------------------------------
// 400 invalid_json

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_bodies() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    for body in
        [&b"{"[..], b"[{\"id\": \"a\", ", b"not json", b"", b"{\"id\": \"a\"} {\"id\": \"b\"}", b"[1, 2,]", b"{\"id\": \"\xff\xfe\"}"]
    {
        let r = post_raw(&c, Some("application/json"), body.to_vec()).await;
        assert_error(&r, 400, "invalid_json");
    }

    // NDJSON: the message names the bad line (blank lines count as lines).
    let good = ev("nd_bad", json!(1)).to_string();
    let body = format!("{good}\n\n{{\"id\": broken\n{good}\n");
    let r = post_raw(&c, Some("application/x-ndjson"), body).await;
    assert_error_naming(&r, 400, "invalid_json", "line 3");
    // Nothing of it was accepted.
    assert_eq!(used(&c, "nd_bad", "interview_minutes").await, 0.0);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 400 invalid_event

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_list_every_bad_event() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();

    // 3 bad events among 5.
    let batch = json!([
        ev("ie_a", json!(1)),
        {"id": uid("x"), "customer": "ie_a", "meter": "nope"},
        {"customer": "ie_a", "meter": "interview_minutes"},
        ev("ie_a", json!(2)),
        ev("ie_a", json!(-3)),
    ]);
    let r = c.events(&batch).await;
    let pairs = detail_pairs(&r);
    let indexes: BTreeSet<u64> = pairs.iter().map(|p| p.0).collect();
    assert_eq!(indexes, BTreeSet::from([1, 2, 4]), "{}", r.text);
    assert!(has(&pairs, 1, "meter", "nope"), "{}", r.text);
    assert!(has(&pairs, 2, "id", "required"), "{}", r.text);
    assert!(has(&pairs, 4, "quantity", "negative"), "{}", r.text);

    // Every kind of field problem, several in one event.
    let now = now_ms();
    let many_props: serde_json::Map<String, Value> = (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let batch = json!([
        // 0: valid
        ev("ie_b", json!(1)),
        // 1: unknown field, missing id, control char in customer, unknown meter
        {"customer": "a\u{1}b", "meter": "nope", "bogus": 1},
        // 2: valid
        ev("ie_b", json!(2.5)),
        // 3: id > 128 bytes, customer > 256 bytes, too many decimals, future timestamp
        {"id": "i".repeat(129), "customer": "c".repeat(257), "meter": "interview_minutes",
         "quantity": 1.234, "timestamp": rfc3339(now + 10 * 60_000)},
        // 4: non-number quantity, timestamp older than 35 days
        {"id": uid("x"), "customer": "ie_b", "meter": "interview_minutes", "quantity": "ten",
         "timestamp": now - 36 * 86_400_000},
        // 5: bad timestamp string, > 32 properties
        {"id": uid("x"), "customer": "ie_b", "meter": "interview_minutes", "timestamp": "yesterday",
         "properties": many_props},
        // 6: non-string property value
        {"id": uid("x"), "customer": "ie_b", "meter": "interview_minutes", "properties": {"a": 1}},
        // 7: property key > 64 bytes
        {"id": uid("x"), "customer": "ie_b", "meter": "interview_minutes", "properties": {"k".repeat(65): "v"}},
        // 8: property value > 256 bytes
        {"id": uid("x"), "customer": "ie_b", "meter": "interview_minutes", "properties": {"k": "v".repeat(257)}},
        // 9: negative quantity; empty id
        {"id": "", "customer": "ie_b", "meter": "interview_minutes", "quantity": -1},
        // 10: valid, with properties and an RFC 3339 timestamp
        {"id": uid("x"), "customer": "ie_b", "meter": "interview_minutes", "quantity": 0.25,
         "timestamp": rfc3339(now - 1000), "properties": {"k": "v"}},
        // 11: an event that is not an object
        42,
    ]);
    let r = c.events(&batch).await;
    let pairs = detail_pairs(&r);
    let indexes: BTreeSet<u64> = pairs.iter().map(|p| p.0).collect();
    assert_eq!(indexes, BTreeSet::from([1, 3, 4, 5, 6, 7, 8, 9, 11]), "{}", r.text);
    for (index, field, reason) in [
        (1, "bogus", "unknown"),
        (1, "id", "required"),
        (1, "customer", "control"),
        (1, "meter", "unknown"),
        (3, "id", "128"),
        (3, "customer", "256"),
        (3, "quantity", "decimal"),
        (3, "timestamp", "future"),
        (4, "quantity", "number"),
        (4, "timestamp", "older"),
        (5, "timestamp", ""),
        (5, "properties", "32"),
        (6, "properties", "string"),
        (7, "properties", "64"),
        (8, "properties", "256"),
        (9, "quantity", "negative"),
        (9, "id", "128"),
    ] {
        assert!(has(&pairs, index, field, reason), "missing ({index}, {field}, ~{reason}) in {}", r.text);
    }
    // A batch with problems is refused whole.
    assert_eq!(used(&c, "ie_b", "interview_minutes").await, 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_event_details_are_capped_at_100() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let batch: Vec<Value> = (0..150).map(|_| json!({"id": uid("cap"), "customer": "cap", "meter": "no_such_meter"})).collect();
    let r = c.events(&Value::Array(batch)).await;
    let pairs = detail_pairs(&r);
    assert_eq!(pairs.len(), 100, "{}", r.text);
    let indexes: BTreeSet<u64> = pairs.iter().map(|p| p.0).collect();
    assert_eq!(indexes, (0..100).collect::<BTreeSet<u64>>());
    assert!(pairs.iter().all(|p| p.1 == "meter"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_batch_is_atomic_and_valid_events_can_be_resent() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let customer = "atomic_1";
    // Some usage before, so "unchanged" is not just "zero".
    let r = c.events(&ev(customer, json!(1.5))).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(used(&c, customer, "interview_minutes").await, 1.5);

    let a = ev(customer, json!(5));
    let b = ev(customer, json!(7.25));
    let bad = json!({"id": uid("bad"), "customer": customer, "meter": "interview_minutes", "quantity": 1.001});
    for body in [json!([a, bad, b]), json!([a, b, bad])] {
        let r = c.events(&body).await;
        let pairs = detail_pairs(&r);
        assert_eq!(pairs.len(), 1, "{}", r.text);
        assert_eq!(pairs[0].1, "quantity");
        assert_eq!(used(&c, customer, "interview_minutes").await, 1.5, "a refused batch changed usage");
    }
    // The same via NDJSON.
    let nd = format!("{a}\n{bad}\n{b}\n");
    let r = post_raw(&c, Some("application/x-ndjson"), nd).await;
    let pairs = detail_pairs(&r);
    assert_eq!(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1], "{}", r.text);
    assert_eq!(used(&c, customer, "interview_minutes").await, 1.5);

    // The valid events alone: accepted, not duplicates of the refused batch.
    let r = c.events(&json!([a, b])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 2, "duplicates": 0}));
    assert_eq!(used(&c, customer, "interview_minutes").await, 13.75);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 400 invalid_request

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_check_requests() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    for (body, needle) in [
        (json!({"meter": "interviews"}), "customer"),
        (json!({"customer": "u", "meter": "no_such_meter"}), "meter"),
        (json!({"customer": "u"}), "meter"),
        (json!({"customer": "u", "meter": "interview_minutes", "quantity": "ten"}), "quantity"),
        (json!({"customer": "u", "meter": "interview_minutes", "quantity": -2}), "quantity"),
        (json!({"customer": "u", "meter": "interview_minutes", "quantity": 1.001}), "quantity"),
        (json!({"customer": "u", "meter": "interviews", "consume": true}), "id"),
        (json!({"customer": "u", "meter": "interviews", "consume": true, "id": ""}), "id"),
        (json!({"customer": "u", "meter": "interviews", "consume": true, "id": "x".repeat(129)}), "id"),
        (json!({"customer": "u", "meter": "interviews", "bogus_field": 1}), "bogus_field"),
        (json!({"customer": "u", "meter": "interviews", "consume": "yes"}), "consume"),
        (json!({"customer": 5, "meter": "interviews"}), "customer"),
    ] {
        let r = c.check(&body).await;
        assert_error_naming(&r, 400, "invalid_request", needle);
    }
    // Broken JSON on /v1/check is invalid_json (API.md); a non-object body is an
    // invalid request.
    let r = c.send(Method::POST, "/v1/check", Some("application/json"), "{\"customer\":").await;
    assert_error(&r, 400, "invalid_json");
    let r = c.send(Method::POST, "/v1/check", Some("application/json"), "[1]").await;
    assert_error(&r, 400, "invalid_request");
    // A consume without id recorded nothing.
    let r = c.check(&json!({"customer": "u", "meter": "interviews"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["used"].as_f64(), Some(0.0), "{}", r.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_entitlements_requests() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let path = "/v1/customers/ent_1/entitlements";
    for (body, needles) in [
        (json!({"plan": "gold"}), vec!["plan", "gold"]),
        (json!({"overrides": {"no_such_meter": {"limit": 1, "window": "day"}}}), vec!["overrides.no_such_meter"]),
        (json!({"overrides": {"interviews": [{"limit": 10, "window": "fortnight"}]}}), vec!["overrides.interviews", "window"]),
        (json!({"overrides": {"interviews": {"limit": 10, "window": "week"}}}), vec!["overrides.interviews", "window"]),
        (json!({"plan": "premium", "billing_anchor": "soon"}), vec!["billing_anchor"]),
        (json!({"plan": "premium", "bogus_field": 1}), vec!["bogus_field"]),
    ] {
        let r = c.put_json(path, &body).await;
        for needle in needles {
            assert_error_naming(&r, 400, "invalid_request", needle);
        }
    }
    // Nothing was stored: the customer is still on the default plan.
    let r = c.get(path).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["plan"], "starter", "{}", r.text);
    // And a correct PUT works.
    let r = c.put_json(path, &json!({"plan": "premium", "overrides": {"interviews": [{"limit": 10, "window": "day"}]}})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["plan"], "premium", "{}", r.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_usage_queries() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let now = now_ms();
    let from = rfc3339(now - 3_600_000);
    let to = rfc3339(now);
    let far = rfc3339(now - 30 * 86_400_000);
    for (query, needle) in [
        (format!("from={from}&to={to}"), "meter"),
        (format!("meter=no_such_meter&from={from}&to={to}"), "meter"),
        (format!("meter=interviews&from=yesterday&to={to}"), "from"),
        (format!("meter=interviews&from={from}&to=later"), "to"),
        (format!("meter=interviews&to={to}"), "from"),
        (format!("meter=interviews&from={to}&to={from}"), "from"),
        (format!("meter=interviews&from={to}&to={to}"), "from"),
        (format!("meter=interviews&from={from}&to={to}&granularity=week"), "granularity"),
        (format!("meter=interviews&from={far}&to={to}&granularity=minute"), "granularity"),
        (format!("meter=interviews&from={from}&to={to}&bogus=1"), "bogus"),
    ] {
        let r = c.get(&format!("/v1/usage?{query}")).await;
        // "range too large" names "to" (the bound that makes it too large); accept
        // either spelling for that one but require a field name.
        if needle == "granularity" && query.contains(&far) {
            assert_error(&r, 400, "invalid_request");
            let m = message(&r);
            assert!(m.contains("to") || m.contains("granularity") || m.contains("from"), "{}", r.text);
            assert!(m.contains("minute"), "message should say the granularity is too fine: {}", r.text);
        } else {
            assert_error_naming(&r, 400, "invalid_request", needle);
        }
    }
    // A correct query answers.
    let r = c.get(&format!("/v1/usage?meter=interviews&from={from}&to={to}&granularity=minute")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["meter"], "interviews", "{}", r.text);
    assert!(r.body["data"].is_array(), "{}", r.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 404, 405

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    for (method, path) in [
        (Method::GET, "/nope"),
        (Method::GET, "/v1/nope"),
        (Method::POST, "/v2/events"),
        (Method::GET, "/v1/customers/u1"),
        (Method::GET, "/v1/customers/u1/nope"),
        (Method::GET, "/"),
    ] {
        let r = c.send(method, path, None, bytes::Bytes::new()).await;
        assert_error(&r, 404, "not_found");
    }
    for (method, path, allow) in [
        (Method::GET, "/v1/events", "POST"),
        (Method::PUT, "/v1/events", "POST"),
        (Method::DELETE, "/v1/check", "POST"),
        (Method::GET, "/v1/check", "POST"),
        (Method::POST, "/v1/usage", "GET"),
        (Method::POST, "/v1/customers/u1/usage", "GET"),
        // DELETE is a route since issue 20.
        (Method::POST, "/v1/customers/u1/entitlements", "GET, PUT, DELETE"),
        (Method::POST, "/healthz", "GET"),
    ] {
        let r = c.send(method.clone(), path, None, bytes::Bytes::new()).await;
        assert_error(&r, 405, "method_not_allowed");
        let got = r.headers.get("allow").and_then(|v| v.to_str().ok()).unwrap_or("");
        let got: BTreeSet<&str> = got.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let want: BTreeSet<&str> = allow.split(',').map(str::trim).collect();
        assert_eq!(got, want, "Allow header of {method} {path}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 413

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_too_large_by_bytes_and_by_events() {
    let server = TestServer::start(&limited_config()).await;
    let c = server.client();

    // (a) Over max_body_bytes with a Content-Length, as JSON and NDJSON: refused
    // whatever the content.
    let big: Vec<Value> = (0..9)
        .map(|_| json!({"id": uid("big"), "customer": "big", "meter": "interviews", "properties": {"pad": "x".repeat(250)}}))
        .collect();
    let body = Value::Array(big.clone()).to_string();
    assert!(body.len() > 2048);
    let r = post_raw(&c, Some("application/json"), body).await;
    assert_error(&r, 413, "payload_too_large");
    let nd: String = big.iter().map(|e| format!("{e}\n")).collect();
    let r = post_raw(&c, Some("application/x-ndjson"), nd).await;
    assert_error(&r, 413, "payload_too_large");
    let r = post_raw(&c, Some("application/json"), vec![b'x'; 4096]).await;
    assert_error(&r, 413, "payload_too_large");
    assert_eq!(used(&c, "big", "interviews").await, 0.0);

    // (b) More events than max_batch_events (10), small enough in bytes.
    let small = |n: usize| -> Vec<Value> { (0..n).map(|_| json!({"id": uid("n"), "customer": "n", "meter": "interviews"})).collect() };
    let eleven = small(11);
    let body = Value::Array(eleven.clone()).to_string();
    assert!(body.len() <= 2048, "test body must be under the byte limit ({})", body.len());
    let r = post_raw(&c, Some("application/json"), body).await;
    assert_error(&r, 413, "payload_too_large");
    let nd: String = eleven.iter().map(|e| format!("{e}\n")).collect();
    let r = post_raw(&c, Some("application/x-ndjson"), nd).await;
    assert_error(&r, 413, "payload_too_large");
    assert_eq!(used(&c, "n", "interviews").await, 0.0);
    // Exactly the limit is fine, in both framings.
    let ten = small(10);
    let r = c.events(&Value::Array(ten.clone())).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 10, "duplicates": 0}));
    let nd: String = small(10).iter().map(|e| format!("{e}\n")).collect();
    let r = post_raw(&c, Some("application/x-ndjson"), nd).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(used(&c, "n", "interviews").await, 20.0);
    server.stop().await;
}

/// Reads one HTTP/1.1 response (head + Content-Length body) from `buf`, if complete.
fn parse_response(buf: &[u8]) -> Option<(u16, String, Value)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let body = buf.get(end + 4..end + 4 + len)?;
    Some((status, head, serde_json::from_slice(body).unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_refused_without_buffering() {
    let server = TestServer::start(&limited_config()).await;
    let limit = 2048usize;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    let head = "POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.expect("write head");
    // The chunks open a JSON array of strings so that the body stays plausible.
    let chunk_data = format!("\"{}\",", "a".repeat(254)).repeat(2); // 512 bytes
    let mut chunk = format!("{:x}\r\n", chunk_data.len()).into_bytes();
    chunk.extend_from_slice(chunk_data.as_bytes());
    chunk.extend_from_slice(b"\r\n");
    let mut written = 0usize; // body bytes
    let mut response = Vec::new();
    let mut parsed = None;
    let mut first = true;
    while written < 64 * limit {
        let data: &[u8] = if first { b"1\r\n[\r\n" } else { &chunk };
        if stream.write_all(data).await.is_err() {
            // The server closed the connection after answering: stop writing.
            break;
        }
        written += if first { 1 } else { chunk_data.len() };
        first = false;
        // Give the server a moment to answer before writing more.
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                response.extend_from_slice(&buf[..n]);
                if let Some(p) = parse_response(&response) {
                    parsed = Some(p);
                    break;
                }
            }
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    // Read the rest of the response if it is not complete yet.
    if parsed.is_none() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while parsed.is_none() {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    response.extend_from_slice(&buf[..n]);
                    parsed = parse_response(&response);
                }
                _ => break,
            }
        }
    }
    let (status, head, body) =
        parsed.unwrap_or_else(|| panic!("no complete response after {written} body bytes: {:?}", String::from_utf8_lossy(&response)));
    assert_eq!(status, 413, "{head}\n{body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(written < 16 * limit, "the server answered only after {written} bytes (limit {limit}): it buffered the body");
    drop(stream);

    let r = server.client().get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    // And it still takes events.
    let r = server.client().events(&ev("after_chunked", json!(1))).await;
    assert_eq!(r.status, 202, "{}", r.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 415

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_media_types() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let event = ev("media", json!(1)).to_string();
    let check = json!({"customer": "media", "meter": "interviews"}).to_string();
    for path in ["/v1/events", "/v1/check"] {
        let body = if path == "/v1/events" { &event } else { &check };
        for ct in [Some("text/plain"), None, Some("application/x-www-form-urlencoded"), Some("application/xml")] {
            let r = c.send(Method::POST, path, ct, body.clone()).await;
            assert_error(&r, 415, "unsupported_media_type");
        }
    }
    // NDJSON is for events only.
    let r = c.send(Method::POST, "/v1/check", Some("application/x-ndjson"), check.clone()).await;
    assert_error(&r, 415, "unsupported_media_type");
    assert_eq!(used(&c, "media", "interview_minutes").await, 0.0);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 503

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_while_shutting_down() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let r = c.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c.events(&ev("sd", json!(1))).await;
    assert_eq!(r.status, 202, "{}", r.text);

    server.app().begin_shutdown();

    let r = c.events(&ev("sd", json!(1))).await;
    assert_error(&r, 503, "unavailable");
    let retry = r.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {:?}", r.headers.get("retry-after"));
    let r = c.check(&json!({"customer": "sd", "meter": "interviews"})).await;
    assert_error(&r, 503, "unavailable");
    let retry = r.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {:?}", r.headers.get("retry-after"));
    let r = c.get("/readyz").await;
    assert_error(&r, 503, "unavailable");
    let r = c.get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// success shapes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_shapes_and_duplicates() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let cust = "shapes";

    // Single object.
    let r = c.events(&ev(cust, json!(1))).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 0}));
    // Array.
    let r = c.events(&json!([ev(cust, json!(2)), ev(cust, json!(3))])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 2, "duplicates": 0}));
    // Empty array: nothing to do.
    let r = c.events(&json!([])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 0, "duplicates": 0}));
    // NDJSON with blank lines, CRLF and no final newline.
    let nd = format!("\n{}\n\n{}\r\n   \n{}", ev(cust, json!(4)), ev(cust, json!(5)), ev(cust, json!(6)));
    let r = post_raw(&c, Some("application/x-ndjson"), nd).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 3, "duplicates": 0}));
    assert_eq!(used(&c, cust, "interview_minutes").await, 21.0);

    // Duplicates within a batch and across batches are counted once.
    let a = ev(cust, json!(10));
    let b = ev(cust, json!(20));
    let r = c.events(&json!([a, a, b])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 2, "duplicates": 1}));
    let d = ev(cust, json!(40));
    let r = c.events(&json!([a, d, b])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 2}));
    let nd = format!("{a}\n{d}\n");
    let r = post_raw(&c, Some("application/x-ndjson"), nd).await;
    assert_eq!(r.body, json!({"accepted": 0, "duplicates": 2}), "{}", r.text);
    // The id alone is the key: a different quantity under a used id is a duplicate.
    let mut a2 = a.clone();
    a2["quantity"] = json!(99);
    let r = c.events(&a2).await;
    assert_eq!(r.body, json!({"accepted": 0, "duplicates": 1}), "{}", r.text);
    assert_eq!(used(&c, cust, "interview_minutes").await, 91.0);

    // quantity defaults to 1; integer Unix-ms timestamps; charset parameter.
    let r = c.events(&json!({"id": uid("q"), "customer": "defaults", "meter": "interview_minutes", "timestamp": now_ms() - 1000})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(used(&c, "defaults", "interview_minutes").await, 1.0);
    let body = json!({"id": uid("q"), "customer": "defaults", "meter": "interviews"}).to_string();
    let r = post_raw(&c, Some("application/json; charset=utf-8"), body).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 0}));
    let body = format!("{}\n", json!({"id": uid("q"), "customer": "defaults", "meter": "interviews"}));
    let r = post_raw(&c, Some("Application/X-NDJSON; charset=UTF-8"), body).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(used(&c, "defaults", "interviews").await, 2.0);
    // A count meter ignores the quantity.
    let r = c.events(&json!({"id": uid("q"), "customer": "defaults", "meter": "interviews", "quantity": 7})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(used(&c, "defaults", "interviews").await, 3.0);
    server.stop().await;
}
