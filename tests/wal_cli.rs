//! WAL damage, end to end with the real binary: a flipped bit in the middle of
//! the log stops the start with a clear error; `meterd wal verify` reports the
//! damaged segment; `meterd wal repair` keeps every intact record and says what
//! it dropped; the next start counts exactly the surviving batches.

mod common;

use common::ports::free_port;
use common::process::{meterd_command, spawn, wait_healthy};
use common::{away_from_day_boundary, Client};
use serde_json::json;
use std::net::SocketAddr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_is_detected_verified_and_repaired() {
    away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data = dir.path().join("data");
    let config = dir.path().join("meterd.toml");
    // No flush for an hour: every batch stays in the WAL only.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\nflush_interval = \"1h\"\n\
         [[meters]]\nname = \"tokens\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = 1000000, window = \"month\" }}\n",
        data.display().to_string()
    );
    std::fs::write(&config, text).expect("config");
    let c = Client { addr, token: None };
    let mut p = spawn(&config, dir.path().join("run1.log"));
    wait_healthy(&mut p, addr).await;
    // Five batches, five records; batch i carries 10^i so each is identifiable.
    for i in 0..5u32 {
        let r = c.events(&json!({"id": format!("b{i}"), "customer": "c", "meter": "tokens", "quantity": 10u64.pow(i)})).await;
        assert_eq!(r.status, 202, "{}", r.text);
    }
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();

    // Flip a bit inside the third record's payload.
    let segments = meterd::wal::segment::list(&data.join("wal")).expect("segments");
    assert_eq!(segments.len(), 1);
    let path = &segments[0].1;
    let mut bytes = std::fs::read(path).expect("read segment");
    let scan = meterd::wal::segment::scan_bytes(&bytes, path, true).expect("scan");
    assert_eq!(scan.records.len(), 5);
    let third = scan.records[2].offset as usize + meterd::wal::record::HEADER_LEN + 5;
    bytes[third] ^= 0x20;
    std::fs::write(path, &bytes).expect("write segment");

    // The start refuses, naming the file and offset.
    let out = meterd_command(&config).output().expect("run meterd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt at byte offset") && err.contains(".wal"), "{err}");

    let verify = meterd_command(&config).args(["wal", "verify"]).output().expect("verify");
    let report = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(1), "{report}");
    assert!(report.contains("DAMAGED") && report.contains("4 intact records"), "{report}");

    let repair = meterd_command(&config).args(["wal", "repair"]).output().expect("repair");
    let report = String::from_utf8_lossy(&repair.stdout);
    assert_eq!(repair.status.code(), Some(0), "{report}");
    assert!(report.contains("LOST records with sequence 3..=3"), "{report}");

    let verify = meterd_command(&config).args(["wal", "verify"]).output().expect("verify");
    assert_eq!(verify.status.code(), Some(0), "{}", String::from_utf8_lossy(&verify.stdout));

    // Every batch but the third: 1 + 10 + 1000 + 10000.
    let mut p = spawn(&config, dir.path().join("run2.log"));
    wait_healthy(&mut p, addr).await;
    let r = c.get("/v1/customers/c/usage").await;
    assert_eq!(r.body["meters"][0]["used"], json!(11_011), "{}", r.text);
    // The lost batch can be sent again and counts; the others are duplicates.
    let r = c.events(&json!([{"id": "b2", "customer": "c", "meter": "tokens", "quantity": 100}, {"id": "b4", "customer": "c", "meter": "tokens", "quantity": 10000}])).await;
    assert_eq!(r.body, json!({"accepted": 1, "duplicates": 1}));
    p.sigterm();
    assert!(p.wait_exit(std::time::Duration::from_secs(20)).await.success());
}
