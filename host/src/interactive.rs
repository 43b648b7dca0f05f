//! Interactive transactions: `Begin`, then any number of `Get` / `Put` / `Delete` from the
//! client, then `Commit` or `Rollback`, all on one stream.
//!
//! Calvin orders a transaction before it runs, which needs its key set up front; an
//! interactive transaction discovers its keys as the client goes. So it runs
//! *optimistically* and is ordered only at commit:
//!
//! - **Begin** opens a snapshot ([`crate::scheduler::Snapshot`]) at the end of the order:
//!   reads see every transaction ordered before it, nothing after, whatever runs meanwhile.
//! - **Reads** come from that snapshot (or from the transaction's own buffered writes); each
//!   records the version it saw.
//! - **Writes** are buffered here, bounded by [`InteractiveLimits`].
//! - **Commit** with writes is an ordinary transaction at a position `C`: it takes shared locks
//!   on the keys read and exclusive locks on the keys written (deterministic locking, so no
//!   deadlock), then *validates*: every key read must still have the version it had at the
//!   snapshot. If so, the writes apply at `C` and the transaction is equivalent to running all
//!   of it at `C` (serializable); if not, nothing is written and the client gets `CONFLICT`
//!   (retry from `Begin`). A transaction that wrote nothing commits without being ordered: its
//!   reads are exactly the state at its snapshot position.
//! - **Rollback**, the end of the stream, a lost connection or the idle timeout drop the
//!   transaction: nothing was written, and the snapshot closes.
//!
//! What a commit logs is its *input* ([`CommitPlan`]: the versions read and the writes), so a
//! replay at the same position decides the same way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use transdb_proto::{ErrorCode, ErrorResponse, limits};

use crate::lock_manager::{LockSet, Mode, Position, lock_id};
use crate::scheduler::Snapshot;
use crate::store::Store;
use crate::transaction::too_many_keys;

/// Default limit on the bytes (keys and values) an interactive transaction may buffer.
/// Four maximal values; the client gets `TRANSACTION_TOO_LARGE` beyond it.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 16 * 1024 * 1024;
/// Default time an interactive transaction may sit between two requests before the server
/// rolls it back (`TRANSACTION_TIMEOUT`): an open transaction keeps a snapshot, and with it
/// older versions of every key written meanwhile, alive.
pub const DEFAULT_TRANSACTION_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bounds of one interactive transaction.
#[derive(Clone, Copy, Debug)]
pub struct InteractiveLimits {
    /// Distinct keys read or written (`--max-keys-per-call`).
    pub max_keys: usize,
    /// Bytes of keys and values buffered for writing (`--max-transaction-bytes`).
    pub max_write_bytes: usize,
}

/// What a commit decides on, and what is logged for it: the version each read saw and the
/// writes, both in key order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitPlan {
    /// Each key read, with the position that wrote the value seen (`None`: it did not exist).
    pub reads: Vec<(String, Option<Position>)>,
    /// Each key written, with its new value (`None` deletes).
    pub writes: Vec<(String, Option<Bytes>)>,
}

impl CommitPlan {
    /// The locks the commit takes: the keys read shared, the keys written exclusive.
    pub fn lock_set(&self) -> LockSet {
        LockSet::Keys(
            self.reads
                .iter()
                .map(|(key, _)| (lock_id(key), Mode::Shared))
                .chain(
                    self.writes
                        .iter()
                        .map(|(key, _)| (lock_id(key), Mode::Exclusive)),
                )
                .collect(),
        )
    }

    /// The size of the commit's ordered input (keys read, keys and values written).
    pub fn input_bytes(&self) -> usize {
        self.reads
            .iter()
            .map(|(key, _)| key.len() + 8)
            .sum::<usize>()
            + self
                .writes
                .iter()
                .map(|(key, value)| key.len() + value.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }

    /// With the commit's locks held: the first key read whose version moved since the
    /// snapshot, as a `CONFLICT` error, if there is one.
    pub fn validate(&self, store: &Store) -> Result<(), ErrorResponse> {
        for (key, seen) in &self.reads {
            let now = store.version(key);
            if now != *seen {
                return Err(ErrorResponse::new(
                    ErrorCode::CONFLICT,
                    format!(
                        "key {key:?} was written by another transaction after this one read it; nothing was written: retry the transaction from Begin"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An open interactive transaction.
pub struct Interactive {
    store: Arc<Store>,
    /// Open until the transaction ends (taken by commit, closed on drop).
    snapshot: Option<Snapshot>,
    limits: InteractiveLimits,
    /// Keys read from the snapshot, with the version each read saw.
    reads: HashMap<String, Option<Position>>,
    /// Buffered writes; `None` deletes.
    writes: HashMap<String, Option<Bytes>>,
    /// Bytes of the keys and values in `writes`.
    write_bytes: usize,
    /// Distinct keys in `reads` and `writes` together.
    distinct_keys: usize,
}

impl Interactive {
    /// A transaction reading at `snapshot`.
    pub fn new(store: Arc<Store>, snapshot: Snapshot, limits: InteractiveLimits) -> Self {
        Self {
            store,
            snapshot: Some(snapshot),
            limits,
            reads: HashMap::new(),
            writes: HashMap::new(),
            write_bytes: 0,
            distinct_keys: 0,
        }
    }

    /// The snapshot's position.
    pub fn snapshot(&self) -> Position {
        self.snapshot.as_ref().expect("open").position()
    }

    /// Checks `key` and counts it if it is new to the transaction (the caller then records
    /// it in `reads` or `writes`).
    fn admit_key(&mut self, key: &str) -> Result<(), ErrorResponse> {
        limits::check_key(key)?;
        if self.reads.contains_key(key) || self.writes.contains_key(key) {
            return Ok(());
        }
        if self.distinct_keys >= self.limits.max_keys {
            return Err(too_many_keys(self.limits.max_keys));
        }
        self.distinct_keys += 1;
        Ok(())
    }

    /// The value of `key` as this transaction sees it: its own write, or the snapshot's.
    pub fn get(&mut self, key: &str) -> Result<Option<Bytes>, ErrorResponse> {
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        self.admit_key(key)?;
        let read = self.store.get_at(key, self.snapshot());
        self.reads.entry(key.to_owned()).or_insert(read.version);
        Ok(read.value)
    }

    /// Buffers `key = value`.
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), ErrorResponse> {
        limits::check_value(value)?;
        self.write(key, Some(Bytes::copy_from_slice(value)))
    }

    /// Buffers the deletion of `key`; returns whether it existed (as this transaction sees
    /// it, so the answer is validated at commit like any read).
    pub fn delete(&mut self, key: &str) -> Result<bool, ErrorResponse> {
        let existed = self.get(key)?.is_some();
        self.write(key, None)?;
        Ok(existed)
    }

    fn write(&mut self, key: &str, value: Option<Bytes>) -> Result<(), ErrorResponse> {
        self.admit_key(key)?;
        let added = key.len() + value.as_ref().map_or(0, Bytes::len);
        let removed = self.writes.get(key).map_or(0, |previous| {
            key.len() + previous.as_ref().map_or(0, Bytes::len)
        });
        let total = self.write_bytes - removed + added;
        if total > self.limits.max_write_bytes {
            return Err(ErrorResponse::new(
                ErrorCode::TRANSACTION_TOO_LARGE,
                format!(
                    "the transaction would buffer {total} bytes of writes, over the limit of {} (--max-transaction-bytes); it was rolled back: split it",
                    self.limits.max_write_bytes
                ),
            ));
        }
        self.write_bytes = total;
        self.writes.insert(key.to_owned(), value);
        Ok(())
    }

    /// Ends the transaction for commit: closes the snapshot (pruning what it kept alive) and
    /// returns what the commit decides on, or, if it wrote nothing, its snapshot position:
    /// a read-only transaction is committed there.
    pub fn finish(mut self) -> Result<CommitPlan, Position> {
        let position = self.snapshot();
        self.close_snapshot();
        if self.writes.is_empty() {
            return Err(position);
        }
        let mut reads: Vec<_> = std::mem::take(&mut self.reads).into_iter().collect();
        reads.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut writes: Vec<_> = std::mem::take(&mut self.writes).into_iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(CommitPlan { reads, writes })
    }

    fn close_snapshot(&mut self) {
        if let Some(snapshot) = self.snapshot.take()
            && snapshot.close()
        {
            self.store.prune();
        }
    }
}

/// Rollback: nothing was written; the snapshot closes.
impl Drop for Interactive {
    fn drop(&mut self) {
        self.close_snapshot();
    }
}
