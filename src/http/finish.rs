//! Runs an engine call to completion even if hyper drops the handler (the
//! client went away), without a task per request.
//!
//! Once a WAL record is written its fold must run, so ingest and consumes
//! used to be `tokio::spawn`ed and awaited. That cost a task per request: the
//! future moved into a task cell, scheduled (often onto the other worker, a
//! cross-thread wake-up), polled, and the handler woken again — the largest
//! single item in a consume's CPU profile (issue 24). [`Finish`] polls the call
//! inline on the connection's task instead, and only if it is dropped
//! unfinished does it hand the rest to a spawned task, which is when the spawn
//! was needed in the first place.
//!
//! The route table's handlers return one too ([`super::routes::Pending`]): the
//! box a handler's future needs anyway is the one it is finished from, so the
//! hot routes (`/v1/check`, `/v1/events`) allocate one box per request, not
//! one for the handler and another for its engine call. Handlers that write
//! nothing are [`Finish::cancellable`]: dropped with their caller.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A future that is finished by a spawned task if dropped before it is done
/// (unless made [`Finish::cancellable`]).
pub struct Finish<T: Send + 'static> {
    inner: Option<Boxed<T>>,
    detach: bool,
}

/// Wraps `fut` so it runs to completion whatever happens to its caller.
pub fn finish<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> Finish<T> {
    Finish { inner: Some(Box::pin(fut)), detach: true }
}

impl<T: Send + 'static> Finish<T> {
    /// Boxes `fut` to be dropped, unfinished, with its caller.
    pub fn cancellable(fut: impl Future<Output = T> + Send + 'static) -> Finish<T> {
        Finish { inner: Some(Box::pin(fut)), detach: false }
    }
}

impl<T: Send + 'static> Future for Finish<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `Finish` holds only a `Box`, so it is `Unpin`.
        let Some(inner) = self.inner.as_mut() else {
            // Polled again after it returned its output: nothing more comes.
            return Poll::Pending;
        };
        match inner.as_mut().poll(cx) {
            Poll::Ready(out) => {
                self.inner = None;
                Poll::Ready(out)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for Finish<T> {
    fn drop(&mut self) {
        if !self.detach {
            return;
        }
        let Some(rest) = self.inner.take() else { return };
        crate::telemetry::handler_detached();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = rest.await;
                });
            }
            // Outside a runtime (it is shutting down): as a spawned task would
            // be, the rest is dropped; the WAL replays what it holds at start.
            Err(_) => tracing::warn!("an unfinished request was dropped at shutdown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn finishes_inline_when_awaited() {
        let out = finish(async { 7 }).await;
        assert_eq!(out, 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_call_still_runs_to_the_end() {
        let done = Arc::new(AtomicUsize::new(0));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let d = done.clone();
        let call = finish(async move {
            let _ = started_tx.send(());
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        // The caller gives up after the call started (a client that went away).
        let caller = tokio::spawn(call);
        let _ = started_rx.await;
        caller.abort();
        let _ = caller.await;
        assert_eq!(done.load(Ordering::SeqCst), 0, "not finished when the caller was dropped");
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 1, "the rest ran in a task of its own");
    }

    #[tokio::test]
    async fn a_cancellable_call_is_dropped_with_its_caller() {
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        let call = Finish::cancellable(async move {
            tokio::task::yield_now().await;
            d.fetch_add(1, Ordering::SeqCst);
        });
        let caller = tokio::spawn(call);
        caller.abort();
        let _ = caller.await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_first_poll_still_runs() {
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        drop(finish(async move {
            d.fetch_add(1, Ordering::SeqCst);
        }));
        for _ in 0..100 {
            if done.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }
}
