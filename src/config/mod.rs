//! Configuration: the TOML file of docs/api.md, read in three steps so that one run
//! reports every problem of a file, each with its key path.
//!
//! 1. [`raw`]: the text as written, in serde structs where every key is optional
//!    and every value has the TOML type it was written with. Before deserializing,
//!    `schema` walks the parsed table and sets aside, as problems, every unknown
//!    key (with the nearest known key for a typo) and every value of the wrong TOML
//!    type, so that one bad value hides nothing else.
//! 2. `validate`: checks meaning (durations, sizes, enums, names, references
//!    between plans and meters, key material, the listen address) and collects
//!    every problem; plans, meters and API keys are named by name
//!    (`plans.starter.limits.interviews[1].window`).
//! 3. `settings`: what the rest of meterd uses, resolved: enums, `Duration`s,
//!    socket addresses, the [`Catalog`](crate::model::Catalog), hashed API keys.
//!
//! This layer depends on `model` and `duration` only.

pub mod raw;
mod schema;
mod settings;
mod validate;

pub use raw::Config;
pub use settings::{
    sha256_of, ApiKey, ClickHouseSettings, Durability, IngestSettings, RedisSettings, Scope, SecretKey, ServerSettings, StorageSettings,
    StrictWhenUnavailable, StripeMode, StripePeriod, StripeSettings, ValidConfig,
};
// Stripe subscription sync (issue 20).
pub use settings::StripeWebhookSettings;
// Threshold notifications (issue 17).
pub use settings::{EndpointSettings, Endpoints, NotificationSettings, WebhookSecret, NOTIFICATION_TYPES};

use std::fmt;
use std::path::{Path, PathBuf};

/// The config used when no file is given: the example SaaS setup shipped in
/// `config/meterd.toml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/meterd.toml");

/// The name of the variable that overrides `server.listen`.
pub const LISTEN_VAR: &str = "METERD_LISTEN";

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The text is not TOML (the parser stops at the first syntax error).
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), render(problems))]
    Invalid { path: String, problems: Vec<ConfigProblem> },
}

fn render(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
}

/// One problem: the key path (or the environment variable) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Settings the environment gives over the file's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `METERD_LISTEN`: replaces `server.listen`; problems with it name the variable.
    pub listen: Option<String>,
}

impl Overrides {
    /// The overrides set in this process's environment.
    pub fn from_env() -> Overrides {
        Overrides { listen: std::env::var(LISTEN_VAR).ok() }
    }
}

impl Config {
    /// Parses TOML text; `source` names the file in messages. Fails only when the
    /// text is not TOML: every other problem (unknown keys, values of the wrong
    /// type) is kept in the result for [`Config::validate`] to report with the rest.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        raw::read(text, source)
    }

    /// Reads and parses `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        match path {
            None => Ok((Config::parse(EMBEDDED_DEFAULT, "<embedded default>")?, "<embedded default>".to_string())),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                let source = p.display().to_string();
                Ok((Config::parse(&text, &source)?, source))
            }
        }
    }

    /// Checks every rule with the environment's overrides and resolves the
    /// settings; returns every problem.
    pub fn validate(self, source: &str) -> Result<ValidConfig, ConfigError> {
        self.validate_with(source, &Overrides::from_env())
    }

    /// [`Config::validate`] with explicit overrides.
    pub fn validate_with(self, source: &str, overrides: &Overrides) -> Result<ValidConfig, ConfigError> {
        validate::validate(self, source, overrides)
    }
}

/// Loads and validates in one step (with the environment's overrides).
pub fn load_valid(path: Option<&Path>) -> Result<ValidConfig, ConfigError> {
    let (config, source) = Config::load(path)?;
    config.validate(&source)
}

#[cfg(test)]
mod tests;
