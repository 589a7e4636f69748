//! WAL records: the rkyv payload of one accepted batch, and the frame around it.
//!
//! Frame layout, little-endian:
//!
//! ```text
//! [len: u32][crc32c: u32][seq: u64][payload: len bytes]
//! ```
//!
//! The CRC covers `seq` and the payload. The payload is an rkyv archive of
//! [`WalBatch`]. **Do not reorder, remove or retype fields of the archived
//! structs**: old segments must stay readable. Add a field only by bumping
//! [`FORMAT_VERSION`] and teaching [`decode`] both layouts.

use crate::counters::hash::KeyHash;
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use std::collections::HashMap;

/// The payload format written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 16;
/// A record larger than this is corruption, not data (batches are ≤ 8 MiB of JSON).
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot encode a WAL record: {0}")]
    Encode(String),
    #[error("WAL record payload does not decode: {0}")]
    Decode(String),
    #[error("WAL record has format version {0}; this build reads version {FORMAT_VERSION}")]
    Version(u16),
}

/// One accepted batch of usage (events, or one allowed consume). Customer and
/// meter names are stored once per batch and referred to by index: the synced
/// bytes per event are what bounds `fsync` ingest.
/// DO NOT REORDER FIELDS (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalBatch {
    pub version: u16,
    /// When meterd accepted the batch, Unix milliseconds (dedupe ages from it).
    pub accepted_ms: i64,
    pub customers: Vec<String>,
    /// Meter names, not indexes into the config: those change when it does.
    pub meters: Vec<String>,
    pub events: Vec<WalEvent>,
}

/// One event as accepted. DO NOT REORDER FIELDS (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalEvent {
    /// The id's 128-bit hash (the id itself is not needed again).
    pub id_hash: u128,
    /// Index into the batch's `customers`.
    pub customer: u32,
    /// Index into the batch's `meters`.
    pub meter: u16,
    /// Raw units at the meter's precision when accepted.
    pub raw: i64,
    pub ts: i64,
    /// Sorted by key.
    pub properties: Vec<(String, String)>,
}

impl WalBatch {
    /// The customer name of an event (empty if the index is out of range, which
    /// a decoded, checksummed record never has).
    pub fn customer(&self, e: &WalEvent) -> &str {
        self.customers.get(e.customer as usize).map(String::as_str).unwrap_or("")
    }

    /// The meter name of an event.
    pub fn meter(&self, e: &WalEvent) -> &str {
        self.meters.get(usize::from(e.meter)).map(String::as_str).unwrap_or("")
    }
}

/// Builds a [`WalBatch`], storing each customer and meter name once.
pub struct BatchBuilder {
    batch: WalBatch,
    /// Interned ids are small integers, not outside strings: a fast hasher is safe.
    customers: HashMap<u32, u32, KeyHash>,
    meters: HashMap<u16, u16, KeyHash>,
}

impl BatchBuilder {
    pub fn new(accepted_ms: i64, capacity: usize) -> BatchBuilder {
        BatchBuilder {
            batch: WalBatch {
                version: FORMAT_VERSION,
                accepted_ms,
                customers: Vec::new(),
                meters: Vec::new(),
                events: Vec::with_capacity(capacity),
            },
            customers: HashMap::with_capacity_and_hasher(capacity.min(4096), KeyHash),
            meters: HashMap::with_hasher(KeyHash),
        }
    }

    /// Adds an event; `customer_key`/`meter_key` identify the names (interned ids).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        id_hash: u128,
        customer_key: u32,
        customer: impl FnOnce() -> String,
        meter_key: u16,
        meter: &str,
        raw: i64,
        ts: i64,
        properties: Vec<(String, String)>,
    ) {
        let b = &mut self.batch;
        let c = *self.customers.entry(customer_key).or_insert_with(|| {
            b.customers.push(customer());
            u32::try_from(b.customers.len() - 1).unwrap_or(u32::MAX)
        });
        let m = *self.meters.entry(meter_key).or_insert_with(|| {
            b.meters.push(meter.to_string());
            u16::try_from(b.meters.len() - 1).unwrap_or(u16::MAX)
        });
        b.events.push(WalEvent { id_hash, customer: c, meter: m, raw, ts, properties });
    }

    pub fn finish(self) -> WalBatch {
        self.batch
    }
}

/// Encodes a batch's payload.
pub fn encode(batch: &WalBatch) -> Result<AlignedVec, RecordError> {
    rkyv::to_bytes::<RkyvError>(batch).map_err(|e| RecordError::Encode(e.to_string()))
}

/// Decodes a payload (validated by rkyv's bytecheck, so garbage is an error).
pub fn decode(payload: &[u8]) -> Result<WalBatch, RecordError> {
    let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let archived = rkyv::access::<ArchivedWalBatch, RkyvError>(&aligned).map_err(|e| RecordError::Decode(e.to_string()))?;
    let version = archived.version.to_native();
    if version != FORMAT_VERSION {
        return Err(RecordError::Version(version));
    }
    rkyv::deserialize::<WalBatch, RkyvError>(archived).map_err(|e| RecordError::Decode(e.to_string()))
}

/// The CRC of a record: over the sequence number and the payload.
pub fn checksum(seq: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), payload)
}

/// Appends a framed record to `out`.
pub fn frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample(n: usize) -> WalBatch {
        let mut b = BatchBuilder::new(1_700_000_000_000, n);
        for i in 0..n {
            let c = (i % 3) as u32;
            b.push(
                u128::MAX - i as u128,
                c,
                || format!("cust-{c}"),
                0,
                "interview_minutes",
                1250 + i as i64,
                1_700_000_000_000 + i as i64,
                vec![("region".into(), "eu".into())],
            );
        }
        b.finish()
    }

    #[test]
    fn round_trips_with_names_stored_once() {
        let batch = sample(7);
        assert_eq!(batch.customers, vec!["cust-0", "cust-1", "cust-2"]);
        assert_eq!(batch.meters, vec!["interview_minutes"]);
        assert_eq!(batch.customer(&batch.events[4]), "cust-1");
        let bytes = encode(&batch).map(|b| b.to_vec()).unwrap_or_default();
        assert_eq!(decode(&bytes).ok(), Some(batch));
    }

    #[test]
    fn garbage_and_other_versions_are_errors() {
        assert!(decode(b"definitely not rkyv").is_err());
        let old = WalBatch { version: 99, ..sample(1) };
        let bytes = encode(&old).map(|b| b.to_vec()).unwrap_or_default();
        assert!(matches!(decode(&bytes), Err(RecordError::Version(99))));
    }
}
