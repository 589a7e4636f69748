//! Results of wrk runs turned into the loadtest's own result lines, so a run
//! driven by wrk (a generator neither meterd nor Limitador wrote) lands in the
//! same results.jsonl and summary tables as the loadtest's runs.
//!
//! `loadtest/wrk/bench.lua`'s `done()` prints one `wrk-result {json}` line;
//! [`parse_output`] finds it in wrk's output and [`to_result`] makes a
//! [`RunResult`] of it.

use crate::stats::{Latency, RunResult};
use serde::Deserialize;

/// The prefix of the line `bench.lua` prints.
pub const PREFIX: &str = "wrk-result ";

/// What `bench.lua`'s `done()` reports.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WrkLine {
    pub kind: String,
    pub requests: u64,
    pub duration_us: u64,
    /// Responses with status >= 400 (included in `requests`).
    pub status_errors: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub latency: Latency,
}

/// Why wrk's output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WrkError {
    #[error("no `{PREFIX}` line in wrk's output (was it run with -s loadtest/wrk/bench.lua?)")]
    NoResultLine,
    #[error("the `{PREFIX}` line is not valid: {0}")]
    BadLine(#[from] serde_json::Error),
}

/// The last `wrk-result` line of wrk's output.
pub fn parse_output(text: &str) -> Result<WrkLine, WrkError> {
    let line = text.lines().rev().find_map(|l| l.trim().strip_prefix(PREFIX)).ok_or(WrkError::NoResultLine)?;
    Ok(serde_json::from_str(line)?)
}

/// What the caller knows about the run that wrk does not say.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub target: String,
    pub scenario: String,
    pub connections: usize,
    pub customers: u64,
    pub warmup_s: f64,
    pub label: String,
    /// The server's user + system CPU seconds over the measured run.
    pub server_cpu_seconds: Option<f64>,
}

/// A closed-loop result: requests/s counts the answers below 400 (like the
/// loadtest, which counts only expected answers); every error kind is summed.
/// A consume is one event, a check none.
pub fn to_result(w: &WrkLine, info: &RunInfo, loadavg: String) -> RunResult {
    let seconds = (w.duration_us as f64 / 1e6).max(1e-9);
    let ok = w.requests.saturating_sub(w.status_errors);
    let errors = w.status_errors + w.connect_errors + w.read_errors + w.write_errors + w.timeouts;
    let events = if w.kind.ends_with("consume") { ok } else { 0 };
    RunResult {
        target: info.target.clone(),
        scenario: info.scenario.clone(),
        mode: "closed".into(),
        rate: None,
        connections: info.connections,
        distribution: "cycle".into(),
        customers: info.customers,
        warmup_s: info.warmup_s,
        duration_s: seconds,
        requests: ok,
        events,
        errors,
        unsent: 0,
        requests_per_s: ok as f64 / seconds,
        events_per_s: events as f64 / seconds,
        latency: w.latency,
        max_pacer_lag_us: None,
        label: info.label.clone(),
        loadavg,
        first_error: (errors > 0).then(|| {
            format!(
                "wrk: {} status >= 400, {} connect, {} read, {} write, {} timeouts",
                w.status_errors, w.connect_errors, w.read_errors, w.write_errors, w.timeouts
            )
        }),
        server_cpu_us_per_op: info.server_cpu_seconds.map(|cpu| cpu * 1e6 / ok.max(1) as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 5s test @ http://127.0.0.1:1
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
Requests/sec:  40000.00
wrk-result {\"kind\":\"meterd-consume\",\"threads\":2,\"requests\":200000,\"duration_us\":5000000,\"status_errors\":10,\"connect_errors\":0,\"read_errors\":1,\"write_errors\":0,\"timeouts\":2,\"latency\":{\"p50_us\":800.0,\"p90_us\":1200.0,\"p99_us\":2500.5,\"p999_us\":4000.0,\"max_us\":9000.0,\"mean_us\":850.2}}
";

    fn info() -> RunInfo {
        RunInfo {
            target: "meterd-none".into(),
            scenario: "wrk-consume".into(),
            connections: 64,
            customers: 10_000,
            warmup_s: 1.0,
            label: "run1".into(),
            server_cpu_seconds: Some(4.0),
        }
    }

    #[test]
    fn the_result_line_becomes_a_run_result() {
        let w = parse_output(OUTPUT).unwrap();
        assert_eq!((w.requests, w.status_errors, w.latency.p99_us, w.latency.p999_us), (200_000, 10, 2500.5, 4000.0));
        let r = to_result(&w, &info(), "1.0 1.0 1.0".into());
        assert_eq!((r.target.as_str(), r.scenario.as_str(), r.mode.as_str()), ("meterd-none", "wrk-consume", "closed"));
        assert_eq!((r.requests, r.events, r.errors), (199_990, 199_990, 13));
        assert!((r.requests_per_s - 39_998.0).abs() < 1e-6);
        assert!((r.server_cpu_us_per_op.unwrap() - 4e6 / 199_990.0).abs() < 1e-9);
        assert!(r.first_error.unwrap().contains("10 status >= 400"));
        // The summary reads it back like any other line.
        assert_eq!(crate::summary::parse_lines(&serde_json::to_string(&to_result(&w, &info(), String::new())).unwrap()).unwrap().len(), 1);
    }

    #[test]
    fn checks_carry_no_events_and_a_clean_run_no_error() {
        let text = OUTPUT
            .replace("meterd-consume", "limitador-check")
            .replace("\"status_errors\":10", "\"status_errors\":0")
            .replace("\"read_errors\":1", "\"read_errors\":0");
        let w = parse_output(&text.replace("\"timeouts\":2", "\"timeouts\":0")).unwrap();
        let r = to_result(&w, &RunInfo { server_cpu_seconds: None, ..info() }, String::new());
        assert_eq!((r.requests, r.events, r.errors, r.first_error, r.server_cpu_us_per_op), (200_000, 0, 0, None, None));
    }

    #[test]
    fn missing_or_bad_lines_are_named() {
        assert!(matches!(parse_output("Requests/sec: 1\n"), Err(WrkError::NoResultLine)));
        assert!(matches!(parse_output("wrk-result {\"kind\":1}\n"), Err(WrkError::BadLine(_))));
    }
}
