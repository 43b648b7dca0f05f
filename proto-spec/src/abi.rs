//! Names and numbers of the host ↔ guest ABI, version 1, shared by the server and the guest
//! SDK. `ABI.md` next to this crate is the normative description.

/// The import module every host function lives in. A module importing from another
/// `transdb_vN` was built for another ABI version and is refused at deploy.
pub const IMPORT_MODULE: &str = "transdb_v1";
/// Prefix of import modules of any ABI version (to recognise version mismatches).
pub const IMPORT_MODULE_PREFIX: &str = "transdb_v";

/// Export: the guest's linear memory.
pub const EXPORT_MEMORY: &str = "memory";
/// Export `(len: i32) -> i32`: allocates `len` bytes in the guest for the call's arguments.
pub const EXPORT_ALLOC: &str = "transdb_alloc";
/// Prefix of a procedure export `(args_ptr: i32, args_len: i32, format: i32)`.
pub const EXPORT_PROCEDURE_PREFIX: &str = "transdb_proc_";
/// Prefix of a key-set export `(args_ptr: i32, args_len: i32, format: i32)`.
pub const EXPORT_KEYS_PREFIX: &str = "transdb_keys_";

/// Host function names in [`IMPORT_MODULE`].
pub mod import {
    /// `(key_ptr, key_len, out_ptr, out_cap) -> i64`: value length, or [`super::GET_ABSENT`].
    pub const GET: &str = "get";
    /// `(key_ptr, key_len, value_ptr, value_len)`.
    pub const PUT: &str = "put";
    /// `(key_ptr, key_len) -> i32`: 1 if the key existed, else 0.
    pub const DELETE: &str = "delete";
    /// `(ptr, len)`: sets the call's result bytes.
    pub const OUTPUT: &str = "output";
    /// `(kind, ptr, len)`: ends the call with a failure; never returns.
    pub const FAIL: &str = "fail";
    /// `(level, ptr, len)`: writes a line to the server log.
    pub const LOG: &str = "log";
    /// `(key_ptr, key_len, write)`: adds a key to the key set (only inside a keys export).
    pub const DECLARE_KEY: &str = "declare_key";
}

/// What `get` returns for a key that does not exist.
pub const GET_ABSENT: i64 = -1;

/// Encodings of arguments and results (the `format` parameter).
pub mod format {
    /// postcard.
    pub const POSTCARD: i32 = 0;
    /// JSON (UTF-8).
    pub const JSON: i32 = 1;
}

/// The `kind` of a `fail` call.
pub mod fail {
    /// The procedure aborted the transaction on purpose; the message is for the caller.
    pub const ABORT: i32 = 1;
    /// The guest panicked; the message is the panic message.
    pub const PANIC: i32 = 2;
    /// The arguments could not be decoded into the procedure's argument type.
    pub const INVALID_ARGUMENTS: i32 = 3;
    /// The result could not be encoded.
    pub const INVALID_RESULT: i32 = 4;
    /// The guest read a value it could not decode (e.g. a balance that is not a number).
    pub const INVALID_VALUE: i32 = 5;
}

/// `level` of a `log` call.
pub mod level {
    /// Error.
    pub const ERROR: i32 = 1;
    /// Warning.
    pub const WARN: i32 = 2;
    /// Information.
    pub const INFO: i32 = 3;
    /// Debugging detail.
    pub const DEBUG: i32 = 4;
}

/// Whether `name` is a valid procedure or module name: 1 to 64 ASCII letters, digits or
/// `_`, not starting with a digit (module names may also contain `-`).
pub fn is_valid_name(name: &str, allow_dash: bool) -> bool {
    (1..=64).contains(&name.len())
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|byte| {
            byte.is_ascii_alphanumeric() || byte == b'_' || (allow_dash && byte == b'-')
        })
}
