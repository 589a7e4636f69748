//! The keys the config file may hold and the TOML type of each, and the walk that
//! checks a parsed file against them before it is deserialized: every unknown key
//! (with the nearest known key when it looks like a typo) and every value of the
//! wrong type becomes a problem and is set aside, so that deserializing the rest
//! cannot fail and validation still sees everything else.
//!
//! Kept beside `raw`'s structs; a test checks that the two agree.

use super::ConfigProblem;
use std::collections::HashMap;
use toml::Value;

/// The TOML type a key's value must have.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Str,
    /// A string such as `"5s"` (its content is checked by `validate`).
    Dur,
    Int,
    Bool,
    /// An array of strings.
    Strs,
    /// An array of integers (notification thresholds, issue 17).
    Ints,
    /// A table of free-form keys, each a boolean (plan features).
    Bools,
    /// A table of free-form keys whose values are checked later (plan limits).
    Map,
    Table(&'static [Field]),
    /// An array of tables, each named by its `name` key in paths.
    Tables(&'static [Field]),
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Dur => "a duration string such as \"5s\" or \"200ms\"",
            Kind::Int => "an integer",
            Kind::Bool => "true or false",
            Kind::Strs => "an array of strings",
            Kind::Ints => "an array of integers",
            Kind::Bools | Kind::Map | Kind::Table(_) => "a table",
            Kind::Tables(_) => "an array of tables ([[...]])",
        }
    }
}

pub(super) type Field = (&'static str, Kind);

use Kind::{Bool, Bools, Dur, Int, Ints, Map, Str, Strs, Table, Tables};

pub(super) const ROOT: &[Field] = &[
    (
        "server",
        Table(&[
            ("listen", Str),
            ("instance_id", Str),
            ("shutdown_grace", Dur),
            ("header_read_timeout", Dur),
            ("body_read_timeout", Dur),
            ("idle_timeout", Dur),
            ("max_connections", Int),
            ("connection_threads", Int),
            // Portal tokens (issue 20).
            ("portal_secret_env", Str),
        ]),
    ),
    (
        "storage",
        Table(&[
            ("data_dir", Str),
            ("durability", Str),
            ("flush_interval", Dur),
            ("wal_sync_interval", Dur),
            ("wal_sync_spacing", Dur),
            ("wal_segment_bytes", Int),
            ("max_wal_bytes", Int),
            ("max_pending_buckets", Int),
        ]),
    ),
    (
        "ingest",
        Table(&[
            ("max_body_bytes", Int),
            ("max_batch_events", Int),
            ("max_lateness", Dur),
            ("dedupe_window", Dur),
            ("dedupe_memory", Str),
            ("max_unique_values", Int),
        ]),
    ),
    (
        "redis",
        Table(&[
            ("url", Str),
            ("urls", Strs),
            ("key_prefix", Str),
            ("sync_interval", Dur),
            ("timeout", Dur),
            ("entitlements_ttl", Dur),
            ("strict_when_unavailable", Str),
        ]),
    ),
    ("clickhouse", Table(&[("url", Str), ("database", Str), ("flush_interval", Dur), ("raw_events", Bool)])),
    (
        "stripe",
        Table(&[
            ("api_key_env", Str),
            ("api_base", Str),
            ("meter_events_base", Str),
            ("mode", Str),
            ("period", Str),
            ("grace", Dur),
            ("interval", Dur),
            ("max_requests_per_second", Int),
            ("request_timeout", Dur),
            // Stripe subscription sync (issue 20).
            ("webhooks", Table(&[("secret_env", Str), ("tolerance", Dur), ("plans", Map)])),
        ]),
    ),
    // Threshold notifications (issue 17).
    (
        "notifications",
        Table(&[
            ("thresholds", Ints),
            ("retry_for", Dur),
            ("timeout", Dur),
            ("endpoints", Tables(&[("name", Str), ("url", Str), ("secret_env", Str), ("types", Strs)])),
        ]),
    ),
    ("metrics", Table(&[("listen", Str)])),
    (
        "meters",
        Tables(&[
            ("name", Str),
            ("aggregation", Str),
            ("precision", Int),
            ("stripe_event_name", Str),
            ("unique_property", Str),
            ("group_by", Strs),
        ]),
    ),
    ("plans", Tables(&[("name", Str), ("default", Bool), ("features", Bools), ("limits", Map)])),
    (
        "auth",
        Table(&[(
            "keys",
            Tables(&[
                ("name", Str),
                ("key_sha256", Str),
                ("key_env", Str),
                ("scopes", Strs),
                ("rate_limit_per_second", Int),
                ("rate_limit_burst", Int),
            ]),
        )]),
    ),
];

/// Checks `table` against `fields`, removing (and reporting) what does not fit.
pub(super) fn check(table: &mut toml::Table, fields: &[Field], prefix: &str, source: &str, problems: &mut Vec<ConfigProblem>) {
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let path = join(prefix, &key);
        let Some(&(_, kind)) = fields.iter().find(|(name, _)| *name == key) else {
            let hint = nearest(&key, fields.iter().map(|(name, _)| *name)).map(|n| format!(" (did you mean {n}?)")).unwrap_or_default();
            problems.push(ConfigProblem { key: path, reason: format!("unknown key in {source}{hint}") });
            table.remove(&key);
            continue;
        };
        let keep = table.get_mut(&key).is_none_or(|value| check_value(value, kind, &path, source, problems));
        if !keep {
            table.remove(&key);
        }
    }
}

/// Whether `value` fits `kind` (after removing what does not fit inside it).
fn check_value(value: &mut Value, kind: Kind, path: &str, source: &str, problems: &mut Vec<ConfigProblem>) -> bool {
    match (kind, value) {
        (Str | Dur, Value::String(_)) | (Int, Value::Integer(_)) | (Bool, Value::Boolean(_)) | (Map, Value::Table(_)) => true,
        (Strs, Value::Array(items)) => {
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                if !item.is_str() {
                    problems.push(wrong_type(&format!("{path}[{i}]"), "a string", item));
                    ok = false;
                }
            }
            ok
        }
        // Notification thresholds (issue 17).
        (Ints, Value::Array(items)) => {
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                if !item.is_integer() {
                    problems.push(wrong_type(&format!("{path}[{i}]"), "an integer", item));
                    ok = false;
                }
            }
            ok
        }
        (Bools, Value::Table(entries)) => {
            let bad: Vec<String> = entries.iter().filter(|(_, v)| !v.is_bool()).map(|(k, _)| k.clone()).collect();
            for key in bad {
                if let Some(v) = entries.remove(&key) {
                    problems.push(wrong_type(&join(path, &key), "true or false", &v));
                }
            }
            true
        }
        (Table(fields), Value::Table(t)) => {
            check(t, fields, path, source, problems);
            true
        }
        (Tables(fields), Value::Array(items)) => {
            let names: Vec<Option<&str>> = items.iter().map(|item| item.get("name").and_then(Value::as_str)).collect();
            let paths = element_paths(path, &names);
            let mut ok = true;
            for (item, at) in items.iter_mut().zip(paths) {
                match item {
                    Value::Table(t) => check(t, fields, &at, source, problems),
                    other => {
                        problems.push(wrong_type(&at, "a table", other));
                        ok = false;
                    }
                }
            }
            ok
        }
        (kind, other) => {
            problems.push(wrong_type(path, kind.expected(), other));
            false
        }
    }
}

fn wrong_type(path: &str, expected: &str, found: &Value) -> ConfigProblem {
    ConfigProblem { key: path.to_string(), reason: format!("must be {expected}, not {} {found}", article(found.type_str())) }
}

fn article(type_name: &str) -> String {
    let vowel = type_name.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {type_name}", if vowel { "an" } else { "a" })
}

fn join(prefix: &str, key: &str) -> String {
    let key = segment(key);
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// A key as written in a path: bare when TOML allows it, else quoted.
pub(super) fn segment(key: &str) -> String {
    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// The paths of the elements of an array of tables: `meters.api_calls` by the
/// element's name, or `meters[2]` when it has none or shares it with another.
pub(super) fn element_paths(prefix: &str, names: &[Option<&str>]) -> Vec<String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for name in names.iter().flatten() {
        *count.entry(name).or_default() += 1;
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| match name {
            Some(n) if !n.is_empty() && count.get(n) == Some(&1) => join(prefix, n),
            _ => format!("{prefix}[{i}]"),
        })
        .collect()
}

/// The known key closest to `key`, if it is close enough to be a typo of it.
fn nearest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let key = key.to_ascii_lowercase();
    known.map(|k| (edit_distance(&key, k), k)).filter(|&(d, k)| d <= (k.len() / 3).clamp(1, 3)).min_by_key(|&(d, _)| d).map(|(_, k)| k)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_get_the_nearest_key_and_strangers_get_none() {
        let known = ["flush_interval", "durability", "data_dir"];
        assert_eq!(nearest("flush_intervall", known.into_iter()), Some("flush_interval"));
        assert_eq!(nearest("Durability", known.into_iter()), Some("durability"));
        assert_eq!(nearest("datadir", known.into_iter()), Some("data_dir"));
        assert_eq!(nearest("colour", known.into_iter()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn elements_are_named_by_name_unless_missing_or_shared() {
        let paths = element_paths("plans", &[Some("starter"), None, Some("a b"), Some("x"), Some("x"), Some("")]);
        assert_eq!(paths, ["plans.starter", "plans[1]", "plans.\"a b\"", "plans[3]", "plans[4]", "plans[5]"]);
    }
}
