//! Crossing detection on the usage seam.
//!
//! Per window counter ([`CounterKey`]) the detector keeps an `Armed` entry:
//! the limit it was computed for, the highest threshold already notified, and
//! `next`: the raw usage at which the next threshold fires (`i64::MAX` when none
//! is left, the limit is unlimited, or the window has no limit). The hot path
//! is one sharded-map read and `total < next`. Only a crossing, or the first
//! sight of a window, takes the slow path: resolve the customer's limit, pick
//! the **highest** threshold reached (lower ones passed in the same step are
//! not sent), advance `next`, and commit the notification to the outbox.
//!
//! Totals are what checks see (`WindowTotal::total`: with Redis, the global
//! total). Ended windows never notify; a new window is a new key, so it starts
//! armed; a changed limit value re-arms (the sweep in [`Detector::sweep`]
//! notices it within a second, as well as the next crossing does).
//!
//! At start, the highest threshold sent per still-open window is read back from
//! the outbox, so a restart neither repeats nor back-fills lower thresholds.

use super::outbox::ThresholdMark;
use super::{Notification, Notifier};
use crate::counters::CounterKey;
use crate::engine::Engine;
use crate::model::{Decimal, Entitlements, LimitAmount, MeterId, Thresholds, WindowKind};
use crate::usage::{UsageChange, UsageObserver, WindowTotal};
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// The notification type this module sends.
pub const LIMIT_THRESHOLD: &str = "limit.threshold";

/// One window's armed state.
#[derive(Debug, Clone, Copy)]
struct Armed {
    /// The limit (raw) `next` was computed for; `None`: no finite limit.
    limit: Option<i64>,
    /// The highest threshold notified (for this limit value).
    sent: Option<u16>,
    /// Usage at which the next threshold fires.
    next: i64,
    /// The window's end (ms): past it, nothing fires and the entry is dropped.
    end_ms: i64,
}

/// What a window's limit says.
#[derive(Debug, Clone, Copy)]
struct Target {
    limit: i64,
    hard: bool,
    thresholds: Thresholds,
}

/// The per-window state; shared by the observer and the sweep.
pub struct Detector {
    armed: DashMap<CounterKey, Armed, crate::keyhash::KeyHash>,
    /// Highest threshold sent per `window_key` (read from the outbox at start).
    sent_at_start: Mutex<HashMap<String, u16>>,
}

impl Detector {
    pub(super) fn new(sent: Vec<(String, u16)>) -> Detector {
        Detector { armed: DashMap::with_hasher(crate::keyhash::KeyHash), sent_at_start: Mutex::new(sent.into_iter().collect()) }
    }

    /// Windows with armed state (a bound: dropped when their window ends).
    pub fn len(&self) -> usize {
        self.armed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }

    /// The hot path: does any window of `change` reach its next threshold?
    #[inline]
    fn changed(&self, notifier: &Notifier, change: &UsageChange<'_>) {
        for w in change.windows {
            // The guard is dropped before the slow path takes the entry.
            let below = self.armed.get(&w.key).is_some_and(|a| w.total < a.next);
            if !below {
                self.slow(notifier, change.meter, w);
            }
        }
    }

    /// First sight of a window, or a crossing.
    #[cold]
    fn slow(&self, notifier: &Notifier, meter: MeterId, w: &WindowTotal) {
        let Some(engine) = notifier.engine() else { return };
        self.evaluate(notifier, &engine, meter, w.key, w.total);
    }

    /// Re-judges one window at `total`: re-arms on a new limit value, fires the
    /// highest threshold reached above the one sent.
    fn evaluate(&self, notifier: &Notifier, engine: &Engine, meter: MeterId, key: CounterKey, total: i64) {
        let ents = engine.entitlements().get(Some(key.customer));
        let now = crate::clock::now_ms();
        let window = key.kind.bounds(key.start_ms, ents.billing_anchor);
        if window.end_ms <= now {
            self.armed.remove(&key);
            return;
        }
        let target = target(&ents, meter, key.kind, notifier.thresholds);
        let Some(customer) = engine.counters().interner.name(key.customer) else { return };
        let Some(meter_def) = engine.catalog().meter(meter) else { return };
        let limit = target.map(|t| t.limit);
        let fire = {
            let mut entry = self.armed.entry(key).or_insert(Armed { limit: None, sent: None, next: i64::MIN, end_ms: window.end_ms });
            let a = entry.value_mut();
            if a.limit != limit || a.next == i64::MIN {
                // First sight or a changed limit value: armed afresh, minus what
                // the outbox says was already sent for this limit.
                a.limit = limit;
                a.sent = limit.and_then(|l| {
                    let wk = window_key(&customer, &meter_def.name, key.kind, key.start_ms, l);
                    self.sent_at_start.lock().unwrap_or_else(PoisonError::into_inner).get(&wk).copied()
                });
            }
            let fire = target.and_then(|t| t.thresholds.highest_reached(total, t.limit)).filter(|&h| a.sent.is_none_or(|s| h > s));
            if fire.is_some() {
                a.sent = fire;
            }
            a.next = match target {
                Some(t) => t.thresholds.next_trigger(a.sent, t.limit).unwrap_or(i64::MAX),
                None => i64::MAX,
            };
            fire
        };
        let (Some(p), Some(t)) = (fire, target) else { return };
        let precision = meter_def.precision;
        let wk = window_key(&customer, &meter_def.name, key.kind, key.start_ms, t.limit);
        let id = notification_id(&wk, p);
        let percent = if t.limit > 0 { (i128::from(total) * 10_000 / i128::from(t.limit)) as f64 / 100.0 } else { 100.0 };
        let dec = |raw: i64| serde_json::to_value(Decimal { raw, precision }).unwrap_or(serde_json::Value::Null);
        let n = Notification {
            id,
            kind: LIMIT_THRESHOLD.to_string(),
            customer: customer.to_string(),
            data: serde_json::json!({
                "customer": &*customer,
                "plan": ents.plan.name,
                "meter": meter_def.name,
                "window": key.kind.as_str(),
                "window_start": crate::model::window::rfc3339(window.start_ms),
                "resets_at": window.resets_at().map(crate::model::window::rfc3339),
                "threshold": p,
                "limit": dec(t.limit),
                "used": dec(total),
                "percent": percent,
                "hard": t.hard,
            }),
        };
        let mark = ThresholdMark { window_key: wk, threshold: p, window_end_ms: window.end_ms };
        if let Err(e) = notifier.enqueue_marked(&n, Some(&mark)) {
            tracing::error!(id = %n.id, customer = %n.customer, error = %e, "cannot store a threshold notification");
        }
    }

    /// Drops ended windows and re-judges every window whose limit value
    /// changed (an entitlements change), at its current total.
    pub fn sweep(&self, notifier: &Notifier, engine: &Engine) {
        let now = crate::clock::now_ms();
        let mut recheck = Vec::new();
        self.armed.retain(|key, a| {
            if a.end_ms <= now {
                return false;
            }
            let ents = engine.entitlements().get(Some(key.customer));
            let limit = target(&ents, key.meter, key.kind, notifier.thresholds).map(|t| t.limit);
            if limit != a.limit {
                recheck.push(*key);
            }
            true
        });
        for key in recheck {
            let total = engine.counters().windows.get(&key, |c| c.used()).unwrap_or(0);
            self.evaluate(notifier, engine, key.meter, key, total);
        }
    }
}

/// The finite limit on `kind` of `meter` and its thresholds; `None`: nothing
/// to notify (unlimited, no such limit, or `notify = []`).
fn target(ents: &Entitlements, meter: MeterId, kind: WindowKind, default: Thresholds) -> Option<Target> {
    let limit = ents.limits(meter)?.iter().find(|l| l.window == kind)?;
    let LimitAmount::Finite(raw) = limit.amount else { return None };
    let thresholds = limit.notify.unwrap_or(default);
    (!thresholds.is_empty()).then_some(Target { limit: raw, hard: limit.hard, thresholds })
}

/// What identifies a window and limit value across restarts and instances.
pub fn window_key(customer: &str, meter: &str, kind: WindowKind, start_ms: i64, limit: i64) -> String {
    format!("{customer}\u{0}{meter}\u{0}{}\u{0}{start_ms}\u{0}{limit}", kind.as_str())
}

/// The deterministic notification id (the `webhook-id`): the same crossing
/// always has the same id, on any instance, after any replay.
pub fn notification_id(window_key: &str, threshold: u16) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{LIMIT_THRESHOLD}\u{0}{window_key}\u{0}{threshold}").as_bytes());
    format!("ntf_{}", hex::encode(&digest[..16]))
}

/// The observer registered on the seam; detection starts once the notifier
/// is bound to the engine.
pub struct ThresholdObserver {
    notifier: Weak<Notifier>,
    detector: Arc<Detector>,
}

impl ThresholdObserver {
    pub(super) fn new(notifier: Weak<Notifier>) -> ThresholdObserver {
        let detector = notifier.upgrade().map(|n| n.detector.clone()).unwrap_or_else(|| Arc::new(Detector::new(Vec::new())));
        ThresholdObserver { notifier, detector }
    }
}

impl UsageObserver for ThresholdObserver {
    #[inline]
    fn changed(&self, change: &UsageChange<'_>) {
        // The hot path: the armed map and one comparison per window; only a
        // crossing needs the notifier.
        let all_below = change.windows.iter().all(|w| self.detector.armed.get(&w.key).is_some_and(|a| w.total < a.next));
        if !all_below {
            if let Some(n) = self.notifier.upgrade() {
                self.detector.changed(&n, change);
            }
        }
    }
}

impl Notifier {
    /// The detector (for the sweep and tests).
    pub fn detector(&self) -> &Detector {
        &self.detector
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let k = window_key("u_42", "minutes", WindowKind::Month, 1_000, 300);
        assert_eq!(notification_id(&k, 75), notification_id(&k, 75));
        assert_ne!(notification_id(&k, 75), notification_id(&k, 90));
        let other_limit = window_key("u_42", "minutes", WindowKind::Month, 1_000, 400);
        assert_ne!(notification_id(&k, 75), notification_id(&other_limit, 75));
        let other_window = window_key("u_42", "minutes", WindowKind::Month, 2_000, 300);
        assert_ne!(notification_id(&k, 75), notification_id(&other_window, 75));
    }
}
