//! What the reporter is doing, for `GET /v1/stripe/status` and the gauges: the
//! last run's per-meter totals (stored vs reported, oldest pending period), its
//! state (reporting, standby without the lease, stopped) and its last error.

use super::plan::MeterSummary;
use crate::model::window::rfc3339;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The reporter's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, no run finished yet.
    Starting,
    /// Holds the lease and reports.
    Reporting,
    /// Another instance holds the lease; this one only reads.
    Standby,
    /// Stripe refused the key: nothing is sent until a restart with a good key.
    Unauthorized,
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Reporting => "reporting",
            State::Standby => "standby",
            State::Unauthorized => "stopped_unauthorized",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
struct Snapshot {
    state: State,
    fence: Option<u64>,
    last_run_ms: Option<i64>,
    last_error: Option<String>,
    /// Scanned periods: `[from, to)`, Unix ms.
    window: Option<(i64, i64)>,
    meters: BTreeMap<String, (String, MeterSummary)>,
}

/// Shared between the reporter task (writes) and the HTTP handler (reads).
#[derive(Debug)]
pub struct StatusBoard {
    mode: &'static str,
    period: &'static str,
    lease: &'static str,
    inner: Mutex<Snapshot>,
}

impl StatusBoard {
    pub fn new(mode: &'static str, period: &'static str, lease: &'static str) -> StatusBoard {
        StatusBoard {
            mode,
            period,
            lease,
            inner: Mutex::new(Snapshot {
                state: State::Starting,
                fence: None,
                last_run_ms: None,
                last_error: None,
                window: None,
                meters: BTreeMap::new(),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    pub fn set_state(&self, state: State, fence: Option<u64>) {
        self.with(|s| {
            s.state = state;
            s.fence = fence;
        });
    }

    pub fn state(&self) -> State {
        self.with(|s| s.state)
    }

    pub fn set_error(&self, error: Option<String>) {
        self.with(|s| s.last_error = error);
    }

    /// Records a finished run's totals.
    pub fn set_run(&self, now_ms: i64, window: (i64, i64), meters: BTreeMap<String, (String, MeterSummary)>) {
        self.with(|s| {
            s.last_run_ms = Some(now_ms);
            s.window = Some(window);
            s.meters = meters;
        });
    }

    /// The JSON of `GET /v1/stripe/status`.
    pub fn to_json(&self) -> Value {
        self.with(|s| {
            let meters: Vec<Value> = s
                .meters
                .iter()
                .map(|(meter, (event_name, m))| {
                    json!({
                        "meter": meter,
                        "event_name": event_name,
                        "stored": m.stored,
                        "reported": m.reported,
                        "pending": m.pending,
                        "failed": m.failed,
                        "unmapped": m.unmapped,
                        "overreported": m.overreported,
                        "oldest_pending_period": m.oldest_pending_ms.map(rfc3339),
                    })
                })
                .collect();
            json!({
                "enabled": true,
                "mode": self.mode,
                "period": self.period,
                "lease": self.lease,
                "state": s.state.as_str(),
                "fence": s.fence,
                "last_run": s.last_run_ms.map(rfc3339),
                "last_error": s.last_error,
                "from": s.window.map(|w| rfc3339(w.0)),
                "to": s.window.map(|w| rfc3339(w.1)),
                "meters": meters,
            })
        })
    }
}
