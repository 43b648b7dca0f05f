//! A running server: the data directory, the QUIC endpoint, the store, and graceful shutdown.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use quinn::{Endpoint, VarInt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transdb_proto::ErrorCode;

use crate::auth::{CertificateRoles, Tokens};
use crate::config::ServerConfig;
use crate::durability::{self, Persistence, Recovery};
use crate::executor::Executor;
use crate::identity::Identity;
use crate::log::Durability;
use crate::network::{self, RequestMemory, Shared};
use crate::procedures::Procedures;
use crate::runtime::Runtime;
use crate::store::Store;

/// File in the data directory that a running server holds an exclusive lock on.
pub const LOCK_FILE: &str = "LOCK";

/// Bytes a connection may have in flight towards the server beyond what the server has
/// read (QUIC's connection-level flow-control window): room for one maximum-size frame and
/// some, so one connection cannot fill the server's memory with data it does not read.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 5 << 20;

/// How long shutdown waits for connections to finish closing after the close is sent.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// A running TransDB server.
///
/// Stop it with [`Server::shutdown`]. Dropping it instead closes every connection at once
/// with `SHUTTING_DOWN`, cutting off requests in flight.
pub struct Server {
    local_addr: SocketAddr,
    certificate_path: PathBuf,
    data_dir: PathBuf,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
    /// The HTTP gateway's address and task, and what stops it, with `--http`.
    http: Option<(SocketAddr, JoinHandle<()>, CancellationToken)>,
    shutdown_grace: Duration,
    recovery: Option<Recovery>,
    checkpoint_task: Option<JoinHandle<()>>,
    _data_dir_lock: File,
}

/// What a graceful shutdown did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Requests still running after the grace period, cut off by the connection close.
    pub abandoned: usize,
}

impl Server {
    /// Opens the data directory, loads or generates the identity, and starts listening.
    /// Must be called inside a Tokio runtime.
    pub async fn start(config: ServerConfig) -> Result<Server> {
        if config.shards == 0 {
            bail!("--shards must be at least 1");
        }
        fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let lock = lock_data_dir(&config.data_dir)?;
        let identity = match &config.certificate_files {
            Some(files) => Identity::load(&files.certificate, &files.key)?,
            None => Identity::load_or_generate(&config.data_dir)?,
        };
        let tokens = Arc::new(Tokens::open(&config.data_dir)?);
        let certificate_roles = CertificateRoles::new(&config.client_cas)?.map(Arc::new);
        let mut server_config = quinn::ServerConfig::with_crypto(
            identity
                .quic_server_config(certificate_roles.as_ref().map(|roles| roles.verifier()))?,
        );
        let mut transport = quinn::TransportConfig::default();
        // One stream until the connection has authenticated (network.rs then raises it to
        // --max-streams-per-connection).
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(1))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
            .max_idle_timeout(Some(
                config
                    .idle_timeout
                    .try_into()
                    .context("--idle-timeout-secs is too large")?,
            ));
        server_config.transport_config(Arc::new(transport));
        let endpoint = Endpoint::server(server_config, config.listen).with_context(|| {
            format!("cannot listen on {}: is another server using that port? choose another with --listen", config.listen)
        })?;
        let local_addr = endpoint.local_addr()?;
        let mut executor = Executor::new(
            Arc::new(Store::new(config.shards)),
            Arc::new(Procedures::new(
                Runtime::new(config.runtime.clone())?,
                config.max_modules,
            )),
            config.max_pending_transactions,
        )
        .with_max_transaction_bytes(config.max_transaction_bytes)
        .with_max_store_bytes(config.max_memory);
        let recovery = if config.durability == Durability::None {
            None
        } else {
            executor = executor.with_persistence(Persistence::new(
                &config.data_dir,
                config.log_archive.clone(),
            ));
            let recovery =
                durability::recover(&executor, config.durability, config.log_segment_bytes)
                    .await
                    .context("recovery failed; the server did not start")?;
            tracing::info!(
                checkpoint = ?recovery.checkpoint,
                checkpoint_keys = recovery.checkpoint_keys,
                replayed = recovery.replayed,
                torn_bytes = recovery.torn_bytes,
                elapsed = ?recovery.elapsed,
                "recovered"
            );
            Some(recovery)
        };
        let shared = Arc::new(Shared {
            executor: Arc::new(executor),
            shutdown: CancellationToken::new(),
            shutdown_requested: CancellationToken::new(),
            streams: TaskTracker::new(),
            max_connections: config.max_connections,
            max_streams_per_connection: config.max_streams_per_connection,
            transaction_idle_timeout: config.transaction_idle_timeout,
            stream_timeout: config.stream_timeout,
            auth_timeout: config.auth_timeout,
            tokens,
            certificate_roles,
            request_memory: Arc::new(RequestMemory::new(config.max_request_memory)),
        });
        let accept_task = tokio::spawn(network::accept_connections(
            endpoint.clone(),
            shared.clone(),
        ));
        let http = match config.http {
            Some(address) => {
                let listener = tokio::net::TcpListener::bind(address).await.with_context(|| {
                    format!("cannot listen for HTTP on {address}: is another program using that port? choose another with --http")
                })?;
                let address = listener.local_addr()?;
                if !address.ip().is_loopback() {
                    tracing::warn!(%address, "the HTTP gateway is plain HTTP on a non-loopback address: tokens cross the network in clear; put a TLS-terminating proxy in front");
                }
                let stop = CancellationToken::new();
                let task = tokio::spawn(crate::http::serve(
                    listener,
                    shared.clone(),
                    config.max_http_requests,
                    stop.clone(),
                ));
                tracing::info!(%address, "HTTP gateway listening");
                Some((address, task, stop))
            }
            None => None,
        };
        let checkpoint_task = recovery
            .as_ref()
            .map(|_| tokio::spawn(checkpoint_policy(shared.clone(), config.clone())));
        tracing::info!(%local_addr, shards = config.shards, data_dir = %config.data_dir.display(), durability = ?config.durability, "listening");
        Ok(Server {
            local_addr,
            certificate_path: identity.certificate_path,
            data_dir: config.data_dir.clone(),
            endpoint,
            shared,
            accept_task,
            http,
            shutdown_grace: config.shutdown_grace,
            recovery,
            checkpoint_task,
            _data_dir_lock: lock,
        })
    }

    /// The HTTP gateway's address, with `--http`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(address, _, _)| *address)
    }

    /// Resolves when an admin has sent `Shutdown`; the owner then calls
    /// [`Server::shutdown`].
    pub async fn shutdown_requested(&self) {
        self.shared.shutdown_requested.cancelled().await;
    }

    /// A client configuration with every right on this server: it trusts the server's
    /// certificate and authenticates with the admin token in the data directory (for
    /// in-process tools and tests).
    pub fn admin_client_config(&self) -> Result<transdb_client::ClientConfig> {
        Ok(
            transdb_client::ClientConfig::from_ca_file(&self.certificate_path)?
                .with_token_file(&self.data_dir.join(crate::auth::ADMIN_TOKEN_FILE))?,
        )
    }

    /// The server's tokens.
    pub fn tokens(&self) -> &Tokens {
        &self.shared.tokens
    }

    /// What recovery did at start (`None` with `--durability none`).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The executor (for in-process tools and tests).
    pub fn executor(&self) -> &Arc<Executor> {
        &self.shared.executor
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's certificate file: what a client trusts for a self-signed identity.
    pub fn certificate_path(&self) -> &Path {
        &self.certificate_path
    }

    /// The store (for inspection in tests and tools).
    pub fn store(&self) -> &Store {
        &self.shared.executor.store
    }

    /// The deployed procedures.
    pub fn procedures(&self) -> &Procedures {
        &self.shared.executor.procedures
    }

    /// Stops accepting connections and streams; returns the number of requests in flight.
    /// Idempotent. [`Server::shutdown`] then waits for them.
    pub fn begin_shutdown(&self) -> usize {
        self.shared.shutdown.cancel();
        self.shared.streams.close();
        self.shared.streams.len()
    }

    /// Graceful shutdown: stops accepting, waits up to the grace period for in-flight
    /// requests to be answered and acknowledged, then closes every connection with
    /// `SHUTTING_DOWN`.
    pub async fn shutdown(mut self) -> ShutdownReport {
        self.begin_shutdown();
        let drained = tokio::time::timeout(self.shutdown_grace, self.shared.streams.wait())
            .await
            .is_ok();
        let abandoned = if drained {
            0
        } else {
            self.shared.streams.len()
        };
        if abandoned > 0 {
            tracing::warn!(abandoned, grace = ?self.shutdown_grace, "requests still running after the grace period");
        }
        if let Some((_, task, stop)) = self.http.take() {
            // Through the grace period it answered 503 and "not ready" (so load balancers
            // see the server leave); now it stops accepting and finishes what it has.
            stop.cancel();
            if tokio::time::timeout(self.shutdown_grace, task)
                .await
                .is_err()
            {
                tracing::warn!("HTTP requests still running after the grace period");
            }
        }
        self.close_connections();
        let _ = tokio::time::timeout(CLOSE_LINGER, self.endpoint.wait_idle()).await;
        let _ = (&mut self.accept_task).await;
        if let Some(task) = self.checkpoint_task.take() {
            task.abort();
        }
        if let Some(log) = self.shared.executor.scheduler.log().cloned() {
            // Writes and fsyncs what is left: everything acknowledged already is.
            let _ = tokio::task::spawn_blocking(move || log.close()).await;
        }
        tracing::info!("stopped");
        ShutdownReport { abandoned }
    }
}

/// Writes a checkpoint when the log has grown by `--checkpoint-log-bytes` since the last
/// one (what a checkpoint leaves is the segment being written), or when
/// `--checkpoint-interval-secs` have passed since the last one and something was logged.
async fn checkpoint_policy(shared: Arc<Shared>, config: ServerConfig) {
    const CHECK_EVERY: Duration = Duration::from_secs(1);
    let executor = &shared.executor;
    let log_dir = config.data_dir.join(crate::log::LOG_DIR);
    let mut last = tokio::time::Instant::now();
    let mut last_position = executor.scheduler.next_position();
    let mut bytes_after_last = 0;
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let grew = executor.scheduler.next_position() > last_position;
        let by_time = !config.checkpoint_interval.is_zero()
            && last.elapsed() >= config.checkpoint_interval
            && grew;
        let log_bytes = {
            let log_dir = log_dir.clone();
            tokio::task::spawn_blocking(move || crate::log::size(&log_dir))
                .await
                .unwrap_or(0)
        };
        let by_size = config.checkpoint_log_bytes > 0
            && log_bytes.saturating_sub(bytes_after_last) >= config.checkpoint_log_bytes;
        if !(by_time || by_size) {
            continue;
        }
        match durability::checkpoint(executor).await {
            Ok(info) => last_position = info.position,
            Err(error) => tracing::error!(error = %error.message, "periodic checkpoint failed"),
        }
        last = tokio::time::Instant::now();
        let log_dir = log_dir.clone();
        bytes_after_last = tokio::task::spawn_blocking(move || crate::log::size(&log_dir))
            .await
            .unwrap_or(0);
    }
}

impl Server {
    fn close_connections(&self) {
        self.endpoint.close(
            VarInt::from(ErrorCode::SHUTTING_DOWN.0),
            b"server shutting down",
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some((_, task, stop)) = &self.http {
            stop.cancel();
            task.abort();
        }
        self.close_connections();
    }
}

/// Takes the data directory's exclusive lock (held while the file stays open).
///
/// # Errors
/// If another server (or restore) holds it.
pub fn lock_data_dir(data_dir: &Path) -> Result<File> {
    let path = data_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another transdb server is using the data directory {}: stop it or choose another --data-dir",
            data_dir.display()
        ),
        Err(fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}
