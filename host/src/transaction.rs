//! One multi-key transaction: reads see the transaction's own writes, writes are buffered
//! and applied all together by [`Transaction::commit`], or dropped with the transaction.
//!
//! Isolation comes from the key locks the scheduler granted before the transaction started
//! ([`crate::lock_manager`]): the declared keys (exclusive where written), or everything
//! when no key set was declared. A transaction that touches a key outside its declared set
//! fails with `KEY_NOT_DECLARED`: no lock covers that key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use transdb_proto::{ErrorCode, ErrorResponse, limits};

use crate::lock_manager::{LockSet, Mode, Position, lock_id};
use crate::store::Store;

/// A declared key set: key → whether it may be written.
pub type DeclaredKeys = HashMap<String, bool>;

/// A transaction in progress.
pub struct Transaction {
    store: Arc<Store>,
    declared: Option<DeclaredKeys>,
    /// Buffered writes; `None` deletes.
    writes: HashMap<String, Option<Bytes>>,
    /// Distinct keys touched, counted only without a declared set (a declared set is
    /// bounded when it is declared).
    touched: HashSet<String>,
    max_keys: usize,
}

impl Transaction {
    /// Starts a transaction on `store`; the caller holds the locks of [`lock_set`].
    pub fn begin(
        store: Arc<Store>,
        declared: Option<DeclaredKeys>,
        max_keys: usize,
    ) -> Transaction {
        Transaction {
            store,
            declared,
            writes: HashMap::new(),
            touched: HashSet::new(),
            max_keys,
        }
    }

    fn admit(&mut self, key: &str, write: bool) -> Result<(), ErrorResponse> {
        limits::check_key(key)?;
        match &self.declared {
            Some(declared) => match declared.get(key) {
                Some(true) => Ok(()),
                Some(false) if !write => Ok(()),
                Some(false) => Err(ErrorResponse::new(
                    ErrorCode::KEY_NOT_DECLARED,
                    format!(
                        "the procedure writes key {key:?}, which its key function declared read-only: declare it with keys.write"
                    ),
                )),
                None => Err(ErrorResponse::new(
                    ErrorCode::KEY_NOT_DECLARED,
                    format!(
                        "the procedure touches key {key:?}, which its key function did not declare: add it to the key function"
                    ),
                )),
            },
            None => {
                if !self.touched.contains(key) {
                    if self.touched.len() >= self.max_keys {
                        return Err(too_many_keys(self.max_keys));
                    }
                    self.touched.insert(key.to_owned());
                }
                Ok(())
            }
        }
    }

    /// The value of `key` as this transaction sees it.
    pub fn get(&mut self, key: &str) -> Result<Option<Bytes>, ErrorResponse> {
        self.admit(key, false)?;
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        Ok(self.store.get(key))
    }

    /// Buffers `key = value`.
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), ErrorResponse> {
        // The value first: a refused put must not count as a write of the key (a
        // reconnaissance run would otherwise record the key as read-only).
        limits::check_value(value)?;
        self.admit(key, true)?;
        self.writes
            .insert(key.to_owned(), Some(Bytes::copy_from_slice(value)));
        Ok(())
    }

    /// Buffers the deletion of `key`; returns whether it existed.
    pub fn delete(&mut self, key: &str) -> Result<bool, ErrorResponse> {
        let existed = self.get(key)?.is_some();
        self.admit(key, true)?;
        self.writes.insert(key.to_owned(), None);
        Ok(existed)
    }

    /// The keys this transaction touched (written ones writable): the key set a
    /// reconnaissance run discovers. Only tracked when no key set was declared.
    pub fn discovered_keys(&self) -> DeclaredKeys {
        self.touched
            .iter()
            .map(|key| (key.clone(), self.writes.contains_key(key)))
            .collect()
    }

    /// Applies every buffered write (the caller releases the locks afterwards).
    ///
    /// # Errors
    /// `INTERNAL` if a shard refused in two-phase commit; nothing was applied then.
    pub fn commit(self, position: Position) -> Result<(), ErrorResponse> {
        self.store
            .apply(self.writes.into_iter().collect(), position)
            .map_err(|reason| {
                ErrorResponse::new(ErrorCode::INTERNAL, format!("commit aborted: {reason}"))
            })
    }
}

/// The locks a transaction with `declared` keys (or none declared) must hold.
pub fn lock_set(declared: Option<&DeclaredKeys>) -> LockSet {
    match declared {
        Some(keys) => LockSet::Keys(
            keys.iter()
                .map(|(key, write)| {
                    (
                        lock_id(key),
                        if *write {
                            Mode::Exclusive
                        } else {
                            Mode::Shared
                        },
                    )
                })
                .collect(),
        ),
        None => LockSet::All,
    }
}

/// The error for a key set over `max_keys`.
pub fn too_many_keys(max_keys: usize) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::TOO_MANY_KEYS,
        format!(
            "the transaction touches more than {max_keys} keys (--max-keys-per-call): split it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(keys: &[(&str, bool)]) -> Option<DeclaredKeys> {
        Some(
            keys.iter()
                .map(|(key, write)| ((*key).to_owned(), *write))
                .collect(),
        )
    }

    #[test]
    fn reads_see_own_writes_and_commit_applies_them_all() {
        let store = Arc::new(Store::new(4));
        store.put("a", Bytes::from_static(b"1"), 0);
        let mut tx = Transaction::begin(store.clone(), declared(&[("a", true), ("b", true)]), 10);
        tx.put("b", b"2").unwrap();
        assert_eq!(tx.get("b").unwrap().as_deref(), Some(&b"2"[..]));
        assert!(tx.delete("a").unwrap());
        assert_eq!(tx.get("a").unwrap(), None);
        tx.commit(1).unwrap();
        assert_eq!(store.get("a"), None);
        assert_eq!(store.get("b").as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn a_dropped_transaction_applies_nothing() {
        let store = Arc::new(Store::new(2));
        let mut tx = Transaction::begin(store.clone(), None, 10);
        tx.put("a", b"1").unwrap();
        drop(tx);
        assert_eq!(store.get("a"), None);
    }

    #[test]
    fn the_lock_set_follows_the_declared_keys() {
        assert_eq!(lock_set(None), LockSet::All);
        let LockSet::Keys(mut keys) = lock_set(declared(&[("r", false), ("w", true)]).as_ref())
        else {
            panic!()
        };
        keys.sort();
        let mut expected = vec![
            (lock_id("r"), Mode::Shared),
            (lock_id("w"), Mode::Exclusive),
        ];
        expected.sort();
        assert_eq!(keys, expected);
    }

    #[test]
    fn undeclared_and_read_only_keys_are_refused() {
        let store = Arc::new(Store::new(2));
        let mut tx = Transaction::begin(store, declared(&[("r", false), ("w", true)]), 10);
        assert!(tx.get("r").is_ok());
        assert_eq!(
            tx.put("r", b"x").unwrap_err().code,
            ErrorCode::KEY_NOT_DECLARED
        );
        assert_eq!(
            tx.get("other").unwrap_err().code,
            ErrorCode::KEY_NOT_DECLARED
        );
        assert!(tx.put("w", b"x").is_ok());
    }

    #[test]
    fn reconnaissance_discovers_what_was_read_and_written() {
        let store = Arc::new(Store::new(2));
        let mut tx = Transaction::begin(store, None, 10);
        tx.get("r").unwrap();
        tx.put("w", b"").unwrap();
        tx.delete("d").unwrap();
        let mut discovered: Vec<(String, bool)> = tx.discovered_keys().into_iter().collect();
        discovered.sort();
        assert_eq!(
            discovered,
            vec![("d".into(), true), ("r".into(), false), ("w".into(), true)]
        );
    }

    #[test]
    fn without_a_declared_set_the_number_of_keys_is_bounded() {
        let store = Arc::new(Store::new(2));
        let mut tx = Transaction::begin(store, None, 2);
        tx.put("a", b"").unwrap();
        tx.get("a").unwrap();
        tx.get("b").unwrap();
        assert_eq!(tx.get("c").unwrap_err().code, ErrorCode::TOO_MANY_KEYS);
    }
}
