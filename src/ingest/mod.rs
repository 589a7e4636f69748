//! Ingest: event bodies in, counters updated.

pub mod dedupe;
pub mod parse;
pub mod pipeline;
pub mod shared_dedupe;

pub use pipeline::{BodyKind, IngestError, IngestOutcome};
