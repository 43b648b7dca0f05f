//! The in-memory store: `N` shards, each owning the keys that hash to it.
//!
//! A key's shard is [`transdb_proto::shard::shard_for_key`], a stable function, so a key
//! stays in the same shard across restarts and, later, across nodes. A shard is the unit of
//! ownership: the transaction manager will address each one as a two-phase-commit
//! participant, so everything a shard holds is reached only through its own methods.
//!
//! # Why a lock per shard
//!
//! The server runs on few cores (two here) and an operation on the map is a hash lookup and
//! a pointer swap: tens of nanoseconds. Handing each operation to a shard-owner thread would
//! cost a cross-thread wake-up (microseconds) per request, far more than the work, and would
//! leave a core idle whenever the traffic of one shard dominates. So every network worker
//! thread executes operations itself, under a short read-write lock of the key's shard:
//! uncontended it costs one atomic operation, reads of one shard proceed in parallel, and
//! values are reference-counted [`Bytes`] so that a `Get` copies nothing under the lock and
//! a large value is freed after the lock is released. With one shard per core two writers
//! rarely meet on one lock, and when they do, the wait is one critical section.

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::RwLock;
use transdb_proto::shard::shard_for_key;

/// Keys and bytes held by one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Number of keys.
    pub keys: usize,
    /// Sum of the lengths of keys and values, in bytes (not counting the map's overhead).
    pub bytes: usize,
}

/// One partition of the key space.
#[derive(Default)]
pub struct Shard {
    state: RwLock<ShardState>,
}

#[derive(Default)]
struct ShardState {
    map: HashMap<String, Bytes, foldhash::fast::RandomState>,
    stats: ShardStats,
}

impl Shard {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.state.read().map.get(key).cloned()
    }

    /// Sets `key` to `value`; returns the previous value.
    pub fn put(&self, key: &str, value: Bytes) -> Option<Bytes> {
        let mut state = self.state.write();
        let added = value.len();
        let previous = match state.map.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, value)),
            None => {
                state.map.insert(key.to_owned(), value);
                state.stats.keys += 1;
                state.stats.bytes += key.len();
                None
            }
        };
        state.stats.bytes += added;
        state.stats.bytes -= previous.as_ref().map_or(0, Bytes::len);
        previous
    }

    /// Removes `key`; returns the value it had.
    pub fn delete(&self, key: &str) -> Option<Bytes> {
        let mut state = self.state.write();
        let (key, value) = state.map.remove_entry(key)?;
        state.stats.keys -= 1;
        state.stats.bytes -= key.len() + value.len();
        Some(value)
    }

    /// What the shard holds.
    pub fn stats(&self) -> ShardStats {
        self.state.read().stats
    }
}

/// All shards of one server.
pub struct Store {
    shards: Box<[Shard]>,
}

impl Store {
    /// An empty store of `shard_count` shards.
    ///
    /// # Panics
    /// If `shard_count` is zero.
    pub fn new(shard_count: usize) -> Self {
        assert!(shard_count > 0, "a store needs at least one shard");
        Self {
            shards: (0..shard_count).map(|_| Shard::default()).collect(),
        }
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns `key`.
    pub fn shard(&self, key: &str) -> &Shard {
        &self.shards[shard_for_key(key, self.shards.len())]
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.shard(key).get(key)
    }

    /// Sets `key` to `value`, overwriting silently.
    pub fn put(&self, key: &str, value: Bytes) {
        // The previous value, possibly megabytes, is freed here, outside the shard's lock.
        drop(self.shard(key).put(key, value));
    }

    /// Removes `key`; returns whether it existed. Idempotent.
    pub fn delete(&self, key: &str) -> bool {
        self.shard(key).delete(key).is_some()
    }

    /// Keys and bytes per shard, in shard order.
    pub fn shard_stats(&self) -> Vec<ShardStats> {
        self.shards.iter().map(Shard::stats).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_overwrites_get_reads_delete_is_idempotent() {
        let store = Store::new(4);
        assert_eq!(store.get("a"), None);
        store.put("a", Bytes::from_static(b"1"));
        store.put("a", Bytes::from_static(b"22"));
        assert_eq!(store.get("a").as_deref(), Some(&b"22"[..]));
        assert!(store.delete("a"));
        assert!(!store.delete("a"));
        assert_eq!(store.get("a"), None);
    }

    #[test]
    fn keys_land_in_the_shard_the_protocol_names() {
        let store = Store::new(3);
        for i in 0..100 {
            let key = format!("key-{i}");
            store.put(&key, Bytes::from(vec![0; i]));
        }
        let stats = store.shard_stats();
        for i in 0..100 {
            let key = format!("key-{i}");
            let owner = shard_for_key(&key, 3);
            assert!(store.shards[owner].get(&key).is_some());
            for other in (0..3).filter(|&shard| shard != owner) {
                assert!(store.shards[other].get(&key).is_none());
            }
        }
        assert_eq!(stats.iter().map(|stats| stats.keys).sum::<usize>(), 100);
        assert!(stats.iter().all(|stats| stats.keys > 0), "{stats:?}");
    }

    #[test]
    fn stats_track_keys_and_bytes_through_overwrites_and_deletes() {
        let store = Store::new(1);
        store.put("ab", Bytes::from_static(b"xyz"));
        assert_eq!(store.shard_stats()[0], ShardStats { keys: 1, bytes: 5 });
        store.put("ab", Bytes::from_static(b"x"));
        assert_eq!(store.shard_stats()[0], ShardStats { keys: 1, bytes: 3 });
        store.put("c", Bytes::new());
        assert_eq!(store.shard_stats()[0], ShardStats { keys: 2, bytes: 4 });
        store.delete("ab");
        assert_eq!(store.shard_stats()[0], ShardStats { keys: 1, bytes: 1 });
        store.delete("ab");
        assert_eq!(store.shard_stats()[0], ShardStats { keys: 1, bytes: 1 });
    }

    #[test]
    fn concurrent_writers_on_all_shards_lose_nothing() {
        let store = Store::new(2);
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..2_000 {
                        store.put(
                            &format!("{thread}/{i}"),
                            Bytes::from(format!("{thread}:{i}")),
                        );
                    }
                });
            }
        });
        for thread in 0..4 {
            for i in 0..2_000 {
                let value = store.get(&format!("{thread}/{i}")).unwrap();
                assert_eq!(value, format!("{thread}:{i}").as_bytes());
            }
        }
        assert_eq!(
            store
                .shard_stats()
                .iter()
                .map(|stats| stats.keys)
                .sum::<usize>(),
            8_000
        );
    }
}
