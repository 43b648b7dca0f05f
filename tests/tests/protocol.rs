//! Bad input on raw QUIC streams and connections: each gets its documented error code, and
//! the server goes on serving the same connection and everybody else.

use transdb_client::{Client, ClientConfig};
use transdb_proto::limits::{MAX_FRAME_BYTES, MAX_VALUE_BYTES};
use transdb_proto::{ErrorCode, Request, Response, frame};
use transdb_tests::{TestServer, exchange, ping, raw_connection};

fn single_response(bytes: &[u8]) -> Response<'static> {
    let (payload, consumed) = frame::split(bytes).unwrap().expect("a whole frame");
    assert_eq!(consumed, bytes.len(), "exactly one frame");
    frame::decode::<Response<'_>>(payload).unwrap().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_violations_reset_only_their_stream_with_the_matching_code() {
    let server = TestServer::start().await;
    let connection = server.raw_connection().await;
    let bystander = server.client().await;
    bystander.put("bystander", b"here").await.unwrap();

    // A well-framed payload that is no message.
    let garbage = [0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef];
    assert_eq!(
        exchange(&connection, &garbage, true).await,
        Err(ErrorCode::MALFORMED_FRAME)
    );
    // A valid message followed by a byte of trailing junk inside the frame.
    let mut trailing = frame::encode_to_vec(&Request::Ping).unwrap();
    trailing.push(0);
    trailing[3] += 1;
    assert_eq!(
        exchange(&connection, &trailing, true).await,
        Err(ErrorCode::MALFORMED_FRAME)
    );
    // The stream ends inside the length prefix, and inside the payload.
    assert_eq!(
        exchange(&connection, &[0, 0], true).await,
        Err(ErrorCode::TRUNCATED_FRAME)
    );
    assert_eq!(
        exchange(&connection, &[0, 0, 0, 10, 1, 2], true).await,
        Err(ErrorCode::TRUNCATED_FRAME)
    );
    // A length over the limit is refused without waiting for the payload (no FIN sent).
    let oversized = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
    assert_eq!(
        exchange(&connection, &oversized, false).await,
        Err(ErrorCode::FRAME_TOO_LARGE)
    );
    // Random noise.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(exchange(&connection, &noise, true).await.is_err());

    // The same connection still works, and so does everybody else.
    ping(&connection).await;
    assert_eq!(
        bystander.get("bystander").await.unwrap().as_deref(),
        Some(&b"here"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_checks_limits_itself_and_keeps_the_stream_usable() {
    let server = TestServer::start().await;
    let connection = server.raw_connection().await;
    // A client that skips the client-side check: the frame fits, the value does not.
    let over = vec![7u8; MAX_VALUE_BYTES + 1];
    let mut bytes = frame::encode_to_vec(&Request::Put {
        key: "k".into(),
        value: over.as_slice().into(),
    })
    .unwrap();
    // Several requests on one stream are answered in order.
    frame::encode(&Request::Get { key: "k".into() }, &mut bytes).unwrap();
    let reply = exchange(&connection, &bytes, true).await.unwrap();
    let (first, used) = frame::split(&reply).unwrap().unwrap();
    match frame::decode::<Response<'_>>(first).unwrap() {
        Response::Error(error) => {
            assert_eq!(error.code, ErrorCode::VALUE_TOO_LARGE);
            assert!(
                error.message.contains("MAX_VALUE_BYTES"),
                "{}",
                error.message
            );
        }
        other => panic!("expected VALUE_TOO_LARGE, got {}", other.kind()),
    }
    assert_eq!(
        single_response(&reply[used..]),
        Response::Value(None),
        "nothing was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_our_alpn_is_refused() {
    let server = TestServer::start().await;
    let refused = raw_connection(server.server.local_addr(), server.certificate(), b"h3").await;
    assert!(refused.is_err(), "handshake without transdb/1 must fail");
    server.client().await.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_streams_do_not_disturb_other_requests() {
    let server = TestServer::start().await;
    let connection = server.raw_connection().await;
    for _ in 0..50 {
        let (mut send, recv) = connection.open_bi().await.unwrap();
        send.write_all(&[0, 0, 1]).await.unwrap(); // half a length prefix, then silence
        drop(recv);
        std::mem::forget(send); // neither finished nor reset: the stream just stays open
    }
    ping(&connection).await;
    server.client().await.put("k", b"v").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_client_does_not_trust_is_refused_with_a_hint() {
    let server = TestServer::start().await;
    let other = TestServer::start().await;
    let error = Client::connect(&server.addr(), other.client_config())
        .await
        .err()
        .expect("must not connect");
    let text = error.to_string();
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("--ca"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused() {
    let server = TestServer::start().await;
    let mut config = server.client_config();
    config.server_name = Some("transdb.example.com".into());
    let error = Client::connect(&server.addr(), config)
        .await
        .err()
        .expect("must not connect");
    assert!(error.to_string().contains("certificate"), "{error}");
    // The right name (the default: the address's IP) works.
    Client::connect(&server.addr(), server.client_config())
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    let mut by_name = server.client_config();
    by_name.server_name = Some("localhost".into());
    Client::connect(&server.addr(), by_name)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_client_without_trusted_certificates_is_a_configuration_error() {
    let error = Client::connect("127.0.0.1:9", ClientConfig::trusting(Vec::new()))
        .await
        .err()
        .unwrap();
    assert!(matches!(error, transdb_client::Error::Config(_)), "{error}");
}
