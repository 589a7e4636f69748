//! Parsing and validating event bodies: one JSON object, a JSON array, or NDJSON.
//!
//! Two passes keep errors precise and the hot path allocation-light. The first
//! pass splits the body into raw JSON values (a syntax error is `invalid_json`;
//! too many events is `payload_too_large`). The second reads each value's fields
//! as raw JSON slices with a hand-written map visitor, so an event with three bad
//! fields yields three details, unknown fields are named, and strings without
//! escapes are borrowed from the body rather than copied.

use crate::model::{quantity, window, Catalog, MeterId};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Limits and clock that validation applies.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub now_ms: i64,
    pub max_lateness_ms: i64,
    pub max_batch_events: usize,
}

/// How far ahead of the receive time an event may be stamped.
pub const MAX_FUTURE_MS: i64 = 5 * 60_000;
/// How many invalid events a 400 lists.
pub const MAX_DETAILS: usize = 100;

/// One invalid field of one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Detail {
    pub index: usize,
    pub field: String,
    pub reason: String,
}

/// Why a body was refused; nothing of it was accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{count} events exceed ingest.max_batch_events ({max})")]
    TooManyEvents { count: usize, max: usize },
    #[error("{events} invalid event(s), {total} problem(s)")]
    Invalid { details: Vec<Detail>, total: usize, events: usize },
}

/// A validated event; strings borrow from the body where they can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub id: Cow<'a, str>,
    pub customer: Cow<'a, str>,
    pub meter: MeterId,
    /// Raw units at the meter's precision (for `count` meters: one unit).
    pub raw: i64,
    pub ts: i64,
    /// Sorted by key.
    pub properties: PropertyList<'a>,
}

/// Event properties as `(key, value)` pairs sorted by key.
pub type PropertyList<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

impl Event<'_> {
    /// Hash of the sorted properties; 0 when there are none.
    pub fn props_hash(&self) -> u64 {
        props_hash(&self.properties)
    }
}

/// Re-exported: the properties hash keys minute buckets (counters state).
pub use crate::counters::props_hash;

/// Splits a JSON body (object or array) into raw values.
pub fn split_json(body: &[u8], max: usize) -> Result<Vec<&RawValue>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| ParseError::InvalidJson(format!("not UTF-8: {e}")))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(text);
        let values =
            de.deserialize_seq(Bounded { max, seed: std::marker::PhantomData::<&RawValue> }).map_err(|e| too_many_or_json(e, max))?;
        de.end().map_err(|e| ParseError::InvalidJson(e.to_string()))?;
        return Ok(values);
    }
    let one: &RawValue = serde_json::from_str(text).map_err(|e| ParseError::InvalidJson(e.to_string()))?;
    Ok(vec![one])
}

/// Splits an NDJSON body into raw values; blank lines are skipped.
pub fn split_ndjson(body: &[u8], max: usize) -> Result<Vec<&RawValue>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| ParseError::InvalidJson(format!("not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if out.len() == max {
            let count = max + 1 + text.split('\n').skip(n + 1).filter(|l| !l.trim().is_empty()).count();
            return Err(ParseError::TooManyEvents { count, max });
        }
        let v: &RawValue = serde_json::from_str(line).map_err(|e| ParseError::InvalidJson(format!("line {}: {e}", n + 1)))?;
        out.push(v);
    }
    Ok(out)
}

const TOO_MANY: &str = "too many events: ";

/// Collects array elements with `seed`, stopping past `max` (the error carries
/// the full count, for the 413 message).
struct Bounded<S> {
    max: usize,
    seed: S,
}

impl<'de, S: de::DeserializeSeed<'de> + Copy> Visitor<'de> for Bounded<S> {
    type Value = Vec<S::Value>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(self.max));
        while let Some(v) = seq.next_element_seed(self.seed)? {
            if out.len() == self.max {
                let mut count = self.max + 1;
                while seq.next_element::<de::IgnoredAny>()?.is_some() {
                    count += 1;
                }
                return Err(de::Error::custom(format!("{TOO_MANY}{count}")));
            }
            out.push(v);
        }
        Ok(out)
    }
}

/// An event's fields as raw JSON slices, plus field-level problems found while
/// reading them (duplicates, unknown names).
#[derive(Default)]
struct RawFields<'a> {
    id: Option<&'a RawValue>,
    customer: Option<&'a RawValue>,
    meter: Option<&'a RawValue>,
    quantity: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    properties: Option<&'a RawValue>,
    problems: Vec<(String, String)>,
}

/// One element of a batch: an object's raw fields, or something else.
enum Elem<'a> {
    Object(RawFields<'a>),
    NotObject,
}

/// Reads one element in the same pass that splits the batch: objects into
/// [`RawFields`], anything else (consumed and dropped) into `NotObject`.
#[derive(Clone, Copy)]
struct ElemVisitor;

impl<'de> Visitor<'de> for ElemVisitor {
    type Value = Elem<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = RawFields::default();
        while let Some(key) = map.next_key::<Str<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            let slot = match key.0.as_ref() {
                "id" => &mut out.id,
                "customer" => &mut out.customer,
                "meter" => &mut out.meter,
                "quantity" => &mut out.quantity,
                "timestamp" => &mut out.timestamp,
                "properties" => &mut out.properties,
                other => {
                    out.problems.push((other.to_string(), "unknown field".to_string()));
                    continue;
                }
            };
            if slot.is_some() {
                out.problems.push((key.0.into_owned(), "appears twice".to_string()));
            }
            *slot = Some(value);
        }
        Ok(Elem::Object(out))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Elem::NotObject)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Elem::NotObject)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Elem::NotObject)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Elem::NotObject)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Elem::NotObject)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Elem::NotObject)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Elem::NotObject)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for ElemVisitor {
    type Value = Elem<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn too_many_or_json(e: serde_json::Error, max: usize) -> ParseError {
    let text = e.to_string();
    match text.strip_prefix(TOO_MANY) {
        Some(rest) => {
            let count = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(max + 1);
            ParseError::TooManyEvents { count, max }
        }
        None => ParseError::InvalidJson(text),
    }
}

/// Parses and validates a whole body in one pass over the JSON: the ingest path.
pub fn parse_batch<'a>(body: &'a [u8], ndjson: bool, catalog: &Catalog, rules: &Rules) -> Result<Vec<Event<'a>>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| ParseError::InvalidJson(format!("not UTF-8: {e}")))?;
    let max = rules.max_batch_events;
    let elems = if ndjson {
        let mut out = Vec::new();
        for (n, line) in text.split('\n').enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            if out.len() == max {
                let count = max + 1 + text.split('\n').skip(n + 1).filter(|l| !l.trim().is_empty()).count();
                return Err(ParseError::TooManyEvents { count, max });
            }
            let mut de = serde_json::Deserializer::from_str(line);
            let elem = de
                .deserialize_any(ElemVisitor)
                .and_then(|e| de.end().map(|()| e))
                .map_err(|e| ParseError::InvalidJson(format!("line {}: {e}", n + 1)))?;
            out.push(elem);
        }
        out
    } else {
        let mut de = serde_json::Deserializer::from_str(text);
        let elems = if text.trim_start().starts_with('[') {
            de.deserialize_seq(Bounded { max, seed: ElemVisitor }).map_err(|e| too_many_or_json(e, max))?
        } else {
            vec![de.deserialize_any(ElemVisitor).map_err(|e| ParseError::InvalidJson(e.to_string()))?]
        };
        de.end().map_err(|e| ParseError::InvalidJson(e.to_string()))?;
        elems
    };
    collect_valid(elems.into_iter().map(|e| validate_elem(e, catalog, rules)))
}

/// A string that borrows from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads a raw JSON value as a string, or says why not.
fn as_str(raw: &RawValue) -> Result<Cow<'_, str>, &'static str> {
    let text = raw.get();
    if !text.starts_with('"') {
        return Err("must be a string");
    }
    // Fast path: no escapes, borrow the bytes between the quotes.
    if !text.contains('\\') {
        return Ok(Cow::Borrowed(&text[1..text.len() - 1]));
    }
    serde_json::from_str::<String>(text).map(Cow::Owned).map_err(|_| "must be a string")
}

/// Validates one raw event. Problems are `(field, reason)` pairs.
pub fn validate_event<'a>(raw: &'a RawValue, catalog: &Catalog, rules: &Rules) -> Result<Event<'a>, Vec<(String, String)>> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match de.deserialize_any(ElemVisitor) {
        Ok(elem) => validate_elem(elem, catalog, rules),
        Err(_) => Err(not_an_object()),
    }
}

fn not_an_object() -> Vec<(String, String)> {
    vec![(String::new(), "must be a JSON object".to_string())]
}

/// Validates one element read by [`ElemVisitor`].
fn validate_elem<'a>(elem: Elem<'a>, catalog: &Catalog, rules: &Rules) -> Result<Event<'a>, Vec<(String, String)>> {
    let Elem::Object(fields) = elem else {
        return Err(not_an_object());
    };
    let mut problems = fields.problems;
    let id = required_str(fields.id, "id", &mut problems).filter(|s| {
        let ok = !s.is_empty() && s.len() <= 128;
        if !ok {
            problems.push(("id".into(), "must be 1-128 bytes".into()));
        }
        ok
    });
    let customer = required_str(fields.customer, "customer", &mut problems).filter(|s| {
        let reason = if s.is_empty() || s.len() > 256 {
            "must be 1-256 bytes"
        } else if s.chars().any(char::is_control) {
            "must not contain control characters"
        } else {
            return true;
        };
        problems.push(("customer".into(), reason.into()));
        false
    });
    let meter = required_str(fields.meter, "meter", &mut problems).and_then(|name| {
        let found = catalog.meter_by_name(&name);
        if found.is_none() {
            problems.push(("meter".into(), format!("unknown meter {name:?}")));
        }
        found
    });
    let mut bad = |field: &str, reason: &str| problems.push((field.to_string(), reason.to_string()));
    let raw_units = match (meter, fields.quantity) {
        (None, _) => None,
        (Some(m), None) => Some(m.scale()),
        (Some(m), Some(q)) => {
            let text = q.get();
            // `count` and `unique_count` (issue 25) ignore the quantity.
            let counts = matches!(m.aggregation, crate::model::Aggregation::Count | crate::model::Aggregation::UniqueCount);
            let precision = if counts { quantity::MAX_PRECISION } else { m.precision };
            match quantity::parse_decimal(text, precision) {
                Ok(_) if counts => Some(m.scale()),
                Ok(v) => Some(v),
                Err(quantity::QuantityError::NotANumber) => {
                    bad("quantity", "must be a number");
                    None
                }
                Err(e) => {
                    bad("quantity", &e.to_string());
                    None
                }
            }
        }
    };
    let ts = match fields.timestamp {
        None => Some(rules.now_ms),
        Some(t) => match parse_timestamp(t) {
            Err(r) => {
                bad("timestamp", r);
                None
            }
            Ok(ts) if ts > rules.now_ms + MAX_FUTURE_MS => {
                bad("timestamp", "is more than 5 minutes in the future");
                None
            }
            Ok(ts) if ts < rules.now_ms - rules.max_lateness_ms => {
                bad("timestamp", "is older than ingest.max_lateness");
                None
            }
            Ok(ts) => Some(ts),
        },
    };
    let properties = match fields.properties {
        None => Some(Vec::new()),
        Some(p) => match parse_properties(p) {
            Ok(p) => Some(p),
            Err(r) => {
                bad("properties", &r);
                None
            }
        },
    };
    // Unique counts (issue 25): the event names the value it counts.
    if let (Some(m), Some(props)) = (meter, &properties) {
        if let Some(name) = m.unique_property.as_deref() {
            if m.unique_value(props).is_none() {
                problems.push((
                    format!("properties.{name}"),
                    format!("is required: meter {:?} counts the distinct values of this property", m.name),
                ));
            }
        }
    }
    match (id, customer, meter, raw_units, ts, properties) {
        (Some(id), Some(customer), Some(meter), Some(raw), Some(ts), Some(properties)) if problems.is_empty() => {
            Ok(Event { id, customer, meter: meter.id, raw, ts, properties })
        }
        _ => Err(problems),
    }
}

/// A field that must be present and a string; records why not.
fn required_str<'a>(raw: Option<&'a RawValue>, field: &str, problems: &mut Vec<(String, String)>) -> Option<Cow<'a, str>> {
    let reason = match raw.map(as_str) {
        Some(Ok(s)) => return Some(s),
        None => "is required",
        Some(Err(r)) => r,
    };
    problems.push((field.to_string(), reason.to_string()));
    None
}

fn parse_timestamp(raw: &RawValue) -> Result<i64, &'static str> {
    let text = raw.get();
    if text.starts_with('"') {
        let s = as_str(raw)?;
        return window::parse_rfc3339(&s).ok_or("must be an RFC 3339 timestamp or integer Unix milliseconds");
    }
    text.parse::<i64>().map_err(|_| "must be an RFC 3339 timestamp or integer Unix milliseconds")
}

fn parse_properties(raw: &RawValue) -> Result<PropertyList<'_>, String> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = PropertyList<'de>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = map.next_key::<Str<'de>>()? {
                let v: Str<'de> = map.next_value()?;
                if out.len() == 32 {
                    return Err(de::Error::custom("has more than 32 entries"));
                }
                if k.0.is_empty() || k.0.len() > 64 {
                    return Err(de::Error::custom(format!("key {:?} must be 1-64 bytes", k.0)));
                }
                if v.0.len() > 256 {
                    return Err(de::Error::custom(format!("value of {:?} is longer than 256 bytes", k.0)));
                }
                out.push((k.0, v.0));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut props = de.deserialize_map(V).map_err(|e| {
        let msg = e.to_string();
        // serde_json appends " at line L column C"; the position inside a property
        // object is noise to the caller.
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        if msg.starts_with("invalid type") {
            "must be an object whose values are strings".to_string()
        } else {
            msg
        }
    })?;
    props.sort_by(|a, b| a.0.cmp(&b.0));
    if props.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err("has a duplicate key".to_string());
    }
    Ok(props)
}

/// Validates every event; a batch is all-or-nothing.
pub fn validate_batch<'a>(values: &[&'a RawValue], catalog: &Catalog, rules: &Rules) -> Result<Vec<Event<'a>>, ParseError> {
    collect_valid(values.iter().map(|raw| validate_event(raw, catalog, rules)))
}

/// All the events, or every problem (up to [`MAX_DETAILS`] listed).
fn collect_valid<'a>(results: impl Iterator<Item = Result<Event<'a>, Vec<(String, String)>>>) -> Result<Vec<Event<'a>>, ParseError> {
    let mut events = Vec::with_capacity(results.size_hint().0);
    let mut details = Vec::new();
    let mut total = 0;
    let mut bad_events = 0;
    for (index, result) in results.enumerate() {
        match result {
            Ok(e) => events.push(e),
            Err(problems) => {
                bad_events += 1;
                total += problems.len();
                for (field, reason) in problems {
                    if details.len() < MAX_DETAILS {
                        details.push(Detail { index, field, reason });
                    }
                }
            }
        }
    }
    if total > 0 {
        return Err(ParseError::Invalid { details, total, events: bad_events });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn catalog() -> std::sync::Arc<Catalog> {
        let text = include_str!("../../config/examples/interview-platform.toml");
        match crate::config::Config::parse(text, "t").and_then(|c| c.validate("t")) {
            Ok(v) => v.catalog,
            Err(e) => panic!("{e}"),
        }
    }

    /// The one-pass path used by ingest and the two-pass functions agree.
    fn two_pass<'a>(body: &'a [u8], ndjson: bool, catalog: &Catalog, rules: &Rules) -> Result<Vec<Event<'a>>, ParseError> {
        let values = if ndjson { split_ndjson(body, rules.max_batch_events)? } else { split_json(body, rules.max_batch_events)? };
        validate_batch(&values, catalog, rules)
    }

    fn same(a: &Result<Vec<Event<'_>>, ParseError>, b: &Result<Vec<Event<'_>>, ParseError>) -> bool {
        match (a, b) {
            (Ok(x), Ok(y)) => x == y,
            // Syntax error texts may differ in position wording; the kind must match.
            (Err(ParseError::InvalidJson(_)), Err(ParseError::InvalidJson(_))) => true,
            (Err(x), Err(y)) => x == y,
            _ => false,
        }
    }

    const FRAGMENTS: &[&str] = &[
        r#"{"id":"a","customer":"c","meter":"interviews"}"#,
        r#"{"id":"b","customer":"c","meter":"interview_minutes","quantity":1.25,"properties":{"k":"v"}}"#,
        r#"{"id":"c","customer":"c\u0001","meter":"nope","quantity":-1,"colour":1}"#,
        r#"{"id":"d","customer":"c","meter":"interviews","timestamp":"2001-01-01T00:00:00Z"}"#,
        r#"{"id":"e","id":"f","customer":"c","meter":"interviews","properties":{"a":1}}"#,
        r#"[1,2]"#,
        r#""text""#,
        r#"null"#,
        r#"42"#,
        r#"{"#,
        r#"}"#,
        r#","#,
    ];

    proptest! {
        #[test]
        fn one_pass_agrees_with_two_passes(picks in proptest::collection::vec(0..FRAGMENTS.len(), 0..12), array in any::<bool>(), ndjson in any::<bool>(), max in 1_usize..8) {
            let catalog = catalog();
            let rules = Rules { now_ms: 1_700_000_000_000, max_lateness_ms: 35 * 86_400_000, max_batch_events: max };
            let parts: Vec<&str> = picks.iter().map(|&i| FRAGMENTS[i]).collect();
            let body = if ndjson { parts.join("\n") } else if array { format!("[{}]", parts.join(",")) } else { parts.join("") };
            let one = parse_batch(body.as_bytes(), ndjson, &catalog, &rules);
            let two = two_pass(body.as_bytes(), ndjson, &catalog, &rules);
            prop_assert!(same(&one, &two), "body {body:?}\none {one:?}\ntwo {two:?}");
        }
    }
}
