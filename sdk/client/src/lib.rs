//! The async Rust client of TransDB.
//!
//! ```no_run
//! # async fn demo() -> Result<(), transdb_client::Error> {
//! use transdb_client::{Client, ClientConfig};
//! let config = ClientConfig::from_ca_file("transdb-data/cert.pem".as_ref())?;
//! let client = Client::connect("127.0.0.1:7878", config).await?;
//! client.put("greeting", b"hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```
//!
//! One [`Client`] holds one QUIC connection; clones share it, and every request runs on a
//! stream of its own, so any number of requests can be in flight at once from any number of
//! tasks. If the connection is lost, the next request reconnects. A request that was already
//! sent when the connection broke fails with [`Error::ConnectionLost`]: the client cannot know
//! whether the server applied it, so it does not retry it behind your back.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, ReadError, RecvStream, SendStream, WriteError};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use transdb_proto::message::Encoding;
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, frame, limits};

pub use transdb_proto::message::{
    BatchOp, CheckpointInfo, ErrorStats, Latency, LogStats, MemoryStats, ModuleInfo, ProcedureInfo,
    ProcedureStats, RequestStats, Role, ServerStats, ShardStats, TokenInfo,
};

pub mod tls;
pub mod wire;

use wire::{FrameReader, ReadFrameError};

/// The longest [`Client::close`] waits for the close to reach the server.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Everything that can go wrong for a client. Errors a server sends keep their stable code.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// The client's own configuration is unusable (certificate file, address, ...).
    #[error("client configuration: {0}")]
    Config(String),
    /// No connection could be made; nothing was sent.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// What failed, with a hint where one helps.
        reason: String,
    },
    /// The connection broke while the request was under way: it may or may not have been
    /// applied. The next request reconnects.
    #[error(
        "connection to the server lost: {reason}; the request may or may not have been applied"
    )]
    ConnectionLost {
        /// The code the server closed the connection with, if it closed it deliberately.
        code: Option<ErrorCode>,
        /// What happened.
        reason: String,
    },
    /// The server understood the request and refused it; nothing was changed.
    #[error("{0}")]
    Rejected(ErrorResponse),
    /// The server reset the request's stream because the request broke the protocol.
    #[error("the server reset the request: {code}: {}", code.description())]
    StreamReset {
        /// The reset's error code.
        code: ErrorCode,
    },
    /// The server's answer broke the protocol (a version mismatch or a bug).
    #[error("protocol error in the server's response: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether running the same operation again may succeed: the server was busy, or an
    /// interactive transaction conflicted or timed out (run all of it again), or a
    /// procedure's key set kept moving. Nothing was applied in any of these cases.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::OVERLOADED
                    | ErrorCode::CONFLICT
                    | ErrorCode::TRANSACTION_TIMEOUT
                    | ErrorCode::KEY_SET_UNSTABLE
            )
        )
    }

    /// The protocol error code behind this error, if there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Rejected(response) => Some(response.code),
            Error::StreamReset { code } => Some(*code),
            Error::ConnectionLost { code, .. } => *code,
            _ => None,
        }
    }
}

/// How a [`Client`] connects.
#[derive(Clone)]
pub struct ClientConfig {
    /// Certificates to trust: the server's own self-signed certificate or the CA that issued
    /// it. There is no way to trust any certificate.
    pub trusted_certificates: Vec<CertificateDer<'static>>,
    /// The name to verify the server's certificate against; by default the host of the
    /// address given to [`Client::connect`] (an IP address or a DNS name).
    pub server_name: Option<String>,
    /// The bearer token the connection authenticates with (`tdb_...`). A server always
    /// asks for one, unless [`ClientConfig::client_identity`] is a certificate it accepts.
    pub token: Option<String>,
    /// A client certificate and its key, for servers that accept certificates (`--client-ca`).
    pub client_identity: Option<ClientIdentity>,
    /// How long to wait for the QUIC handshake, and then for the answer to authentication.
    pub connect_timeout: Duration,
    /// How often to send keep-alives on an idle connection.
    pub keep_alive_interval: Duration,
    /// How long a silent connection lives (the smaller of this and the server's applies).
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("trusted_certificates", &self.trusted_certificates.len())
            .field("server_name", &self.server_name)
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("client_identity", &self.client_identity)
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

/// A client certificate chain and its private key (mutual TLS).
#[derive(Clone)]
pub struct ClientIdentity {
    /// The chain, leaf first.
    pub certificates: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.certificates.len())
            .field("key", &"<secret>")
            .finish()
    }
}

impl ClientIdentity {
    /// Loads a certificate chain and its private key (PEM or DER each).
    pub fn load(certificate: &Path, key: &Path) -> Result<Self, Error> {
        Ok(Self {
            certificates: tls::load_certificates(certificate)?,
            key: Arc::new(tls::load_private_key(key)?),
        })
    }
}

impl ClientConfig {
    /// Trusts exactly `certificates`; no token.
    pub fn trusting(certificates: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trusted_certificates: certificates,
            server_name: None,
            token: None,
            client_identity: None,
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// Trusts the certificates in a PEM or DER file, e.g. `transdb-data/cert.pem`; no token.
    pub fn from_ca_file(path: &Path) -> Result<Self, Error> {
        Ok(Self::trusting(tls::load_certificates(path)?))
    }

    /// What a client on the server's own machine uses: trusts the server's generated
    /// certificate in `data_dir` and authenticates with the admin token the server wrote
    /// there on first start (`cert.pem`, `admin.token`).
    pub fn for_data_dir(data_dir: &Path) -> Result<Self, Error> {
        Self::from_ca_file(&data_dir.join("cert.pem"))?
            .with_token_file(&data_dir.join(ADMIN_TOKEN_FILE))
    }

    /// Authenticates with `token`.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Authenticates with the token in `path` (surrounding whitespace is ignored).
    pub fn with_token_file(self, path: &Path) -> Result<Self, Error> {
        Ok(self.with_token(read_token_file(path)?))
    }
}

/// File name of the admin token a server writes into its data directory on first start.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Reads a token file: the token, with surrounding whitespace removed.
///
/// # Errors
/// [`Error::Config`] naming the file if it cannot be read or holds no token.
pub fn read_token_file(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        Error::Config(format!(
            "cannot read token file {}: {error}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::Config(format!(
            "token file {} is empty: it should hold one token (tdb_...)",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// A connection to a TransDB server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    addr: SocketAddr,
    server_name: String,
    connect_timeout: Duration,
    token: Option<String>,
    role: Role,
    connection: parking_lot::Mutex<Connection>,
    /// Serialises reconnects so that concurrent requests on a dead connection make one.
    reconnecting: tokio::sync::Mutex<()>,
}

impl Client {
    /// Connects to the server at `addr` (`host:port`, resolved if it is a name).
    pub async fn connect(addr: &str, config: ClientConfig) -> Result<Client, Error> {
        let (socket_addr, host) = resolve(addr).await?;
        let server_name = config.server_name.clone().unwrap_or(host);
        let bind: SocketAddr = if socket_addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .expect("literal address");
        let mut endpoint = Endpoint::client(bind)
            .map_err(|error| Error::Config(format!("cannot open a UDP socket: {error}")))?;
        endpoint.set_default_client_config(tls::quinn_client_config(
            &config.trusted_certificates,
            config.client_identity.as_ref(),
            config.keep_alive_interval,
            config.idle_timeout,
        )?);
        let (connection, role) = open_connection(
            &endpoint,
            socket_addr,
            &server_name,
            config.connect_timeout,
            config.token.as_deref(),
        )
        .await?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                addr: socket_addr,
                server_name,
                connect_timeout: config.connect_timeout,
                token: config.token,
                role,
                connection: parking_lot::Mutex::new(connection),
                reconnecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The server's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The role the server granted this client's token or certificate.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// Creates a token with `role`, labelled `name` (admin only). The returned token is
    /// shown this once: the server keeps only its hash.
    pub async fn create_token(&self, name: &str, role: Role) -> Result<(String, TokenInfo), Error> {
        match self
            .request(&Request::CreateToken {
                name: name.into(),
                role,
            })
            .await?
        {
            Response::TokenCreated { token, info } => Ok((token, info)),
            other => Err(unexpected("CreateToken", &other)),
        }
    }

    /// Revokes the token `id` (admin only); connections using it are closed. Returns
    /// whether it existed.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, Error> {
        match self
            .request(&Request::RevokeToken { id: id.into() })
            .await?
        {
            Response::TokenRevoked { existed } => Ok(existed),
            other => Err(unexpected("RevokeToken", &other)),
        }
    }

    /// The server's tokens, without their secrets (admin only).
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        match self.request(&Request::ListTokens).await? {
            Response::Tokens(tokens) => Ok(tokens),
            other => Err(unexpected("ListTokens", &other)),
        }
    }

    /// Removes the module `name` (admin only); returns whether it was deployed. Calls
    /// ordered after it get `MODULE_NOT_FOUND`.
    pub async fn undeploy(&self, name: &str) -> Result<bool, Error> {
        match self
            .request(&Request::Undeploy { name: name.into() })
            .await?
        {
            Response::Undeployed { existed } => Ok(existed),
            other => Err(unexpected("Undeploy", &other)),
        }
    }

    /// Asks the server to shut down gracefully (admin only).
    pub async fn shutdown_server(&self) -> Result<(), Error> {
        match self.request(&Request::Shutdown).await? {
            Response::ShuttingDown => Ok(()),
            other => Err(unexpected("Shutdown", &other)),
        }
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<(), Error> {
        match self.request(&Request::Ping).await? {
            Response::Pong => Ok(()),
            other => Err(unexpected("Ping", &other)),
        }
    }

    /// The value of `key`, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        check(limits::check_key(key))?;
        match self.request(&Request::Get { key: key.into() }).await? {
            Response::Value(value) => Ok(value.map(|value| value.into_owned())),
            other => Err(unexpected("Get", &other)),
        }
    }

    /// Sets `key` to `value`, overwriting any previous value.
    pub async fn put(&self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        let value = value.as_ref();
        check(limits::check_key(key))?;
        check(limits::check_value(value))?;
        match self
            .request(&Request::Put {
                key: key.into(),
                value: value.into(),
            })
            .await?
        {
            Response::Stored => Ok(()),
            other => Err(unexpected("Put", &other)),
        }
    }

    /// Removes `key`; returns whether it existed. Deleting a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        check(limits::check_key(key))?;
        match self.request(&Request::Delete { key: key.into() }).await? {
            Response::Deleted { existed } => Ok(existed),
            other => Err(unexpected("Delete", &other)),
        }
    }

    /// Deploys the WebAssembly module `module` (the bytes of a `.wasm` file) as `name`,
    /// replacing any module of that name: calls already running finish on the old version,
    /// later calls use the new one.
    pub async fn deploy(&self, name: &str, module: &[u8]) -> Result<ModuleInfo, Error> {
        if module.len() > limits::MAX_VALUE_BYTES {
            return Err(Error::Rejected(ErrorResponse::new(
                ErrorCode::MODULE_TOO_LARGE,
                format!(
                    "the module is {} bytes; no request can carry more than {}",
                    module.len(),
                    limits::MAX_VALUE_BYTES
                ),
            )));
        }
        match self
            .request(&Request::Deploy {
                name: name.into(),
                module: module.into(),
            })
            .await?
        {
            Response::Deployed(info) => Ok(info),
            other => Err(unexpected("Deploy", &other)),
        }
    }

    /// Calls `procedure` of `module` with `args` as one transaction and returns its result.
    /// Arguments and result travel in postcard, so `A` and `R` must match the procedure's
    /// types field for field (share the type, e.g. from the procedure crate).
    ///
    /// A procedure that aborts returns [`Error::Rejected`] with code
    /// [`ErrorCode::ABORTED`] and the procedure's message.
    pub async fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        module: &str,
        procedure: &str,
        args: &A,
    ) -> Result<R, Error> {
        let args = postcard::to_allocvec(args)
            .map_err(|error| Error::Config(format!("cannot encode the arguments: {error}")))?;
        let output = self
            .call_encoded(module, procedure, Encoding::Postcard, &args)
            .await?;
        postcard::from_bytes(&output).map_err(|error| {
            Error::Protocol(format!(
                "the result of {module}.{procedure} is not the expected type: {error}"
            ))
        })
    }

    /// Calls `procedure` of `module` with JSON arguments and returns the JSON result.
    pub async fn call_json(
        &self,
        module: &str,
        procedure: &str,
        args: &str,
    ) -> Result<String, Error> {
        let output = self
            .call_encoded(module, procedure, Encoding::Json, args.as_bytes())
            .await?;
        String::from_utf8(output).map_err(|_| {
            Error::Protocol(format!(
                "the JSON result of {module}.{procedure} is not UTF-8"
            ))
        })
    }

    async fn call_encoded(
        &self,
        module: &str,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
    ) -> Result<Vec<u8>, Error> {
        check(limits::check_value(args))?;
        let request = Request::Call {
            module: module.into(),
            procedure: procedure.into(),
            encoding,
            args: args.into(),
        };
        match self.request(&request).await? {
            Response::Output(output) => Ok(output.into_owned()),
            other => Err(unexpected("Call", &other)),
        }
    }

    /// The deployed modules and their procedures.
    pub async fn modules(&self) -> Result<Vec<ModuleInfo>, Error> {
        match self.request(&Request::ListModules).await? {
            Response::Modules(modules) => Ok(modules),
            other => Err(unexpected("ListModules", &other)),
        }
    }

    /// Applies `ops` as one atomic transaction, in order (a later write to the same key
    /// wins); returns how many were applied. If any breaks a limit, none is applied.
    pub async fn batch(&self, ops: &[BatchOp<'_>]) -> Result<u64, Error> {
        check(limits::check_batch(ops))?;
        match self.request(&Request::Batch { ops: ops.to_vec() }).await? {
            Response::Batched { ops } => Ok(ops),
            other => Err(unexpected("Batch", &other)),
        }
    }

    /// Opens an interactive transaction on a stream of its own. Reads see a consistent
    /// snapshot taken now (plus the transaction's own writes); writes are buffered in the
    /// server until [`Transaction::commit`], which applies all of them atomically or fails
    /// with [`ErrorCode::CONFLICT`] if another transaction wrote a key this one read in the
    /// meantime ([`Error::is_retryable`]: run the whole transaction again). Dropping the
    /// transaction, or losing the connection, rolls it back.
    ///
    /// ```no_run
    /// # async fn demo(client: transdb_client::Client) -> Result<(), transdb_client::Error> {
    /// let mut tx = client.begin().await?;
    /// let from: i64 = String::from_utf8_lossy(&tx.get("a").await?.unwrap_or_default()).parse().unwrap_or(0);
    /// tx.put("a", (from - 10).to_string()).await?;
    /// tx.put("b", b"10").await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(&self) -> Result<Transaction, Error> {
        let (send, recv) = self.open_stream().await?;
        let mut transaction = Transaction {
            send,
            recv,
            reader: FrameReader::new(),
            snapshot: 0,
            open: true,
        };
        match transaction.exchange(&Request::Begin).await? {
            Response::Begun { snapshot } => {
                transaction.snapshot = snapshot;
                Ok(transaction)
            }
            other => Err(unexpected("Begin", &other)),
        }
    }

    /// The server's statistics and the hash of its state, taken as one transaction that
    /// holds every lock (a consistent state at `position`).
    pub async fn stats(&self) -> Result<ServerStats, Error> {
        match self.request(&Request::Stats).await? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected("Stats", &other)),
        }
    }

    /// Asks the server to write a checkpoint of its state into its data directory now
    /// (without stopping traffic) and to drop the log it covers.
    pub async fn checkpoint(&self) -> Result<CheckpointInfo, Error> {
        match self.request(&Request::Checkpoint).await? {
            Response::Checkpointed(info) => Ok(info),
            other => Err(unexpected("Checkpoint", &other)),
        }
    }

    /// Asks the server to write a consistent copy of its state into `dir`, a new or empty
    /// directory on the server's machine (restore it with `transdb restore`).
    pub async fn backup(&self, dir: &str) -> Result<CheckpointInfo, Error> {
        match self.request(&Request::Backup { dir: dir.into() }).await? {
            Response::Checkpointed(info) => Ok(info),
            other => Err(unexpected("Backup", &other)),
        }
    }

    /// Closes the connection and waits (at most [`CLOSE_LINGER`]) until the server has been
    /// told, so that it frees the connection at once rather than at its idle timeout.
    /// Requests still under way fail; later requests on this client reconnect.
    pub async fn close(&self) {
        self.inner
            .connection
            .lock()
            .close(ErrorCode::NO_ERROR.0.into(), b"client closed");
        let _ = tokio::time::timeout(CLOSE_LINGER, self.inner.endpoint.wait_idle()).await;
    }

    /// Sends one request on a new stream and returns the server's response. An `Error`
    /// response becomes [`Error::Rejected`].
    pub async fn request(&self, request: &Request<'_>) -> Result<Response<'static>, Error> {
        let frame =
            frame::encode_to_vec(request).map_err(|error| Error::Config(error.to_string()))?;
        let (mut send, mut recv) = self.open_stream().await?;
        send.write_all(&frame).await.map_err(write_error)?;
        // Finishing can only fail if the stream is already closed; the read reports why.
        let _ = send.finish();
        let mut reader = FrameReader::new();
        let response = match reader.next::<Response<'_>>(&mut recv).await {
            Ok(Some(response)) => response.into_owned(),
            Ok(None) => {
                return Err(Error::Protocol(
                    "the server finished the stream without answering".into(),
                ));
            }
            Err(error) => return Err(read_error(error)),
        };
        expect_end(&mut reader, &mut recv).await?;
        match response {
            Response::Error(error) => Err(Error::Rejected(error)),
            response => Ok(response),
        }
    }

    /// Sends `requests` on one stream, all at once, and returns their answers in order (an
    /// `Error` answer as [`Error::Rejected`]), like Redis pipelining: many requests travel
    /// in one packet and share one stream's costs, which raises throughput several-fold
    /// for small requests.
    ///
    /// Each request is a transaction of its own, run one after the other in the order
    /// given (use [`Client::batch`] to apply several writes as one). The server answers a
    /// request before it reads the next, so with `--durability sync` every write waits for
    /// its fsync before the next one starts: there, spread writes over several
    /// `pipeline`s or tasks. `Begin`, `Commit` and `Rollback` are refused here (an
    /// interactive transaction is [`Client::begin`]), as is a request over a limit; nothing
    /// is sent then. If the stream or the connection fails, every request not yet answered
    /// gets that error: it may or may not have been applied.
    pub async fn pipeline(
        &self,
        requests: &[Request<'_>],
    ) -> Result<Vec<Result<Response<'static>, Error>>, Error> {
        let mut frames = Vec::new();
        for request in requests {
            if matches!(
                request,
                Request::Begin | Request::Commit | Request::Rollback
            ) {
                return Err(Error::Config(format!(
                    "{} cannot be pipelined: an interactive transaction needs Client::begin",
                    request.kind()
                )));
            }
            check(check_request(request))?;
            frame::encode(request, &mut frames)
                .map_err(|error| Error::Config(error.to_string()))?;
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let (mut send, mut recv) = self.open_stream().await?;
        // Write and read at once: answers may fill the flow-control window before every
        // request is written, and the server reads no further until they are read.
        let write = async {
            let written = send.write_all(&frames).await;
            let _ = send.finish();
            written
        };
        let read = async {
            let mut reader = FrameReader::new();
            let mut answers = Vec::with_capacity(requests.len());
            while answers.len() < requests.len() {
                let answer = match reader.next::<Response<'_>>(&mut recv).await {
                    Ok(Some(response)) => match response.into_owned() {
                        Response::Error(error) => Err(Error::Rejected(error)),
                        response => Ok(response),
                    },
                    Ok(None) => Err(Error::Protocol(
                        "the server finished the stream before answering every request".into(),
                    )),
                    Err(error) => Err(read_error(error)),
                };
                if let Err(error) = &answer
                    && !matches!(error, Error::Rejected(_))
                {
                    answers.resize(requests.len(), Err(error.clone()));
                    return (answers, None);
                }
                answers.push(answer);
            }
            (answers, Some((reader, recv)))
        };
        // A failed write fails the read too (the stream was reset or the connection lost),
        // which is what the unanswered requests report.
        let (_, (answers, rest)) = tokio::join!(write, read);
        if let Some((mut reader, mut recv)) = rest {
            expect_end(&mut reader, &mut recv).await?;
        }
        Ok(answers)
    }

    /// Opens a stream, reconnecting first if the connection is gone. Nothing has been sent
    /// when this fails, so reconnecting here is always safe.
    async fn open_stream(&self) -> Result<(SendStream, RecvStream), Error> {
        let connection = self.inner.connection.lock().clone();
        match connection.open_bi().await {
            Ok(streams) => Ok(streams),
            Err(first_error) => {
                let connection = self.reconnect(&connection, first_error).await?;
                connection.open_bi().await.map_err(connection_lost)
            }
        }
    }

    async fn reconnect(
        &self,
        broken: &Connection,
        error: ConnectionError,
    ) -> Result<Connection, Error> {
        let _guard = self.inner.reconnecting.lock().await;
        let current = self.inner.connection.lock().clone();
        if current.stable_id() != broken.stable_id() {
            return Ok(current); // another request reconnected already
        }
        tracing::debug!(%error, "connection lost; reconnecting");
        let inner = &self.inner;
        let (fresh, _role) = open_connection(
            &inner.endpoint,
            inner.addr,
            &inner.server_name,
            inner.connect_timeout,
            inner.token.as_deref(),
        )
        .await
        .map_err(|failure| match failure {
            Error::Connect { addr, reason } => Error::Connect {
                addr,
                reason: format!(
                    "{reason} (the previous connection ended: {})",
                    describe_connect_failure(&error)
                ),
            },
            other => other,
        })?;
        *inner.connection.lock() = fresh.clone();
        Ok(fresh)
    }
}

/// An interactive transaction (see [`Client::begin`]): one stream, one request at a time.
///
/// An error answer to `get`, `put` or `delete` (a key over the size limit, say) leaves the
/// transaction open, except [`ErrorCode::TOO_MANY_KEYS`] and
/// [`ErrorCode::TRANSACTION_TOO_LARGE`], which end it. If the transaction waits longer than
/// the server's idle timeout between two requests, the server rolls it back and the next
/// request fails with [`ErrorCode::TRANSACTION_TIMEOUT`].
pub struct Transaction {
    send: SendStream,
    recv: RecvStream,
    reader: FrameReader,
    snapshot: u64,
    /// Until committed or rolled back.
    open: bool,
}

impl Transaction {
    /// The position of the transaction's snapshot: its reads see every transaction the
    /// server ordered before it.
    pub fn snapshot(&self) -> u64 {
        self.snapshot
    }

    /// The value of `key` as this transaction sees it.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        check(limits::check_key(key))?;
        match self.exchange(&Request::Get { key: key.into() }).await? {
            Response::Value(value) => Ok(value.map(Cow::into_owned)),
            other => Err(unexpected("Get", &other)),
        }
    }

    /// Sets `key` to `value` when the transaction commits.
    pub async fn put(&mut self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        let value = value.as_ref();
        check(limits::check_key(key))?;
        check(limits::check_value(value))?;
        match self
            .exchange(&Request::Put {
                key: key.into(),
                value: value.into(),
            })
            .await?
        {
            Response::Stored => Ok(()),
            other => Err(unexpected("Put", &other)),
        }
    }

    /// Removes `key` when the transaction commits; returns whether it exists now, as this
    /// transaction sees it.
    pub async fn delete(&mut self, key: &str) -> Result<bool, Error> {
        check(limits::check_key(key))?;
        match self.exchange(&Request::Delete { key: key.into() }).await? {
            Response::Deleted { existed } => Ok(existed),
            other => Err(unexpected("Delete", &other)),
        }
    }

    /// Commits: every write applies atomically, or, with [`ErrorCode::CONFLICT`], none does.
    /// Returns the transaction's position in the server's total order.
    pub async fn commit(mut self) -> Result<u64, Error> {
        let response = self.exchange(&Request::Commit).await;
        self.end().await;
        match response? {
            Response::Committed { position } => Ok(position),
            other => Err(unexpected("Commit", &other)),
        }
    }

    /// Rolls back: nothing the transaction wrote is applied.
    pub async fn rollback(mut self) -> Result<(), Error> {
        let response = self.exchange(&Request::Rollback).await;
        self.end().await;
        match response? {
            Response::RolledBack => Ok(()),
            other => Err(unexpected("Rollback", &other)),
        }
    }

    async fn exchange(&mut self, request: &Request<'_>) -> Result<Response<'static>, Error> {
        let frame =
            frame::encode_to_vec(request).map_err(|error| Error::Config(error.to_string()))?;
        self.send.write_all(&frame).await.map_err(write_error)?;
        let response = match self.reader.next::<Response<'_>>(&mut self.recv).await {
            Ok(Some(response)) => response.into_owned(),
            Ok(None) => {
                return Err(Error::Protocol(
                    "the server finished the transaction's stream without answering".into(),
                ));
            }
            Err(error) => return Err(read_error(error)),
        };
        match response {
            Response::Error(error) => Err(Error::Rejected(error)),
            response => Ok(response),
        }
    }

    /// Finishes the stream after the last answer.
    async fn end(&mut self) {
        self.open = false;
        let _ = self.send.finish();
        let _ = expect_end(&mut self.reader, &mut self.recv).await;
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.open {
            // Resetting the stream rolls the transaction back at once.
            let _ = self.send.reset(ErrorCode::NO_ERROR.0.into());
            let _ = self.recv.stop(ErrorCode::NO_ERROR.0.into());
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.connection
            .lock()
            .close(ErrorCode::NO_ERROR.0.into(), b"client dropped");
    }
}

async fn resolve(addr: &str) -> Result<(SocketAddr, String), Error> {
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| Error::Config(format!("server address {addr:?} is not host:port")))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let socket_addr = tokio::net::lookup_host(addr)
        .await
        .map_err(|error| Error::Config(format!("cannot resolve server address {addr:?}: {error}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("server address {addr:?} resolves to nothing")))?;
    Ok((socket_addr, host))
}

/// Makes a connection and authenticates it; returns it with the role the server granted.
async fn open_connection(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
    token: Option<&str>,
) -> Result<(Connection, Role), Error> {
    let connect_error = |reason: String| Error::Connect { addr, reason };
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|error| connect_error(error.to_string()))?;
    let connection = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return Err(connect_error(describe_connect_failure(&error))),
        Err(_) => {
            return Err(connect_error(format!(
                "no answer within {timeout:?}: is a server running there (`transdb serve`)?"
            )));
        }
    };
    match tokio::time::timeout(timeout, authenticate(&connection, token)).await {
        Ok(Ok(role)) => Ok((connection, role)),
        // Nothing was sent but authentication: a lost connection is a failed connect.
        Ok(Err(Error::ConnectionLost { reason, .. })) => Err(connect_error(reason)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(connect_error(format!(
            "the server did not answer authentication within {timeout:?}"
        ))),
    }
}

/// Sends `Authenticate` on the connection's first stream.
async fn authenticate(connection: &Connection, token: Option<&str>) -> Result<Role, Error> {
    let unauthenticated =
        |message: String| Error::Rejected(ErrorResponse::new(ErrorCode::UNAUTHENTICATED, message));
    let request = Request::Authenticate {
        token: token.map(Cow::Borrowed),
    };
    let frame = frame::encode_to_vec(&request).map_err(|error| Error::Config(error.to_string()))?;
    let outcome = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(connection_lost)?;
        send.write_all(&frame).await.map_err(write_error)?;
        let _ = send.finish();
        let mut reader = FrameReader::new();
        match reader.next::<Response<'_>>(&mut recv).await {
            Ok(Some(response)) => Ok(response.into_owned()),
            Ok(None) => Err(Error::Protocol(
                "the server finished the authentication stream without answering".into(),
            )),
            Err(error) => Err(read_error(error)),
        }
    }
    .await;
    match outcome {
        Ok(Response::Authenticated { role }) => Ok(role),
        Ok(Response::Error(error)) => Err(Error::Rejected(error)),
        Ok(other) => Err(unexpected("Authenticate", &other)),
        Err(Error::ConnectionLost {
            code: Some(ErrorCode::UNAUTHENTICATED),
            reason,
        }) => Err(unauthenticated(reason)),
        Err(Error::StreamReset {
            code: ErrorCode::MALFORMED_FRAME,
        }) => Err(Error::Protocol(
            "the server does not understand Authenticate: it is older than this client; upgrade it"
                .into(),
        )),
        Err(error) => Err(error),
    }
}

fn describe_connect_failure(error: &ConnectionError) -> String {
    let text = error.to_string();
    if let ConnectionError::ApplicationClosed(close) = error {
        return describe_close(close);
    }
    if text.contains("certificate")
        || text.contains("UnknownIssuer")
        || text.contains("NotValidForName")
    {
        return format!(
            "{text}: the server's certificate is not trusted; pass the server's certificate with --ca \
             (by default the CLI trusts transdb-data/cert.pem in the current directory)"
        );
    }
    if let ConnectionError::ConnectionClosed(close) = error
        && close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    {
        return format!("{text}; it may be shutting down: retry once it is back");
    }
    text
}

fn describe_close(close: &quinn::ApplicationClose) -> String {
    let code = u16::try_from(close.error_code.into_inner())
        .map(ErrorCode)
        .unwrap_or(ErrorCode::INTERNAL);
    format!(
        "server closed the connection: {code}: {} ({})",
        code.description(),
        String::from_utf8_lossy(&close.reason)
    )
}

fn connection_lost(error: ConnectionError) -> Error {
    match &error {
        ConnectionError::ApplicationClosed(close) => Error::ConnectionLost {
            code: u16::try_from(close.error_code.into_inner())
                .ok()
                .map(ErrorCode),
            reason: describe_close(close),
        },
        _ => Error::ConnectionLost {
            code: None,
            reason: error.to_string(),
        },
    }
}

fn reset_code(code: quinn::VarInt) -> ErrorCode {
    u16::try_from(code.into_inner())
        .map(ErrorCode)
        .unwrap_or(ErrorCode::INTERNAL)
}

fn write_error(error: WriteError) -> Error {
    match error {
        WriteError::Stopped(code) => Error::StreamReset {
            code: reset_code(code),
        },
        WriteError::ConnectionLost(error) => connection_lost(error),
        other => Error::Protocol(other.to_string()),
    }
}

fn read_error(error: ReadFrameError) -> Error {
    match error {
        ReadFrameError::Frame(error) => Error::Protocol(error.to_string()),
        ReadFrameError::Stream(ReadError::Reset(code)) => Error::StreamReset {
            code: reset_code(code),
        },
        ReadFrameError::Stream(ReadError::ConnectionLost(error)) => connection_lost(error),
        ReadFrameError::Stream(other) => Error::Protocol(other.to_string()),
        ReadFrameError::Refused(code) => Error::StreamReset { code },
        ReadFrameError::Idle => Error::Protocol("the server sent nothing for too long".into()),
    }
}

async fn expect_end(reader: &mut FrameReader, recv: &mut RecvStream) -> Result<(), Error> {
    if reader.finished_now(recv).await {
        return Ok(());
    }
    match reader.next_payload(recv).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(Error::Protocol(
            "the server sent more than one response".into(),
        )),
        // The answer is complete; a failure after it changes nothing.
        Err(_) => Ok(()),
    }
}

/// The limits a request must keep before it is sent (the server checks them again).
fn check_request(request: &Request<'_>) -> Result<(), ErrorResponse> {
    match request {
        Request::Get { key } | Request::Delete { key } => limits::check_key(key),
        Request::Put { key, value } => {
            limits::check_key(key)?;
            limits::check_value(value)
        }
        Request::Batch { ops } => limits::check_batch(ops),
        Request::Call { args, .. } => limits::check_value(args),
        _ => Ok(()),
    }
}

fn check(result: Result<(), ErrorResponse>) -> Result<(), Error> {
    result.map_err(Error::Rejected)
}

fn unexpected(request: &str, response: &Response<'_>) -> Error {
    Error::Protocol(format!(
        "unexpected answer to {request}: {}",
        response.kind()
    ))
}
