//! The scheduler: gives every transaction its position in the total order and waits, without
//! blocking a thread, until the [`LockManager`] grants it all its locks.
//!
//! Every request that touches state goes through here: single-key reads and writes as
//! one-key transactions, procedure calls with their declared key set (or everything).
//! Transactions are first queued for the [`crate::sequencer`], which hands them on in
//! adaptive batches; each batch gets its positions and requests its locks under one
//! acquisition of the scheduler's mutex, so
//! requesting locks in position order — what makes the locking deadlock-free and the
//! outcome equal to running the transactions one by one in that order — holds by
//! construction. A [`Grant`] releases the locks when dropped; a transaction abandoned while
//! still waiting (its request task went away) is released the moment it is granted.
//!
//! It also opens **snapshots** for interactive transactions: a snapshot at `S` is
//! registered at the current end of the order (the next position), lowers the store's
//! [`SnapshotFloor`] so that no version it may read is pruned, and is handed out once every
//! transaction before `S` has finished, so that its reads see exactly the prefix of the order
//! before `S`. A snapshot takes no position and no lock: later transactions run on, and
//! their writes, at positions `>= S`, are invisible to it.
//!
//! With a [`CommandLog`] attached, the leader appends each batch's logged commands to it
//! right after giving the batch its positions and before ordering anything else, so the log
//! is in position order. A transaction that has been ordered must then run: the log says it
//! did. (A waiter dropped before its grant is still released — that only happens when the
//! server is going away, which recovery treats like a crash.)

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::lock_manager::{LockId, LockManager, LockSet, Mode, Position};
use crate::log::{CommandLog, Refusal};
use crate::sequencer::Batcher;
use crate::store::{NO_SNAPSHOT, SnapshotFloor};

/// Default limit on transactions ordered and not finished (running or waiting for locks).
/// Each costs a few hundred bytes of lock-table state; beyond this, new requests are refused
/// with `OVERLOADED` before they are ordered.
pub const DEFAULT_MAX_PENDING_TRANSACTIONS: usize = 100_000;

/// Orders transactions and grants their locks.
pub struct Scheduler {
    /// Transactions waiting to be sequenced (see [`crate::sequencer`]).
    queue: Mutex<Batcher<Queued>>,
    state: Mutex<State>,
    /// Transactions ordered and not finished.
    unfinished: AtomicUsize,
    max_pending: usize,
    floor: SnapshotFloor,
    /// Where ordered commands are logged, once recovery is done.
    log: OnceLock<Arc<CommandLog>>,
}

/// Why a transaction was not ordered (nothing was done).
#[derive(Clone, Debug)]
pub enum Refused {
    /// The scheduler is at its limit of pending transactions.
    Overloaded {
        /// The limit.
        limit: usize,
    },
    /// The command log failed or is too far behind.
    Log(Refusal),
}

/// A transaction waiting to be sequenced: its locks, and where to send its position once
/// it holds them all.
struct Queued {
    locks: LockSet,
    /// The command to log, if the transaction can change state.
    record: Option<Vec<u8>>,
    granted: oneshot::Sender<Position>,
}

#[derive(Default)]
struct State {
    locks: LockManager,
    next: Position,
    /// Transactions waiting for their locks, and how to wake each.
    waiting: HashMap<Position, oneshot::Sender<Position>>,
    /// Open snapshots: position → how many are open there.
    snapshots: BTreeMap<Position, usize>,
    /// Snapshots waiting for every transaction before their position to finish.
    snapshot_waiters: Vec<(Position, oneshot::Sender<()>)>,
}

/// What submitting a transaction gave: its locks, or a wait for them.
enum Submitted {
    Granted(Grant),
    Pending(PendingGrant),
}

/// A transaction submitted and not yet granted. If it is dropped (its request went away),
/// the transaction is released as soon as it is granted, so it blocks nobody.
struct PendingGrant {
    scheduler: Arc<Scheduler>,
    granted: oneshot::Receiver<Position>,
}

impl PendingGrant {
    fn grant(&self, position: Position) -> Grant {
        Grant {
            scheduler: self.scheduler.clone(),
            position,
        }
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        // After `close`, a grant not yet sent fails to send and the sender releases it; a
        // grant already sent is received here and released.
        self.granted.close();
        if let Ok(position) = self.granted.try_recv() {
            self.scheduler.finish(position);
        }
    }
}

/// An open snapshot: reads at [`Snapshot::position`] see every transaction before it and
/// nothing after. Closed when dropped.
pub struct Snapshot {
    scheduler: Arc<Scheduler>,
    position: Position,
    open: bool,
}

impl Snapshot {
    /// The snapshot's position: it sees the writes of every position below it.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Closes the snapshot; returns whether the snapshot floor rose, so that older versions
    /// may now be pruned ([`crate::store::Store::prune`]).
    pub fn close(mut self) -> bool {
        self.open = false;
        self.scheduler.close_snapshot(self.position)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if self.open {
            self.scheduler.close_snapshot(self.position);
        }
    }
}

/// The locks of one transaction, held until dropped.
pub struct Grant {
    scheduler: Arc<Scheduler>,
    position: Position,
}

impl Grant {
    /// The transaction's position in the total order.
    pub fn position(&self) -> Position {
        self.position
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.scheduler.finish(self.position);
    }
}

impl Scheduler {
    /// A scheduler with no transactions and the default limit.
    pub fn new() -> Arc<Scheduler> {
        Self::with_limit(DEFAULT_MAX_PENDING_TRANSACTIONS, SnapshotFloor::default())
    }

    /// A scheduler that refuses new transactions while `max_pending` are unfinished and
    /// keeps `floor` at its lowest open snapshot.
    pub fn with_limit(max_pending: usize, floor: SnapshotFloor) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            queue: Mutex::new(Batcher::new(max_pending)),
            state: Mutex::new(State::default()),
            unfinished: AtomicUsize::new(0),
            max_pending,
            floor,
            log: OnceLock::new(),
        })
    }

    /// From now on, logs every ordered command to `log` (after recovery has replayed it).
    ///
    /// # Panics
    /// If a log is already attached.
    pub fn attach_log(&self, log: Arc<CommandLog>) {
        assert!(
            self.log.set(log).is_ok(),
            "a command log is already attached"
        );
    }

    /// The attached command log.
    pub fn log(&self) -> Option<&Arc<CommandLog>> {
        self.log.get()
    }

    /// Whether commands are logged (so callers encode them).
    pub fn logging(&self) -> bool {
        self.log.get().is_some()
    }

    /// The next position to be given out.
    pub fn next_position(&self) -> Position {
        self.state.lock().next
    }

    /// Opens a snapshot at the current end of the order and waits until every transaction
    /// ordered before it has finished.
    pub async fn snapshot(self: &Arc<Self>) -> Snapshot {
        let (snapshot, finished) = {
            let mut state = self.state.lock();
            let position = state.next;
            *state.snapshots.entry(position).or_default() += 1;
            self.floor
                .set(*state.snapshots.keys().next().expect("just added"));
            let snapshot = Snapshot {
                scheduler: self.clone(),
                position,
                open: true,
            };
            // Every unfinished transaction is before `position`.
            if state.locks.is_empty() {
                return snapshot;
            }
            let (wake, finished) = oneshot::channel();
            state.snapshot_waiters.push((position, wake));
            (snapshot, finished)
        };
        let _ = finished.await;
        snapshot
    }

    /// Makes the next transaction's position `position` (replaying a recorded order, whose
    /// positions may have gaps where a transaction was ordered and not recorded).
    ///
    /// # Panics
    /// If `position` is below the next position: the order only moves forward.
    pub fn advance_to(&self, position: Position) {
        let mut state = self.state.lock();
        assert!(
            position >= state.next,
            "cannot move the order back from {} to {position}",
            state.next
        );
        state.next = position;
    }

    /// Closes a snapshot; returns whether the floor rose (older versions may be pruned).
    fn close_snapshot(&self, position: Position) -> bool {
        let mut state = self.state.lock();
        let count = state
            .snapshots
            .get_mut(&position)
            .expect("an open snapshot is registered");
        *count -= 1;
        if *count > 0 {
            return false;
        }
        state.snapshots.remove(&position);
        let floor = state
            .snapshots
            .keys()
            .next()
            .copied()
            .unwrap_or(NO_SNAPSHOT);
        self.floor.set(floor);
        floor > position
    }

    /// Orders a transaction that needs `locks` and waits until it holds them all; refuses
    /// it, unordered, if the scheduler is at its limit.
    pub async fn acquire(self: &Arc<Self>, locks: LockSet) -> Result<Grant, Refused> {
        self.acquire_sized(locks, 0, None).await
    }

    /// [`Scheduler::acquire`] for a transaction whose ordered input is `input_bytes` long
    /// (what the sequencer's byte cap counts) and whose command, if it can change state, is
    /// `record` (logged when a log is attached).
    pub async fn acquire_sized(
        self: &Arc<Self>,
        locks: LockSet,
        input_bytes: usize,
        record: Option<Vec<u8>>,
    ) -> Result<Grant, Refused> {
        let mut pending = match self.submit(locks, input_bytes, record)? {
            Submitted::Granted(grant) => return Ok(grant),
            Submitted::Pending(pending) => pending,
        };
        let position = (&mut pending.granted)
            .await
            .expect("a queued or waiting transaction is always granted");
        Ok(pending.grant(position))
    }

    /// [`Scheduler::acquire`] for threads outside an async runtime (tests, benchmarks).
    ///
    /// # Panics
    /// If called from within an async runtime.
    pub fn acquire_blocking(self: &Arc<Self>, locks: LockSet) -> Result<Grant, Refused> {
        let mut pending = match self.submit(locks, 0, None)? {
            Submitted::Granted(grant) => return Ok(grant),
            Submitted::Pending(pending) => pending,
        };
        // Blocking cannot be cancelled, so the receiver may leave the guard.
        let granted = std::mem::replace(&mut pending.granted, oneshot::channel().1);
        let position = granted
            .blocking_recv()
            .expect("a queued or waiting transaction is always granted");
        Ok(pending.grant(position))
    }

    /// Waits at most `limit` until every transaction ordered so far that would make one
    /// locking `key` in `mode` wait has finished; returns whether they all did. Nothing is
    /// ordered, so a front end can refuse a request it cannot serve in time (`503`) before
    /// it has a position, which it then must run.
    ///
    /// Polls (from 100 µs, doubling to 10 ms): only a contended key waits at all, and
    /// waking per release would cost every transaction.
    pub async fn wait_for_lock(&self, key: LockId, mode: Mode, limit: Duration) -> bool {
        let Some(last) = self.state.lock().locks.last_conflicting(key, mode) else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = Duration::from_micros(100);
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            if !self.state.lock().locks.conflicting_through(key, mode, last) {
                return true;
            }
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Transactions submitted and not finished (queued, waiting or running).
    pub fn in_progress(&self) -> usize {
        self.queue.lock().len() + self.unfinished.load(Ordering::Relaxed)
    }

    /// Sequences a transaction: alone and at once if the sequencer is idle (then it also
    /// hands on whatever others queued meanwhile), else queued for the active leader.
    fn submit(
        self: &Arc<Self>,
        locks: LockSet,
        input_bytes: usize,
        record: Option<Vec<u8>>,
    ) -> Result<Submitted, Refused> {
        let overloaded = || Refused::Overloaded {
            limit: self.max_pending,
        };
        let record = match self.log.get() {
            Some(log) => {
                log.admit().map_err(Refused::Log)?;
                if let Some(bytes) = record.as_ref().map(Vec::len)
                    && bytes > crate::log::MAX_RECORD_BYTES
                {
                    return Err(Refused::Log(Refusal::TooLarge { bytes }));
                }
                record
            }
            None => None,
        };
        let mut queue = self.queue.lock();
        if queue.len() + self.unfinished.load(Ordering::Relaxed) >= self.max_pending {
            return Err(overloaded());
        }
        if queue.lead_alone() {
            drop(queue);
            let submitted = self.order_alone(locks, record);
            self.sequence();
            return Ok(submitted);
        }
        // A leader is active (`lead_alone` said so): it will hand this one on.
        let (granted, receiver) = oneshot::channel();
        let lead = queue
            .push(
                Queued {
                    locks,
                    record,
                    granted,
                },
                input_bytes,
            )
            .map_err(|_| overloaded())?;
        debug_assert!(!lead, "the active leader sequences the queue");
        Ok(Submitted::Pending(PendingGrant {
            scheduler: self.clone(),
            granted: receiver,
        }))
    }

    /// The leader's own transaction, a batch of one: granted now, or waiting.
    fn order_alone(self: &Arc<Self>, locks: LockSet, record: Option<Vec<u8>>) -> Submitted {
        let mut state = self.state.lock();
        let (position, granted_now) = self.place(&mut state, locks);
        let next = state.next;
        let submitted = if granted_now {
            Submitted::Granted(Grant {
                scheduler: self.clone(),
                position,
            })
        } else {
            let (granted, receiver) = oneshot::channel();
            state.waiting.insert(position, granted);
            Submitted::Pending(PendingGrant {
                scheduler: self.clone(),
                granted: receiver,
            })
        };
        drop(state);
        if let Some(log) = self.log.get() {
            let records: Vec<_> = record
                .map(|record| (position, record))
                .into_iter()
                .collect();
            log.append(records, next);
        }
        submitted
    }

    /// The leader's loop: hands batches on until the queue is empty.
    fn sequence(&self) {
        loop {
            let Some(batch) = self.queue.lock().next_batch() else {
                return;
            };
            self.order(batch);
        }
    }

    /// Gives each transaction of `batch` its position and requests its locks, in order,
    /// under one acquisition of the mutex; wakes those granted at once.
    fn order(&self, batch: Vec<Queued>) {
        let mut abandoned = Vec::new();
        let mut records = Vec::new();
        let next = {
            let mut state = self.state.lock();
            for Queued {
                locks,
                record,
                granted,
            } in batch
            {
                let (position, granted_now) = self.place(&mut state, locks);
                if let Some(record) = record {
                    records.push((position, record));
                }
                if !granted_now {
                    state.waiting.insert(position, granted);
                } else if granted.send(position).is_err() {
                    abandoned.push(position);
                }
            }
            state.next
        };
        // The leader appends before it hands on the next batch: the log is in order.
        if let Some(log) = self.log.get() {
            log.append(records, next);
        }
        for position in abandoned {
            self.finish(position);
        }
    }

    /// Gives the next position to a transaction needing `locks` and requests them; returns
    /// the position and whether they were all granted at once.
    fn place(&self, state: &mut State, locks: LockSet) -> (Position, bool) {
        let position = state.next;
        state.next += 1;
        self.unfinished.fetch_add(1, Ordering::Relaxed);
        (position, state.locks.request(position, locks))
    }

    fn finish(&self, position: Position) {
        let mut state = self.state.lock();
        let mut finished = vec![position];
        while let Some(position) = finished.pop() {
            self.unfinished.fetch_sub(1, Ordering::Relaxed);
            for runnable in state.locks.release(position) {
                let wake = state
                    .waiting
                    .remove(&runnable)
                    .expect("a transaction not yet runnable is waiting");
                if wake.send(runnable).is_err() {
                    // Its request went away while it waited: release it now.
                    finished.push(runnable);
                }
            }
        }
        if !state.snapshot_waiters.is_empty() {
            // Every transaction below the earliest unfinished one has finished.
            let earliest = state.locks.earliest().unwrap_or(Position::MAX);
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.snapshot_waiters)
                .into_iter()
                .partition(|(position, _)| *position <= earliest);
            state.snapshot_waiters = waiting;
            for (_, wake) in ready {
                let _ = wake.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock_manager::Mode;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    fn write(key: &str) -> LockSet {
        LockSet::Keys(vec![(crate::lock_manager::lock_id(key), Mode::Exclusive)])
    }

    /// Polls once; the scheduler's futures enqueue on their first poll.
    fn poll_once<F: Future>(future: &mut Pin<Box<F>>) -> Poll<F::Output> {
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_conflicting_transaction_waits_for_the_earlier_one() {
        let scheduler = Scheduler::new();
        let first = scheduler.acquire(write("a")).await.unwrap();
        let mut second = Box::pin(scheduler.acquire(write("a")));
        assert!(
            poll_once(&mut second).is_pending(),
            "a conflicting transaction waits"
        );
        let unrelated = scheduler.acquire(write("b")).await.unwrap();
        assert_eq!(
            unrelated.position(),
            2,
            "non-conflicting transactions do not wait"
        );
        drop(first);
        let Poll::Ready(Ok(second)) = poll_once(&mut second) else {
            panic!("granted when the first finished")
        };
        assert_eq!(second.position(), 1);
        drop((second, unrelated));
        assert_eq!(scheduler.in_progress(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_does_not_block_those_after_it() {
        let scheduler = Scheduler::new();
        let first = scheduler.acquire(write("a")).await.unwrap();
        let mut abandoned = Box::pin(scheduler.acquire(write("a")));
        assert!(poll_once(&mut abandoned).is_pending());
        drop(abandoned);
        let mut third = Box::pin(scheduler.acquire(write("a")));
        assert!(poll_once(&mut third).is_pending());
        drop(first);
        let Poll::Ready(Ok(third)) = poll_once(&mut third) else {
            panic!("the abandoned transaction was not released")
        };
        assert_eq!(third.position(), 2);
        drop(third);
        assert_eq!(scheduler.in_progress(), 0);
    }

    #[test]
    fn blocking_acquire_works_outside_a_runtime() {
        let scheduler = Scheduler::new();
        let first = scheduler.acquire_blocking(write("a")).unwrap();
        let waiter = std::thread::spawn({
            let scheduler = scheduler.clone();
            move || scheduler.acquire_blocking(write("a")).unwrap().position()
        });
        drop(first);
        assert_eq!(waiter.join().unwrap(), 1);
    }

    #[tokio::test]
    async fn past_the_limit_new_transactions_are_refused_before_they_are_ordered() {
        let scheduler = Scheduler::with_limit(2, SnapshotFloor::default());
        let first = scheduler.acquire(LockSet::All).await.unwrap();
        let mut second = Box::pin(scheduler.acquire(write("a")));
        assert!(poll_once(&mut second).is_pending());
        let mut refused = Box::pin(scheduler.acquire(write("b")));
        assert!(matches!(
            poll_once(&mut refused),
            Poll::Ready(Err(Refused::Overloaded { limit: 2 }))
        ));
        drop(first);
        let Poll::Ready(Ok(second)) = poll_once(&mut second) else {
            panic!("granted after the first")
        };
        assert_eq!(second.position(), 1);
        drop(second);
        let next = scheduler.acquire(write("b")).await.unwrap();
        assert_eq!(next.position(), 2, "the refused request took no position");
    }

    #[tokio::test]
    async fn a_snapshot_waits_for_every_earlier_transaction_and_no_later_one() {
        let scheduler = Scheduler::new();
        let first = scheduler.acquire(write("a")).await.unwrap();
        let second = scheduler.acquire(write("b")).await.unwrap();
        let mut snapshot = Box::pin(scheduler.snapshot());
        assert!(poll_once(&mut snapshot).is_pending(), "two are unfinished");
        let later = scheduler.acquire(write("c")).await.unwrap();
        assert_eq!(later.position(), 2, "ordered after the snapshot");
        drop(first);
        assert!(poll_once(&mut snapshot).is_pending(), "one is unfinished");
        drop(second);
        let Poll::Ready(snapshot) = poll_once(&mut snapshot) else {
            panic!("every transaction before the snapshot has finished")
        };
        assert_eq!(
            snapshot.position(),
            2,
            "it sees positions 0 and 1, not `later`"
        );
        drop(later);
    }

    #[tokio::test]
    async fn a_snapshot_takes_no_position_and_holds_the_floor_while_open() {
        let floor = SnapshotFloor::default();
        let scheduler = Scheduler::with_limit(10, floor.clone());
        drop(scheduler.acquire(write("a")).await.unwrap());
        let older = scheduler.snapshot().await;
        assert_eq!(older.position(), 1);
        assert_eq!(floor.get(), 1);
        let next = scheduler.acquire(write("a")).await.unwrap();
        assert_eq!(next.position(), 1, "the snapshot took no position");
        drop(next);
        let newer = scheduler.snapshot().await;
        assert_eq!(newer.position(), 2);
        assert_eq!(floor.get(), 1, "the lowest open snapshot");
        assert!(!newer.close(), "the floor stays at the older snapshot");
        assert!(older.close(), "the floor rose");
        assert_eq!(floor.get(), NO_SNAPSHOT);
        let dropped = scheduler.snapshot().await;
        assert_eq!(floor.get(), 2);
        drop(dropped);
        assert_eq!(floor.get(), NO_SNAPSHOT, "dropping closes it too");
    }

    #[test]
    fn under_concurrent_submission_every_transaction_is_ordered_once_and_exclusive() {
        use std::sync::atomic::AtomicBool;
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 2_000;
        const KEYS: u64 = 8;
        let scheduler = Scheduler::new();
        let held: Arc<Vec<AtomicBool>> =
            Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
        let positions: Vec<Vec<Position>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|thread| {
                    let (scheduler, held) = (scheduler.clone(), held.clone());
                    scope.spawn(move || {
                        let mut positions = Vec::new();
                        for i in 0..PER_THREAD {
                            let a = (thread * 7 + i * 3) % KEYS;
                            let b = (a + 1 + i % (KEYS - 1)) % KEYS;
                            let keys = [a, b];
                            let grant = scheduler
                                .acquire_blocking(LockSet::Keys(
                                    keys.iter().map(|key| (*key, Mode::Exclusive)).collect(),
                                ))
                                .unwrap();
                            for key in keys {
                                assert!(
                                    !held[key as usize].swap(true, Ordering::SeqCst),
                                    "key {key} granted to two transactions at once"
                                );
                            }
                            for key in keys {
                                held[key as usize].store(false, Ordering::SeqCst);
                            }
                            positions.push(grant.position());
                        }
                        positions
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap())
                .collect()
        });
        let mut all: Vec<Position> = positions.into_iter().flatten().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len() as u64, THREADS * PER_THREAD, "one position each");
        assert_eq!(*all.last().unwrap(), THREADS * PER_THREAD - 1, "no gaps");
        assert_eq!(scheduler.in_progress(), 0);
    }
}
