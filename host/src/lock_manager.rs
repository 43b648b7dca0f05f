//! Deterministic locking, Calvin-style.
//!
//! Every transaction has a position in one total order (its [`Position`]) and requests
//! **all** its locks at once, in that order. Locks on a key are granted first come, first
//! served: a request is granted when every earlier request on the key is compatible with
//! it (shared with shared), and a transaction may run when all its requests are granted.
//!
//! Consequences, each checked by the property tests below against a sequential model:
//! - **serializable in the given order**: two conflicting transactions run in position
//!   order, so running the runnable transactions in *any* interleaving gives the state of
//!   running all of them one by one in position order;
//! - **no deadlock**: the earliest transaction not yet finished is always runnable (nothing
//!   before it holds or waits for anything), so there is never a lock-wait abort;
//! - **deterministic**: which transactions are runnable depends only on the requests and
//!   releases, never on timing.
//!
//! A transaction whose keys are unknown locks everything: it takes the reserved global lock
//! exclusively, and every other transaction takes it shared.
//!
//! Keys are locked by their stable 64-bit hash ([`LockId`], `transdb_proto::shard::key_hash`),
//! so the table allocates no strings. Two keys with the same hash share a lock: a false
//! conflict at worst, which costs waiting, never correctness or determinism.
//!
//! Pure logic: no threads, clocks or I/O. A scheduler drives it and runs what it grants.

use std::collections::{HashMap, VecDeque};

/// A transaction's place in the total order. Requests must come in increasing positions.
pub type Position = u64;

/// What a key is locked by: its stable hash.
pub type LockId = u64;

/// The lock of `key`.
pub fn lock_id(key: &str) -> LockId {
    transdb_proto::shard::key_hash(key)
}

/// How a key is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Reads: shared with other readers.
    Shared,
    /// Writes: exclusive.
    Exclusive,
}

/// What a transaction locks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockSet {
    /// These locks (one listed twice is taken once, exclusive if either listing is).
    Keys(Vec<(LockId, Mode)>),
    /// Everything (the key set is not known).
    All,
}

#[derive(Debug)]
struct Request {
    position: Position,
    mode: Mode,
    granted: bool,
}

/// Which lock a queue is for: a key, or the global lock every transaction takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Lock {
    Global,
    Key(LockId),
}

#[derive(Debug)]
struct Pending {
    locks: Vec<Lock>,
    /// Requests not granted yet.
    waiting: usize,
}

/// Its keys are lock ids and positions, already well spread: a fast hash (not SipHash) is
/// enough, and the order of iteration is never relied upon.
type FastHasher = foldhash::fast::RandomState;

/// The lock table.
#[derive(Debug, Default)]
pub struct LockManager {
    queues: HashMap<Lock, VecDeque<Request>, FastHasher>,
    transactions: HashMap<Position, Pending, FastHasher>,
    last_position: Option<Position>,
}

impl LockManager {
    /// An empty lock table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Transactions that have requested locks and not released them.
    pub fn len(&self) -> usize {
        self.transactions.len()
    }

    /// The earliest position that has requested locks and not released them.
    pub fn earliest(&self) -> Option<Position> {
        self.transactions.keys().min().copied()
    }

    /// Whether no transaction holds or waits for a lock.
    pub fn is_empty(&self) -> bool {
        self.transactions.is_empty()
    }

    /// The positions of the transactions that hold or wait for a lock that conflicts with
    /// locking `key` in `mode`: on the key itself, or on everything.
    fn conflicting(&self, key: LockId, mode: Mode) -> impl Iterator<Item = Position> + '_ {
        [(Lock::Key(key), mode), (Lock::Global, Mode::Shared)]
            .into_iter()
            .filter_map(|(lock, mode)| self.queues.get(&lock).map(|queue| (queue, mode)))
            .flat_map(move |(queue, mode)| {
                queue
                    .iter()
                    .filter(move |request| !compatible(request.mode, mode))
                    .map(|request| request.position)
            })
    }

    /// The latest transaction that holds or waits for a lock conflicting with locking `key`
    /// in `mode` (a transaction ordered now would wait for it and every conflicting one
    /// before it).
    pub fn last_conflicting(&self, key: LockId, mode: Mode) -> Option<Position> {
        self.conflicting(key, mode).max()
    }

    /// Whether a transaction at or before `through` still holds or waits for a lock
    /// conflicting with locking `key` in `mode`.
    pub fn conflicting_through(&self, key: LockId, mode: Mode, through: Position) -> bool {
        self.conflicting(key, mode)
            .any(|position| position <= through)
    }

    /// Requests every lock of the transaction at `position`; returns whether all are
    /// granted at once (it may run now). Otherwise it becomes runnable in a later
    /// [`LockManager::release`].
    ///
    /// # Panics
    /// If `position` is not greater than every earlier one: the order is total.
    pub fn request(&mut self, position: Position, locks: LockSet) -> bool {
        assert!(
            self.last_position.is_none_or(|last| position > last),
            "lock requests must come in increasing positions ({position} after {:?})",
            self.last_position
        );
        self.last_position = Some(position);
        let mut wanted: Vec<(Lock, Mode)> = match locks {
            LockSet::All => vec![(Lock::Global, Mode::Exclusive)],
            LockSet::Keys(keys) => {
                let mut wanted: Vec<(Lock, Mode)> = keys
                    .into_iter()
                    .map(|(key, mode)| (Lock::Key(key), mode))
                    .collect();
                wanted.push((Lock::Global, Mode::Shared));
                wanted
            }
        };
        // One request per lock, exclusive if any listing is.
        wanted.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        wanted.dedup_by(|later, earlier| later.0 == earlier.0);
        let mut waiting = 0;
        let mut locks = Vec::with_capacity(wanted.len());
        for (lock, mode) in wanted {
            let queue = self.queues.entry(lock).or_default();
            let granted = queue.iter().all(|earlier| compatible(earlier.mode, mode));
            queue.push_back(Request {
                position,
                mode,
                granted,
            });
            waiting += usize::from(!granted);
            locks.push(lock);
        }
        self.transactions
            .insert(position, Pending { locks, waiting });
        waiting == 0
    }

    /// Releases every lock of the transaction at `position`, which must have been granted
    /// all of them; returns the transactions that became runnable, in position order.
    ///
    /// # Panics
    /// If the transaction is unknown or was not runnable.
    pub fn release(&mut self, position: Position) -> Vec<Position> {
        let pending = self
            .transactions
            .remove(&position)
            .expect("release of a transaction that holds no locks");
        assert_eq!(
            pending.waiting, 0,
            "release of a transaction that was not runnable"
        );
        let mut runnable = Vec::new();
        for lock in pending.locks {
            let queue = self
                .queues
                .get_mut(&lock)
                .expect("every held lock has a queue");
            let at = queue
                .iter()
                .position(|request| request.position == position)
                .expect("held lock is queued");
            debug_assert!(queue[at].granted);
            queue.remove(at);
            if queue.is_empty() {
                self.queues.remove(&lock);
                continue;
            }
            // Grant, from the front, every request now compatible with all before it.
            let mut exclusive_ahead = false;
            let mut any_ahead = false;
            for request in queue.iter_mut() {
                let grantable = match request.mode {
                    Mode::Exclusive => !any_ahead,
                    Mode::Shared => !exclusive_ahead,
                };
                if !grantable {
                    break;
                }
                if !request.granted {
                    request.granted = true;
                    let waiter = self
                        .transactions
                        .get_mut(&request.position)
                        .expect("queued requests belong to pending transactions");
                    waiter.waiting -= 1;
                    if waiter.waiting == 0 {
                        runnable.push(request.position);
                    }
                }
                any_ahead = true;
                exclusive_ahead |= request.mode == Mode::Exclusive;
            }
        }
        runnable.sort_unstable();
        runnable
    }
}

fn compatible(earlier: Mode, later: Mode) -> bool {
    earlier == Mode::Shared && later == Mode::Shared
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn keys(list: &[(&str, Mode)]) -> LockSet {
        LockSet::Keys(
            list.iter()
                .map(|(key, mode)| (lock_id(key), *mode))
                .collect(),
        )
    }

    #[test]
    fn conflicting_transactions_run_in_order_and_readers_share() {
        let mut locks = LockManager::new();
        assert!(locks.request(1, keys(&[("a", Mode::Exclusive)])));
        assert!(!locks.request(2, keys(&[("a", Mode::Shared)])));
        assert!(!locks.request(3, keys(&[("a", Mode::Shared), ("b", Mode::Shared)])));
        assert!(!locks.request(4, keys(&[("a", Mode::Exclusive)])));
        assert!(
            locks.request(5, keys(&[("b", Mode::Shared)])),
            "b is only read so far"
        );
        assert_eq!(locks.release(1), vec![2, 3], "both readers at once");
        assert_eq!(locks.release(3), Vec::<u64>::new());
        assert_eq!(locks.release(2), vec![4]);
        assert_eq!(locks.release(5), Vec::<u64>::new());
        assert_eq!(locks.release(4), Vec::<u64>::new());
        assert!(locks.is_empty());
        assert!(locks.queues.is_empty(), "no queue outlives its requests");
    }

    #[test]
    fn locking_everything_waits_for_all_earlier_and_blocks_all_later() {
        let mut locks = LockManager::new();
        assert!(locks.request(1, keys(&[("a", Mode::Shared)])));
        assert!(!locks.request(2, LockSet::All));
        assert!(
            !locks.request(3, keys(&[("z", Mode::Exclusive)])),
            "even an unrelated key waits"
        );
        assert_eq!(locks.release(1), vec![2]);
        assert_eq!(locks.release(2), vec![3]);
    }

    #[test]
    fn a_key_listed_twice_is_one_exclusive_request() {
        let mut locks = LockManager::new();
        assert!(locks.request(1, keys(&[("a", Mode::Shared), ("a", Mode::Exclusive)])));
        assert!(!locks.request(2, keys(&[("a", Mode::Shared)])));
        assert_eq!(locks.release(1), vec![2]);
    }

    #[test]
    #[should_panic(expected = "increasing positions")]
    fn positions_must_increase() {
        let mut locks = LockManager::new();
        locks.request(5, keys(&[]));
        locks.request(5, keys(&[]));
    }

    /// A transaction of the model: reads some keys, writes a function of what it read to
    /// others; or, with `all`, reads and writes every key.
    #[derive(Clone, Debug)]
    struct ModelTransaction {
        reads: Vec<u8>,
        writes: Vec<u8>,
        all: bool,
    }

    const KEYS: u8 = 6;

    fn transaction() -> impl Strategy<Value = ModelTransaction> {
        (
            proptest::collection::vec(0..KEYS, 0..3),
            proptest::collection::vec(0..KEYS, 0..3),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(reads, writes, all)| ModelTransaction { reads, writes, all })
    }

    /// Runs transaction `index` on `state`; returns what it read.
    fn run(
        index: usize,
        transaction: &ModelTransaction,
        state: &mut BTreeMap<u8, u64>,
    ) -> Vec<u64> {
        let (reads, writes): (Vec<u8>, Vec<u8>) = if transaction.all {
            ((0..KEYS).collect(), (0..KEYS).collect())
        } else {
            (transaction.reads.clone(), transaction.writes.clone())
        };
        let seen: Vec<u64> = reads
            .iter()
            .map(|key| state.get(key).copied().unwrap_or(0))
            .collect();
        let digest = seen.iter().fold(index as u64 + 1, |acc, value| {
            acc.wrapping_mul(31).wrapping_add(*value)
        });
        for key in writes {
            state.insert(key, digest);
        }
        seen
    }

    fn lock_set(transaction: &ModelTransaction) -> LockSet {
        if transaction.all {
            return LockSet::All;
        }
        let mut keys: Vec<(LockId, Mode)> = transaction
            .reads
            .iter()
            .map(|key| (LockId::from(*key), Mode::Shared))
            .collect();
        keys.extend(
            transaction
                .writes
                .iter()
                .map(|key| (LockId::from(*key), Mode::Exclusive)),
        );
        LockSet::Keys(keys)
    }

    proptest! {
        /// Requests interleaved with runs of arbitrary runnable transactions always finish
        /// (no deadlock), and every transaction reads exactly what it reads when all run one
        /// by one in position order, so the final states are equal too.
        #[test]
        fn any_granted_interleaving_equals_the_serial_order(
            transactions in proptest::collection::vec(transaction(), 1..40),
            choices in proptest::collection::vec(any::<u16>(), 200),
        ) {
            let mut serial_state = BTreeMap::new();
            let serial_reads: Vec<Vec<u64>> =
                transactions.iter().enumerate().map(|(index, transaction)| run(index, transaction, &mut serial_state)).collect();

            let mut locks = LockManager::new();
            let mut state = BTreeMap::new();
            let mut runnable: Vec<usize> = Vec::new();
            let mut requested = 0;
            let mut finished = 0;
            let mut choice = choices.iter().cycle();
            while finished < transactions.len() {
                let request_next = requested < transactions.len()
                    && (runnable.is_empty() || choice.next().unwrap() % 2 == 0);
                if request_next {
                    if locks.request(requested as Position, lock_set(&transactions[requested])) {
                        runnable.push(requested);
                    }
                    requested += 1;
                    continue;
                }
                prop_assert!(!runnable.is_empty(), "deadlock: nothing runnable with {} transactions pending", locks.len());
                let index = runnable.remove(*choice.next().unwrap() as usize % runnable.len());
                let reads = run(index, &transactions[index], &mut state);
                prop_assert_eq!(&reads, &serial_reads[index], "transaction {} read a non-serial state", index);
                runnable.extend(locks.release(index as Position).into_iter().map(|position| position as usize));
                finished += 1;
            }
            prop_assert_eq!(state, serial_state);
            prop_assert!(locks.is_empty());
            prop_assert!(locks.queues.is_empty());
        }

        /// The earliest unfinished transaction is always runnable.
        #[test]
        fn the_earliest_pending_transaction_is_always_runnable(
            transactions in proptest::collection::vec(transaction(), 1..30),
        ) {
            let mut locks = LockManager::new();
            let mut runnable = std::collections::BTreeSet::new();
            for (position, transaction) in transactions.iter().enumerate() {
                if locks.request(position as Position, lock_set(transaction)) {
                    runnable.insert(position as Position);
                }
            }
            for position in 0..transactions.len() as Position {
                prop_assert!(runnable.remove(&position), "transaction {} was not runnable when it was the earliest", position);
                runnable.extend(locks.release(position));
            }
        }
    }
}
