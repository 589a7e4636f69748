//! The soak (issue 15, point 5): hours of traffic compressed into minutes, to
//! show that meterd's memory stays flat when customers churn and the dedupe
//! window keeps sliding, and that dedupe stays exact meanwhile.
//!
//! Each worker sends batches of events on its own keep-alive connection. An
//! event is either new (a fresh id) or a retry of an id the worker sent and saw
//! acknowledged earlier (same id, customer, quantity and `timestamp`), picked
//! at random among those still inside the dedupe window minus a margin, so
//! retries of old ids are mixed in. Every answer is checked exactly: the
//! `accepted` count must equal the batch's new ids and `duplicates` its retries.
//! Customers churn: a slice of `active` customers slides over `customers` names
//! once per `lap`, so every customer goes idle (its windows end) and, from the
//! second lap, comes back. Every `sample_every` the server's RSS and open fds
//! (from `/proc`), the p99 of the interval and the counts so far go to a CSV.

use crate::rng::Rng;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a soak does.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakConfig {
    pub addr: SocketAddr,
    /// Whose RSS and fds to sample (the server's; in-process tests pass their own).
    pub server_pid: Option<u32>,
    pub duration: Duration,
    pub connections: usize,
    /// Events per request.
    pub batch: usize,
    /// Distinct customer names over the run.
    pub customers: u64,
    /// Customers active at any moment (the sliding slice).
    pub active: u64,
    /// Time for the slice to slide over every customer once.
    pub lap: Duration,
    /// Share of events that are retries of acknowledged ids, in percent.
    pub retry_percent: u32,
    /// The server's `ingest.dedupe_window`; retries stay `retry_margin` inside it.
    pub dedupe_window: Duration,
    pub retry_margin: Duration,
    /// Requests per second over all workers (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    pub sample_every: Duration,
    pub csv: Option<PathBuf>,
    pub meter: String,
    pub seed: u64,
    pub quiet: bool,
}

impl SoakConfig {
    /// The defaults of `meterd-loadtest soak`: 20 minutes, a million customers.
    pub fn new(addr: SocketAddr) -> SoakConfig {
        SoakConfig {
            addr,
            server_pid: None,
            duration: Duration::from_secs(20 * 60),
            connections: 8,
            batch: 100,
            customers: 1_000_000,
            active: 20_000,
            lap: Duration::from_secs(8 * 60),
            retry_percent: 5,
            dedupe_window: Duration::from_secs(120),
            retry_margin: Duration::from_secs(20),
            rate: None,
            sample_every: Duration::from_secs(10),
            csv: None,
            meter: "tokens".into(),
            seed: 1,
            quiet: false,
        }
    }
}

/// One row of the CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub rss_bytes: u64,
    pub fds: u64,
    pub p99_us: u64,
    pub requests: u64,
    pub events_per_s: f64,
    pub accepted: u64,
    pub duplicates: u64,
    pub errors: u64,
}

pub const CSV_HEADER: &str = "t_s,rss_mb,open_fds,p99_ms,requests,events_per_s,accepted,duplicates,errors";

impl Sample {
    pub fn csv_row(&self) -> String {
        format!(
            "{:.1},{:.1},{},{:.3},{},{:.0},{},{},{}",
            self.t_s,
            self.rss_bytes as f64 / 1_048_576.0,
            self.fds,
            self.p99_us as f64 / 1000.0,
            self.requests,
            self.events_per_s,
            self.accepted,
            self.duplicates,
            self.errors
        )
    }
}

/// What a soak saw. `wrong` counts answers whose counts differ from what the
/// batch holds: a duplicate accepted or a new id refused.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub requests: u64,
    pub sent_new: u64,
    pub sent_retries: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub wrong: u64,
    pub errors: u64,
    /// Sum of the quantities of every accepted new id: the server's total must equal it.
    pub expected_total: u64,
    pub first_problem: Option<String>,
    pub samples: Vec<Sample>,
}

/// The running tallies the workers share.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    sent_new: AtomicU64,
    sent_retries: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    wrong: AtomicU64,
    errors: AtomicU64,
    expected_total: AtomicU64,
    first_problem: Mutex<Option<String>>,
    /// Latencies since the last sample, in µs.
    latency: Mutex<Option<Histogram<u64>>>,
}

impl Tally {
    fn problem(&self, what: String) {
        let mut first = self.first_problem.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(what);
    }

    fn record(&self, micros: u64) {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = h.as_mut() {
            h.saturating_record(micros.max(1));
        }
    }

    /// The p99 of the latencies since the last call, and resets them.
    fn take_p99(&self) -> u64 {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        match h.as_mut() {
            Some(h) => {
                let p99 = if h.is_empty() { 0 } else { h.value_at_quantile(0.99) };
                h.reset();
                p99
            }
            None => 0,
        }
    }
}

/// An event a worker sent and saw acknowledged, kept to be retried.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    customer: u64,
    quantity: u64,
    ts_ms: i64,
}

/// A soak failure before any request could be judged.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("writing the CSV: {0}")]
    Csv(std::io::Error),
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Resident set size of `pid` in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The customer index for an event at `elapsed` into the run: a slice of
/// `active` customers starting where the lap has got to.
pub fn churned_customer(rng: &mut Rng, elapsed: Duration, cfg: &SoakConfig) -> u64 {
    let lap = cfg.lap.as_millis().max(1);
    let base = ((elapsed.as_millis() % lap) * u128::from(cfg.customers) / lap) as u64;
    (base + rng.below(cfg.active.max(1))) % cfg.customers.max(1)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, SoakError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| SoakError::Connect(addr, e))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(SoakError::Handshake)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn render(events: &[(&Sent, bool)], meter: &str) -> String {
    let items: Vec<serde_json::Value> = events
        .iter()
        .map(|(e, _)| {
            serde_json::json!({"id": e.id, "customer": format!("c{}", e.customer), "meter": meter, "quantity": e.quantity, "timestamp": e.ts_ms})
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

async fn worker(w: usize, cfg: Arc<SoakConfig>, tally: Arc<Tally>, start: Instant, nonce: u32) -> Result<(), SoakError> {
    let mut sender = connect(cfg.addr).await?;
    let mut rng = Rng::new(cfg.seed.wrapping_mul(1_000_003).wrapping_add(w as u64));
    let mut acked: VecDeque<(Instant, Sent)> = VecDeque::new();
    // At most this many acknowledged ids are kept per worker for retries.
    const KEEP: usize = 100_000;
    let horizon = cfg.dedupe_window.saturating_sub(cfg.retry_margin);
    let per_worker_interval = cfg.rate.map(|r| Duration::from_secs_f64(cfg.connections as f64 / r.max(1e-3)));
    let mut seq: u64 = 0;
    let mut next_send = Instant::now();
    while start.elapsed() < cfg.duration {
        if let Some(every) = per_worker_interval {
            next_send += every;
            let now = Instant::now();
            if next_send > now {
                tokio::time::sleep(next_send - now).await;
            } else if now - next_send > every * 10 {
                next_send = now;
            }
        }
        while acked.front().is_some_and(|(at, _)| at.elapsed() > horizon) {
            acked.pop_front();
        }
        let mut fresh = Vec::with_capacity(cfg.batch);
        let mut retries: Vec<Sent> = Vec::new();
        let mut picked = std::collections::HashSet::new();
        let ts = now_ms();
        for _ in 0..cfg.batch {
            let retry = !acked.is_empty() && rng.below(100) < u64::from(cfg.retry_percent);
            if retry {
                let i = rng.below(acked.len() as u64) as usize;
                if picked.insert(i) {
                    retries.push(acked[i].1.clone());
                    continue;
                }
            }
            seq += 1;
            fresh.push(Sent {
                id: format!("{nonce:08x}-{w:x}-{seq:x}"),
                customer: churned_customer(&mut rng, start.elapsed(), &cfg),
                quantity: rng.below(5) + 1,
                ts_ms: ts,
            });
        }
        let mut events: Vec<(&Sent, bool)> = fresh.iter().map(|e| (e, true)).collect();
        events.extend(retries.iter().map(|e| (e, false)));
        let body = render(&events, &cfg.meter);
        let request = Request::post("/v1/events")
            .header("content-type", "application/json")
            .header("host", "meterd")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else { continue };
        if sender.ready().await.is_err() {
            sender = connect(cfg.addr).await?;
        }
        let sent_at = Instant::now();
        let answer = async {
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>((status, body))
        }
        .await;
        tally.record(sent_at.elapsed().as_micros() as u64);
        tally.requests.fetch_add(1, Ordering::Relaxed);
        tally.sent_new.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        tally.sent_retries.fetch_add(retries.len() as u64, Ordering::Relaxed);
        match answer {
            Ok((StatusCode::ACCEPTED, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let (accepted, duplicates) = (v["accepted"].as_u64(), v["duplicates"].as_u64());
                tally.accepted.fetch_add(accepted.unwrap_or(0), Ordering::Relaxed);
                tally.duplicates.fetch_add(duplicates.unwrap_or(0), Ordering::Relaxed);
                if accepted != Some(fresh.len() as u64) || duplicates != Some(retries.len() as u64) {
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                    tally.problem(format!(
                        "sent {} new and {} retries, got {}",
                        fresh.len(),
                        retries.len(),
                        String::from_utf8_lossy(&body)
                    ));
                    // The server's word is unknown per id: keep none of them for retries.
                    continue;
                }
                tally.expected_total.fetch_add(fresh.iter().map(|e| e.quantity).sum(), Ordering::Relaxed);
                let at = Instant::now();
                for e in fresh {
                    if acked.len() >= KEEP {
                        // Keep a spread of ages: replace a random one.
                        let i = rng.below(acked.len() as u64) as usize;
                        acked[i].1 = e;
                    } else {
                        acked.push_back((at, e));
                    }
                }
            }
            Ok((status, body)) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                tally.problem(format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            Err(e) => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
                tally.problem(format!("request failed: {e}"));
                sender = connect(cfg.addr).await?;
            }
        }
    }
    Ok(())
}

/// Runs the soak and returns what it saw (the CSV, if asked, is written as it goes).
pub async fn run(cfg: SoakConfig) -> Result<SoakReport, SoakError> {
    let cfg = Arc::new(cfg);
    let tally = Arc::new(Tally { latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).ok()), ..Tally::default() });
    let mut csv = match &cfg.csv {
        Some(path) => {
            let mut f = std::fs::File::create(path).map_err(SoakError::Csv)?;
            writeln!(f, "{CSV_HEADER}").map_err(SoakError::Csv)?;
            Some(f)
        }
        None => None,
    };
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u32).unwrap_or(0);
    let start = Instant::now();
    let workers: Vec<_> = (0..cfg.connections.max(1)).map(|w| tokio::spawn(worker(w, cfg.clone(), tally.clone(), start, nonce))).collect();
    let mut samples = Vec::new();
    let (mut last_accepted, mut last_dups, mut last_t) = (0u64, 0u64, 0.0f64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + cfg.sample_every, cfg.sample_every);
    loop {
        let finished = workers.iter().all(|w| w.is_finished());
        if finished {
            break;
        }
        tick.tick().await;
        let t_s = start.elapsed().as_secs_f64();
        let (accepted, duplicates) = (tally.accepted.load(Ordering::Relaxed), tally.duplicates.load(Ordering::Relaxed));
        let sample = Sample {
            t_s,
            rss_bytes: cfg.server_pid.and_then(rss_bytes).unwrap_or(0),
            fds: cfg.server_pid.and_then(open_fds).unwrap_or(0),
            p99_us: tally.take_p99(),
            requests: tally.requests.load(Ordering::Relaxed),
            events_per_s: ((accepted + duplicates) - (last_accepted + last_dups)) as f64 / (t_s - last_t).max(1e-3),
            accepted,
            duplicates,
            errors: tally.errors.load(Ordering::Relaxed) + tally.wrong.load(Ordering::Relaxed),
        };
        (last_accepted, last_dups, last_t) = (accepted, duplicates, t_s);
        if let Some(f) = csv.as_mut() {
            writeln!(f, "{}", sample.csv_row()).map_err(SoakError::Csv)?;
            f.flush().map_err(SoakError::Csv)?;
        }
        if !cfg.quiet {
            eprintln!("{}", sample.csv_row());
        }
        samples.push(sample);
    }
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => tally.problem(format!("worker failed: {e}")),
        }
    }
    let first_problem = tally.first_problem.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(SoakReport {
        requests: tally.requests.load(Ordering::Relaxed),
        sent_new: tally.sent_new.load(Ordering::Relaxed),
        sent_retries: tally.sent_retries.load(Ordering::Relaxed),
        accepted: tally.accepted.load(Ordering::Relaxed),
        duplicates: tally.duplicates.load(Ordering::Relaxed),
        wrong: tally.wrong.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        expected_total: tally.expected_total.load(Ordering::Relaxed),
        first_problem,
        samples,
    })
}

/// The server's total of `meter` for customers `c0` … `c{customers-1}` over
/// the two days either side of now (`GET /v1/usage?customer=`, unflushed usage
/// included; one query per customer, as an answer without `customer` is cut at
/// 10,000 points): what the soak's [`SoakReport::expected_total`] must equal on
/// a server that started empty.
pub async fn server_total(addr: SocketAddr, meter: &str, customers: u64) -> Result<u64, String> {
    let now = chrono::Utc::now();
    let from = (now - chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let to = (now + chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z");
    let mut sender = connect(addr).await.map_err(|e| e.to_string())?;
    let mut total = 0;
    for c in 0..customers {
        sender.ready().await.map_err(|e| e.to_string())?;
        let request = Request::get(format!("/v1/usage?meter={meter}&from={from}&to={to}&granularity=day&customer=c{c}"))
            .header("host", "meterd")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status != StatusCode::OK {
            return Err(format!("c{c}: {status}: {}", String::from_utf8_lossy(&body)));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let data = v["data"].as_array().ok_or_else(|| format!("no data in {v}"))?;
        total += data.iter().filter_map(|p| p["value"].as_u64()).sum::<u64>();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_slides_over_every_customer_once_per_lap() {
        let mut cfg = SoakConfig::new(SocketAddr::from(([127, 0, 0, 1], 1)));
        cfg.customers = 1000;
        cfg.active = 10;
        cfg.lap = Duration::from_secs(100);
        let mut rng = Rng::new(3);
        let mut seen = std::collections::HashSet::new();
        for s in 0..1000 {
            let at = Duration::from_millis(s * 100);
            let c = churned_customer(&mut rng, at, &cfg);
            // 100 ms of a 100 s lap moves the slice by one customer.
            let base = s;
            assert!((c + 1000 - base % 1000) % 1000 < 10, "at {at:?}: {c}");
            seen.insert(c);
        }
        // Each customer is in the slice for 10 of the 1000 steps: ~65 % are drawn.
        assert!(seen.len() > 550, "{}", seen.len());
        // The second lap comes back to the first customers.
        let c = churned_customer(&mut rng, Duration::from_secs(100), &cfg);
        assert!(c < 10);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).is_some_and(|b| b > 0));
        assert!(open_fds(pid).is_some_and(|n| n > 0));
    }

    #[test]
    fn a_sample_is_one_csv_row_matching_the_header() {
        let s = Sample {
            t_s: 10.0,
            rss_bytes: 2 * 1_048_576,
            fds: 12,
            p99_us: 1500,
            requests: 3,
            events_per_s: 99.6,
            accepted: 5,
            duplicates: 1,
            errors: 0,
        };
        assert_eq!(s.csv_row(), "10.0,2.0,12,1.500,3,100,5,1,0");
        assert_eq!(s.csv_row().split(',').count(), CSV_HEADER.split(',').count());
    }
}
