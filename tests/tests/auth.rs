//! Authentication and roles, end to end: tokens (missing, wrong, malformed, revoked),
//! the first-request rule, the auth timeout and what an unauthenticated connection may
//! send, what each role may do, revocation of live connections, tokens across restarts, the
//! CLI's token commands, and client certificates (made with the `openssl` tool).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use transdb_client::{BatchOp, Client, ClientConfig, ClientIdentity, Error};
use transdb_host::{Server, ServerConfig};
use transdb_procedures_bank::{Account, Open, Transfer};
use transdb_proto::{ALPN, ErrorCode, ErrorResponse, Request, Response, Role, frame};
use transdb_tests::{
    ChildServer, PATIENCE, TestServer, procedure_module, raw_connection, transdb_command,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A client configuration that trusts `server` and carries no token.
fn anonymous(server: &TestServer) -> ClientConfig {
    ClientConfig::trusting(vec![server.certificate()])
}

/// Connects to `server` with `token`; the connection must be accepted.
async fn connect_with(server: &TestServer, token: &str) -> Client {
    Client::connect(&server.addr(), anonymous(server).with_token(token))
        .await
        .unwrap_or_else(|error| panic!("connecting with a valid token failed: {error}"))
}

/// Connects with `config`, which the server must refuse with an `UNAUTHENTICATED` answer.
async fn refused(addr: &str, config: ClientConfig) -> ErrorResponse {
    match Client::connect(addr, config).await {
        Err(Error::Rejected(error)) if error.code == ErrorCode::UNAUTHENTICATED => error,
        Err(other) => panic!("expected an UNAUTHENTICATED answer, got {other:?}"),
        Ok(client) => panic!("connected with role {}", client.role()),
    }
}

/// `result` is a `PERMISSION_DENIED` refusal whose message names the role `needed`.
#[track_caller]
fn assert_denied<T: std::fmt::Debug>(result: Result<T, Error>, needed: Role, what: &str) {
    match result {
        Err(Error::Rejected(error)) => {
            assert_eq!(error.code, ErrorCode::PERMISSION_DENIED, "{what}: {error}");
            assert!(
                error.message.contains(&format!("{needed} role")),
                "{what}: the refusal should name the {needed} role: {error}"
            );
        }
        other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

/// The close code of a connection the server closed on purpose.
fn close_code(error: &quinn::ConnectionError) -> ErrorCode {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ErrorCode(u16::try_from(close.error_code.into_inner()).expect("a protocol code"))
        }
        other => panic!("expected the server to close the connection, got {other}"),
    }
}

/// Reads the one answer on `recv`, a stream of the unauthenticated raw `connection`, within
/// [`PATIENCE`]: it must be an `UNAUTHENTICATED` error whose message contains `needle`, and
/// the server must then close `connection` with the code `UNAUTHENTICATED`.
async fn refused_and_closed(
    connection: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    needle: &str,
) {
    let answer = tokio::time::timeout(
        PATIENCE,
        transdb_client::wire::FrameReader::new().next::<Response<'_>>(recv),
    )
    .await
    .expect("an answer within PATIENCE")
    .expect("a readable answer before the connection closes")
    .expect("an answer, not the end of the stream")
    .into_owned();
    match answer {
        Response::Error(error) => {
            assert_eq!(error.code, ErrorCode::UNAUTHENTICATED, "{error}");
            assert!(error.message.contains(needle), "{error}");
        }
        other => panic!("expected an UNAUTHENTICATED error, got {other:?}"),
    }
    let closed = tokio::time::timeout(PATIENCE, connection.closed())
        .await
        .expect("the server closes the connection");
    assert_eq!(close_code(&closed), ErrorCode::UNAUTHENTICATED);
}

/// The id part of a token `tdb_<id>_<secret>`.
fn id_of(token: &str) -> &str {
    token
        .strip_prefix("tdb_")
        .and_then(|rest| rest.split('_').next())
        .expect("a tdb_<id>_<secret> token")
}

/// The secret part of a token `tdb_<id>_<secret>`.
fn secret_of(token: &str) -> &str {
    token.rsplit('_').next().expect("a tdb_<id>_<secret> token")
}

/// Whether `token` has the documented shape: `tdb_`, 16 hex digits, `_`, 64 hex digits.
fn well_formed(token: &str) -> bool {
    let hex = |text: &str, length: usize| {
        text.len() == length && text.bytes().all(|byte| byte.is_ascii_hexdigit())
    };
    token
        .strip_prefix("tdb_")
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(id, secret)| hex(id, 16) && hex(secret, 64))
}

/// The configuration `TestServer` uses, for restarting a server on the same directory.
fn config_for(data_dir: &Path) -> ServerConfig {
    let mut config = ServerConfig::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.shards = 2;
    config
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path)
            .unwrap()
            .windows(needle.len())
            .any(|window| window == needle)
        {
            found.push(path);
        }
    }
    found
}

/// Runs the `transdb` CLI in `cwd` with `args`, with no `TRANSDB_*` variable but `env`.
/// A run that has not ended within [`PATIENCE`] is killed (by its PID) and fails the test.
fn transdb(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = transdb_command(cwd);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.envs(env.iter().copied());
    let child = command.spawn().expect("transdb runs");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("transdb's output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("transdb {args:?} did not finish within {PATIENCE:?}")
        }
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 output")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the `openssl` command-line tool in `dir`. (`rcgen` is not a dependency of this
/// crate, so certificates for the mutual-TLS tests are made with openssl.)
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run openssl ({error}): the client-certificate tests make their CAs with \
                 the openssl command-line tool; install it"
            )
        });
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        stderr(&output)
    );
}

/// Makes a self-signed CA (P-256) as `<name>.pem` and `<name>.key` in `dir`; returns the
/// certificate's path.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// Issues a client certificate `<name>.pem` (key `<name>.key`) in `dir`, signed by the CA
/// `<ca>.pem`/`<ca>.key`; returns the paths of the certificate and the key.
fn issue_client_certificate(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let extensions = format!("{name}.ext");
    std::fs::write(
        dir.join(&extensions),
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            "1",
            "-days",
            "2",
            "-extfile",
            &extensions,
            "-out",
            &format!("{name}.pem"),
        ],
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// A client configuration that trusts `server` and presents the certificate `name` made by
/// [`issue_client_certificate`] in `dir`; no token.
fn with_certificate(server: &TestServer, dir: &Path, name: &str) -> ClientConfig {
    let mut config = anonymous(server);
    config.client_identity = Some(
        ClientIdentity::load(
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}.key")),
        )
        .unwrap(),
    );
    config
}

// ---------------------------------------------------------------------------------------
// Refused connections
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_wrong_malformed_and_revoked_tokens_get_one_answer_and_are_counted() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    assert_eq!(admin.role(), Role::Admin);
    let admin_token = server.admin_token();
    assert!(well_formed(&admin_token), "{admin_token}");
    let (revoked, info) = admin.create_token("doomed", Role::Write).await.unwrap();
    assert!(admin.revoke_token(&info.id).await.unwrap());

    // The admin token's id with another secret of the right shape.
    let mut wrong_secret = admin_token.clone();
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    let unknown_id = format!("tdb_{}_{}", "0".repeat(16), secret_of(&admin_token));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("wrong secret", Some(wrong_secret)),
        ("unknown id", Some(unknown_id)),
        ("empty", Some(String::new())),
        ("malformed", Some("Bearer hunter2".into())),
        (
            "truncated",
            Some(admin_token[..admin_token.len() - 1].into()),
        ),
        ("revoked", Some(revoked.clone())),
    ];

    let mut messages = Vec::new();
    for (what, token) in cases {
        let before = admin.stats().await.unwrap().auth_failures;
        let mut config = anonymous(&server);
        config.token = token.clone();
        let refusal = refused(&server.addr(), config).await;
        // The message gives nothing away: not the token, not its id.
        if let Some(token) = token.as_deref().filter(|token| !token.is_empty()) {
            assert!(!refusal.message.contains(token), "{what}: {refusal}");
        }
        assert!(!refusal.message.contains(&info.id), "{what}: {refusal}");
        assert!(
            !refusal.message.contains(id_of(&admin_token)),
            "{what}: {refusal}"
        );
        assert_eq!(
            admin.stats().await.unwrap().auth_failures,
            before + 1,
            "{what}: each refusal is counted once"
        );
        // The server keeps serving the admin throughout.
        admin.ping().await.unwrap();
        messages.push((what, refusal.message));
    }
    let (_, first) = &messages[0];
    for (what, message) in &messages {
        assert_eq!(
            message, first,
            "{what} must get the same answer as a missing token"
        );
    }
    admin.put("still", b"serving").await.unwrap();
    assert_eq!(
        admin.get("still").await.unwrap().as_deref(),
        Some(&b"serving"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_other_than_authenticate_is_refused_and_the_connection_closed() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    let before = admin.stats().await.unwrap().auth_failures;
    let connection = raw_connection(server.server.local_addr(), server.certificate(), ALPN)
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&frame::encode_to_vec(&Request::Ping).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    refused_and_closed(&connection, &mut recv, "Authenticate").await;
    assert_eq!(ErrorCode::UNAUTHENTICATED.0, 35);
    assert_eq!(admin.stats().await.unwrap().auth_failures, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_authenticate_in_time_are_closed() {
    const AUTH_TIMEOUT: Duration = Duration::from_millis(300);
    let server = TestServer::start_with(|config| config.auth_timeout = AUTH_TIMEOUT).await;
    // Authenticated before the silent connections arrive: it outlives the auth timeout.
    let admin = server.client().await;
    let before = admin.stats().await.unwrap().auth_failures;

    let started = Instant::now();
    let silent = raw_connection(server.server.local_addr(), server.certificate(), ALPN)
        .await
        .unwrap();
    // Another one starts an Authenticate frame and never finishes it.
    let dribbling = raw_connection(server.server.local_addr(), server.certificate(), ALPN)
        .await
        .unwrap();
    let (mut send, _recv) = dribbling.open_bi().await.unwrap();
    let authenticate = frame::encode_to_vec(&Request::Authenticate {
        token: Some(server.admin_token().into()),
    })
    .unwrap();
    send.write_all(&authenticate[..6]).await.unwrap();

    for connection in [&silent, &dribbling] {
        let closed = tokio::time::timeout(PATIENCE, connection.closed())
            .await
            .expect("an unauthenticated connection is closed at the auth timeout");
        assert_eq!(close_code(&closed), ErrorCode::UNAUTHENTICATED);
    }
    assert!(
        started.elapsed() >= AUTH_TIMEOUT,
        "closed after {:?}, before the auth timeout",
        started.elapsed()
    );
    assert_eq!(admin.stats().await.unwrap().auth_failures, before + 2);
    // The authenticated connection, older than the auth timeout, is untouched.
    admin.put("k", b"v").await.unwrap();
    assert_eq!(admin.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_frame_longer_than_an_authenticate_is_refused_without_waiting_for_it() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    let before = admin.stats().await.unwrap().auth_failures;
    let connection = raw_connection(server.server.local_addr(), server.certificate(), ALPN)
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // The header of a 1 MiB frame (well under the frame limit) and the Authenticate
    // variant's byte, then nothing: the server must refuse it from the header alone (were
    // it to wait for the rest, the auth timeout would close the connection unanswered).
    let mut header = (1u32 << 20).to_be_bytes().to_vec();
    header.push(0x0e);
    send.write_all(&header).await.unwrap();
    refused_and_closed(&connection, &mut recv, "1024").await;
    assert_eq!(admin.stats().await.unwrap().auth_failures, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_connection_gets_one_stream_until_it_authenticates() {
    let server = TestServer::start().await;
    let connection = raw_connection(server.server.local_addr(), server.certificate(), ALPN)
        .await
        .unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // Opening a stream within the peer's credit completes at its first poll; a second one
    // does not, because the server grants one stream before authentication.
    assert!(
        tokio::time::timeout(Duration::ZERO, connection.open_bi())
            .await
            .is_err(),
        "an unauthenticated connection could open a second stream"
    );
    let authenticate = frame::encode_to_vec(&Request::Authenticate {
        token: Some(server.admin_token().into()),
    })
    .unwrap();
    send.write_all(&authenticate).await.unwrap();
    let mut reader = transdb_client::wire::FrameReader::new();
    let answer = tokio::time::timeout(PATIENCE, reader.next::<Response<'_>>(&mut recv))
        .await
        .expect("an answer within PATIENCE")
        .unwrap()
        .unwrap()
        .into_owned();
    assert_eq!(answer, Response::Authenticated { role: Role::Admin });

    // Now the full credit: many streams open at once, each answered; the first stream
    // goes on like any other.
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(
            tokio::time::timeout(PATIENCE, connection.open_bi())
                .await
                .expect("authenticated connections get more streams")
                .unwrap(),
        );
    }
    let ping = frame::encode_to_vec(&Request::Ping).unwrap();
    send.write_all(&ping).await.unwrap();
    send.finish().unwrap();
    let answer = reader.next::<Response<'_>>(&mut recv).await.unwrap();
    assert_eq!(answer, Some(Response::Pong));
    for (mut send, mut recv) in streams {
        send.write_all(&ping).await.unwrap();
        send.finish().unwrap();
        let reply = tokio::time::timeout(PATIENCE, recv.read_to_end(1024))
            .await
            .expect("an answer within PATIENCE")
            .unwrap();
        let (payload, _) = frame::split(&reply).unwrap().expect("a whole frame");
        assert_eq!(
            frame::decode::<Response<'_>>(payload).unwrap(),
            Response::Pong
        );
    }
}

// ---------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------

async fn balance(client: &Client, account: &str) -> Result<i64, Error> {
    client
        .call(
            "bank",
            "balance",
            &Account {
                account: account.into(),
            },
        )
        .await
}

async fn transfer(client: &Client, from: &str, to: &str, amount: i64) -> Result<(), Error> {
    client
        .call(
            "bank",
            "transfer",
            &Transfer {
                from: from.into(),
                to: to.into(),
                amount,
            },
        )
        .await
}

/// `client`, whose role is below admin, is refused the admin-only requests Deploy,
/// Checkpoint, CreateToken, ListTokens, RevokeToken (of `token_id`, another client's token)
/// and Shutdown, each with a refusal that names the admin role. (Backup, admin-only too,
/// wants a directory to check afterwards: the caller tries it.)
async fn assert_admin_requests_denied(client: &Client, token_id: &str) {
    let what = |request: &str| format!("{request} by {}", client.role());
    assert_denied(
        client.deploy("evil", &procedure_module("bank")).await,
        Role::Admin,
        &what("Deploy"),
    );
    assert_denied(client.checkpoint().await, Role::Admin, &what("Checkpoint"));
    assert_denied(
        client.create_token("escalate", Role::Admin).await,
        Role::Admin,
        &what("CreateToken"),
    );
    assert_denied(client.tokens().await, Role::Admin, &what("ListTokens"));
    assert_denied(
        client.revoke_token(token_id).await,
        Role::Admin,
        &what("RevokeToken"),
    );
    assert_denied(
        client.shutdown_server().await,
        Role::Admin,
        &what("Shutdown"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_allows_and_nothing_more() {
    // The default durability is sync, so a checkpoint is possible for whoever may ask.
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    for (account, balance) in [("alice", 100), ("bob", 50)] {
        let () = admin
            .call(
                "bank",
                "open",
                &Open {
                    account: account.into(),
                    balance,
                },
            )
            .await
            .unwrap();
    }
    admin.put("k", b"v").await.unwrap();

    let (read_token, read_info) = admin.create_token("r", Role::Read).await.unwrap();
    let (write_token, write_info) = admin.create_token("w", Role::Write).await.unwrap();
    assert!(well_formed(&read_token) && well_formed(&write_token));
    assert_eq!((read_info.name.as_str(), read_info.role), ("r", Role::Read));
    assert_eq!(
        (write_info.name.as_str(), write_info.role),
        ("w", Role::Write)
    );
    assert_eq!(id_of(&read_token), read_info.id);

    // --- read ---
    let reader = connect_with(&server, &read_token).await;
    assert_eq!(reader.role(), Role::Read);
    let hash_before = admin.stats().await.unwrap().state_hash;
    reader.ping().await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(reader.stats().await.unwrap().state_hash, hash_before);
    let modules = reader.modules().await.unwrap();
    assert_eq!(
        modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["bank"]
    );
    assert_eq!(balance(&reader, "alice").await.unwrap(), 100);

    let mut tx = reader.begin().await.unwrap();
    assert_eq!(tx.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_denied(
        tx.put("k", b"tx").await,
        Role::Write,
        "Put in a read transaction",
    );
    assert_denied(
        tx.delete("k").await,
        Role::Write,
        "Delete in a read transaction",
    );
    // The refusals leave the transaction open and unchanged.
    assert_eq!(tx.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    tx.commit().await.unwrap();

    assert_denied(reader.put("k", b"x").await, Role::Write, "Put");
    assert_denied(reader.delete("k").await, Role::Write, "Delete");
    let ops = [BatchOp::Put {
        key: "k".into(),
        value: b"batched".as_slice().into(),
    }];
    assert_denied(reader.batch(&ops).await, Role::Write, "Batch");
    assert_denied(
        transfer(&reader, "alice", "bob", 30).await,
        Role::Write,
        "bank.transfer",
    );
    assert_denied(
        reader
            .call::<_, ()>(
                "bank",
                "open",
                &Open {
                    account: "mallory".into(),
                    balance: 1_000_000,
                },
            )
            .await,
        Role::Write,
        "bank.open",
    );
    let backup_dir = tempfile::tempdir().unwrap();
    let backup = backup_dir.path().join("backup");
    assert_denied(
        reader.backup(backup.to_str().unwrap()).await,
        Role::Admin,
        "Backup",
    );
    assert!(!backup.exists(), "a refused backup wrote nothing");
    assert_admin_requests_denied(&reader, &write_info.id).await;
    assert!(
        tokio::time::timeout(Duration::ZERO, server.server.shutdown_requested())
            .await
            .is_err(),
        "a refused Shutdown must not ask the server to stop"
    );
    // A second Authenticate cannot swap the connection's role for the admin's.
    match reader
        .request(&Request::Authenticate {
            token: Some(server.admin_token().into()),
        })
        .await
    {
        Err(Error::Rejected(error)) => {
            assert_eq!(error.code, ErrorCode::PERMISSION_DENIED, "{error}");
            assert!(error.message.contains("already authenticated"), "{error}");
        }
        other => panic!("a second Authenticate must be refused, got {other:?}"),
    }
    assert_denied(
        reader.put("k", b"x").await,
        Role::Write,
        "Put after re-auth",
    );

    // Nothing the reader was refused changed anything.
    assert_eq!(admin.stats().await.unwrap().state_hash, hash_before);
    assert_eq!(admin.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(balance(&admin, "alice").await.unwrap(), 100);
    assert_eq!(balance(&admin, "bob").await.unwrap(), 50);
    assert_eq!(admin.modules().await.unwrap().len(), 1);
    assert_eq!(admin.tokens().await.unwrap().len(), 3, "admin, r and w");
    // It was refused for its role, not because the server could not: the admin may.
    admin.checkpoint().await.unwrap();

    // --- write ---
    let writer = connect_with(&server, &write_token).await;
    assert_eq!(writer.role(), Role::Write);
    writer.put("k", b"written").await.unwrap();
    assert_eq!(
        reader.get("k").await.unwrap().as_deref(),
        Some(&b"written"[..])
    );
    assert!(writer.delete("k").await.unwrap());
    assert_eq!(writer.batch(&ops).await.unwrap(), 1);
    let mut tx = writer.begin().await.unwrap();
    tx.put("t", b"1").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(admin.get("t").await.unwrap().as_deref(), Some(&b"1"[..]));
    transfer(&writer, "alice", "bob", 30).await.unwrap();
    assert_eq!(balance(&writer, "alice").await.unwrap(), 70);
    assert_eq!(balance(&reader, "bob").await.unwrap(), 80);

    assert_admin_requests_denied(&writer, &read_info.id).await;
    assert_eq!(admin.modules().await.unwrap().len(), 1);
    assert_eq!(admin.tokens().await.unwrap().len(), 3);
    reader.ping().await.unwrap();

    // --- admin ---
    admin.shutdown_server().await.unwrap();
    tokio::time::timeout(PATIENCE, server.server.shutdown_requested())
        .await
        .expect("an admin's Shutdown asks the server's owner to stop");
}

// ---------------------------------------------------------------------------------------
// Revocation and persistence
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_loses_its_connections_and_cannot_connect_again() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    let (token, info) = admin.create_token("w", Role::Write).await.unwrap();
    let (other_token, _) = admin.create_token("other", Role::Write).await.unwrap();
    let writer = connect_with(&server, &token).await;
    let second = connect_with(&server, &token).await;
    let bystander = connect_with(&server, &other_token).await;
    writer.put("k", b"before").await.unwrap();
    second.ping().await.unwrap();
    let mut tx = writer.begin().await.unwrap();
    tx.put("k", b"in the transaction").await.unwrap();
    assert!(
        admin
            .tokens()
            .await
            .unwrap()
            .iter()
            .any(|listed| listed.id == info.id && listed.role == Role::Write)
    );

    assert!(admin.revoke_token(&info.id).await.unwrap());

    let refused_request = writer.put("k", b"after").await.unwrap_err();
    assert_eq!(
        refused_request.code(),
        Some(ErrorCode::UNAUTHENTICATED),
        "{refused_request}"
    );
    // The open transaction is over too, and none of it was applied.
    let commit = tx.commit().await.unwrap_err();
    assert_eq!(commit.code(), Some(ErrorCode::UNAUTHENTICATED), "{commit}");
    // Every connection of the token, not only the one that asked first.
    let other = second.get("k").await.unwrap_err();
    assert_eq!(other.code(), Some(ErrorCode::UNAUTHENTICATED), "{other}");
    assert_eq!(
        admin.get("k").await.unwrap().as_deref(),
        Some(&b"before"[..])
    );

    // The client's reconnect is refused, and so is a new client.
    let again = writer.ping().await.unwrap_err();
    assert!(
        matches!(&again, Error::Rejected(error) if error.code == ErrorCode::UNAUTHENTICATED),
        "{again:?}"
    );
    refused(&server.addr(), anonymous(&server).with_token(token.clone())).await;

    assert!(
        !admin
            .tokens()
            .await
            .unwrap()
            .iter()
            .any(|listed| listed.id == info.id),
        "a revoked token is no longer listed"
    );
    assert!(!admin.revoke_token(&info.id).await.unwrap(), "already gone");
    assert!(
        !admin.revoke_token("0123456789abcdef").await.unwrap(),
        "no such token"
    );
    assert!(!admin.revoke_token("not an id").await.unwrap());
    // Other tokens' connections are untouched.
    bystander.put("k", b"bystander").await.unwrap();
    assert_eq!(
        admin.get("k").await.unwrap().as_deref(),
        Some(&b"bystander"[..])
    );
}

// The answer must reach the client before the close: closing a QUIC connection discards
// stream data not yet sent, and the client would see `ConnectionLost` ("may or may not have
// been applied") for a request that certainly was not. The loss is a race, so ten
// connections try it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_after_revocation_gets_the_unauthenticated_answer() {
    const CONNECTIONS: usize = 10;
    let server = TestServer::start().await;
    let admin = server.client().await;
    let (token, info) = admin.create_token("w", Role::Write).await.unwrap();
    let mut writers = Vec::new();
    for _ in 0..CONNECTIONS {
        let writer = connect_with(&server, &token).await;
        writer.ping().await.unwrap();
        writers.push(writer);
    }
    assert!(admin.revoke_token(&info.id).await.unwrap());
    let mut lost = Vec::new();
    for writer in &writers {
        match writer.put("k", b"after").await {
            Err(Error::Rejected(error)) => {
                assert_eq!(error.code, ErrorCode::UNAUTHENTICATED, "{error}");
                assert!(error.message.contains("revoked"), "{error}");
            }
            Err(error) if error.code() == Some(ErrorCode::UNAUTHENTICATED) => lost.push(error),
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }
    assert_eq!(admin.get("k").await.unwrap(), None);
    assert!(
        lost.is_empty(),
        "{} of {CONNECTIONS} revoked connections got no answer, only the close (src bug: the \
         answer is dropped by the immediate close), e.g. {:?}",
        lost.len(),
        lost[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_a_restart_and_no_secret_but_the_admin_tokens_is_stored() {
    let TestServer { server, data_dir } = TestServer::start().await;
    let admin = Client::connect(
        &server.local_addr().to_string(),
        server.admin_client_config().unwrap(),
    )
    .await
    .unwrap();
    let (keeper, keeper_info) = admin.create_token("keeper", Role::Write).await.unwrap();
    let (gone, gone_info) = admin.create_token("gone", Role::Read).await.unwrap();
    assert!(admin.revoke_token(&gone_info.id).await.unwrap());
    let listed = admin.tokens().await.unwrap();
    let admin_file = std::fs::read(data_dir.path().join("admin.token")).unwrap();
    admin.close().await;
    assert_eq!(server.shutdown().await.abandoned, 0);

    let server = Server::start(config_for(data_dir.path())).await.unwrap();
    let restarted = TestServer { server, data_dir };
    assert_eq!(
        std::fs::read(restarted.data_dir.path().join("admin.token")).unwrap(),
        admin_file,
        "the admin token is written on first start only"
    );
    let admin = restarted.client().await;
    assert_eq!(admin.role(), Role::Admin);
    assert_eq!(
        admin.tokens().await.unwrap(),
        listed,
        "ids, names, roles and times survive"
    );
    assert!(listed.iter().any(|listed| listed.id == keeper_info.id));
    let writer = connect_with(&restarted, &keeper).await;
    assert_eq!(writer.role(), Role::Write);
    writer.put("k", b"after restart").await.unwrap();
    refused(
        &restarted.addr(),
        anonymous(&restarted).with_token(gone.clone()),
    )
    .await;

    let dir = restarted.data_dir.path();
    let tokens_json = std::fs::read_to_string(dir.join("tokens.json")).unwrap();
    assert!(tokens_json.contains(&keeper_info.id), "{tokens_json}");
    assert!(
        !tokens_json.contains(&gone_info.id),
        "revoked: {tokens_json}"
    );
    for secret in [secret_of(&keeper), secret_of(&gone)] {
        assert_eq!(
            files_containing(dir, secret.as_bytes()),
            Vec::<PathBuf>::new(),
            "a created token's secret is stored nowhere"
        );
    }
    let admin_token = restarted.admin_token();
    assert_eq!(
        files_containing(dir, secret_of(&admin_token).as_bytes()),
        vec![dir.join("admin.token")],
        "the admin secret is in admin.token only"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in ["admin.token", "tokens.json"] {
            let mode = std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file} is {:o}", mode & 0o777);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------

#[test]
fn cli_creates_lists_uses_and_revokes_tokens_and_shuts_the_server_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.to_string();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut full = vec!["--server", addr.as_str()];
        full.extend_from_slice(args);
        transdb(dir.path(), &full, env)
    };

    // Run in the server's directory, the CLI is the admin: it creates tokens.
    let created = run(&["token", "create", "--role", "write"], &[]);
    assert!(created.status.success(), "{}", stderr(&created));
    let printed = stdout(&created);
    assert_eq!(printed.lines().count(), 1, "exactly one line: {printed:?}");
    let write_token = printed.trim_end_matches('\n').to_string();
    assert_eq!(printed, format!("{write_token}\n"));
    assert!(well_formed(&write_token), "{write_token:?}");
    let write_id = id_of(&write_token).to_string();
    assert!(stderr(&created).contains(&write_id), "{}", stderr(&created));
    std::fs::write(dir.path().join("write.token"), format!("{write_token}\n")).unwrap();

    let created = run(
        &["token", "create", "--role", "read", "--name", "dashboards"],
        &[],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let read_token = stdout(&created).trim().to_string();
    assert!(well_formed(&read_token), "{read_token:?}");

    // --token-file: the write token may put, not deploy.
    let put = run(&["--token-file", "write.token", "put", "k", "v"], &[]);
    assert!(put.status.success(), "{}", stderr(&put));
    std::fs::write(dir.path().join("bank.wasm"), procedure_module("bank")).unwrap();
    let deploy = run(
        &["--token-file", "write.token", "deploy", "bank", "bank.wasm"],
        &[],
    );
    assert_eq!(deploy.status.code(), Some(2), "{}", stderr(&deploy));
    assert!(
        stderr(&deploy).contains("PERMISSION_DENIED") && stderr(&deploy).contains("admin"),
        "{}",
        stderr(&deploy)
    );
    let shutdown = run(&["--token-file", "write.token", "shutdown"], &[]);
    assert_eq!(shutdown.status.code(), Some(2), "{}", stderr(&shutdown));
    assert!(
        stderr(&shutdown).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&shutdown)
    );

    // TRANSDB_TOKEN: taken over the admin.token next to the server (a read token here, so
    // a refused put shows which token was used).
    let get = run(&["get", "k"], &[("TRANSDB_TOKEN", &read_token)]);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(get.stdout, b"v");
    let put = run(&["put", "k", "x"], &[("TRANSDB_TOKEN", &read_token)]);
    assert_eq!(put.status.code(), Some(2), "{}", stderr(&put));
    assert!(
        stderr(&put).contains("PERMISSION_DENIED") && stderr(&put).contains("write role"),
        "{}",
        stderr(&put)
    );
    // TRANSDB_TOKEN_FILE, which wins over TRANSDB_TOKEN.
    let put = run(
        &["put", "k", "from env file"],
        &[
            ("TRANSDB_TOKEN_FILE", "write.token"),
            ("TRANSDB_TOKEN", &read_token),
        ],
    );
    assert!(put.status.success(), "{}", stderr(&put));
    assert_eq!(run(&["get", "k"], &[]).stdout, b"from env file");

    // The listing shows ids and roles, never secrets.
    let list = run(&["token", "list"], &[]);
    assert!(list.status.success(), "{}", stderr(&list));
    let listing = stdout(&list);
    assert_eq!(listing.lines().count(), 3, "admin, write, read: {listing}");
    let line_of = |id: &str| {
        listing
            .lines()
            .find(|line| line.starts_with(id))
            .unwrap_or_else(|| panic!("no line for {id}: {listing}"))
            .to_string()
    };
    assert!(line_of(&write_id).contains("write"), "{listing}");
    let read_line = line_of(id_of(&read_token));
    assert!(
        read_line.contains("read") && read_line.contains("dashboards"),
        "{listing}"
    );
    let admin_token = transdb_tests::admin_token(&dir.path().join("transdb-data"));
    assert!(line_of(id_of(&admin_token)).contains("admin"), "{listing}");
    for token in [&write_token, &read_token, &admin_token] {
        assert!(!listing.contains(secret_of(token)), "{listing}");
    }

    // Revocation: the token stops working at once.
    let revoke = run(&["token", "revoke", &write_id], &[]);
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    assert_eq!(stdout(&revoke).trim(), format!("revoked {write_id}"));
    let put = run(&["--token-file", "write.token", "put", "k", "late"], &[]);
    assert_eq!(put.status.code(), Some(2), "{}", stderr(&put));
    assert!(stderr(&put).contains("UNAUTHENTICATED"), "{}", stderr(&put));
    let again = run(&["token", "revoke", &write_id], &[]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert_eq!(run(&["get", "k"], &[]).stdout, b"from env file");

    // An admin's `transdb shutdown` stops the server gracefully.
    let shutdown = run(&["shutdown"], &[]);
    assert!(shutdown.status.success(), "{}", stderr(&shutdown));
    server.wait_for_line("transdb: shutdown requested by an admin");
    let status = server.wait();
    assert!(status.success(), "exit status {status:?}");
}

// ---------------------------------------------------------------------------------------
// Client certificates
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_of_a_configured_ca_authenticate_with_its_role() {
    let certificates = tempfile::tempdir().unwrap();
    let dir = certificates.path();
    let ca = make_ca(dir, "apps-ca");
    issue_client_certificate(dir, "apps-ca", "app");
    make_ca(dir, "other-ca");
    issue_client_certificate(dir, "other-ca", "stranger");

    let server = TestServer::start_with(|config| config.client_cas = vec![(Role::Write, ca)]).await;
    // Tokens keep working next to certificates.
    let admin = server.client().await;
    assert_eq!(admin.role(), Role::Admin);

    let app = Client::connect(&server.addr(), with_certificate(&server, dir, "app"))
        .await
        .unwrap();
    assert_eq!(app.role(), Role::Write);
    app.put("k", b"by certificate").await.unwrap();
    assert_eq!(
        admin.get("k").await.unwrap().as_deref(),
        Some(&b"by certificate"[..])
    );
    assert_denied(
        app.deploy("bank", &procedure_module("bank")).await,
        Role::Admin,
        "Deploy",
    );

    // A certificate of a CA the server does not know: the handshake or the authentication
    // fails, never a connection.
    match Client::connect(&server.addr(), with_certificate(&server, dir, "stranger")).await {
        Ok(client) => panic!("a stranger's certificate got role {}", client.role()),
        Err(error) => assert!(
            matches!(error, Error::Connect { .. })
                || error.code() == Some(ErrorCode::UNAUTHENTICATED),
            "{error:?}"
        ),
    }
    // Neither certificate nor token.
    refused(&server.addr(), anonymous(&server)).await;

    // Certificate and token: the token decides, stronger or weaker.
    let both = Client::connect(
        &server.addr(),
        with_certificate(&server, dir, "app").with_token(server.admin_token()),
    )
    .await
    .unwrap();
    assert_eq!(both.role(), Role::Admin);
    both.tokens().await.unwrap();
    let (read_token, _) = admin.create_token("r", Role::Read).await.unwrap();
    let weaker = Client::connect(
        &server.addr(),
        with_certificate(&server, dir, "app").with_token(read_token),
    )
    .await
    .unwrap();
    assert_eq!(weaker.role(), Role::Read);
    assert_denied(weaker.put("k", b"x").await, Role::Write, "Put");
    // A bad token is not rescued by a good certificate.
    let mut bad = server.admin_token();
    bad.pop();
    refused(
        &server.addr(),
        with_certificate(&server, dir, "app").with_token(bad),
    )
    .await;

    app.ping().await.unwrap();
    admin.ping().await.unwrap();
}

#[test]
fn serve_client_ca_flag_lets_the_cli_authenticate_with_a_certificate() {
    let certificates = tempfile::tempdir().unwrap();
    let dir = certificates.path();
    let ca = make_ca(dir, "apps-ca");
    let (certificate, key) = issue_client_certificate(dir, "apps-ca", "app");

    let bad_role = transdb(
        dir,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--client-ca",
            &format!("root={}", ca.display()),
        ],
        &[],
    );
    assert_eq!(bad_role.status.code(), Some(2), "{}", stderr(&bad_role));
    assert!(
        stderr(&bad_role).contains("unknown role"),
        "{}",
        stderr(&bad_role)
    );

    let server_dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(
        server_dir.path(),
        "127.0.0.1:0",
        &["--client-ca", &format!("read={}", ca.display())],
    );
    let addr = server.addr.to_string();
    let server_certificate = server_dir.path().join("transdb-data/cert.pem");
    let admin_token = server_dir.path().join("transdb-data/admin.token");
    let put = transdb(
        server_dir.path(),
        &["--server", &addr, "put", "k", "v"],
        &[],
    );
    assert!(put.status.success(), "{}", stderr(&put));

    // From another directory, no token anywhere: the certificate authenticates, as read.
    let run = |args: &[&str]| {
        let mut full = vec![
            "--server",
            addr.as_str(),
            "--ca",
            server_certificate.to_str().unwrap(),
            "--client-cert",
            certificate.to_str().unwrap(),
            "--client-key",
            key.to_str().unwrap(),
        ];
        full.extend_from_slice(args);
        transdb(dir, &full, &[])
    };
    let get = run(&["get", "k"]);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(get.stdout, b"v");
    let put = run(&["put", "k", "x"]);
    assert_eq!(put.status.code(), Some(2), "{}", stderr(&put));
    assert!(
        stderr(&put).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&put)
    );
    // With a token as well, the token's role applies.
    let put = run(&[
        "--token-file",
        admin_token.to_str().unwrap(),
        "put",
        "k",
        "y",
    ]);
    assert!(put.status.success(), "{}", stderr(&put));
    assert_eq!(run(&["get", "k"]).stdout, b"y");
}
