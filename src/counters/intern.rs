//! Customer interning: the outside world names customers with strings up to 256
//! bytes; counters key them by a dense `u32` so keys stay 16 bytes and hash fast.

use dashmap::DashMap;
use std::sync::{Arc, RwLock};

/// A customer's interned id.
pub type CustomerId = u32;

/// Why a customer could not be interned.
#[derive(Debug, thiserror::Error)]
pub enum InternError {
    #[error("more than 4 billion distinct customers")]
    Exhausted,
}

/// Two-way map between customer strings and ids. Ids are never reused.
#[derive(Default)]
pub struct Interner {
    /// String → id. Keyed by the string with a DoS-resistant hasher: the strings
    /// come from outside.
    forward: DashMap<Arc<str>, CustomerId>,
    /// Id → string, appended under the write lock when a customer is first seen
    /// (rare); read by the flusher and usage queries, never by checks.
    reverse: RwLock<Vec<Arc<str>>>,
}

impl Interner {
    pub fn new() -> Interner {
        Interner::default()
    }

    /// The id of `name`, if it was ever seen.
    pub fn lookup(&self, name: &str) -> Option<CustomerId> {
        self.forward.get(name).map(|r| *r)
    }

    /// The id of `name`, assigning the next one on first sight.
    pub fn intern(&self, name: &str) -> Result<CustomerId, InternError> {
        if let Some(id) = self.forward.get(name) {
            return Ok(*id);
        }
        let key: Arc<str> = Arc::from(name);
        let entry = self.forward.entry(key.clone());
        if let dashmap::Entry::Occupied(o) = &entry {
            return Ok(*o.get());
        }
        // Shard lock held: no one else can assign an id to this name meanwhile.
        let mut reverse = self.reverse.write().unwrap_or_else(|p| p.into_inner());
        let id = CustomerId::try_from(reverse.len()).map_err(|_| InternError::Exhausted)?;
        reverse.push(key);
        drop(reverse);
        entry.or_insert(id);
        Ok(id)
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
