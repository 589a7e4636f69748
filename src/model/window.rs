//! Limit windows and their exact UTC boundaries.
//!
//! A window kind plus an instant gives one window `[start, end)` in Unix
//! milliseconds. Calendar windows are UTC; `billing_cycle` is monthly from the
//! customer's billing anchor, clamped to the month's last day (an anchor on the 31st
//! renews on 28/29 February and on 30 April). `total` never resets.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};
use std::fmt;
use std::str::FromStr;

/// The kinds of window a limit can be counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowKind {
    Minute,
    Hour,
    Day,
    Month,
    BillingCycle,
    Total,
}

impl WindowKind {
    pub const ALL: [WindowKind; 6] =
        [WindowKind::Minute, WindowKind::Hour, WindowKind::Day, WindowKind::Month, WindowKind::BillingCycle, WindowKind::Total];

    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Minute => "minute",
            WindowKind::Hour => "hour",
            WindowKind::Day => "day",
            WindowKind::Month => "month",
            WindowKind::BillingCycle => "billing_cycle",
            WindowKind::Total => "total",
        }
    }

    /// A small index, for bit sets of kinds.
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The window containing `at_ms`. `anchor` matters only for `billing_cycle`.
    pub fn bounds(self, at_ms: i64, anchor: BillingAnchor) -> Window {
        let (start, end) = match self {
            WindowKind::Minute => {
                let start = at_ms.div_euclid(60_000) * 60_000;
                (start, start + 60_000)
            }
            WindowKind::Hour => {
                let start = at_ms.div_euclid(3_600_000) * 3_600_000;
                (start, start + 3_600_000)
            }
            WindowKind::Day => {
                let start = at_ms.div_euclid(86_400_000) * 86_400_000;
                (start, start + 86_400_000)
            }
            WindowKind::Month => month_bounds(at_ms),
            WindowKind::BillingCycle if anchor == BillingAnchor::default() => month_bounds(at_ms),
            WindowKind::BillingCycle => anchor.cycle_containing(utc(at_ms)),
            WindowKind::Total => (0, i64::MAX),
        };
        Window { kind: self, start_ms: start, end_ms: end }
    }
}

impl fmt::Display for WindowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not a window kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown window {0:?} (expected minute, hour, day, month, billing_cycle or total)")]
pub struct UnknownWindow(pub String);

impl FromStr for WindowKind {
    type Err = UnknownWindow;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WindowKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownWindow(s.to_string()))
    }
}

/// One concrete window: `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Window {
    /// When the window resets, or `None` for `total`.
    pub fn resets_at(&self) -> Option<i64> {
        (self.kind != WindowKind::Total).then_some(self.end_ms)
    }
}

/// Where a customer's monthly billing cycle starts: a day of the month and a time
/// of day (UTC). The default is midnight on the 1st, i.e. the calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BillingAnchor {
    day: u32,
    seconds_of_day: u32,
}

impl Default for BillingAnchor {
    fn default() -> Self {
        BillingAnchor { day: 1, seconds_of_day: 0 }
    }
}

impl BillingAnchor {
    /// The anchor taken from an instant: its day of month and time of day.
    pub fn from_ms(ms: i64) -> BillingAnchor {
        let at = utc(ms);
        BillingAnchor { day: at.day(), seconds_of_day: at.num_seconds_from_midnight() }
    }

    /// The cycle start in month `(y, m)`: the anchor day clamped to the month's end.
    fn start_in(self, y: i32, m: u32) -> i64 {
        let day = self.day.min(days_in_month(y, m));
        let date = NaiveDate::from_ymd_opt(y, m, day).unwrap_or(NaiveDate::MIN);
        date.and_hms_opt(0, 0, 0).map(|d| d.and_utc().timestamp_millis()).unwrap_or(0) + i64::from(self.seconds_of_day) * 1000
    }

    fn cycle_containing(self, at: DateTime<Utc>) -> (i64, i64) {
        let at_ms = at.timestamp_millis();
        let (y, m) = (at.year(), at.month());
        let this = self.start_in(y, m);
        if this <= at_ms {
            let (ny, nm) = next_month(y, m);
            (this, self.start_in(ny, nm))
        } else {
            let (py, pm) = prev_month(y, m);
            (self.start_in(py, pm), this)
        }
    }
}

thread_local! {
    /// The last month computed on this thread: almost every event falls in the
    /// current month, so calendar math runs about once a month per thread.
    static LAST_MONTH: std::cell::Cell<(i64, i64)> = const { std::cell::Cell::new((0, 0)) };
}

/// `[start, end)` of the calendar month containing `at_ms`.
fn month_bounds(at_ms: i64) -> (i64, i64) {
    let cached = LAST_MONTH.with(|c| c.get());
    if cached.0 <= at_ms && at_ms < cached.1 {
        return cached;
    }
    let at = utc(at_ms);
    let (y, m) = (at.year(), at.month());
    let (ny, nm) = next_month(y, m);
    let bounds = (month_start_ms(y, m), month_start_ms(ny, nm));
    LAST_MONTH.with(|c| c.set(bounds));
    bounds
}

fn utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn next_month(y: i32, m: u32) -> (i32, u32) {
    if m == 12 {
        (y + 1, 1)
    } else {
        (y, m + 1)
    }
}

fn prev_month(y: i32, m: u32) -> (i32, u32) {
    if m == 1 {
        (y - 1, 12)
    } else {
        (y, m - 1)
    }
}

fn month_start_ms(y: i32, m: u32) -> i64 {
    NaiveDate::from_ymd_opt(y, m, 1).and_then(|d| d.and_hms_opt(0, 0, 0)).map(|d| d.and_utc().timestamp_millis()).unwrap_or(0)
}

fn days_in_month(y: i32, m: u32) -> u32 {
    let (ny, nm) = next_month(y, m);
    let first = NaiveDate::from_ymd_opt(y, m, 1);
    let next = NaiveDate::from_ymd_opt(ny, nm, 1);
    match (first, next) {
        (Some(a), Some(b)) => u32::try_from((b - a).num_days()).unwrap_or(31),
        _ => 31,
    }
}

/// Unix milliseconds as RFC 3339 (`2026-12-01T00:00:00Z`, with milliseconds
/// when there are any).
pub fn rfc3339(ms: i64) -> String {
    Rfc3339(ms).to_string()
}

/// chrono's own RFC 3339 writer: what [`Rfc3339`] writes for years it does
/// not write itself, and what the tests hold it to.
fn chrono_rfc3339(ms: i64) -> String {
    let precision = if ms % 1000 == 0 { chrono::SecondsFormat::Secs } else { chrono::SecondsFormat::Millis };
    utc(ms).to_rfc3339_opts(precision, true)
}

/// Unix milliseconds written as RFC 3339 without building a `String` (chrono's
/// form, digit by digit): an answer names its `resets_at` this way when it is
/// serialized, and [`rfc3339`] is its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub i64);

impl Rfc3339 {
    /// The text in `buf`, digit by digit (the `fmt` machinery and chrono's
    /// writer cost more than the rest of a consume's answer); `None` for a
    /// year outside 0..=9999, which chrono writes in a longer form.
    fn text(self, buf: &mut [u8; 24]) -> Option<&str> {
        fn put(buf: &mut [u8], at: usize, mut v: u32, digits: usize) {
            for i in (at..at + digits).rev() {
                buf[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        }
        let t = utc(self.0);
        let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
        put(buf, 0, year, 4);
        buf[4] = b'-';
        put(buf, 5, t.month(), 2);
        buf[7] = b'-';
        put(buf, 8, t.day(), 2);
        buf[10] = b'T';
        put(buf, 11, t.hour(), 2);
        buf[13] = b':';
        put(buf, 14, t.minute(), 2);
        buf[16] = b':';
        put(buf, 17, t.second(), 2);
        let end = match self.0.rem_euclid(1000) {
            0 => 19,
            ms => {
                buf[19] = b'.';
                put(buf, 20, ms as u32, 3);
                23
            }
        };
        buf[end] = b'Z';
        std::str::from_utf8(&buf[..=end]).ok()
    }

    /// The time as a JSON string, appended to `out` (an answer's hand-written
    /// JSON, `answer_json.rs`): as its `Serialize` writes it.
    pub fn write_json(self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self.text(&mut [0; 24]) {
            Some(text) => {
                out.push(b'"');
                out.extend_from_slice(text.as_bytes());
                out.push(b'"');
                Ok(())
            }
            None => serde_json::to_writer(out, &chrono_rfc3339(self.0)),
        }
    }
}

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text(&mut [0; 24]) {
            Some(text) => f.write_str(text),
            None => f.write_str(&chrono_rfc3339(self.0)),
        }
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.text(&mut [0; 24]) {
            Some(text) => s.serialize_str(text),
            None => s.serialize_str(&chrono_rfc3339(self.0)),
        }
    }
}

/// Parses an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text).ok().map(|d| d.timestamp_millis())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_written_in_place_is_what_rfc3339_writes() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut cases = vec![
            0,
            1,
            999,
            1000,
            -1,
            -1000,
            1_764_979_200_000,
            1_764_979_200_123,
            253_402_300_799_999,
            253_402_300_800_000,
            -62_135_596_800_000,
        ];
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            cases.push((rng % 400_000_000_000_000) as i64 - 100_000_000_000_000);
        }
        for ms in cases {
            assert_eq!(rfc3339(ms), chrono_rfc3339(ms), "{ms}");
            assert_eq!(serde_json::to_string(&Rfc3339(ms)).ok(), Some(format!("\"{}\"", chrono_rfc3339(ms))), "{ms}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn ms(text: &str) -> i64 {
        parse_rfc3339(text).unwrap_or(i64::MIN)
    }

    #[test]
    fn calendar_windows() {
        let at = ms("2026-11-22T13:45:30.250Z");
        let a = BillingAnchor::default();
        let month = WindowKind::Month.bounds(at, a);
        assert_eq!(rfc3339(month.start_ms), "2026-11-01T00:00:00Z");
        assert_eq!(rfc3339(1_234), "1970-01-01T00:00:01.234Z");
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(month.end_ms), "2026-12-01T00:00:00Z");
        let day = WindowKind::Day.bounds(at, a);
        assert_eq!(rfc3339(day.start_ms), "2026-11-22T00:00:00Z");
        assert_eq!(rfc3339(day.end_ms), "2026-11-23T00:00:00Z");
        let hour = WindowKind::Hour.bounds(at, a);
        assert_eq!(rfc3339(hour.start_ms), "2026-11-22T13:00:00Z");
        let minute = WindowKind::Minute.bounds(at, a);
        assert_eq!(rfc3339(minute.end_ms), "2026-11-22T13:46:00Z");
        let dec = WindowKind::Month.bounds(ms("2026-12-31T23:59:59.999Z"), a);
        assert_eq!(rfc3339(dec.end_ms), "2027-01-01T00:00:00Z");
        assert_eq!(WindowKind::Total.bounds(at, a).resets_at(), None);
    }

    #[test]
    fn billing_anchor_on_the_31st_clamps_to_month_end() {
        let anchor = BillingAnchor::from_ms(ms("2026-01-31T00:00:00Z"));
        let feb = WindowKind::BillingCycle.bounds(ms("2026-02-15T00:00:00Z"), anchor);
        assert_eq!(rfc3339(feb.start_ms), "2026-01-31T00:00:00Z");
        assert_eq!(rfc3339(feb.end_ms), "2026-02-28T00:00:00Z");
        let mar = WindowKind::BillingCycle.bounds(ms("2026-03-01T00:00:00Z"), anchor);
        assert_eq!(rfc3339(mar.start_ms), "2026-02-28T00:00:00Z");
        assert_eq!(rfc3339(mar.end_ms), "2026-03-31T00:00:00Z");
        let leap = WindowKind::BillingCycle.bounds(ms("2028-02-29T12:00:00Z"), anchor);
        assert_eq!(rfc3339(leap.start_ms), "2028-02-29T00:00:00Z");
        assert_eq!(rfc3339(leap.end_ms), "2028-03-31T00:00:00Z");
    }

    #[test]
    fn billing_anchor_keeps_time_of_day() {
        let anchor = BillingAnchor::from_ms(ms("2026-11-15T09:30:00Z"));
        let before = WindowKind::BillingCycle.bounds(ms("2026-11-15T09:29:59Z"), anchor);
        assert_eq!(rfc3339(before.start_ms), "2026-10-15T09:30:00Z");
        let after = WindowKind::BillingCycle.bounds(ms("2026-11-15T09:30:00Z"), anchor);
        assert_eq!(rfc3339(after.start_ms), "2026-11-15T09:30:00Z");
        assert_eq!(rfc3339(after.end_ms), "2026-12-15T09:30:00Z");
    }

    proptest! {
        /// Every instant lies in exactly its window, and the next window starts
        /// where this one ends.
        #[test]
        fn windows_contain_and_tile(at in 0_i64..4_102_444_800_000, day in 1_i64..=31, kind_i in 0_usize..5) {
            let kind = WindowKind::ALL[kind_i];
            let anchor = BillingAnchor::from_ms((day - 1) * 86_400_000 + 7 * 3_600_000);
            let w = kind.bounds(at, anchor);
            prop_assert!(w.start_ms <= at && at < w.end_ms, "{w:?} vs {at}");
            let next = kind.bounds(w.end_ms, anchor);
            prop_assert_eq!(next.start_ms, w.end_ms);
            let prev = kind.bounds(w.start_ms - 1, anchor);
            prop_assert_eq!(prev.end_ms, w.start_ms);
        }
    }
}
