//! The TransDB wire protocol, shared by the server, the clients and (later) the guest SDK.
//!
//! Everything a peer needs to speak TransDB lives here and nowhere else: the ALPN token
//! ([`ALPN`]), the framing ([`frame`]), the messages ([`message`]), the error-code table
//! ([`ErrorCode`]), the limits ([`limits`]) and the stable key → shard hash ([`shard`]).
//! `SPEC.md` next to this crate is the normative description; its hex test vectors are
//! checked against this encoder by the crate's tests, so the two cannot drift apart.
//!
//! The crate is `no_std + alloc` so that WebAssembly guests can share it.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod abi;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod shard;

pub use error::{ErrorCode, ErrorResponse};
pub use message::{Request, Response, Role};

/// The ALPN token of this protocol version. A server refuses a connection that does not
/// offer it; a new incompatible protocol version gets a new token (`transdb/2`, ...).
pub const ALPN: &[u8] = b"transdb/1";
