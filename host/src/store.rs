//! The in-memory store: `N` shards, each owning the keys that hash to it, each key holding
//! its newest version and, while open snapshots may need them, a few older ones (MVCC).
//!
//! A key's shard is [`transdb_proto::shard::shard_for_key`], a stable function, so a key
//! stays in the same shard across restarts and, later, across nodes. A shard is the unit of
//! ownership: the transaction manager addresses each one as a two-phase-commit participant,
//! so everything a shard holds is reached only through its own methods.
//!
//! # Versions
//!
//! Every write is tagged with the [`Position`] of the transaction that made it. A
//! *snapshot* at position `S` sees, for every key, the newest version written at a position
//! below `S`: the state after the prefix of the total order before `S` (the scheduler only
//! hands out a snapshot once every transaction before `S` has finished). Older versions are
//! kept only while a snapshot may read them:
//!
//! ```text
//! key "a":  v@3 ── v@9 ── v@17 (newest)        open snapshots: S = 12
//!           drop   keep   keep                 (v@3 is hidden from every S >= 9)
//! ```
//!
//! The *floor* is the lowest open snapshot ([`SnapshotFloor`], `u64::MAX` when none). A
//! version is dropped as soon as its successor was written below the floor: no open or
//! future snapshot can see it (future snapshots start at or above every position the
//! writer holding the shard lock could have observed; see [`SnapshotFloor`]). With no
//! snapshot open, a write replaces the value in place, as a plain map would. Keys left with
//! older versions are remembered per shard, so [`Store::prune`] visits only those when a
//! snapshot closes.
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;
use transdb_proto::shard::shard_for_key;

use crate::lock_manager::Position;
use crate::two_phase::{Coordinator, Decision, Message, Participant, Tick};

type FastHasher = foldhash::fast::RandomState;

/// Bytes `--max-memory` counts per key beyond its key and value: an estimate of the map
/// entry and version bookkeeping.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;

/// Keys and bytes held by one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Number of keys.
    pub keys: usize,
    /// Sum of the lengths of keys and values, in bytes (not counting the map's overhead or
    /// older versions kept for open snapshots).
    pub bytes: usize,
    /// Older versions kept for open snapshots.
    pub older_versions: usize,
}

/// The lowest position an open snapshot reads at (`u64::MAX` when none is open), shared by
/// the scheduler, which opens and closes snapshots, and the store, which prunes versions.
///
/// Why a writer may trust the value it reads: a snapshot at `S` is registered (and the floor
/// lowered) under the scheduler's mutex before any transaction at a position `>= S` is
/// ordered, so every writer that could hide a version `S` needs has seen the registration.
/// Writers below `S` only write versions that `S` sees as newest anyway. And the floor is
/// read under the shard's lock, after every earlier write to that shard.
#[derive(Clone, Debug)]
pub struct SnapshotFloor(Arc<AtomicU64>);

impl Default for SnapshotFloor {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(NO_SNAPSHOT)))
    }
}

impl SnapshotFloor {
    /// The lowest open snapshot, or `u64::MAX`.
    pub fn get(&self) -> Position {
        self.0.load(Ordering::SeqCst)
    }

    /// Sets the floor (the scheduler, under its mutex).
    pub fn set(&self, floor: Position) {
        self.0.store(floor, Ordering::SeqCst);
    }
}

/// The floor when no snapshot is open.
pub const NO_SNAPSHOT: Position = Position::MAX;

/// One version of a key: written at `position`; `None` is a deletion.
#[derive(Clone, Debug)]
struct Version {
    position: Position,
    value: Option<Bytes>,
}

/// A key's versions.
#[derive(Debug)]
struct Entry {
    /// Older versions an open snapshot may still read, oldest first; usually empty.
    older: Vec<Version>,
    newest: Version,
}

impl Entry {
    /// The version a snapshot at `snapshot` sees.
    fn at(&self, snapshot: Position) -> Option<&Version> {
        if self.newest.position < snapshot {
            return Some(&self.newest);
        }
        self.older
            .iter()
            .rev()
            .find(|version| version.position < snapshot)
    }

    /// Drops the versions no snapshot at or above `floor` can see, into `freed`.
    fn prune(&mut self, floor: Position, freed: &mut Vec<Bytes>) {
        let successor = |index: usize, older: &[Version], newest: &Version| {
            older.get(index + 1).unwrap_or(newest).position
        };
        let keep_from = (0..self.older.len())
            .find(|&index| successor(index, &self.older, &self.newest) >= floor)
            .unwrap_or(self.older.len());
        // A deletion with nothing before it reads like no version at all.
        let keep_from = (keep_from..self.older.len())
            .find(|&index| self.older[index].value.is_some())
            .unwrap_or(self.older.len());
        freed.extend(
            self.older
                .drain(..keep_from)
                .filter_map(|version| version.value),
        );
    }
}

/// One partition of the key space.
#[derive(Default)]
pub struct Shard {
    state: RwLock<ShardState>,
    /// What [`Store::memory_bytes`] counts for this shard, published after every write so
    /// that the admission check reads it without the lock.
    memory: AtomicUsize,
}

#[derive(Default)]
struct ShardState {
    map: HashMap<String, Entry, FastHasher>,
    stats: ShardStats,
    /// Keys whose entry holds older versions: what [`Store::prune`] visits.
    versioned: HashSet<String, FastHasher>,
}

impl ShardState {
    /// Writes `value` (`None` deletes) at `position`, pruning with `floor`; replaced values
    /// go to `freed`, to be dropped outside the lock. Returns whether the key existed.
    fn write(
        &mut self,
        key: &str,
        value: Option<Bytes>,
        position: Position,
        floor: Position,
        freed: &mut Vec<Bytes>,
    ) -> bool {
        let Some(entry) = self.map.get_mut(key) else {
            if let Some(value) = value {
                self.stats.keys += 1;
                self.stats.bytes += key.len() + value.len();
                self.map.insert(
                    key.to_owned(),
                    Entry {
                        older: Vec::new(),
                        newest: Version {
                            position,
                            value: Some(value),
                        },
                    },
                );
            }
            return false;
        };
        assert!(
            position >= entry.newest.position,
            "key {key:?} written at position {position} after position {}",
            entry.newest.position
        );
        let existed = entry.newest.value.is_some();
        if let Some(previous) = &entry.newest.value {
            self.stats.keys -= 1;
            self.stats.bytes -= key.len() + previous.len();
        }
        if let Some(value) = &value {
            self.stats.keys += 1;
            self.stats.bytes += key.len() + value.len();
        }
        let older_before = entry.older.len();
        let version = Version { position, value };
        if position == entry.newest.position {
            // The same transaction writing the key again: no snapshot can tell them apart.
            freed.extend(std::mem::replace(&mut entry.newest, version).value);
        } else {
            let previous = std::mem::replace(&mut entry.newest, version);
            entry.older.push(previous);
        }
        entry.prune(floor, freed);
        let older_after = entry.older.len();
        self.stats.older_versions = self.stats.older_versions + older_after - older_before;
        if older_after == 0 && entry.newest.value.is_none() {
            self.map.remove(key);
        }
        if older_after > 0 {
            if !self.versioned.contains(key) {
                self.versioned.insert(key.to_owned());
            }
        } else if older_before > 0 {
            self.versioned.remove(key);
        }
        existed
    }

    /// Prunes every key that holds older versions.
    fn prune(&mut self, floor: Position, freed: &mut Vec<Bytes>) {
        let ShardState {
            map,
            stats,
            versioned,
        } = self;
        versioned.retain(|key| {
            let Some(entry) = map.get_mut(key) else {
                return false;
            };
            let before = entry.older.len();
            entry.prune(floor, freed);
            stats.older_versions -= before - entry.older.len();
            if !entry.older.is_empty() {
                return true;
            }
            if entry.newest.value.is_none() {
                map.remove(key);
            }
            false
        });
    }
}

impl Shard {
    /// The newest value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.state.read().map.get(key)?.newest.value.clone()
    }

    /// What the shard holds.
    pub fn stats(&self) -> ShardStats {
        self.state.read().stats
    }

    /// Publishes `state`'s size for [`Store::memory_bytes`] (called with the lock held).
    fn publish(&self, state: &ShardState) {
        let memory = state.stats.bytes + state.stats.keys * ENTRY_OVERHEAD_BYTES;
        self.memory.store(memory, Ordering::Relaxed);
    }
}

/// What a snapshot read returns: the value and the version it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRead {
    /// The value; `None` if the key does not exist at the snapshot.
    pub value: Option<Bytes>,
    /// The position that wrote `value`; `None` if the key does not exist at the snapshot.
    /// Comparable with [`Store::version`] to tell whether the key changed since.
    pub version: Option<Position>,
}

/// All shards of one server.
pub struct Store {
    shards: Box<[Shard]>,
    floor: SnapshotFloor,
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
            floor: SnapshotFloor::default(),
        }
    }

    /// The snapshot floor this store prunes with (the scheduler sets it).
    pub fn snapshot_floor(&self) -> &SnapshotFloor {
        &self.floor
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns `key`.
    pub fn shard(&self, key: &str) -> &Shard {
        &self.shards[shard_for_key(key, self.shards.len())]
    }

    /// The newest value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.shard(key).get(key)
    }

    /// The value of `key` as the snapshot at `snapshot` sees it: the newest version written
    /// below that position. The caller keeps the snapshot open (see [`SnapshotFloor`]).
    pub fn get_at(&self, key: &str, snapshot: Position) -> SnapshotRead {
        let state = self.shard(key).state.read();
        match state.map.get(key).and_then(|entry| entry.at(snapshot)) {
            Some(Version {
                position,
                value: Some(value),
            }) => SnapshotRead {
                value: Some(value.clone()),
                version: Some(*position),
            },
            _ => SnapshotRead {
                value: None,
                version: None,
            },
        }
    }

    /// The position that wrote the newest value of `key`, `None` if it does not exist.
    pub fn version(&self, key: &str) -> Option<Position> {
        let state = self.shard(key).state.read();
        let entry = state.map.get(key)?;
        entry.newest.value.as_ref().map(|_| entry.newest.position)
    }

    /// Sets `key` to `value` at `position`, overwriting silently.
    pub fn put(&self, key: &str, value: Bytes, position: Position) {
        self.write(key, Some(value), position);
    }

    /// Removes `key` at `position`; returns whether it existed. Idempotent.
    pub fn delete(&self, key: &str, position: Position) -> bool {
        self.write(key, None, position)
    }

    fn write(&self, key: &str, value: Option<Bytes>, position: Position) -> bool {
        let mut freed = Vec::new();
        let shard = self.shard(key);
        let mut state = shard.state.write();
        let existed = state.write(key, value, position, self.floor.get(), &mut freed);
        shard.publish(&state);
        drop(state);
        drop(freed); // previous values, possibly megabytes, are freed outside the lock
        existed
    }

    /// Drops the older versions no open snapshot needs any more (after one closed).
    pub fn prune(&self) {
        for shard in self.shards.iter() {
            let mut freed = Vec::new();
            let mut state = shard.state.write();
            if state.versioned.is_empty() {
                continue;
            }
            state.prune(self.floor.get(), &mut freed);
            drop(state);
            drop(freed);
        }
    }

    /// Every key that exists for the snapshot at `snapshot`, with the position that wrote
    /// its value and the value, in no particular order (a checkpoint). Each shard is
    /// read-locked once, while its entries are collected; the caller keeps the snapshot open.
    pub fn entries_at(&self, snapshot: Position) -> Vec<(String, Position, Bytes)> {
        let mut entries = Vec::new();
        for shard in self.shards.iter() {
            let state = shard.state.read();
            entries.reserve(state.map.len());
            entries.extend(state.map.iter().filter_map(|(key, entry)| {
                let version = entry.at(snapshot)?;
                Some((key.clone(), version.position, version.value.clone()?))
            }));
        }
        entries
    }

    /// What `--max-memory` counts: the bytes of every key and value, plus
    /// [`ENTRY_OVERHEAD_BYTES`] per key for the map's own bookkeeping.
    pub fn memory_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.memory.load(Ordering::Relaxed))
            .sum()
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
            entries.extend(state.map.iter().filter_map(|(key, entry)| {
                Some((key.clone(), entry.newest.value.as_ref()?.clone()))
            }));
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

    /// Applies a transaction's writes (`None` deletes) at `position`, in order (a later
    /// write to a key wins). Isolation between transactions comes from the key locks of
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
    pub fn apply(
        &self,
        writes: Vec<(String, Option<Bytes>)>,
        position: Position,
    ) -> Result<(), String> {
        let mut by_shard: BTreeMap<usize, ShardWrites> = BTreeMap::new();
        for (key, value) in writes {
            by_shard
                .entry(self.shard_index(&key))
                .or_default()
                .push((key, value));
        }
        if by_shard.len() <= 1 {
            for (shard, writes) in by_shard {
                self.apply_to_shard(shard, writes, position);
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
                        self.apply_to_shard(to, writes, position);
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
    /// the decision. Nothing refuses here: the memory limit (`--max-memory`) is enforced
    /// at admission, before a transaction is ordered, because an ordered transaction must
    /// apply the same way when the log is replayed by a server with a different limit.
    fn stage(&self, _shard: usize, writes: ShardWrites) -> Result<ShardWrites, String> {
        Ok(writes)
    }

    fn apply_to_shard(&self, shard: usize, writes: ShardWrites, position: Position) {
        let mut freed = Vec::new();
        let shard = &self.shards[shard];
        let mut state = shard.state.write();
        let floor = self.floor.get();
        for (key, value) in writes {
            state.write(&key, value, position, floor, &mut freed);
        }
        shard.publish(&state);
        drop(state);
        drop(freed); // previous values are freed outside the shard lock
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
        store.put("a", Bytes::from_static(b"1"), 0);
        store.put("a", Bytes::from_static(b"22"), 1);
        assert_eq!(store.get("a").as_deref(), Some(&b"22"[..]));
        assert!(store.delete("a", 2));
        assert!(!store.delete("a", 3));
        assert_eq!(store.get("a"), None);
    }

    #[test]
    fn keys_land_in_the_shard_the_protocol_names() {
        let store = Store::new(3);
        for i in 0..100 {
            let key = format!("key-{i}");
            store.put(&key, Bytes::from(vec![0; i]), 0);
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
    fn memory_bytes_follow_every_kind_of_write() {
        let store = Store::new(4);
        let expected = |store: &Store| {
            store
                .shard_stats()
                .iter()
                .map(|stats| stats.bytes + stats.keys * ENTRY_OVERHEAD_BYTES)
                .sum::<usize>()
        };
        assert_eq!(store.memory_bytes(), 0);
        store.put("a", Bytes::from_static(b"12345"), 0);
        assert_eq!(store.memory_bytes(), 6 + ENTRY_OVERHEAD_BYTES);
        let writes: Vec<(String, Option<Bytes>)> = (0..50)
            .map(|i| (format!("k{i}"), Some(Bytes::from(vec![0u8; i]))))
            .collect();
        store.apply(writes, 1).unwrap();
        assert_eq!(store.memory_bytes(), expected(&store));
        store.delete("a", 2);
        store.put("k3", Bytes::new(), 3);
        assert_eq!(store.memory_bytes(), expected(&store));
        let deletes = (0..50).map(|i| (format!("k{i}"), None)).collect();
        store.apply(deletes, 4).unwrap();
        assert_eq!(store.memory_bytes(), 0);
    }

    #[test]
    fn stats_track_keys_and_bytes_through_overwrites_and_deletes() {
        let store = Store::new(1);
        store.put("ab", Bytes::from_static(b"xyz"), 0);
        assert_eq!(
            store.shard_stats()[0],
            ShardStats {
                keys: 1,
                bytes: 5,
                older_versions: 0
            }
        );
        store.put("ab", Bytes::from_static(b"x"), 1);
        assert_eq!(
            store.shard_stats()[0],
            ShardStats {
                keys: 1,
                bytes: 3,
                older_versions: 0
            }
        );
        store.put("c", Bytes::new(), 2);
        assert_eq!(
            store.shard_stats()[0],
            ShardStats {
                keys: 2,
                bytes: 4,
                older_versions: 0
            }
        );
        store.delete("ab", 3);
        assert_eq!(
            store.shard_stats()[0],
            ShardStats {
                keys: 1,
                bytes: 1,
                older_versions: 0
            }
        );
        store.delete("ab", 4);
        assert_eq!(
            store.shard_stats()[0],
            ShardStats {
                keys: 1,
                bytes: 1,
                older_versions: 0
            }
        );
    }

    #[test]
    fn apply_writes_and_deletes_across_shards_and_keeps_the_stats() {
        let store = Store::new(4);
        store.put("gone", Bytes::from_static(b"x"), 0);
        let writes = (0..20)
            .map(|i| (format!("k{i}"), Some(Bytes::from(vec![1; i]))))
            .chain([("gone".to_string(), None)])
            .collect();
        store.apply(writes, 1).unwrap();
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
            two.put(&format!("k{i}"), Bytes::from(format!("v{i}")), 0);
        }
        for i in (0..50).rev() {
            three.put(&format!("k{i}"), Bytes::from(format!("v{i}")), 0);
        }
        assert_eq!(
            two.state_hash(),
            three.state_hash(),
            "shard count and insertion order do not matter"
        );
        three.put("k7", Bytes::from_static(b"changed"), 1);
        assert_ne!(two.state_hash(), three.state_hash());
        // Framing: ("ab", "c") and ("a", "bc") differ.
        let (left, right) = (Store::new(1), Store::new(1));
        left.put("ab", Bytes::from_static(b"c"), 0);
        right.put("a", Bytes::from_static(b"bc"), 0);
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
                            0,
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

    fn read(store: &Store, key: &str, snapshot: Position) -> Option<Vec<u8>> {
        store
            .get_at(key, snapshot)
            .value
            .map(|value| value.to_vec())
    }

    #[test]
    fn a_snapshot_reads_the_newest_version_below_its_position() {
        let store = Store::new(2);
        store.put("a", Bytes::from_static(b"1"), 1);
        store.snapshot_floor().set(5); // a snapshot open at 5
        store.put("a", Bytes::from_static(b"3"), 3);
        store.put("a", Bytes::from_static(b"7"), 7);
        store.delete("a", 9);
        assert_eq!(read(&store, "a", 5).as_deref(), Some(&b"3"[..]));
        assert_eq!(store.get_at("a", 5).version, Some(3));
        assert_eq!(read(&store, "a", 8).as_deref(), Some(&b"7"[..]));
        assert_eq!(read(&store, "a", 10), None, "deleted at 9");
        assert_eq!(store.get("a"), None);
        assert_eq!(store.version("a"), None);
        assert_eq!(read(&store, "never", 5), None);
        let stats = store.shard_stats();
        assert_eq!(stats.iter().map(|stats| stats.keys).sum::<usize>(), 0);
    }

    #[test]
    fn versions_no_open_snapshot_can_see_are_dropped() {
        let store = Store::new(1);
        for position in 0..10 {
            store.put("a", Bytes::from(vec![position as u8]), position);
        }
        assert_eq!(
            store.shard_stats()[0].older_versions,
            0,
            "no snapshot: one version"
        );
        store.snapshot_floor().set(10);
        store.put("a", Bytes::from_static(b"x"), 10);
        store.put("a", Bytes::from_static(b"y"), 11);
        store.put("a", Bytes::from_static(b"z"), 12);
        // The snapshot at 10 needs the version at 9. Those at 10 and 11 are kept too: a
        // version goes only once its successor is below the floor (no snapshot at or above
        // the floor can see it then); finer bookkeeping is not worth it for short snapshots.
        assert_eq!(read(&store, "a", 10).as_deref(), Some(&[9u8][..]));
        assert_eq!(store.shard_stats()[0].older_versions, 3);
        store.put("b", Bytes::from_static(b"gone"), 11);
        store.delete("b", 12);
        assert_eq!(store.shard_stats()[0].keys, 1, "b is deleted");
        // The snapshot closes: pruning leaves one version of each key, and none of b.
        store.snapshot_floor().set(NO_SNAPSHOT);
        store.prune();
        let stats = store.shard_stats()[0];
        assert_eq!((stats.keys, stats.older_versions), (1, 0));
        assert_eq!(store.get("a").as_deref(), Some(&b"z"[..]));
        assert_eq!(store.version("a"), Some(12));
        assert_eq!(
            store.shards[0].state.read().map.len(),
            1,
            "the entry of b is gone"
        );
    }

    #[test]
    fn the_version_of_a_key_is_the_position_of_its_newest_write() {
        let store = Store::new(2);
        assert_eq!(store.version("k"), None);
        store.put("k", Bytes::from_static(b"v"), 4);
        assert_eq!(store.version("k"), Some(4));
        store
            .apply(vec![("k".into(), Some(Bytes::from_static(b"w")))], 6)
            .unwrap();
        assert_eq!(store.version("k"), Some(6));
        store.delete("k", 8);
        assert_eq!(store.version("k"), None);
    }

    #[test]
    #[should_panic(expected = "written at position 1 after position 2")]
    fn writes_to_a_key_never_go_back_in_the_order() {
        let store = Store::new(1);
        store.put("k", Bytes::new(), 2);
        store.put("k", Bytes::new(), 1);
    }
}
