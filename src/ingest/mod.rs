//! Ingest: event bodies in, counters updated.

pub mod dedupe;
pub mod parse;
pub mod pipeline;

pub use pipeline::{BodyKind, IngestError, IngestOutcome};
