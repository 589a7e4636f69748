//! Health of the background tasks (flusher, Redis syncer and entitlement
//! listener, Stripe reporter, raw-events export), so that `/readyz` tells the
//! truth: a registry of each task's state, and a supervisor that runs a task,
//! catches its error or panic, records it, restarts it with backoff where that
//! is safe, and stops it on the shutdown signal.
//!
//! Knows no domain type: a task is a name and a future.

use crate::backoff::backoff;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// An attempt that ran at least this many backoff intervals was healthy: a
/// failure after it starts the backoff from the beginning again.
const HEALTHY_RUN_INTERVALS: u32 = 30;
/// A critical task that failed this many times in a row is crash-looping: the
/// instance is not ready until it has run a healthy while.
const CRASH_LOOP: u32 = 3;

/// Why a supervised task ended for good other than on the shutdown signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error("background task {task} died: {reason}")]
    Died { task: &'static str, reason: String },
}

/// What a task is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// Failed `failures` times in a row (last with `error`); starts again after a backoff.
    Restarting {
        failures: u32,
        error: String,
    },
    /// Ended: on the shutdown signal, or on its own (`reason`) and not restarted.
    Stopped {
        reason: Option<String>,
    },
    /// Failed or panicked and is not restarted.
    Died {
        reason: String,
    },
}

impl Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskState::Running => f.write_str("running"),
            TaskState::Restarting { failures, error } => write!(f, "restarting after failure {failures}: {error}"),
            TaskState::Stopped { reason: None } => f.write_str("stopped"),
            TaskState::Stopped { reason: Some(r) } => write!(f, "stopped: {r}"),
            TaskState::Died { reason } => write!(f, "died: {reason}"),
        }
    }
}

/// Whether a task may be started again after it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Not safe (its state went with it): a failure is final.
    Never,
    /// Safe: again after [`backoff`] from this interval.
    Backoff(Duration),
}

impl Restart {
    /// How long an attempt must run to count as healthy (never, without restarts).
    fn healthy_run(self) -> Option<Duration> {
        match self {
            Restart::Never => None,
            Restart::Backoff(interval) => Some(interval.saturating_mul(HEALTHY_RUN_INTERVALS)),
        }
    }
}

/// A supervised task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub name: &'static str,
    /// Whether the instance is unfit for traffic without it (`/readyz` 503);
    /// otherwise its loss shows as degraded.
    pub critical: bool,
    pub restart: Restart,
}

/// What a task's future returns: `()` never fails, `Result` fails with its error.
pub trait Outcome: Send + 'static {
    fn failure(&self) -> Option<String>;
}

impl Outcome for () {
    fn failure(&self) -> Option<String> {
        None
    }
}

impl<E: Display + Send + 'static> Outcome for Result<(), E> {
    fn failure(&self) -> Option<String> {
        self.as_ref().err().map(ToString::to_string)
    }
}

struct Entry {
    task: Task,
    state: TaskState,
    /// Since when it is in `state`.
    since: Instant,
    /// Failures in a row and the last one's error, kept while it runs again.
    failures: u32,
    last_error: String,
}

impl Entry {
    /// Failed [`CRASH_LOOP`] times in a row and not yet run a healthy while since.
    fn crash_looping(&self) -> bool {
        let healthy = self.task.restart.healthy_run().is_some_and(|d| self.since.elapsed() >= d);
        self.failures >= CRASH_LOOP && !(self.state == TaskState::Running && healthy)
    }

    fn describe(&self) -> String {
        match &self.state {
            TaskState::Running if self.crash_looping() => format!(
                "background task {} running again after {} failures in a row (last: {})",
                self.task.name, self.failures, self.last_error
            ),
            state => format!("background task {} {state}", self.task.name),
        }
    }
}

/// The registry of supervised tasks and their states; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Health {
    tasks: Arc<Mutex<Vec<Entry>>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tasks().iter().map(|(n, s)| format!("{n}: {s}"))).finish()
    }
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Vec<Entry>) -> T) -> T {
        // A panic elsewhere while holding the lock leaves plain data behind.
        f(&mut self.tasks.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records `task`'s state (registering it on first use).
    pub fn set(&self, task: Task, state: TaskState) {
        crate::telemetry::task_running(task.name, state == TaskState::Running);
        self.with(|tasks| match tasks.iter_mut().find(|e| e.task.name == task.name) {
            Some(e) => {
                match &state {
                    TaskState::Restarting { failures, error } => (e.failures, e.last_error) = (*failures, error.clone()),
                    TaskState::Running => {}
                    _ => e.failures = 0,
                }
                e.state = state;
                e.since = Instant::now();
            }
            None => {
                let (failures, last_error) = match &state {
                    TaskState::Restarting { failures, error } => (*failures, error.clone()),
                    _ => (0, String::new()),
                };
                tasks.push(Entry { task, state, since: Instant::now(), failures, last_error })
            }
        });
    }

    pub fn state(&self, name: &str) -> Option<TaskState> {
        self.with(|tasks| tasks.iter().find(|e| e.task.name == name).map(|e| e.state.clone()))
    }

    /// Every task and its state, in the order they were registered.
    pub fn tasks(&self) -> Vec<(&'static str, TaskState)> {
        self.with(|tasks| tasks.iter().map(|e| (e.task.name, e.state.clone())).collect())
    }

    /// Why the instance is not ready: the critical tasks that died, stopped or
    /// crash-loop (failed 3 times in a row and not yet run a healthy while
    /// since), named with why; `None` when there is none.
    pub fn not_ready(&self) -> Option<String> {
        self.describe(unready)
    }

    /// What runs impaired without making the instance unready: tasks that are
    /// restarting, and non-critical tasks that died, stopped or crash-loop.
    pub fn degraded(&self) -> Option<String> {
        self.describe(|e| !unready(e) && (e.state != TaskState::Running || e.crash_looping()))
    }

    fn describe(&self, pick: impl Fn(&Entry) -> bool) -> Option<String> {
        let named: Vec<String> = self.with(|tasks| tasks.iter().filter(|e| pick(e)).map(Entry::describe).collect());
        (!named.is_empty()).then(|| named.join("; "))
    }
}

fn unready(e: &Entry) -> bool {
    e.task.critical && (matches!(e.state, TaskState::Died { .. } | TaskState::Stopped { .. }) || e.crash_looping())
}

/// Runs `task` until `shutdown` turns true: each attempt is `make_task(rx)`
/// spawned (so a panic is caught as a `JoinError`), given a shutdown receiver.
/// A failure, a panic, or an end before shutdown is recorded in `health`; the
/// task is started again after a backoff when [`Restart::Backoff`] and
/// `make_task` gives another attempt (it returns `None` when it cannot).
///
/// Returns the outcome of the attempt that ended on the shutdown signal (a
/// flusher's final flush error, say); `Ok(None)` when a task that is not
/// restarted ended on its own before it (recorded as stopped); the task's
/// death otherwise.
///
/// The task is registered (as running) when this is called, not when the
/// returned future is first polled, so a spawned supervisor shows at once.
pub fn supervise<O, Fut, F>(
    task: Task,
    health: Health,
    shutdown: watch::Receiver<bool>,
    make_task: F,
) -> impl Future<Output = Result<Option<O>, HealthError>>
where
    O: Outcome,
    Fut: Future<Output = O> + Send + 'static,
    F: FnMut(watch::Receiver<bool>) -> Option<Fut>,
{
    health.set(task, TaskState::Running);
    run(task, health, shutdown, make_task)
}

async fn run<O, Fut, F>(task: Task, health: Health, mut shutdown: watch::Receiver<bool>, mut make_task: F) -> Result<Option<O>, HealthError>
where
    O: Outcome,
    Fut: Future<Output = O> + Send + 'static,
    F: FnMut(watch::Receiver<bool>) -> Option<Fut>,
{
    let mut failures: u32 = 0;
    loop {
        let stopping = signalled(&shutdown);
        let mut rx = shutdown.clone();
        if stopping {
            // The attempt must see the signal that was already sent.
            rx.mark_changed();
        }
        let Some(fut) = make_task(rx) else {
            let reason = match health.state(task.name) {
                Some(TaskState::Restarting { error, .. }) => format!("{error} (cannot be restarted)"),
                _ => "could not be started".to_string(),
            };
            return died(task, &health, stopping, reason);
        };
        health.set(task, TaskState::Running);
        let started = Instant::now();
        let outcome = tokio::spawn(fut).await;
        let stopped = signalled(&shutdown);
        let mut ended = false;
        let error = match outcome {
            Ok(outcome) => match outcome.failure() {
                None if stopped => {
                    health.set(task, TaskState::Stopped { reason: None });
                    return Ok(Some(outcome));
                }
                None => {
                    ended = true;
                    "ended on its own".to_string()
                }
                Some(_) if stopped => {
                    // Its shutdown work failed: the caller reports that.
                    health.set(task, TaskState::Stopped { reason: outcome.failure() });
                    return Ok(Some(outcome));
                }
                Some(e) => e,
            },
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(e) => format!("cancelled: {e}"),
        };
        if stopped || stopping {
            return died(task, &health, true, error);
        }
        let Restart::Backoff(interval) = task.restart else {
            if ended {
                tracing::warn!(task = task.name, "background task ended before shutdown; it is not restarted");
                health.set(task, TaskState::Stopped { reason: Some(error) });
                return Ok(None);
            }
            return died(task, &health, false, error);
        };
        let healthy = task.restart.healthy_run().is_some_and(|d| started.elapsed() >= d);
        failures = if healthy { 1 } else { failures.saturating_add(1) };
        let wait = backoff(interval, failures);
        tracing::error!(task = task.name, error = %error, failures, retry_in = ?wait, "background task failed; restarting it");
        crate::telemetry::task_restart(task.name);
        health.set(task, TaskState::Restarting { failures, error });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // One last attempt, so that the task does its shutdown work.
            _ = shutdown.changed() => {}
        }
    }
}

/// The shutdown signal was sent, or its sender is gone (as the tasks take it).
fn signalled(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

fn died<O>(task: Task, health: &Health, on_shutdown: bool, reason: String) -> Result<Option<O>, HealthError> {
    if on_shutdown {
        tracing::error!(task = task.name, error = %reason, "background task failed while stopping");
    } else {
        tracing::error!(task = task.name, error = %reason, "background task died; it is not restarted");
    }
    health.set(task, TaskState::Died { reason: reason.clone() });
    Err(HealthError::Died { task: task.name, reason })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_else(|| "(no message)".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Long enough that a state lasting one backoff is seen by a 10 ms poll
    /// on a loaded machine.
    const INTERVAL: Duration = Duration::from_millis(100);

    fn task(name: &'static str, critical: bool, restart: Restart) -> Task {
        Task { name, critical, restart }
    }

    /// Waits (at most 10 s) until `name` is in a state `pred` accepts.
    async fn until(health: &Health, name: &str, pred: impl Fn(&TaskState) -> bool) -> TaskState {
        for _ in 0..1000 {
            if let Some(s) = health.state(name).filter(|s| pred(s)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} never reached the state; it is {:?}", health.state(name));
    }

    /// Runs until shutdown, counting its starts; fails its first `fail` starts.
    fn flaky(
        starts: Arc<AtomicU32>,
        fail: u32,
    ) -> impl FnMut(watch::Receiver<bool>) -> Option<futures_util::future::BoxFuture<'static, Result<(), String>>> {
        move |mut rx| {
            let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
            Some(Box::pin(async move {
                if n <= fail {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    return Err(format!("failure {n}"));
                }
                let _ = rx.changed().await;
                Ok(())
            }))
        }
    }

    #[tokio::test]
    async fn a_task_that_fails_twice_is_restarted_with_backoff_then_runs() {
        let health = Health::new();
        let (stop, rx) = watch::channel(false);
        let starts = Arc::new(AtomicU32::new(0));
        let t = task("flusher", true, Restart::Backoff(INTERVAL));
        let started = Instant::now();
        let sup = tokio::spawn(supervise(t, health.clone(), rx, flaky(starts.clone(), 2)));
        let first = until(&health, "flusher", |s| matches!(s, TaskState::Restarting { .. })).await;
        assert_eq!(first, TaskState::Restarting { failures: 1, error: "failure 1".into() });
        assert!(health.not_ready().is_none(), "restarting is not unready");
        assert!(health.degraded().is_some_and(|d| d.contains("flusher restarting after failure 1")), "{:?}", health.degraded());
        until(&health, "flusher", |s| matches!(s, TaskState::Restarting { failures: 2, .. })).await;
        until(&health, "flusher", |s| *s == TaskState::Running).await;
        // Two backoffs: at least 0.75 × (2 + 4) intervals.
        assert!(started.elapsed() >= INTERVAL.mul_f64(4.5), "{:?}", started.elapsed());
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert_eq!((health.not_ready(), health.degraded()), (None, None));
        let _ = stop.send(true);
        let outcome = sup.await.map_err(|e| e.to_string());
        assert_eq!(outcome, Ok(Ok(Some(Ok(())))));
        assert_eq!(health.state("flusher"), Some(TaskState::Stopped { reason: None }));
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_crash_looping_critical_task_is_unready_until_it_has_run_a_healthy_while() {
        let health = Health::new();
        let (stop, rx) = watch::channel(false);
        let interval = Duration::from_millis(50);
        let t = task("syncer", true, Restart::Backoff(interval));
        let starts = Arc::new(AtomicU32::new(0));
        let sup = tokio::spawn(supervise(t, health.clone(), rx, flaky(starts.clone(), 4)));
        until(&health, "syncer", |s| matches!(s, TaskState::Restarting { failures: 2, .. })).await;
        assert_eq!(health.not_ready(), None, "two failures: restarting, degraded");
        until(&health, "syncer", |s| matches!(s, TaskState::Restarting { failures: 3, .. })).await;
        assert_eq!(health.not_ready(), Some("background task syncer restarting after failure 3: failure 3".into()));
        until(&health, "syncer", |s| *s == TaskState::Running && starts.load(Ordering::SeqCst) == 5).await;
        let running = Instant::now();
        assert_eq!(
            health.not_ready(),
            Some("background task syncer running again after 4 failures in a row (last: failure 4)".into()),
            "not yet a healthy while"
        );
        // Healthy after 30 intervals of running.
        while health.not_ready().is_some() {
            assert!(running.elapsed() < Duration::from_secs(10), "{:?}", health.not_ready());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(running.elapsed() >= interval * 29, "{:?}", running.elapsed());
        assert_eq!(health.degraded(), None);
        let _ = stop.send(true);
        assert!(matches!(sup.await, Ok(Ok(Some(Ok(()))))));
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_a_task_that_cannot_restart_makes_the_instance_unready() {
        let health = Health::new();
        let (_stop, rx) = watch::channel(false);
        let mut once = Some(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if true {
                panic!("boom at flush");
            }
        });
        let t = task("reporter", true, Restart::Backoff(INTERVAL));
        let outcome = supervise(t, health.clone(), rx, move |_| once.take()).await;
        let reason = "panicked: boom at flush (cannot be restarted)".to_string();
        assert_eq!(outcome, Err(HealthError::Died { task: "reporter", reason: reason.clone() }));
        assert_eq!(health.state("reporter"), Some(TaskState::Died { reason: reason.clone() }));
        assert_eq!(health.not_ready(), Some(format!("background task reporter died: {reason}")));
    }

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_its_restarts_counted_in_its_state() {
        let health = Health::new();
        let (stop, rx) = watch::channel(false);
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        let make = move |mut rx: watch::Receiver<bool>| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            Some(async move {
                if n == 1 {
                    panic!("first start panics");
                }
                let _ = rx.changed().await;
            })
        };
        let sup = tokio::spawn(supervise(task("syncer", true, Restart::Backoff(INTERVAL)), health.clone(), rx, make));
        let s = until(&health, "syncer", |s| matches!(s, TaskState::Restarting { .. })).await;
        assert_eq!(s, TaskState::Restarting { failures: 1, error: "panicked: first start panics".into() });
        until(&health, "syncer", |s| *s == TaskState::Running).await;
        let _ = stop.send(true);
        assert!(matches!(sup.await, Ok(Ok(Some(())))));
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_non_critical_death_degrades_without_making_unready() {
        let health = Health::new();
        let (_stop, rx) = watch::channel(false);
        let t = task("raw_export", false, Restart::Never);
        let outcome = supervise(t, health.clone(), rx, |_| Some(async { Err::<(), _>("table gone") })).await;
        assert_eq!(outcome.err(), Some(HealthError::Died { task: "raw_export", reason: "table gone".into() }));
        assert_eq!(health.not_ready(), None);
        assert_eq!(health.degraded(), Some("background task raw_export died: table gone".into()));
        // A task that ends before shutdown, not restartable: stopped, and said.
        let (_stop, rx) = watch::channel(false);
        let t = task("reporter", true, Restart::Never);
        assert!(matches!(supervise(t, health.clone(), rx, |_| Some(async {})).await, Ok(None)));
        assert_eq!(health.not_ready(), Some("background task reporter stopped: ended on its own".into()));
    }

    #[tokio::test]
    async fn shutdown_stops_a_running_task_and_one_waiting_to_restart_gets_its_last_run() {
        let health = Health::new();
        let (stop, rx) = watch::channel(false);
        let starts = Arc::new(AtomicU32::new(0));
        // Fails at once, then the backoff is long: shutdown comes during it.
        let t = task("flusher", true, Restart::Backoff(Duration::from_secs(30)));
        let sup = tokio::spawn(supervise(t, health.clone(), rx, flaky(starts.clone(), 1)));
        until(&health, "flusher", |s| matches!(s, TaskState::Restarting { .. })).await;
        let started = Instant::now();
        let _ = stop.send(true);
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), sup).await.map_err(|_| "not stopped").and_then(|j| j.map_err(|_| "join"));
        assert_eq!(outcome, Ok(Ok(Some(Ok(())))), "the last run saw the signal and ended cleanly");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(starts.load(Ordering::SeqCst), 2, "one last run for its shutdown work");
        assert_eq!(health.state("flusher"), Some(TaskState::Stopped { reason: None }));

        // A task stopping with a failed shutdown step hands the failure back.
        let (stop, rx) = watch::channel(false);
        let make = |mut rx: watch::Receiver<bool>| {
            Some(async move {
                let _ = rx.changed().await;
                Err::<(), _>("final flush failed")
            })
        };
        let sup = tokio::spawn(supervise(task("flusher2", true, Restart::Backoff(INTERVAL)), health.clone(), rx, make));
        until(&health, "flusher2", |s| *s == TaskState::Running).await;
        let _ = stop.send(true);
        let outcome = sup.await.map_err(|e| e.to_string());
        assert_eq!(outcome, Ok(Ok(Some(Err("final flush failed")))));
        // A dropped sender is a shutdown too.
        let (stop, rx) = watch::channel(false);
        let sup = tokio::spawn(supervise(task("listener", true, Restart::Backoff(INTERVAL)), health.clone(), rx, flaky(Arc::default(), 0)));
        until(&health, "listener", |s| *s == TaskState::Running).await;
        drop(stop);
        assert!(matches!(tokio::time::timeout(Duration::from_secs(5), sup).await, Ok(Ok(Ok(Some(Ok(())))))));
    }
}
