//! Turns repeated runs (JSON lines from `meterd-loadtest ... --json`) into the
//! Markdown tables of BENCHMARKS.md: each figure is the median of its runs with
//! the min and max beside it, ratios are of medians measured in the same
//! session, and the performance bar is checked against them.

use crate::stats::RunResult;
use std::collections::BTreeMap;

/// Median, min and max of a set of runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// None for no values; NaNs are ignored. The median of an even count is the
/// mean of the two middle values.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Spread { median, min: v[0], max: v[n - 1], runs: n })
}

/// `1.23 M`, `45.6 k`, `789`.
pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn show(s: &Spread) -> String {
    if s.runs == 1 {
        format!("{} (1 run)", human(s.median))
    } else {
        format!("**{}** ({}–{})", human(s.median), human(s.min), human(s.max))
    }
}

fn mode_of(r: &RunResult) -> String {
    match r.rate {
        Some(rate) => format!("open {}/s", human(rate)),
        None => "closed".to_string(),
    }
}

/// The figure a scenario is judged by: events/s for ingest, requests/s otherwise.
fn is_ingest(scenario: &str) -> bool {
    scenario.starts_with("ingest")
}

/// Runs of one (scenario, mode, target).
struct Group<'a> {
    runs: Vec<&'a RunResult>,
}

impl Group<'_> {
    fn of(&self, f: impl Fn(&RunResult) -> f64) -> Option<Spread> {
        spread(&self.runs.iter().map(|r| f(r)).collect::<Vec<_>>())
    }
    fn throughput(&self, scenario: &str) -> Option<Spread> {
        if is_ingest(scenario) {
            self.of(|r| r.events_per_s)
        } else {
            self.of(|r| r.requests_per_s)
        }
    }
}

/// Median server CPU per event or request, over the runs that measured it.
fn cpu_per_op(g: &Group<'_>) -> Option<f64> {
    spread(&g.runs.iter().filter_map(|r| r.server_cpu_us_per_op).collect::<Vec<_>>()).map(|s| s.median)
}

const TARGET_ORDER: [&str; 7] = ["meterd", "meterd-spaced", "meterd-none", "ceiling", "limitador", "postgres", "redis"];

fn target_rank(t: &str) -> usize {
    TARGET_ORDER.iter().position(|x| *x == t).unwrap_or(TARGET_ORDER.len())
}

type Key = (String, String);

fn groups(results: &[RunResult]) -> (Vec<Key>, BTreeMap<(Key, String), Group<'_>>) {
    let mut order: Vec<Key> = Vec::new();
    let mut map: BTreeMap<(Key, String), Group<'_>> = BTreeMap::new();
    for r in results {
        let key = (r.scenario.clone(), mode_of(r));
        if !order.contains(&key) {
            order.push(key.clone());
        }
        map.entry((key, r.target.clone())).or_insert_with(|| Group { runs: Vec::new() }).runs.push(r);
    }
    (order, map)
}

fn median_throughput(map: &BTreeMap<(Key, String), Group<'_>>, key: &Key, target: &str) -> Option<f64> {
    map.get(&(key.clone(), target.to_string())).and_then(|g| g.throughput(&key.0)).map(|s| s.median)
}

fn median_p99(map: &BTreeMap<(Key, String), Group<'_>>, key: &Key, target: &str) -> Option<Spread> {
    map.get(&(key.clone(), target.to_string())).and_then(|g| g.of(|r| r.latency.p99_us))
}

/// The results table, one row per (scenario, mode, target).
pub fn results_table(results: &[RunResult]) -> String {
    let (order, map) = groups(results);
    let mut out = String::from(
        "| scenario | mode | target | runs | requests/s median (min–max) | events/s median (min–max) | p50 µs | p99 µs (min–max) | p99.9 µs | server CPU µs/op | errors | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for key in &order {
        let mut targets: Vec<&String> = map.keys().filter(|(k, _)| k == key).map(|(_, t)| t).collect();
        targets.sort_by_key(|t| (target_rank(t), t.to_string()));
        for t in targets {
            let g = &map[&(key.clone(), t.clone())];
            let (Some(rps), Some(eps), Some(p50), Some(p99), Some(p999)) = (
                g.of(|r| r.requests_per_s),
                g.of(|r| r.events_per_s),
                g.of(|r| r.latency.p50_us),
                g.of(|r| r.latency.p99_us),
                g.of(|r| r.latency.p999_us),
            ) else {
                continue;
            };
            let errors: u64 = g.runs.iter().map(|r| r.errors + r.unsent).sum();
            let cpu = cpu_per_op(g).map_or("–".to_string(), |c| format!("{c:.2}"));
            let load = g.runs.last().map(|r| r.loadavg.clone()).unwrap_or_default();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} ({:.0}–{:.0}) | {:.0} | {} | {} | {} |\n",
                key.0,
                key.1,
                t,
                g.runs.len(),
                show(&rps),
                if is_ingest(&key.0) || eps.median > 0.0 { show(&eps) } else { "–".into() },
                p50.median,
                p99.median,
                p99.min,
                p99.max,
                p999.median,
                cpu,
                errors,
                load
            ));
        }
    }
    out
}

/// Whether any result is of the ceiling or of a design meterd replaces (the
/// ratios table's columns).
pub fn has_baselines(results: &[RunResult]) -> bool {
    results.iter().any(|r| matches!(r.target.as_str(), "ceiling" | "postgres" | "redis"))
}

/// meterd's throughput divided by each baseline's, per closed-loop scenario.
pub fn ratios_table(results: &[RunResult]) -> String {
    let (order, map) = groups(results);
    let mut out = String::from(
        "| scenario | meterd | meterd ÷ ceiling | meterd ÷ postgres | meterd ÷ redis | server CPU per op, meterd ÷ ceiling |\n|---|---|---|---|---|---|\n",
    );
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".to_string(),
    };
    for key in order.iter().filter(|k| k.1 == "closed") {
        let m = median_throughput(&map, key, "meterd");
        let Some(mv) = m else { continue };
        let cpu = |t: &str| map.get(&(key.clone(), t.to_string())).and_then(cpu_per_op);
        out.push_str(&format!(
            "| {} | {} {} | {} | {} | {} | {} |\n",
            key.0,
            human(mv),
            if is_ingest(&key.0) { "events/s" } else { "req/s" },
            ratio(m, median_throughput(&map, key, "ceiling")),
            ratio(m, median_throughput(&map, key, "postgres")),
            ratio(m, median_throughput(&map, key, "redis")),
            ratio(cpu("meterd"), cpu("ceiling")),
        ));
    }
    out
}

/// The targets of the Limitador comparison, in table order.
const AGAINST_LIMITADOR: [&str; 4] = ["limitador", "meterd-none", "meterd", "meterd-spaced"];

/// Limitador against meterd (`durability = "none"` as `meterd-none`, fsync as
/// `meterd`, fsync with WAL syncs spaced as `meterd-spaced`), per scenario and mode that Limitador ran: throughput, tail
/// latency, server CPU per request, and each meterd's ratios to Limitador's
/// medians. Empty when no result is Limitador's.
pub fn limitador_table(results: &[RunResult]) -> String {
    let (order, map) = groups(results);
    let mut out = String::new();
    for key in &order {
        let Some(lim) = map.get(&(key.clone(), "limitador".to_string())) else { continue };
        let (lim_rps, lim_cpu) = (lim.of(|r| r.requests_per_s).map(|s| s.median), cpu_per_op(lim));
        for t in AGAINST_LIMITADOR {
            let Some(g) = map.get(&(key.clone(), t.to_string())) else { continue };
            let (Some(rps), Some(p99), Some(p999)) = (g.of(|r| r.requests_per_s), g.of(|r| r.latency.p99_us), g.of(|r| r.latency.p999_us))
            else {
                continue;
            };
            let cpu = cpu_per_op(g);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 && t != "limitador" => format!("{:.2}×", a / b),
                _ => "–".to_string(),
            };
            // Open loop: every target is sent the same rate, so only closed loops compare throughput.
            let rps_ratio = if key.1 == "closed" { ratio(Some(rps.median), lim_rps) } else { "–".to_string() };
            let errors: u64 = g.runs.iter().map(|r| r.errors + r.unsent).sum();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {} | {} | {} | {} |\n",
                key.0,
                key.1,
                t,
                show(&rps),
                p99.median,
                p99.min,
                p99.max,
                p999.median,
                cpu.map_or("–".to_string(), |c| format!("{c:.2}")),
                rps_ratio,
                ratio(cpu, lim_cpu),
                errors
            ));
        }
    }
    if out.is_empty() {
        return out;
    }
    String::from(
        "| scenario | mode | target | requests/s median (min–max) | p99 µs (min–max) | p99.9 µs | server CPU µs/req | req/s ÷ Limitador | CPU/req ÷ Limitador | errors |\n|---|---|---|---|---|---|---|---|---|---|\n",
    ) + &out
}

/// One line of the performance bar.
#[derive(Debug, Clone, PartialEq)]
pub struct BarLine {
    pub what: String,
    pub needed: String,
    pub measured: String,
    /// None: not measured in these results.
    pub met: Option<bool>,
}

/// The bar points that these results can judge (memory and WAL replay are
/// measured by the criterion benches and are not here).
pub fn bar(results: &[RunResult], batch: usize, check_rate: f64) -> Vec<BarLine> {
    let (_, map) = groups(results);
    let closed = |s: &str| (s.to_string(), "closed".to_string());
    let batch_key = closed(&format!("ingest-batch-{batch}"));
    let single_key = closed("ingest-single");
    let check_key = ("check".to_string(), format!("open {}/s", human(check_rate)));
    let mut lines = Vec::new();

    let m_batch = median_throughput(&map, &batch_key, "meterd");
    let c_batch = median_throughput(&map, &batch_key, "ceiling");
    lines.push(BarLine {
        what: format!("batched ingest ({batch} per batch), events/s"),
        needed: "≥ 2.5 M".into(),
        measured: m_batch.map(human).unwrap_or_else(|| "–".into()),
        met: m_batch.map(|v| v >= 2.5e6),
    });
    let share = m_batch.zip(c_batch).map(|(m, c)| m / c);
    lines.push(BarLine {
        what: "batched ingest, share of the ceiling".into(),
        needed: "≥ 60 %".into(),
        measured: share.map(|s| format!("{:.0} %", s * 100.0)).unwrap_or_else(|| "–".into()),
        met: share.map(|s| s >= 0.6),
    });
    let single = median_throughput(&map, &single_key, "meterd").zip(median_throughput(&map, &single_key, "ceiling")).map(|(m, c)| m / c);
    lines.push(BarLine {
        what: "single-event ingest, share of the ceiling's requests/s".into(),
        needed: "≥ 80 %".into(),
        measured: single.map(|s| format!("{:.0} %", s * 100.0)).unwrap_or_else(|| "–".into()),
        met: single.map(|s| s >= 0.8),
    });
    let p99 = median_p99(&map, &check_key, "meterd");
    lines.push(BarLine {
        what: format!("checks p99 at {}/s open loop", human(check_rate)),
        needed: "≤ 1 ms".into(),
        measured: p99.map(|s| format!("{:.0} µs ({:.0}–{:.0})", s.median, s.min, s.max)).unwrap_or_else(|| "–".into()),
        met: p99.map(|s| s.median <= 1000.0),
    });
    // The PostgreSQL design is called once per event (ingest-single); a batch
    // as one transaction of pipelined calls is shown too, as the kindest case.
    let m_single = median_throughput(&map, &single_key, "meterd");
    for (meterd, pg_key, what) in [
        (m_batch, &single_key, "meterd batched ÷ PostgreSQL design called per event, events/s"),
        (m_batch, &batch_key, "meterd batched ÷ PostgreSQL, batch as one transaction, events/s"),
        (m_single, &single_key, "meterd single-event ÷ PostgreSQL called per event, events/s"),
    ] {
        let x = meterd.zip(median_throughput(&map, pg_key, "postgres")).map(|(m, p)| m / p.max(1e-9));
        lines.push(BarLine {
            what: what.into(),
            needed: "≥ 100×".into(),
            measured: x.map(|v| format!("{v:.0}×")).unwrap_or_else(|| "–".into()),
            met: x.map(|v| v >= 100.0),
        });
    }
    lines
}

pub fn bar_table(lines: &[BarLine]) -> String {
    let mut out = String::from("| bar | needed | measured (median) | met |\n|---|---|---|---|\n");
    for l in lines {
        let met = match l.met {
            Some(true) => "✔",
            Some(false) => "✘",
            None => "not measured",
        };
        out.push_str(&format!("| {} | {} | {} | {} |\n", l.what, l.needed, l.measured, met));
    }
    out
}

/// Parses JSON lines, skipping blank ones; names the bad line otherwise.
pub fn parse_lines(text: &str) -> Result<Vec<RunResult>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;

    fn run(target: &str, scenario: &str, rate: Option<f64>, eps: f64, rps: f64, p99: f64) -> RunResult {
        RunResult {
            target: target.into(),
            scenario: scenario.into(),
            mode: if rate.is_some() { "open" } else { "closed" }.into(),
            rate,
            connections: 1,
            distribution: "uniform".into(),
            customers: 1,
            warmup_s: 0.0,
            duration_s: 1.0,
            requests: 1,
            events: 1,
            errors: 0,
            unsent: 0,
            requests_per_s: rps,
            events_per_s: eps,
            latency: Latency { p99_us: p99, ..Latency::default() },
            max_pacer_lag_us: None,
            label: String::new(),
            loadavg: String::new(),
            first_error: None,
            server_cpu_us_per_op: None,
        }
    }

    #[test]
    fn spread_takes_median_min_max() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        let s = spread(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN, 5.0]).unwrap().median, 5.0);
    }

    #[test]
    fn bar_uses_medians_and_ratios() {
        let mut rs = Vec::new();
        for (m, c) in [(2.4e6, 4.0e6), (2.6e6, 4.0e6), (2.7e6, 4.2e6)] {
            rs.push(run("meterd", "ingest-batch-1000", None, m, m / 1000.0, 900.0));
            rs.push(run("ceiling", "ingest-batch-1000", None, c, c / 1000.0, 900.0));
        }
        rs.push(run("postgres", "ingest-batch-1000", None, 20_000.0, 20.0, 1e5));
        for p in [800.0, 1200.0, 950.0] {
            rs.push(run("meterd", "check", Some(20_000.0), 0.0, 20_000.0, p));
        }
        rs.push(run("meterd", "ingest-single", None, 70_000.0, 70_000.0, 500.0));
        rs.push(run("ceiling", "ingest-single", None, 100_000.0, 100_000.0, 500.0));
        let b = bar(&rs, 1000, 20_000.0);
        assert_eq!(b[0].met, Some(true)); // median 2.6 M
        assert_eq!(b[1].measured, "65 %"); // 2.6 / 4.0
        assert_eq!(b[1].met, Some(true));
        assert_eq!(b[2].met, Some(false)); // 70 %
        assert_eq!(b[3].met, Some(true)); // median p99 950 µs
        assert_eq!(b[4].met, None); // no postgres single run
        assert_eq!(b[5].measured, "130×");
        let ratios = ratios_table(&rs);
        assert!(ratios.contains("| ingest-batch-1000 | 2.60 M events/s | 0.65× | 130.00× | – | – |"), "{ratios}");
        let table = results_table(&rs);
        assert!(table.contains("**2.60 M** (2.40 M–2.70 M)"), "{table}");
    }

    #[test]
    fn cpu_per_op_ratio_uses_medians_of_runs_that_measured_it() {
        let mut rs = Vec::new();
        for (m, c) in [(Some(1.0), Some(0.25)), (Some(1.2), Some(0.3)), (None, Some(0.2))] {
            let mut a = run("meterd", "ingest-single", None, 10.0, 10.0, 1.0);
            a.server_cpu_us_per_op = m;
            let mut b = run("ceiling", "ingest-single", None, 20.0, 20.0, 1.0);
            b.server_cpu_us_per_op = c;
            rs.extend([a, b]);
        }
        // meterd: median of 1.0 and 1.2 = 1.1; ceiling: median of 0.2, 0.25, 0.3 = 0.25.
        assert!(ratios_table(&rs).contains("| 0.50× | – | – | 4.40× |"), "{}", ratios_table(&rs));
        assert!(results_table(&rs).contains("| 1.10 |"));
    }

    #[test]
    fn limitador_table_compares_both_durabilities_with_limitador() {
        let mut rs = Vec::new();
        for (t, rps, cpu) in [
            ("limitador", 40_000.0, 20.0),
            ("meterd-none", 80_000.0, 10.0),
            ("meterd", 60_000.0, 15.0),
            ("meterd-spaced", 50_000.0, 12.0),
            ("redis", 1.0, 1.0),
        ] {
            for label in ["run1", "run2", "run3"] {
                let mut r = run(t, "wrk-consume", None, rps, rps, 900.0);
                r.server_cpu_us_per_op = Some(cpu);
                r.label = label.into();
                rs.push(r);
            }
        }
        rs.push(run("meterd", "ingest-single", None, 1.0, 1.0, 1.0)); // Limitador did not run it: no row
        for (t, cpu) in [("limitador", 40.0), ("meterd", 50.0)] {
            let mut r = run(t, "check-consume", Some(10_000.0), 10_000.0, 10_000.0, 3000.0);
            r.server_cpu_us_per_op = Some(cpu);
            rs.push(r);
        }
        let t = limitador_table(&rs);
        assert_eq!(t.lines().count(), 2 + 4 + 2, "{t}");
        // Open loop: the same rate for both, so no throughput ratio; the CPU ratio stays.
        assert!(
            t.contains("| check-consume | open 10.0 k/s | meterd | 10.0 k (1 run) | 3000 (3000–3000) | 0 | 50.00 | – | 1.25× | 0 |"),
            "{t}"
        );
        assert!(
            t.contains("| wrk-consume | closed | limitador | **40.0 k** (40.0 k–40.0 k) | 900 (900–900) | 0 | 20.00 | – | – | 0 |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| wrk-consume | closed | meterd-none | **80.0 k** (80.0 k–80.0 k) | 900 (900–900) | 0 | 10.00 | 2.00× | 0.50× | 0 |"
            ),
            "{t}"
        );
        assert!(t.contains("| meterd | **60.0 k**"), "{t}");
        assert!(t.contains("| meterd-spaced | **50.0 k** (50.0 k–50.0 k) | 900 (900–900) | 0 | 12.00 | 1.25× | 0.60× | 0 |"), "{t}");
        assert!(t.find("| meterd |") < t.find("| meterd-spaced |"), "after meterd: {t}");
        assert!(!t.contains("redis") && !t.contains("ingest-single"));
        assert_eq!(limitador_table(&rs[9..13]), "");
        assert!(has_baselines(&rs) && !has_baselines(&rs[..9]));
    }

    #[test]
    fn new_targets_sort_next_to_their_kin() {
        let rs: Vec<_> = ["redis", "limitador", "meterd-none", "meterd-spaced", "meterd"]
            .iter()
            .map(|t| run(t, "check-consume", None, 1.0, 1.0, 1.0))
            .collect();
        let table = results_table(&rs);
        let at = |t: &str| table.find(&format!("| {t} |")).unwrap();
        assert!(at("meterd") < at("meterd-spaced") && at("meterd-spaced") < at("meterd-none"), "{table}");
        assert!(at("meterd-none") < at("limitador") && at("limitador") < at("redis"), "{table}");
    }

    #[test]
    fn json_lines_round_trip() {
        let r = run("redis", "check", None, 0.0, 5.0, 1.0);
        let text = format!("{}\n\n{}\n", serde_json::to_string(&r).unwrap(), serde_json::to_string(&r).unwrap());
        assert_eq!(parse_lines(&text).unwrap().len(), 2);
        assert!(parse_lines("{nope").unwrap_err().starts_with("line 1:"));
    }
}
