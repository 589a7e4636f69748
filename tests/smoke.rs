//! The harness itself works: start, ingest, check, restart keeps totals.

mod common;

use common::{uid, TestServer, INTERVIEW};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_totals() {
    let server = TestServer::start(INTERVIEW).await;
    let c = server.client();
    let r = c.events(&json!({"id": uid("e"), "customer": "u_1", "meter": "interview_minutes", "quantity": 12.5})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 0}));
    let server = server.restart().await;
    let r = server.client().get("/v1/customers/u_1/usage").await;
    assert_eq!(r.body["meters"][0]["used"], json!(12.5), "{}", r.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listener_serves_only_operational_routes() {
    let config = format!("{INTERVIEW}\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let server = TestServer::start(&config).await;
    let addr = server.app().metrics_addr.expect("metrics listener bound");
    let ops = common::Client { addr, token: None };
    let r = ops.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("meterd_"), "{}", r.text);
    assert_eq!(ops.get("/healthz").await.status, 200);
    let r = ops.events(&json!({"id": uid("e"), "customer": "u", "meter": "interviews"})).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.code(), "not_found");
    let r = ops.get("/v1/customers/u/usage").await;
    assert_eq!(r.status, 404);
    server.stop().await;
}

/// A client stuck mid-request cannot stop the final flush: the drain is bounded
/// and the flush still runs, so acknowledged usage survives the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_client_does_not_block_the_final_flush() {
    use tokio::io::AsyncWriteExt;
    let config = format!("{}\n", INTERVIEW.replace("[server]\n", "[server]\nshutdown_grace = \"2s\"\n"));
    let server = TestServer::start(&config).await;
    let c = server.client();
    let r = c.events(&json!({"id": uid("e"), "customer": "u_stuck", "meter": "interview_minutes", "quantity": 7})).await;
    assert_eq!(r.status, 202);
    // Half a request: the server waits for the rest of the body.
    let mut stuck = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    stuck
        .write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n[{\"id\":")
        .await
        .expect("write");
    // Let the handler start reading the body (ordering only, not a timing check).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let server = server.restart().await;
    let r = server.client().get("/v1/customers/u_stuck/usage").await;
    assert_eq!(r.body["meters"][0]["used"], json!(7), "{}", r.text);
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stuck.read_to_end(&mut buf)).await;
    // The in-flight request was cut at the drain limit: no answer, connection closed.
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {:?}", String::from_utf8_lossy(&buf));
    server.stop().await;
}

/// API.md: the config file may be named by METERD_CONFIG, and METERD_LISTEN
/// overrides `server.listen` (seen here through validation, which refuses a
/// non-loopback address when no keys are configured).
#[test]
fn config_and_listen_come_from_the_environment() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/interview-platform.toml");
    let run = |listen: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_meterd"));
        cmd.arg("check-config").env("METERD_CONFIG", config).env_remove("METERD_LISTEN");
        if let Some(l) = listen {
            cmd.env("METERD_LISTEN", l);
        }
        cmd.output().expect("run meterd")
    };
    let ok = run(None);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("interview-platform.toml"));
    let open = run(Some("0.0.0.0:8480"));
    assert_eq!(open.status.code(), Some(2));
    // The refusal blames the variable the address came from, not the file's key.
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(stderr.contains("- METERD_LISTEN: 0.0.0.0:8480 is not a loopback address"), "{stderr}");
    assert!(!stderr.contains("- server.listen"), "{stderr}");
}

/// Minute buckets waiting for the store are bounded (`storage.max_pending_buckets`):
/// past the cap, events and consumes answer 503 and change nothing while checks
/// go on; once a flush has stored them (here the final flush of a graceful
/// restart), writes are taken again and every acknowledged event is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_minute_buckets_past_their_cap_refuse_writes_until_stored() {
    let mut config: toml::Table = INTERVIEW.parse().expect("example parses");
    if let Some(toml::Value::Table(storage)) = config.get_mut("storage") {
        storage.insert("flush_interval".into(), toml::Value::String("1h".into()));
        storage.insert("max_pending_buckets".into(), toml::Value::Integer(5));
    }
    let server = TestServer::start(&toml::to_string(&config).expect("config")).await;
    let c = server.client();
    let customers: Vec<String> = (0..8).map(|i| uid(&format!("pb{i}"))).collect();
    for cu in &customers {
        let r = c.events(&json!({"id": uid("e"), "customer": cu, "meter": "interviews"})).await;
        assert_eq!(r.status, 202, "{}", r.text);
    }
    // Eight buckets wait (flushes are an hour apart); a scrape looks, as the flusher does.
    assert_eq!(c.get("/metrics").await.status, 200);
    let late = uid("late");
    let r = c.events(&json!({"id": uid("e"), "customer": &late, "meter": "interviews"})).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.code(), "unavailable");
    assert!(r.text.contains("storage.max_pending_buckets"), "{}", r.text);
    let r = c.check(&json!({"id": uid("k"), "customer": &late, "meter": "interviews", "quantity": 1, "consume": true})).await;
    assert_eq!(r.status, 503, "a consume is a write: {}", r.text);
    let r = c.check(&json!({"customer": &late, "meter": "interviews", "quantity": 1})).await;
    assert_eq!(r.status, 200, "checks go on: {}", r.text);
    assert_eq!(r.body["used"], json!(0), "the refused writes changed nothing: {}", r.text);

    let server = server.restart().await;
    let c = server.client();
    let r = c.events(&json!({"id": uid("e"), "customer": &late, "meter": "interviews"})).await;
    assert_eq!(r.status, 202, "stored, the buckets no longer count: {}", r.text);
    for cu in customers.iter().chain([&late]) {
        let r = c.get(&format!("/v1/customers/{cu}/usage")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.text.contains("\"used\":1"), "{cu}: {}", r.text);
    }
    server.stop().await;
}
