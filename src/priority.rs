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

    #[tokio::test]
    async fn background_work_runs_lowered() {
        let before = nice_of_this_thread();
        let nice = background(nice_of_this_thread).await.unwrap_or(-100);
        assert_eq!(nice, (before + BACKGROUND_NICE).min(19));
    }
}
