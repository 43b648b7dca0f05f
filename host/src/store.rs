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

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use parking_lot::RwLock;
use transdb_proto::shard::shard_for_key;

use crate::two_phase::{Coordinator, Decision, Message, Participant, Tick};

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

    /// SHA-256 of the whole state in a canonical form: every entry in byte order of its key,
    /// each as `u32 BE key length, key, u32 BE value length, value`. Two stores with the same
    /// keys and values have the same hash, whatever their shard count or history. Consistent
    /// only if no write runs meanwhile (the executor takes every lock for it).
    pub fn state_hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut entries: Vec<(String, Bytes)> = Vec::new();
        for shard in self.shards.iter() {
            let state = shard.state.read();
            entries.extend(
                state
                    .map
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone())),
            );
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = Sha256::new();
        for (key, value) in &entries {
            hasher.update((key.len() as u32).to_be_bytes());
            hasher.update(key.as_bytes());
            hasher.update((value.len() as u32).to_be_bytes());
            hasher.update(value);
        }
        hasher.finalize().into()
    }

    /// The index of the shard that owns `key`.
    pub fn shard_index(&self, key: &str) -> usize {
        shard_for_key(key, self.shards.len())
    }

    /// Applies a transaction's writes (`None` deletes), in order (a later write to a key
    /// wins). Isolation between transactions comes from the key locks of
    /// [`crate::lock_manager`], which the writer holds until this returns; each shard is
    /// write-locked once, briefly.
    ///
    /// Writes to one shard are applied at once. Writes spanning several shards commit
    /// through two-phase commit ([`crate::two_phase`]) with each shard as a participant:
    /// every shard stages its writes and votes, and only if all vote yes does any apply.
    /// The participants are local and answer at once, so no deadline is needed; the same
    /// protocol will address shards on other nodes.
    ///
    /// # Errors
    /// The reason the transaction was aborted, if a participant refused; nothing was
    /// applied then.
    pub fn apply(&self, writes: Vec<(String, Option<Bytes>)>) -> Result<(), String> {
        let mut by_shard: BTreeMap<usize, ShardWrites> = BTreeMap::new();
        for (key, value) in writes {
            by_shard
                .entry(self.shard_index(&key))
                .or_default()
                .push((key, value));
        }
        if by_shard.len() <= 1 {
            for (shard, writes) in by_shard {
                self.apply_to_shard(shard, writes);
            }
            return Ok(());
        }
        let (mut coordinator, prepares) =
            Coordinator::start(by_shard.keys().copied(), 0, Tick::MAX);
        let mut participants: BTreeMap<usize, Participant<ShardWrites>> = by_shard
            .keys()
            .map(|&shard| (shard, Participant::new()))
            .collect();
        let mut outbox: VecDeque<Message> = prepares.into();
        while let Some(message) = outbox.pop_front() {
            match message {
                Message::Prepare { to } => {
                    let writes = by_shard.remove(&to).unwrap_or_default();
                    let vote = participants
                        .get_mut(&to)
                        .expect("a participant")
                        .on_prepare(|| self.stage(to, writes));
                    outbox.extend(coordinator.on_vote(to, vote));
                }
                Message::Decide { to, decision } => {
                    if let Some(writes) = participants
                        .get_mut(&to)
                        .expect("a participant")
                        .on_decision(&decision)
                    {
                        self.apply_to_shard(to, writes);
                    }
                }
            }
        }
        match coordinator.decision() {
            Some(Decision::Commit) => Ok(()),
            Some(Decision::Abort { reason }) => Err(reason.clone()),
            None => unreachable!("local participants always vote"),
        }
    }

    /// A participant's prepare: checks that `shard` can take `writes` and keeps them for
    /// the decision. Nothing can refuse yet; this is where a store-size limit will.
    fn stage(&self, _shard: usize, writes: ShardWrites) -> Result<ShardWrites, String> {
        Ok(writes)
    }

    fn apply_to_shard(&self, shard: usize, writes: ShardWrites) {
        let mut state = self.shards[shard].state.write();
        let replaced: Vec<Option<Bytes>> = writes
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => state.put(&key, value),
                None => state.delete(&key),
            })
            .collect();
        drop(state);
        drop(replaced); // previous values are freed outside the shard lock
    }
}

/// One shard's part of a transaction's writes, in order.
type ShardWrites = Vec<(String, Option<Bytes>)>;

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
    fn apply_writes_and_deletes_across_shards_and_keeps_the_stats() {
        let store = Store::new(4);
        store.put("gone", Bytes::from_static(b"x"));
        let writes = (0..20)
            .map(|i| (format!("k{i}"), Some(Bytes::from(vec![1; i]))))
            .chain([("gone".to_string(), None)])
            .collect();
        store.apply(writes).unwrap();
        for i in 0..20 {
            assert_eq!(
                store.get(&format!("k{i}")).map(|value| value.len()),
                Some(i)
            );
        }
        assert_eq!(store.get("gone"), None);
        let stats = store.shard_stats();
        assert_eq!(stats.iter().map(|stats| stats.keys).sum::<usize>(), 20);
        assert_eq!(
            stats.iter().map(|stats| stats.bytes).sum::<usize>(),
            (0..20).map(|i| format!("k{i}").len() + i).sum::<usize>()
        );
    }

    #[test]
    fn the_state_hash_depends_on_the_contents_only() {
        let (two, three) = (Store::new(2), Store::new(3));
        for i in 0..50 {
            two.put(&format!("k{i}"), Bytes::from(format!("v{i}")));
        }
        for i in (0..50).rev() {
            three.put(&format!("k{i}"), Bytes::from(format!("v{i}")));
        }
        assert_eq!(
            two.state_hash(),
            three.state_hash(),
            "shard count and insertion order do not matter"
        );
        three.put("k7", Bytes::from_static(b"changed"));
        assert_ne!(two.state_hash(), three.state_hash());
        // Framing: ("ab", "c") and ("a", "bc") differ.
        let (left, right) = (Store::new(1), Store::new(1));
        left.put("ab", Bytes::from_static(b"c"));
        right.put("a", Bytes::from_static(b"bc"));
        assert_ne!(left.state_hash(), right.state_hash());
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
