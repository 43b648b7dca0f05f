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
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::lock_api::{ArcRwLockReadGuard, ArcRwLockWriteGuard};
use parking_lot::{RawRwLock, RwLock};
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
    state: Arc<RwLock<ShardState>>,
}

#[derive(Default)]
struct ShardState {
    map: HashMap<String, Bytes, foldhash::fast::RandomState>,
    stats: ShardStats,
}

impl ShardState {
    fn put(&mut self, key: &str, value: Bytes) -> Option<Bytes> {
        let added = value.len();
        let previous = match self.map.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, value)),
            None => {
                self.map.insert(key.to_owned(), value);
                self.stats.keys += 1;
                self.stats.bytes += key.len();
                None
            }
        };
        self.stats.bytes += added;
        self.stats.bytes -= previous.as_ref().map_or(0, Bytes::len);
        previous
    }

    fn delete(&mut self, key: &str) -> Option<Bytes> {
        let (key, value) = self.map.remove_entry(key)?;
        self.stats.keys -= 1;
        self.stats.bytes -= key.len() + value.len();
        Some(value)
    }
}

impl Shard {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.state.read().map.get(key).cloned()
    }

    /// Sets `key` to `value`; returns the previous value.
    pub fn put(&self, key: &str, value: Bytes) -> Option<Bytes> {
        self.state.write().put(key, value)
    }

    /// Removes `key`; returns the value it had.
    pub fn delete(&self, key: &str) -> Option<Bytes> {
        self.state.write().delete(key)
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

    /// The index of the shard that owns `key`.
    pub fn shard_index(&self, key: &str) -> usize {
        shard_for_key(key, self.shards.len())
    }

    /// Locks the given shards (`(index, write)`; duplicates merge, write wins) in ascending
    /// index order, so that any two callers lock in the same order and never deadlock.
    /// The locks are held until the returned value is dropped.
    pub fn lock(&self, shards: impl IntoIterator<Item = (usize, bool)>) -> ShardLocks {
        let mut wanted: Vec<(usize, bool)> = shards.into_iter().collect();
        wanted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        wanted.dedup_by_key(|(index, _)| *index);
        let guards = wanted
            .into_iter()
            .map(|(index, write)| {
                let lock = &self.shards[index].state;
                let guard = if write {
                    ShardGuard::Write(lock.write_arc())
                } else {
                    ShardGuard::Read(lock.read_arc())
                };
                (index, guard)
            })
            .collect();
        ShardLocks { guards }
    }

    /// Write-locks every shard (for a transaction whose keys are not known up front).
    pub fn lock_all(&self) -> ShardLocks {
        self.lock((0..self.shards.len()).map(|index| (index, true)))
    }
}

enum ShardGuard {
    Read(ArcRwLockReadGuard<RawRwLock, ShardState>),
    Write(ArcRwLockWriteGuard<RawRwLock, ShardState>),
}

impl ShardGuard {
    fn state(&self) -> &ShardState {
        match self {
            ShardGuard::Read(guard) => guard,
            ShardGuard::Write(guard) => guard,
        }
    }
}

/// Why a locked-shard operation is not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockError {
    /// The key's shard is not locked at all.
    NotLocked,
    /// The key's shard is only read-locked.
    ReadOnly,
}

/// Shards locked for one transaction, owned (no borrow of the store), released on drop.
pub struct ShardLocks {
    /// Sorted by shard index.
    guards: Vec<(usize, ShardGuard)>,
}

impl ShardLocks {
    fn guard(&self, shard: usize) -> Option<&ShardGuard> {
        self.guards
            .binary_search_by_key(&shard, |(index, _)| *index)
            .ok()
            .map(|at| &self.guards[at].1)
    }

    /// Whether `shard` is locked, and for writing.
    pub fn mode(&self, shard: usize) -> Option<bool> {
        self.guard(shard)
            .map(|guard| matches!(guard, ShardGuard::Write(_)))
    }

    /// The committed value of `key` in `shard`.
    pub fn get(&self, shard: usize, key: &str) -> Result<Option<Bytes>, LockError> {
        let guard = self.guard(shard).ok_or(LockError::NotLocked)?;
        Ok(guard.state().map.get(key).cloned())
    }

    /// Applies `writes` (`None` deletes) to write-locked shards. Checks every write before
    /// applying any, so that it applies all or nothing.
    pub fn apply(&mut self, writes: Vec<(usize, String, Option<Bytes>)>) -> Result<(), LockError> {
        for (shard, _, _) in &writes {
            if self.mode(*shard).ok_or(LockError::NotLocked)? {
                continue;
            }
            return Err(LockError::ReadOnly);
        }
        for (shard, key, value) in writes {
            let at = self
                .guards
                .binary_search_by_key(&shard, |(index, _)| *index)
                .expect("checked above");
            let ShardGuard::Write(guard) = &mut self.guards[at].1 else {
                unreachable!("checked above")
            };
            let state: &mut ShardState = guard;
            match value {
                Some(value) => drop(state.put(&key, value)),
                None => drop(state.delete(&key)),
            }
        }
        Ok(())
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
    fn locked_shards_read_and_apply_all_or_nothing() {
        let store = Store::new(4);
        store.put("a", Bytes::from_static(b"1"));
        let (a, b) = (store.shard_index("a"), store.shard_index("b"));
        let mut locks = store.lock([(a, true), (b, false), (a, false)]);
        assert_eq!(
            locks.mode(a),
            Some(true),
            "write wins over read for the same shard"
        );
        assert_eq!(locks.get(a, "a").unwrap().as_deref(), Some(&b"1"[..]));
        let unlocked = (0..4).find(|shard| locks.mode(*shard).is_none()).unwrap();
        assert_eq!(locks.get(unlocked, "x"), Err(LockError::NotLocked));
        if a != b {
            let mixed = vec![
                (a, "a".to_string(), None),
                (b, "b".to_string(), Some(Bytes::from_static(b"2"))),
            ];
            assert_eq!(locks.apply(mixed), Err(LockError::ReadOnly));
            assert_eq!(
                locks.get(a, "a").unwrap().as_deref(),
                Some(&b"1"[..]),
                "nothing applied"
            );
        }
        locks.apply(vec![(a, "a".to_string(), None)]).unwrap();
        drop(locks);
        assert_eq!(store.get("a"), None);
        assert_eq!(
            store
                .shard_stats()
                .iter()
                .map(|stats| stats.keys)
                .sum::<usize>(),
            0
        );
    }

    #[test]
    fn writers_locking_overlapping_shards_in_any_order_do_not_deadlock() {
        let store = Store::new(4);
        std::thread::scope(|scope| {
            for thread in 0..4usize {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..2_000usize {
                        let first = (thread + i) % 4;
                        let second = (thread * 3 + i * 7) % 4;
                        let mut locks = store.lock([(second, true), (first, true)]);
                        let key = format!("{thread}");
                        let shard = store.shard_index(&key);
                        if locks.mode(shard) == Some(true) {
                            locks
                                .apply(vec![(shard, key, Some(Bytes::from(i.to_string())))])
                                .unwrap();
                        }
                    }
                });
            }
        });
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
