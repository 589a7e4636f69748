//! `meterd backup` of a running instance under load, then `meterd restore` into
//! another data dir: the restored meterd has exactly the batches up to the
//! backup point — everything acknowledged before the backup started, nothing
//! sent after it returned, none twice — and its dedupe still knows them.

mod common;

use common::load::try_send;
use common::ports::free_port;
use common::process::{meterd_command, spawn, wait_healthy};
use common::{away_from_day_boundary, Client};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WRITERS: usize = 4;

fn write_config(dir: &Path, name: &str, port: u16, data: &Path) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"buffered\"\nflush_interval = \"100ms\"\n\
         wal_segment_bytes = 4096\nmax_wal_bytes = 1073741824\n\
         [[meters]]\nname = \"tokens\"\naggregation = \"sum\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = \"unlimited\", window = \"month\" }}\n",
        data.display().to_string()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// One event of quantity 1: every WAL record holds exactly one.
fn event(writer: usize, n: u64) -> serde_json::Value {
    json!([{"id": format!("w{writer}-{n}"), "customer": format!("c{writer}"), "meter": "tokens", "quantity": 1}])
}

/// A sequential writer: `started` counts requests begun, `acked` those answered 202.
struct Writer {
    started: AtomicU64,
    acked: AtomicU64,
}

async fn write(c: Client, w: usize, me: Arc<Writer>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let n = me.started.fetch_add(1, Ordering::AcqRel);
        match try_send(&c, &event(w, n)).await {
            Some(202) => me.acked.store(n + 1, Ordering::Release),
            _ => return,
        }
    }
}

async fn used(c: &Client, customer: &str) -> u64 {
    let r = c.get(&format!("/v1/customers/{customer}/usage")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["meters"][0]["used"].as_u64().unwrap_or(0)
}

/// `/v1/usage` over a few days: the store plus what is not flushed yet.
async fn stored_total(c: &Client) -> u64 {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let to = (now + chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let r = c.get(&format!("/v1/usage?meter=tokens&from={from}&to={to}&granularity=day")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["data"].as_array().map(|d| d.iter().filter_map(|p| p["value"].as_u64()).sum()).unwrap_or(0)
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> u64 {
    let rest = text.split(label).nth(1).unwrap_or_else(|| panic!("no {label:?} in {text:?}"));
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {rest:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_of_a_running_instance_restores_exactly_the_batches_up_to_the_backup_point() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = write_config(dir.path(), "a.toml", port, &dir.path().join("data-a"));
    let mut p = spawn(&config, dir.path().join("a.log"));
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: None };

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<Arc<Writer>> =
        (0..WRITERS).map(|_| Arc::new(Writer { started: AtomicU64::new(0), acked: AtomicU64::new(0) })).collect();
    let tasks: Vec<_> = writers.iter().enumerate().map(|(w, me)| tokio::spawn(write(c.clone(), w, me.clone(), stop.clone()))).collect();
    // Long enough for flushes (100ms) and rotated segments (4 KiB) before the backup.
    tokio::time::sleep(Duration::from_millis(800)).await;

    let acked_before: Vec<u64> = writers.iter().map(|w| w.acked.load(Ordering::Acquire)).collect();
    let backup_dir = dir.path().join("backup");
    let out = {
        let mut cmd = meterd_command(&config);
        cmd.arg("backup").arg("--to").arg(&backup_dir);
        tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run meterd backup")
    };
    let started_after: Vec<u64> = writers.iter().map(|w| w.started.load(Ordering::Acquire)).collect();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "backup failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let store_upto = number_after(&stdout, "store up to WAL record");
    let wal_upto = number_after(&stdout, "WAL up to record");
    assert!(store_upto > 0, "the store had flushes before the backup: {stdout}");
    assert!(wal_upto >= store_upto, "{stdout}");
    // The portal-token key comes along, still readable by its owner only.
    let secret = std::fs::metadata(backup_dir.join("portal_secret")).expect("portal_secret in the backup");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&secret.permissions()) & 0o777, 0o600);
    assert_eq!(
        std::fs::read(backup_dir.join("portal_secret")).ok(),
        std::fs::read(dir.path().join("data-a/portal_secret")).ok(),
        "the same key"
    );

    // More ingest after the backup, then the original dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
    stop.store(true, Ordering::Release);
    for t in tasks {
        t.await.expect("writer");
    }
    let acked_total: u64 = writers.iter().map(|w| w.acked.load(Ordering::Acquire)).sum();
    assert!(acked_total > started_after.iter().sum::<u64>(), "ingest went on after the backup");

    // Restore on "another machine": a new data dir and port.
    let port_b = free_port();
    let addr_b: SocketAddr = ([127, 0, 0, 1], port_b).into();
    let config_b = write_config(dir.path(), "b.toml", port_b, &dir.path().join("data-b"));
    let out = meterd_command(&config_b).arg("restore").arg("--from").arg(&backup_dir).output().expect("run meterd restore");
    assert!(out.status.success(), "restore failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut b = spawn(&config_b, dir.path().join("b.log"));
    wait_healthy(&mut b, addr_b).await;
    let cb = Client { addr: addr_b, token: None };

    let mut restored = 0;
    let mut per_writer = Vec::new();
    for w in 0..WRITERS {
        let n = used(&cb, &format!("c{w}")).await;
        per_writer.push(n);
        assert!(
            n >= acked_before[w] && n <= started_after[w],
            "c{w}: restored {n}; acknowledged before the backup {}, begun by its end {}",
            acked_before[w],
            started_after[w]
        );
        restored += n;
    }
    // One event of 1 per WAL record, records numbered from 1: the backup point
    // is exactly the restored total (nothing lost below it, nothing twice).
    assert_eq!(restored, wal_upto, "window counters against the backup point");
    assert_eq!(stored_total(&cb).await, wal_upto, "usage history against the backup point");

    // Dedupe came along: a batch in the backup is a duplicate; one sent after
    // the backup point is new here (its id was forgotten with its record).
    for (w, started) in started_after.iter().enumerate() {
        let r = cb.events(&event(w, 0)).await;
        assert_eq!((r.status.as_u16(), r.body["accepted"].clone()), (202, json!(0)), "c{w}: the first event again: {}", r.text);
        let later = started + 1;
        let r = cb.events(&event(w, later)).await;
        assert_eq!((r.status.as_u16(), r.body["accepted"].clone()), (202, json!(1)), "c{w}: an event after the backup: {}", r.text);
    }
    // The restored instance flushes, its WAL segments go, it restarts: the
    // totals stay and the backed-up ids still dedupe (from the id files now).
    b.sigterm();
    let status = b.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "restored meterd exit {status}; log:\n{}", b.log());
    let mut b = spawn(&config_b, dir.path().join("b2.log"));
    wait_healthy(&mut b, addr_b).await;
    let mut again = 0;
    for (w, n) in per_writer.iter().enumerate() {
        let now = used(&cb, &format!("c{w}")).await;
        assert_eq!(now, n + 1, "c{w}: the restored total plus the one event sent after the restore");
        again += now;
        if *n > 0 {
            let r = cb.events(&event(w, n - 1)).await;
            assert_eq!((r.status.as_u16(), r.body["accepted"].clone()), (202, json!(0)), "c{w}: the last backed-up event: {}", r.text);
        }
    }
    assert_eq!(again, wal_upto + WRITERS as u64);
    b.sigterm();
    let status = b.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "restarted meterd exit {status}; log:\n{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refuses_a_non_empty_target_and_restore_a_non_empty_data_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "a.toml", free_port(), &dir.path().join("data"));
    let target = dir.path().join("full");
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::write(target.join("x"), "x").expect("write");
    let out = meterd_command(&config).arg("backup").arg("--to").arg(&target).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&out.stderr));
    // A backup of a never-started data dir is valid (and empty).
    let empty = dir.path().join("empty-backup");
    let out = meterd_command(&config).arg("backup").arg("--to").arg(&empty).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(empty.join("backup.json").exists());
    // Restoring over data refuses.
    let config_full = write_config(dir.path(), "b.toml", free_port(), &target);
    let out = meterd_command(&config_full).arg("restore").arg("--from").arg(&empty).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&out.stderr));
}
