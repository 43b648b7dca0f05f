//! Interactive transactions over QUIC: `Client::begin`, then `get` / `put` / `delete` on one
//! stream, then `commit` or `rollback`. Reads come from the snapshot taken at `begin`; commit
//! validates what was read and applies every write, or none with `CONFLICT`.

use std::time::Duration;

use transdb_client::{Client, Error};
use transdb_proto::message::BatchOp;
use transdb_proto::{ErrorCode, Request};
use transdb_tests::TestServer;

fn code(error: &Error) -> Option<ErrorCode> {
    error.code()
}

async fn server() -> (TestServer, Client) {
    let server = TestServer::start_with(|config| config.shards = 4).await;
    let client = server.client().await;
    (server, client)
}

#[tokio::test]
async fn a_transaction_reads_its_own_writes_and_commits_them_all_at_once() {
    let (_server, client) = server().await;
    client.put("gone", b"x").await.unwrap();
    let mut tx = client.begin().await.unwrap();
    for i in 0..10 {
        tx.put(&format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    assert_eq!(tx.get("k3").await.unwrap().as_deref(), Some(&b"v3"[..]));
    assert!(tx.delete("gone").await.unwrap(), "it existed");
    assert_eq!(
        tx.get("gone").await.unwrap(),
        None,
        "deleted in the transaction"
    );
    assert_eq!(
        client.get("k3").await.unwrap(),
        None,
        "nothing is visible before commit"
    );
    assert_eq!(
        client.get("gone").await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    let position = tx.commit().await.unwrap();
    for i in 0..10 {
        assert_eq!(
            client.get(&format!("k{i}")).await.unwrap(),
            Some(format!("v{i}").into_bytes())
        );
    }
    assert_eq!(client.get("gone").await.unwrap(), None);
    let stats = client.stats().await.unwrap();
    assert!(stats.position > position, "the commit was ordered before");
}

#[tokio::test]
async fn reads_come_from_the_snapshot_taken_at_begin() {
    let (_server, client) = server().await;
    client.put("a", b"before").await.unwrap();
    let mut tx = client.begin().await.unwrap();
    client.put("a", b"after").await.unwrap();
    client.put("b", b"new").await.unwrap();
    assert_eq!(tx.get("a").await.unwrap().as_deref(), Some(&b"before"[..]));
    assert_eq!(tx.get("b").await.unwrap(), None, "b did not exist yet");
    let snapshot = tx.snapshot();
    assert_eq!(
        tx.commit().await.unwrap(),
        snapshot,
        "a read-only transaction commits at its snapshot"
    );
}

#[tokio::test]
async fn a_key_read_and_written_by_another_transaction_since_makes_commit_conflict() {
    let (_server, client) = server().await;
    client.put("balance", b"100").await.unwrap();
    let mut tx = client.begin().await.unwrap();
    let read = tx.get("balance").await.unwrap().unwrap();
    assert_eq!(read, b"100");
    client.put("balance", b"50").await.unwrap(); // a concurrent, committed write
    tx.put("balance", b"90").await.unwrap();
    tx.put("audit", b"withdrew 10").await.unwrap();
    let error = tx.commit().await.unwrap_err();
    assert_eq!(code(&error), Some(ErrorCode::CONFLICT), "{error}");
    assert!(error.is_retryable());
    assert!(
        error.to_string().contains("\"balance\""),
        "the message names the key: {error}"
    );
    assert_eq!(
        client.get("balance").await.unwrap().as_deref(),
        Some(&b"50"[..])
    );
    assert_eq!(
        client.get("audit").await.unwrap(),
        None,
        "nothing was written"
    );

    // Retried from Begin, it sees the new value and commits.
    let mut retry = client.begin().await.unwrap();
    assert_eq!(
        retry.get("balance").await.unwrap().as_deref(),
        Some(&b"50"[..])
    );
    retry.put("balance", b"40").await.unwrap();
    retry.commit().await.unwrap();
    assert_eq!(
        client.get("balance").await.unwrap().as_deref(),
        Some(&b"40"[..])
    );
}

#[tokio::test]
async fn a_delete_is_a_read_too_and_is_validated() {
    let (_server, client) = server().await;
    let mut tx = client.begin().await.unwrap();
    assert!(
        !tx.delete("k").await.unwrap(),
        "k does not exist at the snapshot"
    );
    client.put("k", b"v").await.unwrap();
    let error = tx.commit().await.unwrap_err();
    assert_eq!(code(&error), Some(ErrorCode::CONFLICT), "{error}");
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test]
async fn blind_writes_do_not_conflict_and_the_later_commit_wins() {
    let (_server, client) = server().await;
    let mut first = client.begin().await.unwrap();
    let mut second = client.begin().await.unwrap();
    first.put("k", b"first").await.unwrap();
    second.put("k", b"second").await.unwrap();
    let second_position = second.commit().await.unwrap();
    let first_position = first.commit().await.unwrap();
    assert!(first_position > second_position);
    assert_eq!(
        client.get("k").await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
}

#[tokio::test]
async fn rollback_and_dropping_a_transaction_write_nothing() {
    let (_server, client) = server().await;
    let mut rolled_back = client.begin().await.unwrap();
    rolled_back.put("a", b"1").await.unwrap();
    rolled_back.rollback().await.unwrap();
    let mut dropped = client.begin().await.unwrap();
    dropped.put("b", b"1").await.unwrap();
    drop(dropped);
    // Later transactions on the same keys commit normally.
    let mut tx = client.begin().await.unwrap();
    assert_eq!(tx.get("a").await.unwrap(), None);
    assert_eq!(tx.get("b").await.unwrap(), None);
    tx.put("b", b"2").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(client.get("a").await.unwrap(), None);
    assert_eq!(client.get("b").await.unwrap().as_deref(), Some(&b"2"[..]));
}

#[tokio::test]
async fn a_lost_connection_rolls_the_transaction_back() {
    let (server, client) = server().await;
    let mut tx = client.begin().await.unwrap();
    tx.put("k", b"never").await.unwrap();
    client.close().await;
    drop(tx);
    let other = server.client().await;
    let mut check = other.begin().await.unwrap();
    assert_eq!(check.get("k").await.unwrap(), None);
    check.put("k", b"v").await.unwrap();
    check.commit().await.unwrap();
    assert_eq!(other.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test]
async fn an_idle_transaction_is_rolled_back_at_the_timeout() {
    const IDLE: Duration = Duration::from_millis(200);
    let server = TestServer::start_with(|config| config.transaction_idle_timeout = IDLE).await;
    let client = server.client().await;
    let mut tx = client.begin().await.unwrap();
    tx.put("k", b"v").await.unwrap();
    // Being idle is the behaviour under test: wait well past the timeout.
    tokio::time::sleep(IDLE * 5).await;
    let error = tx.put("other", b"v").await.unwrap_err();
    assert_eq!(
        code(&error),
        Some(ErrorCode::TRANSACTION_TIMEOUT),
        "{error}"
    );
    assert!(error.is_retryable());
    assert_eq!(client.get("k").await.unwrap(), None, "rolled back");
    // The connection is fine; a brisk transaction commits.
    let mut brisk = client.begin().await.unwrap();
    brisk.put("k", b"w").await.unwrap();
    brisk.commit().await.unwrap();
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"w"[..]));
}

#[tokio::test]
async fn other_requests_are_refused_inside_a_transaction_which_stays_usable() {
    let (server, client) = server().await;
    // Drive one stream by hand, as the client's Transaction does.
    let connection = server.raw_connection().await;
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut reader = transdb_client::wire::FrameReader::new();
    let mut exchange = async |request: Request<'static>| {
        let frame = transdb_proto::frame::encode_to_vec(&request).unwrap();
        send.write_all(&frame).await.unwrap();
        reader
            .next::<transdb_proto::Response<'_>>(&mut recv)
            .await
            .unwrap()
            .unwrap()
            .into_owned()
    };
    use transdb_proto::Response;
    let refused = |response: Response<'static>, expected: ErrorCode| match response {
        Response::Error(error) => assert_eq!(error.code, expected, "{error}"),
        other => panic!("expected {expected:?}, got {other:?}"),
    };
    refused(exchange(Request::Commit).await, ErrorCode::NO_TRANSACTION);
    refused(exchange(Request::Rollback).await, ErrorCode::NO_TRANSACTION);
    assert!(matches!(
        exchange(Request::Begin).await,
        Response::Begun { .. }
    ));
    for request in [
        Request::Begin,
        Request::Stats,
        Request::ListModules,
        Request::Batch {
            ops: vec![BatchOp::Delete { key: "k".into() }],
        },
        Request::Call {
            module: "kv".into(),
            procedure: "get".into(),
            encoding: transdb_proto::message::Encoding::Json,
            args: b"{}".as_slice().into(),
        },
    ] {
        refused(exchange(request).await, ErrorCode::TRANSACTION_OPEN);
    }
    assert_eq!(exchange(Request::Ping).await, Response::Pong);
    assert_eq!(
        exchange(Request::Put {
            key: "k".into(),
            value: b"v".as_slice().into()
        })
        .await,
        Response::Stored
    );
    assert!(matches!(
        exchange(Request::Commit).await,
        Response::Committed { .. }
    ));
    refused(exchange(Request::Commit).await, ErrorCode::NO_TRANSACTION);
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test]
async fn past_a_transaction_limit_the_transaction_ends_and_writes_nothing() {
    let server = TestServer::start_with(|config| {
        config.runtime.keys_per_call = 3;
        config.max_transaction_bytes = 100;
    })
    .await;
    let client = server.client().await;

    let mut tx = client.begin().await.unwrap();
    tx.put("a", b"1").await.unwrap();
    tx.get("b").await.unwrap();
    tx.put("c", b"1").await.unwrap();
    tx.put("a", b"2").await.unwrap(); // a key already counted
    let error = tx.get("d").await.unwrap_err();
    assert_eq!(code(&error), Some(ErrorCode::TOO_MANY_KEYS), "{error}");
    let error = tx.commit().await.unwrap_err();
    assert_eq!(code(&error), Some(ErrorCode::NO_TRANSACTION), "{error}");
    assert_eq!(client.get("a").await.unwrap(), None);

    let mut tx = client.begin().await.unwrap();
    tx.put("a", vec![0u8; 60]).await.unwrap();
    tx.put("a", vec![0u8; 90]).await.unwrap(); // replaces: 1 + 90 bytes
    let error = tx.put("b", vec![0u8; 20]).await.unwrap_err();
    assert_eq!(
        code(&error),
        Some(ErrorCode::TRANSACTION_TOO_LARGE),
        "{error}"
    );
    assert!(
        error.to_string().contains("--max-transaction-bytes"),
        "{error}"
    );
    assert_eq!(client.get("a").await.unwrap(), None);

    // An over-size key is refused by the client before sending; the transaction goes on.
    let mut tx = client.begin().await.unwrap();
    let long = "k".repeat(transdb_proto::limits::MAX_KEY_BYTES + 1);
    let error = tx.get(&long).await.unwrap_err();
    assert_eq!(code(&error), Some(ErrorCode::KEY_TOO_LARGE));
    tx.put("fine", b"v").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        client.get("fine").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}
