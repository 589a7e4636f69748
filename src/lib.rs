//! meterd: a usage-metering daemon. Application servers send usage events and ask,
//! on their request path, whether a customer may use more; meterd answers from
//! memory, keeps exact totals, and flushes minute aggregates to a usage store.
//! See docs/architecture.md for the architecture and docs/api.md for the contract.

pub mod answers;
pub mod app;
pub mod backoff;
pub mod backup;
pub mod clock;
pub mod config;
pub mod counters;
pub mod dedupe;
pub mod duration;
pub mod engine;
pub mod entitlements;
pub mod flush;
pub mod health;
pub mod history;
pub mod http;
pub mod ingest;
pub mod keyhash;
pub mod limits;
pub mod mac;
pub mod model;
// Threshold notifications (issue 17).
pub mod notify;
pub mod priority;
pub mod raw_export;
pub mod redis_link;
pub mod rejected;
pub mod reload;
pub mod report;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod usage;
pub mod wal;
// Stripe subscription sync (issue 20).
pub mod billing_sync;
// Prepaid credits and grants (issue 18).
pub mod credits;
pub mod grants;
// Adjustments (issue 19).
pub mod adjust;

pub use app::{AppError, AppHandle};
// Reservations (issue 19).
pub mod holds;
pub mod reservations;
