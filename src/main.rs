//! The `meterd` command: `meterd [serve] [--config FILE]` runs the daemon;
//! `meterd check-config [--config FILE]` validates a config and exits 0, or prints
//! every problem and exits 2.

use anyhow::Context;
use meterd::config::{self, ConfigError};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: meterd [serve] [--config FILE]\n       meterd check-config [--config FILE]\n       meterd wal verify|repair [--config FILE]   (with meterd stopped)\n\nThe config file may also be given as METERD_CONFIG; without one, the built-in defaults (config/meterd.toml) are used.";

struct Args {
    command: String,
    config: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut command = None;
    let mut config = std::env::var_os("METERD_CONFIG").map(PathBuf::from);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => config = Some(args.next().map(PathBuf::from).ok_or("--config needs a file")?),
            s if s.starts_with("--config=") => config = Some(PathBuf::from(&s["--config=".len()..])),
            "-h" | "--help" | "help" => return Err(String::new()),
            "serve" | "check-config" if command.is_none() => command = Some(arg),
            "wal" if command.is_none() => {
                let sub = args.next().ok_or("wal needs verify or repair")?;
                if sub != "verify" && sub != "repair" {
                    return Err(format!("unknown wal command {sub:?} (verify or repair)"));
                }
                command = Some(format!("wal-{sub}"));
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args { command: command.unwrap_or_else(|| "serve".into()), config })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("meterd: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match args.command.as_str() {
        "wal-verify" | "wal-repair" => wal_command(&args.command, args.config),
        "check-config" => match config::load_valid(args.config.as_deref()) {
            Ok(c) => {
                println!(
                    "{}: ok ({} meters, {} plans, {} keys)",
                    c.source,
                    c.catalog.meters().len(),
                    c.catalog.plans().len(),
                    c.keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        _ => {
            meterd::telemetry::init_tracing();
            match serve(args.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "meterd failed");
                    eprintln!("meterd: {e:#}");
                    let invalid_config = e.downcast_ref::<ConfigError>().is_some();
                    ExitCode::from(if invalid_config { 2 } else { 1 })
                }
            }
        }
    }
}

/// `meterd wal verify|repair`: exit 0 when the WAL is (now) usable, 1 when
/// verify found damage, 2 on a bad config or an I/O error.
fn wal_command(command: &str, config_path: Option<PathBuf>) -> ExitCode {
    let config = match config::load_valid(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let dir = config.raw.storage.data_dir.join("wal");
    let mut out = String::new();
    let result = if command == "wal-verify" {
        meterd::wal::repair::verify(&dir, &mut out).map(|healthy| if healthy { 0 } else { 1 })
    } else {
        meterd::wal::repair::repair(&dir, &mut out).map(|()| 0)
    };
    print!("{out}");
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("meterd: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // Validate before anything binds or opens a file.
    let config = config::load_valid(config_path.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let app = meterd::AppHandle::start(config).await?;
        shutdown_signal().await;
        tracing::info!("shutdown signal received; draining");
        app.shutdown().await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops meterd");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
