//! A threshold crossed by an acknowledged event or an allowed consume is
//! notified even when meterd is SIGKILLed right after answering: the real
//! binary is killed, restarted, and delivers with the same `webhook-id`.

mod common;
mod notifications_support;

use chrono::{Datelike, TimeZone, Utc};
use common::ports::free_port;
use common::process::{spawn, wait_healthy};
use common::{away_from_day_boundary, Client};
use meterd::model::WindowKind;
use meterd::notify::detect::{notification_id, window_key};
use notifications_support::{notifications, Receiver};
use serde_json::json;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crossing_survives_sigkill_right_after_the_answer() {
    away_from_day_boundary().await;
    let rx = Receiver::start().await;
    rx.set_down(true);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let path = dir.path().join("meterd.toml");
    // No flush for an hour: the usage lives only in the WAL when killed.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"1h\"\n{}\
         [[meters]]\nname = \"minutes\"\n[[meters]]\nname = \"runs\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nminutes = {{ limit = 100, window = \"month\" }}\nruns = {{ limit = 10, window = \"month\" }}\n",
        dir.path().join("data").display().to_string(),
        notifications(&rx.url(), "METERD_TEST_WH_CRASH", "")
    );
    std::fs::write(&path, text).expect("config");
    let c = Client { addr, token: None };
    let mut p = spawn(&path, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    let r = c.events(&json!([{"id": "e1", "customer": "u", "meter": "minutes", "quantity": 95}])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = c.check(&json!({"customer": "u", "meter": "runs", "quantity": 8, "consume": true, "id": "c1"})).await;
    assert_eq!(r.body["allowed"], json!(true), "{}", r.text);
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();

    let now = Utc::now();
    let month = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).unwrap().timestamp_millis();
    let expected: HashSet<String> = [
        notification_id(&window_key("u", "minutes", WindowKind::Month, month, 100), 90),
        notification_id(&window_key("u", "runs", WindowKind::Month, month, 10), 75),
    ]
    .into_iter()
    .collect();

    rx.set_down(false);
    let mut p = spawn(&path, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    let got = rx.wait_for(Duration::from_secs(20), |d| d.len() >= 2).await;
    let delivered: HashSet<String> = got.iter().map(|d| d.id.clone()).collect();
    assert_eq!(delivered, expected, "both crossings delivered after the restart, with their ids; log:\n{}", p.log());
    let every: HashSet<String> = rx.all().iter().map(|d| d.id.clone()).collect();
    assert_eq!(every, expected, "no other webhook-id was ever sent (attempts before the kill included)");
    assert!(rx.bad_signatures().is_empty());
    // Nothing is decided twice after the restart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rx.delivered().len(), 2, "{:?}", rx.delivered());
    p.child.kill().expect("SIGKILL");
}
