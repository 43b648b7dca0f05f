//! The messages. Each is one postcard-encoded frame (see [`crate::frame`]).
//!
//! A request stream carries request frames from the client and, for each, exactly one
//! response frame from the server, in order. Variant order is part of the wire format
//! (postcard encodes the variant index): new variants are only ever appended.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;

/// A client's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Read a key; answered with [`Response::Value`].
    Get {
        /// The key, at most [`crate::limits::MAX_KEY_BYTES`] bytes of UTF-8.
        key: String,
    },
    /// Write a key, overwriting any previous value; answered with [`Response::Stored`].
    Put {
        /// The key, at most [`crate::limits::MAX_KEY_BYTES`] bytes of UTF-8.
        key: String,
        /// The value: raw bytes, at most [`crate::limits::MAX_VALUE_BYTES`].
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove a key; idempotent; answered with [`Response::Deleted`].
    Delete {
        /// The key, at most [`crate::limits::MAX_KEY_BYTES`] bytes of UTF-8.
        key: String,
    },
}

/// The server's response to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The request was understood and refused; nothing was changed.
    Error(ErrorResponse),
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::Get`]: the value, or `None` if the key does not exist.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Answer to [`Request::Put`]: the value is stored.
    Stored,
    /// Answer to [`Request::Delete`]: the key no longer exists.
    Deleted {
        /// Whether the key existed before this delete.
        existed: bool,
    },
}
