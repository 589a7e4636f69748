//! Command-line parsing for `meterd-loadtest` (hand-written: a handful of
//! flags, and errors that name the flag).

use crate::target::TargetKind;
use std::net::SocketAddr;

pub const USAGE: &str = "\
usage: meterd-loadtest SCENARIO [OPTIONS]
       meterd-loadtest summarize [--bar-batch N] [--bar-check-rate R] FILE...
       meterd-loadtest from-wrk --target-name T --scenario S [--connections C] [--customers N]
            [--warmup SECS] [--label TEXT] [--server-cpu-seconds X] FILE
            (wrk's output with loadtest/wrk/bench.lua's result line -> one JSON result line)
       meterd-loadtest soak [--addr A] [--server-pid PID] [--duration SECS] [--csv FILE]
            [--connections C] [--size N] [--customers N] [--active N] [--lap SECS]
            [--retry-percent P] [--dedupe-window SECS] [--rate R] [--seed N] [--quiet]
            (issue 15: a churning, retrying load for RSS/fds/p99 over time; see loadtest/README.md)

SCENARIO: ingest-single | ingest-batch [--size N] | check | check-consume | mixed [--check-percent P]

  --target T          meterd | ceiling | postgres | redis | limitador (default meterd)
                      (limitador: check and check-consume only, namespace \"bench\",
                      descriptor key \"customer\")
  --target-name NAME  the target's name in the result (default: --target; e.g. meterd-none)
  --addr HOST:PORT    meterd, ceiling or limitador HTTP address      (default 127.0.0.1:8480)
  --pg CONNSTR        tokio-postgres connection string               (default host=127.0.0.1 port=5432 user=postgres dbname=postgres)
  --redis URL         Redis URL                                      (default redis://127.0.0.1:6379/0)
  --size N            events per batch for ingest-batch               (default 1000)
  --check-percent P   share of checks in mixed                       (default 80)
  --connections C     concurrent keep-alive connections              (default 64)
  --duration SECS     measured time                                  (default 10)
  --warmup SECS       unmeasured time before it                      (default 2)
  --rate R            open loop at R requests/s (latency from the intended send time);
                      without it: closed loop, maximum throughput
  --dist D            uniform | zipf                                 (default uniform)
  --customers N       distinct customers                             (default 10000)
  --zipf-s S          zipf exponent                                  (default 1.0)
  --meter NAME        meter name                                     (default tokens)
  --limit L           monthly limit for the postgres/redis designs   (default 1000000000000)
  --seed N            workload seed                                  (default 1)
  --server-pid PID    report this process's CPU time per event/request over the window
  --label TEXT        copied into the result (e.g. the repetition)
  --json              print the result as one JSON line on stdout (default: a table)
  --timeline FILE     also write the measured window as CSV, 50 ms a row (by when each
                      request was due, open loop, or sent, closed): requests, mean, max,
                      how many over 2 ms
  --quiet             no progress line
";

/// A load run's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RunArgs {
    pub scenario: String,
    pub target: TargetKind,
    /// The target's name in the result (`--target-name`), when not the kind's.
    pub target_name: Option<String>,
    pub addr: SocketAddr,
    pub pg: String,
    pub redis: String,
    pub size: usize,
    pub check_percent: u32,
    pub connections: usize,
    pub duration: f64,
    pub warmup: f64,
    pub rate: Option<f64>,
    pub dist: String,
    pub customers: u64,
    pub zipf_s: f64,
    pub meter: String,
    pub limit: i64,
    pub seed: u64,
    pub label: String,
    pub server_pid: Option<u32>,
    pub json: bool,
    pub quiet: bool,
    /// `--timeline`: where to write the window's timeline (CSV).
    pub timeline: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run(Box<RunArgs>),
    Summarize { files: Vec<String>, bar_batch: usize, bar_check_rate: f64 },
    Soak(Box<crate::soak::SoakConfig>),
    FromWrk { info: Box<crate::wrk::RunInfo>, file: String },
    Help,
}

/// A bad command line; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, CliError> {
    let v = v.ok_or_else(|| CliError(format!("{flag} needs a value")))?;
    v.parse().map_err(|_| CliError(format!("{flag}: invalid value {v:?}")))
}

fn positive(flag: &str, x: f64) -> Result<f64, CliError> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(CliError(format!("{flag} must be a non-negative number")))
    }
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, CliError> {
    let mut args = args.into_iter();
    let Some(first) = args.next() else { return Ok(Command::Help) };
    match first.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help),
        "summarize" => {
            let (mut files, mut bar_batch, mut bar_check_rate) = (Vec::new(), 1000usize, 20_000f64);
            while let Some(a) = args.next() {
                match a.as_str() {
                    "--bar-batch" => bar_batch = value(&a, args.next())?,
                    "--bar-check-rate" => bar_check_rate = value(&a, args.next())?,
                    f if f.starts_with("--") => return Err(CliError(format!("unknown option {f}"))),
                    _ => files.push(a),
                }
            }
            if files.is_empty() {
                return Err(CliError("summarize needs at least one file".into()));
            }
            return Ok(Command::Summarize { files, bar_batch, bar_check_rate });
        }
        "soak" => return parse_soak(args).map(|c| Command::Soak(Box::new(c))),
        "from-wrk" => return parse_from_wrk(args),
        _ => {}
    }
    let mut r = RunArgs {
        scenario: first,
        target: TargetKind::Meterd,
        target_name: None,
        addr: SocketAddr::from(([127, 0, 0, 1], 8480)),
        pg: "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into(),
        redis: "redis://127.0.0.1:6379/0".into(),
        size: 1000,
        check_percent: 80,
        connections: 64,
        duration: 10.0,
        warmup: 2.0,
        rate: None,
        dist: "uniform".into(),
        customers: 10_000,
        zipf_s: 1.0,
        meter: "tokens".into(),
        limit: 1_000_000_000_000,
        seed: 1,
        label: String::new(),
        server_pid: None,
        json: false,
        quiet: false,
        timeline: None,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--target" => {
                let t: String = value(&a, args.next())?;
                r.target = TargetKind::parse(&t)
                    .ok_or_else(|| CliError(format!("--target: unknown target {t:?} (meterd, ceiling, postgres, redis, limitador)")))?;
            }
            "--target-name" => r.target_name = Some(value(&a, args.next())?),
            "--addr" => r.addr = value(&a, args.next())?,
            "--pg" => r.pg = value(&a, args.next())?,
            "--redis" => r.redis = value(&a, args.next())?,
            "--size" => r.size = value(&a, args.next())?,
            "--check-percent" => r.check_percent = value(&a, args.next())?,
            "--connections" => r.connections = value(&a, args.next())?,
            "--duration" => r.duration = positive(&a, value(&a, args.next())?)?,
            "--warmup" => r.warmup = positive(&a, value(&a, args.next())?)?,
            "--rate" => {
                let rate = positive(&a, value(&a, args.next())?)?;
                if rate == 0.0 {
                    return Err(CliError("--rate must be > 0".into()));
                }
                r.rate = Some(rate);
            }
            "--dist" => r.dist = value(&a, args.next())?,
            "--customers" => r.customers = value(&a, args.next())?,
            "--zipf-s" => r.zipf_s = value(&a, args.next())?,
            "--meter" => r.meter = value(&a, args.next())?,
            "--limit" => r.limit = value(&a, args.next())?,
            "--seed" => r.seed = value(&a, args.next())?,
            "--label" => r.label = value(&a, args.next())?,
            "--server-pid" => r.server_pid = Some(value(&a, args.next())?),
            "--json" => r.json = true,
            "--quiet" => r.quiet = true,
            "--timeline" => r.timeline = Some(value(&a, args.next())?),
            other => return Err(CliError(format!("unknown option {other}"))),
        }
    }
    if r.connections == 0 {
        return Err(CliError("--connections must be at least 1".into()));
    }
    Ok(Command::Run(Box::new(r)))
}

/// `from-wrk`'s flags: what the result line needs that wrk does not report.
fn parse_from_wrk(mut args: impl Iterator<Item = String>) -> Result<Command, CliError> {
    let mut info = crate::wrk::RunInfo {
        target: String::new(),
        scenario: String::new(),
        connections: 64,
        customers: 10_000,
        warmup_s: 0.0,
        label: String::new(),
        server_cpu_seconds: None,
    };
    let mut file = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--target-name" => info.target = value(&a, args.next())?,
            "--scenario" => info.scenario = value(&a, args.next())?,
            "--connections" => info.connections = value(&a, args.next())?,
            "--customers" => info.customers = value(&a, args.next())?,
            "--warmup" => info.warmup_s = positive(&a, value(&a, args.next())?)?,
            "--label" => info.label = value(&a, args.next())?,
            "--server-cpu-seconds" => info.server_cpu_seconds = Some(positive(&a, value(&a, args.next())?)?),
            f if f.starts_with("--") => return Err(CliError(format!("unknown option {f}"))),
            _ if file.is_none() => file = Some(a),
            _ => return Err(CliError("from-wrk reads one file".into())),
        }
    }
    if info.target.is_empty() || info.scenario.is_empty() {
        return Err(CliError("from-wrk needs --target-name and --scenario".into()));
    }
    let file = file.ok_or_else(|| CliError("from-wrk needs wrk's output file".into()))?;
    Ok(Command::FromWrk { info: Box::new(info), file })
}

/// The soak's flags (issue 15), over [`crate::soak::SoakConfig::new`]'s defaults.
fn parse_soak(mut args: impl Iterator<Item = String>) -> Result<crate::soak::SoakConfig, CliError> {
    let mut c = crate::soak::SoakConfig::new(SocketAddr::from(([127, 0, 0, 1], 8480)));
    let secs = |flag: &str, v: Option<String>| -> Result<std::time::Duration, CliError> {
        Ok(std::time::Duration::from_secs_f64(positive(flag, value(flag, v)?)?))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--addr" => c.addr = value(&a, args.next())?,
            "--server-pid" => c.server_pid = Some(value(&a, args.next())?),
            "--duration" => c.duration = secs(&a, args.next())?,
            "--csv" => c.csv = Some(value::<String>(&a, args.next())?.into()),
            "--connections" => c.connections = value(&a, args.next())?,
            "--size" => c.batch = value(&a, args.next())?,
            "--customers" => c.customers = value(&a, args.next())?,
            "--active" => c.active = value(&a, args.next())?,
            "--lap" => c.lap = secs(&a, args.next())?,
            "--retry-percent" => c.retry_percent = value(&a, args.next())?,
            "--dedupe-window" => c.dedupe_window = secs(&a, args.next())?,
            "--rate" => c.rate = Some(positive(&a, value(&a, args.next())?)?).filter(|r| *r > 0.0),
            "--seed" => c.seed = value(&a, args.next())?,
            "--meter" => c.meter = value(&a, args.next())?,
            "--quiet" => c.quiet = true,
            other => return Err(CliError(format!("unknown option {other}"))),
        }
    }
    if c.connections == 0 || c.batch == 0 || c.customers == 0 {
        return Err(CliError("--connections, --size and --customers must be at least 1".into()));
    }
    if c.retry_percent > 100 {
        return Err(CliError("--retry-percent must be at most 100".into()));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn run_flags_are_read() {
        let Command::Run(r) = parse(args("ingest-batch --size 500 --target postgres --rate 2000 --duration 1.5 --json")).unwrap() else {
            panic!("not a run")
        };
        assert_eq!((r.size, r.target, r.rate, r.duration, r.json), (500, TargetKind::Postgres, Some(2000.0), 1.5, true));
        let Command::Run(r) = parse(args("check-consume --target limitador --target-name lim-2")).unwrap() else { panic!("not a run") };
        assert_eq!((r.target, r.target_name.as_deref()), (TargetKind::Limitador, Some("lim-2")));
    }

    #[test]
    fn bad_flags_are_named() {
        assert_eq!(parse(args("check --rate -1")).unwrap_err().0, "--rate must be a non-negative number");
        assert_eq!(parse(args("check --connections x")).unwrap_err().0, "--connections: invalid value \"x\"");
        assert!(parse(args("check --target mysql")).unwrap_err().0.contains("unknown target"));
        assert!(parse(args("check --size")).unwrap_err().0.contains("needs a value"));
        assert!(parse(args("summarize")).is_err());
        assert!(parse(args("soak --retry-percent 101")).is_err());
        assert!(parse(args("soak --size 0")).is_err());
        assert!(parse(args("from-wrk --scenario wrk-check out.txt")).unwrap_err().0.contains("--target-name"));
        assert!(parse(args("from-wrk --target-name a --scenario b")).unwrap_err().0.contains("file"));
    }

    #[test]
    fn from_wrk_flags_are_read() {
        let Command::FromWrk { info, file } =
            parse(args("from-wrk --target-name limitador --scenario wrk-consume --server-cpu-seconds 2.5 --label run2 w.txt")).unwrap()
        else {
            panic!("not from-wrk")
        };
        assert_eq!(
            (info.target.as_str(), info.scenario.as_str(), info.server_cpu_seconds, info.label.as_str()),
            ("limitador", "wrk-consume", Some(2.5), "run2")
        );
        assert_eq!((info.connections, info.customers, file.as_str()), (64, 10_000, "w.txt"));
    }

    #[test]
    fn soak_flags_are_read() {
        let Command::Soak(c) = parse(args("soak --duration 480 --customers 1000000 --csv s.csv --retry-percent 10 --size 50")).unwrap()
        else {
            panic!("not a soak")
        };
        assert_eq!((c.duration.as_secs(), c.customers, c.retry_percent, c.batch), (480, 1_000_000, 10, 50));
        assert_eq!(c.csv.as_deref(), Some(std::path::Path::new("s.csv")));
    }
}
