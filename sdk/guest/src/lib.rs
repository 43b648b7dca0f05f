//! Write TransDB stored procedures in Rust.
//!
//! A procedure is a plain function from a transaction and typed arguments to a typed
//! result; one line exports it:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use transdb_guest::{Abort, KeySet, Tx, procedure};
//!
//! #[derive(Serialize, Deserialize)]
//! pub struct Deposit { pub account: String, pub amount: i64 }
//!
//! pub fn deposit(tx: &mut Tx, args: Deposit) -> Result<i64, Abort> {
//!     let key = format!("balance:{}", args.account);
//!     let Some(balance) = tx.get_i64(&key) else {
//!         return Err(Abort::new("unknown account"));
//!     };
//!     tx.put_i64(&key, balance + args.amount);
//!     Ok(balance + args.amount)
//! }
//!
//! /// The keys `deposit` touches, known before it runs.
//! pub fn deposit_keys(args: &Deposit, keys: &mut KeySet) {
//!     keys.write(&format!("balance:{}", args.account));
//! }
//!
//! procedure!(deposit, keys = deposit_keys);
//!
//! // Test it natively, no server needed:
//! let mut store = transdb_guest::testing::MemoryStore::new();
//! store.put("balance:alice", b"10");
//! let args = Deposit { account: "alice".into(), amount: 5 };
//! assert_eq!(store.call(deposit, args), Ok(15));
//! ```
//!
//! Each call is one serializable transaction: every read sees the state as of the
//! transaction's place in the server's order, and the writes are applied all together when
//! the procedure returns `Ok`, or not at all if it returns `Err(Abort)`, calls [`abort`],
//! panics, or breaks a limit. Arguments and results are encoded with postcard (from the Rust
//! client) or JSON (from the CLI and scripts); the SDK handles both.
//!
//! Built for `wasm32-unknown-unknown`, the crate talks to the server through the ABI in
//! `proto-spec/ABI.md`; built for the host, [`Tx`] runs on the in-memory store of
//! [`testing`], so a procedure's logic is tested with plain `cargo test`.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(not(target_arch = "wasm32"))]
extern crate std;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
pub use transdb_proto::abi;

#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
#[cfg(target_arch = "wasm32")]
mod wasm;

#[cfg(not(target_arch = "wasm32"))]
use testing as backend;
#[cfg(target_arch = "wasm32")]
use wasm as backend;

/// Re-exports for procedure crates.
pub mod prelude {
    pub use crate::{Abort, KeySet, Tx, abort, procedure};
    pub use alloc::format;
    pub use alloc::string::{String, ToString};
    pub use alloc::vec;
    pub use alloc::vec::Vec;
    pub use serde::{Deserialize, Serialize};
}

/// The transaction a procedure runs in. Reads see the procedure's own earlier writes.
pub struct Tx<'a> {
    backend: backend::TxBackend<'a>,
}

impl Tx<'_> {
    /// The value of `key`, or `None` if it does not exist.
    pub fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        self.backend.get(key)
    }

    /// Sets `key` to `value` (applied when the procedure returns `Ok`).
    pub fn put(&mut self, key: &str, value: &[u8]) {
        self.backend.put(key, value)
    }

    /// Removes `key`; returns whether it existed.
    pub fn delete(&mut self, key: &str) -> bool {
        self.backend.delete(key)
    }

    /// Whether `key` exists.
    pub fn contains(&mut self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key` as an integer stored in decimal text (as [`Tx::put_i64`] writes
    /// it, readable with `transdb get`). Fails the call if the value is not such a number.
    pub fn get_i64(&mut self, key: &str) -> Option<i64> {
        let bytes = self.get(key)?;
        match core::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.parse().ok())
        {
            Some(number) => Some(number),
            None => fail_with(
                abi::fail::INVALID_VALUE,
                &alloc::format!("the value of {key:?} is not a decimal integer"),
            ),
        }
    }

    /// Sets `key` to `value` in decimal text.
    pub fn put_i64(&mut self, key: &str, value: i64) {
        self.put(key, value.to_string().as_bytes())
    }

    /// The value of `key` decoded from JSON. Fails the call if it is not a `T` in JSON.
    pub fn get_json<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let bytes = self.get(key)?;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Some(value),
            Err(error) => fail_with(
                abi::fail::INVALID_VALUE,
                &alloc::format!("the value of {key:?} is not the expected JSON: {error}"),
            ),
        }
    }

    /// Sets `key` to `value` encoded as JSON.
    pub fn put_json<T: Serialize>(&mut self, key: &str, value: &T) {
        match serde_json::to_vec(value) {
            Ok(bytes) => self.put(key, &bytes),
            Err(error) => fail_with(
                abi::fail::INVALID_VALUE,
                &alloc::format!("cannot encode the value of {key:?}: {error}"),
            ),
        }
    }
}

/// The keys a transaction reads and writes, declared before it runs (see [`procedure!`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    /// `(key, written)` in declaration order; a key may appear twice.
    pub(crate) keys: Vec<(String, bool)>,
}

impl KeySet {
    /// Declares that the transaction reads `key`.
    pub fn read(&mut self, key: &str) {
        self.keys.push((key.into(), false));
    }

    /// Declares that the transaction writes (or deletes, and maybe reads) `key`.
    pub fn write(&mut self, key: &str) {
        self.keys.push((key.into(), true));
    }

    /// The declared keys with whether each is written.
    pub fn iter(&self) -> impl Iterator<Item = (&str, bool)> {
        self.keys
            .iter()
            .map(|(key, written)| (key.as_str(), *written))
    }
}

/// A deliberate end of the transaction: nothing it wrote is applied, and the caller gets
/// the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    message: String,
}

impl Abort {
    /// An abort with `message`, e.g. `"insufficient funds"`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Aborts the transaction at once with `message`; nothing it wrote is applied.
pub fn abort(message: &str) -> ! {
    fail_with(abi::fail::ABORT, message)
}

fn fail_with(kind: i32, message: &str) -> ! {
    backend::fail(kind, message)
}

/// Log levels of [`log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something is odd.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
}

/// Writes `message` to the server log, tagged with the module and procedure.
pub fn log(level: Level, message: &str) {
    let level = match level {
        Level::Error => abi::level::ERROR,
        Level::Warn => abi::level::WARN,
        Level::Info => abi::level::INFO,
        Level::Debug => abi::level::DEBUG,
    };
    backend::log(level, message)
}

/// `info!("moved {} units", amount)`: formats and logs at [`Level::Info`].
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::Level::Info, &$crate::prelude::format!($($arg)*)) };
}

/// Formats and logs at [`Level::Warn`].
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &$crate::prelude::format!($($arg)*)) };
}

/// Formats and logs at [`Level::Error`].
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::Level::Error, &$crate::prelude::format!($($arg)*)) };
}

/// Formats and logs at [`Level::Debug`].
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &$crate::prelude::format!($($arg)*)) };
}

/// Exports a procedure: `procedure!(transfer);` or, with a function that declares its key
/// set from the arguments, `procedure!(transfer, keys = transfer_keys);`.
///
/// The procedure is `fn(&mut Tx, A) -> Result<R, Abort>` with `A: Deserialize` and
/// `R: Serialize`; the key function is `fn(&A, &mut KeySet)` and must be pure: it sees
/// only the arguments, and the server relies on it naming every key the procedure touches
/// (a key outside the set fails the call).
#[macro_export]
macro_rules! procedure {
    ($name:ident) => {
        $crate::__export_procedure!($name);
    };
    ($name:ident, keys = $keys:path) => {
        $crate::__export_procedure!($name);
        $crate::__export_keys!($name, $keys);
    };
}

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
#[macro_export]
macro_rules! __export_procedure {
    ($name:ident) => {
        const _: () = {
            #[unsafe(export_name = concat!("transdb_proc_", stringify!($name)))]
            extern "C" fn export(args_ptr: i32, args_len: i32, format: i32) {
                $crate::__rt::run_procedure(args_ptr, args_len, format, $name)
            }
        };
    };
}

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
#[macro_export]
macro_rules! __export_keys {
    ($name:ident, $keys:path) => {
        const _: () = {
            #[unsafe(export_name = concat!("transdb_keys_", stringify!($name)))]
            extern "C" fn export(args_ptr: i32, args_len: i32, format: i32) {
                $crate::__rt::run_keys(args_ptr, args_len, format, $keys)
            }
        };
    };
}

#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
#[macro_export]
macro_rules! __export_procedure {
    ($name:ident) => {
        // Natively a procedure is called through `testing::MemoryStore`; this only checks
        // that it has the right shape.
        const _: () = {
            let _ = $crate::__rt::check_procedure($name);
        };
    };
}

#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
#[macro_export]
macro_rules! __export_keys {
    ($name:ident, $keys:path) => {
        const _: () = {
            let _ = $crate::__rt::check_keys($name, $keys);
        };
    };
}

/// Glue used by the macros; not a public API.
#[doc(hidden)]
pub mod __rt {
    use super::*;

    /// A procedure's shape.
    pub type Procedure<A, R> = fn(&mut Tx<'_>, A) -> Result<R, Abort>;

    /// Type-checks a procedure (native builds).
    pub const fn check_procedure<A, R>(procedure: Procedure<A, R>) -> Procedure<A, R> {
        procedure
    }

    /// Type-checks a key function against its procedure (native builds).
    pub const fn check_keys<A, R>(
        _procedure: Procedure<A, R>,
        keys: fn(&A, &mut KeySet),
    ) -> fn(&A, &mut KeySet) {
        keys
    }

    /// Decodes arguments in `format`, failing the call if they do not fit `A`.
    pub fn decode<A: DeserializeOwned>(format: i32, bytes: &[u8]) -> A {
        let decoded = match format {
            abi::format::JSON => serde_json::from_slice(bytes).map_err(|error| error.to_string()),
            _ => postcard::from_bytes(bytes).map_err(|error| error.to_string()),
        };
        match decoded {
            Ok(args) => args,
            Err(error) => fail_with(
                abi::fail::INVALID_ARGUMENTS,
                &alloc::format!("invalid arguments: {error}"),
            ),
        }
    }

    /// Encodes a result in `format`.
    pub fn encode<R: Serialize>(format: i32, result: &R) -> Vec<u8> {
        let encoded = match format {
            abi::format::JSON => serde_json::to_vec(result).map_err(|error| error.to_string()),
            _ => postcard::to_allocvec(result).map_err(|error| error.to_string()),
        };
        match encoded {
            Ok(bytes) => bytes,
            Err(error) => fail_with(
                abi::fail::INVALID_RESULT,
                &alloc::format!("cannot encode the result: {error}"),
            ),
        }
    }

    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm::{run_keys, run_procedure};
}
