//! The `meterd` command: `meterd [serve] [--config FILE]` runs the daemon;
//! `meterd check-config [--config FILE]` validates a config and exits 0, or prints
//! every problem and exits 2.

use anyhow::Context;
use meterd::config::{self, ConfigError};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: meterd [serve] [--config FILE]\n       meterd check-config [--config FILE]\n\nThe config file may also be given as METERD_CONFIG; without one, the built-in defaults (config/meterd.toml) are used.";

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
