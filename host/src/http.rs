//! The HTTP gateway (`transdb serve --http ADDR`): the same server over plain HTTP/1.1,
//! for curl, scripts, load balancers and Prometheus.
//!
//! - `GET /keys/{key}`: 200 with the value's bytes, or 404. `PUT /keys/{key}` with the value
//!   as the body: 200. `DELETE /keys/{key}`: 204 whether or not it existed (header
//!   `x-transdb-existed` says which). If the key's lock cannot be had within
//!   [`LOCK_WAIT`], 503 with `Retry-After`, and nothing was done: the wait happens before the
//!   request is ordered (an ordered transaction must run, so it is never cancelled).
//! - `POST /call/{module}/{procedure}` with JSON arguments: 200 with the procedure's JSON
//!   result.
//! - `GET /metrics`: the Prometheus text format ([`crate::metrics`]).
//! - `GET /health`: 200 `{"alive":true,"ready":true,...}` while the server serves; 503 with
//!   `"ready":false` once it shuts down or its command log has failed. No token needed.
//!
//! Every other route needs `Authorization: Bearer TOKEN`, a token of the QUIC API with the
//! same roles (`/metrics` needs `read`). Errors are JSON: `{"error":{"code":N,"name":
//! "CONFLICT","message":"..."}}`, with a status that fits (see [`status_of`]). Requests go
//! through [`crate::executor::Executor::serve`] like QUIC ones: the same admission, limits and counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use transdb_proto::message::Encoding;
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, Role, frame, limits};

use crate::executor::Session;
use crate::lock_manager::{Mode, lock_id};
use crate::metrics::Outcome;
use crate::network::{RequestMemory, Shared};

/// How long a key request waits for its key's lock before it is refused with 503.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Default of `--max-http-requests`: HTTP requests served at once.
pub const DEFAULT_MAX_HTTP_REQUESTS: usize = 256;

/// The [`Request::number`]s of the requests the gateway makes.
const GET: usize = 1;
const PUT: usize = 2;
const DELETE: usize = 3;
const CALL: usize = 5;

/// What the handlers share.
struct Gateway {
    shared: Arc<Shared>,
    /// One permit per request being served (`--max-http-requests`).
    slots: Semaphore,
}

/// Serves HTTP on `listener` until `stop` is cancelled, then finishes the requests it has.
/// (While the server drains, before `stop`, requests get 503 and `/health` says not ready.)
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    max_requests: usize,
    stop: CancellationToken,
) {
    let gateway = Arc::new(Gateway {
        shared,
        slots: Semaphore::new(max_requests),
    });
    let router = Router::new()
        .route("/keys/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/call/{module}/{procedure}", post(call))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway);
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(%error, "the HTTP gateway stopped");
    }
}

/// An error answer: its status and a JSON body.
struct HttpError {
    status: StatusCode,
    code: Option<ErrorCode>,
    name: &'static str,
    message: String,
    /// Whether the executor has counted it already (it answered it).
    counted: bool,
}

impl HttpError {
    fn new(status: StatusCode, name: &'static str, message: impl Into<String>) -> Self {
        HttpError {
            status,
            code: None,
            name,
            message: message.into(),
            counted: false,
        }
    }

    fn from_error(error: ErrorResponse) -> Self {
        HttpError {
            status: status_of(error.code),
            code: Some(error.code),
            name: error.code.name().unwrap_or("UNKNOWN"),
            message: error.message,
            counted: false,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> HttpResponse {
        let body = serde_json::json!({
            "error": {
                "code": self.code.map(|code| code.0),
                "name": self.name,
                "message": self.message,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"transdb\""),
                );
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UNAUTHENTICATED => StatusCode::UNAUTHORIZED,
        ErrorCode::PERMISSION_DENIED => StatusCode::FORBIDDEN,
        ErrorCode::MODULE_NOT_FOUND | ErrorCode::PROCEDURE_NOT_FOUND => StatusCode::NOT_FOUND,
        ErrorCode::VALUE_TOO_LARGE | ErrorCode::FRAME_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::CONFLICT => StatusCode::CONFLICT,
        ErrorCode::STORE_FULL => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::OVERLOADED
        | ErrorCode::SHUTTING_DOWN
        | ErrorCode::TOO_MANY_CONNECTIONS
        | ErrorCode::DEADLINE_EXCEEDED => StatusCode::SERVICE_UNAVAILABLE,
        // The procedure ran and refused or failed: nothing was written.
        ErrorCode::ABORTED
        | ErrorCode::GUEST_PANIC
        | ErrorCode::OUT_OF_FUEL
        | ErrorCode::GUEST_TRAP
        | ErrorCode::OUTPUT_TOO_LARGE
        | ErrorCode::KEY_NOT_DECLARED
        | ErrorCode::TOO_MANY_KEYS
        | ErrorCode::INVALID_VALUE
        | ErrorCode::KEY_SET_UNSTABLE => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::INTERNAL | ErrorCode::DURABILITY_FAILED => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl Gateway {
    /// The role of the request's bearer token, or why it has none (counted as an
    /// authentication failure).
    fn authenticate(&self, headers: &HeaderMap) -> Result<Role, HttpError> {
        let refuse = |message: &str| {
            self.shared
                .executor
                .front_end
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            HttpError::from_error(ErrorResponse::new(ErrorCode::UNAUTHENTICATED, message))
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(refuse(
                "not authenticated: send `Authorization: Bearer TOKEN` (the server's admin.token, \
                 or one from `transdb token create --role read|write|admin`)",
            ));
        };
        // The scheme is case-insensitive (RFC 9110, 11.1).
        let token = value
            .to_str()
            .ok()
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            return Err(refuse(
                "not authenticated: the Authorization header must be `Bearer TOKEN`",
            ));
        };
        match self.shared.tokens.verify(token) {
            Some(principal) => Ok(principal.role),
            None => {
                tracing::info!("HTTP request refused: wrong or revoked token");
                Err(refuse(
                    "not authenticated: the token is wrong or revoked: ask an admin for one \
                     (`transdb token create`)",
                ))
            }
        }
    }

    /// Runs `request` for a client of `role` as the QUIC front end would, and returns its
    /// response (decoded from the frame the executor wrote into `frame`).
    async fn execute<'f>(
        &self,
        role: Role,
        request: Request<'_>,
        arrived: Instant,
        frame: &'f mut Vec<u8>,
    ) -> Result<Response<'f>, HttpError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(HttpError::from_error(ErrorResponse::new(
                ErrorCode::SHUTTING_DOWN,
                "the server is shutting down: retry against another server or after it restarts",
            )));
        }
        let request_id = crate::network::next_request_id();
        let span = tracing::debug_span!("request", request_id, kind = request.kind(), via = "http");
        let mut session = Session::new(role);
        crate::network::with_request_id(
            request_id,
            self.shared
                .executor
                .serve(&mut session, request, arrived, frame)
                .instrument(span),
        )
        .await;
        let frame: &'f Vec<u8> = frame;
        let response = frame::decode::<Response<'_>>(&frame[frame::HEADER_BYTES..])
            .expect("the executor writes one valid response frame");
        match response {
            Response::Error(error) => Err(HttpError {
                counted: true,
                ..HttpError::from_error(error)
            }),
            response => Ok(response),
        }
    }

    /// A slot for one request, or 503.
    fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, HttpError> {
        self.slots.try_acquire().map_err(|_| {
            HttpError::from_error(ErrorResponse::new(
                ErrorCode::OVERLOADED,
                "the server is serving --max-http-requests HTTP requests already: retry later",
            ))
        })
    }

    /// Waits (at most [`LOCK_WAIT`]) until `key` can be locked in `mode` soon, or 503.
    async fn wait_for_lock(&self, key: &str, mode: Mode) -> Result<(), HttpError> {
        if self
            .shared
            .executor
            .scheduler
            .wait_for_lock(lock_id(key), mode, LOCK_WAIT)
            .await
        {
            Ok(())
        } else {
            Err(HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "LOCK_TIMEOUT",
                format!(
                    "the key's lock could not be had within {} s (transactions on it are still running); nothing was done: retry later",
                    LOCK_WAIT.as_secs()
                ),
            ))
        }
    }

    /// Reads a request body of at most [`limits::MAX_FRAME_BYTES`] within the stream
    /// timeout, reserving its bytes from `--max-request-memory`.
    async fn body(
        &self,
        body: Body,
    ) -> Result<(bytes::Bytes, crate::network::Reservation), HttpError> {
        let read = tokio::time::timeout(
            self.shared.stream_timeout,
            axum::body::to_bytes(body, limits::MAX_FRAME_BYTES),
        )
        .await
        .map_err(|_| HttpError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: Some(ErrorCode::STREAM_TIMEOUT),
            name: "STREAM_TIMEOUT",
            message: "the request body did not arrive within --stream-timeout-secs".into(),
            counted: false,
        })?
        .map_err(|error| {
            HttpError::from_error(ErrorResponse::new(
                ErrorCode::VALUE_TOO_LARGE,
                format!(
                    "cannot read the request body ({error}): a value or call arguments are at most {} bytes",
                    limits::MAX_VALUE_BYTES
                ),
            ))
        })?;
        let reservation =
            RequestMemory::reserve(&self.shared.request_memory, read.len()).map_err(|code| {
                HttpError::from_error(ErrorResponse::new(
                    code,
                    "the server is at --max-request-memory: retry later",
                ))
            })?;
        Ok((read, reservation))
    }
}

/// What an answered request was: its kind (a [`Request::number`]) and when it arrived, so
/// that refusals the executor never saw are counted like those it did.
#[derive(Clone, Copy)]
struct Arrival {
    kind: usize,
    at: Instant,
}

impl Arrival {
    fn now(kind: usize) -> Self {
        Arrival {
            kind,
            at: Instant::now(),
        }
    }
}

/// The response of `result`, counted: its status class, and a refusal the executor did not
/// answer (a token, body, path or lock wait refused here) as an error of its kind.
fn finish(
    gateway: &Gateway,
    arrival: Option<Arrival>,
    result: Result<HttpResponse, HttpError>,
) -> HttpResponse {
    let metrics = &gateway.shared.executor.metrics;
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(arrival) = arrival
                && !error.counted
            {
                let outcome = match error.code {
                    Some(code) => Outcome::Error(code),
                    None => Outcome::Refused,
                };
                metrics.record(arrival.kind, outcome, arrival.at.elapsed());
            }
            error.into_response()
        }
    };
    metrics.record_http(response.status().as_u16());
    response
}

/// The key of a `/keys/{key}` path, percent-decoded.
fn key_of(path: Result<Path<String>, PathRejection>) -> Result<String, HttpError> {
    path.map(|Path(key)| key).map_err(|rejection| {
        HttpError::new(
            StatusCode::BAD_REQUEST,
            "BAD_PATH",
            format!(
                "{rejection}: a key is the rest of the path after /keys/, percent-encoded UTF-8"
            ),
        )
    })
}

async fn get_key(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> HttpResponse {
    let arrival = Arrival::now(GET);
    let result = async {
        let role = gateway.authenticate(&headers)?;
        let key = key_of(path)?;
        let _slot = gateway.slot()?;
        gateway.wait_for_lock(&key, Mode::Shared).await?;
        let mut frame = Vec::new();
        let request = Request::Get {
            key: key.as_str().into(),
        };
        match gateway
            .execute(role, request, arrival.at, &mut frame)
            .await?
        {
            Response::Value(Some(value)) => Ok((
                [(header::CONTENT_TYPE, "application/octet-stream")],
                value.into_owned(),
            )
                .into_response()),
            Response::Value(None) => Err(HttpError {
                counted: true, // a read that found nothing
                ..HttpError::new(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    format!("no value is stored under {key:?}"),
                )
            }),
            other => Err(unexpected(&other)),
        }
    }
    .await;
    finish(&gateway, Some(arrival), result)
}

async fn put_key(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Body,
) -> HttpResponse {
    let arrival = Arrival::now(PUT);
    let result = async {
        let role = gateway.authenticate(&headers)?;
        let key = key_of(path)?;
        let _slot = gateway.slot()?;
        let (value, _reserved) = gateway.body(body).await?;
        gateway.wait_for_lock(&key, Mode::Exclusive).await?;
        let mut frame = Vec::new();
        let request = Request::Put {
            key: key.as_str().into(),
            value: value.as_ref().into(),
        };
        match gateway
            .execute(role, request, arrival.at, &mut frame)
            .await?
        {
            Response::Stored => Ok(StatusCode::OK.into_response()),
            other => Err(unexpected(&other)),
        }
    }
    .await;
    finish(&gateway, Some(arrival), result)
}

async fn delete_key(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> HttpResponse {
    let arrival = Arrival::now(DELETE);
    let result = async {
        let role = gateway.authenticate(&headers)?;
        let key = key_of(path)?;
        let _slot = gateway.slot()?;
        gateway.wait_for_lock(&key, Mode::Exclusive).await?;
        let mut frame = Vec::new();
        let request = Request::Delete {
            key: key.as_str().into(),
        };
        match gateway
            .execute(role, request, arrival.at, &mut frame)
            .await?
        {
            Response::Deleted { existed } => Ok((
                StatusCode::NO_CONTENT,
                [("x-transdb-existed", if existed { "true" } else { "false" })],
            )
                .into_response()),
            other => Err(unexpected(&other)),
        }
    }
    .await;
    finish(&gateway, Some(arrival), result)
}

async fn call(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> HttpResponse {
    let arrival = Arrival::now(CALL);
    let result = async {
        let role = gateway.authenticate(&headers)?;
        let Path((module, procedure)) = path.map_err(|rejection| {
            HttpError::new(StatusCode::BAD_REQUEST, "BAD_PATH", rejection.to_string())
        })?;
        let _slot = gateway.slot()?;
        let (args, _reserved) = gateway.body(body).await?;
        let args: &[u8] = if args.iter().all(u8::is_ascii_whitespace) {
            b"null" // no body: a procedure without arguments
        } else {
            &args
        };
        if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(args) {
            return Err(HttpError::from_error(ErrorResponse::new(
                ErrorCode::INVALID_ARGUMENTS,
                format!("the request body is not JSON ({error}): send the procedure's arguments as JSON, e.g. {{\"from\":\"alice\",\"to\":\"bob\",\"amount\":5}}"),
            )));
        }
        let mut frame = Vec::new();
        let request = Request::Call {
            module: module.as_str().into(),
            procedure: procedure.as_str().into(),
            encoding: Encoding::Json,
            args: args.into(),
        };
        match gateway.execute(role, request, arrival.at, &mut frame).await? {
            Response::Output(output) => Ok((
                [(header::CONTENT_TYPE, "application/json")],
                output.into_owned(),
            )
                .into_response()),
            other => Err(unexpected(&other)),
        }
    }
    .await;
    finish(&gateway, Some(arrival), result)
}

async fn metrics(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> HttpResponse {
    let result = gateway.authenticate(&headers).map(|_| {
        let executor = &gateway.shared.executor;
        let stats = executor.gauges(executor.scheduler.next_position());
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            executor.metrics.prometheus(&stats),
        )
            .into_response()
    });
    finish(&gateway, None, result)
}

async fn health(State(gateway): State<Arc<Gateway>>) -> HttpResponse {
    let executor = &gateway.shared.executor;
    let log_failed = executor
        .scheduler
        .log()
        .and_then(|log| log.failure())
        .map(|failed| failed.0);
    let shutting_down = gateway.shared.shutdown.is_cancelled();
    let ready = !shutting_down && log_failed.is_none();
    let reason = if shutting_down {
        Some("shutting down".to_owned())
    } else {
        log_failed.map(|failure| format!("the command log failed: {failure}"))
    };
    let body = serde_json::json!({
        "alive": true,
        "ready": ready,
        "reason": reason,
        "position": executor.scheduler.next_position(),
        "uptime_ms": executor.metrics.uptime().as_millis() as u64,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    finish(
        &gateway,
        None,
        Ok((status, axum::Json(body)).into_response()),
    )
}

async fn not_found(State(gateway): State<Arc<Gateway>>) -> HttpResponse {
    finish(
        &gateway,
        None,
        Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route: GET|PUT|DELETE /keys/{key}, POST /call/{module}/{procedure}, GET /metrics, GET /health",
        )),
    )
}

async fn method_not_allowed(
    State(gateway): State<Arc<Gateway>>,
    method: axum::http::Method,
) -> HttpResponse {
    finish(
        &gateway,
        None,
        Err(HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            format!(
                "{method} is not allowed here: /keys/{{key}} takes GET, PUT and DELETE, /call/{{module}}/{{procedure}} POST, /metrics and /health GET"
            ),
        )),
    )
}

/// A response of another kind than the request's (a server bug).
fn unexpected(response: &Response<'_>) -> HttpError {
    HttpError::from_error(ErrorResponse::new(
        ErrorCode::INTERNAL,
        format!("unexpected response {}", response.kind()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_those_of_the_protocol() {
        let key = || std::borrow::Cow::Borrowed("k");
        assert_eq!(Request::Get { key: key() }.number(), GET);
        let value = std::borrow::Cow::Borrowed(&b"v"[..]);
        assert_eq!(Request::Put { key: key(), value }.number(), PUT);
        assert_eq!(Request::Delete { key: key() }.number(), DELETE);
        let call = Request::Call {
            module: key(),
            procedure: key(),
            encoding: Encoding::Json,
            args: std::borrow::Cow::Borrowed(&b"null"[..]),
        };
        assert_eq!(call.number(), CALL);
    }
}
