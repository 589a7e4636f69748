//! Fuzz-style robustness: ~2,000 random and mutated bodies to `POST /v1/events`
//! (every answer is a 202 or a well-formed JSON error, and the server keeps
//! working), and property tests of the body parser on arbitrary bytes.

mod common;

use common::{now_ms, uid, Resp, TestServer, INTERVIEW};
use hyper::Method;
use meterd::config::Config;
use meterd::ingest::parse::{split_json, split_ndjson, validate_batch, ParseError, Rules};
use proptest::prelude::*;
use serde_json::{json, Value};

/// xorshift64*: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

const METERS: [&str; 5] = ["interview_minutes", "interviews", "detailed_analyses", "video_reviews", "nope"];

/// A plausible event with some random field values; valid when `clean`.
fn random_event(rng: &mut Rng, n: u64, clean: bool) -> Value {
    let mut e = json!({
        "id": format!("fz-{n}-{}", rng.next() % 1000),
        "customer": format!("fz_{}", rng.below(20)),
        "meter": rng.pick(&METERS[..4]),
    });
    if clean {
        if rng.chance(2) {
            e["quantity"] = rng.pick::<Value>(&[json!(1), json!(0), json!(2.5), json!(0.01), json!(3e1)]);
        }
        if rng.chance(2) {
            e["timestamp"] = json!(now_ms() - rng.below(86_400_000) as i64);
        }
        if rng.chance(3) {
            e["properties"] = json!({"region": "eu", "k": "v".repeat(rng.below(256))});
        }
        return e;
    }
    if rng.chance(2) {
        let q = rng.pick::<Value>(&[json!(1), json!(0), json!(2.5), json!(0.01), json!(12.345), json!(-1), json!(1e300), json!("1")]);
        e["quantity"] = q;
    }
    if rng.chance(3) {
        let now = now_ms();
        let t = rng.pick::<Value>(&[
            json!(now),
            json!(now - 60_000),
            json!(now + 3_600_000),
            json!(0),
            json!(i64::MAX),
            json!(i64::MIN),
            json!("2020-01-01T00:00:00Z"),
            json!("not a time"),
        ]);
        e["timestamp"] = t;
    }
    if rng.chance(4) {
        e["properties"] = json!({"region": "eu", "k": "v".repeat(rng.below(300))});
    }
    if rng.chance(10) {
        e["meter"] = json!(METERS[4]);
    }
    e
}

fn random_batch(rng: &mut Rng, n: u64) -> Vec<Value> {
    let clean = rng.chance(2);
    (0..1 + rng.below(8)).map(|i| random_event(rng, n * 100 + i as u64, clean)).collect()
}

/// Serializes a batch as JSON (object or array) or NDJSON.
fn serialize(rng: &mut Rng, batch: &[Value], ndjson: bool) -> Vec<u8> {
    if ndjson {
        let mut out = String::new();
        for e in batch {
            out.push_str(&e.to_string());
            out.push_str(if rng.chance(5) { "\r\n\n" } else { "\n" });
        }
        out.into_bytes()
    } else if batch.len() == 1 && rng.chance(2) {
        batch[0].to_string().into_bytes()
    } else {
        Value::Array(batch.to_vec()).to_string().into_bytes()
    }
}

/// Hand-made hostile bodies.
fn special(rng: &mut Rng) -> Vec<u8> {
    let depth = 1 + rng.below(20_000);
    match rng.below(16) {
        0 => "[".repeat(depth).into_bytes(),
        1 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes(),
        2 => format!("[{}1{}]", "{\"a\":".repeat(depth.min(5000)), "}".repeat(depth.min(5000))).into_bytes(),
        3 => br#"{"id":"a","id":"b","customer":"c","meter":"interviews"}"#.to_vec(),
        4 => br#"{"id":"a","customer":"c","meter":"interviews","properties":{"k":"1","k":"2"}}"#.to_vec(),
        5 => {
            format!(r#"{{"id":"{}","customer":"c","meter":"interview_minutes","quantity":{}}}"#, uid("h"), "9".repeat(1 + rng.below(5000)))
                .into_bytes()
        }
        6 => format!(r#"{{"id":"{}","customer":"c","meter":"interview_minutes","quantity":1e{}}}"#, uid("h"), rng.next()).into_bytes(),
        7 => format!(r#"{{"id":"{}","customer":"c","meter":"interview_minutes","timestamp":{}}}"#, uid("h"), "9".repeat(40)).into_bytes(),
        8 => br#"{"id":"\u0000\ud800","customer":"\ud83d\ude00","meter":"interviews"}"#.to_vec(),
        9 => br#"{"id":"\uZZZZ","customer":"c","meter":"interviews"}"#.to_vec(),
        10 => b"{\"id\":\"\xff\xfe\",\"customer\":\"c\",\"meter\":\"interviews\"}".to_vec(),
        11 => b"\xef\xbb\xbf{\"id\":\"bom\",\"customer\":\"c\",\"meter\":\"interviews\"}".to_vec(),
        12 => format!(r#"{{"id":"{}","customer":"c\u0007","meter":"int\u0065rviews"}}"#, uid("h")).into_bytes(),
        13 => format!("[{}]", vec!["{}"; 1 + rng.below(200)].join(",")).into_bytes(),
        14 => format!(r#"{{"id":"{}","customer":"c","meter":"interviews","properties":{}}}"#, uid("h"), "[".repeat(depth)).into_bytes(),
        _ => b"null".to_vec(),
    }
}

/// Flips, cuts, inserts, duplicates and deletes bytes.
fn mutate(rng: &mut Rng, mut body: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        if body.is_empty() {
            body.push(b'{');
        }
        let at = rng.below(body.len());
        match rng.below(7) {
            0 => body[at] ^= 1 << rng.below(8),
            1 => body.truncate(at),
            2 => body[at] = rng.pick(b"{}[]\",:\\0-.eE \n\x00\xff\x7f"),
            3 => {
                let end = (at + 1 + rng.below(16)).min(body.len());
                let piece = body[at..end].to_vec();
                body.splice(at..at, piece);
            }
            4 => {
                let end = (at + 1 + rng.below(16)).min(body.len());
                body.drain(at..end);
            }
            5 => {
                let s: &[u8] =
                    rng.pick(&[&b"\\u0000"[..], b"\\ud800", b"\xc3\x28", b"\xf0\x9f\x98\x80", b"1e999", b"-0", b"NaN", b"\"id\":\"x\","]);
                body.splice(at..at, s.iter().copied());
            }
            _ => {
                let n = rng.below(256) as u8;
                body.insert(at, n);
            }
        }
    }
    body
}

fn assert_well_formed(r: &Resp, what: &str) {
    match r.status.as_u16() {
        202 => {
            let o = r.body.as_object().unwrap_or_else(|| panic!("{what}: 202 without an object: {}", r.text));
            assert_eq!(o.len(), 2, "{what}: {}", r.text);
            assert!(r.body["accepted"].is_u64() && r.body["duplicates"].is_u64(), "{what}: {}", r.text);
        }
        400 | 413 => {
            let o = r.body.as_object().unwrap_or_else(|| panic!("{what}: error body is not JSON: {:?}", r.text));
            assert_eq!(o.len(), 1, "{what}: {}", r.text);
            let code = r.code();
            let expected: &[&str] = if r.status == 400 { &["invalid_json", "invalid_event"] } else { &["payload_too_large"] };
            assert!(expected.contains(&code), "{what}: code {code:?} for {}: {}", r.status, r.text);
            assert!(r.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {}", r.text);
            if code == "invalid_event" {
                let details = r.body["error"]["details"].as_array().unwrap_or_else(|| panic!("{what}: {}", r.text));
                assert!(!details.is_empty() && details.len() <= 100, "{what}: {}", r.text);
                for d in details {
                    assert!(d["index"].is_u64() && d["field"].is_string() && d["reason"].is_string(), "{what}: {d}");
                }
            }
        }
        other => panic!("{what}: unexpected status {other}: {}", r.text),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_never_break_the_server() {
    let config = format!("{INTERVIEW}\n[ingest]\nmax_body_bytes = 65536\nmax_batch_events = 50\n");
    let server = TestServer::start(&config).await;
    let c = server.client();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..2_000u64 {
        let ndjson = rng.chance(2);
        let body = match rng.below(10) {
            0 => (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
            1 | 2 => special(&mut rng),
            3 => {
                // Over the limits: many events, or many bytes.
                let batch: Vec<Value> = (0..51 + rng.below(20)).map(|i| random_event(&mut rng, n * 100 + i as u64, true)).collect();
                let mut b = serialize(&mut rng, &batch, ndjson);
                if rng.chance(2) {
                    b.resize(b.len() + 70_000, b' ');
                }
                b
            }
            4 | 5 => {
                let batch = random_batch(&mut rng, n);
                serialize(&mut rng, &batch, ndjson)
            }
            _ => {
                let batch = random_batch(&mut rng, n);
                let body = serialize(&mut rng, &batch, ndjson);
                mutate(&mut rng, body)
            }
        };
        let ct = if ndjson { "application/x-ndjson" } else { "application/json" };
        let r = c.send(Method::POST, "/v1/events", Some(ct), body.clone()).await;
        assert_well_formed(&r, &format!("request {n} ({ct}, {:?})", String::from_utf8_lossy(&body[..body.len().min(200)])));
        *statuses.entry(r.status.as_u16()).or_insert(0usize) += 1;
    }
    eprintln!("fuzz statuses: {statuses:?}");
    // The run exercised every outcome.
    for s in [202, 400, 413] {
        assert!(statuses.get(&s).copied().unwrap_or(0) > 0, "no {s} in {statuses:?}");
    }

    // Still healthy, still counting.
    let r = c.get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c.events(&json!({"id": uid("after"), "customer": "fz_after", "meter": "interview_minutes", "quantity": 4.25})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 0}));
    let r = c.get("/v1/customers/fz_after/usage").await;
    let row = r.body["meters"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["meter"] == "interview_minutes").cloned())
        .unwrap_or_else(|| panic!("{}", r.text));
    assert_eq!(row["used"].as_f64(), Some(4.25), "{}", r.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// the parser on arbitrary bytes

fn catalog() -> std::sync::Arc<meterd::model::Catalog> {
    Config::parse(INTERVIEW, "t").and_then(|c| c.validate("t")).expect("valid config").catalog
}

/// Runs both splitters and, on success, validation; checks the error invariants.
fn parse_everything(catalog: &meterd::model::Catalog, bytes: &[u8]) {
    let rules = Rules { now_ms: now_ms(), max_lateness_ms: 35 * 86_400_000, max_batch_events: 20 };
    for split in [split_json, split_ndjson] {
        match split(bytes, rules.max_batch_events) {
            Ok(values) => {
                assert!(values.len() <= rules.max_batch_events);
                match validate_batch(&values, catalog, &rules) {
                    Ok(events) => assert_eq!(events.len(), values.len()),
                    Err(ParseError::Invalid { details, total, .. }) => {
                        assert!(!details.is_empty() && details.len() <= 100 && details.len() <= total);
                        assert!(details.iter().all(|d| d.index < values.len()));
                    }
                    Err(e) => panic!("validation returned {e:?}"),
                }
            }
            Err(ParseError::TooManyEvents { count, max }) => assert!(count > max),
            Err(ParseError::InvalidJson(m)) => assert!(!m.is_empty()),
            Err(e) => panic!("split returned {e:?}"),
        }
    }
}

/// Text that looks like event bodies: JSON punctuation, field names, numbers.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\n".to_string()),
        Just("\"id\"".to_string()),
        Just("\"customer\"".to_string()),
        Just("\"meter\"".to_string()),
        Just("\"quantity\"".to_string()),
        Just("\"timestamp\"".to_string()),
        Just("\"properties\"".to_string()),
        Just("\"interview_minutes\"".to_string()),
        Just("\"interviews\"".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        "-?[0-9]{1,25}(\\.[0-9]{1,12})?([eE][-+]?[0-9]{1,4})?",
        "\"[a-z0-9_:.TZ\\- ]{0,40}\"",
    ];
    proptest::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

/// A valid event object's text with random values in each field.
fn event_text() -> impl Strategy<Value = String> {
    (
        (0usize..131).prop_map(|n| "i".repeat(n)),
        prop_oneof![Just("c".to_string()), Just(String::new()), Just("a\u{1}b".to_string()), Just("c".repeat(257))],
        prop_oneof![Just("interview_minutes"), Just("interviews"), Just("nope")],
        "-?[0-9]{1,20}(\\.[0-9]{1,12})?([eE][-+]?[0-9]{1,3})?",
        prop_oneof![Just("\"2024-01-01T00:00:00Z\"".to_string()), "-?[0-9]{1,20}", "\"[0-9T:Z.+\\-]{0,30}\"",],
        (0usize..40, 0usize..70, 0usize..260).prop_map(|(n, k, v)| {
            (0..n).map(|i| (format!("{i}{}", "k".repeat(k)), "v".repeat(v))).collect::<std::collections::BTreeMap<_, _>>()
        }),
    )
        .prop_map(|(id, customer, meter, quantity, ts, props)| {
            format!(
                "{{\"id\":{},\"customer\":{},\"meter\":\"{meter}\",\"quantity\":{quantity},\"timestamp\":{ts},\"properties\":{}}}",
                json!(id),
                json!(customer),
                json!(props)
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let catalog = catalog();
        parse_everything(&catalog, &bytes);
    }

    #[test]
    fn parser_never_panics_on_jsonish_text(text in jsonish()) {
        let catalog = catalog();
        parse_everything(&catalog, text.as_bytes());
    }

    #[test]
    fn parser_never_panics_on_events(events in proptest::collection::vec(event_text(), 0..25), cut in any::<prop::sample::Index>()) {
        let catalog = catalog();
        let array = format!("[{}]", events.join(","));
        parse_everything(&catalog, array.as_bytes());
        let nd = events.join("\n");
        parse_everything(&catalog, nd.as_bytes());
        let at = cut.index(array.len() + 1);
        parse_everything(&catalog, &array.as_bytes()[..at]);
    }
}
