//! The TransDB server.
//!
//! One node's pipeline, as `DESIGN.md` draws it, and where each stage lives:
//!
//! ```text
//! client ──QUIC──▶ network ──▶ admission ──▶ executor ──▶ store (N shards)
//! ```
//!
//! - `network`: QUIC endpoint, connections, one task per request stream, framing;
//! - [`admission`]: the checks a request passes before it touches state (limits today);
//! - [`executor`]: applies admitted requests to the store and encodes responses;
//! - [`store`]: the sharded in-memory map;
//! - [`server`]: wires the stages together, owns the data directory, shuts down gracefully;
//! - [`identity`]: the TLS certificate and key; [`config`]: settings and named limits;
//! - [`cli`]: the `transdb` command line (server and client).
//!
//! The sequencer, command log, scheduler and transaction manager will sit between
//! admission and the executor.

pub mod admission;
pub mod cli;
pub mod config;
pub mod executor;
pub mod identity;
pub mod lock_manager;
pub(crate) mod network;
pub mod procedures;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod transaction;

pub use config::ServerConfig;
pub use server::Server;
