//! The one place that decides what a test does when a service it needs (a Redis
//! or ClickHouse server, their binaries, the ability to mount a tmpfs) is missing.
//!
//! With `METERD_TEST_REQUIRE_SERVICES` set (to anything but empty or `0`) a missing
//! service is a test failure: `scripts/test` exports it whenever it starts the
//! services, and CI runs through `scripts/test`, so a test there can never pass by
//! not running. Without it (a plain `cargo test` on a laptop) the test prints
//! `SKIPPED: …` and passes.
//!
//! A helper answers [`Need<T>`]: the service, or a [`Skipped`] that only this
//! module can make (after printing the note). A test takes the value with
//! [`need!`], which returns from the test on `Skipped`:
//!
//! ```ignore
//! let url = need!(require::clickhouse_url());
//! ```
//!
//! The file has no dependencies but `std`, so the same code serves the
//! integration tests (`tests/common`), the crate's unit tests
//! (`crate::store::suite::require`, included with `#[path]`) and the benches.
#![allow(dead_code, unused_macros, unused_imports)]

use std::fmt::Display;
use std::path::PathBuf;

/// The switch: set, a missing service fails the test instead of skipping it.
pub const SWITCH: &str = "METERD_TEST_REQUIRE_SERVICES";

/// A service is missing and the switch is off: the test was skipped (the note is
/// printed). Its field is private, so nothing outside this module makes one.
#[derive(Debug)]
pub struct Skipped(());

impl Skipped {
    /// Consumes the proof; [`need!`] calls it so only a `Skipped` can end a test early.
    pub fn pass(self) {}
}

/// A service, or the proof that the test is being skipped without it.
pub type Need<T> = Result<T, Skipped>;

/// `need!(helper())`: the service `helper` found, or return from the test (only
/// when the switch is off; under it the helper has already panicked).
macro_rules! need {
    ($found:expr) => {
        match $found {
            Ok(found) => found,
            Err(skipped) => {
                skipped.pass();
                return;
            }
        }
    };
}
pub(crate) use need;

/// Whether a missing service fails the test (`METERD_TEST_REQUIRE_SERVICES`).
pub fn services_required() -> bool {
    std::env::var_os(SWITCH).is_some_and(|v| !v.is_empty() && v != "0")
}

/// `what` is missing (`how` says how to provide it): panics under the switch,
/// otherwise prints the SKIPPED note and returns the proof.
#[track_caller]
pub fn missing(what: impl Display, how: impl Display) -> Skipped {
    if services_required() {
        panic!("{SWITCH} is set but {what}: {how}");
    }
    eprintln!("SKIPPED: {what} ({how}; set {SWITCH}=1 to make this a failure)");
    Skipped(())
}

/// The non-empty value of environment variable `var`, which `scripts/test` sets.
#[track_caller]
pub fn env(var: &str) -> Need<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(missing(format!("{var} is not set"), "run through scripts/test, which starts the service and sets it")),
    }
}

/// The shared Redis server `scripts/test` started (`METERD_TEST_REDIS_URL`).
#[track_caller]
pub fn redis_url() -> Need<String> {
    env("METERD_TEST_REDIS_URL")
}

/// The `redis-server` binary for tests that start their own (`METERD_TEST_REDIS_SERVER_BIN`).
#[track_caller]
pub fn redis_server_bin() -> Need<PathBuf> {
    env("METERD_TEST_REDIS_SERVER_BIN").map(PathBuf::from)
}

/// The shared ClickHouse server `scripts/test` started (`METERD_TEST_CLICKHOUSE_URL`).
#[track_caller]
pub fn clickhouse_url() -> Need<String> {
    env("METERD_TEST_CLICKHOUSE_URL")
}

/// The `clickhouse-server` binary for tests that start their own (`METERD_TEST_CLICKHOUSE_SERVER_BIN`).
#[track_caller]
pub fn clickhouse_server_bin() -> Need<PathBuf> {
    env("METERD_TEST_CLICKHOUSE_SERVER_BIN").map(PathBuf::from)
}
