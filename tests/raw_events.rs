//! `clickhouse.raw_events = true` against a real ClickHouse (18.16 under
//! `scripts/test`): every acknowledged event lands in `raw_events` exactly once,
//! with its fields, through graceful restarts, SIGKILLs mid-export, a chunk an
//! earlier run stored in part, an INSERT whose answer is lost, and ClickHouse
//! outages (during which the WAL keeps what the export still needs). Without
//! the ClickHouse of `scripts/test` skipped with a note, or failed under
//! `METERD_TEST_REQUIRE_SERVICES` (see `common::require`).

mod common;

use common::ch::{cutting_proxy, holding_proxy, query, unique_db, ClickHouseServer};
use common::load::{try_send, Rng};
use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::require::{clickhouse_url, need, Need};
use common::{away_from_day_boundary, now_ms, Client, TestServer};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const METERS: &str = "[[meters]]\nname = \"tokens\"\n[[meters]]\nname = \"minutes\"\nprecision = 2\n\
    [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = { limit = \"unlimited\" }\nminutes = { limit = \"unlimited\" }\n";

/// A config exporting raw events to `db`, flushing and exporting every `interval`.
fn config(url: &str, db: &str, interval: &str) -> String {
    format!("[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\nflush_interval = \"{interval}\"\nraw_events = true\n{METERS}")
}

/// The hex `id_hash` meterd stores for an event id.
fn id_hex(id: &str) -> String {
    format!("{:032x}", meterd::ingest::dedupe::hash_id(id))
}

/// One number from a query (`u64::MAX` if unreadable).
async fn number(url: &str, sql: &str) -> u64 {
    query(url, sql).await.trim().parse().unwrap_or(u64::MAX)
}

async fn rows(url: &str, db: &str) -> u64 {
    number(url, &format!("SELECT count() FROM {db}.raw_events")).await
}

/// Waits until `raw_events` holds `want` rows (the export runs on its own).
async fn wait_rows(url: &str, db: &str, want: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let got = rows(url, db).await;
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count() / distinct keys / distinct id hashes` of the table: equal when no
/// row is stored twice.
async fn uniqueness(url: &str, db: &str) -> String {
    query(url, &format!("SELECT count(), uniqExact(instance_id, wal_seq, idx), uniqExact(id_hash) FROM {db}.raw_events")).await
}

/// Every `id_hash` in the table.
async fn stored_hashes(url: &str, db: &str) -> HashSet<String> {
    query(url, &format!("SELECT id_hash FROM {db}.raw_events")).await.lines().map(str::to_string).collect()
}

/// `n` events with ids `{tag}-{i}` (their ids are returned too).
fn batch(tag: &str, n: usize, rng: &mut Rng) -> (Value, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let events = ids
        .iter()
        .map(|id| json!({"id": id, "customer": format!("c{}", rng.below(13)), "meter": "tokens", "quantity": 1 + rng.below(9), "properties": {"k": id}}))
        .collect();
    (Value::Array(events), ids)
}

/// The segment files of a WAL directory (first sequence of each).
fn segments(wal: &Path) -> Vec<u64> {
    meterd::wal::segment::list(wal).unwrap_or_default().into_iter().map(|(first, _)| first).collect()
}

/// The export's watermark file (0 when there is none yet).
fn watermark(wal: &Path) -> u64 {
    meterd::raw_export::watermark::read(wal).ok().flatten().unwrap_or(0)
}

/// Waits until the watermark file says `seq` (it is written just after the
/// rows are acknowledged).
async fn wait_watermark(wal: &Path, seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while watermark(wal) < seq && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watermark(wal)
}

/// The ClickHouse server's URL and a fresh database name, away from a day's
/// end (see `require::clickhouse_url` for a missing server).
async fn clickhouse_db() -> Need<(String, String)> {
    let url = clickhouse_url()?;
    away_from_day_boundary().await;
    Ok((url, unique_db()))
}

async fn drop_db(url: &str, db: &str) {
    let _ = query(url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_in_raw_events_once_with_its_fields() {
    let (url, db) = need!(clickhouse_db().await);
    let server = TestServer::start(&config(&url, &db, "100ms")).await;
    let c = server.client();
    let t0 = now_ms() - 60_000;
    let (mut events, mut tokens_raw, mut minutes_raw) = (0u64, 0i64, 0i64);
    for b in 0..20 {
        let batch: Vec<Value> = (0..250)
            .map(|i| {
                let n = b * 250 + i;
                let mut e = if n % 2 == 0 {
                    tokens_raw += 1 + n % 5;
                    json!({"id": format!("a-{n}"), "customer": format!("c{}", n % 7), "meter": "tokens", "quantity": 1 + n % 5})
                } else {
                    minutes_raw += 125 + n % 3;
                    json!({"id": format!("a-{n}"), "customer": format!("c{}", n % 7), "meter": "minutes", "quantity": (125 + n % 3) as f64 / 100.0})
                };
                e["timestamp"] = json!(t0 + n);
                if n % 3 == 0 {
                    e["properties"] = json!({"region": if n % 2 == 0 { "eu" } else { "us" }, "n": n.to_string()});
                }
                e
            })
            .collect();
        let r = c.events(&Value::Array(batch)).await;
        assert_eq!(r.status, 202, "{}", r.text);
        events += 250;
    }
    // A retried batch is a duplicate: not accepted, not exported again.
    let again: Vec<Value> = (0..10).map(|n| json!({"id": format!("a-{n}"), "customer": "c0", "meter": "tokens", "quantity": 99})).collect();
    let r = c.events(&Value::Array(again)).await;
    assert_eq!(r.body["duplicates"], json!(10), "{}", r.text);
    // A consume is an event too.
    let r = c.check(&json!({"customer": "c9", "meter": "tokens", "quantity": 4, "consume": true, "id": "consume-1"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    (events, tokens_raw) = (events + 1, tokens_raw + 4);

    assert_eq!(wait_rows(&url, &db, events, Duration::from_secs(60)).await, events, "every accepted event is exported");
    assert_eq!(uniqueness(&url, &db).await, format!("{events}\t{events}\t{events}"), "each once");
    let sums =
        query(&url, &format!("SELECT meter, sum(raw), toString(round(sum(value), 4)) FROM {db}.raw_events GROUP BY meter ORDER BY meter"))
            .await;
    assert_eq!(sums, format!("minutes\t{minutes_raw}\t{}\ntokens\t{tokens_raw}\t{tokens_raw}", minutes_raw as f64 / 100.0));
    // One event, field by field (n = 3: a minutes event with properties).
    let row = query(
        &url,
        &format!(
            "SELECT customer, meter, raw, precision, value, ts_ms, toUnixTimestamp(ts), properties, \
             accepted_ms >= {t0} AND toUnixTimestamp(accepted) = intDiv(accepted_ms, 1000), instance_id != '' \
             FROM {db}.raw_events WHERE id_hash = '{}'",
            id_hex("a-3")
        ),
    )
    .await;
    let ts = t0 + 3;
    assert_eq!(row, format!("c3\tminutes\t125\t2\t1.25\t{ts}\t{}\t{{\"n\":\"3\",\"region\":\"us\"}}\t1\t1", ts.div_euclid(1000)));
    let consume =
        query(&url, &format!("SELECT customer, raw, properties FROM {db}.raw_events WHERE id_hash = '{}'", id_hex("consume-1"))).await;
    assert_eq!(consume, "c9\t4\t{}");
    // Events of one batch share a record and keep their order in it.
    let first = query(
        &url,
        &format!("SELECT wal_seq, idx FROM {db}.raw_events WHERE id_hash IN ('{}', '{}') ORDER BY idx", id_hex("a-0"), id_hex("a-249")),
    )
    .await;
    let seqs: Vec<&str> = first.lines().map(|l| l.split('\t').next().unwrap_or("")).collect();
    assert_eq!(first.lines().map(|l| l.split('\t').nth(1).unwrap_or("")).collect::<Vec<_>>(), vec!["0", "249"], "{first}");
    assert_eq!(seqs[0], seqs[1], "{first}");

    // (Exact metrics are checked against a process of its own, below: tests in
    // this binary share one recorder.)
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.contains("meterd_raw_export_rows_total"), "{metrics}");

    // A graceful restart exports nothing twice.
    let server = server.restart().await;
    let body = json!([{"id": "after-restart", "customer": "c1", "meter": "tokens", "quantity": 2}]);
    assert_eq!(server.client().events(&body).await.status, 202);
    assert_eq!(wait_rows(&url, &db, events + 1, Duration::from_secs(60)).await, events + 1);
    server.stop().await;
    assert_eq!(uniqueness(&url, &db).await, format!("{0}\t{0}\t{0}", events + 1));
    drop_db(&url, &db).await;
}

/// A run killed after its WAL record was written and while part of the chunk
/// was stored (simulated: the killed run's partial INSERT is written here, as
/// 18.16 keeps a body cut mid-stream): the next run sends only the missing rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_stored_in_part_by_a_killed_run_is_completed_not_repeated() {
    let (url, db) = need!(clickhouse_db().await);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    let write_config = |interval: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ninstance_id = \"partial\"\n[storage]\ndata_dir = {:?}\n{}",
            dir.path().join("data").display().to_string(),
            config(&url, &db, interval)
        );
        std::fs::write(&path, text).expect("config");
    };
    // Run 1 exports only on its own schedule (an hour away): its record stays unexported.
    write_config("1h");
    let mut p = spawn(&path, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    let (body, ids) = batch("p", 100, &mut Rng(7));
    assert_eq!(Client { addr, token: None }.events(&body).await.status, 202);
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
    // What the killed run's INSERT left: events 0..40 of record 1, marked.
    let insert = format!(
        "INSERT INTO {db}.raw_events (instance_id, wal_seq, idx, id_hash, customer, meter, raw, precision, value, ts, ts_ms, \
         accepted, accepted_ms, properties) SELECT 'partial', 1, toUInt32(number), '', 'earlier-attempt', 'tokens', 0, 0, 0, \
         now(), 0, now(), 0, '{{}}' FROM system.numbers LIMIT 40"
    );
    assert_eq!(query(&url, &insert).await, "");
    write_config("100ms");
    let mut p = spawn(&path, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(wait_rows(&url, &db, 100, Duration::from_secs(60)).await, 100, "{}", p.log());
    assert_eq!(uniqueness(&url, &db).await.split('\t').take(2).collect::<Vec<_>>(), vec!["100", "100"], "no key twice");
    let by_origin = query(&url, &format!("SELECT customer = 'earlier-attempt', min(idx), max(idx), count() FROM {db}.raw_events GROUP BY customer = 'earlier-attempt' ORDER BY 1")).await;
    assert_eq!(by_origin, "0\t40\t99\t60\n1\t0\t39\t40", "only the 60 missing rows were sent");
    let sent: HashSet<String> = ids[40..].iter().map(|id| id_hex(id)).collect();
    let stored: HashSet<String> = stored_hashes(&url, &db).await.into_iter().filter(|h| !h.is_empty()).collect();
    assert_eq!(stored, sent);
    assert!(p.log().contains("an earlier attempt stored part of this chunk"), "{}", p.log());
    // This process's own metrics: 60 rows sent, caught up at record 1.
    let metrics = Client { addr, token: None }.get("/metrics").await.text;
    for line in [
        "meterd_raw_export_rows_total 60",
        "meterd_raw_export_watermark 1",
        "meterd_raw_export_lag_records 0",
        "meterd_raw_export_lag_seconds 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing:\n{metrics}");
    }
    p.sigterm();
    assert!(p.wait_exit(Duration::from_secs(20)).await.success(), "{}", p.log());
    drop_db(&url, &db).await;
}

/// The INSERT reaches ClickHouse, its answer is cut: the export cannot know it
/// landed, so before sending the chunk again it asks, and sends nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_insert_whose_answer_is_lost_is_not_sent_twice() {
    let (url, db) = need!(clickhouse_db().await);
    let (armed, cuts) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    let upstream = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy = cutting_proxy(upstream, "raw_events", armed.clone(), cuts.clone()).await;
    let server = TestServer::start(&config(&format!("http://{proxy}"), &db, "100ms")).await;
    let (body, ids) = batch("lost", 500, &mut Rng(11));
    assert_eq!(server.client().events(&body).await.status, 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cuts.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cuts.load(Ordering::SeqCst), 1, "the proxy cut the export's INSERT");
    assert_eq!(wait_rows(&url, &db, 500, Duration::from_secs(60)).await, 500);
    // Another chunk after the retry: exported as usual.
    let (body, more) = batch("after", 300, &mut Rng(12));
    assert_eq!(server.client().events(&body).await.status, 202);
    assert_eq!(wait_rows(&url, &db, 800, Duration::from_secs(60)).await, 800);
    assert_eq!(uniqueness(&url, &db).await, "800\t800\t800");
    assert_eq!(stored_hashes(&url, &db).await, ids.iter().chain(&more).map(|id| id_hex(id)).collect::<HashSet<_>>());
    let metrics = server.client().get("/metrics").await.text;
    let errors = metrics.lines().find(|l| l.starts_with("meterd_raw_export_errors_total")).unwrap_or("");
    assert!(!errors.is_empty() && !errors.ends_with(" 0"), "the cut attempt is counted: {errors}");
    server.stop().await;
    drop_db(&url, &db).await;
}

#[derive(Default)]
struct Ledger {
    acked: Vec<String>,
    in_doubt: Vec<(Value, Vec<String>)>,
}

/// Sends until the server dies; the batch whose answer never came is in doubt.
async fn load(c: Client, ledger: Arc<Mutex<Ledger>>, tag: String, seed: u64) {
    let mut rng = Rng(seed);
    for n in 0.. {
        let (body, ids) = batch(&format!("{tag}-{n}"), 200, &mut rng);
        let sent = tokio::time::timeout(Duration::from_secs(10), try_send(&c, &body)).await;
        let mut l = ledger.lock().unwrap_or_else(|p| p.into_inner());
        match sent {
            Ok(Some(202)) => l.acked.extend(ids),
            _ => {
                l.in_doubt.push((body, ids));
                return;
            }
        }
    }
}

/// meterd SIGKILLed again and again while it exports every 20 ms under load
/// (fsync and buffered durability in turn): afterwards every acknowledged event
/// (and every in-doubt one, resent as a client would) is in `raw_events`
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_exporting_keeps_every_acknowledged_event_once() {
    let (url, db) = need!(clickhouse_db().await);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    let c = Client { addr, token: None };
    let mut rng = Rng(0x5eed_4a11);
    let mut expected: Vec<String> = Vec::new();
    for round in 0..4 {
        let durability = if round % 2 == 0 { "fsync" } else { "buffered" };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"{durability}\"\n{}",
            dir.path().join("data").display().to_string(),
            config(&url, &db, "20ms")
        );
        std::fs::write(&path, text).expect("config");
        let mut p = spawn(&path, dir.path().join(format!("run{round}.log")));
        wait_healthy(&mut p, addr).await;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let workers: Vec<_> =
            (0..3).map(|w| tokio::spawn(load(c.clone(), ledger.clone(), format!("r{round}w{w}"), rng.next() | 1))).collect();
        tokio::time::sleep(Duration::from_millis(400 + rng.below(800))).await;
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
        for w in workers {
            w.await.expect("worker");
        }
        let ledger = std::mem::take(&mut *ledger.lock().unwrap_or_else(|e| e.into_inner()));
        assert!(!ledger.acked.is_empty(), "round {round}: load ran before the kill");
        // Restart and resend what is in doubt, as a client would.
        let mut p = spawn(&path, dir.path().join(format!("run{round}b.log")));
        wait_healthy(&mut p, addr).await;
        for (body, _) in &ledger.in_doubt {
            assert_eq!(c.events(body).await.status, 202);
        }
        eprintln!(
            "round {round}: acked {}, in doubt {} batches, stored so far {}",
            ledger.acked.len(),
            ledger.in_doubt.len(),
            rows(&url, &db).await
        );
        expected.extend(ledger.acked);
        expected.extend(ledger.in_doubt.into_iter().flat_map(|(_, ids)| ids));
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
    }
    // A clean start exports what the last kill left in the WAL.
    let mut p = spawn(&path, dir.path().join("final.log"));
    wait_healthy(&mut p, addr).await;
    let want = expected.len() as u64;
    let stored = wait_rows(&url, &db, want, Duration::from_secs(60)).await;
    // What the kills hit (informational: it varies from run to run).
    let logs: Vec<String> = (0..4)
        .flat_map(|r| ["", "b"].map(|s| std::fs::read_to_string(dir.path().join(format!("run{r}{s}.log"))).unwrap_or_default()))
        .chain([p.log()])
        .collect();
    let count = |needle: &str| logs.iter().map(|l| l.matches(needle).count()).sum::<usize>();
    eprintln!(
        "chunks found stored in part: {}, found stored whole: {}, waits for a killed run's inserts: {}",
        count("an earlier attempt stored part of this chunk"),
        count("an earlier attempt stored this chunk"),
        count("waiting for raw-event inserts of the previous run")
    );
    if stored != want {
        for round in 0..4 {
            for suffix in ["", "b"] {
                let log = std::fs::read_to_string(dir.path().join(format!("run{round}{suffix}.log"))).unwrap_or_default();
                eprintln!("--- run{round}{suffix}.log\n{}", log.lines().filter(|l| l.contains("raw")).collect::<Vec<_>>().join("\n"));
            }
        }
    }
    assert_eq!(stored, want, "every acknowledged event is in raw_events");
    assert_eq!(uniqueness(&url, &db).await, format!("{want}\t{want}\t{want}"), "none twice");
    let hashes: HashSet<String> = expected.iter().map(|id| id_hex(id)).collect();
    assert_eq!(stored_hashes(&url, &db).await, hashes, "exactly the acknowledged ones");
    p.sigterm();
    assert!(p.wait_exit(Duration::from_secs(20)).await.success(), "{}", p.log());
    assert_eq!(rows(&url, &db).await, want);
    drop_db(&url, &db).await;
}

/// ClickHouse killed while meterd ingests: ingest goes on, the WAL keeps every
/// segment the export has not stored, and once ClickHouse is back the export
/// catches up, once, and the segments go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_catches_up_after_a_clickhouse_outage_and_the_wal_keeps_what_it_needs() {
    let mut clickhouse = need!(ClickHouseServer::start().await);
    away_from_day_boundary().await;
    let db = unique_db();
    let text = format!("[storage]\nwal_segment_bytes = 4096\n{}", config(&clickhouse.url(), &db, "100ms"));
    let server = TestServer::start(&text).await;
    let (c, wal) = (server.client(), server.data_dir().join("wal"));
    let mut rng = Rng(0xc1c1);
    let mut ids = Vec::new();
    for n in 0..5 {
        let (body, batch_ids) = batch(&format!("before-{n}"), 50, &mut rng);
        assert_eq!(c.events(&body).await.status, 202);
        ids.extend(batch_ids);
    }
    assert_eq!(wait_rows(&clickhouse.url(), &db, ids.len() as u64, Duration::from_secs(60)).await, ids.len() as u64);
    let exported = server.app().engine.wal().durable_seq();
    assert_eq!(wait_watermark(&wal, exported).await, exported);
    clickhouse.kill();
    for n in 0..40 {
        let (body, batch_ids) = batch(&format!("during-{n}"), 50, &mut rng);
        let r = c.events(&body).await;
        assert_eq!(r.status, 202, "ingest goes on while ClickHouse is away: {}", r.text);
        ids.extend(batch_ids);
    }
    // Nothing new is exported, and every record above the watermark is still on disk.
    assert_eq!(watermark(&wal), exported);
    let live = segments(&wal);
    assert!(live.len() > 5, "records pile up in rotated segments: {live:?}");
    assert!(live[0] <= exported + 1, "the segment holding record {} is kept: {live:?}", exported + 1);
    clickhouse.restart().await;
    let want = ids.len() as u64;
    assert_eq!(wait_rows(&clickhouse.url(), &db, want, Duration::from_secs(90)).await, want);
    assert_eq!(uniqueness(&clickhouse.url(), &db).await, format!("{want}\t{want}\t{want}"));
    assert_eq!(stored_hashes(&clickhouse.url(), &db).await, ids.iter().map(|id| id_hex(id)).collect::<HashSet<_>>());
    // Exported and flushed: the segments go (the open one stays).
    let deadline = Instant::now() + Duration::from_secs(30);
    while segments(&wal).len() > 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(segments(&wal).len() <= 2, "{:?}", segments(&wal));
    server.stop().await;
}

/// The usage store keeps up while the export cannot write (its table renamed
/// away): flushes checkpoint the WAL far past the export's watermark, and the
/// segments above the watermark are kept anyway; with the table back the
/// export resumes where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_wait_for_the_export_while_flushes_go_on() {
    let (url, db) = need!(clickhouse_db().await);
    let text = format!("[storage]\nwal_segment_bytes = 4096\n{}", config(&url, &db, "50ms"));
    let server = TestServer::start(&text).await;
    let (c, wal) = (server.client(), server.data_dir().join("wal"));
    let mut rng = Rng(0xb01d);
    let mut ids = Vec::new();
    let (body, first) = batch("first", 50, &mut rng);
    assert_eq!(c.events(&body).await.status, 202);
    ids.extend(first);
    assert_eq!(wait_rows(&url, &db, 50, Duration::from_secs(60)).await, 50);
    let exported = server.app().engine.wal().durable_seq();
    assert_eq!(wait_watermark(&wal, exported).await, exported);
    assert_eq!(query(&url, &format!("RENAME TABLE {db}.raw_events TO {db}.raw_events_away")).await, "");
    for n in 0..40 {
        let (body, batch_ids) = batch(&format!("held-{n}"), 50, &mut rng);
        assert_eq!(c.events(&body).await.status, 202);
        ids.extend(batch_ids);
    }
    // The usage store takes it all: the checkpoint moves on.
    let durable = server.app().engine.wal().durable_seq();
    let deadline = Instant::now() + Duration::from_secs(30);
    while meterd::wal::checkpoint::read(&wal).unwrap_or(0) < durable && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checkpoint = meterd::wal::checkpoint::read(&wal).unwrap_or(0);
    assert_eq!(checkpoint, durable, "the flusher checkpointed everything");
    assert_eq!(watermark(&wal), exported, "the export is stuck");
    let live = segments(&wal);
    assert!(live.len() > 5 && live[0] <= exported + 1, "segments above the export's watermark are kept: {live:?} (watermark {exported})");
    assert_eq!(query(&url, &format!("RENAME TABLE {db}.raw_events_away TO {db}.raw_events")).await, "");
    let want = ids.len() as u64;
    assert_eq!(wait_rows(&url, &db, want, Duration::from_secs(60)).await, want);
    assert_eq!(uniqueness(&url, &db).await, format!("{want}\t{want}\t{want}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while segments(&wal).first().is_some_and(|&f| f <= exported + 1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(segments(&wal).first().is_some_and(|&f| f > exported + 1), "exported segments go: {:?}", segments(&wal));
    server.stop().await;
    drop_db(&url, &db).await;
}

/// `raw_events` holding WAL numbers of this instance beyond its WAL's end (a
/// data directory replaced or repaired under the same instance id, after the
/// export got further than the usage store) would make new events look
/// stored: meterd refuses to start and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_events_ahead_of_the_wal_stops_the_start() {
    let url = need!(clickhouse_url());
    let db = unique_db();
    let text = format!("[server]\ninstance_id = \"replaced\"\n{}", config(&url, &db, "100ms"));
    let server = TestServer::start(&text).await; // creates the tables
    server.stop().await;
    let insert = format!(
        "INSERT INTO {db}.raw_events (instance_id, wal_seq, idx, id_hash, customer, meter, raw, precision, value, ts, ts_ms, \
         accepted, accepted_ms, properties) VALUES ('replaced', 5, 0, '', 'c', 'tokens', 1, 0, 1, now(), 0, now(), 0, '{{}}')"
    );
    assert_eq!(query(&url, &insert).await, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let valid = meterd::config::Config::parse(&common::with_dirs(&text, dir.path()), "t").and_then(|c| c.validate("t")).expect("config");
    let err = meterd::AppHandle::start(valid).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("raw_events already holds WAL record 5 of instance replaced, but the WAL here ends at 0")
            && err.contains("server.instance_id"),
        "{err}"
    );
    drop_db(&url, &db).await;
}

/// ClickHouse takes the export's INSERT and never answers (the usage store is
/// fine): shutdown still ends, within its grace period, and the next start
/// exports the held events once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_clickhouse_holds_an_export_insert() {
    let (url, db) = need!(clickhouse_db().await);
    let held = Arc::new(AtomicU64::new(0));
    let upstream = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy = holding_proxy(upstream, "raw_events", held.clone()).await;
    let grace = "[server]\nshutdown_grace = \"6s\"\n";
    let mut server = TestServer::start(&format!("{grace}{}", config(&format!("http://{proxy}"), &db, "100ms"))).await;
    let (body, ids) = batch("held", 100, &mut Rng(21));
    assert_eq!(server.client().events(&body).await.status, 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held.load(Ordering::SeqCst) > 0, "the export's INSERT is held");
    // The graceful shutdown does not wait for the answer that never comes.
    let app = server.app.take().expect("running");
    app.shutdown().await.expect("shutdown within the grace period");
    assert_eq!(rows(&url, &db).await, 0, "nothing reached the table");
    let usage = query(&url, &format!("SELECT sum(value) > 0 FROM {db}.usage_minute")).await;
    assert_eq!(usage, "1", "the usage store was written all along");
    // Next start, straight to ClickHouse: the held events are exported, once.
    let server = TestServer::start_in(&format!("{grace}{}", config(&url, &db, "100ms")), server.dir).await;
    assert_eq!(wait_rows(&url, &db, 100, Duration::from_secs(60)).await, 100);
    assert_eq!(uniqueness(&url, &db).await, "100\t100\t100");
    assert_eq!(stored_hashes(&url, &db).await, ids.iter().map(|id| id_hex(id)).collect::<HashSet<_>>());
    server.stop().await;
    drop_db(&url, &db).await;
}
