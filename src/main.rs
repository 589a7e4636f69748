//! The `meterd` command (clap): `meterd [serve]` runs the daemon; `check-config`
//! validates a config and exits 0, or prints every problem once and exits 2;
//! `wal verify|repair` inspects or repairs the write-ahead log of a stopped meterd.
//! `--config FILE` (or `METERD_CONFIG`) names the config for every subcommand.

use anyhow::Context;
use clap::{Parser, Subcommand};
use meterd::config::{self, ValidConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Usage-metering daemon: ingest usage events, answer limit checks from memory,
/// keep exact totals.
#[derive(Debug, Parser)]
#[command(
    name = "meterd",
    version,
    after_help = "Environment:\n  METERD_CONFIG      the config file (like --config)\n  METERD_LISTEN      overrides server.listen\n  \
                  METERD_LOG_FORMAT  \"json\" for JSON logs (default: text, coloured only on a terminal)\n  \
                  RUST_LOG           log filter (default: info)"
)]
struct Cli {
    /// The config file (TOML). Without one, the built-in defaults (config/meterd.toml).
    #[arg(long, short, global = true, env = "METERD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default when no subcommand is given).
    Serve,
    /// Validate the config: exit 0, or print every problem (with its key path) and exit 2.
    CheckConfig,
    /// Check or repair the write-ahead log; run it with meterd stopped.
    Wal {
        #[command(subcommand)]
        action: WalAction,
    },
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum WalAction {
    /// Read every segment: exit 0 when the WAL is intact, 1 when it is damaged, 2 on errors.
    Verify,
    /// Rewrite damaged segments with their intact records; lists what was dropped.
    Repair,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every subcommand needs a valid config; an invalid one is printed once, here.
    let config = match config::load_valid(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            meterd::telemetry::init_tracing();
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "meterd failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig => {
            println!(
                "{}: ok ({} meters, {} plans, {} keys)",
                config.source,
                config.catalog.meters().len(),
                config.catalog.plans().len(),
                config.keys.len()
            );
            ExitCode::SUCCESS
        }
        Command::Wal { action } => wal_command(action, &config),
    }
}

/// `meterd wal verify|repair`: exit 0 when the WAL is (now) usable, 1 when
/// verify found damage, 2 on an I/O error.
fn wal_command(action: WalAction, config: &ValidConfig) -> ExitCode {
    let dir = config.storage.data_dir.join("wal");
    let mut out = String::new();
    let result = match action {
        WalAction::Verify => meterd::wal::repair::verify(&dir, &mut out).map(|healthy| if healthy { 0 } else { 1 }),
        WalAction::Repair => meterd::wal::repair::repair(&dir, &mut out).map(|()| 0),
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

fn serve(config: ValidConfig) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_and_the_config_is_global() {
        let cli = Cli::try_parse_from(["meterd", "--config", "a.toml"]).map_err(|e| e.to_string());
        assert!(matches!(&cli, Ok(Cli { command: None, config: Some(p) }) if p == &PathBuf::from("a.toml")), "{cli:?}");
        let cli = Cli::try_parse_from(["meterd", "wal", "verify", "-c", "b.toml"]).map_err(|e| e.to_string());
        assert!(
            matches!(&cli, Ok(Cli { command: Some(Command::Wal { action: WalAction::Verify }), config: Some(p) }) if p == &PathBuf::from("b.toml")),
            "{cli:?}"
        );
        assert!(Cli::try_parse_from(["meterd", "wal", "fix"]).is_err());
        assert!(Cli::try_parse_from(["meterd", "serve", "extra"]).is_err());
    }
}
