//! The messages. Each is one postcard-encoded frame (see [`crate::frame`]).
//!
//! A request stream carries request frames from the client and, for each, exactly one
//! response frame from the server, in order. Variant order is part of the wire format
//! (postcard encodes the variant index): new variants are only ever appended.
//!
//! Strings and byte strings are `Cow`s: a receiver decodes them borrowed from the frame
//! buffer (no allocation for a `Get`'s key), a sender encodes them from borrowed data (no copy
//! of a value before it is framed), and [`Request::into_owned`] makes a request that
//! outlives its frame.

use alloc::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;

/// A client's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Read a key; answered with [`Response::Value`].
    Get {
        /// The key, at most [`crate::limits::MAX_KEY_BYTES`] bytes of UTF-8.
        #[serde(borrow)]
        key: Cow<'a, str>,
    },
    /// Write a key, overwriting any previous value; answered with [`Response::Stored`].
    Put {
        /// The key, at most [`crate::limits::MAX_KEY_BYTES`] bytes of UTF-8.
        #[serde(borrow)]
        key: Cow<'a, str>,
        /// The value: raw bytes, at most [`crate::limits::MAX_VALUE_BYTES`].
        #[serde(borrow, with = "serde_bytes")]
        value: Cow<'a, [u8]>,
    },
    /// Remove a key; idempotent; answered with [`Response::Deleted`].
    Delete {
        /// The key, at most [`crate::limits::MAX_KEY_BYTES`] bytes of UTF-8.
        #[serde(borrow)]
        key: Cow<'a, str>,
    },
}

/// The server's response to one [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response<'a> {
    /// The request was understood and refused; nothing was changed.
    Error(ErrorResponse),
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::Get`]: the value, or `None` if the key does not exist.
    Value(#[serde(borrow, with = "serde_bytes")] Option<Cow<'a, [u8]>>),
    /// Answer to [`Request::Put`]: the value is stored.
    Stored,
    /// Answer to [`Request::Delete`]: the key no longer exists.
    Deleted {
        /// Whether the key existed before this delete.
        existed: bool,
    },
}

impl Request<'_> {
    /// The same request, owning its data.
    pub fn into_owned(self) -> Request<'static> {
        match self {
            Request::Ping => Request::Ping,
            Request::Get { key } => Request::Get {
                key: Cow::Owned(key.into_owned()),
            },
            Request::Put { key, value } => Request::Put {
                key: Cow::Owned(key.into_owned()),
                value: Cow::Owned(value.into_owned()),
            },
            Request::Delete { key } => Request::Delete {
                key: Cow::Owned(key.into_owned()),
            },
        }
    }
}

impl Response<'_> {
    /// The same response, owning its data.
    pub fn into_owned(self) -> Response<'static> {
        match self {
            Response::Error(error) => Response::Error(error),
            Response::Pong => Response::Pong,
            Response::Value(value) => {
                Response::Value(value.map(|value| Cow::Owned(value.into_owned())))
            }
            Response::Stored => Response::Stored,
            Response::Deleted { existed } => Response::Deleted { existed },
        }
    }

    /// The variant's name, for messages (a `Value` may be megabytes long: never print it).
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Error(_) => "Error",
            Response::Pong => "Pong",
            Response::Value(_) => "Value",
            Response::Stored => "Stored",
            Response::Deleted { .. } => "Deleted",
        }
    }
}
