//! Key-value semantics over real QUIC against an in-process server.

use transdb_client::{Client, Error};
use transdb_proto::ErrorCode;
use transdb_proto::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use transdb_tests::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_roundtrip_with_overwrite_and_idempotent_delete() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.ping().await.unwrap();
    assert_eq!(client.get("missing").await.unwrap(), None);
    client.put("k", b"first").await.unwrap();
    client.put("k", b"second").await.unwrap();
    assert_eq!(
        client.get("k").await.unwrap().as_deref(),
        Some(&b"second"[..])
    );
    assert!(client.delete("k").await.unwrap());
    assert!(
        !client.delete("k").await.unwrap(),
        "deleting again succeeds and reports absence"
    );
    assert_eq!(client.get("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_binary_safe_and_may_be_empty() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let all_bytes: Vec<u8> = (0..=255).collect();
    client.put("bytes", &all_bytes).await.unwrap();
    client.put("empty", b"").await.unwrap();
    assert_eq!(client.get("bytes").await.unwrap(), Some(all_bytes));
    assert_eq!(client.get("empty").await.unwrap(), Some(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_keys_are_distinct_and_limited_by_their_utf8_length() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // Precomposed and decomposed é are different strings and different keys.
    let keys = [
        "ключ 🔑",
        "日本語のキー",
        "caf\u{e9}",
        "cafe\u{301}",
        "",
        " ",
        "a/b?c#d",
    ];
    for (i, key) in keys.iter().enumerate() {
        client.put(key, i.to_string()).await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            client.get(key).await.unwrap(),
            Some(i.to_string().into_bytes()),
            "key {key:?}"
        );
    }
    // 🔑 is 4 bytes: 256 of them are exactly MAX_KEY_BYTES.
    let at_limit = "🔑".repeat(MAX_KEY_BYTES / 4);
    assert_eq!(at_limit.len(), MAX_KEY_BYTES);
    client.put(&at_limit, b"ok").await.unwrap();
    assert_eq!(
        client.get(&at_limit).await.unwrap().as_deref(),
        Some(&b"ok"[..])
    );
    let over = format!("{at_limit}x");
    let error = client.put(&over, b"no").await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::KEY_TOO_LARGE), "{error}");
    assert!(error.to_string().contains("MAX_KEY_BYTES"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_at_the_limit_is_stored_and_one_byte_more_is_refused_naming_the_limit() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let at_limit: Vec<u8> = (0..MAX_VALUE_BYTES).map(|i| (i % 251) as u8).collect();
    client.put("big", &at_limit).await.unwrap();
    assert_eq!(
        client.get("big").await.unwrap().as_deref(),
        Some(at_limit.as_slice())
    );

    let over = vec![1u8; MAX_VALUE_BYTES + 1];
    let error = client.put("big", &over).await.unwrap_err();
    assert!(
        matches!(&error, Error::Rejected(response) if response.code == ErrorCode::VALUE_TOO_LARGE),
        "{error}"
    );
    assert!(error.to_string().contains("MAX_VALUE_BYTES"), "{error}");
    // Nothing changed and the connection is still usable.
    assert_eq!(
        client.get("big").await.unwrap().as_deref(),
        Some(at_limit.as_slice())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_see_their_own_writes_and_lose_none() {
    const CONNECTIONS: usize = 4;
    const TASKS_PER_CONNECTION: usize = 16;
    const KEYS_PER_TASK: usize = 40;
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for connection in 0..CONNECTIONS {
        let client = server.client().await;
        for task in 0..TASKS_PER_CONNECTION {
            let client: Client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..KEYS_PER_TASK {
                    let key = format!("c{connection}/t{task}/k{i}");
                    client.put(&key, format!("v1 {key}")).await.unwrap();
                    client.put(&key, format!("v2 {key}")).await.unwrap();
                    let read = client.get(&key).await.unwrap();
                    assert_eq!(read, Some(format!("v2 {key}").into_bytes()));
                    if i % 2 == 1 {
                        assert!(client.delete(&key).await.unwrap());
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let reader = server.client().await;
    for connection in 0..CONNECTIONS {
        for task in 0..TASKS_PER_CONNECTION {
            for i in 0..KEYS_PER_TASK {
                let key = format!("c{connection}/t{task}/k{i}");
                let expected = (i % 2 == 0).then(|| format!("v2 {key}").into_bytes());
                assert_eq!(reader.get(&key).await.unwrap(), expected, "{key}");
            }
        }
    }
    let keys: usize = server
        .server
        .store()
        .shard_stats()
        .iter()
        .map(|stats| stats.keys)
        .sum();
    assert_eq!(keys, CONNECTIONS * TASKS_PER_CONNECTION * KEYS_PER_TASK / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_client_reconnects_on_its_next_request() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.put("k", b"v").await.unwrap();
    client.close().await;
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    let clone = client.clone();
    assert_eq!(clone.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_told_so_and_the_others_keep_working() {
    let server = TestServer::start_with(|config| config.max_connections = 2).await;
    let first = server.client().await;
    let second = server.client().await;
    first.ping().await.unwrap();
    second.ping().await.unwrap();
    let error = Client::connect(&server.addr(), server.client_config())
        .await
        .err()
        .expect("a third connection is refused");
    assert!(
        matches!(&error, Error::Connect { reason, .. } if reason.contains("TOO_MANY_CONNECTIONS")),
        "{error}"
    );
    first.put("still", b"works").await.unwrap();
    assert_eq!(
        second.get("still").await.unwrap().as_deref(),
        Some(&b"works"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_server_closes_its_connections() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.ping().await.unwrap();
    let TestServer { server, data_dir } = server;
    drop(server);
    let error = client.ping().await.unwrap_err();
    assert!(
        error.code() == Some(ErrorCode::SHUTTING_DOWN) || matches!(error, Error::Connect { .. }),
        "{error}"
    );
    drop(data_dir);
}
