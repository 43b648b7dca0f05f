//! The QUIC front end: accepts connections and request streams and drives each stream's
//! frames through [`crate::executor`].
//!
//! Contract:
//! - one task per connection accepts its bidirectional streams; one task per stream reads
//!   request frames, answers each in order, and ends when the client finishes the stream;
//! - a framing violation (oversized length, undecodable payload, FIN inside a frame) resets
//!   that stream only, in both directions, with the matching [`ErrorCode`]; the connection
//!   and every other stream go on;
//! - a stream task lives until the client has acknowledged its last response, so that
//!   graceful shutdown, which waits for all stream tasks before closing connections, never
//!   drops an answer the server already computed;
//! - connections over the limit are closed with [`ErrorCode::TOO_MANY_CONNECTIONS`]; once
//!   shutdown begins, new connections are refused and no new streams are accepted;
//! - a stream is a [`Session`]: an interactive transaction opened on it ends with it. While
//!   one is open, a stream silent for longer than the transaction idle timeout is reset with
//!   [`ErrorCode::TRANSACTION_TIMEOUT`] and the transaction rolled back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quinn::{Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use transdb_client::wire::{FrameReader, ReadFrameError};
use transdb_proto::frame::{self, FrameError};
use transdb_proto::{ErrorCode, Request};

use crate::executor::{Executor, Session};

/// What every connection and stream task of one server shares.
pub(crate) struct Shared {
    pub executor: Arc<Executor>,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Every request-stream task.
    pub streams: TaskTracker,
    /// Open (or handshaking) connections.
    pub connections: AtomicUsize,
    pub max_connections: usize,
    /// How long an open interactive transaction may wait for its next request.
    pub transaction_idle_timeout: Duration,
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
    connections: &'a AtomicUsize,
    within_limit: bool,
}

impl<'a> ConnectionSlot<'a> {
    fn take(shared: &'a Shared) -> Self {
        let before = shared.connections.fetch_add(1, Ordering::Relaxed);
        Self {
            connections: &shared.connections,
            within_limit: before < shared.max_connections,
        }
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(incoming: Incoming, shared: Arc<Shared>) {
    let slot = ConnectionSlot::take(&shared);
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "handshake failed");
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
    tracing::debug!("connection open");
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
        shared
            .streams
            .spawn(serve_stream(send, recv, shared.clone()).in_current_span());
    }
}

async fn serve_stream(mut send: SendStream, mut recv: RecvStream, shared: Arc<Shared>) {
    let executor = &shared.executor;
    let mut reader = FrameReader::new();
    let mut response = Vec::new();
    let mut session = Session::default();
    loop {
        let next = if session.in_transaction() {
            match tokio::time::timeout(
                shared.transaction_idle_timeout,
                reader.next_payload(&mut recv),
            )
            .await
            {
                Ok(next) => next,
                Err(_) => {
                    tracing::debug!("interactive transaction idle past its timeout; rolled back");
                    drop(session);
                    let code = code(ErrorCode::TRANSACTION_TIMEOUT);
                    let _ = recv.stop(code);
                    let _ = send.reset(code);
                    return;
                }
            }
        } else {
            reader.next_payload(&mut recv).await
        };
        let payload = match next {
            Ok(Some(payload)) => payload,
            Ok(None) => break,
            Err(ReadFrameError::Frame(error)) => return reset(&mut send, &mut recv, error),
            Err(ReadFrameError::Stream(error)) => {
                tracing::debug!(%error, "request stream failed");
                return;
            }
        };
        let request = match frame::decode::<Request<'_>>(payload) {
            Ok(request) => request,
            Err(error) => return reset(&mut send, &mut recv, error),
        };
        response.clear();
        executor
            .execute_in(&mut session, request, &mut response)
            .await;
        // If the client has already finished its side, the FIN goes out with the answer.
        let last = reader.finished_now(&mut recv).await;
        if let Err(error) = send.write_all(&response).await {
            tracing::debug!(%error, "cannot send response");
            return;
        }
        if last {
            break;
        }
    }
    drop((reader, response, session));
    if send.finish().is_ok() {
        // Resolves when the client has acknowledged everything (or the connection is gone).
        let _ = send.stopped().await;
    }
}

fn reset(send: &mut SendStream, recv: &mut RecvStream, error: FrameError) {
    tracing::debug!(%error, "protocol violation; resetting the stream");
    let _ = recv.stop(code(error.code()));
    let _ = send.reset(code(error.code()));
}
