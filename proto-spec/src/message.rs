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
use alloc::string::String;
use alloc::vec::Vec;

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
    /// Install a WebAssembly module under `name`, replacing any module of that name;
    /// answered with [`Response::Deployed`].
    Deploy {
        /// Module name: 1–64 ASCII letters, digits, `_` or `-`, not starting with a digit.
        #[serde(borrow)]
        name: Cow<'a, str>,
        /// The module's bytes (a `.wasm` file).
        #[serde(borrow, with = "serde_bytes")]
        module: Cow<'a, [u8]>,
    },
    /// Run a procedure as one transaction; answered with [`Response::Output`].
    Call {
        /// Module name.
        #[serde(borrow)]
        module: Cow<'a, str>,
        /// Procedure name.
        #[serde(borrow)]
        procedure: Cow<'a, str>,
        /// How `args` and the result are encoded.
        encoding: Encoding,
        /// The arguments, at most [`crate::limits::MAX_VALUE_BYTES`].
        #[serde(borrow, with = "serde_bytes")]
        args: Cow<'a, [u8]>,
    },
    /// List the deployed modules; answered with [`Response::Modules`].
    ListModules,
    /// The server's statistics and the hash of its state; answered with [`Response::Stats`].
    Stats,
    /// Several writes as one atomic transaction, applied in order (a later write to the
    /// same key wins); answered with [`Response::Batched`].
    Batch {
        /// The writes, at most [`crate::limits::MAX_BATCH_OPS`].
        #[serde(borrow)]
        ops: Vec<BatchOp<'a>>,
    },
    /// Open an interactive transaction on this stream; answered with [`Response::Begun`].
    /// Until [`Request::Commit`] or [`Request::Rollback`], the stream's `Get`, `Put` and
    /// `Delete` belong to the transaction: reads see a consistent snapshot taken here (plus
    /// the transaction's own writes), writes are buffered in the server. Ending the stream,
    /// or losing the connection, rolls it back.
    Begin,
    /// Commit the stream's transaction; answered with [`Response::Committed`], or with a
    /// `CONFLICT` error (nothing written, retry the whole transaction) if a key it read was
    /// written by another transaction since its snapshot.
    Commit,
    /// Roll the stream's transaction back; answered with [`Response::RolledBack`].
    Rollback,
    /// Write a checkpoint of the state into the server's data directory now, without
    /// stopping traffic, and drop the log it covers; answered with
    /// [`Response::Checkpointed`] (`NOT_DURABLE` with `--durability none`).
    Checkpoint,
    /// Write a consistent copy of the state (a checkpoint and the modules it names) into
    /// `dir`, a new or empty directory on the server's machine; answered with
    /// [`Response::Checkpointed`].
    Backup {
        /// The directory, as the server's file system names it.
        #[serde(borrow)]
        dir: Cow<'a, str>,
    },
    /// Authenticate the connection; must be the first request on a connection (see
    /// `SPEC.md`, "Authentication"); answered with [`Response::Authenticated`].
    Authenticate {
        /// A bearer token (`tdb_...`); `None` if the connection presented a client
        /// certificate instead.
        #[serde(borrow)]
        token: Option<Cow<'a, str>>,
    },
    /// Create a token with `role` (admin only); answered with [`Response::TokenCreated`].
    CreateToken {
        /// A label for people (1–64 ASCII letters, digits, `_`, `-`, `.`, `@`).
        #[serde(borrow)]
        name: Cow<'a, str>,
        /// What the token may do.
        role: Role,
    },
    /// Revoke the token with this id (admin only); answered with [`Response::TokenRevoked`].
    /// Connections authenticated with it are closed.
    RevokeToken {
        /// The token's id, as listed by [`Request::ListTokens`].
        #[serde(borrow)]
        id: Cow<'a, str>,
    },
    /// List the tokens (admin only), never their secrets; answered with
    /// [`Response::Tokens`].
    ListTokens,
    /// Shut the server down gracefully (admin only); answered with
    /// [`Response::ShuttingDown`] before the server stops accepting requests.
    Shutdown,
    /// Remove the module `name` (admin only); answered with [`Response::Undeployed`].
    /// Ordered like a deploy: calls ordered before it run, calls after it find no module.
    Undeploy {
        /// Module name.
        #[serde(borrow)]
        name: Cow<'a, str>,
    },
}

/// What a connection may do. Each role may do everything the roles before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads: `Get`, `Stats`, `ListModules`, interactive transactions that only read, and
    /// calls of procedures that write nothing.
    Read,
    /// Reads and writes: also `Put`, `Delete`, `Batch`, any `Call`, and interactive
    /// transactions that write.
    Write,
    /// Everything: also `Deploy`, `Undeploy`, `Checkpoint`, `Backup`, token management and
    /// `Shutdown`.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    /// The role's name: `read`, `write` or `admin`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    /// The role named `name` (as [`Role::name`] writes it).
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

impl core::fmt::Display for Role {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A token, as listed (the secret is never shown again after creation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id: 16 lowercase hex digits, also the token's second part.
    pub id: String,
    /// Its label.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was created, in seconds since the Unix epoch.
    pub created_unix_secs: u64,
}

/// One write of a [`Request::Batch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOp<'a> {
    /// Set `key` to `value`.
    Put {
        /// The key.
        #[serde(borrow)]
        key: Cow<'a, str>,
        /// The value.
        #[serde(borrow, with = "serde_bytes")]
        value: Cow<'a, [u8]>,
    },
    /// Remove `key` (idempotent).
    Delete {
        /// The key.
        #[serde(borrow)]
        key: Cow<'a, str>,
    },
}

impl BatchOp<'_> {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }

    /// The same operation, owning its data.
    pub fn into_owned(self) -> BatchOp<'static> {
        match self {
            BatchOp::Put { key, value } => BatchOp::Put {
                key: Cow::Owned(key.into_owned()),
                value: Cow::Owned(value.into_owned()),
            },
            BatchOp::Delete { key } => BatchOp::Delete {
                key: Cow::Owned(key.into_owned()),
            },
        }
    }
}

/// Encoding of a call's arguments and result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// postcard (what the Rust client uses).
    Postcard,
    /// JSON text (what the CLI and scripts use).
    Json,
}

/// A deployed module, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Module name.
    pub name: String,
    /// Version: SHA-256 of the module's bytes, in hex.
    pub version: String,
    /// Size of the module, in bytes.
    pub size_bytes: u64,
    /// Its procedures, by name.
    pub procedures: Vec<ProcedureInfo>,
}

/// A procedure of a deployed module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcedureInfo {
    /// Procedure name.
    pub name: String,
    /// Whether it declares its key set from its arguments (a key function).
    pub declares_keys: bool,
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
    /// Answer to [`Request::Deploy`]: the module is installed.
    Deployed(ModuleInfo),
    /// Answer to [`Request::Call`]: the transaction committed; the procedure's result in the
    /// call's encoding.
    Output(#[serde(borrow, with = "serde_bytes")] Cow<'a, [u8]>),
    /// Answer to [`Request::ListModules`].
    Modules(Vec<ModuleInfo>),
    /// Answer to [`Request::Stats`].
    Stats(ServerStats),
    /// Answer to [`Request::Batch`]: every write was applied, atomically.
    Batched {
        /// Number of writes applied.
        ops: u64,
    },
    /// Answer to [`Request::Begin`]: the transaction is open.
    Begun {
        /// The snapshot's position: reads see every transaction ordered before it.
        snapshot: u64,
    },
    /// Answer to [`Request::Commit`]: every write of the transaction was applied, atomically.
    Committed {
        /// The transaction's position in the total order (its snapshot position if it
        /// wrote nothing: a read-only transaction is serialized at its snapshot).
        position: u64,
    },
    /// Answer to [`Request::Rollback`]: the transaction ended; nothing was written.
    RolledBack,
    /// Answer to [`Request::Checkpoint`] and [`Request::Backup`]: what was written.
    Checkpointed(CheckpointInfo),
    /// Answer to [`Request::Authenticate`]: the connection may now send requests its
    /// role allows.
    Authenticated {
        /// The connection's role.
        role: Role,
    },
    /// Answer to [`Request::CreateToken`]: the token, shown this once.
    TokenCreated {
        /// The whole token (`tdb_<id>_<secret>`): store it now; the server keeps only a hash.
        token: String,
        /// Its listing.
        info: TokenInfo,
    },
    /// Answer to [`Request::RevokeToken`].
    TokenRevoked {
        /// Whether a token of that id existed.
        existed: bool,
    },
    /// Answer to [`Request::ListTokens`], by id.
    Tokens(Vec<TokenInfo>),
    /// Answer to [`Request::Shutdown`]: the server stops accepting connections and
    /// requests, answers those in flight, and exits.
    ShuttingDown,
    /// Answer to [`Request::Undeploy`].
    Undeployed {
        /// Whether a module of that name was deployed.
        existed: bool,
    },
}

/// What a checkpoint or backup wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// It holds the state after every transaction ordered below this position.
    pub position: u64,
    /// Keys in it.
    pub keys: u64,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its file on the server's machine.
    pub path: String,
}

/// What [`Request::Stats`] returns. Taken as one transaction that holds every lock, so the
/// state hash is that of a consistent state at `position`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStats {
    /// The position of this statistics transaction in the server's total order: how many
    /// transactions were ordered before it since the server started.
    pub position: u64,
    /// SHA-256, in hex, of every key and value in key order (see `SPEC.md`): equal states
    /// have equal hashes, whatever their shard count or history.
    pub state_hash: String,
    /// Keys and bytes (of keys and values) per shard.
    pub shards: Vec<ShardStats>,
    /// Deployed modules.
    pub modules: u64,
    /// Open connections (authenticated or not).
    pub connections: u64,
    /// Connections refused with `UNAUTHENTICATED` since the server started: a missing,
    /// wrong or revoked token, no accepted certificate, or no `Authenticate` in time. (A
    /// client certificate from an unknown CA fails the TLS handshake before this point.)
    pub auth_failures: u64,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// What the store and the process hold.
    pub memory: MemoryStats,
    /// How far the command log has made the order durable.
    pub log: LogStats,
    /// Requests answered since the server started, by kind (kinds never asked are left
    /// out), in request-number order.
    pub requests: Vec<RequestStats>,
    /// Error answers since the server started, by code (codes never answered are left out),
    /// in code order: aborts and refusals by reason.
    pub errors: Vec<ErrorStats>,
    /// Calls per procedure since the server started, by module and procedure name.
    pub procedures: Vec<ProcedureStats>,
}

/// Memory, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// What `--max-memory` counts: keys and values plus a fixed overhead per key.
    pub store_bytes: u64,
    /// `--max-memory`, if there is a limit.
    pub store_limit: Option<u64>,
    /// The server process's resident memory, where the platform reports it (Linux).
    pub process_resident: Option<u64>,
}

/// The command log's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// The next position the order will give out.
    pub next_position: u64,
    /// Every position below this one is durable; `None` with `--durability none` (no log).
    pub durable_position: Option<u64>,
    /// Positions ordered and not yet durable (`next_position - durable_position`; 0 without
    /// a log): how far durability lags behind the order.
    pub durability_lag: u64,
}

/// Latency percentiles in microseconds, from a histogram whose buckets are within 12.5 %
/// of each other: each figure is the upper end of its bucket, never above the maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// The slowest.
    pub max_us: u64,
}

/// Requests of one kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestStats {
    /// The request's name, as in `SPEC.md` (`Get`, `Call`, ...).
    pub kind: String,
    /// Answered.
    pub count: u64,
    /// Answered with an error.
    pub errors: u64,
    /// From the request's arrival to its answer being ready (lock waits and durability
    /// included, network excluded).
    pub latency: Latency,
}

/// Answers with one error code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorStats {
    /// The code.
    pub code: u16,
    /// Its name in `SPEC.md` (`CONFLICT`, `ABORTED`, ...); empty for a code this version
    /// does not know.
    pub name: String,
    /// How many.
    pub count: u64,
}

/// Calls of one procedure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcedureStats {
    /// The module.
    pub module: String,
    /// The procedure.
    pub procedure: String,
    /// Calls answered.
    pub calls: u64,
    /// Calls answered with an error (aborts, out of fuel, refusals).
    pub errors: u64,
    /// Fuel (wasm instructions, roughly) the calls used: key functions and runs (not the
    /// reconnaissance runs of procedures without a key function).
    pub fuel_used: u64,
    /// From arrival to answer.
    pub latency: Latency,
}

/// Keys and bytes of one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Number of keys.
    pub keys: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
}

impl Request<'_> {
    /// Every request's name, by request number (see [`Request::number`]).
    pub const KINDS: [&'static str; 20] = [
        "Ping",
        "Get",
        "Put",
        "Delete",
        "Deploy",
        "Call",
        "ListModules",
        "Stats",
        "Batch",
        "Begin",
        "Commit",
        "Rollback",
        "Checkpoint",
        "Backup",
        "Authenticate",
        "CreateToken",
        "RevokeToken",
        "ListTokens",
        "Shutdown",
        "Undeploy",
    ];

    /// The variant's number on the wire (the table in `SPEC.md`).
    pub fn number(&self) -> usize {
        match self {
            Request::Ping => 0,
            Request::Get { .. } => 1,
            Request::Put { .. } => 2,
            Request::Delete { .. } => 3,
            Request::Deploy { .. } => 4,
            Request::Call { .. } => 5,
            Request::ListModules => 6,
            Request::Stats => 7,
            Request::Batch { .. } => 8,
            Request::Begin => 9,
            Request::Commit => 10,
            Request::Rollback => 11,
            Request::Checkpoint => 12,
            Request::Backup { .. } => 13,
            Request::Authenticate { .. } => 14,
            Request::CreateToken { .. } => 15,
            Request::RevokeToken { .. } => 16,
            Request::ListTokens => 17,
            Request::Shutdown => 18,
            Request::Undeploy { .. } => 19,
        }
    }

    /// The variant's name, for messages (never print a request: it may carry megabytes).
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.number()]
    }

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
            Request::Deploy { name, module } => Request::Deploy {
                name: Cow::Owned(name.into_owned()),
                module: Cow::Owned(module.into_owned()),
            },
            Request::Call {
                module,
                procedure,
                encoding,
                args,
            } => Request::Call {
                module: Cow::Owned(module.into_owned()),
                procedure: Cow::Owned(procedure.into_owned()),
                encoding,
                args: Cow::Owned(args.into_owned()),
            },
            Request::ListModules => Request::ListModules,
            Request::Stats => Request::Stats,
            Request::Batch { ops } => Request::Batch {
                ops: ops.into_iter().map(BatchOp::into_owned).collect(),
            },
            Request::Begin => Request::Begin,
            Request::Commit => Request::Commit,
            Request::Rollback => Request::Rollback,
            Request::Checkpoint => Request::Checkpoint,
            Request::Backup { dir } => Request::Backup {
                dir: Cow::Owned(dir.into_owned()),
            },
            Request::Authenticate { token } => Request::Authenticate {
                token: token.map(|token| Cow::Owned(token.into_owned())),
            },
            Request::CreateToken { name, role } => Request::CreateToken {
                name: Cow::Owned(name.into_owned()),
                role,
            },
            Request::RevokeToken { id } => Request::RevokeToken {
                id: Cow::Owned(id.into_owned()),
            },
            Request::ListTokens => Request::ListTokens,
            Request::Shutdown => Request::Shutdown,
            Request::Undeploy { name } => Request::Undeploy {
                name: Cow::Owned(name.into_owned()),
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
            Response::Deployed(info) => Response::Deployed(info),
            Response::Output(output) => Response::Output(Cow::Owned(output.into_owned())),
            Response::Modules(modules) => Response::Modules(modules),
            Response::Stats(stats) => Response::Stats(stats),
            Response::Batched { ops } => Response::Batched { ops },
            Response::Begun { snapshot } => Response::Begun { snapshot },
            Response::Committed { position } => Response::Committed { position },
            Response::RolledBack => Response::RolledBack,
            Response::Checkpointed(info) => Response::Checkpointed(info),
            Response::Authenticated { role } => Response::Authenticated { role },
            Response::TokenCreated { token, info } => Response::TokenCreated { token, info },
            Response::TokenRevoked { existed } => Response::TokenRevoked { existed },
            Response::Tokens(tokens) => Response::Tokens(tokens),
            Response::ShuttingDown => Response::ShuttingDown,
            Response::Undeployed { existed } => Response::Undeployed { existed },
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
            Response::Deployed(_) => "Deployed",
            Response::Output(_) => "Output",
            Response::Modules(_) => "Modules",
            Response::Stats(_) => "Stats",
            Response::Batched { .. } => "Batched",
            Response::Begun { .. } => "Begun",
            Response::Committed { .. } => "Committed",
            Response::RolledBack => "RolledBack",
            Response::Checkpointed(_) => "Checkpointed",
            Response::Authenticated { .. } => "Authenticated",
            Response::TokenCreated { .. } => "TokenCreated",
            Response::TokenRevoked { .. } => "TokenRevoked",
            Response::Tokens(_) => "Tokens",
            Response::ShuttingDown => "ShuttingDown",
            Response::Undeployed { .. } => "Undeployed",
        }
    }
}
