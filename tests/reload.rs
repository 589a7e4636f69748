//! Config reload without a restart, through the real binary: `meterd reload`
//! (SIGHUP to the pid in data_dir) rotates an API key under load with no failed
//! request; plans change and meters are added under load; an invalid config
//! and a change that needs a restart (an existing meter changed or removed
//! among them) are refused and the running config keeps serving.

mod common;

use common::ports::free_port;
use common::process::{meterd_command, spawn, wait_healthy};
use common::Client;
use serde_json::json;
use sha2::Digest;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OLD: &str = "key-old-3b1c0ffee";
const NEW: &str = "key-new-9a7d0beef";

fn key_block(name: &str, key: &str) -> String {
    format!(
        "\n[[auth.keys]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\nscopes = [\"ingest\", \"check\", \"read\"]\n",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

fn config_text(port: u16, data: &Path, durability: &str, keys: &[(&str, &str)]) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"{durability}\"\nflush_interval = \"200ms\"\n\
         [[meters]]\nname = \"tokens\"\naggregation = \"sum\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = \"unlimited\", window = \"month\" }}\n",
        data.display().to_string()
    );
    for (name, key) in keys {
        text.push_str(&key_block(name, key));
    }
    text
}

/// Runs `meterd reload` for `config`: (exit code, stdout + stderr).
async fn reload(config: &Path) -> (Option<i32>, String) {
    let mut cmd = meterd_command(config);
    cmd.arg("reload");
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run meterd reload");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

async fn status_with(addr: SocketAddr, key: &str, body: &serde_json::Value) -> u16 {
    let c = Client { addr, token: Some(key.to_string()) };
    c.events(body).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_under_load_fails_no_request_and_bad_reloads_keep_the_old_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data = dir.path().join("data");
    let config = dir.path().join("meterd.toml");
    std::fs::write(&config, config_text(port, &data, "fsync", &[("old", OLD)])).expect("config");
    let mut p = spawn(&config, dir.path().join("meterd.log"));
    wait_healthy(&mut p, addr).await;

    // Clients under load, all with the key `current` names at each request.
    let current = Arc::new(Mutex::new(OLD.to_string()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, sent_with_new) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|w| {
            let (current, stop, ok, failed, sent_with_new, failures) =
                (current.clone(), stop.clone(), ok.clone(), failed.clone(), sent_with_new.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let key = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let body = json!([{"id": format!("w{w}-{n}"), "customer": format!("c{w}"), "meter": "tokens", "quantity": 1}]);
                    n += 1;
                    let status = status_with(addr, &key, &body).await;
                    if key == NEW {
                        sent_with_new.fetch_add(1, Ordering::Relaxed);
                    }
                    if status == 202 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{key}: {status}"));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. Add the new key next to the old one.
    std::fs::write(&config, config_text(port, &data, "fsync", &[("old", OLD), ("new", NEW)])).expect("config");
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("config reloaded") && out.contains("2 keys"), "{out}");
    // 2. Clients switch (as a deploy would, one by one: here all at once).
    tokio::time::sleep(Duration::from_millis(200)).await;
    *current.lock().unwrap_or_else(|p| p.into_inner()) = NEW.to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 3. Remove the old key.
    std::fs::write(&config, config_text(port, &data, "fsync", &[("new", NEW)])).expect("config");
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 keys"), "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    for c in clients {
        c.await.expect("client");
    }
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(failed.load(Ordering::Acquire), 0, "requests failed during the rotation: {failures:?}");
    assert!(sent_with_new.load(Ordering::Acquire) > 0 && ok.load(Ordering::Acquire) > 100, "the load ran across the rotation");
    let probe = json!([{"id": "probe-1", "customer": "probe", "meter": "tokens", "quantity": 1}]);
    assert_eq!(status_with(addr, OLD, &probe).await, 401, "the old key is gone");
    assert_eq!(status_with(addr, NEW, &probe).await, 202);

    // An invalid config (a plan limit on a meter that does not exist).
    // `meterd reload` checks it first and does not signal (exit 2, like check-config)...
    let bad = config_text(port, &data, "fsync", &[("old", OLD)]).replace("tokens = {", "tokenz = {");
    std::fs::write(&config, bad).expect("config");
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("tokenz"), "names the problem: {out}");
    // ...and a bare SIGHUP is refused by meterd itself, with a log line naming it.
    let pid = p.child.id().to_string();
    assert!(std::process::Command::new("kill").arg("-HUP").arg(&pid).status().expect("kill").success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p.log().contains("config reload refused") {
        assert!(std::time::Instant::now() < deadline, "no log line for the SIGHUP; log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refusal = p.log().lines().find(|l| l.contains("config reload refused")).unwrap_or_default().to_string();
    assert!(refusal.contains("tokenz"), "the log line names the problem: {refusal}");
    assert_eq!(status_with(addr, OLD, &probe).await, 401, "the invalid config's key was not taken");
    let probe2 = json!([{"id": "probe-2", "customer": "probe", "meter": "tokens", "quantity": 1}]);
    assert_eq!(status_with(addr, NEW, &probe2).await, 202, "the running config keeps serving");

    // A change that needs a restart (durability), with a key change beside it:
    // refused whole, naming the setting; the key change is not taken either.
    std::fs::write(&config, config_text(port, &data, "buffered", &[("old", OLD), ("new", NEW)])).expect("config");
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("storage.durability") && out.contains("without a restart"), "{out}");
    assert_eq!(status_with(addr, OLD, &probe).await, 401, "nothing of a refused config is applied");
    let probe3 = json!([{"id": "probe-3", "customer": "probe", "meter": "tokens", "quantity": 1}]);
    assert_eq!(status_with(addr, NEW, &probe3).await, 202);
    assert!(p.log().contains("config reloaded"), "{}", p.log());
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit {status}; log:\n{}", p.log());
    assert!(!data.join("meterd.pid").exists(), "the pid file goes with a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_running_meterd_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("meterd.toml");
    std::fs::write(&config, config_text(free_port(), &dir.path().join("data"), "fsync", &[])).expect("config");
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("meterd.pid"), "{out}");
}

// Live plans (issue 23).
const ADMIN: &str = "key-admin-5e11f00d";

/// A config with `plans` (TOML `[[plans]]` blocks) over the `tokens` meter.
fn plans_config(port: u16, data: &Path, plans: &str) -> String {
    let sha = hex::encode(sha2::Sha256::digest(ADMIN.as_bytes()));
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\nflush_interval = \"200ms\"\n\
         [[meters]]\nname = \"tokens\"\naggregation = \"sum\"\n{plans}\n\
         [[auth.keys]]\nname = \"admin\"\nkey_sha256 = \"{sha}\"\nscopes = [\"ingest\", \"check\", \"read\", \"admin\"]\n",
        data.display().to_string()
    )
}

/// Plan `p` (default unless `default_big`) with a month and a day limit, and
/// optionally plan `big`.
fn plans(day_limit: u32, with_big: bool, default_big: bool) -> String {
    let mut text = format!(
        "[[plans]]\nname = \"p\"\ndefault = {}\n[plans.limits]\ntokens = [{{ limit = 1000, window = \"month\" }}, {{ limit = {day_limit}, window = \"day\" }}]\n",
        !default_big
    );
    if with_big {
        text.push_str(&format!(
            "[[plans]]\nname = \"big\"\ndefault = {default_big}\n[plans.limits]\ntokens = {{ limit = 5000, window = \"month\" }}\n"
        ));
    }
    text
}

/// The top-level `limit` a check of one token answers for `customer`.
async fn limit_of(c: &Client, customer: &str) -> Result<i64, String> {
    let r = c.check(&json!({"customer": customer, "meter": "tokens", "quantity": 1})).await;
    if r.status != 200 {
        return Err(format!("{}: {}", r.status, r.text));
    }
    r.body["limit"].as_i64().ok_or_else(|| format!("no limit: {}", r.text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_change_live_under_load_and_bad_plan_changes_keep_the_old_plans() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data = dir.path().join("data");
    let config = dir.path().join("meterd.toml");
    let write = |plans_text: &str| std::fs::write(&config, plans_config(port, &data, plans_text)).expect("config");
    write(&plans(500, false, false));
    let mut p = spawn(&config, dir.path().join("meterd.log"));
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: Some(ADMIN.to_string()) };

    // The same config again (a multi-limit plan): applied, nothing refused.
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "an unchanged config reloads: {out}");

    // Checks under load, each client recording the limits it is answered.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Vec<i64>>>> = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|w| {
            let (stop, seen, failures, c) = (stop.clone(), seen.clone(), failures.clone(), c.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    match limit_of(&c, &format!("c{w}")).await {
                        Ok(l) => seen.lock().unwrap_or_else(|p| p.into_inner())[w].push(l),
                        Err(e) => failures.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A plan's limit changes: the next check after the reload sees it.
    write(&plans(50, false, false));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("plans"), "the plans part took it: {out}");
    assert_eq!(limit_of(&c, "c0").await, Ok(50));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    for t in clients {
        t.await.expect("client");
    }
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(failures.is_empty(), "checks failed during the reload: {failures:?}");
    for (w, limits) in seen.lock().unwrap_or_else(|p| p.into_inner()).iter().enumerate() {
        // Each client saw the old limit, then the new one, never back.
        let first_new = limits.iter().position(|&l| l == 50).unwrap_or_else(|| panic!("client {w} never saw the new limit"));
        assert!(first_new > 0, "client {w} ran before the reload too");
        assert!(limits[..first_new].iter().all(|&l| l == 500), "client {w}: {limits:?}");
        assert!(limits[first_new..].iter().all(|&l| l == 50), "client {w} went back to the old plan: {limits:?}");
    }

    // A plan added: unknown before the reload, a customer moves onto it after.
    assert_eq!(common::put(&c, "vip", json!({"plan": "big"})).await.status, 400, "no plan big yet");
    write(&plans(50, true, false));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "{out}");
    let r = common::put(&c, "vip", json!({"plan": "big"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(limit_of(&c, "vip").await, Ok(5000));
    assert_eq!(limit_of(&c, "newbie").await, Ok(50), "the default plan is still p");

    // The default plan changes: customers without entitlements move with it.
    write(&plans(50, true, true));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(limit_of(&c, "newbie").await, Ok(5000));
    write(&plans(50, true, false));
    assert_eq!(reload(&config).await.0, Some(0));
    assert_eq!(limit_of(&c, "newbie").await, Ok(50));

    // An invalid plan: `meterd reload` names it and signals nothing.
    write(&plans(50, true, false).replace("limit = 5000", "limit = \"lots\""));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("plans") && out.contains("limit"), "names the field: {out}");
    // A plan on a window no plan counted at start: refused by meterd, named.
    write(&plans(50, true, false).replace("limit = 5000, window = \"month\"", "limit = 7, window = \"hour\""));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("plans.big.limits.tokens") && out.contains("hour") && out.contains("restart"), "{out}");
    let refusal = p.log().lines().rev().find(|l| l.contains("config reload refused")).unwrap_or_default().to_string();
    assert!(refusal.contains("hour window"), "the log line says why: {refusal}");
    // Removing a plan a stored customer is on: refused, the customer named by count.
    write(&plans(50, false, false));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("\"big\"") && out.contains("1 stored customer"), "{out}");
    // The old plans keep serving.
    assert_eq!(limit_of(&c, "vip").await, Ok(5000));
    assert_eq!(limit_of(&c, "c1").await, Ok(50));

    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit {status}; log:\n{}", p.log());
}

// Meters added live (issue 23).

/// Meter `tokens` (unlimited), and with `calls` (listed first, so its position
/// differs from the id it gets live) limited to 7 a day, at `aggregation`;
/// flushed to the store every `flush`.
fn meters_config(port: u16, data: &Path, calls: Option<&str>, flush: &str) -> String {
    let sha = hex::encode(sha2::Sha256::digest(ADMIN.as_bytes()));
    let (meter, limit) = match calls {
        Some(aggregation) => {
            (format!("[[meters]]\nname = \"calls\"\naggregation = \"{aggregation}\"\n"), "calls = { limit = 7, window = \"day\" }\n")
        }
        None => (String::new(), ""),
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\nflush_interval = \"{flush}\"\n\
         {meter}[[meters]]\nname = \"tokens\"\naggregation = \"sum\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = \"unlimited\", window = \"month\" }}\n{limit}\
         [[auth.keys]]\nname = \"admin\"\nkey_sha256 = \"{sha}\"\nscopes = [\"ingest\", \"check\", \"read\", \"admin\"]\n",
        data.display().to_string()
    )
}

/// Every customer's total of `meter` over the two days around now, from `/v1/usage`.
async fn usage_totals(c: &Client, meter: &str) -> std::collections::BTreeMap<String, i64> {
    let now = common::now_ms();
    let (from, to) = (now - 86_400_000, now + 86_400_000);
    let r = c.get(&format!("/v1/usage?meter={meter}&from={from}&to={to}&granularity=day")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut totals = std::collections::BTreeMap::new();
    for row in r.body["data"].as_array().cloned().unwrap_or_default() {
        let customer = row["customer"].as_str().unwrap_or_default().to_string();
        *totals.entry(customer).or_insert(0) += row["value"].as_i64().unwrap_or_else(|| panic!("a value: {row}"));
    }
    totals
}

async fn consume(c: &Client, customer: &str, id: &str) -> serde_json::Value {
    let r = c.check(&json!({"customer": customer, "meter": "calls", "quantity": 1, "consume": true, "id": id})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_added_under_load_counts_enforces_and_survives_a_sigkill_and_changing_one_is_refused() {
    common::away_from_day_boundary().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data = dir.path().join("data");
    let config = dir.path().join("meterd.toml");
    // No flush before the SIGKILL below: the new meter's usage comes back from the WAL alone.
    let write = |calls: Option<&str>| std::fs::write(&config, meters_config(port, &data, calls, "1h")).expect("config");
    write(None);
    let mut p = spawn(&config, dir.path().join("meterd.log"));
    wait_healthy(&mut p, addr).await;
    let c = Client { addr, token: Some(ADMIN.to_string()) };
    let r = c.events(&json!([common::event("cx", "calls", 1)])).await;
    assert_eq!(r.status, 400, "no meter calls yet: {}", r.text);

    // Events flow to the existing meter across the reload; every one must be accepted.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
    let clients: Vec<_> = (0..4)
        .map(|w| {
            let (stop, ok, failures, c) = (stop.clone(), ok.clone(), failures.clone(), c.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let body = json!([{"id": format!("t{w}-{n}"), "customer": format!("c{w}"), "meter": "tokens", "quantity": 1}]);
                    n += 1;
                    let r = c.events(&body).await;
                    if r.status == 202 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{}: {}", r.status, r.text));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(Some("sum"));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(p.log().contains("meters added"), "{}", p.log());

    // The new meter takes events and decides against its plan limit (7 a day).
    let r = c.events(&json!([common::event("cx", "calls", 2), common::event("cx", "calls", 3)])).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(consume(&c, "cx", "cx-1").await["allowed"], true);
    assert_eq!(consume(&c, "cx", "cx-2").await["used"], 7);
    let denied = consume(&c, "cx", "cx-3").await;
    assert_eq!((denied["allowed"].as_bool(), denied["reason"].as_str()), (Some(false), Some("limit_exceeded")), "{denied}");
    // Racing consumes on a fresh customer: exactly the limit is allowed.
    let racers: Vec<_> = (0..20)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { consume(&c, "cy", &format!("cy-{i}")).await["allowed"] == true })
        })
        .collect();
    let mut allowed = 0;
    for r in racers {
        allowed += usize::from(r.await.expect("racer"));
    }
    assert_eq!(allowed, 7, "a hard limit of 7 under 20 racing consumes");
    let metrics = c.get("/metrics").await.text;
    assert!(metrics.lines().any(|l| l.starts_with("meterd_events_total{") && l.contains("meter=\"calls\"")), "{metrics}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    for t in clients {
        t.await.expect("client");
    }
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(failures.is_empty(), "events on the existing meter failed across the reload: {failures:?}");
    let accepted = i64::try_from(ok.load(Ordering::Acquire)).unwrap_or(i64::MAX);
    assert!(accepted > 50, "the load ran: {accepted}");
    let tokens = |totals: &std::collections::BTreeMap<String, i64>| totals.values().sum::<i64>();
    assert_eq!(tokens(&usage_totals(&c, "tokens").await), accepted, "no tokens event lost");
    let calls: std::collections::BTreeMap<String, i64> = [("cx".to_string(), 7), ("cy".to_string(), 7)].into();
    assert_eq!(usage_totals(&c, "calls").await, calls);

    // Changing the new meter's aggregation, or removing it: refused, named, the old config serves.
    write(Some("max"));
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("meters.calls.aggregation (sum → max)"), "{out}");
    let refusal = p.log().lines().rev().find(|l| l.contains("config reload refused")).unwrap_or_default().to_string();
    assert!(refusal.contains("meters.calls.aggregation"), "the log line names the meter: {refusal}");
    write(None);
    let (code, out) = reload(&config).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("meters.calls: removed") && out.contains("orphaned"), "{out}");
    assert_eq!(consume(&c, "cx", "cx-4").await["reason"], "limit_exceeded", "the sum meter and its limit keep serving");

    // SIGKILL, then a restart with the config that added the meter: its totals,
    // in the WAL only (nothing was flushed), are exact; then they reach the store.
    let stored = |customer: &str| -> i64 {
        let conn = rusqlite::Connection::open(data.join("meterd.sqlite")).expect("open the store");
        conn.query_row("SELECT COALESCE(sum(value), 0) FROM usage_minute WHERE customer = ?1 AND meter = 'calls'", [customer], |r| r.get(0))
            .expect("sum(value)")
    };
    assert_eq!(stored("cx") + stored("cy"), 0, "flushed before the kill: the restart would not prove the WAL");
    std::fs::write(&config, meters_config(port, &data, Some("sum"), "100ms")).expect("config");
    p.child.kill().expect("SIGKILL");
    let _ = p.wait_exit(Duration::from_secs(10)).await;
    let mut p = spawn(&config, dir.path().join("meterd-2.log"));
    wait_healthy(&mut p, addr).await;
    assert_eq!(usage_totals(&c, "calls").await, calls, "the new meter's totals after the restart");
    assert_eq!(tokens(&usage_totals(&c, "tokens").await), accepted);
    let after = consume(&c, "cy", "cy-after").await;
    assert_eq!((after["allowed"].as_bool(), after["used"].as_i64()), (Some(false), Some(7)), "{after}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (stored("cx"), stored("cy")) != (7, 7) {
        assert!(std::time::Instant::now() < deadline, "not flushed: {} {}", stored("cx"), stored("cy"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit {status}; log:\n{}", p.log());
}
