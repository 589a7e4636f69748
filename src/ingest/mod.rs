//! Ingest: event bodies in, counters updated.

/// Re-exported: event-id dedupe is state, kept at `crate::dedupe`.
pub use crate::dedupe;
pub mod parse;
pub mod pipeline;
pub mod shared_dedupe;

pub use pipeline::{BodyKind, IngestError, IngestOutcome, IngestPorts};
