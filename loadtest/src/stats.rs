//! Latency histograms (HDR, nanoseconds, 3 significant digits) and the result
//! of one run, printed as a table or one JSON line (which `summarize` reads).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest trackable latency: 10 minutes.
const MAX_NS: u64 = 600_000_000_000;

pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (1 ≤ low, 2·low ≤ high, sigfig ≤ 5).
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("constant histogram bounds are valid")
}

/// Records `ns`, clamped into the trackable range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    let _ = h.record(ns.clamp(1, MAX_NS));
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// One run's result; the JSON field names are the output format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub target: String,
    /// e.g. `ingest-batch-1000`, `mixed-80`.
    pub scenario: String,
    /// `closed` (max throughput) or `open` (fixed rate).
    pub mode: String,
    /// Requests per second asked for (open loop only).
    pub rate: Option<f64>,
    pub connections: usize,
    pub distribution: String,
    pub customers: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub requests: u64,
    pub events: u64,
    pub errors: u64,
    /// Open loop: requests still unsent when the run stopped (counted in the
    /// latencies with the time they had waited).
    pub unsent: u64,
    pub requests_per_s: f64,
    pub events_per_s: f64,
    /// Open loop: latency measured from the intended send time
    /// (coordinated-omission corrected); closed loop: from the send.
    pub latency: Latency,
    /// Open loop: the largest delay of the pacer behind its schedule (generator-side).
    pub max_pacer_lag_us: Option<f64>,
    /// Free text to tell runs apart (the bench script puts the repetition here).
    pub label: String,
    /// `/proc/loadavg`'s first three fields at the end of the run.
    pub loadavg: String,
    pub first_error: Option<String>,
    /// `--server-pid`: the server's CPU time (user + system) over the measured
    /// window, in µs per event for ingest scenarios and per request otherwise.
    #[serde(default)]
    pub server_cpu_us_per_op: Option<f64>,
}

/// The machine's load averages, or "" where /proc is missing.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// A human-readable table of results.
pub fn table(results: &[RunResult]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:<19} {:<13} {:>5} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
        "target", "scenario", "mode", "conns", "req/s", "events/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
    ));
    for r in results {
        let mode = match r.rate {
            Some(rate) => format!("open@{rate:.0}"),
            None => r.mode.clone(),
        };
        out.push_str(&format!(
            "{:<9} {:<19} {:<13} {:>5} {:>12.0} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}\n",
            r.target,
            r.scenario,
            mode,
            r.connections,
            r.requests_per_s,
            r.events_per_s,
            r.latency.p50_us,
            r.latency.p90_us,
            r.latency.p99_us,
            r.latency.p999_us,
            r.latency.max_us,
            r.errors
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = histogram();
        for i in 1..=1000u64 {
            record(&mut h, i * 1000); // 1..=1000 µs
        }
        let l = Latency::of(&h);
        assert!((l.p50_us - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_us - 990.0).abs() < 1.5, "{l:?}");
        assert!((l.max_us - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(Latency::of(&histogram()), Latency::default());
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
    }
}
