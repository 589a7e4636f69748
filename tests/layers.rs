//! The layer check: meterd's modules form layers, and a module may only use
//! modules of lower layers, or of its own layer without a cycle. This test reads
//! every file under `src/`, collects its non-test imports (`crate::x`,
//! `use crate::{a, b::c}`, `super::` resolved to its module, `meterd::x` in the
//! binary; `#[cfg(test)]` items are skipped), and fails naming the file and the
//! import of every upward import and every cycle within a layer.
//!
//! A second check keeps the usage seam the one place where usage changes: no
//! file outside `counters` and `usage` calls a counters write.
//!
//! The table below *is* the architecture (docs/architecture.md explains it): a
//! new top-level module must be placed in it, or the test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom up; each top-level module of the crate is in one.
const LAYERS: &[(&str, &[&str])] = &[
    // Leaves: know no domain type.
    ("leaf", &["clock", "duration", "backoff", "telemetry", "keyhash", "mac", "priority"]),
    ("model", &["model"]),
    ("config", &["config"]),
    // State: in-memory state, its durability and the stores.
    (
        "state",
        &[
            "counters",
            /* bounded consume answers */ "answers",
            "wal",
            "dedupe",
            "entitlements",
            "store",
            "redis_link",
            "rejected",
            "usage",
            "health",
            "credits",
            /* issue 19 */ "holds",
        ],
    ),
    // The container of the state (no service types).
    ("engine", &["engine"]),
    // Domain services and background tasks.
    (
        "service",
        &[
            "ingest",
            "limits",
            "history",
            "sync",
            "flush",
            "report",
            "raw_export",
            /* issue 20 */ "billing_sync",
            /* issue 23 */ "backup",
            /* issue 18 */ "grants",
            /* issue 17 */ "notify",
            /* issue 19 */ "adjust",
            /* issue 19 */ "reservations",
        ],
    ),
    ("http", &["http"]),
    ("app", &["app", /* issue 23: config reload */ "reload"]),
    // The crate root (re-exports) and the binary.
    ("root", &["lib", "main"]),
];

/// Imports the layers would allow but the design forbids: (from, to, why).
const FORBIDDEN: &[(&str, &str, &str)] = &[("wal", "config", "the WAL has its own settings (`WalConfig`); `app` maps the config to them")];

/// One import of one file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    file: String,
    /// The importing top-level module.
    from: String,
    /// The imported top-level module.
    to: String,
    /// The path as written, for the message.
    text: String,
}

/// Blanks out comments, string and char literals (keeping newlines and
/// length), so braces and `crate::` inside them are not seen.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in out.iter_mut().take(to.min(b.len())).skip(from) {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
                let start = i + 2 + hashes;
                let end = src[start..].find(&close).map_or(b.len(), |e| start + e + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{..}'), else a lifetime.
                let end = if b.get(i + 1) == Some(&b'\\') {
                    src[i + 2..].find('\'').map(|e| i + 2 + e + 1)
                } else {
                    let c = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + c) == Some(&b'\'')).then_some(i + 2 + c)
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i, end);
                        i = end;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Removes every item marked `#[cfg(test)]` (a module, a function, a use).
fn drop_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // The item ends at its first `;` outside braces, or at its body's `}`.
        let (mut depth, mut end) = (0usize, after.len());
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        out.extend(after[..end].chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The module path of a file under `src/` (`wal/mod.rs` → `[wal]`).
fn module_path(rel: &str) -> Vec<String> {
    let rel = rel.trim_end_matches(".rs");
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        return vec![];
    }
    parts
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level names a path after `crate::` reaches: one, or each one of a
/// `{a, b::c}` group.
fn heads(after: &str) -> Vec<String> {
    let after = after.trim_start();
    if let Some(group) = after.strip_prefix('{') {
        let (mut depth, mut parts, mut start) = (0usize, Vec::new(), 0);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    parts.push(&group[start..i]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&group[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.iter().map(|p| ident_at(p.trim_start()).to_string()).filter(|h| !h.is_empty() && h != "self").collect()
    } else {
        vec![ident_at(after).to_string()].into_iter().filter(|h| !h.is_empty()).collect()
    }
}

/// The imports of one file (`rel`: its path under `src/`).
fn imports_of(rel: &str, src: &str) -> Vec<Import> {
    let code = drop_test_items(&strip(src));
    let path = module_path(rel);
    let is_main = rel == "main.rs";
    let from = if is_main { "main".to_string() } else { path.first().cloned().unwrap_or_else(|| "lib".into()) };
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut found = Vec::new();
    let prefixes: &[&str] = if is_main { &["meterd::", "crate::"] } else { &["crate::", "super::"] };
    for prefix in prefixes {
        let mut from_idx = 0;
        while let Some(pos) = code[from_idx..].find(prefix) {
            let at = from_idx + pos;
            from_idx = at + prefix.len();
            // Only whole path starts: `crate::` not preceded by an identifier or `::`.
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let text: String = code[at..].chars().take_while(|&c| c != ';' && c != '\n').collect();
            let text = format!("line {}: {}", line_of(at), text.trim());
            if is_main && code[at + prefix.len()..].starts_with(|c: char| c.is_ascii_uppercase()) {
                // `meterd::AppHandle`: a re-export of the crate root.
                found.push(Import { file: rel.into(), from: from.clone(), to: "lib".into(), text });
                continue;
            }
            if *prefix == "super::" {
                // Climb one module per `super::` from the file's own module.
                let mut dir = path.clone();
                let mut rest = &code[at..];
                while let Some(r) = rest.strip_prefix("super::") {
                    dir.pop();
                    rest = r;
                }
                if !dir.is_empty() {
                    // Still inside the same top-level module.
                    continue;
                }
                for head in heads(rest) {
                    found.push(Import { file: rel.into(), from: from.clone(), to: head, text: text.clone() });
                }
                continue;
            }
            for head in heads(&code[at + prefix.len()..]) {
                found.push(Import { file: rel.into(), from: from.clone(), to: head, text: text.clone() });
            }
        }
    }
    found.retain(|i| i.to != i.from);
    found
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

/// Every violation of the layer rules among `files` (path under `src/`, text).
fn violations(files: &[(String, String)]) -> Vec<String> {
    let imports: Vec<Import> = files.iter().flat_map(|(rel, src)| imports_of(rel, src)).collect();
    let mut problems = BTreeSet::new();
    let mut same_layer: BTreeMap<String, BTreeMap<String, Vec<&Import>>> = BTreeMap::new();
    for i in &imports {
        let (Some(from), Some(to)) = (layer_of(&i.from), layer_of(&i.to)) else {
            let unknown = if layer_of(&i.from).is_none() { &i.from } else { &i.to };
            problems.insert(format!("src/{}: `{}` is in no layer (add it to LAYERS in tests/layers.rs): {}", i.file, unknown, i.text));
            continue;
        };
        if let Some((_, _, why)) = FORBIDDEN.iter().find(|(f, t, _)| *f == i.from && *t == i.to) {
            problems.insert(format!("src/{}: import from {} to {} is forbidden ({why}): {}", i.file, i.from, i.to, i.text));
        } else if to > from {
            problems.insert(format!(
                "src/{}: upward import from {} ({}) to {} ({}): {}",
                i.file, i.from, LAYERS[from].0, i.to, LAYERS[to].0, i.text
            ));
        } else if to == from {
            same_layer.entry(i.from.clone()).or_default().entry(i.to.clone()).or_default().push(i);
        }
    }
    // A cycle within a layer: an edge a → b where b reaches a.
    let reaches = |start: &str, goal: &str| {
        let (mut seen, mut stack) = (BTreeSet::new(), vec![start.to_string()]);
        while let Some(m) = stack.pop() {
            if m == goal {
                return true;
            }
            if seen.insert(m.clone()) {
                stack.extend(same_layer.get(&m).into_iter().flat_map(|e| e.keys().cloned()));
            }
        }
        false
    };
    for (a, edges) in &same_layer {
        for (b, uses) in edges {
            if reaches(b, a) {
                for i in uses {
                    problems.insert(format!("src/{}: import from {} to {} closes a cycle within a layer: {}", i.file, a, b, i.text));
                }
            }
        }
    }
    problems.into_iter().collect()
}

fn read_tree(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("src/ is readable").map(|e| e.expect("a readable entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(&path, base, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(base).expect("under src/").to_string_lossy().replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&path).expect("a readable source file")));
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    assert!(files.len() > 50, "read only {} files under src/", files.len());
    let problems = violations(&files);
    assert!(problems.is_empty(), "{} layer violations:\n{}", problems.len(), problems.join("\n"));
}

/// Calls that change window counters or minute buckets. Outside `counters`
/// (which implements them) and `usage` (the seam), none may appear: every
/// change of usage goes through `usage::UsageSeam`, which tells its observers.
const COUNTER_WRITES: &[&str] = &[
    ".windows.set(",
    ".with_cell(",
    ".add_within(",
    ".with_each_cell_hashed(",
    "counters().apply",
    "counters.apply",
    "counters().fold(",
    "counters.fold(",
    ".write_guard()",
];

/// Every write to the counters that bypasses the usage seam.
fn seam_bypasses(files: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (rel, src) in files {
        if rel.starts_with("counters/") || rel == "usage.rs" {
            continue;
        }
        let code = drop_test_items(&strip(src));
        for (n, line) in code.lines().enumerate() {
            for call in COUNTER_WRITES {
                if line.contains(call) {
                    problems.push(format!(
                        "src/{rel}: line {}: `{call}` changes the counters outside the usage seam: {}",
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn usage_changes_only_through_the_seam() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    let problems = seam_bypasses(&files);
    assert!(problems.is_empty(), "{} writes bypass the usage seam:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_seam_check_finds_a_direct_write() {
    let files = tree(&[
        ("limits/mod.rs", "fn f(e: &Engine) {\n    e.counters().windows.set(key, 1, 2);\n}\n#[cfg(test)]\nmod tests { fn g() { c.counters.apply(&u); } }\n"),
        ("usage.rs", "fn f(&self) { self.counters.apply(u); }\n"),
        ("counters/mod.rs", "fn f(&self) { self.windows.with_cell(k, |c| c); }\n"),
        ("sync/counters.rs", "// counters.apply( in a comment\nfn f() { engine.usage().apply(&u, Origin::Live); }\n"),
    ]);
    let problems = seam_bypasses(&files);
    assert_eq!(
        problems,
        vec![
            "src/limits/mod.rs: line 2: `.windows.set(` changes the counters outside the usage seam: e.counters().windows.set(key, 1, 2);"
                .to_string()
        ]
    );
}

fn tree(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect()
}

#[test]
fn the_checker_finds_an_upward_import() {
    let files = tree(&[
        ("counters/mod.rs", "use crate::model::Meter;\nuse crate::limits::Reason;\n"),
        ("limits/mod.rs", "use crate::counters::Usage;\n"),
    ]);
    let problems = violations(&files);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("src/counters/mod.rs: upward import from counters (state) to limits (service)"), "{problems:?}");
    assert!(problems[0].contains("line 2: crate::limits::Reason"), "{problems:?}");
}

#[test]
fn the_checker_finds_a_cycle_within_a_layer_and_names_both_sides() {
    let files = tree(&[
        ("wal/record.rs", "fn f() { let _ = crate::counters::hash::KeyHash; }\n"),
        ("counters/buckets.rs", "use crate::{model::Meter, wal::WalMark};\n"),
        ("store/mod.rs", "use crate::wal::WalMark;\n"),
        ("wal/mod.rs", "pub fn sync_for(d: crate::config::Durability) {}\n"),
    ]);
    let problems = violations(&files);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("src/wal/mod.rs: import from wal to config is forbidden")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("src/wal/record.rs: import from wal to counters closes a cycle")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("src/counters/buckets.rs: import from counters to wal closes a cycle")), "{problems:?}");
}

#[test]
fn the_checker_resolves_super_and_groups_and_skips_tests_comments_and_strings() {
    let files = tree(&[
        // `super::` from a top-level file reaches the crate root's children.
        ("engine.rs", "use super::ingest::IngestError;\n"),
        // Inside one top-level module: not an import of another module.
        ("limits/strict.rs", "use super::{answer, decide};\n"),
        ("model/plan.rs", "use crate::{duration::D, limits::{Reason, Verdict}};\n"),
        (
            "wal/mod.rs",
            "// crate::engine::now_ms in a comment\nconst S: &str = \"crate::engine\";\nconst R: &str = r#\"crate::app\"#;\n\
             const C: char = '{';\n#[cfg(test)]\nmod tests {\n    use crate::engine::now_ms;\n    fn f() { let _ = '}'; }\n}\n\
             #[cfg(test)]\nuse crate::app::AppHandle;\npub fn g() {}\n",
        ),
        ("main.rs", "use meterd::app::AppHandle;\nfn main() {}\n"),
        ("newthing.rs", "use crate::model::Meter;\n"),
    ]);
    let problems = violations(&files);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems.iter().any(|p| p.starts_with("src/engine.rs: upward import from engine (engine) to ingest (service)")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("src/model/plan.rs: upward import from model (model) to limits (service)")),
        "{problems:?}"
    );
    assert!(problems.iter().any(|p| p.starts_with("src/newthing.rs: `newthing` is in no layer")), "{problems:?}");
}
