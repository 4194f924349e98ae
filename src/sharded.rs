//! Locking: [`lock`] (a std mutex that survives poisoning) and [`Sharded`], a map split into
//! shards each behind its own lock, so requests on different keys rarely share one (per-address
//! rate state, per-address failure counts, the session table, the issued-token caches).
//!
//! Invariant: no method holds more than one shard's lock at a time, and none across an await;
//! this module depends on nothing else of the crate.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// Locks a std mutex, recovering from poisoning (state behind these locks stays consistent
/// because every critical section is a single map operation).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many shards a map has.
pub(crate) const SHARDS: usize = 16;

/// See the module documentation.
pub(crate) struct Sharded<K, V>([Mutex<HashMap<K, V>>; SHARDS]);

impl<K: Hash + Eq, V> Sharded<K, V> {
    pub(crate) fn new() -> Self {
        Sharded(std::array::from_fn(|_| Mutex::new(HashMap::new())))
    }

    /// The shard that holds `k`.
    pub(crate) fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> &Mutex<HashMap<K, V>>
    where
        K: Borrow<Q>,
    {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        &self.0[(h.finish() as usize) % SHARDS]
    }

    /// The number of entries (a moment's count: shards are read one after another).
    pub(crate) fn len(&self) -> usize {
        self.0.iter().map(|s| lock(s).len()).sum()
    }

    /// Every value, cloned out shard by shard.
    pub(crate) fn values(&self) -> Vec<V>
    where
        V: Clone,
    {
        self.0.iter().flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>()).collect()
    }

    /// Every entry, cloned out shard by shard.
    pub(crate) fn entries(&self) -> Vec<(K, V)>
    where
        K: Clone,
        V: Clone,
    {
        self.0.iter().flat_map(|s| lock(s).iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()).collect()
    }

    /// Empties every shard.
    pub(crate) fn clear(&self) {
        for s in &self.0 {
            lock(s).clear();
        }
    }

    /// Keeps only the entries for which `keep` is true, shard by shard.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for s in &self.0 {
            lock(s).retain(|k, v| keep(k, v));
        }
    }

    /// Removes and returns every value.
    pub(crate) fn drain(&self) -> Vec<V> {
        self.0.iter().flat_map(|s| lock(s).drain().map(|(_, v)| v).collect::<Vec<_>>()).collect()
    }
}
