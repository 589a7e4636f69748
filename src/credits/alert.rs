//! Low-balance and depleted alerts: the crossing detection's output. A
//! [`CreditAlert`] is handed to a [`CreditAlertSink`] (the notifications outbox
//! when wired; [`NoAlerts`] by default) on the thread that changed the balance:
//! sinks must be quick and never block.

use crate::model::Decimal;

/// Which level a balance fell to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditAlertKind {
    /// At or below the limit's `low_balance` (`credits.low`).
    Low,
    /// At or below zero (`credits.depleted`).
    Depleted,
}

impl CreditAlertKind {
    /// The notification type.
    pub fn as_str(self) -> &'static str {
        match self {
            CreditAlertKind::Low => "credits.low",
            CreditAlertKind::Depleted => "credits.depleted",
        }
    }
}

/// One crossing: API.md's notification data `{customer, meter, balance, low_balance}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditAlert {
    pub kind: CreditAlertKind,
    pub customer: String,
    pub meter: String,
    pub balance: Decimal,
    pub low_balance: Option<Decimal>,
    /// Which fall this is: the sum (raw units) of every grant that had taken
    /// effect by then, voided or expired ones included. Only a grant taking
    /// effect lifts a balance and re-arms a level, and it raises this sum, so
    /// each crossing has its own value — the same on every instance and after
    /// a restart (the notification id is made from it).
    pub episode: i64,
}

/// Where alerts go.
pub trait CreditAlertSink: Send + Sync {
    fn alert(&self, alert: CreditAlert);
}

/// Drops every alert (no notifications configured).
pub struct NoAlerts;

impl CreditAlertSink for NoAlerts {
    fn alert(&self, _alert: CreditAlert) {}
}

/// What a balance change crosses, given the armed state; updates the state.
/// Each level fires once, and re-arms when the balance is above it again.
pub(super) fn crossings(balance: i64, low: Option<i64>, low_fired: &mut bool, depleted_fired: &mut bool) -> [Option<CreditAlertKind>; 2] {
    let mut out = [None, None];
    match low {
        Some(low) if balance <= low => {
            if !*low_fired {
                *low_fired = true;
                out[0] = Some(CreditAlertKind::Low);
            }
        }
        _ => *low_fired = false,
    }
    if balance <= 0 {
        if !*depleted_fired {
            *depleted_fired = true;
            out[1] = Some(CreditAlertKind::Depleted);
        }
    } else {
        *depleted_fired = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_and_rearms_above_the_level() {
        let (mut low, mut dep) = (false, false);
        let mut step = |b| crossings(b, Some(10), &mut low, &mut dep);
        assert_eq!(step(50), [None, None]);
        assert_eq!(step(10), [Some(CreditAlertKind::Low), None]);
        assert_eq!(step(5), [None, None]);
        assert_eq!(step(0), [None, Some(CreditAlertKind::Depleted)]);
        assert_eq!(step(-3), [None, None]);
        assert_eq!(step(20), [None, None], "a grant lifts it: both re-arm");
        assert_eq!(step(-1), [Some(CreditAlertKind::Low), Some(CreditAlertKind::Depleted)]);
    }
}
