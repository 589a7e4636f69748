//! Background work yields the CPU to requests.
//!
//! On a small machine a once-a-second flush writing thousands of rows, or a
//! dedupe spill, takes a core for milliseconds; at the same priority as the
//! request workers it shares that core with them and requests queue behind it
//! (issue 24: the tail of a consume at light load). Run on a thread lowered by
//! [`lower_this_thread`], it takes what the workers leave, and the scheduler
//! preempts it as soon as a worker has a request. It is not starved: at nice
//! 10 it still gets about a tenth of a busy core.

use std::cell::Cell;

/// How much nicer than the rest of the process background threads run (nice
/// values go from -20 to 19, the lowest priority).
pub const BACKGROUND_NICE: i32 = 10;

thread_local! {
    static LOWERED: Cell<bool> = const { Cell::new(false) };
}

/// Lowers the calling thread's scheduling priority by [`BACKGROUND_NICE`]
/// (to at most 19), once per thread. Lowering needs no privilege; a thread of the blocking pool
/// stays lowered for the rest of its life (the pool runs only background work
/// and the rare request-path call of an operator).
pub fn lower_this_thread() {
    if LOWERED.with(|l| l.replace(true)) {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers and touch no
        // memory of ours; on Linux PRIO_PROCESS with a thread id sets that
        // thread's nice value.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + BACKGROUND_NICE).min(19))
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a background thread's priority");
        }
    }
}

/// Why background work did not give its result.
#[derive(Debug, thiserror::Error)]
pub enum PriorityError {
    #[error("cannot start a background thread: {0}")]
    Spawn(std::io::Error),
    #[error("the background thread stopped without a result")]
    Lost,
}

/// Runs `f` on a thread of its own at background priority, and waits for it.
/// A new thread, not the blocking pool: a lowered thread cannot be raised
/// again without privilege, and the pool's threads also run work that must
/// not be lowered. Starting a thread costs tens of microseconds; this is for
/// work done about once a second.
pub async fn background<T, F>(f: F) -> Result<T, PriorityError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("meterd-background".into())
        .spawn(move || {
            lower_this_thread();
            let _ = tx.send(f());
        })
        .map_err(PriorityError::Spawn)?;
    rx.await.map_err(|_| PriorityError::Lost)
}

/// Runs `f`, which may borrow, on a lowered thread of its own and waits for
/// it. On a multi-threaded runtime the waiting is done in
/// `tokio::task::block_in_place`, which first hands the calling worker's queued
/// tasks to another thread, so requests do not wait behind `f`; elsewhere (a
/// current-thread runtime, no runtime) the caller just blocks. For work of a
/// few milliseconds about once a second, such as turning a flushed epoch into
/// rows.
pub fn lowered_scoped<T, F>(f: F) -> Result<T, PriorityError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let run = || {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("meterd-background".into())
                .spawn_scoped(scope, || {
                    lower_this_thread();
                    f()
                })
                .map_err(PriorityError::Spawn)?;
            handle.join().map_err(|_| PriorityError::Lost)
        })
    };
    off_the_workers(run)
}

/// Runs `f` on the calling thread, at its priority, but off the runtime's
/// worker: on a multi-threaded runtime through `tokio::task::block_in_place`
/// (the worker's queued tasks move to another thread first), elsewhere as it
/// is. For synchronous passes that take locks (housekeeping), which must not
/// run lowered: a lowered thread preempted while holding a shard lock would
/// hold up the requests waiting for it.
pub fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Gives the CPU to any thread waiting for it, every `every` calls: a lowered
/// thread doing a long pass calls this so that a request worker woken on its
/// CPU waits for it a fraction of a millisecond rather than the rest of the
/// scheduler's time slice.
pub struct Yielder {
    every: u32,
    count: u32,
}

impl Yielder {
    pub fn new(every: u32) -> Yielder {
        Yielder { every: every.max(1), count: 0 }
    }

    /// Counts one step; yields on every `every`-th.
    pub fn step(&mut self) {
        self.count += 1;
        if self.count >= self.every {
            self.count = 0;
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: as above; getpriority reads the calling thread's nice value.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[test]
    fn a_lowered_thread_runs_at_the_background_nice_and_others_do_not() {
        let before = nice_of_this_thread();
        let lowered = std::thread::spawn(|| {
            lower_this_thread();
            lower_this_thread();
            nice_of_this_thread()
        })
        .join()
        .unwrap_or(-100);
        assert_eq!(lowered, (before + BACKGROUND_NICE).min(19));
        assert_eq!(nice_of_this_thread(), before, "only the calling thread is lowered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scoped_work_borrows_runs_lowered_and_off_the_worker() {
        let before = nice_of_this_thread();
        let data = [1u64, 2, 3];
        let (sum, nice) = lowered_scoped(|| (data.iter().sum::<u64>(), nice_of_this_thread())).unwrap_or((0, -100));
        assert_eq!(sum, 6);
        assert_eq!(nice, (before + BACKGROUND_NICE).min(19));
        // On a current-thread runtime, or none, the caller just waits.
        assert_eq!(off_the_workers(|| 7), 7);
    }

    #[test]
    fn off_the_workers_runs_without_a_runtime_and_on_a_current_thread_one() {
        assert_eq!(off_the_workers(|| 1), 1);
        let rt = tokio::runtime::Builder::new_current_thread().build();
        let got = rt.map(|rt| rt.block_on(async { off_the_workers(|| 2) })).unwrap_or(0);
        assert_eq!(got, 2);
    }

    #[test]
    fn a_yielder_counts_steps() {
        let mut y = Yielder::new(3);
        for _ in 0..7 {
            y.step();
        }
        assert_eq!(y.count, 1);
    }

    #[tokio::test]
    async fn background_work_runs_lowered() {
        let before = nice_of_this_thread();
        let nice = background(nice_of_this_thread).await.unwrap_or(-100);
        assert_eq!(nice, (before + BACKGROUND_NICE).min(19));
    }
}
