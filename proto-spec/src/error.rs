//! The one error-code table of the wire protocol.
//!
//! The same numbers are used in three places, so a peer needs only one table:
//! - in [`ErrorResponse`] frames, for requests the server understood and refused;
//! - as the QUIC application error code of a stream the server reset because the peer
//!   broke the framing (a protocol violation);
//! - as the QUIC application error code when the server closes a whole connection.
//!
//! Codes are plain numbers on the wire (a postcard varint), so a client built against an
//! older table still decodes a newer code and can show its number.

use alloc::string::String;
use core::fmt;

use serde::{Deserialize, Serialize};

/// A stable protocol error number. See the table in `SPEC.md` and [`ErrorCode::ALL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $description:literal; )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $name: ErrorCode = ErrorCode($value); )*

            /// Every code this version of the protocol defines, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code's name as written in `SPEC.md`, or `None` for a code this version
            /// does not know (sent by a newer peer).
            pub fn name(self) -> Option<&'static str> {
                match self { $(ErrorCode::$name => Some(stringify!($name)),)* _ => None }
            }

            /// One sentence saying what the code means and what to do about it.
            pub fn description(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $description,)*
                    _ => "unknown error code (the server may be newer than this client: upgrade the client)",
                }
            }
        }
    };
}

error_codes! {
    /// Normal closure of a connection; never sent in an error response.
    NO_ERROR = 0, "no error: the connection was closed normally";
    /// The server failed in a way that is not the request's fault.
    INTERNAL = 1, "internal server error: the request may or may not have been applied; check the server log";
    /// A key is longer than [`crate::limits::MAX_KEY_BYTES`].
    KEY_TOO_LARGE = 2, "the key is longer than MAX_KEY_BYTES (1024 bytes of UTF-8): use a shorter key";
    /// A value is longer than [`crate::limits::MAX_VALUE_BYTES`].
    VALUE_TOO_LARGE = 3, "the value is longer than MAX_VALUE_BYTES (4 MiB): split it across several keys";
    /// A frame's length prefix is over [`crate::limits::MAX_FRAME_BYTES`] (stream reset).
    FRAME_TOO_LARGE = 16, "a frame's length prefix exceeds MAX_FRAME_BYTES; the stream was reset";
    /// A frame's payload is not a valid message (stream reset).
    MALFORMED_FRAME = 17, "a frame's payload is not a valid message of this protocol version; the stream was reset";
    /// The stream ended in the middle of a frame (stream reset).
    TRUNCATED_FRAME = 18, "the stream ended in the middle of a frame; the stream was reset";
    /// The stream made no progress (a frame left half-sent, or a response left unread) for
    /// the server's stream timeout (stream reset).
    STREAM_TIMEOUT = 19, "the stream made no progress for --stream-timeout-secs (a request left half-sent or a response left unread); the stream was reset";
    /// The server is shutting down and accepts no new connections or requests.
    SHUTTING_DOWN = 32, "the server is shutting down: retry against another server or after it restarts";
    /// The server is at its connection limit.
    TOO_MANY_CONNECTIONS = 33, "the server is at its connection limit (--max-connections): retry later or share one connection";
    /// The server has no capacity for the request right now; it did nothing.
    OVERLOADED = 34, "the server is busy (e.g. all --max-concurrent-calls slots are in use, or --max-request-memory is taken by requests in flight); nothing was done: retry shortly";
    /// The connection did not authenticate: no token or certificate, or one the server does
    /// not accept (response, then connection close).
    UNAUTHENTICATED = 35, "not authenticated: the token is missing, wrong or revoked (or no client certificate was accepted); pass one with --token-file, TRANSDB_TOKEN_FILE or TRANSDB_TOKEN";
    /// The connection's role does not allow the request.
    PERMISSION_DENIED = 36, "the connection's role does not allow this request: use a token with a stronger role (transdb token create --role write|admin)";
    /// The store holds its memory limit; writes that could add data are refused.
    STORE_FULL = 37, "the store is full (--max-memory): nothing was written; delete keys (deletes are always accepted) or raise the limit";
    /// A module or procedure name is not 1–64 letters, digits, `_` (and `-` for modules).
    INVALID_NAME = 48, "invalid module or procedure name: use 1 to 64 ASCII letters, digits and _ (modules may also use -), not starting with a digit";
    /// No module of that name is deployed.
    MODULE_NOT_FOUND = 49, "no module of that name is deployed: deploy it first (transdb deploy NAME FILE.wasm) or check `transdb procedures`";
    /// The module has no procedure of that name.
    PROCEDURE_NOT_FOUND = 50, "the module has no procedure of that name: check `transdb procedures`";
    /// The uploaded bytes are not a module this server can run.
    INVALID_MODULE = 51, "the module was refused at deploy: the message says what is wrong";
    /// The module is larger than the server's module size limit.
    MODULE_TOO_LARGE = 52, "the module is larger than --max-module-bytes: build it in release mode with the wasm profile, or raise the limit";
    /// The server holds its maximum number of modules.
    TOO_MANY_MODULES = 53, "the server holds --max-modules modules: replace an existing one or raise the limit";
    /// The procedure aborted the transaction; the message is the procedure's.
    ABORTED = 64, "the procedure aborted the transaction; nothing was written";
    /// The procedure panicked; the message is the panic message.
    GUEST_PANIC = 65, "the procedure panicked; nothing was written";
    /// The procedure used all its fuel (its deterministic CPU limit).
    OUT_OF_FUEL = 66, "the procedure ran out of fuel (--fuel-per-call); nothing was written";
    /// The procedure trapped: memory or stack limit, unreachable, out-of-bounds access, ...
    GUEST_TRAP = 67, "the procedure trapped (a wasm fault or a memory or stack limit); nothing was written";
    /// The arguments did not decode into the procedure's argument type.
    INVALID_ARGUMENTS = 68, "the arguments do not match the procedure's argument type";
    /// The procedure's result is larger than the output limit.
    OUTPUT_TOO_LARGE = 69, "the procedure's result is larger than --max-output-bytes; nothing was written";
    /// The procedure touched a key outside the key set it declared.
    KEY_NOT_DECLARED = 70, "the procedure touched a key its key function did not declare (or wrote a read-only one); nothing was written";
    /// The transaction touches more keys than allowed.
    TOO_MANY_KEYS = 71, "the transaction touches more keys than --max-keys-per-call; nothing was written";
    /// The procedure ran past the wall-clock backstop (a node fault, not the procedure's).
    DEADLINE_EXCEEDED = 72, "the call exceeded the server's wall-clock backstop; nothing was written: the server may be overloaded";
    /// The procedure read a stored value it could not decode.
    INVALID_VALUE = 73, "the procedure read a stored value it could not decode; nothing was written";
    /// The guest called a host function wrongly (bad pointer, bad UTF-8, wrong phase).
        ABI_VIOLATION = 74, "the module broke the host ABI (see ABI.md); nothing was written";
    /// A procedure without a key function kept touching keys its reconnaissance had not seen.
    KEY_SET_UNSTABLE = 75, "the procedure's keys kept changing between reconnaissance and execution; nothing was written: retry, or give it a key function";
    /// An interactive transaction read a key that another transaction wrote after its
    /// snapshot; it was rolled back.
    CONFLICT = 76, "another transaction wrote a key this transaction read, after its snapshot; nothing was written and the transaction is over: retry it from Begin";
    /// Commit or Rollback without an open transaction on the stream.
    NO_TRANSACTION = 77, "there is no open transaction on this stream: send Begin first (each transaction lives on one stream)";
    /// A request that cannot run inside an interactive transaction.
    TRANSACTION_OPEN = 78, "this stream has an open transaction: only Get, Put, Delete, Commit, Rollback and Ping may be sent until it ends";
    /// The transaction sat idle past the server's limit and was rolled back (stream reset).
    TRANSACTION_TIMEOUT = 79, "the transaction was idle longer than --transaction-idle-timeout-ms and was rolled back; nothing was written: retry it, without pauses inside it";
    /// The transaction's buffered writes exceed the server's limit.
    TRANSACTION_TOO_LARGE = 80, "the transaction's writes exceed --max-transaction-bytes; it was rolled back: split it into smaller transactions";
    /// The command log could not be written or fsynced: the transaction's outcome is
    /// unknown, and the server refuses every transaction until it is restarted.
    DURABILITY_FAILED = 81, "the server could not make the transaction durable (its command log failed; see its log): the outcome is unknown; restart the server, which recovers everything durable, then check and retry";
    /// The request needs a data directory that the server does not keep.
    NOT_DURABLE = 82, "the server runs with --durability none and keeps nothing on disk: checkpoints and backups need --durability sync or async";
    /// A directory named in the request cannot be used (e.g. a backup directory that is
    /// not empty).
    INVALID_PATH = 83, "the directory cannot be used: a backup goes to a new or empty directory on the server's machine";
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "ErrorCode({})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A request the server understood and refused, with a message a user can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The stable code, for programs.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people. Never parse it.
    pub message: String,
}

impl ErrorResponse {
    /// An error response with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ErrorResponse {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_sorted_and_named() {
        for pair in ErrorCode::ALL.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{:?} and {:?}", pair[0], pair[1]);
        }
        for code in ErrorCode::ALL {
            assert!(code.name().is_some());
            assert!(!code.description().is_empty());
        }
    }

    #[test]
    fn spec_lists_every_error_code_with_its_number() {
        let spec = include_str!("../SPEC.md");
        for code in ErrorCode::ALL {
            let row = std::format!("| {} | `{}` |", code.0, code.name().unwrap());
            assert!(
                spec.contains(&row),
                "SPEC.md's error table lacks the row starting {row:?}"
            );
        }
    }

    #[test]
    fn unknown_codes_survive_decoding_and_say_so() {
        let code: ErrorCode = postcard::from_bytes(&[0xe7, 0x07]).unwrap();
        assert_eq!(code, ErrorCode(999));
        assert_eq!(code.name(), None);
        assert!(code.description().contains("unknown"));
    }
}
