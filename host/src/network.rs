//! The QUIC front end: accepts connections, authenticates them, accepts their request
//! streams and drives each stream's frames through [`crate::executor`].
//!
//! Contract:
//! - one task per connection authenticates it, then accepts its bidirectional streams; one
//!   task per stream reads request frames, answers each in order, and ends when the client
//!   finishes the stream;
//! - a connection's first stream must carry `Authenticate` as its first request, within
//!   the auth timeout; until it has authenticated, a connection may open only that one
//!   stream, and that request may be at most 1 KiB; the server answers `Authenticated` (and the stream goes on like any
//!   other) or an `UNAUTHENTICATED` error followed by closing the connection with that
//!   code. Failures are counted and logged with the peer's address, never the token;
//! - every request is checked against the connection's role; a request after the
//!   connection's token was revoked is answered `UNAUTHENTICATED` and the connection closed;
//! - a framing violation (oversized length, undecodable payload, FIN inside a frame) resets
//!   that stream only, in both directions, with the matching [`ErrorCode`]; the connection
//!   and every other stream go on;
//! - each frame reserves its length from the server's request-memory budget when its
//!   header arrives, until it is answered; a frame that does not fit resets its stream with
//!   [`ErrorCode::OVERLOADED`], so the memory held by requests stays bounded;
//! - a stream that makes no progress for the stream timeout (between requests, inside a
//!   frame, or with a response the client does not read) is reset with
//!   [`ErrorCode::STREAM_TIMEOUT`]; with an interactive transaction open, the transaction
//!   idle timeout applies instead and resets with [`ErrorCode::TRANSACTION_TIMEOUT`];
//! - a stream task lives until the client has acknowledged its last response, so that
//!   graceful shutdown, which waits for all stream tasks before closing connections, never
//!   drops an answer the server already computed;
//! - connections over the limit are closed with [`ErrorCode::TOO_MANY_CONNECTIONS`]; once
//!   shutdown begins, new connections are refused and no new streams are accepted;
//! - a stream is a [`Session`]: an interactive transaction opened on it ends with it;
//! - every request a stream serves gets a server-unique id. At `debug` it runs in a
//!   `request` span (`request_id`, `kind`) inside the stream's connection span (`remote`),
//!   so every line logged while serving it carries both; at the default `info` the span is
//!   off (creating one per request cost ~1.8 µs of server CPU per get, about 14 %), and the
//!   lines that matter at `info`, guest logs, carry `request_id` themselves
//!   ([`current_request_id`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use transdb_client::wire::{FrameReader, ReadFrameError, within};
use transdb_proto::frame::{self, FrameError};
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response};

use crate::auth::{CertificateRoles, Principal, Tokens};
use crate::executor::{Executor, Session, encode};
use crate::metrics::Outcome;

/// Longest frame an unauthenticated connection may send: an `Authenticate` with the
/// longest token fits many times over.
const MAX_AUTHENTICATE_BYTES: usize = 1024;

/// How long the server waits for a refused client to receive its error before closing.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The id of the next request served (the `request_id` of its `request` span): unique
/// within the process, hence within each of its servers.
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

tokio::task_local! {
    /// The id of the request the current task is serving.
    static REQUEST_ID: u64;
}

/// A new request id (see [`NEXT_REQUEST_ID`]).
pub(crate) fn next_request_id() -> u64 {
    NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs `serving` as the request `request_id`: [`current_request_id`] inside it returns it.
pub(crate) async fn with_request_id<T>(request_id: u64, serving: impl Future<Output = T>) -> T {
    REQUEST_ID.scope(request_id, serving).await
}

/// The id of the request being served by the calling task, if it serves one (procedure
/// calls run on it: their guest logs are tagged with this).
pub(crate) fn current_request_id() -> Option<u64> {
    REQUEST_ID.try_with(|id| *id).ok()
}

/// What every connection and stream task of one server shares.
pub(crate) struct Shared {
    pub executor: Arc<Executor>,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Cancelled when an admin asks for a shutdown (the server's owner then shuts down).
    pub shutdown_requested: CancellationToken,
    /// Every request-stream task.
    pub streams: TaskTracker,
    pub max_connections: usize,
    /// Concurrent request streams an authenticated connection may open.
    pub max_streams_per_connection: u32,
    /// How long an open interactive transaction may wait for its next request.
    pub transaction_idle_timeout: Duration,
    /// How long a stream may make no progress otherwise.
    pub stream_timeout: Duration,
    /// How long a new connection has to authenticate.
    pub auth_timeout: Duration,
    pub tokens: Arc<Tokens>,
    pub certificate_roles: Option<Arc<CertificateRoles>>,
    /// Bytes of request frames being read or executed, at most `--max-request-memory`.
    pub request_memory: Arc<RequestMemory>,
}

fn code(code: ErrorCode) -> VarInt {
    VarInt::from(code.0)
}

/// Accepts connections until shutdown begins, then refuses them until the endpoint closes.
pub(crate) async fn accept_connections(endpoint: Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        let span = tracing::info_span!("connection", %remote);
        tokio::spawn(serve_connection(incoming, shared.clone()).instrument(span));
    }
    while let Some(incoming) = endpoint.accept().await {
        incoming.refuse();
    }
}

/// Counts a connection for as long as it lives.
struct ConnectionSlot<'a> {
    shared: &'a Shared,
    within_limit: bool,
}

impl<'a> ConnectionSlot<'a> {
    fn take(shared: &'a Shared) -> Self {
        let before = shared
            .executor
            .front_end
            .connections
            .fetch_add(1, Ordering::Relaxed);
        Self {
            shared,
            within_limit: before < shared.max_connections,
        }
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.shared
            .executor
            .front_end
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The server's budget of request bytes being read or executed (`--max-request-memory`).
/// Requests only ever try: a frame that does not fit is refused, never queued, so nothing
/// can wait on memory that a stalled peer holds.
pub(crate) struct RequestMemory {
    used: AtomicUsize,
    max: usize,
}

/// Bytes reserved from a [`RequestMemory`], given back on drop.
pub(crate) struct Reservation {
    budget: Arc<RequestMemory>,
    bytes: usize,
}

impl RequestMemory {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Reserves `bytes`: `OVERLOADED` if they do not fit now, `FRAME_TOO_LARGE` if they
    /// never could.
    pub(crate) fn reserve(
        budget: &Arc<RequestMemory>,
        bytes: usize,
    ) -> Result<Reservation, ErrorCode> {
        if bytes > budget.max {
            return Err(ErrorCode::FRAME_TOO_LARGE);
        }
        budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= budget.max).then_some(used + bytes)
            })
            .map_err(|_| ErrorCode::OVERLOADED)?;
        Ok(Reservation {
            budget: budget.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One request stream and the frames buffered from it.
struct Stream {
    send: SendStream,
    recv: RecvStream,
    reader: FrameReader,
}

impl Stream {
    fn reset(&mut self, error: ErrorCode) {
        let _ = self.recv.stop(code(error));
        let _ = self.send.reset(code(error));
    }
}

async fn serve_connection(incoming: Incoming, shared: Arc<Shared>) {
    let slot = ConnectionSlot::take(&shared);
    // The handshake counts against the auth timeout too: a peer that starts handshakes and
    // never finishes them holds its slot no longer than one that never authenticates.
    let connection = match tokio::time::timeout(shared.auth_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%error, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake not finished within the auth timeout");
            return;
        }
    };
    if !slot.within_limit {
        tracing::warn!(
            limit = shared.max_connections,
            "connection refused: at the connection limit"
        );
        connection.close(
            code(ErrorCode::TOO_MANY_CONNECTIONS),
            b"at the connection limit (--max-connections)",
        );
        return;
    }
    let Some((principal, first)) = authenticate(&connection, &shared).await else {
        return;
    };
    let principal = Arc::new(principal);
    tracing::debug!(role = %principal.role, token = principal.token_id(), "connection authenticated");
    shared.streams.spawn(
        serve_stream(first, principal.clone(), connection.clone(), shared.clone())
            .in_current_span(),
    );
    loop {
        let (send, recv) = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => {
                // Hold the connection, accepting nothing, until the server closes every
                // connection with SHUTTING_DOWN: dropping the last handle here would close
                // it at once with NO_ERROR, telling the client nothing useful.
                connection.closed().await;
                return;
            }
            streams = connection.accept_bi() => match streams {
                Ok(streams) => streams,
                Err(error) => {
                    tracing::debug!(%error, "connection closed");
                    return;
                }
            },
        };
        let stream = Stream {
            send,
            recv,
            reader: FrameReader::new(),
        };
        shared.streams.spawn(
            serve_stream(
                stream,
                principal.clone(),
                connection.clone(),
                shared.clone(),
            )
            .in_current_span(),
        );
    }
}

/// What a refused client is told, whatever was wrong: never which part.
const NOT_AUTHENTICATED: &str = "not authenticated: the token (or client certificate) is missing, wrong or revoked; \
     pass a token with --token-file, TRANSDB_TOKEN_FILE or TRANSDB_TOKEN (a server writes its \
     admin token to admin.token in its data directory on first start)";

/// Reads the connection's `Authenticate`; returns who it is and the stream it came on, or
/// `None` after refusing it (or losing it).
async fn authenticate(connection: &Connection, shared: &Shared) -> Option<(Principal, Stream)> {
    let started = Instant::now();
    let counted = |outcome: Outcome| {
        shared.executor.metrics.record(
            Request::Authenticate { token: None }.number(),
            outcome,
            started.elapsed(),
        );
    };
    let certificate_role = shared.certificate_roles.as_ref().and_then(|roles| {
        let chain = connection
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        roles.role(&chain)
    });
    let attempt = async {
        let (send, recv) = connection.accept_bi().await.ok()?;
        let mut stream = Stream {
            send,
            recv,
            reader: FrameReader::new(),
        };
        let outcome = match stream
            .reader
            .next_payload_admitted(
                &mut stream.recv,
                |length| {
                    if length <= MAX_AUTHENTICATE_BYTES {
                        Ok(())
                    } else {
                        Err(ErrorCode::UNAUTHENTICATED)
                    }
                },
                None, // the auth timeout bounds the whole exchange
            )
            .await
        {
            Ok(Some(payload)) => match frame::decode::<Request<'_>>(payload) {
                Ok(Request::Authenticate { token: Some(token) }) => shared
                    .tokens
                    .verify(&token)
                    .ok_or(NOT_AUTHENTICATED.to_string()),
                Ok(Request::Authenticate { token: None }) => certificate_role
                    .map(Principal::certificate)
                    .ok_or(NOT_AUTHENTICATED.to_string()),
                Ok(other) => Err(format!(
                    "not authenticated: the first request on a connection must be Authenticate, not {}",
                    other.kind()
                )),
                Err(error) => {
                    stream.reset(error.code());
                    Err(error.to_string())
                }
            },
            Ok(None) => Err("not authenticated: the first stream ended without a request".into()),
            Err(ReadFrameError::Frame(error)) => {
                stream.reset(error.code());
                Err(error.to_string())
            }
            Err(ReadFrameError::Refused(_)) => Err(format!(
                "not authenticated: the first request is longer than an Authenticate can be ({MAX_AUTHENTICATE_BYTES} bytes)"
            )),
            Err(ReadFrameError::Stream(_) | ReadFrameError::Idle) => return None,
        };
        Some((stream, outcome))
    };
    let refuse = |reason: &str| {
        counted(Outcome::Error(ErrorCode::UNAUTHENTICATED));
        shared
            .executor
            .front_end
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(reason, "connection refused: not authenticated");
    };
    match tokio::time::timeout(shared.auth_timeout, attempt).await {
        Err(_) => {
            refuse("no Authenticate within the auth timeout");
            connection.close(
                code(ErrorCode::UNAUTHENTICATED),
                b"no Authenticate within --auth-timeout-secs",
            );
            None
        }
        Ok(None) => None,
        Ok(Some((mut stream, Ok(principal)))) => {
            // Until now the connection could open this one stream; now its full credit.
            connection
                .set_max_concurrent_bi_streams(VarInt::from_u32(shared.max_streams_per_connection));
            let mut response = Vec::new();
            let authenticated = Response::Authenticated {
                role: principal.role,
            };
            encode(&authenticated, &mut response);
            counted(Outcome::Ok);
            match tokio::time::timeout(shared.stream_timeout, stream.send.write_all(&response))
                .await
            {
                Ok(Ok(())) => Some((principal, stream)),
                _ => None,
            }
        }
        Ok(Some((mut stream, Err(message)))) => {
            refuse(&message);
            let mut response = Vec::new();
            encode(
                &Response::Error(ErrorResponse::new(ErrorCode::UNAUTHENTICATED, message)),
                &mut response,
            );
            refuse_and_close(&mut stream, connection, &response, b"not authenticated").await;
            None
        }
    }
}

async fn serve_stream(
    mut stream: Stream,
    principal: Arc<Principal>,
    connection: Connection,
    shared: Arc<Shared>,
) {
    let executor = &shared.executor;
    let mut response = Vec::new();
    let mut session = Session::new(principal.role);
    loop {
        let (idle_limit, idle_code) = if session.in_transaction() {
            (
                shared.transaction_idle_timeout,
                ErrorCode::TRANSACTION_TIMEOUT,
            )
        } else {
            (shared.stream_timeout, ErrorCode::STREAM_TIMEOUT)
        };
        // Memory reserved for the frame being read, until it is answered.
        let mut reserved: Option<Reservation> = None;
        let next = stream
            .reader
            .next_payload_admitted(
                &mut stream.recv,
                |length| {
                    reserved = Some(RequestMemory::reserve(
                        &shared.request_memory,
                        length + frame::HEADER_BYTES,
                    )?);
                    Ok(())
                },
                Some(idle_limit),
            )
            .await;
        let payload = match next {
            Err(ReadFrameError::Idle) => {
                tracing::debug!(code = %idle_code, "stream idle past its timeout; reset");
                drop(session); // rolls an open transaction back
                stream.reset(idle_code);
                return;
            }
            Ok(Some(payload)) => payload,
            Ok(None) => break,
            Err(ReadFrameError::Frame(error)) => return reset(&mut stream, error),
            Err(ReadFrameError::Refused(refusal)) => {
                tracing::debug!(%refusal, "request memory exhausted; stream reset");
                stream.reset(refusal);
                return;
            }
            Err(ReadFrameError::Stream(error)) => {
                tracing::debug!(%error, "request stream failed");
                return;
            }
        };
        let request = match frame::decode::<Request<'_>>(payload) {
            Ok(request) => request,
            Err(error) => return reset(&mut stream, error),
        };
        response.clear();
        let request_id = next_request_id();
        // Disabled (almost free) unless the filter lets `debug` through.
        let span = tracing::debug_span!("request", request_id, kind = request.kind());
        if principal.revoked() {
            encode(
                &Response::Error(ErrorResponse::new(
                    ErrorCode::UNAUTHENTICATED,
                    "not authenticated: this connection's token was revoked",
                )),
                &mut response,
            );
            refuse_and_close(&mut stream, &connection, &response, b"token revoked").await;
            return;
        }
        let started = Instant::now();
        let answer = if session.in_transaction() {
            None // the executor refuses connection requests inside a transaction
        } else {
            span.in_scope(|| connection_request(&request, &principal, &shared))
        };
        match answer {
            Some(answer) => {
                let outcome = match &answer {
                    Response::Error(error) => Outcome::Error(error.code),
                    _ => Outcome::Ok,
                };
                executor
                    .metrics
                    .record(request.number(), outcome, started.elapsed());
                encode(&answer, &mut response);
            }
            None => {
                REQUEST_ID
                    .scope(
                        request_id,
                        executor
                            .serve(&mut session, request, started, &mut response)
                            .instrument(span.clone()),
                    )
                    .await
            }
        }
        // If the client has already finished its side, the FIN goes out with the answer.
        let last = stream.reader.finished_now(&mut stream.recv).await;
        match write_with_progress(&mut stream.send, &response, shared.stream_timeout).await {
            Ok(()) => {}
            Err(Some(error)) => {
                tracing::debug!(parent: &span, %error, "cannot send response");
                return;
            }
            Err(None) => {
                tracing::debug!(parent: &span, "response unread past the stream timeout; reset");
                stream.reset(ErrorCode::STREAM_TIMEOUT);
                return;
            }
        }
        drop(reserved);
        if last {
            break;
        }
    }
    let Stream { mut send, .. } = stream;
    drop((response, session));
    if send.finish().is_ok() {
        // Resolves when the client has acknowledged everything (or the connection is gone).
        // No timer is needed: every byte was already within the client's flow-control
        // credit, so its QUIC stack acknowledges it whether or not the application reads,
        // and a client that vanishes is closed by the idle timeout.
        let _ = send.stopped().await;
    }
}

/// Answers the requests that concern the connection or the server rather than the data:
/// authentication, tokens, shutdown. `None` for every other request.
fn connection_request(
    request: &Request<'_>,
    principal: &Principal,
    shared: &Shared,
) -> Option<Response<'static>> {
    let allowed = |request: &Request<'_>| crate::admission::authorize(principal.role, request);
    let result = match request {
        Request::Authenticate { .. } => Err(ErrorResponse::new(
            ErrorCode::PERMISSION_DENIED,
            format!(
                "this connection is already authenticated (role {}): open a new connection to use another token",
                principal.role
            ),
        )),
        Request::CreateToken { name, role } => allowed(request)
            .and_then(|()| shared.tokens.create(name, *role))
            .map(|(token, info)| {
                tracing::info!(id = %info.id, name = %info.name, role = %info.role, "token created");
                Response::TokenCreated { token, info }
            }),
        Request::RevokeToken { id } => allowed(request)
            .and_then(|()| shared.tokens.revoke(id))
            .map(|existed| {
                tracing::info!(%id, existed, "token revoked");
                Response::TokenRevoked { existed }
            }),
        Request::ListTokens => allowed(request).map(|()| Response::Tokens(shared.tokens.list())),
        Request::Shutdown => allowed(request).map(|()| {
            tracing::info!(by = principal.token_id(), "shutdown requested");
            shared.shutdown_requested.cancel();
            Response::ShuttingDown
        }),
        _ => return None,
    };
    Some(result.unwrap_or_else(Response::Error))
}

/// Sends `response` (an `UNAUTHENTICATED` error) and finishes the stream, waits (at most
/// [`REFUSAL_LINGER`]) until the client has it, then closes the connection: closing at once
/// would discard the answer still queued.
async fn refuse_and_close(
    stream: &mut Stream,
    connection: &Connection,
    response: &[u8],
    reason: &[u8],
) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        if stream.send.write_all(response).await.is_ok() && stream.send.finish().is_ok() {
            let _ = stream.send.stopped().await;
        }
    })
    .await;
    connection.close(code(ErrorCode::UNAUTHENTICATED), reason);
}

/// Writes all of `bytes`, failing with `Err(None)` if the peer takes none of them for
/// `idle` (a slow reader that keeps reading is never cut off).
async fn write_with_progress(
    send: &mut SendStream,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), Option<quinn::WriteError>> {
    let mut written = 0;
    while written < bytes.len() {
        match within(idle, send.write(&bytes[written..])).await {
            Some(Ok(count)) => written += count,
            Some(Err(error)) => return Err(Some(error)),
            None => return Err(None),
        }
    }
    Ok(())
}

fn reset(stream: &mut Stream, error: FrameError) {
    tracing::debug!(%error, "protocol violation; resetting the stream");
    stream.reset(error.code());
}
