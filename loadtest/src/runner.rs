//! Drives the workers: closed loop (each connection sends its next request as
//! soon as the previous answer arrives: maximum throughput) or open loop (a
//! pacer thread issues requests at a fixed rate, and latency is measured from
//! each request's *intended* send time, so a stalled server is charged for the
//! requests it kept waiting: coordinated-omission correction). Warm-up
//! requests are sent but not measured; a progress line is printed meanwhile.

use crate::stats::{histogram, record};
use crate::target::{Client, Prepared, TargetError};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed,
    /// Requests per second over all connections.
    Open {
        rate: f64,
    },
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub mode: Mode,
    /// Print a progress line to stderr this often (None: quiet).
    pub progress: Option<Duration>,
    /// A server process whose CPU time over the measured window is reported.
    pub server_pid: Option<u32>,
}

/// Width of a [`Bucket`] of the timeline.
pub const TIMELINE_BUCKET: Duration = Duration::from_millis(50);

/// The requests of one [`TIMELINE_BUCKET`] of the measured window, by when
/// they were due (open loop) or sent (closed loop): where in the run the slow
/// ones were, which a whole run's percentiles do not say.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub requests: u64,
    pub sum_us: u64,
    pub max_us: u64,
    /// Requests slower than 2 ms.
    pub over_2ms: u64,
}

impl Bucket {
    fn add(&mut self, latency: Duration) {
        let us = latency.as_micros() as u64;
        self.requests += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
        self.over_2ms += u64::from(us > 2_000);
    }

    fn merge(&mut self, other: &Bucket) {
        self.requests += other.requests;
        self.sum_us += other.sum_us;
        self.max_us = self.max_us.max(other.max_us);
        self.over_2ms += other.over_2ms;
    }
}

/// What the measured window saw.
#[derive(Debug)]
pub struct Measured {
    pub requests: u64,
    pub events: u64,
    pub errors: u64,
    pub unsent: u64,
    pub seconds: f64,
    pub histogram: Histogram<u64>,
    pub max_pacer_lag: Option<Duration>,
    pub first_error: Option<String>,
    /// CPU seconds `server_pid` used during the measured window.
    pub server_cpu_seconds: Option<f64>,
    /// The window in [`TIMELINE_BUCKET`]s.
    pub timeline: Vec<Bucket>,
}

/// The open-loop schedule: request `k` is due at `start + k / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    pub interval: Duration,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64) -> Schedule {
        Schedule { start, interval: Duration::from_secs_f64(1.0 / rate.max(1e-9)) }
    }

    pub fn due(&self, k: u64) -> Instant {
        self.start + self.interval.mul_f64(k as f64)
    }
}

/// Coordinated-omission-corrected latency: from when the request should have
/// been sent (not when a busy connection got round to sending it) to its answer.
pub fn corrected_latency(intended: Instant, completed: Instant) -> Duration {
    completed.saturating_duration_since(intended)
}

/// The window a run measures.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }

    /// The timeline bucket of `t` (in the window).
    fn bucket(&self, t: Instant) -> usize {
        (t.saturating_duration_since(self.from).as_micros() / TIMELINE_BUCKET.as_micros()) as usize
    }

    fn buckets(&self) -> usize {
        self.bucket(self.to) + 1
    }
}

/// Per-worker tallies, merged at the end.
struct Tally {
    requests: u64,
    events: u64,
    errors: u64,
    unsent: u64,
    histogram: Histogram<u64>,
    first_error: Option<String>,
    timeline: Vec<Bucket>,
}

impl Tally {
    fn new(window: &Window) -> Tally {
        Tally {
            requests: 0,
            events: 0,
            errors: 0,
            unsent: 0,
            histogram: histogram(),
            first_error: None,
            timeline: vec![Bucket::default(); window.buckets()],
        }
    }

    /// A measured request due (or sent) at `at`.
    fn latency(&mut self, window: &Window, at: Instant, latency: Duration) {
        record(&mut self.histogram, latency.as_nanos() as u64);
        if let Some(b) = self.timeline.get_mut(window.bucket(at)) {
            b.add(latency);
        }
    }
}

/// Live counters for the progress line (all requests, warm-up included).
#[derive(Default)]
struct Live {
    requests: AtomicU64,
    events: AtomicU64,
    errors: AtomicU64,
}

/// Runs one measurement: connects every worker first, then warm-up, then the
/// measured window. `events_of[i]` is how many events request `i` carries.
pub async fn run(prepared: Arc<Prepared>, events_of: Arc<Vec<u64>>, config: &RunConfig) -> Result<Measured, TargetError> {
    let connections = config.connections.max(1);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(prepared.connect().await?);
    }
    let pool = prepared.len().max(1);
    let start = Instant::now();
    let window = Window { from: start + config.warmup, to: start + config.warmup + config.duration };
    let live = Arc::new(Live::default());

    let progress = config.progress.map(|every| {
        let live = live.clone();
        let events_of_run = window;
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64, 0u64);
            loop {
                tokio::time::sleep(every).await;
                let now = Instant::now();
                let (r, e) = (live.requests.load(Ordering::Relaxed), live.events.load(Ordering::Relaxed));
                let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
                let phase = if now < events_of_run.from { "warm-up" } else { "measuring" };
                eprintln!(
                    "[{:6.1}s] {phase:<9} {:>10.0} req/s {:>12.0} events/s  errors {}",
                    now.duration_since(start).as_secs_f64(),
                    (r - last.1) as f64 / dt,
                    (e - last.2) as f64 / dt,
                    live.errors.load(Ordering::Relaxed)
                );
                last = (now, r, e);
            }
        })
    });

    // The server's CPU time at the window's start and end.
    let server_cpu = config.server_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(window.from.into()).await;
            let before = crate::procstat::cpu_seconds(pid);
            tokio::time::sleep_until(window.to.into()).await;
            let after = crate::procstat::cpu_seconds(pid);
            before.zip(after).map(|(b, a)| a - b)
        })
    });

    let mut tasks = Vec::with_capacity(connections);
    let mut pacer = None;
    match config.mode {
        Mode::Closed => {
            for (w, client) in clients.into_iter().enumerate() {
                let (live, events_of) = (live.clone(), events_of.clone());
                tasks.push(tokio::spawn(closed_worker(w, client, pool, events_of, window, live)));
            }
        }
        Mode::Open { rate } => {
            let mut senders = Vec::with_capacity(connections);
            // Requests still queued this long after the window are given up (and counted).
            let hard_stop = window.to + config.duration.max(Duration::from_secs(1));
            for (w, client) in clients.into_iter().enumerate() {
                let (tx, rx) = mpsc::unbounded_channel();
                senders.push(tx);
                let (live, events_of) = (live.clone(), events_of.clone());
                tasks.push(tokio::spawn(open_worker(w, client, pool, events_of, window, hard_stop, rx, live)));
            }
            let schedule = Schedule::new(start, rate);
            pacer = Some(std::thread::spawn(move || pace(schedule, window.to, senders)));
        }
    }

    let mut total = Tally::new(&window);
    for t in tasks {
        let Ok(tally) = t.await else { continue };
        total.requests += tally.requests;
        total.events += tally.events;
        total.errors += tally.errors;
        total.unsent += tally.unsent;
        let _ = total.histogram.add(&tally.histogram);
        for (b, t) in total.timeline.iter_mut().zip(&tally.timeline) {
            b.merge(t);
        }
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let max_pacer_lag = pacer.and_then(|p| p.join().ok());
    let server_cpu_seconds = match server_cpu {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    Ok(Measured {
        requests: total.requests,
        events: total.events,
        errors: total.errors,
        unsent: total.unsent,
        seconds: config.duration.as_secs_f64(),
        histogram: total.histogram,
        max_pacer_lag,
        first_error: total.first_error,
        server_cpu_seconds,
        timeline: total.timeline,
    })
}

/// Ids are unique per (worker, sequence).
fn unique(worker: usize, seq: u64) -> u64 {
    ((worker as u64) << 48) | (seq & 0xffff_ffff_ffff)
}

/// A connection's requests cycle through the pool from a worker-specific offset.
fn first_index(worker: usize, pool: usize) -> usize {
    (worker.wrapping_mul(7919)) % pool
}

async fn closed_worker(w: usize, mut client: Client, pool: usize, events_of: Arc<Vec<u64>>, window: Window, live: Arc<Live>) -> Tally {
    let mut tally = Tally::new(&window);
    let mut index = first_index(w, pool);
    let mut seq = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= window.to {
            break;
        }
        let result = client.execute(index, unique(w, seq)).await;
        let done = Instant::now();
        let events = events_of.get(index).copied().unwrap_or(0);
        let measured = window.contains(done).then_some((&window, sent));
        account(&mut tally, &live, result, events, measured, done - sent).await;
        seq += 1;
        index = (index + 1) % pool;
    }
    tally
}

#[allow(clippy::too_many_arguments)]
async fn open_worker(
    w: usize,
    mut client: Client,
    pool: usize,
    events_of: Arc<Vec<u64>>,
    window: Window,
    hard_stop: Instant,
    mut rx: mpsc::UnboundedReceiver<Instant>,
    live: Arc<Live>,
) -> Tally {
    let mut tally = Tally::new(&window);
    let mut index = first_index(w, pool);
    let mut seq = 0u64;
    while let Some(intended) = rx.recv().await {
        if Instant::now() >= hard_stop {
            // Give up on this and every queued request; each has waited at least this long.
            let now = Instant::now();
            let mut left = vec![intended];
            while let Ok(t) = rx.try_recv() {
                left.push(t);
            }
            for t in left.into_iter().filter(|t| window.contains(*t)) {
                tally.unsent += 1;
                tally.latency(&window, t, corrected_latency(t, now));
            }
            break;
        }
        let result = client.execute(index, unique(w, seq)).await;
        let done = Instant::now();
        let events = events_of.get(index).copied().unwrap_or(0);
        let measured = window.contains(intended).then_some((&window, intended));
        account(&mut tally, &live, result, events, measured, corrected_latency(intended, done)).await;
        seq += 1;
        index = (index + 1) % pool;
    }
    tally
}

/// Counts a request's outcome; `measured`: in the window, with the time its
/// timeline bucket is by.
async fn account(
    tally: &mut Tally,
    live: &Live,
    result: Result<(), TargetError>,
    events: u64,
    measured: Option<(&Window, Instant)>,
    latency: Duration,
) {
    match result {
        Ok(()) => {
            live.requests.fetch_add(1, Ordering::Relaxed);
            live.events.fetch_add(events, Ordering::Relaxed);
            if let Some((window, at)) = measured {
                tally.requests += 1;
                tally.events += events;
                tally.latency(window, at, latency);
            }
        }
        Err(e) => {
            live.errors.fetch_add(1, Ordering::Relaxed);
            if measured.is_some() {
                tally.errors += 1;
            }
            if tally.first_error.is_none() {
                tally.first_error = Some(e.to_string());
            }
            // Don't spin on a refusing server.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The pacer thread: hands request `k` to worker `k % n` at its due time until
/// `end`; returns how far it fell behind its schedule at worst.
fn pace(schedule: Schedule, end: Instant, senders: Vec<mpsc::UnboundedSender<Instant>>) -> Duration {
    let n = senders.len() as u64;
    let mut k = 0u64;
    let mut max_lag = Duration::ZERO;
    loop {
        let now = Instant::now();
        loop {
            let due = schedule.due(k);
            if due >= end {
                return max_lag;
            }
            if due > now {
                break;
            }
            max_lag = max_lag.max(now - due);
            if senders[(k % n) as usize].send(due).is_err() {
                return max_lag;
            }
            k += 1;
        }
        let wait = schedule.due(k).saturating_duration_since(Instant::now());
        std::thread::sleep(wait.min(Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spaces_requests_by_the_rate() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 20_000.0);
        assert_eq!(s.due(0), t0);
        assert_eq!(s.due(20_000) - t0, Duration::from_secs(1));
        assert_eq!(s.due(1) - t0, Duration::from_micros(50));
    }

    #[test]
    fn the_timeline_files_each_request_by_its_due_time() {
        let from = Instant::now();
        let window = Window { from, to: from + Duration::from_millis(200) };
        let mut tally = Tally::new(&window);
        assert_eq!(tally.timeline.len(), 5, "four whole buckets and the edge");
        tally.latency(&window, from + Duration::from_millis(10), Duration::from_micros(300));
        tally.latency(&window, from + Duration::from_millis(60), Duration::from_millis(5));
        tally.latency(&window, from + Duration::from_millis(99), Duration::from_micros(700));
        let b = &tally.timeline;
        assert_eq!(b[0], Bucket { requests: 1, sum_us: 300, max_us: 300, over_2ms: 0 });
        assert_eq!(b[1], Bucket { requests: 2, sum_us: 5_700, max_us: 5_000, over_2ms: 1 });
        assert_eq!(b[2], Bucket::default());
        assert_eq!(tally.histogram.len(), 3, "and the run's histogram");
    }

    #[test]
    fn latency_counts_from_the_intended_send_time() {
        // A request due at t0 that a stalled connection only sent at t0+90 ms and
        // that was answered 1 ms later waited 91 ms, not 1 ms.
        let t0 = Instant::now();
        let sent = t0 + Duration::from_millis(90);
        let done = sent + Duration::from_millis(1);
        assert_eq!(corrected_latency(t0, done), Duration::from_millis(91));
        // Never negative.
        assert_eq!(corrected_latency(done, t0), Duration::ZERO);
    }

    #[test]
    fn pacer_issues_rate_times_duration_requests_in_order() {
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let start = Instant::now();
        let s = Schedule::new(start, 2000.0);
        pace(s, start + Duration::from_millis(100), vec![tx1, tx2]);
        let mut a = Vec::new();
        while let Ok(t) = rx1.try_recv() {
            a.push(t);
        }
        let mut b = Vec::new();
        while let Ok(t) = rx2.try_recv() {
            b.push(t);
        }
        assert_eq!(a.len() + b.len(), 200);
        assert_eq!(a.len(), b.len());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a[1] - a[0], Duration::from_millis(1));
    }

    #[test]
    fn unique_ids_differ_by_worker_and_sequence() {
        assert_ne!(unique(1, 0), unique(0, 1));
        assert_eq!(unique(0, 5), 5);
        assert_eq!(unique(2, 0) >> 48, 2);
    }
}
