//! `Client::pipeline`: many requests on one stream, answered in order, each its own
//! transaction, over real QUIC against an in-process server.

use std::borrow::Cow;

use transdb_client::Error;
use transdb_proto::message::Encoding;
use transdb_proto::{ErrorCode, Request, Response};
use transdb_tests::{TestServer, procedure_module};

fn get(key: &str) -> Request<'_> {
    Request::Get { key: key.into() }
}

fn put<'a>(key: &'a str, value: &'a [u8]) -> Request<'a> {
    Request::Put {
        key: key.into(),
        value: value.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_in_order_and_later_requests_see_earlier_ones() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let answers = client
        .pipeline(&[
            get("p"),
            put("p", b"1"),
            get("p"),
            Request::Delete { key: "p".into() },
            get("p"),
            Request::Ping,
        ])
        .await
        .unwrap();
    let answers: Vec<Response<'static>> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        answers,
        vec![
            Response::Value(None),
            Response::Stored,
            Response::Value(Some(Cow::Owned(b"1".to_vec()))),
            Response::Deleted { existed: true },
            Response::Value(None),
            Response::Pong,
        ]
    );
    assert!(client.pipeline(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_fails_alone_and_its_neighbours_apply() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    client
        .call_json("bank", "open", r#"{"account":"a","balance":5}"#)
        .await
        .unwrap();
    let call = |json: &'static str| Request::Call {
        module: "bank".into(),
        procedure: "withdraw".into(),
        encoding: Encoding::Json,
        args: json.as_bytes().into(),
    };
    let answers = client
        .pipeline(&[
            put("before", b"x"),
            call(r#"{"account":"a","amount":50}"#),
            call(r#"{"account":"a","amount":2}"#),
            put("after", b"y"),
        ])
        .await
        .unwrap();
    assert!(matches!(answers[0], Ok(Response::Stored)));
    match &answers[1] {
        Err(Error::Rejected(error)) => {
            assert_eq!(error.code, ErrorCode::ABORTED);
            assert!(error.message.contains("insufficient funds"), "{error}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    assert_eq!(
        answers[2].as_ref().unwrap(),
        &Response::Output(Cow::Owned(b"3".to_vec()))
    );
    assert!(matches!(answers[3], Ok(Response::Stored)));
    assert_eq!(
        client.get("after").await.unwrap().as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        client.get("account:a").await.unwrap().as_deref(),
        Some(&b"3"[..]),
        "only the withdrawal that had the funds applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_and_oversized_requests_are_refused_before_anything_is_sent() {
    let server = TestServer::start().await;
    let client = server.client().await;
    for control in [Request::Begin, Request::Commit, Request::Rollback] {
        match client.pipeline(&[put("never", b"1"), control]).await {
            Err(Error::Config(message)) => {
                assert!(message.contains("Client::begin"), "{message}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    let long_key = "k".repeat(transdb_proto::limits::MAX_KEY_BYTES + 1);
    match client.pipeline(&[put("never", b"1"), get(&long_key)]).await {
        Err(Error::Rejected(error)) => assert_eq!(error.code, ErrorCode::KEY_TOO_LARGE),
        other => panic!("expected KEY_TOO_LARGE, got {other:?}"),
    }
    assert_eq!(
        client.get("never").await.unwrap(),
        None,
        "a refused pipeline sends none of its requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_applies_every_request_once() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let keys: Vec<String> = (0..2_000).map(|index| format!("long-{index}")).collect();
    let requests: Vec<Request<'_>> = keys
        .iter()
        .map(|key| put(key, key.as_bytes()))
        .chain(keys.iter().map(|key| get(key)))
        .collect();
    let answers = client.pipeline(&requests).await.unwrap();
    assert_eq!(answers.len(), 4_000);
    for (key, answer) in keys.iter().zip(&answers[2_000..]) {
        assert_eq!(
            answer.as_ref().unwrap(),
            &Response::Value(Some(Cow::Owned(key.as_bytes().to_vec())))
        );
    }
    let stats = client.stats().await.unwrap();
    let stored: u64 = stats.shards.iter().map(|shard| shard.keys).sum();
    assert_eq!(stored, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_answers_larger_than_the_flow_control_windows_do_not_deadlock() {
    // 24 MiB of puts and 24 MiB of answers, interleaved: the client must read answers while
    // it is still writing requests, or both sides wait for each other.
    let server = TestServer::start().await;
    let client = server.client().await;
    let value = vec![7u8; 1024 * 1024];
    let keys: Vec<String> = (0..24).map(|index| format!("big-{index}")).collect();
    let mut requests = Vec::new();
    for key in &keys {
        requests.push(put(key, &value));
        requests.push(get(key));
    }
    let answers = tokio::time::timeout(transdb_tests::PATIENCE, client.pipeline(&requests))
        .await
        .expect("the pipeline finishes")
        .unwrap();
    for pair in answers.chunks(2) {
        assert!(matches!(pair[0], Ok(Response::Stored)));
        match &pair[1] {
            Ok(Response::Value(Some(read))) => assert_eq!(read.len(), value.len()),
            other => panic!("expected the value, got {other:?}"),
        }
    }
}
