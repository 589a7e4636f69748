//! `meterd-loadtest`: runs one scenario against one target and prints a table
//! or a JSON line; `summarize` turns JSON lines into BENCHMARKS.md tables.

use anyhow::Context;
use loadtest::cli::{self, Command, RunArgs};
use loadtest::dist::Distribution;
use loadtest::runner::{self, Mode, RunConfig};
use loadtest::stats::{self, Latency, RunResult};
use loadtest::target::{Endpoint, Prepared, TargetKind};
use loadtest::workload::{Scenario, Workload};
use loadtest::{pg, summary};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meterd-loadtest: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Help => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Command::Summarize { files, bar_batch, bar_check_rate } => summarize(&files, bar_batch, bar_check_rate),
        Command::Run(args) => run(&args),
        Command::Soak(config) => soak(*config),
        Command::FromWrk { info, file } => from_wrk(&info, &file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meterd-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn summarize(files: &[String], bar_batch: usize, bar_check_rate: f64) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?;
        results.extend(summary::parse_lines(&text).map_err(|e| anyhow::anyhow!("{f}: {e}"))?);
    }
    println!("{}", summary::results_table(&results));
    if summary::has_baselines(&results) {
        println!("{}", summary::ratios_table(&results));
    }
    let against_limitador = summary::limitador_table(&results);
    if !against_limitador.is_empty() {
        println!("Against Limitador (`meterd-none`: meterd with `durability = \"none\"`; `meterd-spaced`: with `wal_sync_spacing = \"800us\"`):\n\n{against_limitador}");
    }
    // The bar only when these results judge some of it (a Limitador-only run does not).
    let bar = summary::bar(&results, bar_batch, bar_check_rate);
    if bar.iter().any(|line| line.met.is_some()) {
        print!("{}", summary::bar_table(&bar));
    }
    Ok(())
}

/// One wrk run (loadtest/wrk/bench.lua) as a JSON result line.
fn from_wrk(info: &loadtest::wrk::RunInfo, file: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let line = loadtest::wrk::parse_output(&text).with_context(|| format!("reading {file}"))?;
    println!("{}", serde_json::to_string(&loadtest::wrk::to_result(&line, info, stats::loadavg()))?);
    Ok(())
}

/// The soak (issue 15): prints its tallies; fails if any answer was wrong.
fn soak(config: loadtest::soak::SoakConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let (addr, meter, customers) = (config.addr, config.meter.clone(), config.customers);
    let report = runtime.block_on(loadtest::soak::run(config))?;
    let total = runtime.block_on(loadtest::soak::server_total(addr, &meter, customers));
    println!("server total {total:?} (equals the expected total on a server that started empty)");
    println!(
        "requests {}  new ids {}  retries {}  accepted {}  duplicates {}  wrong answers {}  errors {}  expected total {}",
        report.requests,
        report.sent_new,
        report.sent_retries,
        report.accepted,
        report.duplicates,
        report.wrong,
        report.errors,
        report.expected_total
    );
    if let Some(p) = &report.first_problem {
        anyhow::bail!("first problem: {p}");
    }
    Ok(())
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let scenario = Scenario::parse(&args.scenario, args.size, args.check_percent)?;
    let dist = Distribution::by_name(&args.dist, args.customers, args.zipf_s)?;
    let workload = Workload::build(scenario, &dist, args.seed);
    let events_of: Arc<Vec<u64>> = Arc::new(workload.shapes.iter().map(Workload::events).collect());
    let endpoint = Endpoint {
        kind: args.target,
        addr: args.addr,
        pg: args.pg.clone(),
        redis: args.redis.clone(),
        meter: args.meter.clone(),
        limit: args.limit,
    };
    // Ids differ between runs against one long-lived server.
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u32).unwrap_or(0);
    let prepared = Arc::new(Prepared::new(&endpoint, &workload, nonce)?);
    let config = RunConfig {
        connections: args.connections,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration.max(0.001)),
        mode: args.rate.map_or(Mode::Closed, |rate| Mode::Open { rate }),
        server_pid: args.server_pid,
        progress: (!args.quiet).then(|| Duration::from_secs(if args.duration >= 30.0 { 5 } else { 1 })),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let measured = runtime.block_on(async {
        if args.target == TargetKind::Postgres {
            pg::setup(&args.pg, &args.meter, args.limit).await.context("creating the PostgreSQL schema")?;
        }
        runner::run(prepared, events_of, &config).await.with_context(|| format!("connecting to {}", args.target.name()))
    })?;
    let seconds = measured.seconds.max(1e-9);
    let result = RunResult {
        target: args.target_name.clone().unwrap_or_else(|| args.target.name().into()),
        scenario: scenario.to_string(),
        mode: if args.rate.is_some() { "open" } else { "closed" }.into(),
        rate: args.rate,
        connections: args.connections,
        distribution: if args.dist == "zipf" { format!("zipf({})", args.zipf_s) } else { args.dist.clone() },
        customers: args.customers,
        warmup_s: args.warmup,
        duration_s: args.duration,
        requests: measured.requests,
        events: measured.events,
        errors: measured.errors,
        unsent: measured.unsent,
        requests_per_s: measured.requests as f64 / seconds,
        events_per_s: measured.events as f64 / seconds,
        latency: Latency::of(&measured.histogram),
        max_pacer_lag_us: measured.max_pacer_lag.map(|d| d.as_secs_f64() * 1e6),
        label: args.label.clone(),
        loadavg: stats::loadavg(),
        first_error: measured.first_error,
        server_cpu_us_per_op: measured.server_cpu_seconds.map(|cpu| {
            let ops = if scenario.name().starts_with("ingest") { measured.events } else { measured.requests };
            cpu * 1e6 / ops.max(1) as f64
        }),
    };
    if let Some(path) = &args.timeline {
        write_timeline(path, &measured.timeline).with_context(|| format!("writing the timeline to {}", path.display()))?;
    }
    if let Some(e) = &result.first_error {
        eprintln!("meterd-loadtest: {} errors; first: {e}", result.errors);
    }
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print!("{}", stats::table(std::slice::from_ref(&result)));
    }
    Ok(())
}

/// `--timeline`: one CSV row per [`runner::TIMELINE_BUCKET`] of the window.
fn write_timeline(path: &std::path::Path, timeline: &[runner::Bucket]) -> std::io::Result<()> {
    let width = runner::TIMELINE_BUCKET.as_millis();
    let mut out = String::from("from_ms,requests,mean_us,max_us,over_2ms\n");
    for (i, b) in timeline.iter().enumerate() {
        let mean = b.sum_us.checked_div(b.requests).unwrap_or(0);
        out.push_str(&format!("{},{},{},{},{}\n", i as u128 * width, b.requests, mean, b.max_us, b.over_2ms));
    }
    std::fs::write(path, out)
}
