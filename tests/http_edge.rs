//! The HTTP edge under stalling clients, over real sockets: the header, body and
//! idle timeouts cut a stalled connection while other clients are served, the
//! connection cap refuses one connection too many with a 503 and counts it, and
//! graceful shutdown finishes a request in flight and closes idle keep-alive
//! connections.
//!
//! The connection metrics are process-wide, so the tests of this file run one
//! at a time (`SERIAL`) and compare each metric before and after.

mod common;

use common::{with_dirs, Client, INTERVIEW};
use meterd::config::Config;
use meterd::http::EdgeConfig;
use meterd::AppHandle;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// meterd in-process with `edge` and a `metrics.listen` listener (whose own
/// connections never count against the API listener's cap).
struct Edge {
    app: Option<AppHandle>,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    ops: Client,
}

impl Edge {
    /// Starts meterd with `edge` given as the config's `[server]` keys (so the
    /// keys' wiring is tested too).
    async fn start(edge: EdgeConfig) -> Edge {
        Edge::start_in(edge, tempfile::tempdir().expect("temp dir")).await
    }

    /// [`Edge::start`] on the data dir `dir` (a restart when it holds one).
    async fn start_in(edge: EdgeConfig, dir: tempfile::TempDir) -> Edge {
        let toml = with_dirs(&format!("{INTERVIEW}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"), dir.path());
        let mut table: toml::Table = toml.parse().expect("test config parses");
        if let Some(toml::Value::Table(server)) = table.get_mut("server") {
            let ms = |d: Duration| toml::Value::String(format!("{}ms", d.as_millis()));
            server.insert("header_read_timeout".into(), ms(edge.header_read_timeout));
            server.insert("body_read_timeout".into(), ms(edge.body_read_timeout));
            server.insert("idle_timeout".into(), ms(edge.idle_timeout));
            server.insert("max_connections".into(), toml::Value::Integer(edge.max_connections as i64));
        }
        let toml = toml::to_string(&table).expect("test config serializes");
        let config = Config::parse(&toml, "test.toml").and_then(|c| c.validate("test.toml")).expect("valid test config");
        let app = AppHandle::start(config).await.expect("meterd starts");
        let ops = Client { addr: app.metrics_addr.expect("metrics listener"), token: None };
        Edge { addr: app.addr, app: Some(app), _dir: dir, ops }
    }

    fn client(&self) -> Client {
        Client { addr: self.addr, token: None }
    }

    /// The value of one series of `/metrics` (0 if absent), read on the ops listener.
    async fn metric(&self, series: &str) -> f64 {
        let text = self.ops.get("/metrics").await.text;
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }

    /// Each connection thread's open connections (`meterd_http_thread_connections`), in thread order.
    async fn per_thread(&self) -> Vec<f64> {
        let text = self.ops.get("/metrics").await.text;
        let mut threads: Vec<(usize, f64)> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("meterd_http_thread_connections{thread=\"")?;
                let (index, value) = rest.split_once("\"} ")?;
                Some((index.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect();
        threads.sort_by_key(|t| t.0);
        threads.into_iter().map(|t| t.1).collect()
    }

    /// Waits (up to 5 s) until `series` reads `want`, and returns what it read last.
    async fn metric_becomes(&self, series: &str, want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.metric(series).await;
            if got == want || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await.expect("clean shutdown");
        }
    }
}

const OPEN: &str = r#"meterd_http_connections_open{listener="api"}"#;
const REFUSED: &str = r#"meterd_http_connections_refused_total{listener="api"}"#;
fn timeouts(phase: &str) -> String {
    format!(r#"meterd_http_timeouts_total{{phase="{phase}"}}"#)
}

fn edge(header: u64, body: u64, idle: u64, max_connections: usize) -> EdgeConfig {
    EdgeConfig {
        header_read_timeout: Duration::from_millis(header),
        body_read_timeout: Duration::from_millis(body),
        idle_timeout: Duration::from_millis(idle),
        max_connections,
    }
}

/// A connection that has written `bytes` and then goes quiet.
async fn stalled(addr: SocketAddr, bytes: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes.as_bytes()).await.expect("write");
    stream
}

/// Reads until the server closes the connection (EOF or reset), at most
/// `limit`; returns what arrived and when the close came (None: still open).
async fn until_closed(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> (Vec<u8>, Option<Instant>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One HTTP/1.1 response (head + Content-Length body) from the front of `buf`.
fn parse_response(buf: &[u8]) -> Option<(u16, String, Value, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let body = buf.get(end + 4..end + 4 + len)?;
    Some((status, head, serde_json::from_slice(body).unwrap_or(Value::Null), end + 4 + len))
}

/// Reads one whole response from a keep-alive connection.
async fn read_response(stream: &mut TcpStream) -> (u16, String, Value) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some((status, head, body, _)) = parse_response(&got) {
            return (status, head, body);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.expect("a response within 5 s").expect("read");
        assert!(n > 0, "connection closed before a whole response: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// Another client is served (an event and a health check); returns when. The
/// callers check it was before the stalled connections were closed.
async fn others_are_served(server: &Edge) -> Instant {
    let c = server.client();
    let r = c.events(&json!({"id": common::uid("edge"), "customer": "edge_other", "meter": "interviews"})).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(c.get("/healthz").await.status, 200);
    Instant::now()
}

fn between(what: &str, took: Duration, low_ms: u64, high_ms: u64) {
    assert!(
        took >= Duration::from_millis(low_ms) && took <= Duration::from_millis(high_ms),
        "{what}: took {took:?}, expected {low_ms}..{high_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_is_cut_at_the_header_timeout_while_others_are_served() {
    let _serial = SERIAL.lock().await;
    let server = Edge::start(edge(1000, 10_000, 10_000, 100)).await;
    let before = server.metric(&timeouts("header")).await;
    let started = Instant::now();
    let mut half_line = stalled(server.addr, "POST /v1/ev").await;
    let mut headers_only = stalled(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let mut silent = stalled(server.addr, "").await;
    let served = others_are_served(&server).await;
    for (name, stream) in
        [("half a request line", &mut half_line), ("headers without their end", &mut headers_only), ("nothing", &mut silent)]
    {
        let (bytes, closed) = until_closed(stream, Duration::from_secs(5)).await;
        let closed = closed.unwrap_or_else(|| panic!("{name}: still open after 5 s"));
        assert!(bytes.is_empty(), "{name}: closed without an answer, got {:?}", String::from_utf8_lossy(&bytes));
        between(name, closed - started, 900, 2500);
        assert!(served < closed, "{name}: the other client was served while it stalled");
    }
    assert_eq!(server.metric(&timeouts("header")).await, before + 3.0);
    assert_eq!(server.metric_becomes(OPEN, 0.0).await, 0.0, "every API connection closed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_408_at_the_body_timeout_and_closed() {
    let _serial = SERIAL.lock().await;
    let server = Edge::start(edge(1000, 1500, 10_000, 100)).await;
    let before = server.metric(&timeouts("body")).await;
    let head = "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let started = Instant::now();
    let mut stream = stalled(server.addr, &format!("{head}{{\"id\": \"a\"")).await;
    // The head is whole: the header timeout (1 s) no longer applies.
    let served = others_are_served(&server).await;
    let (bytes, closed) = until_closed(&mut stream, Duration::from_secs(5)).await;
    let closed = closed.expect("closed within 5 s");
    assert!(served < closed, "the other client was served while the body stalled");
    between("body timeout", closed - started, 1400, 3000);
    let (status, head, body, _) = parse_response(&bytes).unwrap_or_else(|| panic!("a response: {:?}", String::from_utf8_lossy(&bytes)));
    assert_eq!(status, 408, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("body_read_timeout"), "{body}");
    assert_eq!(server.metric(&timeouts("body")).await, before + 1.0);
    // Nothing of it was accepted.
    let r = server.client().get("/v1/customers/a/usage").await;
    assert_eq!(r.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_no_more_time_than_a_stalled_one() {
    let _serial = SERIAL.lock().await;
    let server = Edge::start(edge(1000, 1500, 10_000, 100)).await;
    let event = json!({"id": common::uid("trickle"), "customer": "trickle", "meter": "interviews"}).to_string();
    let head = format!("POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", event.len());
    let started = Instant::now();
    let (mut reader, mut writer) = stalled(server.addr, &head).await.into_split();
    // One byte every 200 ms: each in time, the whole body (~10 s of bytes) not.
    let trickle = tokio::spawn(async move {
        for byte in event.bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (bytes, closed) = until_closed(&mut reader, Duration::from_secs(5)).await;
    between("trickled body", closed.expect("closed") - started, 1400, 3200);
    let (status, _, body, _) = parse_response(&bytes).unwrap_or_else(|| panic!("a response: {:?}", String::from_utf8_lossy(&bytes)));
    assert_eq!((status, body["error"]["code"].as_str()), (408, Some("request_timeout")), "{body}");
    trickle.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_not_the_header_one() {
    let _serial = SERIAL.lock().await;
    let server = Edge::start(edge(800, 10_000, 2000, 100)).await;
    let before = server.metric(&timeouts("idle")).await;
    let mut stream = stalled(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(read_response(&mut stream).await.0, 200);
    // Idle for longer than the header timeout: still open, and served again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("second request");
    assert_eq!(read_response(&mut stream).await.0, 200);
    let idle_since = Instant::now();
    let served = others_are_served(&server).await;
    let (bytes, closed) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
    let closed = closed.expect("closed");
    between("idle timeout", closed - idle_since, 1900, 3500);
    assert!(served < closed, "the other client was served while it idled");
    assert_eq!(server.metric(&timeouts("idle")).await, before + 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_request_head_gets_the_header_timeout_from_its_first_byte() {
    let _serial = SERIAL.lock().await;
    // The idle clock alone would close it 2.5 s after that first byte.
    let server = Edge::start(edge(1000, 10_000, 4000, 100)).await;
    let before = server.metric(&timeouts("header")).await;
    let mut stream = stalled(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(read_response(&mut stream).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(b"GET /heal").await.expect("half a second request");
    let first_byte = Instant::now();
    let (bytes, closed) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
    between("header timeout after idling", closed.expect("closed") - first_byte, 900, 2000);
    assert_eq!(server.metric(&timeouts("header")).await, before + 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_over_the_cap_is_answered_503_and_counted_until_a_stalled_one_times_out() {
    let _serial = SERIAL.lock().await;
    const CAP: usize = 3;
    let server = Edge::start(edge(3000, 10_000, 10_000, CAP)).await;
    let refused_before = server.metric(REFUSED).await;
    let timeouts_before = server.metric(&timeouts("header")).await;
    let started = Instant::now();
    let mut stalls = Vec::new();
    for _ in 0..CAP {
        stalls.push(stalled(server.addr, "POST /v1/events HT").await);
    }
    assert_eq!(server.metric_becomes(OPEN, CAP as f64).await, CAP as f64, "the stalled connections hold every slot");
    // Counted on the connection threads (one per CPU): the stalled ones and the
    // scrape that reads them (an earlier scrape's connection may take a moment to close).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut threads = server.per_thread().await;
    while threads.iter().sum::<f64>() != CAP as f64 + 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        threads = server.per_thread().await;
    }
    assert_eq!(threads.len(), cpus, "one series per thread: {threads:?}");
    assert_eq!(threads.iter().sum::<f64>(), CAP as f64 + 1.0, "the stalled ones and the scrape: {threads:?}");

    // Connection CAP + 1: accepted by the kernel, answered 503 and closed.
    let mut extra = stalled(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (bytes, closed) = until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(closed.is_some(), "the refused connection is closed");
    let (status, head, body, len) = parse_response(&bytes).unwrap_or_else(|| panic!("a 503: {:?}", String::from_utf8_lossy(&bytes)));
    assert_eq!(status, 503, "{head}");
    assert_eq!(len, bytes.len(), "nothing after the answer");
    assert!(head.contains("retry-after: 1") && head.contains("connection: close"), "{head}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("max_connections = 3"), "{body}");
    // Counted; and the ops listener (its own cap) is served all along.
    assert_eq!(server.metric(REFUSED).await, refused_before + 1.0);
    assert_eq!(server.metric(OPEN).await, CAP as f64, "refused connections never count as open");
    assert!(started.elapsed() < Duration::from_millis(2800), "all of the above before the stalls time out");

    // The header timeout frees the slots; then a new client is served.
    for stream in &mut stalls {
        let (bytes, closed) = until_closed(stream, Duration::from_secs(5)).await;
        assert!(bytes.is_empty());
        between("stalled at the cap", closed.expect("closed") - started, 2900, 4500);
    }
    assert_eq!(server.metric_becomes(OPEN, 0.0).await, 0.0);
    assert_eq!(server.client().get("/healthz").await.status, 200);
    assert_eq!(server.metric(&timeouts("header")).await, timeouts_before + CAP as f64);
    assert_eq!(server.metric(REFUSED).await, refused_before + 1.0, "nothing refused once slots are free");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight_and_closes_idle_keep_alive_connections() {
    let _serial = SERIAL.lock().await;
    let mut server = Edge::start(edge(5000, 5000, 30_000, 100)).await;
    // An idle keep-alive connection.
    let mut idle = stalled(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(read_response(&mut idle).await.0, 200);
    // A request in flight: its head is routed, half its body sent.
    let event = json!({"id": common::uid("drain"), "customer": "drain", "meter": "interviews"}).to_string();
    let (first, rest) = event.split_at(event.len() / 2);
    let head = format!("POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", event.len());
    let mut in_flight = stalled(server.addr, &format!("{head}{first}")).await;
    // Time for the server to read and route the head.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let app = server.app.take().expect("running");
    let shutdown = tokio::spawn(app.shutdown());
    // The idle connection is closed at once, without an answer.
    let (bytes, closed) = until_closed(&mut idle, Duration::from_secs(2)).await;
    assert!(closed.is_some() && bytes.is_empty(), "idle keep-alive closed: {:?}", String::from_utf8_lossy(&bytes));
    // New connections are no longer accepted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(common::connect_listening(server.addr).await.is_none(), "the listener is closed");
    // The request in flight completes and is acknowledged.
    in_flight.write_all(rest.as_bytes()).await.expect("rest of the body");
    let (status, head, body) = read_response(&mut in_flight).await;
    assert_eq!(status, 202, "{head} {body}");
    assert_eq!(body, json!({"accepted": 1, "duplicates": 0}));
    tokio::time::timeout(Duration::from_secs(10), shutdown).await.expect("shutdown ends").expect("task").expect("clean shutdown");
}

/// Sends one whole request on a fresh connection and hangs up at once,
/// without reading the answer.
async fn send_and_hang_up(addr: SocketAddr, path: &str, body: String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(request.as_bytes()).await.expect("request");
    drop(stream);
}

/// Issue 24: a consume's or an ingest's handler is finished even if hyper
/// drops it (the client went away after sending): once its WAL record is
/// written, its usage must be folded too. Many consumes and events whose
/// clients hang up at once, each on its own connection (some are dropped
/// before their body is read, which records nothing; some after): what the
/// running server counts is exactly what a restart replays from the WAL and
/// the store, so no record was written without being folded. The rounds go on
/// until handlers were seen dropped unfinished (so the path is taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_clients_that_hang_up_leave_counted_is_what_a_restart_replays() {
    const DETACHED: &str = "meterd_http_detached_total";
    let _serial = SERIAL.lock().await;
    let mut server = Edge::start(edge(5000, 5000, 30_000, 1000)).await;
    let before = server.metric(DETACHED).await;
    let customer = common::uid("gone");
    let usage_path = format!("/v1/customers/{customer}/usage");
    let mut rounds = 0;
    while rounds < 400 && (rounds < 3 || server.metric(DETACHED).await - before < 10.0) {
        rounds += 1;
        let mut tasks = Vec::new();
        for i in 0..50 {
            let consume =
                json!({"customer": customer, "meter": "interview_minutes", "quantity": 1, "consume": true, "id": common::uid("c")});
            let event = json!({"id": common::uid("e"), "customer": customer, "meter": "interviews"});
            let (path, body) = if i % 2 == 0 { ("/v1/check", consume) } else { ("/v1/events", event) };
            tasks.push(tokio::spawn(send_and_hang_up(server.addr, path, body.to_string())));
        }
        for t in tasks {
            t.await.expect("sender");
        }
    }
    let detached = server.metric(DETACHED).await - before;
    assert!(detached >= 10.0, "only {detached} handler(s) dropped unfinished in {rounds} rounds: the path was not taken");
    // The detached handlers finish on their own tasks: wait until the totals settle.
    let mut counted = server.client().get(&usage_path).await.body["meters"].clone();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = server.client().get(&usage_path).await.body["meters"].clone();
        if now == counted {
            break;
        }
        counted = now;
    }
    let used =
        |meters: &Value, meter: &str| meters.as_array().and_then(|m| m.iter().find(|m| m["meter"] == meter)).map(|m| m["used"].clone());
    let sent = json!(rounds * 25);
    for meter in ["interview_minutes", "interviews"] {
        let n = used(&counted, meter).and_then(|v| v.as_u64()).unwrap_or(0);
        assert!(n <= rounds as u64 * 25, "{meter}: {n} counted of {sent} sent");
    }
    let app = server.app.take().expect("running");
    let dir = std::mem::replace(&mut server._dir, tempfile::tempdir().expect("temp dir"));
    app.shutdown().await.expect("clean shutdown");
    let server = Edge::start_in(edge(5000, 5000, 30_000, 1000), dir).await;
    let replayed = server.client().get(&usage_path).await.body["meters"].clone();
    for meter in ["interview_minutes", "interviews"] {
        assert_eq!(used(&replayed, meter), used(&counted, meter), "{meter}: after the restart (counted before it: {counted})");
    }
    server.stop().await;
}
