//! The real `transdb` binary as a child process: the CLI, restarts, signals.

use std::path::Path;

use transdb_client::{Client, ClientConfig};
use transdb_proto::{ALPN, ErrorCode, Request, Response, frame};
use transdb_tests::{ChildServer, cli, raw_connection};

fn ca_of(dir: &Path) -> ClientConfig {
    ClientConfig::for_data_dir(&dir.join("transdb-data")).unwrap()
}

#[test]
fn cli_tour_in_the_servers_directory_needs_no_flags_but_the_address() {
    let dir = tempfile::tempdir().unwrap();
    // No --data-dir: the server uses ./transdb-data, and the CLI trusts its certificate.
    let server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.to_string();
    let run = |args: &[&str], stdin: &[u8]| {
        let mut full = vec!["--server", addr.as_str()];
        full.extend_from_slice(args);
        cli(dir.path(), &full, stdin)
    };

    let put = run(&["put", "greeting", "hello world"], b"");
    assert!(put.status.success(), "{}", put.stderr);
    let get = run(&["get", "greeting"], b"");
    assert!(get.status.success(), "{}", get.stderr);
    assert_eq!(get.stdout, b"hello world", "raw bytes, no newline added");

    // `-` reads the value from stdin, binary-safe.
    let binary: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let put = run(&["put", "blob", "-"], &binary);
    assert!(put.status.success(), "{}", put.stderr);
    assert_eq!(run(&["get", "blob"], b"").stdout, binary);

    // Unicode keys work from the command line.
    assert!(run(&["put", "ключ", "значение"], b"").status.success());
    assert_eq!(run(&["get", "ключ"], b"").stdout, "значение".as_bytes());

    let deleted = run(&["delete", "greeting"], b"");
    assert!(deleted.status.success(), "{}", deleted.stderr);
    let again = run(&["delete", "greeting"], b"");
    assert!(
        again.status.success(),
        "delete is idempotent: {}",
        again.stderr
    );

    let missing = run(&["get", "greeting"], b"");
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(missing.stderr.trim(), "not found");
    assert!(missing.stdout.is_empty());

    let too_long = "k".repeat(1025);
    let refused = run(&["put", &too_long, "v"], b"");
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        refused.stderr.contains("MAX_KEY_BYTES"),
        "{}",
        refused.stderr
    );

    let ping = run(&["ping"], b"");
    assert!(ping.status.success(), "{}", ping.stderr);

    let batch = run(
        &["batch", "put", "x", "1", "PUT", "y", "2", "delete", "blob"],
        b"",
    );
    assert!(batch.status.success(), "{}", batch.stderr);
    assert_eq!(
        String::from_utf8_lossy(&batch.stdout).trim(),
        "3 writes applied"
    );
    assert_eq!(run(&["get", "y"], b"").stdout, b"2");
    assert_eq!(run(&["get", "blob"], b"").status.code(), Some(1));
    let bad_batch = run(&["batch", "put", "x"], b"");
    assert_eq!(bad_batch.status.code(), Some(2));
    assert!(
        bad_batch.stderr.contains("needs a value"),
        "{}",
        bad_batch.stderr
    );

    let stats = run(&["stats"], b"");
    assert!(stats.status.success(), "{}", stats.stderr);
    let stats = String::from_utf8_lossy(&stats.stdout).into_owned();
    assert!(
        stats.contains("state hash ") && stats.contains("shard 1:"),
        "{stats}"
    );
}

#[test]
fn cli_errors_say_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let no_ca = cli(empty.path(), &["get", "k"], b"");
    assert_eq!(no_ca.status.code(), Some(2));
    assert!(no_ca.stderr.contains("--ca"), "{}", no_ca.stderr);
    assert!(
        no_ca.stderr.contains("transdb-data/cert.pem"),
        "{}",
        no_ca.stderr
    );

    // A server whose certificate the CLI does not trust.
    let server_dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(server_dir.path(), "127.0.0.1:0", &[]);
    let other_dir = tempfile::tempdir().unwrap();
    let other = ChildServer::start(other_dir.path(), "127.0.0.1:0", &[]);
    let wrong_ca = other_dir.path().join("transdb-data/cert.pem");
    let addr = server.addr.to_string();
    let right_ca = server_dir.path().join("transdb-data/cert.pem");
    let no_token = cli(
        empty.path(),
        &[
            "--server",
            &addr,
            "--ca",
            right_ca.to_str().unwrap(),
            "get",
            "k",
        ],
        b"",
    );
    assert_eq!(no_token.status.code(), Some(2));
    for hint in ["--token-file", "TRANSDB_TOKEN", "admin.token"] {
        assert!(
            no_token.stderr.contains(hint),
            "{hint}: {}",
            no_token.stderr
        );
    }
    let token = server_dir.path().join("transdb-data/admin.token");
    let refused = cli(
        empty.path(),
        &[
            "--server",
            &addr,
            "--ca",
            wrong_ca.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "get",
            "k",
        ],
        b"",
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(refused.stderr.contains("certificate"), "{}", refused.stderr);
    drop(other);

    let bad_ca = empty.path().join("not-a-cert");
    std::fs::write(&bad_ca, "hello").unwrap();
    let invalid = cli(
        empty.path(),
        &[
            "--server",
            &addr,
            "--ca",
            bad_ca.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "get",
            "k",
        ],
        b"",
    );
    assert_eq!(invalid.status.code(), Some(2));
    assert!(invalid.stderr.contains("not-a-cert"), "{}", invalid.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_keeps_its_certificate_and_data_and_clients_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr;
    let certificate = std::fs::read(dir.path().join("transdb-data/cert.pem")).unwrap();
    let key = std::fs::read(dir.path().join("transdb-data/key.pem")).unwrap();
    let mut config = ca_of(dir.path());
    // While the server is down, a reconnect waits this long for an answer.
    config.connect_timeout = std::time::Duration::from_secs(2);
    let client = Client::connect(&addr.to_string(), config).await.unwrap();
    client.put("k", b"v").await.unwrap();

    server.terminate();
    assert!(server.wait().success());
    // A request while the server is down fails cleanly, saying why.
    let down = client.ping().await.unwrap_err().to_string();
    assert!(down.contains("is a server running there"), "{down}");
    assert!(
        down.contains("SHUTTING_DOWN"),
        "the reason the last connection ended: {down}"
    );

    let _restarted = ChildServer::start(dir.path(), &addr.to_string(), &[]);
    assert_eq!(
        std::fs::read(dir.path().join("transdb-data/cert.pem")).unwrap(),
        certificate
    );
    assert_eq!(
        std::fs::read(dir.path().join("transdb-data/key.pem")).unwrap(),
        key
    );
    // The same client, trusting the original certificate, reconnects by itself.
    client.ping().await.unwrap();
    // The acknowledged write was recovered from the command log.
    assert_eq!(
        client.get("k").await.unwrap().as_deref(),
        Some(b"v".as_slice())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let certificate =
        transdb_client::tls::load_certificates(&dir.path().join("transdb-data/cert.pem")).unwrap();
    let token = transdb_tests::admin_token(&dir.path().join("transdb-data"));
    let connection = raw_connection(server.addr, certificate[0].clone(), ALPN)
        .await
        .unwrap();
    transdb_tests::authenticate(&connection, Some(&token)).await;

    let idle = raw_connection(server.addr, certificate[0].clone(), ALPN)
        .await
        .unwrap();
    transdb_tests::authenticate(&idle, Some(&token)).await;
    // A request in flight: its stream is open and half of its frame has arrived.
    let put = frame::encode_to_vec(&Request::Put {
        key: "late".into(),
        value: vec![9; 100_000].into(),
    })
    .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&put[..put.len() / 2]).await.unwrap();
    // Streams are accepted in order, so once a later stream is answered, the server has
    // accepted the first one.
    let (mut ping_send, mut ping_recv) = connection.open_bi().await.unwrap();
    ping_send
        .write_all(&frame::encode_to_vec(&Request::Ping).unwrap())
        .await
        .unwrap();
    ping_send.finish().unwrap();
    ping_recv.read_to_end(1024).await.unwrap();

    server.terminate();
    let line = server.wait_for_line("transdb shutting down");
    // The half-sent put, and possibly the ping until the client acknowledges its answer.
    let waiting: usize = line
        .split("waiting for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(waiting >= 1, "{line}");

    // New connections are refused while the old request drains.
    let refused = Client::connect(&server.addr.to_string(), ca_of(dir.path()))
        .await
        .err();
    let refused = refused
        .expect("a new connection during shutdown must be refused")
        .to_string();
    assert!(refused.contains("shutting down"), "{refused}");

    // The in-flight request completes and is answered.
    send.write_all(&put[put.len() / 2..]).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1024).await.unwrap();
    let (payload, _) = frame::split(&reply).unwrap().unwrap();
    assert_eq!(
        frame::decode::<Response<'_>>(payload).unwrap(),
        Response::Stored
    );

    let status = server.wait();
    assert!(status.success(), "exit status {status:?}");
    // An idle connection is told why it was closed.
    match idle.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(ErrorCode::SHUTTING_DOWN.0)
            );
        }
        other => panic!("expected SHUTTING_DOWN, got {other}"),
    }
}

#[test]
fn two_servers_cannot_share_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let second = cli(dir.path(), &["serve", "--listen", "127.0.0.1:0"], b"");
    assert_eq!(second.status.code(), Some(2));
    assert!(
        second
            .stderr
            .contains("another transdb server is using the data directory"),
        "{}",
        second.stderr
    );
}

#[test]
fn serve_refuses_bad_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let zero = cli(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--shards", "0"],
        b"",
    );
    assert_eq!(zero.status.code(), Some(2));
    assert!(zero.stderr.contains("--shards"), "{}", zero.stderr);
    let half = cli(dir.path(), &["serve", "--cert", "c.pem"], b"");
    assert!(!half.status.success());
    assert!(half.stderr.contains("--key"), "{}", half.stderr);
}
