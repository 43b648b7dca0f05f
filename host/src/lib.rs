//! The TransDB server.
//!
//! One node's pipeline, as `DESIGN.md` draws it, and where each stage lives:
//!
//! ```text
//! client ──QUIC──▶ network ──▶ admission ──▶ executor ──▶ scheduler ──▶ store (N shards)
//!                                               └─▶ procedures ─▶ runtime (wasm)
//! ```
//!
//! - `network`: QUIC endpoint, connections, one task per request stream, framing;
//! - [`admission`]: the checks a request passes before it touches state (its role, limits,
//!   the store's memory limit);
//! - [`executor`]: runs admitted requests as transactions and encodes responses;
//! - [`sequencer`]: adaptive batches of transactions, each ordered in one step;
//! - [`scheduler`] and [`lock_manager`]: a position in one total order per transaction, and
//!   deterministic first-come-first-served key locks in that order;
//! - [`transaction`]: the write buffer of a multi-key transaction;
//! - [`interactive`]: interactive transactions (snapshot reads, validated commit);
//! - [`two_phase`]: two-phase commit state machines (multi-shard commits);
//! - [`procedures`] and [`runtime`]: deployed modules and the wasmtime runtime;
//! - [`store`]: the sharded in-memory map;
//! - [`server`]: wires the stages together, owns the data directory, shuts down gracefully;
//! - [`identity`]: the TLS certificate and key; [`auth`]: tokens, client certificates and
//!   roles; [`config`]: settings and named limits;
//! - [`cli`]: the `transdb` command line (server and client);
//! - [`shell`]: `transdb shell`, an interactive shell with line editing and history;
//! - [`metrics`]: what the server counts, for `Stats` and `GET /metrics`;
//! - [`http`]: the HTTP gateway (`transdb serve --http`): keys, calls, metrics, health;
//! - [`bench`](mod@bench) and [`stress`]: `transdb bench` (a load generator) and `transdb stress` (a
//!   load generator that checks correctness while it runs).
//!
//! The sequencer and command log will supply the positions the scheduler hands out today.

pub mod admission;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod durability;
pub mod executor;
pub mod http;
pub mod identity;
pub mod interactive;
pub mod lock_manager;
pub mod log;
pub mod metrics;
pub(crate) mod network;
pub mod procedures;
pub mod replay;
pub mod runtime;
pub mod scheduler;
pub mod sequencer;
pub mod server;
pub mod shell;
pub mod store;
pub mod stress;
pub mod transaction;
pub mod two_phase;

/// `bytes` in lowercase hex (versions, digests, token parts, the state hash).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub use config::ServerConfig;
pub use server::Server;
