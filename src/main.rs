//! The `meterd` command (clap): `meterd [serve]` runs the daemon; `check-config`
//! validates a config and exits 0, or prints every problem once and exits 2;
//! `wal verify|repair` inspects or repairs the write-ahead log of a stopped meterd;
//! `backup --to DIR` copies the data directory of a running (or stopped) meterd
//! consistently and `restore --from DIR` puts such a copy in place; `reload` has
//! the running meterd re-read its config (as `SIGHUP` does) and prints the outcome.
//! `--config FILE` (or `METERD_CONFIG`) names the config for every subcommand.

mod allocator;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meterd::config::{self, ValidConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Copy the store and the WAL of this config's data_dir into DIR, consistently, while meterd runs.
    Backup {
        /// A new (or empty) directory for the copy.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Put a backup in place as this config's data_dir (which must be absent or empty); then start meterd.
    Restore {
        /// A directory `meterd backup` wrote.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
    /// Have the running meterd re-read its config (SIGHUP to the pid in data_dir/meterd.pid) and print the outcome:
    /// exit 0 when applied, 1 when refused (the old config keeps serving), 2 on errors.
    Reload {
        /// How long to wait for the outcome.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        wait: u64,
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
    allocator::configure();
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
            match serve(config, cli.config) {
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
        Command::Backup { to } => backup_command(&config, &to),
        Command::Restore { from } => match meterd::backup::restore(&from, &config.storage.data_dir) {
            Ok(m) => {
                println!(
                    "restored {} into {} (instance {}, store up to WAL record {}, WAL up to {}); start meterd with this config",
                    from.display(),
                    config.storage.data_dir.display(),
                    m.instance_id.as_deref().unwrap_or("-"),
                    m.store_upto,
                    m.wal_upto
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meterd restore: {e}");
                ExitCode::from(2)
            }
        },
        Command::Reload { wait } => reload_command(&config, Duration::from_secs(wait)),
    }
}

/// `meterd backup --to DIR`: exit 0 with a summary, 2 on an error.
fn backup_command(config: &ValidConfig, to: &std::path::Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meterd backup: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(meterd::backup::backup(config, to)) {
        Ok(m) => {
            println!(
                "backup of {} in {}: store up to WAL record {}, WAL up to record {} ({} segments), instance {}",
                config.storage.data_dir.display(),
                to.display(),
                m.store_upto,
                m.wal_upto,
                m.segments,
                m.instance_id.as_deref().unwrap_or("-")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meterd backup: {e}");
            ExitCode::from(2)
        }
    }
}

/// `meterd reload`: SIGHUP to the running meterd, then wait for its outcome.
fn reload_command(config: &ValidConfig, wait: Duration) -> ExitCode {
    use meterd::reload::{pid_file, read_status};
    let data_dir = &config.storage.data_dir;
    let path = pid_file(data_dir);
    let pid = match std::fs::read_to_string(&path).map(|t| t.trim().parse::<i32>()) {
        Ok(Ok(pid)) if pid > 0 => pid,
        Ok(_) => {
            eprintln!("meterd reload: {} does not hold a pid", path.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("meterd reload: {}: {e} (is meterd running with this data_dir?)", path.display());
            return ExitCode::from(2);
        }
    };
    // A pid file left by a killed meterd may name a process that is not meterd now.
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
        if !String::from_utf8_lossy(&cmdline).contains("meterd") {
            eprintln!("meterd reload: pid {pid} in {} is not meterd (a stale pid file?)", path.display());
            return ExitCode::from(2);
        }
    }
    let before = read_status(data_dir).filter(|s| s.pid == pid as u32).map(|s| s.attempt).unwrap_or(0);
    // SAFETY: kill(2) with a plain pid and signal number touches no memory of ours.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        eprintln!("meterd reload: cannot signal pid {pid}: {}", std::io::Error::last_os_error());
        return ExitCode::from(2);
    }
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Some(status) = read_status(data_dir).filter(|s| s.pid == pid as u32 && s.attempt > before) {
            println!("{}", status.message);
            return if status.ok { ExitCode::SUCCESS } else { ExitCode::from(1) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("meterd reload: pid {pid} did not report within {wait:?}; see its log");
    ExitCode::from(2)
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

fn serve(config: ValidConfig, path: Option<PathBuf>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        // Listen for SIGHUP before anything can send it (its default action is to exit).
        let hangups = meterd::reload::Hangups::listen();
        let data_dir = config.storage.data_dir.clone();
        let app = meterd::AppHandle::start(config).await?;
        let pid_file = meterd::reload::pid_file(&data_dir);
        std::fs::write(&pid_file, format!("{}\n", std::process::id())).with_context(|| format!("writing {}", pid_file.display()))?;
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = hangups.reload_each(app.reloader.clone(), path, data_dir) => {}
        }
        tracing::info!("shutdown signal received; draining");
        let _ = std::fs::remove_file(&pid_file);
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
        let cli = Cli::try_parse_from(["meterd", "backup", "--to", "/b"]).map_err(|e| e.to_string());
        assert!(matches!(&cli, Ok(Cli { command: Some(Command::Backup { to }), .. }) if to == &PathBuf::from("/b")), "{cli:?}");
        assert!(Cli::try_parse_from(["meterd", "backup"]).is_err(), "backup needs --to");
        assert!(matches!(Cli::try_parse_from(["meterd", "reload"]), Ok(Cli { command: Some(Command::Reload { wait: 10 }), .. })));
    }
}
