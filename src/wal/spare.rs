//! Segments prepared ahead, filled with zeros, so that a group's `fdatasync`
//! syncs data and nothing else.
//!
//! Appending to a file changes its size and allocates its blocks: every
//! `fdatasync` after an append must also write the inode and the allocation's
//! metadata, each a synchronous I/O of its own. Overwriting zeros already on
//! disk changes neither, so the sync writes the data pages and flushes the
//! disk's cache. On this project's VM (ext4, 4 KiB records) that is 83–86 µs
//! against 130–149 µs per sync at the median, and 36–37 µs of CPU against
//! 55–66 µs (issue 24; BENCHMARKS.md).
//!
//! One thread, at background priority, writes the next segment's zeros under
//! [`SPARE_NAME`] in 1 MiB steps, each made durable before the next (so the
//! disk never has more than a step of it queued ahead of the WAL's own syncs),
//! and hands the file over when it is whole. At rotation the writer renames it
//! into place if it is ready; if it is not (a burst outran it, or it failed),
//! the writer starts a plain empty segment, whose appends are only slower.
//!
//! The zeros after the last record are not damage: reading a segment stops at
//! them (`segment::SegmentScan::padding`), and the writer cuts them off a
//! segment when it rotates away from it, so only the newest segment has any.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The file a segment is prepared in; not a segment name (`segment::list`
/// skips it) and ignored by backups (`.tmp`).
pub const SPARE_NAME: &str = "next-segment.tmp";
/// Zeros written, and made durable, per step.
const STEP: usize = 1 << 20;

/// Why a spare could not be prepared (the writer then appends to a plain
/// segment).
#[derive(Debug, thiserror::Error)]
pub enum SpareError {
    #[error("preparing the next WAL segment {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cannot start the WAL segment preparer: {0}")]
    Spawn(std::io::Error),
    #[error("stopped")]
    Stopped,
}

/// The writer's handle on the preparing thread.
pub struct Spares {
    /// One message per spare wanted.
    want: Option<crossbeam::channel::Sender<()>>,
    ready: crossbeam::channel::Receiver<PathBuf>,
    /// Whether a spare was asked for and not yet taken.
    outstanding: bool,
    /// Set by the thread when a spare failed (it then waits to be asked again).
    failed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Spares {
    /// Starts the preparing thread on `dir`, for spares of `bytes` bytes; it
    /// prepares the first when [`Spares::want`] asks (a WAL that is hardly
    /// written to never needs one: most tests, a quiet instance).
    pub fn start(dir: &Path, bytes: u64) -> Result<Spares, SpareError> {
        // One left by a crash: it may never be wanted again.
        let _ = std::fs::remove_file(dir.join(SPARE_NAME));
        let (want_tx, want_rx) = crossbeam::channel::unbounded::<()>();
        let (ready_tx, ready_rx) = crossbeam::channel::bounded::<PathBuf>(1);
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let thread = {
            let (dir, stop, failed) = (dir.to_path_buf(), stop.clone(), failed.clone());
            std::thread::Builder::new()
                .name("meterd-wal-prep".into())
                .spawn(move || {
                    crate::priority::lower_this_thread();
                    for () in want_rx {
                        match prepare(&dir, bytes, &stop) {
                            Ok(path) => {
                                if ready_tx.send(path).is_err() {
                                    return;
                                }
                            }
                            Err(SpareError::Stopped) => return,
                            Err(e) => {
                                // The writer appends to plain segments meanwhile.
                                tracing::warn!(error = %e, "cannot prepare the next WAL segment; the next one starts empty");
                                let _ = std::fs::remove_file(dir.join(SPARE_NAME));
                                failed.store(true, Ordering::Release);
                            }
                        }
                    }
                })
                .map_err(SpareError::Spawn)?
        };
        let spares =
            Spares { want: Some(want_tx), ready: ready_rx, outstanding: false, failed, stop, thread: Some(thread), dir: dir.to_path_buf() };
        Ok(spares)
    }

    /// Asks for a spare, unless one is asked for or ready already.
    pub fn want(&mut self) {
        self.ask();
    }

    /// Whether a spare is ready to take.
    pub fn is_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    fn ask(&mut self) {
        if !self.outstanding {
            self.outstanding = self.want.as_ref().is_some_and(|w| w.send(()).is_ok());
        }
    }

    /// Renames the prepared file to `to` if one is ready, and asks for the
    /// next; its length, or `None` when none was ready (or it could not be
    /// moved: the caller starts a plain segment). The caller makes the
    /// directory durable.
    pub fn take_into(&mut self, to: &Path) -> Option<u64> {
        let Ok(path) = self.ready.try_recv() else {
            if self.failed.swap(false, Ordering::AcqRel) {
                // The last one failed: try again for the rotation after this one.
                self.outstanding = false;
                self.ask();
            }
            return None;
        };
        // Moved before the next is asked for: the next is prepared under the same name.
        let moved = std::fs::rename(&path, to).and_then(|()| std::fs::metadata(to)).map(|m| m.len());
        self.outstanding = false;
        self.ask();
        match moved {
            Ok(len) => Some(len),
            Err(e) => {
                tracing::warn!(error = %e, to = %to.display(), "cannot move the prepared WAL segment into place; starting an empty one");
                // Not left under the segment's name: the writer, taking it for
                // an empty segment, would not cut its zeros off at rotation.
                let _ = std::fs::remove_file(to);
                None
            }
        }
    }

    /// Stops the thread (mid-spare if need be) and deletes an unused spare.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.want = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(self.dir.join(SPARE_NAME));
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `bytes` zeros to [`SPARE_NAME`] in `dir`, a durable step at a time.
fn prepare(dir: &Path, bytes: u64, stop: &AtomicBool) -> Result<PathBuf, SpareError> {
    let path = dir.join(SPARE_NAME);
    let io = |source| SpareError::Io { path: path.display().to_string(), source };
    let file = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(io)?;
    let zeros = vec![0u8; STEP];
    let mut at = 0u64;
    while at < bytes {
        if stop.load(Ordering::Acquire) {
            return Err(SpareError::Stopped);
        }
        let n = usize::try_from(bytes - at).unwrap_or(STEP).min(STEP);
        file.write_all_at(&zeros[..n], at).map_err(io)?;
        file.sync_data().map_err(io)?;
        at += n as u64;
    }
    file.sync_all().map_err(io)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(spares: &mut Spares, to: &Path) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(len) = spares.take_into(to) {
                return len;
            }
            assert!(Instant::now() < deadline, "no spare within 30 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_spare_is_whole_zeros_and_the_next_is_prepared_once_it_is_taken() {
        let dir = tempfile::tempdir().expect("dir");
        let bytes = 2 * STEP as u64 + 4096 + 7;
        std::fs::write(dir.path().join(SPARE_NAME), b"left by a crash").expect("write");
        let mut spares = Spares::start(dir.path(), bytes).expect("start");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!spares.is_ready() && !dir.path().join(SPARE_NAME).exists(), "none prepared before one is wanted");
        spares.want();
        let first = dir.path().join("first");
        assert_eq!(wait_for(&mut spares, &first), bytes);
        let content = std::fs::read(&first).expect("read");
        assert!(content.len() as u64 == bytes && content.iter().all(|&b| b == 0));
        // A second one follows, prepared while the first is in use.
        let second = dir.path().join("second");
        assert_eq!(wait_for(&mut spares, &second), bytes);
        assert_eq!(std::fs::metadata(&first).map(|m| m.len()).ok(), Some(bytes), "the first is left alone");
        // A third is prepared but not taken: stopping deletes it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.path().join(SPARE_NAME).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        spares.stop();
        assert!(!dir.path().join(SPARE_NAME).exists());
    }

    #[test]
    fn a_spare_that_cannot_be_written_leaves_nothing_ready() {
        let dir = tempfile::tempdir().expect("dir");
        let gone = dir.path().join("missing");
        let mut spares = Spares::start(&gone, 4096).expect("start");
        spares.want();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !spares.failed.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the failure was not noted");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(spares.take_into(&dir.path().join("to")).is_none());
        // Asked again at the next rotation: it succeeds once the directory exists.
        std::fs::create_dir(&gone).expect("mkdir");
        assert_eq!(wait_for(&mut spares, &dir.path().join("to")), 4096);
        spares.stop();
    }
}
