//! Pruned WAL segments leave the disk a few MiB at a time, off the writer's
//! thread.
//!
//! Deleting a whole segment at once (64 MiB by default) frees all its blocks
//! in one journal transaction, and on a filesystem mounted with `discard` the
//! commit also sends the device a trim for every one of them. On this
//! project's VM (ext4 with `discard`) an `unlink` of 64 MiB and the directory's
//! sync took 12–16 ms, and a concurrent data-only `fdatasync` (the WAL's own)
//! stalled for 6–32 ms meanwhile; the same deletion cut 4 MiB at a time, each
//! cut made durable and a short pause between, left that `fdatasync` at
//! 1.2–3.6 ms at worst (BENCHMARKS.md, issue 24's eighth pass). The writer
//! itself used to make the `unlink`, so its appends waited through it too.
//!
//! So the writer only renames a pruned segment to `reclaim-{first_seq}.tmp`
//! (a name `segment::list` skips and backups ignore: an instant metadata
//! change) and hands it to this module's thread, at background priority,
//! which makes the rename durable, cuts the file down a chunk at a time, and
//! deletes it. A crash or a stop midway leaves such a file behind, whole or
//! cut: the next start reclaims it. None of its records are needed any more:
//! the segment was pruned because the store and the raw-events export both
//! hold them. A segment a backup pinned (a hard link, `backup.rs`) is not cut,
//! only unlinked: the backup still reads it through its link.
//!
//! A segment's bytes stay in the WAL's count ([`WalStats::bytes`], what
//! `storage.max_wal_bytes` caps and `meterd_wal_bytes` shows) until its file is
//! gone, so a reclaimer that falls behind, or fails and leaves a file for the
//! next start, is seen and capped like any other WAL growth.
//!
//! Expired dedupe runs (`crate::dedupe`, up to a few hundred MiB each) leave
//! their directory the same way, on a thread of their own. A run differs in
//! one point: lookups read it through its open handle until the last of them
//! lets the run go, and a cut file would read short under them (a read error,
//! which refuses a batch). So such a file is renamed at once but cut only
//! once its holder has no reference left (within a minute, `HOLD_WAIT`; past it the
//! file is unlinked whole, as before).

use super::WalStats;
use crossbeam::channel::Sender;
use std::any::Any;
use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Prefix of a segment being reclaimed (followed by its first sequence number
/// and `.tmp`).
pub const PREFIX: &str = "reclaim-";
/// Bytes cut per step.
const CHUNK: u64 = 4 << 20;
/// Pause between two cuts, so that the journal commits each alone and the
/// WAL's syncs pass between them.
const PAUSE: Duration = Duration::from_millis(10);
/// Longest wait for a held file's readers. A probe holds a dedupe run for
/// microseconds, a gate rebuild for seconds; past this something holds it for
/// good, and the file is only unlinked (its space returns, at once, when the
/// holder lets go) so that the files queued behind it do not wait forever.
const HOLD_WAIT: Duration = Duration::from_secs(60);

/// Why the reclaimer could not start (its owner then deletes files itself,
/// at once, as before).
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("cannot start the reclaiming thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot list {path} for files left to reclaim: {source}")]
    List { path: String, source: std::io::Error },
}

/// What the thread is handed: a file to delete, the bytes to report once it
/// is gone, and (a dedupe run) what must be let go before it is cut.
struct Job {
    path: PathBuf,
    size: u64,
    /// Readers of the file through an open handle (a dedupe run's probers):
    /// the file is not cut while any is alive, since they would read short.
    holder: Option<Weak<dyn Any + Send + Sync>>,
}

/// Called with a file's `size` once it is deleted.
type OnDeleted = Box<dyn Fn(u64) + Send>;

/// The owner's handle on a reclaiming thread (the WAL writer's, or the
/// deduper's for its expired runs).
pub struct Reclaimer {
    tx: Option<Sender<Job>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The name a segment starting at `first_seq` is reclaimed under (a dedupe
/// run's: its sequence number).
pub fn name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}.tmp")
}

/// Whether `file_name` is one this module reclaims (left by a crash or a stop).
pub fn is_reclaim_name(file_name: &str) -> bool {
    file_name.starts_with(PREFIX) && file_name.ends_with(".tmp")
}

/// The number a reclaim name carries ([`name`]'s `first_seq`), if it is one.
pub fn seq_of_name(file_name: &str) -> Option<u64> {
    file_name.strip_prefix(PREFIX)?.strip_suffix(".tmp")?.parse().ok()
}

impl Reclaimer {
    /// Starts the WAL's thread on `dir`, and queues the files a crash or a
    /// stop left there (not in `stats`' count: the WAL counts only its
    /// segments when it opens). A file handed over later leaves the count once
    /// deleted.
    pub fn start(dir: &Path, stats: Arc<WalStats>) -> Result<Reclaimer, ReclaimError> {
        Reclaimer::start_named(
            dir,
            "meterd-wal-reclaim",
            Box::new(move |size| {
                stats.bytes.fetch_sub(size, Ordering::AcqRel);
            }),
        )
    }

    /// Starts a thread called `thread` on `dir`, queueing the files a crash
    /// or a stop left there; `on_deleted` hears of each file handed over once
    /// it is gone, with the size it was handed with.
    pub fn start_named(dir: &Path, thread: &str, on_deleted: OnDeleted) -> Result<Reclaimer, ReclaimError> {
        Reclaimer::start_waiting(dir, thread, on_deleted, HOLD_WAIT)
    }

    /// [`Reclaimer::start_named`], waiting at most `hold_wait` for a held
    /// file's readers.
    fn start_waiting(dir: &Path, thread: &str, on_deleted: OnDeleted, hold_wait: Duration) -> Result<Reclaimer, ReclaimError> {
        let (tx, rx) = crossbeam::channel::unbounded::<Job>();
        let list = |source| ReclaimError::List { path: dir.display().to_string(), source };
        for entry in std::fs::read_dir(dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            if entry.file_name().to_str().is_some_and(is_reclaim_name) {
                let _ = tx.send(Job { path: entry.path(), size: 0, holder: None });
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (dir, stop) = (dir.to_path_buf(), stop.clone());
            std::thread::Builder::new()
                .name(thread.into())
                .spawn(move || {
                    crate::priority::lower_this_thread();
                    for job in rx {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        let gone = match released(job.holder.as_ref(), &stop, hold_wait) {
                            Released::Yes => shrink(&dir, &job.path, &stop),
                            Released::Stopped => return,
                            Released::NotInTime => {
                                tracing::warn!(
                                    file = %job.path.display(),
                                    waited = ?hold_wait,
                                    "a file to reclaim is still held open; unlinked whole (its space returns when it is let go)"
                                );
                                std::fs::remove_file(&job.path).map(|()| true)
                            }
                        };
                        match gone {
                            Ok(true) => on_deleted(job.size),
                            Ok(false) => return,
                            Err(e) => {
                                tracing::warn!(file = %job.path.display(), error = %e, "cannot reclaim a file; the next start tries again")
                            }
                        }
                    }
                })
                .map_err(ReclaimError::Spawn)?
        };
        Ok(Reclaimer { tx: Some(tx), stop, thread: Some(thread) })
    }

    /// Moves the pruned segment at `segment` (first sequence number `first`,
    /// `size` bytes of the WAL's count) out of the WAL's view and queues it;
    /// its bytes leave the count once it is deleted. The rename is the only
    /// thing done on the caller's thread.
    pub fn reclaim(&self, dir: &Path, segment: &Path, first: u64, size: u64) -> std::io::Result<()> {
        self.reclaim_held(dir, segment, first, size, None)
    }

    /// [`Reclaimer::reclaim`] for a file that readers may still hold open
    /// through `holder` (the last of them lets it go by dropping it): it is
    /// renamed at once, and cut only once `holder` has no strong reference left.
    pub fn reclaim_held(
        &self,
        dir: &Path,
        file: &Path,
        key: u64,
        size: u64,
        holder: Option<Weak<dyn Any + Send + Sync>>,
    ) -> std::io::Result<()> {
        let to = dir.join(name(key));
        std::fs::rename(file, &to)?;
        if let Some(tx) = &self.tx {
            // A stopped thread: the file waits for the next start.
            let _ = tx.send(Job { path: to, size, holder });
        }
        Ok(())
    }

    /// Stops the thread within a step; files not yet gone wait for the next
    /// start.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How the wait for a held file's readers ended.
#[derive(Debug, PartialEq, Eq)]
enum Released {
    Yes,
    /// `stop` came first: the file stays for the next start.
    Stopped,
    /// Still held after the longest wait.
    NotInTime,
}

/// Waits, [`PAUSE`] at a time and at most `longest`, until nothing holds
/// `holder` any more.
fn released(holder: Option<&Weak<dyn Any + Send + Sync>>, stop: &AtomicBool, longest: Duration) -> Released {
    let Some(holder) = holder else { return Released::Yes };
    let started = std::time::Instant::now();
    while holder.strong_count() > 0 {
        if stop.load(Ordering::Acquire) {
            return Released::Stopped;
        }
        if started.elapsed() >= longest {
            return Released::NotInTime;
        }
        std::thread::sleep(PAUSE);
    }
    Released::Yes
}

/// Makes the rename into `dir` durable, cuts the file at `path` down by
/// [`CHUNK`] a step (each made durable, [`PAUSE`] apart), then deletes it:
/// `true` once deleted, `false` if `stop` came first (the file stays).
fn shrink(dir: &Path, path: &Path, stop: &AtomicBool) -> std::io::Result<bool> {
    // Durable before any cut: a crash must never leave a cut file under its
    // segment name.
    super::checkpoint::sync_dir(dir)?;
    let file = OpenOptions::new().write(true).open(path)?;
    let meta = file.metadata()?;
    if meta.nlink() > 1 {
        // Another name shares the file (a backup's pin, `backup.rs`): cutting
        // it would cut that copy too. Only this name goes.
        drop(file);
        return std::fs::remove_file(path).map(|()| true);
    }
    let mut size = meta.len();
    while size > CHUNK {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        size -= CHUNK;
        file.set_len(size)?;
        file.sync_data()?;
        std::thread::sleep(PAUSE);
    }
    drop(file);
    std::fs::remove_file(path).map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn a_reclaim_name_gives_back_its_number_and_nothing_else_does() {
        assert_eq!(seq_of_name(&name(42)), Some(42));
        assert!(is_reclaim_name(&name(u64::MAX)) && seq_of_name(&name(u64::MAX)) == Some(u64::MAX));
        for other in ["reclaim-.tmp", "reclaim-12.run", "reclaim-x1.tmp", "0000000001-0000000002-0000000000000003.run", "12.tmp"] {
            assert_eq!(seq_of_name(other), None, "{other}");
        }
    }

    /// A file of `len` bytes that takes no room (the steps cut it alike).
    fn sparse(path: &Path, len: u64) {
        let file = std::fs::File::create(path).expect("create");
        file.set_len(len).expect("set_len");
    }

    /// A temporary WAL directory holding segment `first` with `bytes`.
    fn dir_with_segment(first: u64, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let segment = tmp.path().join(super::super::segment::name(first));
        std::fs::write(&segment, bytes).expect("segment");
        (tmp, segment)
    }

    fn wait_until_gone(dir: &Path, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while files(dir).iter().any(|f| f == name) {
            assert!(Instant::now() < deadline, "{name} still there after 30 s: {:?}", files(dir));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_pruned_segment_is_moved_out_of_view_at_once_and_deleted_in_steps() {
        let (tmp, segment) = dir_with_segment(7, &vec![1u8; (CHUNK * 3 + 5) as usize]);
        let dir = tmp.path();
        std::fs::write(dir.join(super::super::segment::name(99)), b"live").expect("live segment");
        let stats = Arc::new(WalStats::default());
        stats.bytes.store(CHUNK * 3 + 5 + 4, Ordering::Release);
        let reclaimer = Reclaimer::start(dir, stats.clone()).unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim(dir, &segment, 7, CHUNK * 3 + 5).unwrap_or_else(|e| panic!("{e}"));
        // Out of the WAL's view as soon as reclaim returns.
        let listed = super::super::segment::list(dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(listed.iter().map(|(first, _)| *first).collect::<Vec<_>>(), [99]);
        wait_until_gone(dir, &name(7));
        assert_eq!(files(dir), [super::super::segment::name(99)], "only the live segment is left");
        // Its bytes leave the WAL's count once it is gone (just after).
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats.bytes.load(Ordering::Acquire) != 4 {
            assert!(Instant::now() < deadline, "count after deletion: {}", stats.bytes.load(Ordering::Acquire));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_segment_a_backup_pinned_keeps_every_byte_under_the_pin() {
        let bytes: Vec<u8> = (0..CHUNK * 2 + 77).map(|i| (i % 251) as u8).collect();
        let (tmp, segment) = dir_with_segment(4, &bytes);
        let dir = tmp.path();
        let pin = tmp.path().join("pin");
        std::fs::hard_link(&segment, &pin).expect("link");
        let reclaimer = Reclaimer::start(dir, Arc::default()).unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim(dir, &segment, 4, 0).unwrap_or_else(|e| panic!("{e}"));
        wait_until_gone(dir, &name(4));
        assert!(std::fs::read(&pin).expect("pin") == bytes, "the pinned copy is whole");
    }

    #[test]
    fn a_held_file_is_renamed_at_once_and_cut_only_once_let_go() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let run = dir.join("100-160-3.run");
        let bytes: Vec<u8> = (0..CHUNK * 2 + 9).map(|i| (i % 253) as u8).collect();
        std::fs::write(&run, &bytes).expect("run");
        // A prober's handle on the run, as `dedupe` holds it.
        let holder: Arc<dyn Any + Send + Sync> = Arc::new(std::fs::File::open(&run).expect("open"));
        let deleted = Arc::new(AtomicU64::new(0));
        let seen = deleted.clone();
        let reclaimer = Reclaimer::start_named(dir, "test-reclaim", Box::new(move |n| _ = seen.fetch_add(n, Ordering::AcqRel)))
            .unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim_held(dir, &run, 3, 11, Some(Arc::downgrade(&holder))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(files(dir), [name(3)], "renamed out of view at once");
        // Thirty pauses: long enough for every cut, had it not waited.
        std::thread::sleep(PAUSE * 30);
        assert_eq!(std::fs::metadata(dir.join(name(3))).map(|m| m.len()).ok(), Some(bytes.len() as u64), "not cut while held");
        let mut read = vec![0u8; bytes.len()];
        let file = holder.downcast_ref::<std::fs::File>().expect("a file");
        std::os::unix::fs::FileExt::read_exact_at(file, &mut read, 0).expect("the holder reads it whole");
        assert!(read == bytes);
        assert_eq!(deleted.load(Ordering::Acquire), 0);
        drop(holder);
        wait_until_gone(dir, &name(3));
        let deadline = Instant::now() + Duration::from_secs(30);
        while deleted.load(Ordering::Acquire) != 11 {
            assert!(Instant::now() < deadline, "reported after deletion: {}", deleted.load(Ordering::Acquire));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_file_held_past_the_longest_wait_is_unlinked_whole_and_the_queue_moves_on() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let bytes: Vec<u8> = (0..CHUNK + 3).map(|i| (i % 241) as u8).collect();
        let (held, next) = (dir.join("1-1-1.run"), dir.join("2-2-2.run"));
        std::fs::write(&held, &bytes).expect("held");
        std::fs::write(&next, b"next").expect("next");
        let holder: Arc<dyn Any + Send + Sync> = Arc::new(std::fs::File::open(&held).expect("open"));
        let reclaimer =
            Reclaimer::start_waiting(dir, "test-reclaim", Box::new(|_| {}), Duration::from_millis(200)).unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim_held(dir, &held, 1, 0, Some(Arc::downgrade(&holder))).unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim_held(dir, &next, 2, 0, None).unwrap_or_else(|e| panic!("{e}"));
        // Both go, the held one without a cut: its holder still reads it whole.
        wait_until_gone(dir, &name(1));
        wait_until_gone(dir, &name(2));
        let mut read = vec![0u8; bytes.len()];
        let file = holder.downcast_ref::<std::fs::File>().expect("a file");
        std::os::unix::fs::FileExt::read_exact_at(file, &mut read, 0).expect("the holder reads it whole");
        assert!(read == bytes);
    }

    #[test]
    fn a_stop_while_a_file_is_held_leaves_it_whole() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let run = dir.join("1-2-8.run");
        sparse(&run, CHUNK * 3);
        let holder: Arc<dyn Any + Send + Sync> = Arc::new(());
        let mut reclaimer = Reclaimer::start_named(dir, "test-reclaim", Box::new(|_| {})).unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim_held(dir, &run, 8, 0, Some(Arc::downgrade(&holder))).unwrap_or_else(|e| panic!("{e}"));
        let asked = Instant::now();
        reclaimer.stop();
        assert!(asked.elapsed() < Duration::from_secs(5), "the stop waits for no holder");
        assert_eq!(std::fs::metadata(dir.join(name(8))).map(|m| m.len()).ok(), Some(CHUNK * 3), "left whole for the next start");
        drop(holder);
    }

    #[test]
    fn files_left_by_a_crash_are_reclaimed_at_start_and_nothing_else() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        // One cut midway, one whole; and files that are not the reclaimer's.
        std::fs::write(dir.join(name(1)), vec![0u8; 1000]).expect("left");
        sparse(&dir.join(name(2)), CHUNK * 2);
        std::fs::write(dir.join("reclaim-notes.txt"), b"keep").expect("other");
        std::fs::write(dir.join(super::super::segment::name(3)), b"live").expect("live");
        let _reclaimer = Reclaimer::start(dir, Arc::default()).unwrap_or_else(|e| panic!("{e}"));
        wait_until_gone(dir, &name(1));
        wait_until_gone(dir, &name(2));
        assert_eq!(files(dir), [super::super::segment::name(3), "reclaim-notes.txt".to_string()]);
    }

    #[test]
    fn a_stop_midway_leaves_the_file_for_the_next_start() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let segment = dir.join(super::super::segment::name(5));
        sparse(&segment, CHUNK * 200);
        let stats = Arc::new(WalStats::default());
        stats.bytes.store(CHUNK * 200, Ordering::Release);
        let mut reclaimer = Reclaimer::start(dir, stats.clone()).unwrap_or_else(|e| panic!("{e}"));
        reclaimer.reclaim(dir, &segment, 5, CHUNK * 200).unwrap_or_else(|e| panic!("{e}"));
        // 200 steps take at least two seconds: stopped well before the end.
        std::thread::sleep(Duration::from_millis(100));
        reclaimer.stop();
        let left = dir.join(name(5));
        let len = std::fs::metadata(&left).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0 && len < CHUNK * 200, "cut partly, still there: {len}");
        assert!(super::super::segment::list(dir).unwrap_or_default().is_empty(), "and out of the WAL's view");
        assert_eq!(stats.bytes.load(Ordering::Acquire), CHUNK * 200, "a file still on disk stays in the WAL's count");
        let _again = Reclaimer::start(dir, Arc::default()).unwrap_or_else(|e| panic!("{e}"));
        wait_until_gone(dir, &name(5));
    }
}
