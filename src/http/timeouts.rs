//! The edge's timeouts, so that a client that stalls holds nothing for good.
//!
//! hyper's own `header_read_timeout` runs from the moment a connection waits
//! for a request, so it would also cut idle keep-alive connections at the
//! (shorter) header timeout; meterd wants three separate clocks:
//!
//! - **header**: a request head (request line and headers) must be whole within
//!   `header_read_timeout`, counted from the accept for a new connection and
//!   from the head's first byte on a keep-alive one;
//! - **idle**: a keep-alive connection with no request under way is closed after
//!   `idle_timeout` (counted from the end of the last response);
//! - **body**: a request body must be whole within `body_read_timeout` of the
//!   moment its handler first waits for it (in practice, its head); if not,
//!   the handler answers 408 and the connection closes.
//!
//! The header and idle clocks are one [`Watchdog`] per connection: the
//! connection's [`TimedIo`] sees the first byte of a head, the edge service sees
//! a request start and its response, and the connection task waits on
//! [`Watchdog::expired`] beside hyper and drops the connection when it fires.
//! The body clock is [`DeadlineBody`], around each request body.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a connection is doing, as far as its clocks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a request head, or reading one: the header clock runs.
    Head,
    /// A request is being answered: no clock (its body has its own).
    Busy,
    /// Keep-alive, between requests: the idle clock runs.
    Idle,
}

impl Phase {
    /// The `phase` label of `meterd_http_timeouts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Head => "header",
            Phase::Busy => "busy",
            Phase::Idle => "idle",
        }
    }
}

const HEAD: u8 = 0;
const BUSY: u8 = 1;
const IDLE: u8 = 2;
/// No deadline (`deadline` while [`Phase::Busy`]).
const NEVER: u64 = u64::MAX;

/// The header and idle clocks of one connection. Everything that moves them
/// runs in the connection's own task, so plain atomics suffice.
pub struct Watchdog {
    epoch: Instant,
    header: Duration,
    idle: Duration,
    phase: AtomicU8,
    /// Nanoseconds after `epoch`, or [`NEVER`].
    deadline: AtomicU64,
}

impl Watchdog {
    /// A new connection's: the header clock runs from now.
    pub fn new(header: Duration, idle: Duration) -> Watchdog {
        let w = Watchdog { epoch: Instant::now(), header, idle, phase: AtomicU8::new(HEAD), deadline: AtomicU64::new(NEVER) };
        w.arm(HEAD, header);
        w
    }

    fn arm(&self, phase: u8, after: Duration) {
        let at = (Instant::now() + after).saturating_duration_since(self.epoch);
        self.deadline.store(u64::try_from(at.as_nanos()).unwrap_or(NEVER - 1), Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// Bytes arrived: if the connection was idle, a request head begins.
    pub fn read_some(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.arm(HEAD, self.header);
        }
    }

    /// A request head was read whole; its handler runs.
    pub fn busy(&self) {
        self.deadline.store(NEVER, Ordering::Relaxed);
        self.phase.store(BUSY, Ordering::Relaxed);
    }

    /// A response was handed to hyper; the connection idles until the next request.
    pub fn idle(&self) {
        self.arm(IDLE, self.idle);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            HEAD => Phase::Head,
            IDLE => Phase::Idle,
            _ => Phase::Busy,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self.deadline.load(Ordering::Relaxed) {
            NEVER => None,
            nanos => Some(self.epoch + Duration::from_nanos(nanos)),
        }
    }

    /// Resolves, with the phase whose clock ran out, once the current deadline
    /// passes.
    ///
    /// Nothing wakes it when a deadline moves; it checks at least every
    /// `min(header, idle)` instead. That is enough: a deadline set after a check
    /// lies at least that far after it, so no deadline passes unseen.
    pub async fn expired(&self) -> Phase {
        let period = self.header.min(self.idle);
        loop {
            let now = Instant::now();
            match self.deadline() {
                Some(at) if at <= now => return self.phase(),
                Some(at) => tokio::time::sleep_until(at.min(now + period)).await,
                None => tokio::time::sleep_until(now + period).await,
            }
        }
    }
}

/// A connection's socket, telling its [`Watchdog`] when bytes arrive.
pub struct TimedIo<T> {
    inner: T,
    watchdog: std::sync::Arc<Watchdog>,
}

impl<T> TimedIo<T> {
    pub fn new(inner: T, watchdog: std::sync::Arc<Watchdog>) -> TimedIo<T> {
        TimedIo { inner, watchdog }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watchdog.read_some();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The error a [`DeadlineBody`] ends with when its deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body did not arrive within server.body_read_timeout ({0:?})")]
pub struct BodyTimedOut(pub Duration);

/// A request body that fails with [`BodyTimedOut`] once `timeout` has passed
/// since it was first waited for, however it trickles in. (Counted from then
/// rather than from its head, which is the same instant give or take a
/// handler's checks before it reads: a body already buffered with its head
/// costs neither a clock reading nor a timer.)
pub struct DeadlineBody<B> {
    inner: B,
    timeout: Duration,
    /// Made on the first poll that has to wait.
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: bool,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, timeout: Duration) -> DeadlineBody<B> {
        DeadlineBody { inner, timeout, sleep: None, timed_out: false }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(this.time_out())));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(this.time_out())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> DeadlineBody<B> {
    fn time_out(&mut self) -> Box<dyn std::error::Error + Send + Sync> {
        self.timed_out = true;
        crate::telemetry::http_timeout("body");
        Box::new(BodyTimedOut(self.timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_runs_the_header_then_idle_clock_and_none_while_busy() {
        let w = Watchdog::new(Duration::from_secs(10), Duration::from_secs(60));
        let started = Instant::now();
        assert_eq!(w.expired().await, Phase::Head);
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        w.busy();
        let busy = tokio::time::timeout(Duration::from_secs(600), w.expired()).await;
        assert!(busy.is_err(), "no clock runs while a request is answered");

        w.idle();
        let idled = Instant::now();
        // Bytes of the next request after 30 s: the header clock starts then.
        let watch = w.expired();
        tokio::pin!(watch);
        assert!(tokio::time::timeout(Duration::from_secs(30), watch.as_mut()).await.is_err());
        w.read_some();
        assert_eq!(watch.await, Phase::Head);
        assert_eq!(idled.elapsed(), Duration::from_secs(40), "30 s idle, then 10 s for the head");

        w.idle();
        let idled = Instant::now();
        assert_eq!(w.expired().await, Phase::Idle);
        assert_eq!(idled.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_fails_at_its_deadline() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let stream = StreamBody::new(Box::pin(frames));
        let mut body = DeadlineBody::new(stream, Duration::from_secs(30));
        tokio::spawn(async move {
            // A byte every 10 s: each frame is in time, the whole body is not.
            for _ in 0..10 {
                if tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let started = Instant::now();
        let mut frames = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e,
                None => panic!("the body ended before its deadline"),
            }
        };
        assert!(err.downcast_ref::<BodyTimedOut>().is_some(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(frames, 3, "frames at 0, 10 and 20 s");
        assert!(body.frame().await.is_none(), "nothing after the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_buffered_body_needs_no_timer() {
        let mut body = DeadlineBody::new(http_body_util::Full::new(Bytes::from_static(b"{}")), Duration::from_secs(1));
        let frame = body.frame().await.and_then(|f| f.ok()).and_then(|f| f.into_data().ok());
        assert_eq!(frame, Some(Bytes::from_static(b"{}")));
        assert!(body.sleep.is_none());
    }
}
