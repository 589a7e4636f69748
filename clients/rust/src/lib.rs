//! A client for meterd, the usage-metering daemon (docs/api.md, docs/clients.md).
//!
//! [`Client::track`] buffers usage events and a background task sends them in
//! batches, by size (default 1,000) and by time (default 1 s). Each event's id
//! (UUIDv7) and timestamp are fixed when it is tracked, so every retry of a batch
//! is the same request and meterd counts a retried batch once. Retries on
//! 408/429/502/503/504 and network errors back off exponentially with jitter and
//! honour `Retry-After`. The direct calls ([`Client::check`], [`Client::consume`],
//! reservations, usage, balances, grants, entitlements) answer typed values or an
//! [`Error`] carrying the API's `code` and `details`. [`webhook::Webhook`]
//! verifies meterd's Standard Webhooks notifications.
//!
//! ```no_run
//! # async fn run() -> Result<(), meterd_client::Error> {
//! use meterd_client::{Client, Config, Event};
//! let meterd = Client::new(Config::new("http://127.0.0.1:8480"))?;
//! let ok = meterd.check("u_42", "interviews", None).await?;
//! if ok.allowed {
//!     meterd.track(Event::new("u_42", "interviews")).await?;
//! }
//! meterd.close().await?;
//! # Ok(()) }
//! ```

mod client;
mod error;
mod types;
pub mod webhook;

pub use client::{Client, Config, OnFull, Retry, Stats};
pub use error::Error;
pub use types::*;

/// The README's examples compile (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
