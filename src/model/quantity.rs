//! Fixed-point quantities: every amount meterd counts is an integer number of
//! `10^-precision` units, so totals are exact and never drift the way floats do.
//!
//! A meter with `precision = 2` stores `12.34` as the raw integer `1234`. Parsing
//! works on the decimal *text* of a JSON or TOML number, never on an `f64`, so a
//! value such as `0.1` is exactly ten hundredths. Arithmetic is checked: an overflow
//! is an error, never a wrap.

use std::fmt;

/// The largest precision a meter may declare. `10^9` still leaves nine billion whole
/// units of headroom in an `i64`.
pub const MAX_PRECISION: u8 = 9;

/// Why a decimal text is not a valid quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("must be a number")]
    NotANumber,
    #[error("must not be negative")]
    Negative,
    #[error("has more than {precision} decimal places (the meter's precision)")]
    TooPrecise { precision: u8 },
    #[error("is too large")]
    Overflow,
}

/// `10^precision` as the scale of one whole unit.
pub fn scale(precision: u8) -> i64 {
    10_i64.pow(u32::from(precision.min(MAX_PRECISION)))
}

/// Parses the text of a JSON number (`12`, `0.25`, `1e3`, `2.5E-1`) into raw units
/// at `precision` decimal places. Negative numbers are rejected; so are numbers with
/// more significant decimals than the precision allows (trailing zeros are fine).
pub fn parse_decimal(text: &str, precision: u8) -> Result<i64, QuantityError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    if bytes.first() == Some(&b'-') {
        // "-0" and "-0.0" are zero; anything else negative is refused.
        let rest = &text[1..];
        return match parse_decimal(rest, precision) {
            Ok(0) => Ok(0),
            Ok(_) => Err(QuantityError::Negative),
            Err(e) => Err(e),
        };
    }
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &bytes[int_start..i];
    if int_digits.is_empty() {
        return Err(QuantityError::NotANumber);
    }
    let mut frac_digits: &[u8] = &[];
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &bytes[frac_start..i];
        if frac_digits.is_empty() {
            return Err(QuantityError::NotANumber);
        }
    }
    let mut exponent: i64 = 0;
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        let mut negative = false;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            negative = bytes[i] == b'-';
            i += 1;
        }
        let exp_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            // Clamp silly exponents: anything past 10^40 overflows (or is zero) anyway.
            exponent = (exponent * 10 + i64::from(bytes[i] - b'0')).min(1_000);
            i += 1;
        }
        if i == exp_start {
            return Err(QuantityError::NotANumber);
        }
        if negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return Err(QuantityError::NotANumber);
    }
    digits_to_raw(int_digits, frac_digits, exponent, precision)
}

/// Shifts the digit string `int.frac × 10^exponent` to `precision` places,
/// without allocating: digits are read straight from the two slices.
fn digits_to_raw(int: &[u8], frac: &[u8], exponent: i64, precision: u8) -> Result<i64, QuantityError> {
    // The value is digits × 10^(exponent - frac.len()); we want it × 10^precision.
    let shift = exponent - frac.len() as i64 + i64::from(precision);
    let digits = || int.iter().chain(frac.iter()).map(|d| d - b'0').skip_while(|&d| d == 0);
    let count = digits().count();
    if count == 0 {
        return Ok(0);
    }
    let mut keep = count;
    if shift < 0 {
        // Drop |shift| trailing digits; they must all be zero.
        let drop = usize::try_from(-shift).unwrap_or(usize::MAX);
        if drop >= count || digits().skip(count - drop).any(|d| d != 0) {
            return Err(QuantityError::TooPrecise { precision });
        }
        keep = count - drop;
    }
    let mut value: i64 = 0;
    for d in digits().take(keep) {
        value = value.checked_mul(10).and_then(|v| v.checked_add(i64::from(d))).ok_or(QuantityError::Overflow)?;
    }
    for _ in 0..shift.max(0) {
        value = value.checked_mul(10).ok_or(QuantityError::Overflow)?;
    }
    Ok(value)
}

/// Raw units rendered as a decimal, for JSON answers and logs: `1234` at precision
/// 2 is `12.34`; trailing zeros are trimmed (`1200` → `12`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub raw: i64,
    pub precision: u8,
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.precision == 0 {
            return write!(f, "{}", self.raw);
        }
        let scale = scale(self.precision).unsigned_abs();
        let sign = if self.raw < 0 { "-" } else { "" };
        let abs = self.raw.unsigned_abs();
        let whole = abs / scale;
        let frac = abs % scale;
        if frac == 0 {
            return write!(f, "{sign}{whole}");
        }
        let width = usize::from(self.precision);
        let mut frac_text = format!("{frac:0width$}");
        while frac_text.ends_with('0') {
            frac_text.pop();
        }
        write!(f, "{sign}{whole}.{frac_text}")
    }
}

impl Decimal {
    /// The amount as an integer, when it is whole.
    pub fn whole(self) -> Option<i64> {
        let scale = scale(self.precision);
        (self.raw % scale == 0).then(|| self.raw / scale)
    }

    /// The amount as a JSON number appended to `out`, as its `Serialize`
    /// writes it (an answer's hand-written JSON, `answer_json.rs`), with no
    /// text built on the way: an integer when whole, else the digits of
    /// [`fmt::Display`].
    pub fn write_json(self, out: &mut Vec<u8>) {
        let scale = scale(self.precision).unsigned_abs();
        let abs = self.raw.unsigned_abs();
        let mut frac = abs % scale;
        if frac != 0 && self.precision > MAX_PRECISION {
            // Never configured (validation caps it): as `Display` writes it.
            out.extend_from_slice(self.to_string().as_bytes());
            return;
        }
        if self.raw < 0 {
            out.push(b'-');
        }
        out.extend_from_slice(itoa::Buffer::new().format(abs / scale).as_bytes());
        if frac == 0 {
            return;
        }
        // `precision` digits, zero-padded on the left, trailing zeros cut.
        let width = usize::from(self.precision.min(MAX_PRECISION));
        let mut digits = [b'0'; MAX_PRECISION as usize];
        for d in digits[..width].iter_mut().rev() {
            *d = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        let end = digits[..width].iter().rposition(|&d| d != b'0').map_or(0, |p| p + 1);
        out.push(b'.');
        out.extend_from_slice(&digits[..end]);
    }
}

impl serde::Serialize for Decimal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A whole amount is written as the integer it is, with no text to build
        // and check (most amounts in an answer: limits, usage of whole units).
        if let Some(n) = self.whole() {
            return serializer.serialize_i64(n);
        }
        let raw = serde_json::value::RawValue::from_string(self.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_decimal("0.1", 2), Ok(10));
        assert_eq!(parse_decimal("12.34", 2), Ok(1234));
        assert_eq!(parse_decimal("12.30", 1), Ok(123));
        assert_eq!(parse_decimal("7", 0), Ok(7));
        assert_eq!(parse_decimal("1e3", 0), Ok(1000));
        assert_eq!(parse_decimal("2.5E-1", 2), Ok(25));
        assert_eq!(parse_decimal("-0", 0), Ok(0));
        assert_eq!(parse_decimal("0.000", 0), Ok(0));
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(parse_decimal("-1", 0), Err(QuantityError::Negative));
        assert_eq!(parse_decimal("0.123", 2), Err(QuantityError::TooPrecise { precision: 2 }));
        assert_eq!(parse_decimal("1e-1", 0), Err(QuantityError::TooPrecise { precision: 0 }));
        assert_eq!(parse_decimal("abc", 0), Err(QuantityError::NotANumber));
        assert_eq!(parse_decimal("1.", 0), Err(QuantityError::NotANumber));
        assert_eq!(parse_decimal("", 0), Err(QuantityError::NotANumber));
        assert_eq!(parse_decimal("99999999999999999999", 0), Err(QuantityError::Overflow));
        assert_eq!(parse_decimal("1e400", 0), Err(QuantityError::Overflow));
        assert_eq!(parse_decimal("9223372036854775807", 0), Ok(i64::MAX));
        assert_eq!(parse_decimal("9223372036854775808", 0), Err(QuantityError::Overflow));
    }

    #[test]
    fn renders_decimals() {
        assert_eq!(Decimal { raw: 1234, precision: 2 }.to_string(), "12.34");
        assert_eq!(Decimal { raw: 1200, precision: 2 }.to_string(), "12");
        assert_eq!(Decimal { raw: 5, precision: 3 }.to_string(), "0.005");
        assert_eq!(Decimal { raw: -150, precision: 2 }.to_string(), "-1.5");
        assert_eq!(serde_json::to_string(&Decimal { raw: 1050, precision: 2 }).ok(), Some("10.5".into()));
    }

    proptest! {
        /// Rendering then parsing gives back the same raw units, at every precision.
        #[test]
        fn render_parse_round_trip(raw in 0_i64..i64::MAX, precision in 0_u8..=MAX_PRECISION) {
            let text = Decimal { raw, precision }.to_string();
            prop_assert_eq!(parse_decimal(&text, precision), Ok(raw));
        }

        /// As JSON, an amount is exactly its text, whole or not, at every
        /// precision and sign.
        #[test]
        fn json_is_the_text(raw in i64::MIN + 1..i64::MAX, precision in 0_u8..=MAX_PRECISION, whole in any::<bool>()) {
            let raw = if whole { raw / scale(precision) * scale(precision) } else { raw };
            let d = Decimal { raw, precision };
            prop_assert_eq!(serde_json::to_string(&d).unwrap_or_default(), d.to_string());
        }

        #[test]
        fn written_json_is_serdes(raw in any::<i64>(), precision in 0_u8..=12, whole in any::<bool>()) {
            let raw = if whole { raw / scale(precision) * scale(precision) } else { raw };
            let d = Decimal { raw, precision };
            let mut out = b"x".to_vec();
            d.write_json(&mut out);
            prop_assert_eq!(String::from_utf8_lossy(&out[1..]), serde_json::to_string(&d).unwrap_or_default());
        }

        /// Sums of parsed decimals are exact: no float error creeps in.
        #[test]
        fn sums_are_exact(cents in proptest::collection::vec(0_u32..1_000_000, 1..200)) {
            let mut total: i64 = 0;
            for c in &cents {
                let text = format!("{}.{:02}", c / 100, c % 100);
                total += parse_decimal(&text, 2).unwrap_or(-1);
            }
            prop_assert_eq!(total, cents.iter().map(|&c| i64::from(c)).sum::<i64>());
        }

        /// Whatever the text, parsing never panics.
        #[test]
        fn never_panics(text in "\\PC{0,40}", precision in 0_u8..=MAX_PRECISION) {
            let _ = parse_decimal(&text, precision);
        }
    }
}
