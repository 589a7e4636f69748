//! An engine started in-process, without HTTP: the given plans over a data dir,
//! a SQLite store and an `fsync` WAL, with a one-hour dedupe window.

use meterd::config::{Config, ValidConfig};
use meterd::engine::Engine;
use meterd::usage::UsageObserver;
use std::path::Path;
use std::sync::Arc;

/// The config: `plans` (meters and plans, as TOML) under a `[storage]` in `dir`.
pub fn config(dir: &Path, plans: &str) -> ValidConfig {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\ndurability = \"fsync\"\n[ingest]\ndedupe_window = \"1h\"\n{plans}",
        dir.display().to_string()
    );
    Config::parse(&text, "test").and_then(|c| c.validate("test")).expect("config")
}

/// Starts (or restarts, on the same `dir`) the engine with `observers`.
pub async fn start(dir: &Path, plans: &str, instance: &str, observers: Vec<Arc<dyn UsageObserver>>) -> Arc<Engine> {
    let config = config(dir, plans);
    let store = Arc::new(meterd::store::sqlite::SqliteStore::open(&dir.join("meterd.sqlite")).expect("store"));
    let wal = meterd::wal::WalConfig {
        dir: dir.join("wal"),
        sync: Some(meterd::wal::Sync::Always),
        segment_bytes: 1 << 20,
        dedupe_window_ms: 3_600_000,
        hold: None,
        sync_spacing: std::time::Duration::ZERO,
    };
    Arc::new(Engine::start_observed(&config, instance.into(), store.clone(), store, wal, None, observers).await.expect("engine"))
}
