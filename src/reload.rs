//! Changing the config without a restart: `SIGHUP` (or `meterd reload`, which
//! signals the pid in `data_dir/meterd.pid` and waits for the outcome in
//! `data_dir/reload.status`) re-reads the config file, validates it whole, and
//! swaps what may change live, all or nothing.
//!
//! # What is live
//!
//! Each part that can change live is a [`Reloadable`]: it `prepare`s its new
//! state from the new config (and may refuse it), and only when every part has
//! prepared are the returned commits run (each an infallible pointer swap). The
//! API keys (`[[auth.keys]]`) are one ([`AuthKeys`]), the notification
//! endpoints another ([`NotificationEndpoints`]), the plans and meters added a
//! third ([`LivePlans`]); **other features add theirs** with [`Reloader::register`].
//!
//! Everything else is compared with the running config by [`refused`]: a change
//! there (listen addresses, `data_dir`, durability and the other `[storage]`
//! settings, `[ingest]`, `[redis]`, `[clickhouse]`, `[stripe]`, an existing
//! meter changed or removed) refuses the whole reload with a log line naming
//! each key, and the running config keeps serving.
//!
//! Meter ids are positions in `[[meters]]` at start; a reloaded config is
//! first renumbered to the running ids ([`crate::model::Catalog::numbered_as`]):
//! a meter already running keeps its id wherever it is listed, a new one takes
//! the next free id. A new config section is live only once a part applies
//! it; until then, list it in [`refused`] (which names every field of
//! `ValidConfig`, so a new one does not compile until it is decided).

use crate::config::ValidConfig;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a reload was not applied (the running config keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config does not load or validate (every problem is listed).
    #[error("{0}")]
    Invalid(String),
    #[error("cannot change without a restart: {}", .0.join("; "))]
    Refused(Vec<String>),
    #[error("{part}: {reason}")]
    Prepare { part: &'static str, reason: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Applies a prepared change: must not fail (everything that can fail is done
/// in [`Reloadable::prepare`]).
pub type Commit = Box<dyn FnOnce() + Send>;

/// A part of the running meterd that takes config changes live.
pub trait Reloadable: Send + Sync {
    /// For log lines.
    fn name(&self) -> &'static str;
    /// Builds the new state from `new` without installing it, or says why `new`
    /// cannot be taken.
    fn prepare(&self, new: &ValidConfig) -> Result<Commit, String>;
}

/// The API keys: the key table of `/v1/*` is swapped whole.
pub struct AuthKeys(pub Arc<crate::http::HttpState>);

impl Reloadable for AuthKeys {
    fn name(&self) -> &'static str {
        "auth.keys"
    }

    fn prepare(&self, new: &ValidConfig) -> Result<Commit, String> {
        let state = self.0.clone();
        let keys = new.keys.clone();
        if keys.is_empty() && state.auth.enabled() {
            // Validation allows no keys on loopback only; going from keys to none
            // would open the API: not something a reload should do quietly.
            return Err("the new config has no keys while the running one has some; restart to turn authentication off".into());
        }
        Ok(Box::new(move || state.auth.replace(&keys)))
    }
}

/// Threshold notifications (issue 17): the endpoints (URLs, secrets, types)
/// are swapped live; whether `[notifications]` exists, its thresholds and
/// timings need a restart (see [`refused`]).
pub struct NotificationEndpoints(pub Arc<crate::notify::Notifier>);

impl Reloadable for NotificationEndpoints {
    fn name(&self) -> &'static str {
        "notifications.endpoints"
    }

    fn prepare(&self, new: &ValidConfig) -> Result<Commit, String> {
        let notifier = self.0.clone();
        let endpoints = new.notifications.as_ref().map(|n| n.endpoints.clone()).ok_or("[notifications] was removed; restart")?;
        Ok(Box::new(move || notifier.set_endpoints(endpoints)))
    }
}

/// Plans and meters added (issue 23): a plan's limits and features, plans
/// added or removed, the default plan and new meters change live. New meters
/// are added to the running catalog first, laid out as if configured at start
/// ([`crate::engine::Engine::add_meters`]); then the new plan set is swapped in
/// whole ([`crate::model::Catalog::replace_plans`]) and every cached customer's
/// entitlements are re-resolved against it, so the next check sees the new
/// limits. Refused (with the reason): a limit on an existing meter's window no
/// plan counted at start (its counters hold no history; restart), a credits
/// limit on a meter that was not a credits meter (or, for a new meter, when no
/// plan had a credits limit at start), removing a plan stored customers are
/// on, more new meters than the process has room for.
pub struct LivePlans(pub Arc<crate::engine::Engine>);

impl LivePlans {
    /// The meters of `new` (numbered as the running ones) that are not running yet.
    fn added(&self, new: &ValidConfig) -> Vec<crate::model::Meter> {
        let running = self.0.catalog().meters().len();
        new.catalog.meters().iter().filter(|m| usize::from(m.id) >= running).cloned().collect()
    }

    /// Why `new`'s plans and meters cannot be taken live, every reason.
    fn problems(&self, new: &ValidConfig) -> Vec<String> {
        let engine = &self.0;
        let catalog = engine.catalog();
        let mut problems = Vec::new();
        let running = catalog.meters();
        let kept: Vec<_> = new.catalog.meters().iter().take(running.len()).cloned().collect();
        if kept != running.to_vec() {
            // `refused` names it; never install plans keyed by other meter ids.
            problems.push("the meters differ".to_string());
            return problems;
        }
        if new.catalog.meters().len() > catalog.capacity() {
            problems.push(format!(
                "[[meters]]: {} meters, but this process has room for {} (a process adds at most {} meters live); restart",
                new.catalog.meters().len(),
                catalog.capacity(),
                crate::model::plan::METER_HEADROOM
            ));
        }
        for plan in new.catalog.plans().iter() {
            let mut limits: Vec<_> = plan.limits.iter().collect();
            limits.sort_by_key(|(m, _)| **m);
            for (&meter, limits) in limits {
                let added = usize::from(meter) >= running.len();
                let name = new.catalog.meter(meter).map(|m| m.name.as_str()).unwrap_or("?");
                for limit in limits.iter() {
                    if added {
                        // A new meter has counted nothing: every window starts
                        // empty and exact. Credits need the book observing usage.
                        if limit.amount.is_credits() && !engine.credits().observes() {
                            problems.push(format!(
                                "plans.{}.limits.{name}: a credits limit on a new meter while no plan had a credits limit at start; restart",
                                plan.name
                            ));
                        }
                    } else if limit.amount.is_credits() {
                        if !engine.credits().is_credit_meter(meter) || !engine.credits().observes() {
                            problems.push(format!(
                                "plans.{}.limits.{name}: a credits limit on a meter that had none at start; restart",
                                plan.name
                            ));
                        }
                    } else if !engine.plan_kinds().tracks(meter, limit.window) {
                        problems.push(format!(
                            "plans.{}.limits.{name}: no plan counted the {} window of {name} at start, so its counters hold no history; restart",
                            plan.name, limit.window
                        ));
                    }
                }
            }
        }
        for (plan, customers) in engine.entitlements().unresolved(&new.catalog) {
            problems.push(format!("plan {plan:?} is removed but {customers} stored customer(s) are on it; move them first"));
        }
        problems
    }
}

impl Reloadable for LivePlans {
    fn name(&self) -> &'static str {
        "plans"
    }

    fn prepare(&self, new: &ValidConfig) -> Result<Commit, String> {
        let problems = self.problems(new);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let engine = self.0.clone();
        let catalog = new.catalog.clone();
        let added = self.added(new);
        Ok(Box::new(move || {
            // Checked in `prepare`: room, next ids, new names; cannot fail here
            // unless two reloads raced, which `Reloader::apply` serializes.
            if let Err(e) = engine.add_meters(&added, &catalog) {
                tracing::error!(error = %e, "meters not added; the plans keep their previous set");
                return;
            }
            if !added.is_empty() {
                let names: Vec<&str> = added.iter().map(|m| m.name.as_str()).collect();
                tracing::info!(meters = ?names, "meters added");
            }
            engine.catalog().replace_plans(&catalog);
            engine.entitlements().refresh();
        }))
    }
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Counts applied reloads since start (1 for the first).
    pub generation: u64,
    pub keys: usize,
    /// The parts that took the new config.
    pub parts: Vec<&'static str>,
}

/// The running config and the parts that take changes live.
pub struct Reloader {
    current: Mutex<ValidConfig>,
    parts: Mutex<Vec<Arc<dyn Reloadable>>>,
    generation: AtomicU64,
}

impl Reloader {
    pub fn new(running: ValidConfig, parts: Vec<Arc<dyn Reloadable>>) -> Reloader {
        Reloader { current: Mutex::new(running), parts: Mutex::new(parts), generation: AtomicU64::new(0) }
    }

    /// Adds a part that takes changes live (call at start).
    pub fn register(&self, part: Arc<dyn Reloadable>) {
        self.parts.lock().unwrap_or_else(|p| p.into_inner()).push(part);
    }

    /// The config now serving.
    pub fn current(&self) -> ValidConfig {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Loads `path` (the file meterd started with; `None`: the embedded
    /// default), validates it and applies it; logs the outcome either way.
    pub fn reload_file(&self, path: Option<&Path>) -> Result<Applied, ReloadError> {
        // One line per outcome: the problems are joined with "; ".
        let one_line = |e: crate::config::ConfigError| e.to_string().lines().map(str::trim).collect::<Vec<_>>().join(" ");
        let result = crate::config::load_valid(path).map_err(|e| ReloadError::Invalid(one_line(e))).and_then(|new| self.apply(new));
        match &result {
            Ok(applied) => tracing::info!(generation = applied.generation, keys = applied.keys, parts = ?applied.parts, "config reloaded"),
            Err(e) => tracing::error!(error = %e, "config reload refused; the running config keeps serving"),
        }
        result
    }

    /// Applies a validated config: all of it, or (on any refusal) none of it.
    pub fn apply(&self, mut new: ValidConfig) -> Result<Applied, ReloadError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        // Meters keep their running ids; new ones are numbered after them.
        new.catalog = Arc::new(new.catalog.numbered_as(&current.catalog));
        let refusals = refused(&current, &new);
        if !refusals.is_empty() {
            return Err(ReloadError::Refused(refusals));
        }
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut commits = Vec::with_capacity(parts.len());
        for part in &parts {
            commits.push(part.prepare(&new).map_err(|reason| ReloadError::Prepare { part: part.name(), reason })?);
        }
        for commit in commits {
            commit();
        }
        let applied = Applied {
            generation: self.generation.fetch_add(1, Ordering::AcqRel) + 1,
            keys: new.keys.len(),
            parts: parts.iter().map(|p| p.name()).collect(),
        };
        *current = new;
        Ok(applied)
    }
}

/// Every setting that differs between `old` and `new` and cannot change live:
/// `key (old → new)` for plain settings, the section's name alone for the
/// sections (their values may hold secrets: Redis URLs with a password).
pub fn refused(old: &ValidConfig, new: &ValidConfig) -> Vec<String> {
    // Every field is named here on purpose: a new config field fails to compile
    // until it is either compared below (needs a restart) or applied by a
    // registered `Reloadable` part (then list it as live: `_`). Silently
    // ignoring a changed setting on reload is the one outcome not allowed.
    let ValidConfig {
        server: _,
        storage: _,
        ingest: _,
        redis: _,
        clickhouse: _,
        stripe: _,
        metrics_listen: _,
        catalog: _, // plans live: `LivePlans`; meters below
        keys: _,    // live: `AuthKeys`
        source: _,
        stripe_webhooks: _,
        portal_secret: _,
        notifications: _, // endpoints live: `NotificationEndpoints`; the rest below
    } = new;
    let mut out = Vec::new();
    let differs = |a: &dyn Debug, b: &dyn Debug| format!("{a:?}") != format!("{b:?}");
    let mut value = |key: &str, a: &dyn Debug, b: &dyn Debug| {
        if differs(a, b) {
            out.push(format!("{key} ({a:?} → {b:?})"));
        }
    };
    let (s, n) = (&old.server, &new.server);
    value("server.listen", &s.listen, &n.listen);
    value("server.instance_id", &s.instance_id, &n.instance_id);
    value("server.shutdown_grace", &s.shutdown_grace, &n.shutdown_grace);
    value("server.header_read_timeout", &s.header_read_timeout, &n.header_read_timeout);
    value("server.body_read_timeout", &s.body_read_timeout, &n.body_read_timeout);
    value("server.idle_timeout", &s.idle_timeout, &n.idle_timeout);
    value("server.max_connections", &s.max_connections, &n.max_connections);
    value("server.connection_threads", &s.connection_threads, &n.connection_threads);
    value("metrics.listen", &old.metrics_listen, &new.metrics_listen);
    let (s, n) = (&old.storage, &new.storage);
    value("storage.data_dir", &s.data_dir, &n.data_dir);
    value("storage.durability", &s.durability, &n.durability);
    value("storage.flush_interval", &s.flush_interval, &n.flush_interval);
    value("storage.wal_sync_interval", &s.wal_sync_interval, &n.wal_sync_interval);
    value("storage.wal_sync_spacing", &s.wal_sync_spacing, &n.wal_sync_spacing);
    value("storage.wal_segment_bytes", &s.wal_segment_bytes, &n.wal_segment_bytes);
    value("storage.max_wal_bytes", &s.max_wal_bytes, &n.max_wal_bytes);
    value("storage.max_pending_buckets", &s.max_pending_buckets, &n.max_pending_buckets);
    // Threshold notifications (issue 17): adding or removing the section, the
    // thresholds and the timings need a restart; endpoints change live.
    match (&old.notifications, &new.notifications) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            value("notifications.thresholds", &a.thresholds.as_slice(), &b.thresholds.as_slice());
            value("notifications.retry_for", &a.retry_for, &b.retry_for);
            value("notifications.timeout", &a.timeout, &b.timeout);
        }
        (a, b) => value("[notifications] present", &a.is_some(), &b.is_some()),
    }
    if old.portal_secret.as_ref().map(|k| k.expose()) != new.portal_secret.as_ref().map(|k| k.expose()) {
        out.push("server.portal_secret_env".to_string());
    }
    let sections: [(&str, &dyn Debug, &dyn Debug); 5] = [
        ("[ingest]", &old.ingest, &new.ingest),
        ("[redis]", &old.redis, &new.redis),
        ("[clickhouse]", &old.clickhouse, &new.clickhouse),
        ("[stripe]", &old.stripe, &new.stripe),
        ("[stripe.webhooks]", &old.stripe_webhooks, &new.stripe_webhooks),
    ];
    for (key, a, b) in sections {
        if differs(a, b) {
            out.push(key.to_string());
        }
    }
    // Meters and plans are compared by value, not by their Debug text: a plan's
    // limits sit in a HashMap, whose order differs between two parses.
    // Plans change live and meters are added live (`LivePlans`).
    out.extend(meter_changes(&old.catalog, &new.catalog));
    out
}

/// Why the meters of `new` cannot replace those of `old` live, one line per
/// meter: a meter changed or removed (adding is live). Usage already counted
/// and acknowledged was combined and scaled by the running definition, and
/// the WAL, the counters and the stores hold it under the running name.
pub fn meter_changes(old: &crate::model::Catalog, new: &crate::model::Catalog) -> Vec<String> {
    let mut out = Vec::new();
    for m in old.meters().iter() {
        let name = &m.name;
        let Some(n) = new.meter_by_name(name) else {
            out.push(format!(
                "meters.{name}: removed (or renamed); its acknowledged usage (WAL, counters, usage store, Stripe reports) would be orphaned; restart to remove a meter"
            ));
            continue;
        };
        if n.aggregation != m.aggregation {
            out.push(format!(
                "meters.{name}.aggregation ({} → {}): the usage counted so far was combined as {}; restart, or add a meter under a new name",
                m.aggregation, n.aggregation, m.aggregation
            ));
        }
        if n.precision != m.precision {
            out.push(format!(
                "meters.{name}.precision ({} → {}): the usage counted so far is in raw units of the old precision; restart",
                m.precision, n.precision
            ));
        }
        if n.stripe_event_name != m.stripe_event_name {
            out.push(format!(
                "meters.{name}.stripe_event_name ({:?} → {:?}): reports in flight name the old Stripe meter; restart",
                m.stripe_event_name, n.stripe_event_name
            ));
        }
        if n.unique_property != m.unique_property {
            out.push(format!(
                "meters.{name}.unique_property ({:?} → {:?}): the distinct values counted so far are of the old property; restart",
                m.unique_property, n.unique_property
            ));
        }
        if n.group_by != m.group_by {
            out.push(format!(
                "meters.{name}.group_by ({:?} → {:?}): a running meter's definition is fixed; restart",
                m.group_by, n.group_by
            ));
        }
    }
    out
}

/// SIGHUP, listened for from the start of `serve` (unheard, it would end the process).
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts listening (call inside the runtime).
    pub fn listen() -> Hangups {
        #[cfg(unix)]
        {
            let signal = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; config reload is off");
                    None
                }
            };
            Hangups { signal }
        }
        #[cfg(not(unix))]
        Hangups {}
    }

    /// On each SIGHUP: reloads `path` through `reloader` and writes the outcome
    /// to [`status_file`] for `meterd reload`. Never returns.
    pub async fn reload_each(self, reloader: Arc<Reloader>, path: Option<PathBuf>, data_dir: PathBuf) {
        #[cfg(unix)]
        if let Some(mut signal) = self.signal {
            let mut attempt = 0;
            while signal.recv().await.is_some() {
                attempt += 1;
                let (reloader, path) = (reloader.clone(), path.clone());
                let outcome = tokio::task::spawn_blocking(move || reloader.reload_file(path.as_deref())).await;
                let (ok, message) = match outcome {
                    Ok(Ok(a)) => (
                        true,
                        format!("config reloaded (generation {}, {} keys, live parts: {})", a.generation, a.keys, a.parts.join(", ")),
                    ),
                    Ok(Err(e)) => (false, format!("config reload refused; the running config keeps serving: {e}")),
                    Err(e) => (false, format!("config reload failed: {e}")),
                };
                let status = Status { attempt, pid: std::process::id(), ok, message };
                if let Err(e) = write_status(&data_dir, &status) {
                    tracing::warn!(error = %e, "cannot write the reload status for `meterd reload`");
                }
            }
        }
        let _ = (reloader, path, data_dir);
        std::future::pending().await
    }
}

/// The pid file `meterd reload` signals.
pub fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("meterd.pid")
}

/// The outcome of the last reload, for `meterd reload` to print.
pub fn status_file(data_dir: &Path) -> PathBuf {
    data_dir.join("reload.status")
}

/// The last reload's outcome, as kept in [`status_file`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// Counts reload attempts (applied or not) of this process.
    pub attempt: u64,
    pub pid: u32,
    pub ok: bool,
    pub message: String,
}

/// Writes `status` atomically (temp file and rename).
pub fn write_status(data_dir: &Path, status: &Status) -> Result<(), ReloadError> {
    let path = status_file(data_dir);
    let tmp = data_dir.join("reload.status.tmp");
    let io = |source| ReloadError::Io { path: path.display().to_string(), source };
    let text = serde_json::to_vec(status).map_err(|e| io(e.into()))?;
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// The last reload's outcome, if any was written.
pub fn read_status(data_dir: &Path) -> Option<Status> {
    std::fs::read(status_file(data_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides, Scope};
    use std::sync::atomic::AtomicUsize;

    fn config(listen: &str, durability: &str, keys: &[(&str, &str, u32)]) -> ValidConfig {
        let mut text = format!(
            "[server]\nlisten = \"{listen}\"\n[storage]\ndata_dir = \"/tmp/meterd-reload-test\"\ndurability = \"{durability}\"\n\
             [[meters]]\nname = \"tokens\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = {{ limit = 10, window = \"day\" }}\n"
        );
        for (name, key, rate) in keys {
            let sha = hex::encode(crate::config::sha256_of(key.as_bytes()));
            text.push_str(&format!(
                "[[auth.keys]]\nname = \"{name}\"\nkey_sha256 = \"{sha}\"\nscopes = [\"check\"]\nrate_limit_per_second = {rate}\nrate_limit_burst = 1\n"
            ));
        }
        let parsed = Config::parse(&text, "test").unwrap_or_else(|e| panic!("{e}"));
        parsed.validate_with("test", &Overrides::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_keys_change_live_and_every_other_change_is_named() {
        let old = config("127.0.0.1:8480", "fsync", &[("a", "key-a", 5)]);
        assert!(refused(&old, &config("127.0.0.1:8480", "fsync", &[("b", "key-b", 5), ("a", "key-a", 9)])).is_empty());
        let both = refused(&old, &config("127.0.0.1:9999", "buffered", &[("a", "key-a", 5)]));
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(both[0].starts_with("server.listen (127.0.0.1:8480 → 127.0.0.1:9999)"), "{both:?}");
        assert!(both[1].starts_with("storage.durability"), "{both:?}");
        let mut threads = old.clone();
        threads.server.connection_threads = Some(3);
        assert_eq!(refused(&old, &threads), ["server.connection_threads (None → Some(3))"]);
        let mut spacing = old.clone();
        spacing.storage.wal_sync_spacing = std::time::Duration::from_micros(800);
        assert_eq!(refused(&old, &spacing), ["storage.wal_sync_spacing (0ns → 800µs)"]);
        // A section is named, its values are not (a Redis URL may hold a password).
        let plain = config("127.0.0.1:8480", "fsync", &[("a", "key-a", 5)]);
        let text =
            "[redis]\nurl = \"redis://:hunter2@10.0.0.1:6379/0\"\n[[meters]]\nname = \"m\"\n[[plans]]\nname = \"p\"\ndefault = true\n";
        let parsed = Config::parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
        let mut with_redis = plain.clone();
        with_redis.redis = parsed.validate_with("t", &Overrides::default()).unwrap_or_else(|e| panic!("{e}")).redis;
        assert!(with_redis.redis.is_some());
        assert_eq!(refused(&plain, &with_redis), vec!["[redis]".to_string()]);
    }

    /// A config whose one plan has many limits (a HashMap inside the plan).
    fn many_limits() -> ValidConfig {
        let mut text = String::from("[server]\nlisten = \"127.0.0.1:8480\"\n[storage]\ndata_dir = \"/tmp/meterd-reload-test\"\n");
        for i in 0..12 {
            text.push_str(&format!("[[meters]]\nname = \"m{i}\"\n"));
        }
        text.push_str("[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\n");
        for i in 0..12 {
            text.push_str(&format!("m{i} = [{{ limit = {i}, window = \"day\" }}, {{ limit = 1000, window = \"month\" }}]\n"));
        }
        let parsed = Config::parse(&text, "test").unwrap_or_else(|e| panic!("{e}"));
        parsed.validate_with("test", &Overrides::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_unchanged_multi_limit_plan_reloads() {
        let old = many_limits();
        // Parse it again and again: HashMap orders differ between parses (random
        // seeds), which a comparison of Debug text took for a change.
        for _ in 0..20 {
            let new = many_limits();
            assert_eq!(refused(&old, &new), Vec::<String>::new());
            let reloader = Reloader::new(old.clone(), Vec::new());
            assert!(reloader.apply(new).is_ok());
        }
    }

    /// A config with `meters` (`[[meters]]` bodies) and plan `p` limiting `tokens`.
    fn with_meters(meters: &[&str]) -> ValidConfig {
        let mut text = String::from("[server]\nlisten = \"127.0.0.1:8480\"\n[storage]\ndata_dir = \"/tmp/meterd-reload-test\"\n");
        for m in meters {
            text.push_str(&format!("[[meters]]\n{m}\n"));
        }
        text.push_str("[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\ntokens = { limit = 10, window = \"day\" }\n");
        let parsed = Config::parse(&text, "test").unwrap_or_else(|e| panic!("{e}"));
        parsed.validate_with("test", &Overrides::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn adding_a_meter_is_live_and_changing_or_removing_one_is_named() {
        let old = with_meters(&["name = \"tokens\"", "name = \"gb\"\naggregation = \"max\"\nprecision = 2"]);
        let added = with_meters(&["name = \"calls\"", "name = \"tokens\"", "name = \"gb\"\naggregation = \"max\"\nprecision = 2"]);
        assert_eq!(refused(&old, &added), Vec::<String>::new());
        let changed = with_meters(&["name = \"tokens\"\naggregation = \"count\"", "name = \"gb\"\naggregation = \"max\"\nprecision = 3"]);
        let out = refused(&old, &changed);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].starts_with("meters.tokens.aggregation (sum → count)"), "{out:?}");
        assert!(out[1].starts_with("meters.gb.precision (2 → 3)"), "{out:?}");
        let removed = refused(&old, &with_meters(&["name = \"tokens\""]));
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(removed[0].starts_with("meters.gb: removed") && removed[0].contains("orphaned"), "{removed:?}");
        let regrouped = refused(
            &old,
            &with_meters(&["name = \"tokens\"\ngroup_by = [\"model\"]", "name = \"gb\"\naggregation = \"max\"\nprecision = 2"]),
        );
        assert_eq!(regrouped.len(), 1, "{regrouped:?}");
        assert!(regrouped[0].starts_with("meters.tokens.group_by ([] → [\"model\"])"), "{regrouped:?}");
        let users = with_meters(&["name = \"tokens\"", "name = \"users\"\naggregation = \"unique_count\"\nunique_property = \"user_id\""]);
        let other = with_meters(&["name = \"tokens\"", "name = \"users\"\naggregation = \"unique_count\"\nunique_property = \"org\""]);
        let out = refused(&users, &other);
        assert!(out.len() == 1 && out[0].starts_with("meters.users.unique_property"), "{out:?}");
        // Applied, the reloader keeps the running ids: `calls` is numbered after the others.
        let reloader = Reloader::new(old, Vec::new());
        assert!(reloader.apply(added).is_ok());
        let ids: Vec<(u16, String)> = reloader.current().catalog.meters().iter().map(|m| (m.id, m.name.clone())).collect();
        assert_eq!(ids, vec![(0, "tokens".into()), (1, "gb".into()), (2, "calls".into())]);
    }

    /// A part that counts its commits and may refuse.
    struct Probe {
        refuse: bool,
        commits: Arc<AtomicUsize>,
    }

    impl Reloadable for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn prepare(&self, _: &ValidConfig) -> Result<Commit, String> {
            if self.refuse {
                return Err("no".into());
            }
            let commits = self.commits.clone();
            Ok(Box::new(move || {
                commits.fetch_add(1, Ordering::AcqRel);
            }))
        }
    }

    #[test]
    fn a_refusing_part_or_a_non_live_change_applies_nothing() {
        let commits = Arc::new(AtomicUsize::new(0));
        let old = config("127.0.0.1:8480", "fsync", &[("a", "key-a", 5)]);
        let reloader = Reloader::new(old.clone(), vec![Arc::new(Probe { refuse: false, commits: commits.clone() })]);
        let new = config("127.0.0.1:8480", "fsync", &[("b", "key-b", 5)]);
        let applied = reloader.apply(new.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((applied.generation, applied.keys, commits.load(Ordering::Acquire)), (1, 1, 1));
        assert_eq!(reloader.current().keys[0].name, "b");
        // A second part refuses: the first one's commit does not run either.
        reloader.register(Arc::new(Probe { refuse: true, commits: commits.clone() }));
        let err = reloader.apply(old.clone()).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "probe: no");
        assert_eq!(commits.load(Ordering::Acquire), 1);
        assert_eq!(reloader.current().keys[0].name, "b", "the running config stays");
        let err = reloader.apply(config("127.0.0.1:1", "fsync", &[])).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("server.listen"), "{err}");
        assert_eq!(commits.load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_swapped_key_table_keeps_the_buckets_of_unchanged_keys() {
        let auth = crate::http::auth::Auth::new(&config("127.0.0.1:8480", "fsync", &[("a", "key-a", 1)]).keys);
        let mut headers = hyper::HeaderMap::new();
        headers.insert(hyper::header::AUTHORIZATION, hyper::header::HeaderValue::from_static("Bearer key-a"));
        assert!(auth.authorize(&headers, &[Scope::Check]).is_ok());
        assert!(auth.authorize(&headers, &[Scope::Check]).is_err(), "burst 1: the second is rate limited");
        // Same key, same rate, plus a new key: the emptied bucket stays empty.
        auth.replace(&config("127.0.0.1:8480", "fsync", &[("a", "key-a", 1), ("b", "key-b", 1)]).keys);
        assert!(auth.authorize(&headers, &[Scope::Check]).is_err(), "a reload does not refill a bucket");
        // A new rate is a new limiter.
        auth.replace(&config("127.0.0.1:8480", "fsync", &[("a", "key-a", 2)]).keys);
        assert!(auth.authorize(&headers, &[Scope::Check]).is_ok());
        // A removed key is unknown at once.
        auth.replace(&config("127.0.0.1:8480", "fsync", &[("b", "key-b", 1)]).keys);
        assert!(auth.authorize(&headers, &[Scope::Check]).is_err());
    }
}
