//! Customer interning: the outside world names customers with strings up to 256
//! bytes; counters key them by a dense `u32` so keys stay 16 bytes and hash fast.

use super::flat::{FlatKey, FlatMap};
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};

/// A customer's interned id.
pub type CustomerId = u32;

/// Why a customer could not be interned.
#[derive(Debug, thiserror::Error)]
pub enum InternError {
    #[error("more than 4 billion distinct customers")]
    Exhausted,
    /// The table holds [`Interner::limit`] customers (issue 15: every
    /// structure that grows with traffic is bounded); callers answer 503.
    #[error("the customer table is full ({0} customers)")]
    Full(usize),
}

/// Customers one instance interns at most by default: about 1.5 GB of names
/// at ~150 bytes each (see docs/architecture.md, bounds). Ids are held by the
/// entitlement cache, credits and grants, so they are never recycled; a new
/// customer beyond the cap is refused (503), counted in
/// `meterd_customers_refused_total`.
pub const DEFAULT_MAX_CUSTOMERS: usize = 10_000_000;

/// Names up to this many bytes are stored inside the map's key.
const INLINE: usize = 30;

/// A customer name as the forward map's key: short names inline, so a lookup
/// compares against bytes already in the probed cache line instead of chasing
/// a pointer to a string elsewhere in memory (a cache miss per event).
#[derive(Clone)]
enum Name {
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Heap(Arc<str>),
    /// An empty slot of the map (never compared: the map checks first).
    Vacant,
}

impl FlatKey for Name {
    fn vacant() -> Name {
        Name::Vacant
    }
    fn is_vacant(&self) -> bool {
        matches!(self, Name::Vacant)
    }
}

impl Name {
    fn new(name: &str) -> Name {
        if name.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            Name::Inline { len: name.len() as u8, bytes }
        } else {
            Name::Heap(Arc::from(name))
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // SAFETY: `Name::new` is the only constructor; it copied these `len`
            // bytes from a `str`, so they are whole UTF-8.
            Name::Inline { len, bytes } => unsafe { std::str::from_utf8_unchecked(&bytes[..usize::from(*len)]) },
            Name::Heap(s) => s,
            Name::Vacant => "",
        }
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Hashes and compares as the `str` it holds (what `Borrow` requires).
impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

/// Two-way map between customer strings and ids. Ids are never reused.
pub struct Interner {
    /// String → id. The strings come from outside, so the hasher is seeded at
    /// random per process (foldhash, as hashbrown does), which is several times
    /// cheaper than SipHash on the ingest path.
    forward: FlatMap<Name, CustomerId, foldhash::fast::RandomState>,
    /// Id → string, appended under the write lock when a customer is first seen
    /// (rare); read by the flusher and usage queries, never by checks.
    reverse: RwLock<Vec<Arc<str>>>,
    /// At most this many customers (see [`DEFAULT_MAX_CUSTOMERS`]).
    limit: usize,
}

impl Default for Interner {
    fn default() -> Interner {
        Interner::new()
    }
}

/// How many names ahead [`Interner::intern_batch`] prefetches.
const PREFETCH_AHEAD: usize = 8;

impl Interner {
    pub fn new() -> Interner {
        Interner::with_limit(DEFAULT_MAX_CUSTOMERS)
    }

    /// An interner that refuses new customers beyond `limit`.
    pub fn with_limit(limit: usize) -> Interner {
        Interner {
            forward: FlatMap::with_capacity_and_hasher(1024, foldhash::fast::RandomState::default()),
            reverse: RwLock::default(),
            limit,
        }
    }

    /// How many customers this interner holds at most.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The id of `name`, if it was ever seen.
    pub fn lookup(&self, name: &str) -> Option<CustomerId> {
        self.forward.get(name, |id| *id)
    }

    /// The id of `name`, assigning the next one on first sight.
    pub fn intern(&self, name: &str) -> Result<CustomerId, InternError> {
        self.intern_hashed(self.forward.hash(name), name)
    }

    fn intern_hashed(&self, hash: u64, name: &str) -> Result<CustomerId, InternError> {
        if let Some(id) = self.forward.get_hashed(hash, name, |id| *id) {
            return Ok(id);
        }
        let assign = || {
            // Shard write lock held: no one else can assign an id to this name meanwhile.
            let mut reverse = self.reverse.write().unwrap_or_else(|p| p.into_inner());
            if reverse.len() >= self.limit {
                crate::telemetry::customer_refused();
                return Err(InternError::Full(self.limit));
            }
            let id = CustomerId::try_from(reverse.len()).map_err(|_| InternError::Exhausted)?;
            reverse.push(Arc::from(name));
            Ok(id)
        };
        self.forward.get_or_try_insert(hash, Name::new(name), assign, |id| *id)
    }

    /// [`Interner::intern`] for a batch, with the map's cache misses overlapped:
    /// each name's slot is prefetched a few names before it is looked up.
    pub fn intern_batch<'a>(&self, names: impl ExactSizeIterator<Item = &'a str> + Clone) -> Result<Vec<CustomerId>, InternError> {
        if names.len() <= PREFETCH_AHEAD {
            // Too few to overlap anything: skip the hash vector's allocation.
            return names.map(|n| self.intern(n)).collect();
        }
        let hashes: Vec<u64> = names.clone().map(|n| self.forward.hash(n)).collect();
        for &h in hashes.iter().take(PREFETCH_AHEAD) {
            self.forward.prefetch(h);
        }
        let mut ids = Vec::with_capacity(hashes.len());
        for (k, name) in names.enumerate() {
            if let Some(&ahead) = hashes.get(k + PREFETCH_AHEAD) {
                self.forward.prefetch(ahead);
            }
            ids.push(self.intern_hashed(hashes[k], name)?);
        }
        Ok(ids)
    }

    /// The string of `id`.
    pub fn name(&self, id: CustomerId) -> Option<Arc<str>> {
        let reverse = self.reverse.read().unwrap_or_else(|p| p.into_inner());
        reverse.get(id as usize).cloned()
    }

    /// How many customers were interned.
    pub fn len(&self) -> usize {
        self.reverse.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_names_round_trip() {
        let interner = Interner::new();
        let long = "x".repeat(INLINE + 1);
        let exact = "é".repeat(INLINE / 2);
        for name in ["", "c1", exact.as_str(), long.as_str()] {
            let id = interner.intern(name).unwrap_or(u32::MAX);
            assert_eq!(interner.lookup(name), Some(id));
            assert_eq!(interner.intern(name).ok(), Some(id));
            assert_eq!(interner.name(id).as_deref(), Some(name));
        }
        assert_eq!(interner.len(), 4);
        assert_eq!(interner.lookup(&"x".repeat(INLINE)), None);
    }

    /// Batches long enough to take the prefetching path give the ids one-by-one
    /// interning gives, for names new and seen, short and long.
    #[test]
    fn a_batch_interns_like_its_names_one_by_one() {
        let names: Vec<String> =
            (0..300).map(|i| if i % 7 == 0 { format!("{}-{i}", "y".repeat(INLINE)) } else { format!("c{}", i % 120) }).collect();
        let (batched, single) = (Interner::new(), Interner::new());
        for chunk in names.chunks(100) {
            let ids = batched.intern_batch(chunk.iter().map(String::as_str)).unwrap_or_default();
            let want: Vec<CustomerId> = chunk.iter().map(|n| single.intern(n).unwrap_or(u32::MAX)).collect();
            assert_eq!(ids, want);
        }
        assert_eq!(batched.len(), single.len());
        assert_eq!(batched.len(), 120 + 43);
    }

    /// At the cap a new customer is refused and nothing is assigned; known
    /// customers keep resolving, in batches too.
    #[test]
    fn a_full_table_refuses_new_customers_only() {
        let interner = Interner::with_limit(3);
        let ids: Vec<_> = ["a", "b", "c"].iter().map(|n| interner.intern(n).ok()).collect();
        assert_eq!(ids, vec![Some(0), Some(1), Some(2)]);
        assert!(matches!(interner.intern("d"), Err(InternError::Full(3))));
        assert_eq!(interner.lookup("d"), None);
        assert_eq!(interner.len(), 3);
        assert_eq!(interner.intern("b").ok(), Some(1));
        let names: Vec<String> = (0..20).map(|i| ["a", "b", "c"][i % 3].to_string()).collect();
        assert_eq!(interner.intern_batch(names.iter().map(String::as_str)).map(|v| v.len()).ok(), Some(20));
        let mut with_new = names.clone();
        with_new.push("e".into());
        assert!(matches!(interner.intern_batch(with_new.iter().map(String::as_str)), Err(InternError::Full(3))));
        assert_eq!(interner.len(), 3);
    }

    #[test]
    fn interns_once_even_when_racing() {
        let interner = Arc::new(Interner::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let i = interner.clone();
                std::thread::spawn(move || (0..1000).map(|n| i.intern(&format!("c{n}")).unwrap_or(u32::MAX)).collect::<Vec<_>>())
            })
            .collect();
        let results: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap_or_default()).collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(interner.len(), 1000);
        for (n, id) in results[0].iter().enumerate() {
            assert_eq!(interner.name(*id).as_deref(), Some(format!("c{n}").as_str()));
        }
    }
}
