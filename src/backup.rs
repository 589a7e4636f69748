//! `meterd backup`: a consistent copy of a data directory, taken from files while
//! meterd runs (or not), that a new meterd starts from with every total intact.
//!
//! # Why it is consistent
//!
//! A data directory holds two things that must agree: the SQLite store (minute
//! aggregates, with the WAL watermark `W` of the last flush in the same
//! transaction) and the WAL (every acknowledged batch not yet in the store).
//! The copy is taken in that order:
//!
//! 0. Hard links pin the WAL segments (see `Pins`), so one the writer deletes
//!    while the store is being copied stays readable.
//! 1. `VACUUM INTO` from a second connection: one read transaction, so the copy
//!    is the store as of one flush, watermark `W` included.
//! 2. The id files (event ids within the dedupe window), then the dedupe runs
//!    (ids spilled out of RAM): every id of a record at or below `W` was
//!    fsynced before that flush, and a spill writes its run before it deletes
//!    the id files it covers, so each such id is in one copy or the other.
//! 3. The WAL segments, in sequence order, each read whole; the newest one may
//!    be mid-append, so it is cut after its last complete record (the frames
//!    carry length and CRC32C); those wholly at or below `W` are left out. The
//!    last record copied, `C`, is the backup
//!    point: a batch acknowledged before the backup started is at or below it
//!    (the writer answers only after its record is written).
//! 4. Check: the copied records above `W` are exactly `W+1 ..= C`. The live
//!    writer may have created and deleted a whole segment after step 0 (a flush
//!    moved its checkpoint on): then the copy is discarded and taken again.
//!
//! The `wal/checkpoint` file is not copied: it may be ahead of the store copy,
//! and start-up would then skip records the copy does not hold. Start-up takes
//! the store's watermark, replays `W+1 ..= C` and forgets the ids of records
//! above `C` (they are in the id files but not in the copied WAL), so every
//! batch is counted once, and one acknowledged after the backup point not at all.
//!
//! The usage store must be the embedded SQLite file: with `[clickhouse]` the
//! watermark lives in ClickHouse, and a copy of the directory alone is not a
//! backup (refused).

use crate::config::ValidConfig;
use crate::store::UsageStore;
use crate::wal::segment;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0} exists and is not empty: back up into a new directory")]
    NotEmpty(String),
    #[error("usage is stored in ClickHouse ([clickhouse] is configured): back ClickHouse up with its own tools; `meterd backup` copies the embedded SQLite store")]
    ClickHouse,
    #[error("the SQLite store: {0}")]
    Sqlite(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
    #[error("event ids: {0}")]
    Ids(String),
    #[error("the WAL kept changing under the copy ({0}); try again")]
    Unstable(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.display().to_string(), source }
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The instance id the copy belongs to (its flushes in the store carry it).
    pub instance_id: Option<String>,
    /// The store's WAL watermark: records up to it are in `meterd.sqlite`.
    pub store_upto: u64,
    /// The backup point: the last WAL record copied (0: none).
    pub wal_upto: u64,
    /// WAL segment files copied.
    pub segments: usize,
    /// The WAL record format version of this meterd.
    pub wal_format: u16,
    /// When the copy was taken (ms since the epoch).
    pub taken_ms: i64,
    /// How many attempts it took (a live WAL may move under the copy).
    pub attempts: u32,
}

/// The manifest's file name inside a backup.
pub const MANIFEST: &str = "backup.json";
const STORE_FILE: &str = "meterd.sqlite";
/// The Stripe webhook ledger (issue 20), without Redis.
const STRIPE_EVENTS_FILE: &str = "stripe_events.sqlite";
/// The adjustments audit list (issue 19): copied before the store and the WAL,
/// so an adjustment is at worst in the copy's usage but not its list, never
/// listed while the copy lacks its usage.
const ADJUSTMENTS_FILE: &str = "adjustments.sqlite";
/// Files copied as they are: the instance id, the portal-token key (issue 20).
const SMALL_FILES: [&str; 2] = ["instance_id", "portal_secret"];
const ATTEMPTS: u32 = 5;

/// Copies the data directory of `config` into `to` (created; must be absent or
/// empty). The copy is built in `to.partial` and renamed into place.
pub async fn backup(config: &ValidConfig, to: &Path) -> Result<Manifest, BackupError> {
    if config.clickhouse.is_some() {
        return Err(BackupError::ClickHouse);
    }
    if to.exists() && std::fs::read_dir(to).map_err(io(to))?.next().is_some() {
        return Err(BackupError::NotEmpty(to.display().to_string()));
    }
    let data_dir = &config.storage.data_dir;
    let instance_id = match &config.server.instance_id {
        Some(id) => Some(id.clone()),
        None => match std::fs::read_to_string(data_dir.join("instance_id")) {
            Ok(id) if !id.trim().is_empty() => Some(id.trim().to_string()),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&data_dir.join("instance_id"))(e)),
        },
    };
    let staging = PathBuf::from(format!("{}.partial", to.display()));
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        remove_dir_if_exists(&staging)?;
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let window = crate::duration::millis_i64(config.ingest.dedupe_window);
        let pins = Pins::take(data_dir);
        let attempt_result = attempt_copy(data_dir, &staging, instance_id.as_deref(), window, &pins).await;
        pins.release();
        let attempt_result = match attempt_result {
            Ok(r) => r,
            Err(e) => {
                let _ = remove_dir_if_exists(&staging);
                return Err(e);
            }
        };
        match attempt_result {
            Ok((store_upto, wal_upto, segments)) => {
                let manifest = Manifest {
                    instance_id,
                    store_upto,
                    wal_upto,
                    segments,
                    wal_format: crate::wal::record::FORMAT_VERSION,
                    taken_ms: crate::clock::now_ms(),
                    attempts: attempt,
                };
                let text = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Sqlite(e.to_string()))?;
                write_synced(&staging.join(MANIFEST), &text)?;
                if to.exists() {
                    std::fs::remove_dir(to).map_err(io(to))?;
                }
                std::fs::rename(&staging, to).map_err(io(to))?;
                sync_dir(to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
                return Ok(manifest);
            }
            Err(why) => {
                tracing::info!(attempt, reason = %why, "the live WAL moved under the backup; copying again");
                last = why;
            }
        }
    }
    remove_dir_if_exists(&staging)?;
    Err(BackupError::Unstable(last))
}

/// One attempt: `Ok(Ok((store_upto, wal_upto, segments)))`, or `Ok(Err(why))`
/// when the WAL moved under the copy and it must be taken again.
async fn attempt_copy(
    data_dir: &Path,
    to: &Path,
    instance_id: Option<&str>,
    dedupe_window_ms: i64,
    pins: &Pins,
) -> Result<Result<(u64, u64, usize), String>, BackupError> {
    // The Stripe events already applied (issue 20), when kept in SQLite:
    // before the store, so an event applied in between is at worst applied
    // again after a restore (its entitlement change is idempotent), never
    // marked applied while the copy lacks its change.
    if data_dir.join(STRIPE_EVENTS_FILE).exists() {
        vacuum_into(&data_dir.join(STRIPE_EVENTS_FILE), &to.join(STRIPE_EVENTS_FILE))?;
    }
    // Adjustments (issue 19): the audit list, before the store (see ADJUSTMENTS_FILE).
    if data_dir.join(ADJUSTMENTS_FILE).exists() {
        vacuum_into(&data_dir.join(ADJUSTMENTS_FILE), &to.join(ADJUSTMENTS_FILE))?;
    }
    // 1. The store, as of one flush.
    let store_src = data_dir.join(STORE_FILE);
    let store_dst = to.join(STORE_FILE);
    let store_upto = if store_src.exists() {
        vacuum_into(&store_src, &store_dst)?;
        match instance_id {
            Some(id) => crate::store::sqlite::SqliteStore::open(&store_dst)?.wal_mark(id).await?.upto,
            None => 0,
        }
    } else {
        0
    };
    // The small files that go with it.
    for name in SMALL_FILES {
        copy_file(&data_dir.join(name), &to.join(name))?;
    }
    copy_tree(&data_dir.join("rejected"), &to.join("rejected"))?;
    let wal_src = data_dir.join("wal");
    if !wal_src.exists() {
        return Ok(Ok((store_upto, 0, 0)));
    }
    let wal_dst = to.join("wal");
    std::fs::create_dir_all(&wal_dst).map_err(io(&wal_dst))?;
    // 2. The id files (after the store: ids of stored records are on disk),
    // whole entries only: the live writer may be mid-append.
    copy_ids(&wal_src.join("ids"), &wal_dst.join("ids"))?;
    // 2b. The dedupe runs (ids spilled out of RAM, issue 15), after the id
    // files: a spill writes its run before it deletes the id files it covers,
    // so every id is in one or the other. Runs are immutable once renamed into
    // place; a run expiring meanwhile held no id within the window (it may be
    // copied short while it is being cut: a start deletes it by its name, unread).
    copy_runs(&wal_src.join("dedupe"), &wal_dst.join("dedupe"))?;
    // Other WAL bookkeeping (a repair's dropped ranges), but not the checkpoint.
    for entry in std::fs::read_dir(&wal_src).map_err(io(&wal_src))? {
        let entry = entry.map_err(io(&wal_src))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_file = entry.file_type().map_err(io(&wal_src))?.is_file();
        if is_file && name != "checkpoint" && !name.ends_with(".tmp") && !name.ends_with(".wal") {
            copy_file(&entry.path(), &wal_dst.join(&*name))?;
        }
    }
    // 3. The segments, oldest first; the newest cut after its last whole record.
    let found = pins.with_live(segment::list(&wal_src)?);
    let count = found.len();
    let mut expected = store_upto + 1;
    let mut wal_upto = 0;
    // The writer appends a record's ids just after the record: those of the
    // newest records may have missed the id copy. They go in again (an id
    // twice is harmless), so they outlive these records' segments.
    let mut ids = crate::wal::ids::IdLog::new(wal_dst.join("ids"), dedupe_window_ms).map_err(|e| BackupError::Ids(e.to_string()))?;
    let firsts: Vec<u64> = found.iter().map(|(first, _)| *first).collect();
    let mut copied = 0;
    for (i, (first, path)) in found.into_iter().enumerate() {
        if firsts.get(i + 1).is_some_and(|next| *next <= store_upto + 1) {
            continue; // wholly in the store copy already
        }
        copied += 1;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(format!("{} was deleted", path.display()))),
            Err(e) => return Err(io(&path)(e)),
        };
        let is_last = i + 1 == count;
        let scan = match segment::scan_bytes(&bytes, &path, is_last) {
            Ok(scan) => scan,
            Err(e) if !is_last => return Ok(Err(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        // 4. Records above the store's watermark must follow on without a gap.
        for record in &scan.records {
            wal_upto = wal_upto.max(record.seq);
            if record.seq < expected {
                continue;
            }
            if record.seq != expected {
                return Ok(Err(format!("records {expected}..{} are gone from the WAL", record.seq)));
            }
            expected += 1;
            let batch = crate::wal::record::decode(&record.payload)
                .map_err(|e| BackupError::Ids(format!("{} at byte offset {}: {e}", path.display(), record.offset)))?;
            let hashes: Vec<u128> = batch.events.iter().map(|e| e.id_hash).collect();
            ids.append(&hashes, batch.accepted_ms, record.seq).map_err(|e| BackupError::Ids(e.to_string()))?;
        }
        if is_last && scan.records.is_empty() && first > expected {
            return Ok(Err(format!("the open segment starts at {first}, after {expected}")));
        }
        let len = usize::try_from(scan.valid_len).unwrap_or(bytes.len()).min(bytes.len());
        write_synced(&wal_dst.join(segment::name(first)), &bytes[..len])?;
    }
    ids.sync().map_err(|e| BackupError::Ids(e.to_string()))?;
    sync_dir(&wal_dst);
    Ok(Ok((store_upto, wal_upto.max(store_upto), copied)))
}

/// Hard links to the WAL segments, taken before the store is copied: a segment
/// the running meterd deletes meanwhile (a flush moved its checkpoint on) stays
/// readable through its link, so a slow `VACUUM INTO` of a large store does not
/// lose the race with the flusher. The links share the inode, so an open
/// segment keeps growing in them. Best effort: where links cannot be made
/// (another file system), the gap check and the retries still hold.
struct Pins {
    dir: Option<PathBuf>,
    segments: Vec<(u64, PathBuf)>,
}

impl Pins {
    fn take(data_dir: &Path) -> Pins {
        let dir = data_dir.join(format!("backup-pins.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pins = Pins { dir: None, segments: Vec::new() };
        let Ok(found) = segment::list(&data_dir.join("wal")) else { return pins };
        if std::fs::create_dir_all(&dir).is_err() {
            return pins;
        }
        for (first, path) in found {
            let link = dir.join(segment::name(first));
            if std::fs::hard_link(&path, &link).is_ok() {
                pins.segments.push((first, link));
            }
        }
        pins.dir = Some(dir);
        pins
    }

    /// The segments listed now, plus the pinned ones gone from the list since.
    fn with_live(&self, live: Vec<(u64, PathBuf)>) -> Vec<(u64, PathBuf)> {
        let mut all: std::collections::BTreeMap<u64, PathBuf> = self.segments.iter().cloned().collect();
        all.extend(live);
        all.into_iter().collect()
    }

    fn release(self) {
        if let Some(dir) = self.dir {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the backup's segment links");
            }
        }
    }
}

/// A consistent copy of a live SQLite database (one read transaction).
fn vacuum_into(src: &Path, dst: &Path) -> Result<(), BackupError> {
    let sql = |e: rusqlite::Error| BackupError::Sqlite(format!("{}: {e}", src.display()));
    let conn = rusqlite::Connection::open_with_flags(src, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql)?;
    conn.execute("VACUUM INTO ?1", [dst.display().to_string()]).map_err(sql)?;
    Ok(())
}

/// Copies a file with its permission bits (`portal_secret` is 0600: so is its copy).
fn copy_file(src: &Path, dst: &Path) -> Result<(), BackupError> {
    match std::fs::read(src) {
        Ok(bytes) => {
            let mode = std::fs::metadata(src).map(|m| permission_bits(&m)).unwrap_or(0o600);
            write_with_mode(dst, &bytes, mode)
        }
        // Expired id files are deleted by the live writer: nothing to copy.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(src)(e)),
    }
}

/// Calls `each(path, name)` for every regular file of `src` (one level, as the
/// data dir keeps them), then syncs `dst`; a missing `src` copies nothing.
fn for_files(src: &Path, dst: &Path, mut each: impl FnMut(&Path, &Path) -> Result<(), BackupError>) -> Result<(), BackupError> {
    let entries = match std::fs::read_dir(src) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(src)(e)),
    };
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for entry in entries {
        let entry = entry.map_err(io(src))?;
        if entry.file_type().map_err(io(src))?.is_file() {
            each(&entry.path(), &dst.join(entry.file_name()))?;
        }
    }
    sync_dir(dst);
    Ok(())
}

/// Copies the regular files of `src`.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), BackupError> {
    for_files(src, dst, copy_file)
}

/// Copies the finished dedupe run files (`*.run`; a `*.tmp` is a spill in progress).
fn copy_runs(src: &Path, dst: &Path) -> Result<(), BackupError> {
    for_files(src, dst, |path, to| if path.extension().is_some_and(|e| e == "run") { copy_file(path, to) } else { Ok(()) })
}

/// Copies the id files, each cut to whole entries.
fn copy_ids(src: &Path, dst: &Path) -> Result<(), BackupError> {
    for_files(src, dst, |path, to| {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()), // expired meanwhile
            Err(e) => return Err(io(path)(e)),
        };
        // Streamed (a file holds ten minutes of ids: gigabytes under heavy
        // ingest), and only as far as its whole entries went when opened.
        let len = file.metadata().map_err(io(path))?.len();
        let whole = len - len % crate::wal::ids::ENTRY as u64;
        let mut out = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(to).map_err(io(to))?;
        let copied = std::io::copy(&mut std::io::Read::take(file, whole), &mut out).map_err(io(path))?;
        // Cut back meanwhile (a refused group's ids): whole entries only.
        let keep = copied - copied % crate::wal::ids::ENTRY as u64;
        out.set_len(keep).and_then(|()| out.sync_all()).map_err(io(to))
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    write_with_mode(path, bytes, 0o644)
}

/// Writes and fsyncs `path`, created with `mode` (on Unix) so a secret is
/// never readable by others, not even for a moment.
fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BackupError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(path))
}

#[cfg(unix)]
fn permission_bits(meta: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
}

#[cfg(not(unix))]
fn permission_bits(_: &std::fs::Metadata) -> u32 {
    0o644
}

/// Best effort: a directory fsync makes the new names durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), BackupError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// `meterd restore`: copies a backup into `data_dir`, which must be absent or
/// empty; meterd then starts from it (same instance id, same totals).
pub fn restore(from: &Path, data_dir: &Path) -> Result<Manifest, BackupError> {
    let manifest_path = from.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| BackupError::Io { path: manifest_path.display().to_string(), source: e.into() })?;
    if data_dir.exists() && std::fs::read_dir(data_dir).map_err(io(data_dir))?.next().is_some() {
        return Err(BackupError::NotEmpty(data_dir.display().to_string()));
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    for name in [STORE_FILE, STRIPE_EVENTS_FILE, /* issue 19 */ ADJUSTMENTS_FILE].iter().chain(SMALL_FILES.iter()) {
        copy_file(&from.join(name), &data_dir.join(name))?;
    }
    copy_tree(&from.join("rejected"), &data_dir.join("rejected"))?;
    copy_tree(&from.join("wal"), &data_dir.join("wal"))?;
    copy_tree(&from.join("wal").join("ids"), &data_dir.join("wal").join("ids"))?;
    copy_tree(&from.join("wal").join("dedupe"), &data_dir.join("wal").join("dedupe"))?;
    sync_dir(data_dir);
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};
    use crate::wal::{record, RecordBuilder, Wal, WalConfig, WalMark};

    fn config(data_dir: &Path) -> ValidConfig {
        let text = format!(
            "[storage]\ndata_dir = {:?}\n[[meters]]\nname = \"m\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nm = {{ limit = 10, window = \"day\" }}\n",
            data_dir.display().to_string()
        );
        let parsed = Config::parse(&text, "test").unwrap_or_else(|e| panic!("{e}"));
        parsed.validate_with("test", &Overrides::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A WAL in `data_dir/wal` with `n` one-event records in small segments.
    async fn wal_with(data_dir: &Path, n: i64, segment_bytes: u64) -> Wal {
        let cfg = WalConfig {
            dir: data_dir.join("wal"),
            sync: Some(crate::wal::Sync::Always),
            segment_bytes,
            dedupe_window_ms: 86_400_000,
            hold: None,
            sync_spacing: std::time::Duration::ZERO,
        };
        let (wal, _) = Wal::open(&cfg, &WalMark::default(), |_, _, _| {}, |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
        for t in 0..n {
            let mut b = record::BatchBuilder::new(crate::clock::now_ms(), 1);
            b.push(t as u128 + 1, 0, || "c".to_string(), 0, "m", 1, t, vec![]);
            assert!(wal.append(RecordBuilder::of(&b.finish())).await.is_ok());
        }
        wal
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_with_records_missing_above_the_store_mark_is_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("instance_id"), "i1").expect("write");
        let wal = wal_with(&data, 30, 300).await;
        // The checkpoint deletes early segments, but the (absent) store holds
        // nothing: records 1.. are gone, as when a flush races the copy.
        assert!(wal.checkpoint(20).await.is_ok());
        let err = backup(&config(&data), &tmp.path().join("b1")).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("kept changing") && err.contains("are gone from the WAL"), "{err}");
        assert!(!tmp.path().join("b1").exists() && !tmp.path().join("b1.partial").exists(), "nothing half-made is left");
        wal.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pinned_segments_outlive_their_deletion_by_the_running_writer() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data = tmp.path().join("data");
        let wal = wal_with(&data, 30, 300).await;
        let before = segment::list(&data.join("wal")).unwrap_or_default();
        assert!(before.len() > 3, "small segments rotate: {before:?}");
        let pins = Pins::take(&data);
        // The writer deletes what a checkpoint covers, as after a flush.
        assert!(wal.checkpoint(20).await.is_ok());
        let live = segment::list(&data.join("wal")).unwrap_or_default();
        assert!(live.len() < before.len());
        let all = pins.with_live(live);
        let firsts: Vec<u64> = all.iter().map(|(f, _)| *f).collect();
        assert!(before.iter().all(|(f, _)| firsts.contains(f)), "every pinned segment is still listed: {firsts:?}");
        let mut seqs = Vec::new();
        for (i, (_, path)) in all.iter().enumerate() {
            let scan = segment::scan(path, i + 1 == all.len()).unwrap_or_else(|e| panic!("{e}"));
            seqs.extend(scan.records.iter().map(|r| r.seq));
        }
        assert_eq!(seqs, (1..=30).collect::<Vec<u64>>(), "and readable through the links");
        let dir = data.join(format!("backup-pins.{}", std::process::id()));
        assert!(dir.exists());
        pins.release();
        assert!(!dir.exists(), "the links go with the attempt");
        wal.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_wal_is_copied_whole_and_a_torn_tail_is_cut() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        std::fs::write(data.join("instance_id"), "i1").expect("write");
        // One segment (none rotates in under the test).
        let wal = wal_with(&data, 12, 1 << 20).await;
        // A half-written record at the end of the open segment (a writer mid-append).
        let (_, newest) = segment::list(&data.join("wal")).unwrap_or_default().pop().expect("a segment");
        let mut half = std::fs::OpenOptions::new().append(true).open(&newest).expect("open");
        half.write_all(&[40, 0, 0, 0, 1, 2]).expect("append");
        let manifest = backup(&config(&data), &tmp.path().join("b")).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((manifest.store_upto, manifest.wal_upto, manifest.attempts), (0, 12, 1));
        assert_eq!(manifest.instance_id.as_deref(), Some("i1"));
        assert!(!tmp.path().join("b/wal/checkpoint").exists());
        // The copy reads back as records 1..=12, intact, with nothing torn.
        let mut seqs = Vec::new();
        for (_, path) in segment::list(&tmp.path().join("b/wal")).unwrap_or_default() {
            let scan = segment::scan(&path, false).unwrap_or_else(|e| panic!("{e}"));
            seqs.extend(scan.records.iter().map(|r| r.seq));
        }
        assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
        // A second backup into the same directory is refused.
        let err = backup(&config(&data), &tmp.path().join("b")).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not empty"), "{err}");
        wal.close();
    }
}
