//! The guest SDK end to end: panics, logging, both encodings, undecodable values.

use transdb_client::{Client, ClientConfig};
use transdb_proto::ErrorCode;
use transdb_tests::{ChildServer, TestServer, procedure_module};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Echo {
    text: String,
    number: i64,
    list: Vec<u32>,
    flag: Option<bool>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_becomes_an_error_with_the_panic_message() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .deploy("testkit", &procedure_module("testkit"))
        .await
        .unwrap();
    let error = client
        .call_json("testkit", "panic", r#"{"message":"the ledger is on fire"}"#)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::GUEST_PANIC), "{error}");
    assert!(
        error.to_string().contains("the ledger is on fire"),
        "{error}"
    );
    assert!(
        error.to_string().contains("src/lib.rs"),
        "the panic location is included: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_and_results_round_trip_in_postcard_and_json() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .deploy("testkit", &procedure_module("testkit"))
        .await
        .unwrap();
    let value = Echo {
        text: "héllo ✓".into(),
        number: -42,
        list: vec![1, 2, 3],
        flag: None,
    };
    let echoed: Echo = client.call("testkit", "echo", &value).await.unwrap();
    assert_eq!(echoed, value);
    let json = r#"{"text":"héllo ✓","number":-42,"list":[1,2,3],"flag":true}"#;
    assert_eq!(
        client.call_json("testkit", "echo", json).await.unwrap(),
        json
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_value_the_procedure_cannot_decode_is_a_clear_error() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .deploy("testkit", &procedure_module("testkit"))
        .await
        .unwrap();
    client.put("n", b"forty-two").await.unwrap();
    let error = client
        .call_json("testkit", "read_number", r#"{"key":"n"}"#)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::INVALID_VALUE), "{error}");
    assert!(
        error.to_string().contains("not a decimal integer"),
        "{error}"
    );
    client.put("n", b"42").await.unwrap();
    assert_eq!(
        client
            .call_json("testkit", "read_number", r#"{"key":"n"}"#)
            .await
            .unwrap(),
        "42"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_logs_reach_the_server_log_tagged_with_module_and_procedure() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let config = ClientConfig::for_data_dir(&dir.path().join("transdb-data")).unwrap();
    let client = Client::connect(&server.addr.to_string(), config)
        .await
        .unwrap();
    client
        .deploy("kit", &procedure_module("testkit"))
        .await
        .unwrap();
    let said = client
        .call_json("kit", "log", r#"{"message":"ping from the guest"}"#)
        .await
        .unwrap();
    assert_eq!(said, r#""ping from the guest""#);
    let line = server.wait_for_log(&["testkit says: ping from the guest"]);
    assert!(
        line.contains("module=\"kit\"") || line.contains("module=kit"),
        "{line}"
    );
    assert!(
        line.contains("procedure=\"log\"") || line.contains("procedure=log"),
        "{line}"
    );
}
