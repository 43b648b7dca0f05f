//! Server configuration and its named limits. Defaults are the embedded defaults of
//! `transdb serve`; every field has a flag of the same name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::log::Durability;
use crate::runtime::RuntimeLimits;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "transdb-data";
/// Default connection limit: enough for many application instances, small enough that the
/// per-connection buffers stay in the low hundreds of megabytes in the worst case.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default limit of concurrently open request streams per connection (QUIC flow control
/// enforces it). 1,024 in flight saturates the server from one connection.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Default time a silent connection lives. Clients send keep-alives well within it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time shutdown waits for in-flight requests before closing connections anyway.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// TLS certificate and key files given by the operator.
#[derive(Clone, Debug)]
pub struct CertificateFiles {
    /// Certificate chain, PEM or DER.
    pub certificate: PathBuf,
    /// Private key, PEM or DER.
    pub key: PathBuf,
}

/// How one server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// UDP address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Directory for the server's files; created if missing.
    pub data_dir: PathBuf,
    /// Number of shards.
    pub shards: usize,
    /// Certificate and key; `None` uses (and on first start generates) a self-signed one
    /// in `data_dir`.
    pub certificate_files: Option<CertificateFiles>,
    /// Connections beyond this are closed with `TOO_MANY_CONNECTIONS`.
    pub max_connections: usize,
    /// Concurrently open request streams per connection.
    pub max_streams_per_connection: u32,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Shutdown waits at most this long for in-flight requests.
    pub shutdown_grace: Duration,
    /// Limits of procedure calls and modules.
    pub runtime: RuntimeLimits,
    /// Deployed modules at most.
    pub max_modules: usize,
    /// Transactions ordered and unfinished at most; beyond, new ones get `OVERLOADED`.
    pub max_pending_transactions: usize,
    /// An interactive transaction silent for this long is rolled back.
    pub transaction_idle_timeout: Duration,
    /// Bytes of writes an interactive transaction may buffer.
    pub max_transaction_bytes: usize,
    /// What a reply promises about a crash: the command log's mode.
    pub durability: Durability,
    /// A new log segment is started past this size.
    pub log_segment_bytes: u64,
    /// Log segments a checkpoint covers are moved here instead of removed.
    pub log_archive: Option<PathBuf>,
    /// A checkpoint is written this long after the last one, if anything was logged
    /// meanwhile (zero: never on a timer).
    pub checkpoint_interval: Duration,
    /// A checkpoint is written once the log holds this many bytes (zero: never on size).
    pub checkpoint_log_bytes: u64,
}

impl ServerConfig {
    /// The embedded defaults, with files in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: data_dir.into(),
            shards: default_shards(),
            certificate_files: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            runtime: RuntimeLimits::default(),
            max_modules: crate::procedures::DEFAULT_MAX_MODULES,
            max_pending_transactions: crate::scheduler::DEFAULT_MAX_PENDING_TRANSACTIONS,
            transaction_idle_timeout: crate::interactive::DEFAULT_TRANSACTION_IDLE_TIMEOUT,
            max_transaction_bytes: crate::interactive::DEFAULT_MAX_TRANSACTION_BYTES,
            durability: Durability::Sync,
            log_segment_bytes: crate::log::DEFAULT_SEGMENT_BYTES,
            log_archive: None,
            checkpoint_interval: crate::durability::DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_log_bytes: crate::durability::DEFAULT_CHECKPOINT_LOG_BYTES,
        }
    }
}

/// One shard per core.
pub fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
