//! meterd-client against the real meterd binary ($METERD_BIN, or the
//! workspace's target/debug/meterd, built by `cargo build`): API round trips,
//! typed errors, the buffer-full policies, flush on close, SIGKILL under load
//! and restart with an exact total, and the webhook verifier against the
//! reference `standardwebhooks` crate.

// The free-port rule of meterd's own tests (claimed across test processes).
#[path = "../../../tests/common/ports.rs"]
mod ports;

use meterd_client::webhook::{Webhook, WebhookError};
use meterd_client::{Client, Config, Error, Event, GrantRequest, OnFull, Retry, UsageQuery};
use ports::free_port;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METERS_AND_PLANS: &str = r#"
[[meters]]
name = "tokens"
aggregation = "sum"

[[meters]]
name = "interview_minutes"
aggregation = "sum"
precision = 2

[[meters]]
name = "interviews"
aggregation = "count"

[[meters]]
name = "ai_credits"
aggregation = "sum"

[[plans]]
name = "starter"
default = true
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
interview_minutes = { limit = 300, window = "total" }
interviews = { limit = 3, window = "total" }
ai_credits = { limit = "credits" }
"#;

/// A meterd process on a fixed port and data dir; killed on drop.
struct Meterd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

fn bin() -> PathBuf {
    std::env::var_os("METERD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/meterd"))
}

impl Meterd {
    /// Writes the config for `port`; does not start.
    fn new(port: u16) -> Meterd {
        let bin = bin();
        assert!(bin.exists(), "no meterd binary at {}: run `cargo build` first (or set METERD_BIN)", bin.display());
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\ndata_dir = \"{}\"\n{METERS_AND_PLANS}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("meterd.toml"), config).expect("write config");
        Meterd { child: None, dir, port }
    }

    async fn start() -> Meterd {
        let mut m = Meterd::new(free_port());
        m.restart().await;
        m
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meterd.log")).unwrap_or_default()
    }

    async fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("meterd.log")).expect("log");
        let child = Command::new(bin())
            .arg("--config")
            .arg(self.dir.path().join("meterd.toml"))
            .env_remove("METERD_LISTEN")
            .env_remove("METERD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn meterd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("meterd exited early with {status}; log:\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "meterd never listened; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for Meterd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of meterd that, once armed, swallows the next answer
/// meterd sends (meterd has durably written the request by then) and cuts
/// the client's connection: an answer lost after the write, on demand.
struct LosingProxy {
    port: u16,
    armed: Arc<AtomicBool>,
    tripped: Arc<tokio::sync::Notify>,
}

async fn losing_proxy(upstream: u16) -> LosingProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let armed = Arc::new(AtomicBool::new(false));
    let tripped = Arc::new(tokio::sync::Notify::new());
    let (a, t) = (armed.clone(), tripped.clone());
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
            let (mut in_r, mut in_w) = inbound.into_split();
            let (mut out_r, mut out_w) = outbound.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut in_r, &mut out_w).await });
            let (a, t) = (a.clone(), t.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match out_r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if a.swap(false, Ordering::SeqCst) {
                        let _ = in_w.shutdown().await;
                        t.notify_one();
                        return;
                    }
                    if in_w.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    LosingProxy { port, armed, tripped }
}

fn client(m: &Meterd) -> Client {
    Client::new(Config::new(m.url())).expect("client")
}

fn uid(p: &str) -> String {
    format!("{p}-{}", uuid::Uuid::now_v7())
}

/// Header lookup over three values, as `Webhook::verify` takes it.
fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> impl Fn(&str) -> Option<&'a str> + 'a {
    move |n: &str| match n {
        "webhook-id" => Some(id),
        "webhook-timestamp" => Some(ts),
        "webhook-signature" => Some(sig),
        _ => None,
    }
}

async fn total(c: &Client, meter: &str, customer: Option<&str>) -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let q = UsageQuery {
        meter: meter.into(),
        from: (now - 2 * 86_400_000).to_string(),
        to: (now + 2 * 86_400_000).to_string(),
        granularity: Some("day".into()),
        customer: customer.map(str::to_string),
        group_by: None,
    };
    c.usage(&q).await.expect("usage").data.iter().map(|p| p.value).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_check_consume_reserve_settle_release_credits() {
    let m = Meterd::start().await;
    let c = client(&m);
    let cu = uid("c");
    let first = c.check(&cu, "interviews", None).await.expect("check");
    assert!(first.allowed);
    assert_eq!((first.reason.as_str(), first.limit, first.used), ("within_limit", Some(3.0), 0.0));
    let a = c.consume(&cu, "interviews", None, Some("iv-1")).await.expect("consume");
    assert_eq!(a.used, 1.0);
    assert_eq!(c.consume(&cu, "interviews", None, Some("iv-1")).await.expect("again").used, 1.0, "same id: recorded once");

    let held = c.reserve(&uid("r"), &cu, "interview_minutes", 60.0, Some("2h")).await.expect("reserve");
    assert!(held.check.allowed);
    assert_eq!(held.reservation.status, "held");
    let during = c.check(&cu, "interview_minutes", Some(241.0)).await.expect("check");
    assert!(!during.allowed);
    assert_eq!(during.held, 60.0);
    let settled = c.settle(&held.reservation.id, Some(42.5)).await.expect("settle");
    assert_eq!((settled.status.as_str(), settled.settled_quantity), ("settled", Some(42.5)));
    assert_eq!(c.settle(&held.reservation.id, Some(99.0)).await.expect("again").settled_quantity, Some(42.5));
    let other = c.reserve(&uid("r"), &cu, "interview_minutes", 100.0, None).await.expect("reserve");
    assert_eq!(other.reservation.expires_at, None);
    assert_eq!(c.release(&other.reservation.id).await.expect("release").status, "released");
    assert_eq!(c.reservation(&other.reservation.id).await.expect("get").status, "released");
    let usage = c.customer_usage(&cu).await.expect("usage");
    let minutes = usage.meters.iter().find(|r| r.meter == "interview_minutes").expect("row");
    assert_eq!((minutes.used, minutes.held), (42.5, 0.0));
    assert_eq!(total(&c, "interview_minutes", Some(&cu)).await, 42.5);

    let grant = GrantRequest { id: uid("g"), meter: "ai_credits".into(), amount: 100.0, ..Default::default() };
    assert_eq!(c.create_grant(&cu, &grant).await.expect("grant").status, "active");
    assert!(c.consume(&cu, "ai_credits", Some(30.0), None).await.expect("consume").allowed);
    let b = c.balances(&cu).await.expect("balances");
    assert_eq!(b.balances.iter().find(|x| x.meter == "ai_credits").map(|x| x.balance), Some(70.0));
    assert_eq!(c.grants(&cu).await.expect("grants")[0].remaining, 70.0);
    assert_eq!(c.void_grant(&cu, &grant.id).await.expect("void").status, "voided");
    let e = c.entitlements(&cu).await.expect("entitlements");
    assert_eq!(e["plan"], "starter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_errors_carry_status_code_and_details() {
    let m = Meterd::start().await;
    let c = client(&m);
    let e = c.check("x", "no_such_meter", None).await.expect_err("unknown meter");
    assert_eq!((e.status(), e.code()), (400, "invalid_request"));
    assert!(e.to_string().contains("meter"), "{e}");
    let e = c.ingest(vec![Event::new("x", "tokens"), Event::new("x", "no_such_meter")]).await.expect_err("bad batch");
    assert_eq!((e.status(), e.code(), e.retryable()), (400, "invalid_event", false));
    let d = e.details().expect("details");
    assert_eq!((d[0]["index"].as_u64(), d[0]["field"].as_str()), (Some(1), Some("meter")));
    let e = c.reservation("no-such").await.expect_err("unknown");
    assert_eq!((e.status(), e.code()), (404, "not_found"));
    let mut cfg = Config::new("http://127.0.0.1:1");
    cfg.retry = Retry { max_attempts: 2, base_delay: Duration::from_millis(5), max_delay: Duration::from_millis(5) };
    let nowhere = Client::new(cfg).expect("client");
    let e = nowhere.check("x", "tokens", None).await.expect_err("nothing listens");
    assert_eq!((e.status(), e.code()), (0, "network_error"));
    assert_eq!(nowhere.stats().retries, 1);
    let e = c.track(Event::new("", "tokens")).await.expect_err("empty customer");
    assert!(matches!(e, Error::InvalidEvent { field: "customer", .. }));
}

/// A client whose meterd is not up yet: the first batch retries while the
/// buffer fills; then meterd starts on that port and `close()` delivers.
async fn full_buffer(on_full: OnFull) -> (Client, Meterd, String) {
    let m = Meterd::new(free_port());
    let mut cfg = Config::new(m.url());
    cfg.batch_size = 5;
    cfg.max_buffer_size = 10;
    cfg.on_full = on_full;
    cfg.batch_retry = Retry { max_attempts: 200, base_delay: Duration::from_millis(20), max_delay: Duration::from_millis(50) };
    let c = Client::new(cfg).expect("client");
    let cu = uid("c");
    for i in 1..=5 {
        c.track(Event::new(&cu, "tokens").quantity(i as f64)).await.expect("track");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.stats().in_flight == 0 {
        assert!(Instant::now() < deadline, "the first batch never went out");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 0..10 {
        c.track(Event::new(&cu, "tokens")).await.expect("track");
    }
    (c, m, cu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_full_policies() {
    // drop-oldest: three more events drop the three oldest waiting.
    let (c, mut m, cu) = full_buffer(OnFull::DropOldest).await;
    for _ in 0..3 {
        c.track(Event::new(&cu, "tokens").quantity(100.0)).await.expect("track");
    }
    assert_eq!(c.stats().dropped, 3);
    m.restart().await;
    c.close().await.expect("close");
    assert_eq!(total(&c, "tokens", Some(&cu)).await, 15.0 + 7.0 + 300.0);
    assert!(matches!(c.track(Event::new(&cu, "tokens")).await, Err(Error::Closed)));

    // error: BufferFull, nothing lost of what was taken.
    let (c, mut m, cu) = full_buffer(OnFull::Error).await;
    assert!(matches!(c.track(Event::new(&cu, "tokens")).await, Err(Error::BufferFull(10))));
    m.restart().await;
    c.close().await.expect("close");
    assert_eq!(total(&c, "tokens", Some(&cu)).await, 25.0);

    // block: waits for room, loses nothing.
    let (c, mut m, cu) = full_buffer(OnFull::Block).await;
    let blocked = {
        let c = c.clone();
        let cu = cu.clone();
        tokio::spawn(async move { c.track(Event::new(&cu, "tokens")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!blocked.is_finished(), "track() waits while the buffer is full");
    m.restart().await;
    blocked.await.expect("join").expect("track");
    c.close().await.expect("close");
    assert_eq!(total(&c, "tokens", Some(&cu)).await, 26.0);
    assert_eq!(c.stats().dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_and_restart_total_is_exact() {
    let mut m = Meterd::start().await;
    let proxy = losing_proxy(m.port).await;
    let mut cfg = Config::new(format!("http://127.0.0.1:{}", proxy.port));
    cfg.batch_size = 400;
    cfg.flush_interval = Duration::from_millis(50);
    cfg.max_buffer_size = 100_000;
    cfg.batch_retry = Retry { max_attempts: 40, base_delay: Duration::from_millis(50), max_delay: Duration::from_millis(500) };
    let c = Client::new(cfg).expect("client");
    let n: u64 = 20_000;
    let producer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..n {
                c.track(Event::new(format!("c{}", i % 13), "tokens")).await.expect("track");
                if i % 200 == 199 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    // First: SIGKILL while a batch is on the wire (before or after meterd wrote it).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(c.stats().in_flight > 0 && c.stats().batches >= 5) {
        assert!(Instant::now() < deadline, "no batch in flight; stats {:?}", c.stats());
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    m.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    m.restart().await;
    // Then: meterd writes a batch and answers, the answer is lost, meterd is
    // SIGKILLed: the retry must be answered as duplicates.
    let before = c.stats().batches;
    while c.stats().batches < before + 5 {
        assert!(Instant::now() < deadline + Duration::from_secs(20), "no progress; stats {:?}", c.stats());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    proxy.armed.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), proxy.tripped.notified()).await.expect("an answer was swallowed");
    m.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    m.restart().await;

    producer.await.expect("producer");
    c.close().await.expect("close");
    let s = c.stats();
    assert_eq!((s.failed, s.dropped), (0, 0), "{s:?}");
    assert!(s.retries >= 2, "{s:?}");
    assert!(s.duplicates > 0, "the batch whose answer was lost was re-sent and deduplicated: {s:?}");
    assert_eq!(s.accepted + s.duplicates, n, "each event answered once: {s:?}");
    assert_eq!(total(&c, "tokens", None).await, n as f64);
    m.kill();
    m.restart().await;
    assert_eq!(total(&c, "tokens", None).await, n as f64, "after another restart");
}

#[test]
fn webhook_verifier_agrees_with_the_reference_crate() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ours = Webhook::new(secret).expect("secret");
    let theirs = standardwebhooks::Webhook::new(secret).expect("secret");
    let body = br#"{"type":"limit.threshold","data":{"customer":"u_42"}}"#;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;

    // The specification's example.
    let spec = headers("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    assert_eq!(ours.verify_at(br#"{"test": 2432232314}"#, spec, 1614265330), Ok(()));

    // Theirs signs, ours verifies; ours signs, theirs verifies.
    let sig = theirs.sign("msg_1", now, body).expect("sign");
    let ts = now.to_string();
    assert_eq!(ours.verify(body, headers("msg_1", &ts, &sig)), Ok(()));
    assert_eq!(ours.sign("msg_1", now, body), sig);
    let two = format!("v1,bm90IGEgc2lnbmF0dXJlIG9mIDMyIGJ5dGVzISEhISE= {sig}");
    assert_eq!(ours.verify(body, headers("msg_1", &ts, &two)), Ok(()), "any of several signatures");
    let mut map = http::HeaderMap::new();
    map.insert("webhook-id", http::HeaderValue::from_static("msg_2"));
    map.insert("webhook-timestamp", http::HeaderValue::from_str(&ts).expect("header"));
    map.insert("webhook-signature", http::HeaderValue::from_str(&ours.sign("msg_2", now, body)).expect("header"));
    theirs.verify(body, &map).expect("the reference verifies ours");

    // Refusals.
    assert_eq!(ours.verify(b"{}", headers("msg_1", &ts, &sig)), Err(WebhookError::NoMatch));
    assert_eq!(ours.verify(body, headers("msg_x", &ts, &sig)), Err(WebhookError::NoMatch));
    let (old, old_sig) = ((now - 301).to_string(), ours.sign("msg_1", now - 301, body));
    assert_eq!(ours.verify(body, headers("msg_1", &old, &old_sig)), Err(WebhookError::TooOld));
    let (new, new_sig) = ((now + 301).to_string(), ours.sign("msg_1", now + 301, body));
    assert_eq!(ours.verify(body, headers("msg_1", &new, &new_sig)), Err(WebhookError::TooNew));
    let (edge, edge_sig) = ((now - 299).to_string(), ours.sign("msg_1", now - 299, body));
    assert_eq!(ours.verify(body, headers("msg_1", &edge, &edge_sig)), Ok(()));
    assert_eq!(ours.verify(body, |_| None), Err(WebhookError::MissingHeader("webhook-id")));
}
