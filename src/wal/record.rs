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

use crate::keyhash::KeyHash;
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use std::collections::HashMap;

/// The payload format written by this build.
pub const FORMAT_VERSION: u16 = 2;
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
    #[error("WAL record has format version {0}; this build reads versions 1 and {FORMAT_VERSION}")]
    Version(u16),
}

/// One accepted batch of usage (events, or one allowed consume), as decoded.
/// Customer and meter names are held once per batch and referred to by index.
///
/// It is also the archived layout of format version 1 (what builds before
/// version 2 wrote, read back by [`decode`]). DO NOT REORDER FIELDS (see the
/// module doc).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WalBatch {
    /// The format version the record was written in.
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

/// Format version 2: every string of the batch in one text block and every
/// event a plain fixed-size row, so that encoding a batch allocates nothing per
/// event (version 1 allocated a `String` per customer and serialized a vector
/// per event). DO NOT REORDER FIELDS (see the module doc).
///
/// Its archived root has version 1's size and keeps `version` first, so
/// [`decode`] can read the version of either before choosing the layout.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct WalBatchV2 {
    version: u16,
    accepted_ms: i64,
    /// Customer and meter names, property keys and values, back to back.
    text: String,
    /// Byte ranges of `text`; events refer to strings by index here.
    strings: Vec<Span>,
    events: Vec<EventV2>,
}

/// A byte range of [`WalBatchV2::text`]. Plain data: rkyv copies a vector of
/// them with one `memcpy`.
#[derive(Debug, Clone, Copy, rkyv::Archive, rkyv::Serialize)]
#[repr(C)]
struct Span {
    start: u32,
    len: u32,
}

/// One event of a version 2 record. `repr(C)` without padding: rkyv copies
/// the vector whole.
#[derive(Debug, Clone, Copy, rkyv::Archive, rkyv::Serialize)]
#[repr(C)]
struct EventV2 {
    id_hash: u128,
    raw: i64,
    ts: i64,
    /// Index into `strings`.
    customer: u32,
    /// Index into `strings`.
    meter: u32,
    /// Index into `strings` of the first property key; key and value alternate.
    props: u32,
    /// How many properties (key-value pairs), sorted by key.
    props_len: u32,
}

/// Where an archived root sits in a payload: its last bytes (rkyv's layout).
const ROOT_LEN: usize = std::mem::size_of::<ArchivedWalBatch>();
const _: () = assert!(std::mem::size_of::<ArchivedWalBatchV2>() == ROOT_LEN);
const _: () = assert!(std::mem::offset_of!(ArchivedWalBatch, version) == 0);
const _: () = assert!(std::mem::offset_of!(ArchivedWalBatchV2, version) == 0);

/// An encoded batch, ready for the writer: its payload, and its event ids for
/// the id files.
pub struct Record {
    /// The rkyv payload (no copy into a `Vec`).
    pub payload: AlignedVec,
    pub ids: Vec<u128>,
    pub accepted_ms: i64,
}

/// Builds a version 2 record straight from borrowed names: each customer and
/// meter name is stored once per batch, and nothing is allocated per event.
pub struct RecordBuilder {
    accepted_ms: i64,
    text: String,
    strings: Vec<Span>,
    events: Vec<EventV2>,
    ids: Vec<u128>,
    customers: Names<u32>,
    meters: Names<u16>,
}

/// The names a batch has stored so far: interned id → index in `strings`.
/// The first few are kept in place, so the record of a consume or of a small
/// batch allocates no map; a batch naming more spills into one.
struct Names<K> {
    few: [(K, u32); FEW_NAMES],
    len: usize,
    /// Interned ids are small integers, not outside strings: a fast hasher is safe.
    more: HashMap<K, u32, KeyHash>,
    /// The map's capacity when it is first needed (the batch's size).
    hint: usize,
}

/// Names kept in place before a map is built.
const FEW_NAMES: usize = 4;

impl<K: Copy + Default + Eq + std::hash::Hash> Names<K> {
    fn new(hint: usize) -> Names<K> {
        Names { few: [(K::default(), 0); FEW_NAMES], len: 0, more: HashMap::with_hasher(KeyHash), hint }
    }

    fn get(&self, key: K) -> Option<u32> {
        match self.few[..self.len].iter().find(|(k, _)| *k == key) {
            Some(&(_, i)) => Some(i),
            None if self.more.is_empty() => None,
            None => self.more.get(&key).copied(),
        }
    }

    fn insert(&mut self, key: K, i: u32) {
        if self.len < FEW_NAMES {
            self.few[self.len] = (key, i);
            self.len += 1;
        } else {
            if self.more.is_empty() {
                self.more.reserve(self.hint);
            }
            self.more.insert(key, i);
        }
    }
}

impl RecordBuilder {
    /// A builder holding a decoded batch's events (tests; the ingest path
    /// pushes its events directly).
    #[cfg(test)]
    pub fn of(batch: &WalBatch) -> RecordBuilder {
        let mut b = RecordBuilder::new(batch.accepted_ms, batch.events.len());
        for e in &batch.events {
            b.push(e.id_hash, e.customer, batch.customer(e), e.meter, batch.meter(e), e.raw, e.ts, &e.properties);
        }
        b
    }

    pub fn new(accepted_ms: i64, capacity: usize) -> RecordBuilder {
        RecordBuilder {
            accepted_ms,
            text: String::with_capacity(capacity * 16),
            strings: Vec::with_capacity(capacity + 2),
            events: Vec::with_capacity(capacity),
            ids: Vec::with_capacity(capacity),
            customers: Names::new(capacity.min(4096)),
            meters: Names::new(0),
        }
    }

    /// Adds an event; `customer_key`/`meter_key` identify the names (interned
    /// ids): a name already in the batch is not stored again. `properties`
    /// sorted by key.
    #[allow(clippy::too_many_arguments)]
    pub fn push<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        id_hash: u128,
        customer_key: u32,
        customer: &str,
        meter_key: u16,
        meter: &str,
        raw: i64,
        ts: i64,
        properties: &[(K, V)],
    ) {
        let customer = match self.customers.get(customer_key) {
            Some(i) => i,
            None => {
                let i = self.string(customer);
                self.customers.insert(customer_key, i);
                i
            }
        };
        let meter = match self.meters.get(meter_key) {
            Some(i) => i,
            None => {
                let i = self.string(meter);
                self.meters.insert(meter_key, i);
                i
            }
        };
        let props = index(self.strings.len());
        for (k, v) in properties {
            self.string(k.as_ref());
            self.string(v.as_ref());
        }
        let props_len = index(properties.len());
        self.events.push(EventV2 { id_hash, raw, ts, customer, meter, props, props_len });
        self.ids.push(id_hash);
    }

    /// Appends a string to the text block; its index in `strings`.
    fn string(&mut self, s: &str) -> u32 {
        let span = Span { start: index(self.text.len()), len: index(s.len()) };
        self.text.push_str(s);
        self.strings.push(span);
        index(self.strings.len() - 1)
    }

    /// Encodes the batch.
    pub fn finish(self) -> Result<Record, RecordError> {
        if self.text.len() >= u32::MAX as usize || self.strings.len() >= u32::MAX as usize {
            return Err(RecordError::Encode("a batch's strings exceed 4 GiB".into()));
        }
        let capacity = 64 + self.text.len() + 8 * self.strings.len() + std::mem::size_of::<EventV2>() * self.events.len();
        let batch = WalBatchV2 {
            version: FORMAT_VERSION,
            accepted_ms: self.accepted_ms,
            text: self.text,
            strings: self.strings,
            events: self.events,
        };
        let payload = rkyv::api::high::to_bytes_in::<_, RkyvError>(&batch, AlignedVec::with_capacity(capacity))
            .map_err(|e| RecordError::Encode(e.to_string()))?;
        Ok(Record { payload, ids: self.ids, accepted_ms: self.accepted_ms })
    }
}

/// A length or offset as stored (`finish` refuses batches where it would not fit).
fn index(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Builds a decoded [`WalBatch`] by hand, for tests that need one without a
/// round trip through the format.
#[cfg(test)]
pub struct BatchBuilder {
    batch: WalBatch,
    customers: HashMap<u32, u32, KeyHash>,
    meters: HashMap<u16, u16, KeyHash>,
}

#[cfg(test)]
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

    /// Adds an event; `customer_key`/`meter_key` identify the names.
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

/// Encodes a batch's payload (in the current format).
#[cfg(test)]
pub fn encode(batch: &WalBatch) -> Result<AlignedVec, RecordError> {
    RecordBuilder::of(batch).finish().map(|r| r.payload)
}

/// Decodes a payload of either format (validated by rkyv's bytecheck, and
/// every index and range checked, so garbage is an error).
pub fn decode(payload: &[u8]) -> Result<WalBatch, RecordError> {
    let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let at = payload.len().checked_sub(ROOT_LEN).ok_or_else(|| RecordError::Decode(format!("{} bytes is too short", payload.len())))?;
    let version = match aligned.get(at..at + 2) {
        Some(&[a, b]) => u16::from_le_bytes([a, b]),
        _ => return Err(RecordError::Decode("too short".into())),
    };
    match version {
        1 => {
            let archived = rkyv::access::<ArchivedWalBatch, RkyvError>(&aligned).map_err(|e| RecordError::Decode(e.to_string()))?;
            rkyv::deserialize::<WalBatch, RkyvError>(archived).map_err(|e| RecordError::Decode(e.to_string()))
        }
        FORMAT_VERSION => {
            let archived = rkyv::access::<ArchivedWalBatchV2, RkyvError>(&aligned).map_err(|e| RecordError::Decode(e.to_string()))?;
            decode_v2(archived)
        }
        other => Err(RecordError::Version(other)),
    }
}

/// A version 2 archive as a [`WalBatch`].
fn decode_v2(archived: &ArchivedWalBatchV2) -> Result<WalBatch, RecordError> {
    let text = archived.text.as_str();
    let strings = &archived.strings;
    let string = |i: u32| -> Result<&str, RecordError> {
        let span = strings.get(i as usize).ok_or_else(|| RecordError::Decode(format!("string {i} out of range")))?;
        let start = span.start.to_native() as usize;
        text.get(start..start.saturating_add(span.len.to_native() as usize))
            .ok_or_else(|| RecordError::Decode(format!("string {i} is not a range of the text")))
    };
    // String index → position in `customers`/`meters` (first seen first).
    let mut position = vec![u32::MAX; strings.len()];
    let mut batch = WalBatch {
        version: FORMAT_VERSION,
        accepted_ms: archived.accepted_ms.to_native(),
        customers: Vec::new(),
        meters: Vec::new(),
        events: Vec::with_capacity(archived.events.len()),
    };
    for e in archived.events.iter() {
        let mut positions = [0u32; 2];
        for ((i, names), out) in
            [(e.customer.to_native(), &mut batch.customers), (e.meter.to_native(), &mut batch.meters)].into_iter().zip(&mut positions)
        {
            let slot = position.get_mut(i as usize).ok_or_else(|| RecordError::Decode(format!("string {i} out of range")))?;
            if *slot == u32::MAX {
                names.push(string(i)?.to_string());
                *slot = index(names.len() - 1);
            }
            *out = *slot;
        }
        let [customer, meter] = positions;
        let meter = u16::try_from(meter).map_err(|_| RecordError::Decode("more than 65535 meters".into()))?;
        let first = e.props.to_native();
        let properties = (0..e.props_len.to_native())
            .map(|p| {
                let k = first.saturating_add(p.saturating_mul(2));
                Ok((string(k)?.to_string(), string(k.saturating_add(1))?.to_string()))
            })
            .collect::<Result<Vec<_>, RecordError>>()?;
        batch.events.push(WalEvent {
            id_hash: e.id_hash.to_native(),
            customer,
            meter,
            raw: e.raw.to_native(),
            ts: e.ts.to_native(),
            properties,
        });
    }
    Ok(batch)
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

    /// Past the few names kept in place (`Names`), the rest spill into a map:
    /// each name is still stored once, and every event points at its own.
    #[test]
    fn many_names_are_stored_once_each() {
        let mut b = BatchBuilder::new(1_700_000_000_000, 0);
        for i in 0..400_u32 {
            let (c, m) = ((i * 7) % 40, (i % 6) as u16);
            b.push(i.into(), c, || format!("cust-{c}"), m, &format!("meter-{m}"), 1, 1_700_000_000_000, vec![]);
        }
        let batch = b.finish();
        let bytes = encode(&batch).map(|b| b.to_vec()).unwrap_or_default();
        let decoded = decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((decoded.customers.len(), decoded.meters.len()), (40, 6), "each name once");
        for (i, e) in decoded.events.iter().enumerate() {
            let i = i as u32;
            assert_eq!(decoded.customer(e), format!("cust-{}", (i * 7) % 40));
            assert_eq!(decoded.meter(e), format!("meter-{}", i % 6));
        }
        assert_eq!(decoded, batch);
    }

    /// What builds before format version 2 wrote: `WalBatch` archived as is.
    fn encode_v1(batch: &WalBatch) -> Vec<u8> {
        rkyv::to_bytes::<RkyvError>(&WalBatch { version: 1, ..batch.clone() }).map(|b| b.to_vec()).unwrap_or_default()
    }

    #[test]
    fn version_1_records_still_decode() {
        let batch = sample(9);
        let v1 = encode_v1(&batch);
        assert_eq!(decode(&v1).ok(), Some(WalBatch { version: 1, ..batch.clone() }));
        let v2 = encode(&batch).map(|b| b.to_vec()).unwrap_or_default();
        assert_eq!(decode(&v2).ok(), Some(batch), "and the current format decodes to the same batch");
    }

    #[test]
    fn events_are_copied_whole() {
        // The point of version 2: rkyv writes the event rows with one copy.
        assert!(<EventV2 as rkyv::Archive>::COPY_OPTIMIZATION.is_enabled());
        assert!(<Span as rkyv::Archive>::COPY_OPTIMIZATION.is_enabled());
    }

    #[test]
    fn garbage_and_other_versions_are_errors() {
        assert!(decode(b"definitely not rkyv").is_err());
        assert!(decode(b"").is_err());
        let v1 = encode_v1(&sample(1));
        assert!(decode(&v1[..v1.len() - 3]).is_err(), "a cut record");
        let future = |version| WalBatchV2 { version, accepted_ms: 0, text: String::new(), strings: vec![], events: vec![] };
        let bytes = rkyv::to_bytes::<RkyvError>(&future(99)).map(|b| b.to_vec()).unwrap_or_default();
        assert!(matches!(decode(&bytes), Err(RecordError::Version(99))));
        let old = rkyv::to_bytes::<RkyvError>(&WalBatch { version: 99, ..sample(1) }).map(|b| b.to_vec()).unwrap_or_default();
        assert!(matches!(decode(&old), Err(RecordError::Version(99))));
        // Checksummed but wrong inside: indexes and ranges out of bounds are errors.
        let event = |customer, meter, props, props_len| EventV2 { id_hash: 1, raw: 1, ts: 1, customer, meter, props, props_len };
        let bad = [
            (vec![Span { start: 0, len: 1 }], event(0, 5, 0, 0)),
            (vec![Span { start: 0, len: 1 }, Span { start: 0, len: 9 }], event(0, 1, 0, 0)),
            (vec![Span { start: 0, len: 1 }, Span { start: 1, len: 1 }], event(0, 1, 2, 1)),
            (vec![Span { start: 0, len: 1 }, Span { start: 1, len: 1 }], event(0, 1, u32::MAX, u32::MAX)),
        ];
        for (strings, e) in bad {
            let b = WalBatchV2 { version: FORMAT_VERSION, accepted_ms: 0, text: "ab".into(), strings, events: vec![e] };
            let bytes = rkyv::to_bytes::<RkyvError>(&b).map(|b| b.to_vec()).unwrap_or_default();
            assert!(matches!(decode(&bytes), Err(RecordError::Decode(_))), "{e:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_batch_round_trips(events in proptest::collection::vec(
            (proptest::prelude::any::<u128>(), 0u32..20, 0u16..4, proptest::prelude::any::<i64>(), proptest::prelude::any::<i64>(),
             proptest::collection::btree_map("[a-z]{0,6}", "\\PC{0,8}", 0..4)),
            0..60,
        ), accepted_ms in proptest::prelude::any::<i64>()) {
            let mut b = BatchBuilder::new(accepted_ms, events.len());
            for (id, c, m, raw, ts, props) in &events {
                let props = props.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                b.push(*id, *c, || format!("customer-{c}-é"), *m, &format!("meter{m}"), *raw, *ts, props);
            }
            let batch = b.finish();
            let bytes = encode(&batch).map(|b| b.to_vec()).unwrap_or_default();
            proptest::prop_assert_eq!(decode(&bytes).ok(), Some(batch.clone()));
            proptest::prop_assert_eq!(decode(&encode_v1(&batch)).ok(), Some(WalBatch { version: 1, ..batch }));
        }
    }
}
