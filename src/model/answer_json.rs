//! An answer's JSON, written field by field instead of through serde's
//! derived `Serialize` (issue 24): every check and consume writes one, and
//! serde's generic path (a key escaped per field, a map state per struct)
//! cost more than the bytes it writes. The output is byte for byte what
//! `serde_json::to_vec` writes for the same answer — the tests hold the two
//! equal, on fixed answers and on generated ones — so the derive stays the
//! answer's definition of its shape, and this module its fast path.

use super::answer::{CheckAnswer, LimitView};
use super::window::Rfc3339;
use super::Decimal;

impl CheckAnswer {
    /// The answer as JSON (the body of a `200` from `/v1/check`).
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(256 + 160 * self.limits.len());
        out.extend_from_slice(b"{\"allowed\":");
        boolean(&mut out, self.allowed);
        out.extend_from_slice(b",\"customer\":");
        string(&mut out, &self.customer)?;
        out.extend_from_slice(b",\"meter\":");
        string(&mut out, &self.meter)?;
        out.extend_from_slice(b",\"quantity\":");
        self.quantity.write_json(&mut out);
        out.extend_from_slice(b",\"used\":");
        self.used.write_json(&mut out);
        out.extend_from_slice(b",\"held\":");
        self.held.write_json(&mut out);
        out.extend_from_slice(b",\"limit\":");
        optional_decimal(&mut out, self.limit);
        out.extend_from_slice(b",\"remaining\":");
        optional_decimal(&mut out, self.remaining);
        out.extend_from_slice(b",\"window\":");
        match self.window {
            Some(w) => string(&mut out, w)?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"resets_at\":");
        resets_at(&mut out, self.resets_at)?;
        out.extend_from_slice(b",\"hard\":");
        boolean(&mut out, self.hard);
        out.extend_from_slice(b",\"reason\":");
        string(&mut out, self.reason.as_str())?;
        out.extend_from_slice(b",\"limits\":[");
        for (i, view) in self.limits.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            limit_view(&mut out, view)?;
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }
}

fn limit_view(out: &mut Vec<u8>, v: &LimitView) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"window\":");
    string(out, v.window)?;
    out.extend_from_slice(b",\"limit\":");
    optional_decimal(out, v.limit);
    out.extend_from_slice(b",\"used\":");
    v.used.write_json(out);
    out.extend_from_slice(b",\"held\":");
    v.held.write_json(out);
    out.extend_from_slice(b",\"remaining\":");
    optional_decimal(out, v.remaining);
    out.extend_from_slice(b",\"resets_at\":");
    resets_at(out, v.resets_at)?;
    out.extend_from_slice(b",\"hard\":");
    boolean(out, v.hard);
    out.push(b'}');
    Ok(())
}

fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// A JSON string: copied between quotes when nothing in it needs escaping
/// (names as clients send them), else escaped by serde_json itself.
fn string(out: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

fn optional_decimal(out: &mut Vec<u8>, d: Option<Decimal>) {
    match d {
        Some(d) => d.write_json(out),
        None => out.extend_from_slice(b"null"),
    }
}

fn resets_at(out: &mut Vec<u8>, at: Option<Rfc3339>) -> Result<(), serde_json::Error> {
    match at {
        Some(at) => at.write_json(out),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::answer::{LimitViews, Reason};
    use super::*;
    use proptest::prelude::*;

    fn same(answer: &CheckAnswer) {
        let serde = serde_json::to_vec(answer).unwrap_or_else(|e| panic!("{e}"));
        let ours = answer.to_json().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&serde));
    }

    fn view(window: &'static str, limit: Option<Decimal>, used: Decimal, at: Option<i64>) -> LimitView {
        LimitView { window, limit, used, held: Decimal { raw: 0, precision: 0 }, remaining: limit, resets_at: at.map(Rfc3339), hard: true }
    }

    #[test]
    fn fixed_answers_match_serde() {
        let d = |raw, precision| Decimal { raw, precision };
        let mut a = CheckAnswer::bare(true, Reason::WithinLimit);
        same(&a);
        // One character to escape at a time.
        for name in ["a\"b", "a\\b", "a\u{1f}b", "tab\t"] {
            a.customer = name.into();
            same(&a);
        }
        a.customer = "cust \"quoted\" \\ back\nslash\u{1}\u{7f} é 日本".into();
        a.meter = "interview_minutes".into();
        a.quantity = d(1250, 2);
        a.used = d(-3, 1);
        a.limit = Some(d(i64::MAX, 0));
        a.remaining = Some(d(i64::MIN, 3));
        a.window = Some("month");
        a.resets_at = Some(Rfc3339(1_798_761_600_000));
        a.reason = Reason::SoftLimitExceeded;
        let mut limits = LimitViews::new();
        limits.push(view("month", Some(d(30_000, 0)), d(29_500, 0), Some(1_798_761_600_123)));
        limits.push(view("day", None, d(7, 4), None));
        // A year past 9999: chrono's longer form.
        limits.push(view("year", Some(d(1, 9)), d(0, 0), Some(300_000_000_000_000)));
        a.limits = limits;
        same(&a);
    }

    proptest! {
        #[test]
        fn generated_answers_match_serde(
            allowed: bool,
            customer in "\\PC{0,12}|[\\x00-\\x7f]{0,12}",
            raws in proptest::collection::vec(any::<i64>(), 5),
            precisions in proptest::collection::vec(0_u8..=9, 5),
            at in proptest::option::of(-62_000_000_000_000_i64..300_000_000_000_000),
            views in 0_usize..3,
        ) {
            let d = |i: usize| Decimal { raw: raws[i], precision: precisions[i] };
            let mut a = CheckAnswer::bare(allowed, Reason::LimitExceeded);
            a.customer = customer.as_str().into();
            a.quantity = d(0);
            a.used = d(1);
            a.held = d(2);
            a.limit = Some(d(3)).filter(|_| raws[3] % 2 == 0);
            a.remaining = Some(d(4));
            a.window = at.map(|_| "week");
            a.resets_at = at.map(Rfc3339);
            for i in 0..views {
                a.limits.push(view(["month", "day", "rolling"][i], Some(d(i)), d(i + 1), at.map(|t| t + i as i64)));
            }
            same(&a);
        }
    }
}
