//! Wiring: open the stores, build the engine, bind the listeners, start the
//! background tasks; and the shutdown sequence (stop accepting → finish in-flight
//! requests → final flush → final raw-events export → exit), all under one grace
//! timeout.

use crate::config::ValidConfig;
use crate::engine::{Engine, EngineError};
use crate::health::{supervise, Health, HealthError, Restart, Task};
use crate::http::{self, HttpState};
use crate::store::sqlite::SqliteStore;
use crate::store::StoreError;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the app could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("final flush failed: {0}")]
    Flush(#[from] crate::flush::FlushError),
    #[error("shutdown did not finish within the grace period")]
    Timeout,
    #[error("a background task panicked: {0}")]
    Task(String),
    #[error("cannot reach redis at start (entitlements live there): {0}")]
    Redis(#[from] crate::redis_link::RedisError),
    #[error("Stripe reporter: {0}")]
    Stripe(String),
    #[error(transparent)]
    RawExport(#[from] crate::raw_export::ExportError),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
    // Adjustments (issue 19).
    #[error(transparent)]
    Adjust(#[from] crate::adjust::AdjustError),
    #[error(transparent)]
    Threads(#[from] http::threads::ThreadsError),
}

/// A running meterd.
pub struct AppHandle {
    /// The API address actually bound (useful with port 0).
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    /// The background tasks' states (what `/readyz` reports).
    pub health: Health,
    state: Arc<HttpState>,
    server_stop: watch::Sender<bool>,
    flusher_stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    metrics_server: Option<JoinHandle<()>>,
    /// The threads both listeners' connections run on.
    connection_threads: Arc<http::ConnectionThreads>,
    flusher: Supervised<Result<(), crate::flush::FlushError>>,
    /// Redis tasks (entitlement listener, counter syncer): stopped after the
    /// final flush, so the syncer's last push includes everything.
    redis_stop: watch::Sender<bool>,
    redis_tasks: Vec<Supervised<()>>,
    /// The Stripe reporter, when `[stripe]` is configured.
    reporter: Option<(watch::Sender<bool>, Supervised<()>)>,
    /// The raw-events export, with `clickhouse.raw_events = true`.
    raw_export: Option<(watch::Sender<bool>, Supervised<()>)>,
    /// Threshold notifications (issue 17), with `[notifications]`: the service
    /// (other notification types enqueue through it) and its delivery task.
    pub notifier: Option<Arc<crate::notify::Notifier>>,
    notify_task: Option<NotifyTask>,
    grace: Duration,
    // Config reload (issue 23): the running config and the parts that take changes live.
    /// Applies a new config (SIGHUP, `meterd reload`); features that take
    /// changes live register a part with it at start.
    pub reloader: Arc<crate::reload::Reloader>,
    // Reservations (issue 19): the task that releases expired holds.
    hold_expiry: (watch::Sender<bool>, Supervised<()>),
}

/// A background task under [`supervise`]: the outcome of its run that ended on
/// the shutdown signal.
type Supervised<O> = JoinHandle<Result<Option<O>, HealthError>>;
/// The notifications' delivery task and its stop signal (issue 17).
type NotifyTask = (watch::Sender<bool>, Supervised<Result<(), crate::notify::NotifyError>>);

/// The background tasks. Critical ones make `/readyz` 503 when they die; the
/// Stripe reporter and the raw-events export only degrade it (ingest and checks
/// go on without them) and are not restarted (each run owns its state).
const FLUSHER: Task = Task { name: "flusher", critical: true, restart: Restart::Backoff(Duration::from_secs(1)) };
const ENTITLEMENT_LISTENER: Task = Task { name: "entitlement_listener", critical: true, restart: Restart::Backoff(Duration::from_secs(1)) };
const COUNTER_SYNCER: Task = Task { name: "counter_syncer", critical: true, restart: Restart::Backoff(Duration::from_secs(1)) };
// Prepaid credits (issue 18).
const GRANTS_REFRESH: Task = Task { name: "grants_refresh", critical: false, restart: Restart::Backoff(Duration::from_secs(1)) };
const STRIPE_REPORTER: Task = Task { name: "stripe_reporter", critical: false, restart: Restart::Never };
const RAW_EXPORT: Task = Task { name: "raw_events_export", critical: false, restart: Restart::Never };
/// Threshold notifications (issue 17): delivery degrades, never blocks ingest.
const NOTIFIER: Task = Task { name: "notifier", critical: false, restart: Restart::Backoff(Duration::from_secs(1)) };
// Reservations (issue 19): critical, as a hold that never expires blocks its quota.
const HOLD_EXPIRY: Task = Task { name: "hold_expiry", critical: true, restart: Restart::Backoff(Duration::from_secs(1)) };

/// The instance id: configured, or generated once and kept in the data dir.
fn instance_id(config: &ValidConfig, data_dir: &Path) -> Result<String, AppError> {
    if let Some(id) = &config.server.instance_id {
        return Ok(id.clone());
    }
    let path = data_dir.join("instance_id");
    let io = |source| AppError::DataDir { path: path.display().to_string(), source };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let id = format!("i{:x}{:x}", nanos as u64, std::process::id());
    let tmp = data_dir.join("instance_id.tmp");
    std::fs::write(&tmp, &id).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(id)
}

/// The WAL writer's sync policy for a durability setting (`None` = no WAL): the
/// WAL knows nothing of the config, so the mapping lives here.
fn wal_sync(durability: crate::config::Durability, interval: Duration) -> Option<crate::wal::Sync> {
    match durability {
        crate::config::Durability::Fsync => Some(crate::wal::Sync::Always),
        crate::config::Durability::Buffered => Some(crate::wal::Sync::Interval(interval)),
        crate::config::Durability::None => None,
    }
}

/// Builds the Stripe reporter (not yet running) and its status board. The lease
/// is Redis's when `[redis]` is configured (one reporter across instances), else
/// local (embedded mode: this instance always reports).
fn stripe_reporter(
    config: &ValidConfig,
    settings: &crate::config::StripeSettings,
    engine: &Arc<Engine>,
    ledger: Arc<dyn crate::store::LedgerStore>,
    instance_id: &str,
) -> Result<(Arc<crate::report::StatusBoard>, crate::report::Reporter), AppError> {
    use crate::report::{Lease, LocalLease, RedisLease, Reporter, StatusBoard, StripeClient};
    let lease_ttl = (settings.interval * 3).max(Duration::from_secs(10));
    let lease: Arc<dyn Lease> = match (&config.redis, &engine.redis()) {
        (Some(rc), Some(redis)) => Arc::new(RedisLease::on(redis.conn(), &rc.key_prefix, instance_id, lease_ttl)),
        _ => Arc::new(LocalLease),
    };
    let client = StripeClient::new(settings).map_err(|e| AppError::Stripe(e.to_string()))?;
    let mode = settings.mode.as_str();
    let board = Arc::new(StatusBoard::new(mode, settings.period.as_str(), lease.kind()));
    tracing::info!(
        mode,
        period = settings.period.as_str(),
        api_base = %settings.api_base,
        api_key_env = %settings.api_key_env,
        lease = lease.kind(),
        "Stripe reporting enabled"
    );
    let reporter = Reporter::new(engine.clone(), ledger, lease, client, settings.clone(), board.clone(), lease_ttl);
    Ok((board, reporter))
}

impl AppHandle {
    /// Starts meterd with a validated config.
    pub async fn start(config: ValidConfig) -> Result<AppHandle, AppError> {
        AppHandle::start_observed(config, Vec::new()).await
    }

    /// Starts meterd with usage observers (see `crate::usage`): capabilities that
    /// must see every change of usage are registered here, before the rebuild
    /// and the replay, and stay for the process's life.
    pub async fn start_observed(
        config: ValidConfig,
        mut observers: Vec<Arc<dyn crate::usage::UsageObserver>>,
    ) -> Result<AppHandle, AppError> {
        // First: what is recorded while starting (Redis up at connect) is kept.
        let prometheus = crate::telemetry::prometheus();
        let edge = http::EdgeConfig {
            header_read_timeout: config.server.header_read_timeout,
            body_read_timeout: config.server.body_read_timeout,
            idle_timeout: config.server.idle_timeout,
            max_connections: config.server.max_connections,
        };
        let data_dir = config.storage.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| AppError::DataDir { path: data_dir.display().to_string(), source })?;
        let instance_id = instance_id(&config, &data_dir)?;
        // Entitlements live in Redis when configured, else in SQLite; usage goes
        // to ClickHouse when configured, else to the same SQLite file.
        let sqlite = Arc::new(SqliteStore::open(&data_dir.join("meterd.sqlite"))?);
        // The Stripe ledger lives in the same store as the usage it reports.
        type Stores = (Arc<dyn crate::store::UsageStore>, Arc<dyn crate::store::LedgerStore>, Duration);
        let (usage_store, ledger_store, flush_interval): Stores = match &config.clickhouse {
            Some(ch) => {
                let store = Arc::new(crate::store::clickhouse::ClickHouseStore::connect(&ch.url, &ch.database).await?);
                tracing::info!(url = %ch.url, database = %ch.database, "usage store: ClickHouse");
                (store.clone(), store, ch.flush_interval)
            }
            None => (sqlite.clone(), sqlite.clone(), config.storage.flush_interval),
        };
        // The raw-events export reads the WAL: its segments are kept until it
        // has them (from the watermark on; everything when there is none).
        let wal_dir = data_dir.join("wal");
        let raw_events = match &config.clickhouse {
            Some(ch) if ch.raw_events => {
                let table = crate::store::raw_events::RawEventsTable::connect(&ch.url, &ch.database).await?;
                let from = crate::raw_export::watermark::read(&wal_dir).map_err(crate::raw_export::ExportError::from)?;
                Some((table, from.unwrap_or(0)))
            }
            _ => None,
        };
        let storage = &config.storage;
        let wal_config = crate::wal::WalConfig {
            dir: wal_dir.clone(),
            sync: wal_sync(storage.durability, storage.wal_sync_interval),
            segment_bytes: storage.wal_segment_bytes,
            dedupe_window_ms: crate::duration::millis_i64(config.ingest.dedupe_window),
            hold: raw_events.as_ref().map(|(_, from)| *from),
            sync_spacing: storage.wal_sync_spacing,
        };
        let redis = match &config.redis {
            Some(rc) => {
                let redis = crate::redis_link::Redis::connect(&rc.urls, &rc.key_prefix, rc.timeout).await?;
                tracing::info!(urls = ?rc.urls, prefix = %rc.key_prefix, "entitlements and global counters: Redis");
                Some(redis)
            }
            None => None,
        };
        let entitlement_store: Arc<dyn crate::store::EntitlementStore> = match &redis {
            Some(r) => Arc::new(crate::store::redis::RedisEntitlementStore::new(r.clone())),
            None => sqlite.clone(),
        };
        // Threshold notifications (issue 17): the outbox opens and the detector
        // joins the seam's observers before the engine starts.
        let notifier = match &config.notifications {
            Some(n) => {
                let full_sync = storage.durability == crate::config::Durability::Fsync;
                let notifier = crate::notify::Notifier::open(n, &data_dir, full_sync)?;
                observers.push(notifier.observer());
                Some(notifier)
            }
            None => None,
        };
        let engine = Arc::new(
            Engine::start_observed(&config, instance_id.clone(), usage_store, entitlement_store, wal_config, redis.clone(), observers)
                .await?,
        );
        if let Some(notifier) = &notifier {
            notifier.bind(&engine, config.redis.as_ref().map(|r| r.key_prefix.as_str()));
            // Credit balances' low / depleted crossings go to the same outbox (issues 17 + 18).
            engine.credits().set_alert_sink(Arc::new(CreditNotices(notifier.clone())));
            let endpoints = notifier.endpoints();
            let labels: Vec<(&str, Vec<&str>)> = endpoints
                .0
                .iter()
                .map(|e| (e.name.as_str(), crate::config::NOTIFICATION_TYPES.iter().copied().filter(|t| e.wants(t)).collect()))
                .collect();
            crate::telemetry::register_notifications(&labels, crate::config::NOTIFICATION_TYPES);
        }
        let exporter = match raw_events {
            Some((table, _)) => {
                let max_rows = crate::raw_export::MAX_CHUNK_ROWS;
                Some(crate::raw_export::Exporter::start(engine.clone(), table, &wal_dir, max_rows).await?)
            }
            None => None,
        };
        crate::telemetry::register_known(&crate::telemetry::Known {
            meters: engine.catalog().meters().iter().map(|m| (usize::from(m.id), m.name.as_str())).collect(),
            redis: redis.is_some(),
            stripe: config.stripe.is_some(),
            raw_events: exporter.is_some(),
        });
        let stripe = match &config.stripe {
            None => None,
            Some(settings) => Some(stripe_reporter(&config, settings, &engine, ledger_store, &instance_id)?),
        };
        // Stripe subscription sync and portal tokens (issue 20).
        let (stripe_webhooks, portal) = billing(&config, &data_dir, redis.as_ref())?;
        if let Some(webhooks) = &stripe_webhooks {
            // Paid checkout sessions with grant metadata become credit grants (issues 18 + 20).
            webhooks.set_grant_issuer(Arc::new(EngineGrants(engine.clone())));
        }
        let state = Arc::new(HttpState {
            engine: engine.clone(),
            auth: http::auth::Auth::new(&config.keys),
            max_body: config.ingest.max_body_bytes,
            prometheus,
            shutting_down: false.into(),
            stripe: stripe.as_ref().map(|(board, _)| board.clone()),
            health: Health::new(),
            stripe_webhooks,
            portal,
            notifier: notifier.clone(),
            // Adjustments (issue 19): the audit list beside the other files.
            adjustments: crate::adjust::Adjustments::open(&data_dir, storage.durability == crate::config::Durability::Fsync)?,
        });
        let health = state.health.clone();
        // Config reload (issue 23): the API keys change live; other parts register here.
        let mut parts: Vec<Arc<dyn crate::reload::Reloadable>> = vec![Arc::new(crate::reload::AuthKeys(state.clone()))];
        // Threshold notifications (issue 17): endpoints change live.
        if let Some(n) = &notifier {
            parts.push(Arc::new(crate::reload::NotificationEndpoints(n.clone())));
        }
        // Live plans (issue 23): limits, added plans and the default plan.
        parts.push(Arc::new(crate::reload::LivePlans(engine.clone())));
        let reloader = Arc::new(crate::reload::Reloader::new(config.clone(), parts));
        if !state.auth.enabled() {
            tracing::warn!(listen = %config.server.listen, "no [[auth.keys]] configured: every request on this loopback address is allowed");
        }
        let listener =
            TcpListener::bind(config.server.listen).await.map_err(|source| AppError::Bind { addr: config.server.listen, source })?;
        let addr = listener.local_addr().map_err(|source| AppError::Bind { addr: config.server.listen, source })?;
        let (server_stop, server_rx) = watch::channel(false);
        let (flusher_stop, flusher_rx) = watch::channel(false);
        let threads = config.server.connection_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let connection_threads = Arc::new(http::ConnectionThreads::start(threads)?);
        let (metrics_addr, metrics_server) = match config.metrics_listen {
            None => (None, None),
            Some(maddr) => {
                let l = TcpListener::bind(maddr).await.map_err(|source| AppError::Bind { addr: maddr, source })?;
                let bound = l.local_addr().map_err(|source| AppError::Bind { addr: maddr, source })?;
                (
                    Some(bound),
                    Some(tokio::spawn(http::serve(
                        l,
                        state.clone(),
                        http::Routes::OpsOnly,
                        server_rx.clone(),
                        edge,
                        connection_threads.clone(),
                    ))),
                )
            }
        };
        let server = tokio::spawn(http::serve(listener, state.clone(), http::Routes::All, server_rx, edge, connection_threads.clone()));
        let e = engine.clone();
        let flusher =
            tokio::spawn(supervise(FLUSHER, health.clone(), flusher_rx, move |rx| Some(crate::flush::run(e.clone(), flush_interval, rx))));
        let grace = config.server.shutdown_grace;
        let raw_export = exporter.map(|exporter| {
            tracing::info!(table = crate::store::raw_events::TABLE, "raw-events export enabled");
            let (stop, stop_rx) = watch::channel(false);
            let mut exporter = Some(exporter);
            let make = move |rx| exporter.take().map(|x| crate::raw_export::run(x, flush_interval, rx, grace / 4));
            (stop, tokio::spawn(supervise(RAW_EXPORT, health.clone(), stop_rx, make)))
        });
        let (redis_stop, redis_rx) = watch::channel(false);
        let mut redis_tasks = Vec::new();
        if let (Some(redis), Some(rc)) = (&redis, &config.redis) {
            let (e, r) = (engine.clone(), redis.clone());
            let listener = move |rx| Some(crate::sync::entitlements::run(e.clone(), r.clone(), rx));
            redis_tasks.push(tokio::spawn(supervise(ENTITLEMENT_LISTENER, health.clone(), redis_rx.clone(), listener)));
            let sync = Arc::new(crate::sync::counters::CounterSync::new(redis.clone(), &instance_id));
            let (e, interval) = (engine.clone(), rc.sync_interval);
            let syncer = move |rx| Some(crate::sync::counters::run(e.clone(), sync.clone(), interval, rx));
            redis_tasks.push(tokio::spawn(supervise(COUNTER_SYNCER, health.clone(), redis_rx.clone(), syncer)));
            // Prepaid credits (issue 18): grants made on other instances.
            let e = engine.clone();
            let refresh = move |rx| Some(crate::grants::refresh(e.clone(), interval, rx));
            redis_tasks.push(tokio::spawn(supervise(GRANTS_REFRESH, health.clone(), redis_rx, refresh)));
        }
        let reporter = stripe.map(|(_, reporter)| {
            let (stop, stop_rx) = watch::channel(false);
            let mut reporter = Some(reporter);
            (stop, tokio::spawn(supervise(STRIPE_REPORTER, health.clone(), stop_rx, move |rx| reporter.take().map(|r| r.run(rx)))))
        });
        let notify_task = notifier.clone().map(|n| {
            let (stop, stop_rx) = watch::channel(false);
            (stop, tokio::spawn(supervise(NOTIFIER, health.clone(), stop_rx, move |rx| Some(crate::notify::deliver::run(n.clone(), rx)))))
        });
        // Reservations (issue 19): expired holds are released, also those that expired while down.
        let hold_expiry = {
            let (stop, stop_rx) = watch::channel(false);
            let e = engine.clone();
            (
                stop,
                tokio::spawn(supervise(HOLD_EXPIRY, health.clone(), stop_rx, move |rx| {
                    Some(crate::reservations::run_expiry(e.clone(), rx))
                })),
            )
        };
        tracing::info!(%addr, instance_id = %instance_id, data_dir = %data_dir.display(), config = %config.source, "meterd listening");
        Ok(AppHandle {
            addr,
            metrics_addr,
            engine,
            health,
            state,
            server_stop,
            flusher_stop,
            server,
            metrics_server,
            connection_threads,
            flusher,
            redis_stop,
            redis_tasks,
            reporter,
            raw_export,
            notifier,
            notify_task,
            grace,
            reloader,
            hold_expiry,
        })
    }

    /// Graceful shutdown: stop accepting, finish in-flight requests, final flush.
    ///
    /// Draining connections may take at most half the grace period; connections
    /// still open then are cut (nothing on them was acknowledged yet). The final
    /// flush always runs, within the rest of the grace period.
    pub async fn shutdown(self) -> Result<(), AppError> {
        let grace = self.grace;
        tokio::time::timeout(grace, self.shutdown_inner(grace / 2)).await.map_err(|_| AppError::Timeout)?
    }

    /// The first step of shutdown alone: `/readyz` and new API requests answer
    /// 503 while connections are still accepted (load balancers see it first).
    pub fn begin_shutdown(&self) {
        self.state.shutting_down.store(true, Ordering::Release);
    }

    async fn shutdown_inner(self, drain_limit: Duration) -> Result<(), AppError> {
        self.begin_shutdown();
        let _ = self.server_stop.send(true);
        let drained_by = tokio::time::Instant::now() + drain_limit;
        let mut servers = vec![self.server];
        servers.extend(self.metrics_server);
        for mut server in servers {
            match tokio::time::timeout_at(drained_by, &mut server).await {
                Ok(joined) => joined.map_err(|e| AppError::Task(e.to_string()))?,
                Err(_) => {
                    tracing::warn!(limit = ?drain_limit, "connections still open after the drain limit; closing them");
                    server.abort();
                    // The abort lands on the connection threads; wait for it.
                    let _ = server.await;
                }
            }
        }
        // Engine calls whose clients left run on as tasks of the connection
        // threads: they end (their folds land) before the final flush.
        self.connection_threads.stop(drained_by).await;
        // Reservations (issue 19).
        let (stop, task) = self.hold_expiry;
        let _ = stop.send(true);
        task.await.map_err(|e| AppError::Task(e.to_string()))?.map_err(|e| AppError::Task(e.to_string()))?;
        if let Some((stop, task)) = self.notify_task {
            // Pending rows stay in the outbox for the next start.
            let _ = stop.send(true);
            task.await.map_err(|e| AppError::Task(e.to_string()))?.map_err(|e| AppError::Task(e.to_string()))?;
        }
        if let Some((stop, reporter)) = self.reporter {
            let _ = stop.send(true);
            reporter.await.map_err(|e| AppError::Task(e.to_string()))?.map_err(|e| AppError::Task(e.to_string()))?;
        }
        let _ = self.flusher_stop.send(true);
        let flushed = self.flusher.await.map_err(|e| AppError::Task(e.to_string()))?.map_err(|e| AppError::Task(e.to_string()))?;
        flushed.unwrap_or(Ok(()))?;
        if let Some((stop, exporter)) = self.raw_export {
            // After the final flush: ingest has stopped, the WAL holds everything.
            let _ = stop.send(true);
            exporter.await.map_err(|e| AppError::Task(e.to_string()))?.map_err(|e| AppError::Task(e.to_string()))?;
        }
        let _ = self.redis_stop.send(true);
        for task in self.redis_tasks {
            task.await.map_err(|e| AppError::Task(e.to_string()))?.map_err(|e| AppError::Task(e.to_string()))?;
        }
        self.engine.wal().close();
        tracing::info!("meterd stopped");
        Ok(())
    }
}

// Stripe subscription sync and portal tokens (issue 20).

/// The Stripe webhook receiver (its applied-events ledger in Redis when
/// instances share one, else in `data_dir/stripe_events.sqlite`) and the
/// portal-token key.
type Billing = (Option<Arc<crate::billing_sync::StripeWebhooks>>, Arc<http::portal::PortalTokens>);

fn billing(config: &ValidConfig, data_dir: &Path, redis: Option<&crate::redis_link::Redis>) -> Result<Billing, AppError> {
    use crate::store::stripe_events::{RedisStripeEvents, SqliteStripeEvents, StripeEventLedger};
    let webhooks = match &config.stripe_webhooks {
        None => None,
        Some(settings) => {
            let ledger: Arc<dyn StripeEventLedger> = match redis {
                Some(r) => Arc::new(RedisStripeEvents::new(r.clone())),
                None => Arc::new(SqliteStripeEvents::open(&data_dir.join("stripe_events.sqlite"))?),
            };
            crate::telemetry::register_stripe_webhooks();
            tracing::info!(secret_env = %settings.secret_env, prices = settings.plans.len(), "Stripe webhooks enabled at POST /v1/webhooks/stripe");
            Some(Arc::new(crate::billing_sync::StripeWebhooks::new(settings.clone(), ledger)))
        }
    };
    let portal = http::portal::PortalTokens::load(config.portal_secret.as_ref().map(|k| k.expose()), data_dir).map_err(|e| {
        AppError::DataDir { path: data_dir.join("portal_secret").display().to_string(), source: std::io::Error::other(e.to_string()) }
    })?;
    Ok((webhooks, Arc::new(portal)))
}

/// Credit alerts as notifications: `credits.low` / `credits.depleted` with
/// API.md's data, stored in the outbox before the usage that caused them is
/// answered (the sink runs on that thread).
struct CreditNotices(Arc<crate::notify::Notifier>);

impl crate::credits::CreditAlertSink for CreditNotices {
    fn alert(&self, alert: crate::credits::CreditAlert) {
        let kind = alert.kind.as_str();
        let notification = crate::notify::Notification {
            id: crate::notify::credit_notification_id(kind, &alert.customer, &alert.meter, alert.episode),
            kind: kind.to_string(),
            data: serde_json::json!({
                "customer": alert.customer, "meter": alert.meter,
                "balance": alert.balance, "low_balance": alert.low_balance,
            }),
            customer: alert.customer,
        };
        if let Err(e) = self.0.enqueue(&notification) {
            tracing::error!(error = %e, id = %notification.id, kind, "could not store a credit notification");
        }
    }
}

/// The credits service as the Stripe webhook receiver's grant issuer: a paid
/// checkout session becomes a grant whose id is the session id, so a
/// redelivered or repeated session changes nothing.
struct EngineGrants(Arc<Engine>);

#[async_trait::async_trait]
impl crate::billing_sync::GrantIssuer for EngineGrants {
    async fn issue(&self, grant: crate::billing_sync::CheckoutGrant) -> Result<bool, crate::billing_sync::GrantIssueError> {
        use crate::billing_sync::GrantIssueError;
        use crate::grants::GrantError;
        let spec = crate::model::grant::GrantSpec {
            reason: Some(format!("stripe checkout {}", grant.id)),
            id: grant.id,
            meter: grant.meter,
            amount: grant.amount,
            priority: None,
            effective_at_ms: None,
            expires_at_ms: None,
        };
        match self.0.grant_ports().create_grant(&grant.customer, spec).await {
            Ok((_, created)) => Ok(created),
            Err(e @ (GrantError::Invalid(_) | GrantError::Conflict(_) | GrantError::NotFound(_))) => {
                Err(GrantIssueError::Refused(e.to_string()))
            }
            Err(e @ (GrantError::Full | GrantError::Store(_))) => Err(GrantIssueError::Unavailable(e.to_string())),
        }
    }
}
