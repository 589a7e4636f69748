//! The deduper against a model (a plain map of id → acceptance time) under
//! random ids, ages, spills to disk, refused batches and restarts; a full disk.

use super::*;
use crate::wal::ids::{self, IdLog};
use proptest::prelude::*;
use std::collections::HashMap;

const MIN: i64 = 60_000;
const WINDOW: i64 = 5 * MIN;
const T0: i64 = 1_000_000 * MIN;

fn config(dir: &Path) -> SpillConfig {
    SpillConfig { dir: dir.join("dedupe"), ids_dir: Some(dir.join("ids")), memory_bytes: 1 << 20, lag_minutes: 0, keep_existing: true }
}

/// Opens a deduper as the engine does at start: runs, then the id files left.
fn open(dir: &Path, now: i64) -> Deduper {
    open_counted(dir, now).0
}

/// [`open`], with what became of the id files' ids.
fn open_counted(dir: &Path, now: i64) -> (Deduper, Restored) {
    let d = Deduper::open(WINDOW, config(dir), now).unwrap_or_else(|e| panic!("open: {e}"));
    // In chunks, as the engine does (7: chunk edges fall anywhere).
    let mut chunk = Vec::new();
    let mut counts = Restored::default();
    ids::load(&dir.join("ids"), now, WINDOW, |id, at, seq| {
        chunk.push((id, at, seq));
        if chunk.len() == 7 {
            counts += d.restore_batch(&chunk);
            chunk.clear();
        }
    })
    .unwrap_or_else(|e| panic!("load ids: {e}"));
    counts += d.restore_batch(&chunk);
    (d, counts)
}

#[derive(Debug, Clone)]
enum Op {
    /// Insert key; `Some(back)`: the event carries a timestamp, and an earlier
    /// copy was accepted no earlier than `back` minutes (0..5) before it.
    Insert(u16, Option<i64>),
    /// Insert, then the batch is refused (its WAL write failed).
    Refused(u16),
    Advance(i64),
    /// Spill ids accepted up to `lag` minutes ago.
    Spill(u32),
    Sweep,
    Restart,
    /// Housekeeping's gate upkeep (rebuilt when needed).
    Gate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0_u16..300, proptest::option::of(0_i64..5)).prop_map(|(k, b)| Op::Insert(k, b)),
        1 => (0_u16..300).prop_map(Op::Refused),
        3 => (0_i64..3).prop_map(Op::Advance),
        2 => (0_u32..3).prop_map(Op::Spill),
        1 => Just(Op::Sweep),
        1 => Just(Op::Restart),
        2 => Just(Op::Gate),
    ]
}

fn live(model: &HashMap<u128, i64>, id: u128, now: i64) -> bool {
    model.get(&id).is_some_and(|&at| at.div_euclid(MIN) + WINDOW / MIN >= now.div_euclid(MIN))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Exact whatever the ids' ages, spills and restarts: a live id is always a
    /// duplicate, anything else always new.
    #[test]
    fn matches_a_model_across_spills_and_restarts(ops in proptest::collection::vec(op(), 1..400)) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let mut now = T0;
        let mut d = open(dir, now);
        let mut log = IdLog::new(dir.join("ids"), WINDOW).unwrap_or_else(|e| panic!("id log: {e}"));
        let mut seq = 0;
        let mut model: HashMap<u128, i64> = HashMap::new();
        for op in ops {
            match op {
                Op::Insert(k, back) => {
                    let id = hash_id(&format!("id-{k}"));
                    let was_live = live(&model, id, now);
                    // A retry carries the original's timestamp: the original was
                    // accepted at or after `since`.
                    let since = match (back, model.get(&id)) {
                        (Some(b), Some(&at)) => at - b * MIN,
                        (Some(b), None) => now - b * MIN,
                        (None, _) => 0,
                    };
                    let fresh: Vec<bool> = d.admit_batch(&[id], &[since], now).unwrap_or_else(|e| panic!("admit: {e}"));
                    prop_assert_eq!(fresh.as_slice(), &[!was_live][..], "key {} at minute {}", k, (now - T0) / MIN);
                    if !was_live {
                        model.insert(id, now);
                        seq += 1;
                        log.append(&[id], now, seq).unwrap_or_else(|e| panic!("append: {e}"));
                    }
                }
                Op::Refused(k) => {
                    let id = hash_id(&format!("id-{k}"));
                    let was_live = live(&model, id, now);
                    prop_assert_eq!(d.insert_batch(&[id], now).to_vec(), vec![!was_live]);
                    if !was_live {
                        d.remove(id);
                    }
                }
                Op::Advance(m) => now += m * MIN,
                Op::Spill(lag) => {
                    log.sync().unwrap_or_else(|e| panic!("sync: {e}"));
                    // As the flusher does: every id written so far is synced first.
                    d.spill_upto_minute(table::minute_of(now).saturating_sub(lag), seq).unwrap_or_else(|e| panic!("spill: {e}"));
                }
                Op::Sweep => d.sweep(now),
                Op::Gate => {
                    if d.needs_gate() {
                        d.rebuild_gate().unwrap_or_else(|e| panic!("gate: {e}"));
                        prop_assert!(!d.needs_gate(), "a rebuilt gate covers every run");
                    }
                }
                Op::Restart => {
                    drop(d);
                    drop(log);
                    d = open(dir, now);
                    log = IdLog::new(dir.join("ids"), WINDOW).unwrap_or_else(|e| panic!("id log: {e}"));
                }
            }
        }
        // Every live id is still known, from RAM or disk, without a timestamp.
        for (&id, _) in model.iter().filter(|(&id, _)| live(&model, id, now)) {
            prop_assert!(!d.insert(id, now), "a live id was lost");
        }
    }
}

#[test]
fn spilled_ids_leave_ram_and_stay_exact() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = open(tmp.path(), T0);
    let ids: Vec<u128> = (0..20_000).map(|i| hash_id(&format!("s-{i}"))).collect();
    assert!(d.insert_batch(&ids, T0).iter().all(|&f| f));
    assert!(d.needs_spill(), "20k ids exceed 1MB / 64 B");
    let report = d.spill(T0 + MIN, 0).unwrap_or_else(|e| panic!("spill: {e}"));
    assert_eq!(report.ids, 20_000);
    assert_eq!(d.len(), 0);
    assert_eq!(d.spilled(), 20_000);
    assert!(d.insert_batch(&ids, T0 + MIN).iter().all(|&f| !f), "spilled ids are duplicates");
    // A refused batch after its ids were spilled: they may come again.
    d.remove(ids[0]);
    assert!(d.insert(ids[0], T0 + MIN));
    assert!(!d.insert(ids[0], T0 + MIN));
    // Past the window the run is dropped whole and its ids are new again.
    d.sweep(T0 + 10 * MIN);
    assert_eq!(d.spilled(), 0);
    assert!(d.insert(ids[1], T0 + 10 * MIN));
}

/// The names in the run directory, sorted.
fn run_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("dedupe"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn wait_for_no_run_files(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !run_files(dir).is_empty() {
        assert!(std::time::Instant::now() < deadline, "still there after 30 s: {:?}", run_files(dir));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The one run file in `dir`'s run directory.
fn the_run(dir: &Path) -> String {
    match &run_files(dir)[..] {
        [run] => run.clone(),
        other => panic!("one run: {other:?}"),
    }
}

/// A deduper in `dir` whose 20,000 ids (accepted at `T0`) were spilled to one run.
fn spilled_to_one_run(dir: &Path, prefix: &str) -> (Deduper, Vec<u128>, String) {
    let d = open(dir, T0);
    let ids: Vec<u128> = (0..20_000).map(|i| hash_id(&format!("{prefix}-{i}"))).collect();
    d.insert_batch(&ids, T0);
    d.spill_upto_minute(table::minute_of(T0), 0).expect("spill");
    (d, ids, the_run(dir))
}

#[test]
fn an_expired_run_leaves_the_disk_once_no_probe_holds_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (d, ids, run) = spilled_to_one_run(tmp.path(), "e");
    let len = std::fs::metadata(tmp.path().join("dedupe").join(run)).map(|m| m.len()).expect("run size");
    // A probe in flight holds the run set it read, as `admit_batch` does.
    let held = d.spill.as_ref().map(|s| s.runs.read().unwrap_or_else(|p| p.into_inner()).clone()).expect("spill");
    d.sweep(T0 + 10 * MIN);
    assert_eq!(d.spilled(), 0);
    let seq = held.runs[0].seq;
    assert_eq!(run_files(tmp.path()), [reclaim::name(seq)], "out of view at once");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let now = std::fs::metadata(tmp.path().join("dedupe").join(reclaim::name(seq))).map(|m| m.len()).ok();
    assert_eq!(now, Some(len), "not cut while a probe holds it");
    assert_eq!(held.runs[0].find(tag(ids[7])).ok().flatten(), Some(table::minute_of(T0)), "the probe still reads it whole");
    drop(held);
    wait_for_no_run_files(tmp.path());
}

#[test]
fn a_restart_deletes_expired_runs_unread_and_finishes_those_being_cut() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (d, ids, run) = spilled_to_one_run(tmp.path(), "r");
    drop(d);
    // A backup that copied the run while it was being cut holds it short,
    // under its own name; and a stop left another run halfway.
    let path = tmp.path().join("dedupe").join(run);
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("cut");
    std::fs::write(tmp.path().join("dedupe").join(reclaim::name(77)), vec![0u8; 1000]).expect("left");
    let d = open(tmp.path(), T0 + 10 * MIN);
    assert_eq!(d.spilled(), 0);
    wait_for_no_run_files(tmp.path());
    // The next run's number is past the one that was being cut.
    d.insert_batch(&ids[..100], T0 + 10 * MIN);
    d.spill_upto_minute(table::minute_of(T0 + 10 * MIN), 0).expect("spill");
    let run = the_run(tmp.path());
    let seq = run.trim_end_matches(".run").rsplit('-').next().and_then(|n| n.parse::<u64>().ok());
    assert!(seq.is_some_and(|n| n > 77), "{run}");
}

#[test]
fn a_failed_spill_keeps_the_ids_and_refuses_ingest() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = open(tmp.path(), T0);
    let ids: Vec<u128> = (0..20_000).map(|i| hash_id(&format!("f-{i}"))).collect();
    d.insert_batch(&ids, T0);
    // The run directory cannot be written: a file where it should be.
    let runs = tmp.path().join("dedupe");
    std::fs::remove_dir_all(&runs).expect("remove the run dir");
    std::fs::write(&runs, b"not a directory").expect("block the run dir");
    assert!(d.spill(T0 + MIN, 0).is_err());
    assert!(d.refusal().is_some(), "over budget with a failed spill: refuse");
    assert_eq!(d.len(), 20_000, "no id left RAM");
    assert!(d.insert_batch(&ids, T0 + MIN).iter().all(|&f| !f));
    std::fs::remove_file(&runs).expect("unblock");
    std::fs::create_dir(&runs).expect("recreate");
    assert!(d.spill(T0 + MIN, 0).is_ok());
    assert_eq!(d.refusal(), None);
    assert!(d.insert_batch(&ids, T0 + MIN).iter().all(|&f| !f));
}

#[test]
fn the_gate_covers_runs_as_they_come_and_go() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let d = open(dir, T0);
    let batch = |tag: &str, n: usize| -> Vec<u128> { (0..n).map(|i| hash_id(&format!("{tag}-{i}"))).collect() };
    let first = batch("a", 4_000);
    assert!(d.insert_batch(&first, T0).iter().all(|&f| f));
    assert!(!d.needs_gate(), "no runs, no gate");
    d.spill_upto_minute(table::minute_of(T0), 0).expect("spill");
    assert!(d.needs_gate(), "a run the gate does not cover");
    assert_eq!(d.rebuild_gate().expect("gate"), 4_000);
    assert!(!d.needs_gate());
    let gated = d.ram_bytes();
    // The next spill fits the gate's room (1.5× + 1024): covered at once.
    let second = batch("b", 1_500);
    assert!(d.insert_batch(&second, T0 + MIN).iter().all(|&f| f));
    d.spill_upto_minute(table::minute_of(T0 + MIN), 0).expect("spill");
    assert!(!d.needs_gate(), "extended in place");
    assert!(d.ram_bytes() > gated, "the gate counts in the RAM figure");
    // Every spilled id is a duplicate, every fresh one new, with the gate in front.
    assert!(d.insert_batch(&first, T0 + 2 * MIN).iter().all(|&f| !f));
    assert!(d.insert_batch(&second, T0 + 2 * MIN).iter().all(|&f| !f));
    assert!(d.insert_batch(&batch("c", 5_000), T0 + 2 * MIN).iter().all(|&f| f));
    // A third spill has no room: it stays ungated until the rebuild, and exact.
    d.spill_upto_minute(table::minute_of(T0 + 2 * MIN), 0).expect("spill");
    assert!(d.needs_gate());
    assert!(d.insert_batch(&batch("c", 5_000), T0 + 2 * MIN).iter().all(|&f| !f), "ungated run still searched");
    assert_eq!(d.rebuild_gate().expect("gate"), 10_500);
    // The first run leaves the window: the rest is exact and the stale ids
    // (4,000 of 10,500) do not yet call for a rebuild.
    d.sweep(T0 + 6 * MIN);
    assert_eq!(d.spilled(), 6_500);
    assert!(!d.needs_gate());
    assert!(d.insert_batch(&first, T0 + 6 * MIN).iter().all(|&f| f), "ids of a dropped run are new again");
    // A restart does not store the gate: rebuilt by housekeeping, exact before and after.
    drop(d);
    let d = open(dir, T0 + 6 * MIN);
    assert!(d.needs_gate());
    assert!(d.insert_batch(&second, T0 + 6 * MIN).iter().all(|&f| !f));
    assert_eq!(d.rebuild_gate().expect("gate"), 6_500);
    assert!(d.insert_batch(&batch("c", 5_000), T0 + 6 * MIN).iter().all(|&f| !f));
    assert!(d.insert_batch(&batch("d", 5_000), T0 + 6 * MIN).iter().all(|&f| f));
}

#[test]
fn no_gate_past_the_budget() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = config(tmp.path());
    c.memory_bytes = 16 << 10;
    let d = Deduper::open(WINDOW, c, T0).expect("open");
    let ids: Vec<u128> = (0..20_000).map(|i| hash_id(&format!("n-{i}"))).collect();
    d.insert_batch(&ids, T0);
    d.spill_upto_minute(table::minute_of(T0), 0).expect("spill");
    assert!(!d.needs_gate(), "a gate for 20k ids does not fit 3/4 of 16 KiB beside the run's filter");
    assert_eq!(d.rebuild_gate().expect("gate"), 0);
    assert!(d.insert_batch(&ids, T0).iter().all(|&f| !f));
}

#[test]
fn a_cancelled_gate_rebuild_builds_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = open(tmp.path(), T0);
    let ids: Vec<u128> = (0..3_000).map(|i| hash_id(&format!("x-{i}"))).collect();
    d.insert_batch(&ids, T0);
    d.spill_upto_minute(table::minute_of(T0), 0).expect("spill");
    d.cancel_gate();
    assert_eq!(d.rebuild_gate().expect("gate"), 0);
    assert!(d.needs_gate(), "still ungated");
    assert!(d.insert_batch(&ids, T0).iter().all(|&f| !f));
}

#[test]
fn filters_past_their_share_stay_on_disk_and_lookups_stay_exact() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = config(tmp.path());
    // Each run of 20k ids: a 25 KB filter and a 2.5 KB index; the filters'
    // share of 48 KiB (7/8 of it) holds one run's filter, not two.
    c.memory_bytes = 48 << 10;
    let d = Deduper::open(WINDOW, c.clone(), T0).expect("open");
    let batches: Vec<Vec<u128>> = (0..3).map(|b| (0..20_000).map(|i| hash_id(&format!("f-{b}-{i}"))).collect()).collect();
    for (b, ids) in batches.iter().enumerate() {
        let at = T0 + b as i64 * MIN;
        assert!(d.insert_batch(ids, at).iter().all(|&f| f));
        d.spill_upto_minute(table::minute_of(at), 0).expect("spill");
    }
    let filtered: Vec<bool> = d.runs().iter().map(|r| r.filtered()).collect();
    assert_eq!(filtered, [true, false, false]);
    assert!(d.run_ram_bytes() as u64 <= filter_share(48 << 10));
    assert_eq!(d.refusal(), None, "the indexes fit: ingest goes on");
    let strangers: Vec<u128> = (0..5_000).map(|i| hash_id(&format!("s-{i}"))).collect();
    let now = T0 + 3 * MIN;
    for ids in &batches {
        assert!(d.insert_batch(ids, now).iter().all(|&f| !f), "every spilled id is still a duplicate");
    }
    assert!(d.insert_batch(&strangers, now).iter().all(|&f| f), "every new id is accepted");
    drop(d);
    // At a restart the newest run keeps its filter.
    let d = Deduper::open(WINDOW, c, now).expect("reopen");
    let filtered: Vec<bool> = d.runs().iter().map(|r| r.filtered()).collect();
    assert_eq!(filtered, [false, false, true]);
    assert!(batches.iter().all(|ids| d.insert_batch(ids, now).iter().all(|&f| !f)));
    drop(d);
    // A budget that cannot even hold the indexes refuses ingest (503) rather
    // than grow past it.
    let mut tiny = config(tmp.path());
    tiny.memory_bytes = 4 << 10;
    let d = Deduper::open(WINDOW, tiny, now).expect("reopen tiny");
    assert!(d.runs().iter().all(|r| !r.filtered()));
    let why = d.refusal().expect("refused");
    assert!(why.contains("ingest.dedupe_memory"), "{why}");
}

#[test]
fn a_restart_skips_spilled_ids_and_puts_back_those_of_a_minute_no_run_spans() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let d = open(dir, T0);
    let mut log = IdLog::new(dir.join("ids"), WINDOW).unwrap_or_else(|e| panic!("id log: {e}"));
    let batch = |tag: &str| -> Vec<u128> { (0..500).map(|i| hash_id(&format!("{tag}-{i}"))).collect() };
    let (a, b, c) = (batch("a"), batch("b"), batch("c"));
    // As ingest does: into the table, then the WAL writes the ids.
    for (k, (ids, at)) in [(&a, T0), (&b, T0 + MIN), (&c, T0 + 2 * MIN)].into_iter().enumerate() {
        assert!(d.insert_batch(ids, at).iter().all(|&f| f));
        assert!(log.append(ids, at, k as u64 + 1).is_ok());
    }
    assert!(log.sync().is_ok());
    d.spill_upto_minute(table::minute_of(T0), 3).expect("spill a");
    let first_run = the_run(dir);
    d.spill_upto_minute(table::minute_of(T0 + MIN), 3).expect("spill b");
    // Admitted at a minute already spilled (the clock stepped back), after
    // the spills: in no run, its record past their WAL mark.
    let late = batch("late");
    assert!(d.insert_batch(&late, T0).iter().all(|&f| f));
    assert!(log.append(&late, T0, 4).is_ok());
    assert!(log.sync().is_ok());
    drop(d);
    let now = T0 + 3 * MIN;
    // The id files still hold all three minutes (their slack below the
    // watermark): the two spilled are skipped unread; c, past the
    // watermark, and the late ids, past the runs' WAL mark, go back.
    let (d, counts) = open_counted(dir, now);
    assert_eq!(counts, Restored { skipped: 1_000, looked_up: 500, back: 1_000 });
    assert_eq!(d.len(), 1_000, "c and the late ids back in RAM, a and b in their runs");
    // A replayed WAL record's ids come with `u64::MAX` (no run's mark covers
    // them): looked up even in a spilled minute a run spans, never skipped;
    // those found in a run stay there, the others go back to RAM.
    let fresh = batch("replayed");
    let replayed: Vec<_> = a.iter().chain(&fresh).map(|&id| (id, T0, u64::MAX)).collect();
    assert_eq!(d.restore_batch(&replayed), Restored { skipped: 0, looked_up: 1_000, back: 500 });
    assert_eq!(d.len(), 1_500, "only the ids no run holds joined the table");
    for ids in [&a, &b, &c, &late, &fresh] {
        assert!(d.insert_batch(ids, now).iter().all(|&f| !f), "every id is still a duplicate");
    }
    drop(d);
    // A run file gone missing: its minute, below the watermark, is spanned by
    // no run left, so its ids are looked up, not found, and put back.
    std::fs::remove_file(dir.join("dedupe").join(first_run)).expect("remove the first run");
    let (d, counts) = open_counted(dir, now);
    assert_eq!(counts, Restored { skipped: 500, looked_up: 1_000, back: 1_500 });
    assert_eq!(d.len(), 1_500, "a, c and the late ids in RAM, b in its run");
    for ids in [&a, &b, &c, &late] {
        assert!(d.insert_batch(ids, now).iter().all(|&f| !f), "every id is still a duplicate");
    }
}

#[test]
fn a_restart_reserves_room_up_to_the_tables_share_of_the_budget() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // 1 MB: the table's share is a few ten thousand ids.
    let d = open(tmp.path(), T0);
    d.reserve(10_000_000);
    let room = d.table.capacity();
    assert!(room > 0 && room <= 256 * 1024, "reserved {room} slots for a 1 MB budget");
    let small = 20_000;
    let d = open(tmp.path(), T0);
    d.reserve(small);
    assert!(d.table.capacity() >= 2 * small as usize, "room for what was asked within the share");
}
