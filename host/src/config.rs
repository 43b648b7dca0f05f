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
/// Default time a new connection has to authenticate (handshake excluded).
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a stream may make no progress: no request, a frame left half-sent, or a
/// response left unread.
pub const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default budget of request bytes being read or executed, over all connections: a few
/// hundred maximum-size frames, a small share of a server's memory.
pub const DEFAULT_MAX_REQUEST_MEMORY: usize = 1 << 30;
/// Share of the machine's memory the store may fill by default (`--max-memory`).
pub const DEFAULT_MAX_MEMORY_SHARE: f64 = 0.5;

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
    /// TCP address of the HTTP gateway (`--http`), if it is on (port 0 picks a free port).
    pub http: Option<SocketAddr>,
    /// HTTP requests being served at once, at most; beyond, `503` (`--max-http-requests`).
    pub max_http_requests: usize,
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
    /// A new connection that has not authenticated within this long is closed.
    pub auth_timeout: Duration,
    /// A stream that makes no progress for this long is reset with `STREAM_TIMEOUT`.
    pub stream_timeout: Duration,
    /// Bytes of request frames being read or executed at once, over all connections; a
    /// frame beyond it resets its stream with `OVERLOADED`.
    pub max_request_memory: usize,
    /// The store's size limit (`--max-memory`; see [`crate::store::Store::memory_bytes`]):
    /// beyond it, requests that could add data get `STORE_FULL`. `None`: no limit.
    pub max_memory: Option<usize>,
    /// CA certificate files whose client certificates authenticate connections, with the
    /// role each CA grants (`--client-ca ROLE=FILE`).
    pub client_cas: Vec<(transdb_proto::Role, PathBuf)>,
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
            http: None,
            max_http_requests: crate::http::DEFAULT_MAX_HTTP_REQUESTS,
            data_dir: data_dir.into(),
            shards: default_shards(),
            certificate_files: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            stream_timeout: DEFAULT_STREAM_TIMEOUT,
            max_request_memory: DEFAULT_MAX_REQUEST_MEMORY,
            max_memory: default_max_memory(),
            client_cas: Vec::new(),
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

/// Half the machine's memory (`MemTotal` of `/proc/meminfo`); `None` where it cannot be
/// read.
pub fn default_max_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib as f64 * 1024.0 * DEFAULT_MAX_MEMORY_SHARE) as usize)
}

/// Parses a size: a number of bytes, optionally with a unit `K`, `M`, `G`, `T` (or `KiB`,
/// `KB`, ...: all binary, 1K = 1024), e.g. `512MiB`, `4G`; `0` or `unlimited` means no limit.
pub fn parse_size(text: &str) -> Result<Option<usize>, String> {
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: use e.g. 512MiB, 4G or 1073741824"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}: use K, M, G or T"
            ));
        }
    };
    let bytes = number
        .checked_mul(1usize << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    Ok((bytes > 0).then_some(bytes))
}

/// One shard per core.
pub fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1024"), Ok(Some(1024)));
        assert_eq!(parse_size("512MiB"), Ok(Some(512 << 20)));
        assert_eq!(parse_size("4G"), Ok(Some(4 << 30)));
        assert_eq!(parse_size("2 kb"), Ok(Some(2048)));
        assert_eq!(parse_size("0"), Ok(None));
        assert_eq!(parse_size("unlimited"), Ok(None));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("5X").unwrap_err().contains("unknown size unit"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_default_store_limit_is_half_the_memory() {
        let limit = default_max_memory().expect("Linux has /proc/meminfo");
        let total_kib: usize = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(limit, total_kib * 512);
    }
}
