//! The hold book (issue 19): what reservations hold, per `(customer, meter)`,
//! and every reservation by id. Holds count against limits and credit balances
//! (the limits service adds [`HoldBook::held`] beside `used`) but are never
//! usage: nothing here touches the counters.
//!
//! Every change is written to the hold journal (see [`journal`]) before it is
//! applied, so holds survive SIGKILL and restarts. The book is bounded: at most
//! `cap` reservations (held ones, and finished ones kept for idempotent
//! answers until [`FINISHED_RETENTION_MS`] passed); beyond, new reservations
//! are refused with [`HoldError::Full`].
//!
//! With Redis the reservations and held totals live there ([`shared`]); the
//! book then keeps only the held totals Redis last answered (per `(customer,
//! meter)`, newest version wins), which the decisions here read.
//!
//! Callers serialize changes of one `(customer, meter)` (the limits' consume
//! lock): the book itself only keeps each map consistent.

pub mod journal;
pub mod shared;

use crate::counters::CustomerId;
use crate::keyhash::KeyHash;
use crate::model::CheckAnswer;
use crate::model::MeterId;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How long a finished reservation is remembered (the same id again answers
/// as before): one day, like the default dedupe window.
pub const FINISHED_RETENTION_MS: i64 = 24 * 3_600_000;
/// The default bound on reservations in memory.
pub const DEFAULT_CAP: usize = 1_000_000;

/// Why the book refused a change.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("the reservation table is full ({0} reservations)")]
    Full(usize),
    #[error("could not write the hold journal: {0}")]
    Journal(#[from] std::io::Error),
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Held,
    Settled,
    Released,
    Expired,
    Denied,
}

impl Status {
    /// The label (as serialized; the metrics' `status` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Held => "held",
            Status::Settled => "settled",
            Status::Released => "released",
            Status::Expired => "expired",
            Status::Denied => "denied",
        }
    }

    /// The status named `text` (as serialized), if any.
    pub fn parse(text: &str) -> Option<Status> {
        [Status::Held, Status::Settled, Status::Released, Status::Expired, Status::Denied].into_iter().find(|s| s.as_str() == text)
    }
}

/// One reservation, as journaled (names, not ids: ids change across restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: String,
    pub customer: String,
    pub meter: String,
    /// Raw units held (or asked for, when denied).
    pub quantity: i64,
    /// Unix ms; `None` for an allocation (held until settled or released).
    pub expires_at: Option<i64>,
    pub status: Status,
    /// Raw units recorded as usage by the settle.
    pub settled_quantity: Option<i64>,
    /// When it was taken, Unix ms.
    pub created_ms: i64,
    /// When it left `held`, Unix ms (0 while held).
    pub finished_ms: i64,
}

/// A reservation in the book, with the interned ids it holds under.
#[derive(Debug, Clone)]
struct Entry {
    r: Reservation,
    customer: CustomerId,
    meter: MeterId,
    /// The first answer (not journaled: after a restart, none).
    answer: Option<Arc<CheckAnswer>>,
}

/// The held totals and the reservations.
pub struct HoldBook {
    /// Read by every check of every limit: hashed with `KeyHash`, not SipHash.
    held: DashMap<(CustomerId, MeterId), i64, KeyHash>,
    reservations: DashMap<String, Entry>,
    /// The ids of each customer's reservations in `reservations` (listing).
    by_customer: DashMap<String, HashSet<String>>,
    cap: usize,
    journal: Mutex<Option<journal::Journal>>,
    /// With Redis: the held totals over all instances, as last read.
    shared: Option<DashMap<(CustomerId, MeterId), shared::Held, KeyHash>>,
}

impl HoldBook {
    /// An empty book that journals nothing (tests, embedded use without a data dir).
    pub fn in_memory(cap: usize) -> HoldBook {
        HoldBook {
            held: DashMap::with_hasher(KeyHash),
            reservations: DashMap::new(),
            by_customer: DashMap::new(),
            cap,
            journal: Mutex::new(None),
            shared: None,
        }
    }

    /// Opens the journal in `dir` and restores what it holds: reservations still
    /// held come back with their holds (even when their expiry passed: the
    /// expiry sweep releases them), finished ones within the retention for
    /// their answers. `resolve` interns a customer and finds a meter; a
    /// reservation whose meter is gone is dropped.
    pub fn open(
        dir: &Path,
        cap: usize,
        now: i64,
        mut resolve: impl FnMut(&str, &str) -> Option<(CustomerId, MeterId)>,
    ) -> Result<HoldBook, HoldError> {
        let (journal, restored) = journal::Journal::open(dir, |r| keep(r, now))?;
        let book = HoldBook { journal: Mutex::new(Some(journal)), ..HoldBook::in_memory(cap) };
        for r in restored {
            match resolve(&r.customer, &r.meter) {
                Some((customer, meter)) => book.apply(Entry { r, customer, meter, answer: None }),
                None => tracing::warn!(id = %r.id, meter = %r.meter, "a journaled reservation's meter or customer is gone; dropped"),
            }
        }
        crate::telemetry::holds_gauge(book.reservations.len());
        Ok(book)
    }

    /// The book of an instance sharing Redis: holds are read from the totals
    /// Redis answers ([`HoldBook::set_shared`]), not from this book's own.
    /// Reservations journaled here by a run without Redis are not carried over
    /// (logged).
    pub fn into_shared(mut self) -> HoldBook {
        let local = self.reservations.iter().filter(|e| e.r.status == Status::Held).count();
        if local > 0 {
            tracing::warn!(local, "holds journaled by a run without redis do not count with redis; release them before switching");
        }
        self.shared = Some(DashMap::with_hasher(KeyHash));
        self
    }

    /// Whether holds live in Redis.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Raw units held for `(customer, meter)` (with Redis: over all instances,
    /// as last read).
    pub fn held(&self, customer: CustomerId, meter: MeterId) -> i64 {
        if let Some(shared) = &self.shared {
            return shared.get(&(customer, meter)).map_or(0, |h| h.total);
        }
        self.held.get(&(customer, meter)).map_or(0, |h| *h)
    }

    /// Records a held total Redis answered, unless a newer one is known.
    pub fn set_shared(&self, customer: CustomerId, meter: MeterId, held: shared::Held) {
        let Some(shared) = &self.shared else { return };
        if held.total == 0 {
            // Nothing held: no entry for pairs that never had one (memory).
            if let Some(mut cur) = shared.get_mut(&(customer, meter)) {
                if held.version >= cur.version {
                    *cur = held;
                }
            }
            return;
        }
        let mut cur = shared.entry((customer, meter)).or_default();
        if held.version >= cur.version {
            *cur = held;
        }
    }

    /// The reservation `id`.
    pub fn get(&self, id: &str) -> Option<Reservation> {
        self.reservations.get(id).map(|e| e.r.clone())
    }

    /// `customer`'s reservations that `keep` accepts, newest first (by created
    /// time, then id), at most `limit` (from the customer's own index: the
    /// rest of the book is not read).
    pub fn list(&self, customer: &str, keep: impl Fn(&Reservation) -> bool, limit: usize) -> Vec<Reservation> {
        let ids: Vec<String> = self.by_customer.get(customer).map(|set| set.iter().cloned().collect()).unwrap_or_default();
        let mut out: Vec<Reservation> =
            ids.iter().filter_map(|id| self.reservations.get(id).map(|e| e.r.clone())).filter(|r| keep(r)).collect();
        out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| b.id.cmp(&a.id)));
        out.truncate(limit);
        out
    }

    /// How many reservations the book remembers.
    pub fn len(&self) -> usize {
        self.reservations.len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// Records a new reservation (held or denied): journaled first (a denied one
    /// is not: it holds nothing), then applied. Refused when the book is full.
    pub fn insert(&self, r: Reservation, customer: CustomerId, meter: MeterId, answer: Arc<CheckAnswer>) -> Result<(), HoldError> {
        if self.reservations.len() >= self.cap {
            crate::telemetry::holds_refused();
            return Err(HoldError::Full(self.cap));
        }
        if r.status == Status::Held {
            self.write(&r)?;
        }
        self.apply(Entry { r, customer, meter, answer: Some(answer) });
        crate::telemetry::holds_gauge(self.reservations.len());
        Ok(())
    }

    /// Finishes a held reservation (`status` settled, released or expired):
    /// journaled, then its hold is released. `None` if it is not held.
    pub fn finish(&self, id: &str, status: Status, settled: Option<i64>, now: i64) -> Result<Option<Reservation>, HoldError> {
        let Some(mut e) = self.reservations.get(id).map(|e| e.clone()) else { return Ok(None) };
        if e.r.status != Status::Held {
            return Ok(None);
        }
        e.r.status = status;
        e.r.settled_quantity = settled;
        e.r.finished_ms = now;
        self.write(&e.r)?;
        let r = e.r.clone();
        self.apply(e);
        Ok(Some(r))
    }

    /// Held reservations whose expiry is at or before `now`: `(id, customer, meter)`.
    pub fn due(&self, now: i64) -> Vec<(String, CustomerId, MeterId)> {
        self.reservations
            .iter()
            .filter(|e| e.r.status == Status::Held && e.r.expires_at.is_some_and(|at| at <= now))
            .map(|e| (e.r.id.clone(), e.customer, e.meter))
            .collect()
    }

    /// The reservation `id` with its first answer (if still remembered).
    pub fn get_answered(&self, id: &str) -> Option<(Reservation, Option<Arc<CheckAnswer>>)> {
        self.reservations.get(id).map(|e| (e.r.clone(), e.answer.clone()))
    }

    /// Replaces the remembered first answer of `id` (a hold withdrawn at once).
    pub fn set_answer(&self, id: &str, answer: Arc<CheckAnswer>) {
        if let Some(mut e) = self.reservations.get_mut(id) {
            e.answer = Some(answer);
        }
    }

    /// The interned ids a reservation holds under.
    pub fn ids_of(&self, id: &str) -> Option<(CustomerId, MeterId)> {
        self.reservations.get(id).map(|e| (e.customer, e.meter))
    }

    /// Forgets finished reservations past the retention, and compacts the
    /// journal when it holds many more lines than the book.
    pub fn sweep(&self, now: i64) -> Result<(), HoldError> {
        self.reservations.retain(|id, e| {
            let kept = keep(&e.r, now);
            if !kept {
                self.unlist(&e.r.customer, id);
            }
            kept
        });
        crate::telemetry::holds_gauge(self.reservations.len());
        let mut journal = self.journal.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(j) = journal.as_mut() {
            if j.lines() > 2 * self.reservations.len() + 10_000 {
                let live: Vec<Reservation> = self.reservations.iter().map(|e| e.r.clone()).collect();
                j.compact(&live)?;
            }
        }
        Ok(())
    }

    fn write(&self, r: &Reservation) -> Result<(), HoldError> {
        let mut journal = self.journal.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(j) = journal.as_mut() {
            j.append(r)?;
        }
        Ok(())
    }

    /// Puts `e` in the book, moving the held total by the change of its hold.
    fn apply(&self, e: Entry) {
        let holds = |r: &Reservation| if r.status == Status::Held { r.quantity } else { 0 };
        let before = self.reservations.get(&e.r.id).map_or(0, |old| holds(&old.r));
        let delta = holds(&e.r) - before;
        if delta != 0 {
            let mut h = self.held.entry((e.customer, e.meter)).or_insert(0);
            *h += delta;
            let empty = *h == 0;
            drop(h);
            if empty {
                self.held.remove_if(&(e.customer, e.meter), |_, v| *v == 0);
            }
        }
        self.by_customer.entry(e.r.customer.clone()).or_default().insert(e.r.id.clone());
        self.reservations.insert(e.r.id.clone(), e);
    }

    /// Drops `id` from its customer's index (and the customer, when it was the last).
    fn unlist(&self, customer: &str, id: &str) {
        if let Some(mut set) = self.by_customer.get_mut(customer) {
            set.remove(id);
        }
        self.by_customer.remove_if(customer, |_, set| set.is_empty());
    }
}

/// Whether a reservation is still remembered at `now`.
fn keep(r: &Reservation, now: i64) -> bool {
    r.status == Status::Held || now.saturating_sub(r.finished_ms.max(r.created_ms)) < FINISHED_RETENTION_MS
}

#[cfg(test)]
mod tests;
