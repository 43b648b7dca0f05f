//! Run procedures natively, without a server: an in-memory store with the same transaction
//! semantics (read your own writes; everything or nothing), the same argument and result
//! encodings, and the same key-set check.
//!
//! ```
//! # use transdb_guest::{Abort, Tx};
//! # fn touch(tx: &mut Tx, key: String) -> Result<(), Abort> { tx.put(&key, b"x"); Ok(()) }
//! use transdb_guest::testing::{CallError, MemoryStore};
//! let mut store = MemoryStore::new();
//! assert_eq!(store.call(touch, "a".to_string()), Ok(()));
//! assert_eq!(store.get("a"), Some(&b"x"[..]));
//! ```

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__rt::{Procedure, decode, encode};
use crate::{Abort, KeySet, Tx, abi};

/// Why a native call failed; mirrors what the server reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The procedure aborted (returned `Err(Abort)` or called `abort`).
    Aborted(String),
    /// The procedure panicked.
    Panicked(String),
    /// The arguments did not decode.
    InvalidArguments(String),
    /// A stored value did not decode (`get_i64`, `get_json`).
    InvalidValue(String),
    /// The procedure touched a key its key function did not declare (or wrote a key it
    /// declared read-only).
    KeyNotDeclared(String),
    /// Any other failure.
    Other(String),
}

/// The unwinding payload of a failure inside a native call (never a visible panic).
struct Failure(CallError);

/// An in-memory store to run procedures against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStore {
    data: BTreeMap<String, Vec<u8>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The committed value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key).map(Vec::as_slice)
    }

    /// Sets `key` outside any procedure (to prepare a test).
    pub fn put(&mut self, key: &str, value: &[u8]) {
        self.data.insert(key.into(), value.into());
    }

    /// Every key and value, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.data
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()))
    }

    /// Runs `procedure` with `args` as one transaction.
    pub fn call<A, R>(&mut self, procedure: Procedure<A, R>, args: A) -> Result<R, CallError> {
        self.run(None, |tx| procedure(tx, args))
    }

    /// Runs `procedure` like [`MemoryStore::call`], first asking `keys` for its key set and
    /// failing with [`CallError::KeyNotDeclared`] if the procedure strays outside it, as the
    /// server does.
    pub fn call_with_keys<A, R>(
        &mut self,
        procedure: Procedure<A, R>,
        keys: fn(&A, &mut KeySet),
        args: A,
    ) -> Result<R, CallError> {
        let mut set = KeySet::default();
        keys(&args, &mut set);
        self.run(Some(set), |tx| procedure(tx, args))
    }

    /// Runs `procedure` on JSON arguments and returns the JSON result, as
    /// `transdb call MODULE PROC --json ARGS` does.
    pub fn call_json<A: DeserializeOwned, R: Serialize>(
        &mut self,
        procedure: Procedure<A, R>,
        json: &str,
    ) -> Result<String, CallError> {
        let output = self.run(None, |tx| {
            let args: A = decode(abi::format::JSON, json.as_bytes());
            procedure(tx, args).map(|result| encode(abi::format::JSON, &result))
        })?;
        Ok(String::from_utf8(output).expect("serde_json writes UTF-8"))
    }

    fn run<T>(
        &mut self,
        declared: Option<KeySet>,
        body: impl FnOnce(&mut Tx<'_>) -> Result<T, Abort>,
    ) -> Result<T, CallError> {
        let mut tx = Tx {
            backend: TxBackend {
                committed: &self.data,
                writes: BTreeMap::new(),
                declared,
            },
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut tx)));
        let writes = core::mem::take(&mut tx.backend.writes);
        drop(tx);
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(abort)) => return Err(CallError::Aborted(abort.message)),
            Err(payload) => {
                return Err(match payload.downcast::<Failure>() {
                    Ok(failure) => failure.0,
                    Err(payload) => CallError::Panicked(panic_message(payload.as_ref())),
                });
            }
        };
        for (key, value) in writes {
            match value {
                Some(value) => self.data.insert(key, value),
                None => self.data.remove(&key),
            };
        }
        Ok(value)
    }
}

fn panic_message(payload: &(dyn core::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        return (*text).into();
    }
    match payload.downcast_ref::<String>() {
        Some(text) => text.clone(),
        None => "panic with a non-text payload".into(),
    }
}

/// The native transaction: committed data plus this transaction's writes.
pub(crate) struct TxBackend<'a> {
    committed: &'a BTreeMap<String, Vec<u8>>,
    /// `None` value = deleted.
    writes: BTreeMap<String, Option<Vec<u8>>>,
    declared: Option<KeySet>,
}

impl TxBackend<'_> {
    fn check(&self, key: &str, write: bool) {
        let Some(declared) = &self.declared else {
            return;
        };
        let allowed = declared
            .iter()
            .any(|(declared, declared_write)| declared == key && (declared_write || !write));
        if !allowed {
            let what = if write { "writes" } else { "reads" };
            resume_unwind(Box::new(Failure(CallError::KeyNotDeclared(
                alloc::format!(
                    "the procedure {what} key {key:?}, which its key function did not declare{}",
                    if write { " for writing" } else { "" }
                ),
            ))));
        }
    }

    pub(crate) fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        self.check(key, false);
        match self.writes.get(key) {
            Some(written) => written.clone(),
            None => self.committed.get(key).cloned(),
        }
    }

    pub(crate) fn put(&mut self, key: &str, value: &[u8]) {
        self.check(key, true);
        self.writes.insert(key.to_string(), Some(value.to_vec()));
    }

    pub(crate) fn delete(&mut self, key: &str) -> bool {
        self.check(key, true);
        let existed = self.get(key).is_some();
        self.writes.insert(key.to_string(), None);
        existed
    }
}

pub(crate) fn fail(kind: i32, message: &str) -> ! {
    let message = message.to_string();
    let error = match kind {
        abi::fail::ABORT => CallError::Aborted(message),
        abi::fail::PANIC => CallError::Panicked(message),
        abi::fail::INVALID_ARGUMENTS => CallError::InvalidArguments(message),
        abi::fail::INVALID_VALUE => CallError::InvalidValue(message),
        _ => CallError::Other(message),
    };
    resume_unwind(Box::new(Failure(error)))
}

pub(crate) fn log(level: i32, message: &str) {
    std::eprintln!("[procedure log, level {level}] {message}");
}
