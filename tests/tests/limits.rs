//! Limits end to end: a full store (`--max-memory`), streams that make no progress
//! (`--stream-timeout-secs`), the request-memory budget (`--max-request-memory`), many
//! connections and the connection limit (`--max-connections`), connections that never
//! authenticate (`--auth-timeout-secs`), and odd requests on an authenticated connection.
//! Each limit refuses with its documented code, and everybody else goes on being served.
//!
//! The tests that open hundreds of connections hold [`LOAD`] exclusively, so that the tests
//! whose subject is a timeout never run beside them on a small machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, ReadError, RecvStream, SendStream, VarInt};
use tokio::sync::{RwLock, Semaphore};
use tokio::task::JoinSet;
use transdb_client::wire::FrameReader;
use transdb_client::{Client, ClientConfig, Error};
use transdb_host::ServerConfig;
use transdb_host::log::Durability;
use transdb_host::store::ENTRY_OVERHEAD_BYTES;
use transdb_proto::message::{BatchOp, ServerStats};
use transdb_proto::{ALPN, ErrorCode, Request, Response, frame};
use transdb_tests::{PATIENCE, TestServer, exchange, ping, procedure_module, raw_connection};

/// Held exclusively by the tests that open hundreds of connections, shared by the others.
static LOAD: RwLock<()> = RwLock::const_new(());

fn varint(code: ErrorCode) -> VarInt {
    VarInt::from_u32(code.0.into())
}

/// The code the server reset `recv` with.
async fn reset_code(recv: &mut RecvStream) -> ErrorCode {
    let outcome = tokio::time::timeout(PATIENCE, recv.read_to_end(usize::MAX))
        .await
        .expect("the stream ends within PATIENCE");
    match outcome {
        Err(quinn::ReadToEndError::Read(ReadError::Reset(code))) => {
            ErrorCode(code.into_inner() as u16)
        }
        Ok(bytes) => panic!(
            "expected a reset, the stream ended after {} bytes",
            bytes.len()
        ),
        Err(other) => panic!("expected a reset, got {other}"),
    }
}

/// One stream driven request by request, as an interactive transaction is.
struct RawStream {
    send: SendStream,
    recv: RecvStream,
    reader: FrameReader,
}

impl RawStream {
    async fn open(connection: &Connection) -> RawStream {
        let (send, recv) = connection.open_bi().await.unwrap();
        RawStream {
            send,
            recv,
            reader: FrameReader::new(),
        }
    }

    async fn exchange(&mut self, request: &Request<'_>) -> Response<'static> {
        self.send
            .write_all(&frame::encode_to_vec(request).unwrap())
            .await
            .unwrap();
        tokio::time::timeout(PATIENCE, self.reader.next::<Response<'_>>(&mut self.recv))
            .await
            .expect("an answer within PATIENCE")
            .expect("an answer, not an error")
            .expect("an answer, not the end of the stream")
            .into_owned()
    }
}

/// Asserts that `result` failed with `code` and returns the error.
fn refused<T: std::fmt::Debug>(result: Result<T, Error>, code: ErrorCode) -> Error {
    let error = result.expect_err("the request must be refused");
    assert_eq!(error.code(), Some(code), "{error}");
    error
}

/// What `--max-memory` counts for one entry.
fn entry_bytes(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD_BYTES
}

/// What `--max-memory` counts for the whole store, from `Stats`.
fn store_bytes(stats: &ServerStats) -> usize {
    stats
        .shards
        .iter()
        .map(|shard| (shard.bytes + shard.keys * ENTRY_OVERHEAD_BYTES as u64) as usize)
        .sum()
}

fn keys(stats: &ServerStats) -> u64 {
    stats.shards.iter().map(|shard| shard.keys).sum()
}

/// Handshakes in flight at once when a test opens hundreds of connections: enough to
/// overlap many, few enough that a small machine running a debug build keeps up. (With a
/// thousand at once, the server's UDP receive buffer overflows and lost handshake packets
/// wait for QUIC's exponential backoff, past 30 s for some.)
const AT_ONCE: usize = 20;

/// What the tests with hundreds of connections change in a server: no fsyncs (they are not
/// the subject), and a shorter idle timeout, so that a connection whose close was lost
/// (UDP) is dropped well within [`PATIENCE`].
fn many_connections(config: &mut ServerConfig) {
    config.durability = Durability::None;
    config.idle_timeout = Duration::from_secs(10);
}

/// A client configuration that waits [`PATIENCE`] to connect and keeps its connection alive
/// well within [`many_connections`]' idle timeout.
fn patient(mut config: ClientConfig) -> ClientConfig {
    config.connect_timeout = PATIENCE;
    config.keep_alive_interval = Duration::from_secs(2);
    config
}

/// Connects `count` clients, [`AT_ONCE`] handshakes at a time; every connection made stays
/// open. Returns each attempt's index and outcome, in completion order.
async fn connect_many(
    addr: &str,
    config: &ClientConfig,
    count: usize,
) -> Vec<(usize, Result<Client, Error>)> {
    let turns = Arc::new(Semaphore::new(AT_ONCE));
    let mut connecting = JoinSet::new();
    for i in 0..count {
        let (addr, config, turns) = (addr.to_string(), config.clone(), turns.clone());
        connecting.spawn(async move {
            let _turn = turns.acquire_owned().await.unwrap();
            (i, Client::connect(&addr, config).await)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = connecting.join_next().await {
        outcomes.push(outcome.unwrap());
    }
    outcomes
}

/// Runs `work` on every client at once and returns the clients.
async fn on_each<F>(
    clients: Vec<(usize, Client)>,
    work: fn(usize, Client) -> F,
) -> Vec<(usize, Client)>
where
    F: Future<Output = (usize, Client)> + Send + 'static,
{
    let mut running = JoinSet::new();
    for (i, client) in clients {
        running.spawn(work(i, client));
    }
    let mut clients = Vec::new();
    while let Some(done) = running.join_next().await {
        clients.push(done.unwrap());
    }
    clients
}

/// Polls `Stats` until the server counts `expected` open connections.
async fn wait_for_connections(observer: &Client, expected: u64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let connections = observer.stats().await.unwrap().connections;
        if connections == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server still counts {connections} connections, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Closes every client, each waiting until its close has gone out; `10 * AT_ONCE` at a
/// time (a close costs the server far less than a handshake; most of its time is the wait).
async fn close_all(clients: impl IntoIterator<Item = Client>) {
    let turns = Arc::new(Semaphore::new(10 * AT_ONCE));
    let mut closing = JoinSet::new();
    for client in clients {
        let turns = turns.clone();
        closing.spawn(async move {
            let _turn = turns.acquire_owned().await.unwrap();
            client.close().await;
        });
    }
    while let Some(closed) = closing.join_next().await {
        closed.unwrap();
    }
}

// 1. A full store.

const STORE_LIMIT: usize = 64 * 1024;

/// Keys written with [`Fill::until_full`] and what `--max-memory` counts for them.
#[derive(Default)]
struct Fill {
    written: Vec<(String, Vec<u8>)>,
    used: usize,
    next: usize,
}

impl Fill {
    /// Writes 4,000-byte values under new keys until the store refuses one, checking that
    /// every put is accepted while the store holds less than the limit and refused from
    /// the moment it holds the limit. Returns how many were accepted.
    async fn until_full(&mut self, client: &Client) -> usize {
        let mut accepted = 0;
        loop {
            assert!(self.next < 1000, "the store never filled");
            let key = format!("fill-{:04}", self.next);
            let value = vec![b'a' + (self.next % 26) as u8; 4000];
            self.next += 1;
            let outcome = client.put(&key, &value).await;
            if self.used < STORE_LIMIT {
                outcome.unwrap_or_else(|error| {
                    panic!(
                        "{key} refused with {} of {STORE_LIMIT} bytes used: {error}",
                        self.used
                    )
                });
                self.used += entry_bytes(&key, &value);
                self.written.push((key, value));
                accepted += 1;
            } else {
                let error = refused(outcome, ErrorCode::STORE_FULL);
                assert!(matches!(error, Error::Rejected(_)), "{error}");
                assert!(error.to_string().contains("--max-memory"), "{error}");
                assert_eq!(client.get(&key).await.unwrap(), None, "{key} was refused");
                return accepted;
            }
        }
    }

    /// Forgets the oldest key (the caller deletes it) and returns it.
    fn take_oldest(&mut self) -> String {
        let (key, value) = self.written.remove(0);
        self.used -= entry_bytes(&key, &value);
        key
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_what_could_add_data_and_keeps_everything_it_holds() {
    let _shared = LOAD.read().await;
    let server = TestServer::start_with(|config| config.max_memory = Some(STORE_LIMIT)).await;
    let client = server.client().await;
    client.deploy("kv", &procedure_module("kv")).await.unwrap();
    // A transaction that writes, opened while there is room; it commits once the store is full.
    let mut late = client.begin().await.unwrap();
    late.put("late", b"too late").await.unwrap();

    let mut fill = Fill::default();
    assert!(fill.until_full(&client).await > 1);
    assert_eq!(store_bytes(&client.stats().await.unwrap()), fill.used);

    // A batch with a put is refused whole: its delete is not applied either.
    let kept = fill.written[0].0.clone();
    let error = client
        .batch(&[
            BatchOp::Put {
                key: "batched".into(),
                value: b"v".as_slice().into(),
            },
            BatchOp::Delete {
                key: kept.as_str().into(),
            },
        ])
        .await;
    refused(error, ErrorCode::STORE_FULL);
    assert!(client.get(&kept).await.unwrap().is_some(), "{kept} kept");
    assert_eq!(client.get("batched").await.unwrap(), None);

    // A transaction's writes are checked at its commit, which writes nothing.
    refused(late.commit().await, ErrorCode::STORE_FULL);
    assert_eq!(client.get("late").await.unwrap(), None);
    // A transaction begun while full: its put is refused at once, the transaction stays
    // open, and with only deletes it commits.
    let mut deleting = client.begin().await.unwrap();
    refused(deleting.put("in-tx", b"v").await, ErrorCode::STORE_FULL);
    assert!(!deleting.delete("never-existed").await.unwrap());
    deleting.commit().await.unwrap();
    assert_eq!(client.get("in-tx").await.unwrap(), None);

    // A procedure that may write is refused before it runs; one that only reads runs.
    let put = transdb_procedures_kv::Put {
        key: "by-call".into(),
        value: "v".into(),
    };
    refused(
        client.call::<_, ()>("kv", "put", &put).await,
        ErrorCode::STORE_FULL,
    );
    assert_eq!(client.get("by-call").await.unwrap(), None);
    let (key, value) = &fill.written[1];
    let read: Option<String> = client
        .call(
            "kv",
            "get",
            &transdb_procedures_kv::Key { key: key.clone() },
        )
        .await
        .unwrap();
    assert_eq!(read.as_deref().map(str::as_bytes), Some(value.as_slice()));
    assert_eq!(
        store_bytes(&client.stats().await.unwrap()),
        fill.used,
        "no refused request wrote anything"
    );

    // Deletes are always accepted, also those that free nothing (the store stays full).
    assert!(!client.delete("absent").await.unwrap());
    let absent = [
        BatchOp::Delete {
            key: "absent-1".into(),
        },
        BatchOp::Delete {
            key: "absent-2".into(),
        },
    ];
    assert_eq!(client.batch(&absent).await.unwrap(), 2);
    refused(client.put("one-more", b"v").await, ErrorCode::STORE_FULL);

    // A batch of deletes frees room, and puts fit again until the store is full again.
    let gone = fill.take_oldest();
    let deletes = [BatchOp::Delete {
        key: gone.as_str().into(),
    }];
    assert_eq!(client.batch(&deletes).await.unwrap(), 1);
    assert!(fill.until_full(&client).await >= 1);
    // So does a single delete.
    let gone = fill.take_oldest();
    assert!(client.delete(&gone).await.unwrap());
    assert!(fill.until_full(&client).await >= 1);

    // Nothing was evicted: every key written and not deleted holds its value, and the store
    // holds exactly those.
    for (key, value) in &fill.written {
        assert_eq!(
            client.get(key).await.unwrap().as_deref(),
            Some(value.as_slice()),
            "{key}"
        );
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(keys(&stats), fill.written.len() as u64);
    assert_eq!(store_bytes(&stats), fill.used);
}

// 2. Streams that make no progress.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_make_no_progress_are_reset_with_stream_timeout() {
    let _shared = LOAD.read().await;
    let server = TestServer::start_with(|config| {
        config.stream_timeout = Duration::from_millis(500);
        config.transaction_idle_timeout = 2 * PATIENCE;
    })
    .await;
    let connection = server.raw_connection().await;
    let bystander = server.client().await;

    // An interactive transaction, silent from now on: it has its own idle timeout.
    let mut transaction = RawStream::open(&connection).await;
    assert!(matches!(
        transaction.exchange(&Request::Begin).await,
        Response::Begun { .. }
    ));
    // Half a frame, then silence.
    let (mut half_send, mut half_recv) = connection.open_bi().await.unwrap();
    half_send.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
    // A stream with nothing sent on it: the server learns of it once a later stream is used.
    // (Its send side is kept: dropping it would finish the stream.)
    let (silent_send, mut silent_recv) = connection.open_bi().await.unwrap();
    ping(&connection).await;

    // Another client is served meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = tokio::spawn({
        let (client, stop) = (bystander.clone(), stop.clone());
        async move {
            let mut served = 0u32;
            loop {
                let key = format!("bystander-{served}");
                client.put(&key, b"here").await.unwrap();
                assert_eq!(
                    client.get(&key).await.unwrap().as_deref(),
                    Some(&b"here"[..])
                );
                served += 1;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return served;
                }
            }
        }
    });
    let (half, silent) = tokio::join!(reset_code(&mut half_recv), reset_code(&mut silent_recv));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(served.await.unwrap() > 0);
    assert_eq!(half, ErrorCode::STREAM_TIMEOUT);
    assert_eq!(silent, ErrorCode::STREAM_TIMEOUT);
    // Both directions: the server stopped reading too.
    for send in [&half_send, &silent_send] {
        let stopped = tokio::time::timeout(PATIENCE, send.stopped())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stopped, Some(varint(ErrorCode::STREAM_TIMEOUT)));
    }

    // The transaction went quiet before the stalled streams started, so it has been idle
    // longer than the stream timeout; it is still open and commits.
    assert_eq!(
        transaction
            .exchange(&Request::Put {
                key: "tx".into(),
                value: b"committed".as_slice().into(),
            })
            .await,
        Response::Stored
    );
    assert!(matches!(
        transaction.exchange(&Request::Commit).await,
        Response::Committed { .. }
    ));
    assert_eq!(
        bystander.get("tx").await.unwrap().as_deref(),
        Some(&b"committed"[..])
    );
    // The connection itself goes on.
    ping(&connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_left_unread_is_reset_with_stream_timeout() {
    let _shared = LOAD.read().await;
    // Not much shorter: the put of the value below must arrive within it (see
    // `a_frame_that_keeps_arriving_is_not_timed_out`).
    let server =
        TestServer::start_with(|config| config.stream_timeout = Duration::from_secs(1)).await;
    let client = server.client().await;
    // Larger than a stream's flow-control window (quinn's default, 1.25 MB), so the server
    // cannot hand all of the answer to QUIC while the client reads none of it.
    let value = vec![7u8; 2 << 20];
    client.put("big", &value).await.unwrap();

    let connection = server.raw_connection().await;
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&frame::encode_to_vec(&Request::Get { key: "big".into() }).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    // Never read from `recv`: only wait for its reset.
    let reset = tokio::time::timeout(PATIENCE, recv.received_reset())
        .await
        .expect("reset within PATIENCE")
        .expect("the stream is reset, not closed");
    assert_eq!(reset, Some(varint(ErrorCode::STREAM_TIMEOUT)));

    // A client that reads gets the same value; the connection goes on.
    assert_eq!(
        client.get("big").await.unwrap().as_deref(),
        Some(value.as_slice())
    );
    ping(&connection).await;
}

/// The stream timeout is a time without progress, not a deadline for a whole frame: a
/// request that keeps arriving, however slowly, is never reset (the server wraps each read,
/// and each write of an answer, in the timeout, not the whole frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_keeps_arriving_is_not_timed_out() {
    let _shared = LOAD.read().await;
    const TIMEOUT: Duration = Duration::from_secs(1);
    const PIECES: u32 = 20;
    let server = TestServer::start_with(|config| config.stream_timeout = TIMEOUT).await;
    let connection = server.raw_connection().await;
    let request = frame::encode_to_vec(&Request::Put {
        key: "slow".into(),
        value: vec![5u8; 20_000].as_slice().into(),
    })
    .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // A slow client: a piece every tenth of the timeout, twice the timeout in all. The
    // sleeps are the client's pace, not synchronisation.
    for piece in request.chunks(request.len().div_ceil(PIECES as usize)) {
        if send.write_all(piece).await.is_err() {
            break; // reset: the read below says with what
        }
        tokio::time::sleep(TIMEOUT / (PIECES / 2)).await;
    }
    let _ = send.finish();
    let outcome = tokio::time::timeout(PATIENCE, recv.read_to_end(1 << 20))
        .await
        .expect("an answer within PATIENCE");
    match outcome {
        Ok(reply) => {
            let (payload, _) = frame::split(&reply).unwrap().expect("a whole frame");
            assert_eq!(
                frame::decode::<Response<'_>>(payload).unwrap(),
                Response::Stored
            );
        }
        Err(error) => panic!(
            "a request that made progress every {:?} was refused ({error}) under a stream \
             timeout of {TIMEOUT:?}",
            TIMEOUT / (PIECES / 2)
        ),
    }
}

// 3. The request-memory budget.

const REQUEST_MEMORY: usize = 1 << 20;

/// The length of a value whose `Put` under `key` is a frame of exactly `bytes`, its length
/// prefix included (what the budget counts).
fn value_for_frame(key: &str, bytes: usize) -> usize {
    let frame_bytes = |length: usize| {
        frame::encode_to_vec(&Request::Put {
            key: key.into(),
            value: vec![0u8; length].as_slice().into(),
        })
        .unwrap()
        .len()
    };
    let length = bytes - (frame_bytes(bytes) - bytes);
    assert_eq!(frame_bytes(length), bytes);
    length
}

/// `client.put`, retried while it is refused with `OVERLOADED`: the server releases a
/// request's reservation just after sending its answer, so a client that sends the next
/// request at once may find a few bytes of the budget still held.
async fn put_once_the_budget_is_free(client: &Client, key: &str, value: &[u8]) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match client.put(key, value).await {
            Ok(()) => return,
            Err(error)
                if error.code() == Some(ErrorCode::OVERLOADED) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("{key} ({} bytes): {error}", value.len()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_request_memory_budget_are_refused_and_the_budget_comes_back() {
    let _shared = LOAD.read().await;
    let server = TestServer::start_with(|config| config.max_request_memory = REQUEST_MEMORY).await;
    let client = server.client().await;
    let connection = server.raw_connection().await;
    let big = vec![1u8; 2 * REQUEST_MEMORY];

    // A frame larger than the whole budget could never fit: on a raw stream it is reset
    // with FRAME_TOO_LARGE, not the retryable OVERLOADED.
    let request = frame::encode_to_vec(&Request::Put {
        key: "big".into(),
        value: big.as_slice().into(),
    })
    .unwrap();
    assert_eq!(
        exchange(&connection, &request, true).await,
        Err(ErrorCode::FRAME_TOO_LARGE)
    );
    // Through the client: a stream reset that is not retryable.
    let error = client.put("big", &big).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::StreamReset {
                code: ErrorCode::FRAME_TOO_LARGE
            }
        ),
        "{error}"
    );
    assert!(!error.is_retryable(), "{error}");
    assert_eq!(client.get("big").await.unwrap(), None);

    // The budget counts the whole frame: exactly the budget fits, a byte more never does.
    let fits = value_for_frame("edge", REQUEST_MEMORY);
    refused(
        client.put("edge", vec![2u8; fits + 1]).await,
        ErrorCode::FRAME_TOO_LARGE,
    );
    put_once_the_budget_is_free(&client, "edge", &vec![2u8; fits]).await;
    assert_eq!(
        client.get("edge").await.unwrap().map(|v| v.len()),
        Some(fits)
    );
    ping(&connection).await;

    // Under contention: large puts (at most two fit at once) are stored or refused, small
    // ones always fit beside them.
    let mut tasks = JoinSet::new();
    for task in 0..6u8 {
        let client = server.client().await;
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..3 {
                let key = format!("large-{task}-{i}");
                let value = vec![task; 400 << 10];
                match client.put(&key, &value).await {
                    Ok(()) => outcomes.push((key, Some(value))),
                    Err(Error::StreamReset {
                        code: ErrorCode::OVERLOADED,
                    }) => outcomes.push((key, None)),
                    Err(other) => panic!("{key}: {other}"),
                }
            }
            outcomes
        });
    }
    for task in 0..4 {
        let client = server.client().await;
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..25 {
                let key = format!("small-{task}-{i}");
                let value = format!("{task}/{i}").into_bytes();
                client
                    .put(&key, &value)
                    .await
                    .unwrap_or_else(|error| panic!("{key}: {error}"));
                outcomes.push((key, Some(value)));
            }
            outcomes
        });
    }
    let mut stored_large = 0;
    while let Some(outcomes) = tasks.join_next().await {
        for (key, value) in outcomes.unwrap() {
            stored_large += usize::from(key.starts_with("large") && value.is_some());
            assert_eq!(client.get(&key).await.unwrap(), value, "{key}");
        }
    }
    assert!(stored_large > 0, "the budget always has room for one");

    // Once everything is answered, the whole budget is free again.
    put_once_the_budget_is_free(&client, "edge", &vec![3u8; fits]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_frame_holds_its_reservation_only_until_the_stream_timeout() {
    let _shared = LOAD.read().await;
    let server = TestServer::start_with(|config| {
        config.max_request_memory = REQUEST_MEMORY;
        config.stream_timeout = Duration::from_secs(1);
    })
    .await;
    let client = server.client().await;
    let connection = server.raw_connection().await;
    let fits = value_for_frame("stalled", REQUEST_MEMORY);
    let whole = frame::encode_to_vec(&Request::Put {
        key: "stalled".into(),
        value: vec![3u8; fits].as_slice().into(),
    })
    .unwrap();
    // A frame announcing the whole budget, a little of it sent, then silence. Once the
    // server has read its header, even a Ping does not fit.
    let mut attempts = 0;
    let (_stalled_send, mut stalled_recv) = loop {
        attempts += 1;
        assert!(attempts <= 10, "the stalled frame was never admitted");
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&whole[..4096]).await.unwrap();
        let held = async {
            let deadline = Instant::now() + PATIENCE;
            loop {
                match client.ping().await {
                    Err(error) if error.code() == Some(ErrorCode::OVERLOADED) => return,
                    Ok(()) => {
                        assert!(Instant::now() < deadline, "the frame was never admitted");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(error) => panic!("{error}"),
                }
            }
        };
        tokio::select! {
            () = held => break (send, recv),
            // A Ping held its bytes just when the frame's header was read: try again.
            code = reset_code(&mut recv) => assert_eq!(code, ErrorCode::OVERLOADED),
        }
    };
    // The stall ends with the stream timeout, and the reservation with it.
    assert_eq!(
        reset_code(&mut stalled_recv).await,
        ErrorCode::STREAM_TIMEOUT
    );
    put_once_the_budget_is_free(&client, "stalled", &vec![3u8; fits]).await;
    assert_eq!(
        client.get("stalled").await.unwrap().map(|v| v.len()),
        Some(fits)
    );
}

// 4. Many connections, and the connection limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_open_at_once_are_all_served() {
    let _exclusive = LOAD.write().await;
    const CLIENTS: usize = 1000;
    let server = TestServer::start_with(many_connections).await;
    let config = patient(server.client_config());
    let clients: Vec<(usize, Client)> = connect_many(&server.addr(), &config, CLIENTS)
        .await
        .into_iter()
        .map(|(i, outcome)| {
            (
                i,
                outcome.unwrap_or_else(|error| panic!("client {i}: {error}")),
            )
        })
        .collect();
    // All 1,000 open at once, each pings and writes its own key, all at the same time.
    let clients = on_each(clients, |i, client| async move {
        client.ping().await.unwrap();
        client
            .put(&format!("client-{i:04}"), i.to_string())
            .await
            .unwrap_or_else(|error| panic!("client {i}: {error}"));
        (i, client)
    })
    .await;
    let observer = server.client().await;
    let stats = observer.stats().await.unwrap();
    assert_eq!(stats.connections, CLIENTS as u64 + 1);
    assert_eq!(keys(&stats), CLIENTS as u64);
    // Each reads its own key back on its own connection.
    let clients = on_each(clients, |i, client| async move {
        let value = client.get(&format!("client-{i:04}")).await.unwrap();
        assert_eq!(value, Some(i.to_string().into_bytes()), "client {i}");
        (i, client)
    })
    .await;
    close_all(clients.into_iter().map(|(_, client)| client)).await;
    wait_for_connections(&observer, 1).await;
    observer.put("after", b"all closed").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_limit_connections_are_refused_and_their_slots_come_back() {
    let _exclusive = LOAD.write().await;
    const LIMIT: usize = 100;
    const ATTEMPTS: usize = 300;
    let server = TestServer::start_with(|config| {
        many_connections(config);
        config.max_connections = LIMIT;
    })
    .await;
    let (addr, config) = (server.addr(), patient(server.client_config()));
    let (mut admitted, mut refused_count) = (Vec::new(), 0);
    for (i, outcome) in connect_many(&addr, &config, ATTEMPTS).await {
        match outcome {
            Ok(client) => admitted.push((i, client)),
            Err(Error::Connect { reason, .. }) if reason.contains("TOO_MANY_CONNECTIONS") => {
                refused_count += 1;
            }
            Err(other) => panic!("attempt {i}, neither admitted nor refused cleanly: {other}"),
        }
    }
    // A connection takes its slot when it arrives and keeps it while it is open (here: to
    // the end), so exactly LIMIT are admitted, however the attempts overlap.
    assert_eq!(admitted.len(), LIMIT);
    assert_eq!(refused_count, ATTEMPTS - LIMIT);
    let admitted = on_each(admitted, |i, client| async move {
        client.put(&format!("admitted-{i}"), b"in").await.unwrap();
        (i, client)
    })
    .await;
    // The refused ones gave their slots back; the admitted ones hold theirs.
    wait_for_connections(&admitted[0].1, LIMIT as u64).await;
    let error = Client::connect(&addr, config.clone())
        .await
        .err()
        .expect("the server is at its limit");
    assert!(
        matches!(&error, Error::Connect { reason, .. } if reason.contains("TOO_MANY_CONNECTIONS")),
        "{error}"
    );

    close_all(admitted.into_iter().map(|(_, client)| client)).await;
    // Their slots come back: a fresh client connects (once the closes have arrived) and
    // ends up the only connection.
    let deadline = Instant::now() + PATIENCE;
    let fresh = loop {
        match Client::connect(&addr, config.clone()).await {
            Ok(client) => break client,
            Err(Error::Connect { reason, .. })
                if reason.contains("TOO_MANY_CONNECTIONS") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("{error}"),
        }
    };
    wait_for_connections(&fresh, 1).await;
    assert_eq!(keys(&fresh.stats().await.unwrap()), LIMIT as u64);
}

// 5. Connections that never authenticate.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_are_closed_with_unauthenticated() {
    let _exclusive = LOAD.write().await;
    const FLOOD: usize = 200;
    let server =
        TestServer::start_with(|config| config.auth_timeout = Duration::from_secs(1)).await;
    // Connected (and authenticated) before the flood.
    let client = server.client().await;
    let (addr, certificate) = (server.server.local_addr(), server.certificate());
    let turns = Arc::new(Semaphore::new(AT_ONCE));
    let mut flood = JoinSet::new();
    for i in 0..FLOOD {
        let (certificate, turns) = (certificate.clone(), turns.clone());
        flood.spawn(async move {
            let turn = turns.acquire_owned().await.unwrap();
            let connection = match raw_connection(addr, certificate, ALPN).await {
                Ok(connection) => connection,
                // Closed before this side saw the handshake finish (a slow machine).
                Err(error) => return error,
            };
            drop(turn);
            // Kept until the connection closes: dropping a send stream finishes it.
            let mut streams = Vec::new();
            match i % 4 {
                // Silent: no stream at all.
                0 | 1 => {}
                // Half an Authenticate, then silence.
                2 => {
                    let (mut send, recv) = connection.open_bi().await.unwrap();
                    let request = frame::encode_to_vec(&Request::Authenticate {
                        token: Some("tdb_someone_secret".into()),
                    })
                    .unwrap();
                    let _ = send.write_all(&request[..request.len() - 3]).await;
                    streams.push((send, recv));
                }
                // A length prefix of u32::MAX instead of Authenticate.
                _ => {
                    let (mut send, recv) = connection.open_bi().await.unwrap();
                    let _ = send.write_all(&u32::MAX.to_be_bytes()).await;
                    streams.push((send, recv));
                }
            }
            let closed = connection.closed().await;
            drop(streams);
            closed
        });
    }
    // Served during the flood.
    client.ping().await.unwrap();
    client.put("during", b"the flood").await.unwrap();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut closed = Vec::new();
        while let Some(error) = flood.join_next().await {
            closed.push(error.unwrap());
        }
        closed
    })
    .await
    .expect("every unauthenticated connection is closed within PATIENCE");
    for error in closed {
        assert!(
            matches!(&error, ConnectionError::ApplicationClosed(close)
                if close.error_code == varint(ErrorCode::UNAUTHENTICATED)),
            "{error}"
        );
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.auth_failures, FLOOD as u64);
    wait_for_connections(&client, 1).await;
    // Served after the flood, by an existing connection and a new one.
    assert_eq!(
        client.get("during").await.unwrap().as_deref(),
        Some(&b"the flood"[..])
    );
    let fresh = server.client().await;
    fresh.ping().await.unwrap();
    wait_for_connections(&fresh, 2).await;
}

// 6. Odd requests on an authenticated connection.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticating_again_is_refused_and_the_connection_goes_on() {
    let _shared = LOAD.read().await;
    let server = TestServer::start().await;
    let connection = server.raw_connection().await;
    let mut stream = RawStream::open(&connection).await;
    // The right token, a wrong one, none: all refused the same way, on the same stream.
    for token in [
        Some(server.admin_token()),
        Some("tdb_nobody_secret".to_string()),
        None,
    ] {
        match stream
            .exchange(&Request::Authenticate {
                token: token.map(Into::into),
            })
            .await
        {
            Response::Error(error) => {
                assert_eq!(error.code, ErrorCode::PERMISSION_DENIED, "{error}");
                assert!(error.message.contains("already authenticated"), "{error}");
            }
            other => panic!("expected PERMISSION_DENIED, got {other:?}"),
        }
        assert_eq!(stream.exchange(&Request::Ping).await, Response::Pong);
    }
    // A length prefix of u32::MAX (the largest a prefix can say) resets only its stream.
    assert_eq!(
        exchange(&connection, &u32::MAX.to_be_bytes(), false).await,
        Err(ErrorCode::FRAME_TOO_LARGE)
    );
    assert!(
        connection.close_reason().is_none(),
        "the connection is open"
    );
    assert_eq!(stream.exchange(&Request::Ping).await, Response::Pong);
    ping(&connection).await;
    // None of that was a failed authentication.
    let stats = server.client().await.stats().await.unwrap();
    assert_eq!(stats.auth_failures, 0);
}
