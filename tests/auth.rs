//! Authentication, scopes and per-key rate limits; and config validation through
//! the real `meterd check-config` process.

mod common;

use common::{message, uid, Client, Resp, TestServer, INTERVIEW};
use serde_json::{json, Value};
use sha2::Digest;
use std::path::Path;
use std::process::Command;

fn sha_hex(key: &str) -> String {
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

const INGEST: &str = "key-ingest-only-3f9a";
const CHECK: &str = "key-check-only-77c1";
const READ: &str = "key-read-only-1b2e";
const ADMIN: &str = "key-admin-only-c0de";
const ALL: &str = "key-all-scopes-9d8e";
const LIMITED: &str = "key-rate-limited-4a4a";

/// The interview config with one key per scope, an all-scopes key, a
/// rate-limited key and (when given) a key read from `env_var`.
fn keyed_config(env_var: Option<&str>) -> String {
    let mut text = INTERVIEW.to_string();
    for (name, key, scopes) in [
        ("ingest-only", INGEST, r#"["ingest"]"#),
        ("check-only", CHECK, r#"["check"]"#),
        ("read-only", READ, r#"["read"]"#),
        ("admin-only", ADMIN, r#"["admin"]"#),
        ("all", ALL, r#"["ingest", "check", "read", "admin"]"#),
    ] {
        text.push_str(&format!("\n[[auth.keys]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\nscopes = {scopes}\n", sha_hex(key)));
    }
    text.push_str(&format!(
        "\n[[auth.keys]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nscopes = [\"check\"]\nrate_limit_per_second = 1\nrate_limit_burst = 2\n",
        sha_hex(LIMITED)
    ));
    if let Some(var) = env_var {
        text.push_str(&format!("\n[[auth.keys]]\nname = \"from-env\"\nkey_env = \"{var}\"\nscopes = [\"ingest\", \"read\"]\n"));
    }
    text
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text);
    assert_eq!(r.code(), code, "{}", r.text);
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(!msg.is_empty(), "{}", r.text);
    assert_eq!(r.body.as_object().map(|o| o.len()), Some(1), "{}", r.text);
}

fn event(customer: &str) -> Value {
    json!({"id": uid("a"), "customer": customer, "meter": "interviews"})
}

fn check_body(customer: &str) -> Value {
    json!({"customer": customer, "meter": "interviews"})
}

fn usage_query() -> String {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!("/v1/usage?meter=interviews&from={from}&to={to}&granularity=hour")
}

/// Every `/v1/` route, called by `c`; the status of each.
async fn call_all(c: &Client) -> Vec<(&'static str, Resp)> {
    vec![
        ("events", c.events(&event("auth_all")).await),
        ("check", c.check(&check_body("auth_all")).await),
        ("customer_usage", c.get("/v1/customers/auth_all/usage").await),
        ("get_entitlements", c.get("/v1/customers/auth_all/entitlements").await),
        ("put_entitlements", c.put_json("/v1/customers/auth_all/entitlements", &json!({"plan": "professional"})).await),
        ("usage", c.get(&usage_query()).await),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_keys_are_unauthorized() {
    let server = TestServer::start(&keyed_config(None)).await;
    let plain = server.client();
    // No header, on every route.
    for (route, r) in call_all(&plain).await {
        assert_error(&r, 401, "unauthorized");
        assert!(!r.text.contains(ALL), "{route}");
    }
    // Wrong scheme, unknown key, empty key.
    for header in [
        format!("Basic {ALL}"),
        format!("bearer-ish {ALL}"),
        "Bearer not-a-configured-key".to_string(),
        "Bearer ".to_string(),
        ALL.to_string(),
        format!("Bearer {}", sha_hex(ALL)), // the hash is not the key
    ] {
        for (path, body) in [("/v1/events", event("auth_401")), ("/v1/check", check_body("auth_401"))] {
            let r = send_with_header(&plain, path, &header, &body).await;
            assert_error(&r, 401, "unauthorized");
        }
    }
    // Nothing was recorded by the refused requests.
    let r = plain.with_token(READ).get("/v1/customers/auth_401/usage").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let interviews = r.body["meters"].as_array().and_then(|rows| rows.iter().find(|row| row["meter"] == "interviews").cloned());
    assert_eq!(interviews.and_then(|row| row["used"].as_f64()), Some(0.0), "{}", r.text);
    // Ops routes need no key.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = plain.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    server.stop().await;
}

/// POST `body` with a raw Authorization header value.
async fn send_with_header(c: &Client, path: &str, authorization: &str, body: &Value) -> Resp {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(c.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("authorization", authorization)
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Resp { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null), text: String::from_utf8_lossy(&bytes).to_string() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_allow_and_forbid() {
    let server = TestServer::start(&keyed_config(None)).await;
    let c = server.client();
    // Which routes each key may use (by the order of call_all).
    let allowed: [(&str, [bool; 6]); 5] = [
        // events, check, customer_usage, get_ent, put_ent, usage
        (INGEST, [true, false, false, false, false, false]),
        (CHECK, [false, true, true, false, false, false]),
        (READ, [false, false, true, true, false, true]),
        (ADMIN, [false, false, false, true, true, false]),
        (ALL, [true, true, true, true, true, true]),
    ];
    for (key, expect) in allowed {
        let results = call_all(&c.with_token(key)).await;
        for ((route, r), ok) in results.iter().zip(expect) {
            if ok {
                assert!(r.status.is_success(), "{key} on {route}: {}", r.text);
            } else {
                assert_error(r, 403, "forbidden");
                let needed = match *route {
                    "events" => "ingest",
                    "check" => "check",
                    "customer_usage" => "read",
                    "get_entitlements" => "read",
                    "put_entitlements" => "admin",
                    _ => "read",
                };
                assert!(message(r).contains(needed), "{key} on {route}: message should name {needed:?}: {}", r.text);
            }
        }
    }
    // A forbidden PUT changed nothing; an allowed one did.
    let r = c.with_token(CHECK).put_json("/v1/customers/auth_scope/entitlements", &json!({"plan": "premium"})).await;
    assert_error(&r, 403, "forbidden");
    assert!(message(&r).contains("admin"), "{}", r.text);
    let r = c.with_token(READ).get("/v1/customers/auth_scope/entitlements").await;
    assert_eq!(r.body["plan"], "starter", "{}", r.text);
    let r = c.with_token(ADMIN).put_json("/v1/customers/auth_scope/entitlements", &json!({"plan": "premium"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c.with_token(READ).get("/v1/customers/auth_scope/entitlements").await;
    assert_eq!(r.body["plan"], "premium", "{}", r.text);
    // An ingest-only key calling /v1/check: the message names the scope.
    let r = c.with_token(INGEST).check(&check_body("auth_scope")).await;
    assert_error(&r, 403, "forbidden");
    assert!(message(&r).contains("check"), "{}", r.text);
    // The successful ingest is counted, and visible with a check key.
    let r = c.with_token(INGEST).events(&event("auth_scope")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = c.with_token(CHECK).check(&check_body("auth_scope")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["used"].as_f64(), Some(1.0), "{}", r.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_env_keys_work() {
    let var = format!("METERD_TEST_AUTH_KEY_{}", std::process::id());
    let secret = format!("env-secret-{}", uid("k"));
    std::env::set_var(&var, &secret);
    let server = TestServer::start(&keyed_config(Some(&var))).await;
    let c = server.client().with_token(&secret);
    let r = c.events(&event("auth_env")).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = c.get("/v1/customers/auth_env/usage").await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Its scopes are respected.
    let r = c.check(&check_body("auth_env")).await;
    assert_error(&r, 403, "forbidden");
    // The variable's name is not a key.
    let r = server.client().with_token(&var).events(&event("auth_env")).await;
    assert_error(&r, 401, "unauthorized");
    server.stop().await;
    std::env::remove_var(&var);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_per_key() {
    let server = TestServer::start(&keyed_config(None)).await;
    let limited = server.client().with_token(LIMITED);
    let other = server.client().with_token(CHECK);
    // Burst 2: two immediate requests pass, the third is refused.
    for i in 0..2 {
        let r = limited.check(&check_body("auth_rl")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
    }
    let r = limited.check(&check_body("auth_rl")).await;
    assert_error(&r, 429, "rate_limited");
    let retry = r.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {:?}", r.headers.get("retry-after"));
    // Another key is unaffected.
    for _ in 0..5 {
        let r = other.check(&check_body("auth_rl")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // Ops routes need no key and are not limited.
    let r = server.client().get("/healthz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = server.client().get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// check-config as a real process

fn check_config(path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .env_remove("METERD_LISTEN")
        .env_remove("METERD_CONFIG")
        .output()
        .expect("run meterd check-config");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn write_config(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_config_accepts_the_shipped_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["config/meterd.toml", "config/examples/interview-platform.toml", "config/examples/several-instances.toml"] {
        let (code, text) = check_config(&root.join(file));
        assert_eq!(code, 0, "{file}: {text}");
    }
    // A keyed config (with a valid key hash) is fine too.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "keyed.toml", &keyed_config(None));
    let (code, text) = check_config(&path);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn check_config_reports_every_problem() {
    let dir = tempfile::tempdir().expect("tempdir");

    // Open listen address without keys, two default plans, a limit on an unknown
    // meter, a bad window, a bad meter name.
    let open = r#"
[server]
listen = "0.0.0.0:8480"
[[meters]]
name = "minutes"
[[meters]]
name = "Bad Name"
[[plans]]
name = "a"
default = true
[plans.limits]
minutes = { limit = 5, window = "fortnight" }
ghost = { limit = 1, window = "day" }
[[plans]]
name = "b"
default = true
"#;
    let path = write_config(dir.path(), "open.toml", open);
    let (code, text) = check_config(&path);
    assert_eq!(code, 2, "{text}");
    for key in ["server.listen", "plans", "plans.a.limits.minutes.window", "plans.a.limits.ghost", "meters.\"Bad Name\".name"] {
        assert!(text.contains(key), "missing {key} in:\n{text}");
    }
    assert!(text.contains("open.toml"), "the file is named:\n{text}");

    // Bad key material and scopes, with two default plans again.
    let keys = r#"
[[meters]]
name = "minutes"
precision = 12
[[plans]]
name = "a"
default = true
[[plans]]
name = "b"
default = true
[[auth.keys]]
name = "short"
key_sha256 = "abc123"
scopes = ["ingest", "fly"]
[[auth.keys]]
name = "both"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
key_env = "X"
scopes = []
[[auth.keys]]
name = "limited"
key_env = "METERD_TEST_SURELY_UNSET_VARIABLE_5d1c"
scopes = ["read"]
rate_limit_per_second = 0
"#;
    let path = write_config(dir.path(), "keys.toml", keys);
    let (code, text) = check_config(&path);
    assert_eq!(code, 2, "{text}");
    for key in [
        "meters.minutes.precision",
        "plans",
        "auth.keys.short.key_sha256",
        "auth.keys.short.scopes",
        "fly",
        "auth.keys.both",
        "auth.keys.both.scopes",
        "auth.keys.limited.key_env",
        "auth.keys.limited.rate_limit_per_second",
    ] {
        assert!(text.contains(key), "missing {key} in:\n{text}");
    }
    // Every problem on its own line.
    let lines = text.lines().filter(|l| l.trim_start().starts_with("- ")).count();
    assert!(lines >= 8, "expected one line per problem:\n{text}");
}

#[test]
fn check_config_names_unknown_keys_and_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text, key) in [
        ("server.toml", "[server]\nlisten = \"127.0.0.1:8480\"\nlisen = 3\n", "lisen"),
        (
            "key.toml",
            "[[plans]]\nname = \"p\"\ndefault = true\n[[auth.keys]]\nname = \"k\"\nkey_env = \"X\"\nscopes = [\"read\"]\nrate_limit = 5\n",
            "rate_limit",
        ),
        ("top.toml", "[[plans]]\nname = \"p\"\ndefault = true\n[limits]\nx = 1\n", "limits"),
        ("ingest.toml", "[ingest]\nmax_body = 5\n", "max_body"),
    ] {
        let path = write_config(dir.path(), name, text);
        let (code, out) = check_config(&path);
        assert_eq!(code, 2, "{name}: {out}");
        assert!(out.contains(key), "{name}: the unknown key is not named:\n{out}");
        assert!(out.contains(name), "{name}: the file is not named:\n{out}");
    }
    // A missing file is an error too, naming it.
    let missing = dir.path().join("missing.toml");
    let (code, out) = check_config(&missing);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("missing.toml"), "{out}");
}
