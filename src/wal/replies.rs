//! Answers to appends, handed to each runtime thread a group at a time.
//!
//! The writer answers an append through a oneshot channel. Sent from the
//! writer's thread, each answer wakes its task from outside that task's
//! runtime, and on a single-threaded runtime (the HTTP connection threads,
//! `http::threads`) every such wake is an `eventfd` write: with `fsync` the
//! writer made one per consume, its most frequent syscall (issue 24, thirteenth
//! pass). A thread that runs a [`Mailbox`] pump ([`serve_here`]) has its appends
//! name that mailbox; the writer leaves a group's answers for the thread in it
//! and wakes the pump once, and the pump, on that thread, sends them, each send
//! waking its task there without a syscall. Appends from any other thread are
//! answered directly, as before.

use super::WalError;
use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, Notify};

/// Where an append's answer goes.
pub type Reply = oneshot::Sender<Result<u64, WalError>>;

/// An answer to send: the appending thread's mailbox (if any), where the
/// answer goes, and the answer.
pub type Answer = (Option<Arc<Mailbox>>, Reply, Result<u64, WalError>);

/// An answer left in a mailbox: where it goes, and the answer.
type Waiting = (Reply, Result<u64, WalError>);

/// The answers waiting for one thread's pump.
#[derive(Default)]
pub struct Mailbox {
    waiting: Mutex<Vec<Waiting>>,
    wake: Notify,
    /// How many times the pump has emptied the box (tests).
    #[cfg(test)]
    emptied: std::sync::atomic::AtomicU64,
}

thread_local! {
    static HERE: RefCell<Option<Arc<Mailbox>>> = const { RefCell::new(None) };
}

/// Gives this thread a mailbox and returns its pump, to be spawned on the
/// single-threaded runtime this thread runs (and nowhere else). The pump lives
/// as long as that runtime: it is one task that never ends by itself.
pub fn serve_here() -> impl Future<Output = ()> + Send + 'static {
    let mailbox = Arc::new(Mailbox::default());
    HERE.with(|here| *here.borrow_mut() = Some(mailbox.clone()));
    async move {
        loop {
            mailbox.wake.notified().await;
            let answers = std::mem::take(&mut *mailbox.waiting.lock().unwrap_or_else(|p| p.into_inner()));
            #[cfg(test)]
            mailbox.emptied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for (reply, answer) in answers {
                let _ = reply.send(answer);
            }
        }
    }
}

/// This thread's mailbox, if it serves one.
pub fn here() -> Option<Arc<Mailbox>> {
    HERE.with(|here| here.borrow().clone())
}

/// Sends a group's answers: those whose append named a mailbox through it
/// (one wake per mailbox), the others directly.
pub fn answer(answers: Vec<Answer>) {
    let mut boxes: Vec<(Arc<Mailbox>, Vec<Waiting>)> = Vec::new();
    for (mailbox, reply, result) in answers {
        match mailbox {
            Some(mailbox) => match boxes.iter_mut().find(|(b, _)| Arc::ptr_eq(b, &mailbox)) {
                Some((_, these)) => these.push((reply, result)),
                None => boxes.push((mailbox, vec![(reply, result)])),
            },
            None => {
                let _ = reply.send(result);
            }
        }
    }
    // One lock and one wake per thread.
    for (mailbox, these) in boxes {
        mailbox.waiting.lock().unwrap_or_else(|p| p.into_inner()).extend(these);
        mailbox.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A single-threaded runtime on its own thread serving a mailbox, as a
    /// connection thread does: returns its mailbox and a handle to spawn on it.
    fn serving_thread() -> (Arc<Mailbox>, tokio::runtime::Handle, oneshot::Sender<()>) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.spawn(serve_here());
            let _ = ready_tx.send((here().expect("a mailbox here"), runtime.handle().clone()));
            let _ = runtime.block_on(stopped);
        });
        let (mailbox, handle) = ready_rx.recv().expect("thread started");
        (mailbox, handle, stop)
    }

    #[test]
    fn a_groups_answers_reach_their_tasks_with_one_wake_per_thread() {
        let (mailbox, handle, stop) = serving_thread();
        let (done, finished) = std::sync::mpsc::channel();
        let mut answers = Vec::new();
        for k in 0..100u64 {
            let (reply, rx) = oneshot::channel();
            // Each task waits on the serving thread, as a request does.
            let done = done.clone();
            handle.spawn(async move {
                let _ = done.send((k, here().is_some(), rx.await));
            });
            let result = if k == 7 { Err(WalError::Stopped) } else { Ok(k) };
            answers.push((Some(mailbox.clone()), reply, result));
        }
        // And one append made elsewhere, answered directly.
        let (reply, direct) = oneshot::channel();
        answers.push((None, reply, Ok(1000)));
        answer(answers);
        for _ in 0..100 {
            let (k, served_here, got) = finished.recv_timeout(std::time::Duration::from_secs(10)).expect("every task gets its answer");
            assert!(served_here, "task {k} ran on the serving thread");
            match got {
                Ok(Ok(seq)) => assert_eq!(seq, k),
                Ok(Err(WalError::Stopped)) => assert_eq!(k, 7),
                other => panic!("task {k}: {other:?}"),
            }
        }
        assert_eq!(direct.blocking_recv().ok().and_then(Result::ok), Some(1000));
        assert_eq!(mailbox.emptied.load(Ordering::Relaxed), 1, "one wake of the pump for the whole group");
        assert!(here().is_none(), "this test thread serves no mailbox");
        let _ = stop.send(());
    }
}
