//! The usage seam: an observer registered at start sees every kind of change
//! of usage — ingested events, consumes (compare-and-swap and serialized),
//! replay of the WAL after a restart, the rebuild from the store — with the
//! exact totals of each window and where the change came from.

mod common;

use meterd::engine::Engine;
use meterd::ingest::BodyKind;
use meterd::limits::CheckRequest;
use meterd::model::WindowKind;
use meterd::usage::{Origin, UsageChange, UsageObserver};
use std::sync::{Arc, Mutex};

const PLANS: &str = r#"
[[meters]]
name = "calls"
aggregation = "sum"

[[meters]]
name = "jobs"
aggregation = "sum"

[[plans]]
name = "p"
default = true
[plans.limits]
calls = { limit = 1000, window = "month" }
jobs = [ { limit = 50, window = "day" }, { limit = 400, window = "month" } ]
"#;

/// One change as an observer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    customer: String,
    meter: u16,
    origin: Origin,
    raw: i64,
    /// (kind, local, total) of each window.
    windows: Vec<(WindowKind, i64, i64)>,
}

/// Records every change, by customer id (names are resolved when taken: the
/// observer runs during start, before the engine exists for anyone to ask).
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(u32, Seen)>>,
}

impl UsageObserver for Recorder {
    fn changed(&self, change: &UsageChange<'_>) {
        let mut windows: Vec<_> = change.windows.iter().map(|w| (w.key.kind, w.local, w.total)).collect();
        windows.sort_by_key(|w| w.0.index());
        let seen = Seen { customer: String::new(), meter: change.meter, origin: change.origin, raw: change.raw, windows };
        if let Ok(mut all) = self.seen.lock() {
            all.push((change.customer, seen));
        }
    }
}

impl Recorder {
    fn take(&self, engine: &Engine) -> Vec<Seen> {
        let all = std::mem::take(&mut *self.seen.lock().expect("recorder lock"));
        all.into_iter()
            .map(|(id, mut seen)| {
                seen.customer = engine.counters().interner.name(id).map(|n| n.to_string()).unwrap_or_else(|| format!("#{id}"));
                seen
            })
            .collect()
    }
}

async fn start(dir: &std::path::Path, recorder: &Arc<Recorder>) -> Arc<Engine> {
    common::engine::start(dir, PLANS, "seam", vec![recorder.clone()]).await
}

fn seen(customer: &str, meter: u16, origin: Origin, raw: i64, windows: &[(WindowKind, i64)]) -> Seen {
    Seen { customer: customer.into(), meter, origin, raw, windows: windows.iter().map(|&(k, v)| (k, v, v)).collect() }
}

fn consume(customer: &str, meter: &str, quantity: i64, id: &str) -> CheckRequest {
    CheckRequest {
        customer: customer.into(),
        meter: meter.into(),
        quantity_text: Some(quantity.to_string().into()),
        consume: true,
        id: Some(id.into()),
        value: None,
    }
}

#[tokio::test]
async fn an_observer_sees_ingest_consumes_replay_and_rebuild_with_exact_totals() {
    use WindowKind::{Day, Month};
    let dir = tempfile::tempdir().expect("tmp");
    let recorder = Arc::new(Recorder::default());
    let engine = start(dir.path(), &recorder).await;
    assert!(recorder.take(&engine).is_empty(), "an empty store and WAL change nothing");

    // Live: a batch of events (two customers, two meters).
    let body = r#"[{"id":"e1","customer":"ann","meter":"calls","quantity":3},
            {"id":"e2","customer":"ann","meter":"calls","quantity":4},
            {"id":"e3","customer":"bob","meter":"jobs","quantity":5},
            {"id":"e1","customer":"ann","meter":"calls","quantity":3}]"#;
    let outcome = engine.ingest(body.as_bytes(), BodyKind::Json).await.expect("ingest");
    assert_eq!((outcome.accepted, outcome.duplicates), (3, 1));
    assert_eq!(
        recorder.take(&engine),
        vec![
            // A batch's usages are told after the whole batch is folded.
            seen("ann", 0, Origin::Live, 3, &[(Month, 7)]),
            seen("ann", 0, Origin::Live, 4, &[(Month, 7)]),
            seen("bob", 1, Origin::Live, 5, &[(Day, 5), (Month, 5)]),
        ]
    );

    // Live: a consume on one hard limit (compare-and-swap), one on two limits
    // (serialized under the consume lock), a refused one (nothing), a retry of
    // the first id (nothing: the answer is remembered).
    assert!(engine.check(consume("ann", "calls", 10, "c1")).await.expect("consume").allowed);
    assert!(engine.check(consume("bob", "jobs", 20, "c2")).await.expect("consume").allowed);
    assert!(!engine.check(consume("bob", "jobs", 30, "c3")).await.expect("consume").allowed);
    assert!(engine.check(consume("ann", "calls", 10, "c1")).await.expect("consume").allowed);
    assert_eq!(
        recorder.take(&engine),
        vec![seen("ann", 0, Origin::Live, 10, &[(Month, 17)]), seen("bob", 1, Origin::Live, 20, &[(Day, 25), (Month, 25)])]
    );

    // Restart without a flush: everything comes back from the WAL, as replay.
    drop(engine);
    let engine = start(dir.path(), &recorder).await;
    let mut replayed = recorder.take(&engine);
    replayed.sort_by(|a, b| (&a.customer, a.meter, a.windows[0].1, a.raw).cmp(&(&b.customer, b.meter, b.windows[0].1, b.raw)));
    assert_eq!(
        replayed,
        vec![
            seen("ann", 0, Origin::Replay, 3, &[(Month, 7)]),
            seen("ann", 0, Origin::Replay, 4, &[(Month, 7)]),
            seen("ann", 0, Origin::Replay, 10, &[(Month, 17)]),
            seen("bob", 1, Origin::Replay, 5, &[(Day, 5), (Month, 5)]),
            seen("bob", 1, Origin::Replay, 20, &[(Day, 25), (Month, 25)]),
        ]
    );

    // Flush to the store, restart: the windows are rebuilt from the store.
    meterd::flush::flush_all(&engine).await.expect("flush");
    drop(engine);
    let engine = start(dir.path(), &recorder).await;
    let mut rebuilt = recorder.take(&engine);
    rebuilt.sort_by(|a, b| (&a.customer, a.meter, a.windows[0].0.index()).cmp(&(&b.customer, b.meter, b.windows[0].0.index())));
    assert_eq!(
        rebuilt,
        vec![
            seen("ann", 0, Origin::Rebuild, 0, &[(Month, 17)]),
            seen("bob", 1, Origin::Rebuild, 0, &[(Day, 25)]),
            seen("bob", 1, Origin::Rebuild, 0, &[(Month, 25)]),
        ]
    );
    // And the engine agrees with what the observer saw.
    let (states, _) = engine.evaluate("bob", engine.catalog().meter_by_name("jobs").expect("jobs"), 0, meterd::clock::now_ms());
    assert_eq!(states.iter().map(|s| s.used).collect::<Vec<_>>(), vec![25, 25]);
}
