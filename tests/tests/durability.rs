//! Durability end to end: what survives a restart (graceful or `SIGKILL`), checkpoints
//! (on demand and by log size), the log archive, backup and restore, `--durability none`
//! and `async`, and refusing to start on a damaged data directory.
//!
//! Equal states are compared through `Stats`' state hash (every key and value) plus the
//! list of deployed modules (names and versions), and a procedure call after every restart
//! shows the modules came back without a redeploy.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use transdb_client::{BatchOp, Client, ClientConfig};
use transdb_host::{Server, ServerConfig};
use transdb_proto::ErrorCode;
use transdb_tests::{ChildServer, CliOutput, PATIENCE, cli, procedure_module, transdb_binary};

// ---------------------------------------------------------------------------------------
// Servers, clients and the CLI.

/// Starts an in-process server on `data_dir` (two shards, a free port).
async fn start_in(data_dir: &Path, adjust: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.shards = 2;
    adjust(&mut config);
    Server::start(config).await.expect("server starts")
}

/// A client of an in-process server.
async fn client_of(server: &Server) -> Client {
    let config = server.admin_client_config().expect("certificate and token");
    Client::connect(&server.local_addr().to_string(), config)
        .await
        .expect("client connects")
}

/// Stops an in-process server gracefully, after closing `client`.
async fn stop(server: Server, client: Client) {
    client.close().await;
    let report = server.shutdown().await;
    assert_eq!(report.abandoned, 0);
}

/// `transdb serve --data-dir <data_dir> <extra...>` as a child process.
fn serve(data_dir: &Path, extra: &[&str]) -> ChildServer {
    let mut args = vec!["--data-dir", data_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    ChildServer::start(data_dir.parent().unwrap(), "127.0.0.1:0", &args)
}

/// A client of a child server whose data directory is `data_dir`.
async fn client_of_child(server: &ChildServer, data_dir: &Path) -> Client {
    let config = ClientConfig::for_data_dir(data_dir).expect("certificate and token");
    Client::connect(&server.addr.to_string(), config)
        .await
        .expect("client connects")
}

/// Stops a child server with SIGTERM and checks it exits 0.
/// A child server on `data_dir` (see [`serve`]) and a client of it.
async fn served(data_dir: &Path, extra: &[&str]) -> (ChildServer, Client) {
    let server = serve(data_dir, extra);
    let client = client_of_child(&server, data_dir).await;
    (server, client)
}

fn terminate(mut server: ChildServer) {
    server.terminate();
    let status = server.wait();
    assert!(status.success(), "graceful stop exit status {status:?}");
}

/// Kills a child server with SIGKILL (what dropping a [`ChildServer`] does) and waits.
fn kill(server: ChildServer) {
    drop(server);
}

/// Runs a `transdb` client command against the child server on `data_dir`.
fn client_cli(server: &ChildServer, data_dir: &Path, args: &[&str]) -> CliOutput {
    let addr = server.addr.to_string();
    let ca = data_dir.join("cert.pem");
    let token = data_dir.join("admin.token");
    let mut full = vec![
        "--server",
        addr.as_str(),
        "--ca",
        ca.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    full.extend_from_slice(args);
    cli(data_dir.parent().unwrap(), &full, b"")
}

fn stdout(output: &CliOutput) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What `transdb checkpoint` or `transdb backup` printed.
#[derive(Debug)]
struct Written {
    position: u64,
    keys: u64,
    bytes: u64,
    path: PathBuf,
}

/// Parses `<what> at position N: K keys, B bytes, PATH`, the one line the command prints.
fn parse_written(what: &str, output: &CliOutput) -> Written {
    assert!(
        output.status.success(),
        "transdb {what} failed: {}",
        output.stderr
    );
    let text = stdout(output);
    let line = text.trim_end();
    assert_eq!(line.lines().count(), 1, "one line: {text:?}");
    let parse = || {
        let rest = line.strip_prefix(&format!("{what} at position "))?;
        let (position, rest) = rest.split_once(": ")?;
        let (keys, rest) = rest.split_once(" keys, ")?;
        let (bytes, path) = rest.split_once(" bytes, ")?;
        Some(Written {
            position: position.parse().ok()?,
            keys: keys.parse().ok()?,
            bytes: bytes.parse().ok()?,
            path: PathBuf::from(path),
        })
    };
    parse().unwrap_or_else(|| {
        panic!("expected `{what} at position N: K keys, B bytes, PATH`, got {line:?}")
    })
}

/// Runs `transdb serve` on `data_dir`, which must refuse to start: returns its exit status
/// and what it wrote to stderr. Fails if it starts listening or takes longer than PATIENCE.
fn serve_refuses(data_dir: &Path) -> (ExitStatus, String) {
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        Command::new(transdb_binary())
            .current_dir(data_dir.parent().unwrap())
            .args(["serve", "--listen", "127.0.0.1:0", "--shards", "2"])
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("transdb serve runs"),
    );
    let out = child.0.stdout.take().unwrap();
    let mut err = child.0.stderr.take().unwrap();
    let (sender, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + PATIENCE;
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("transdb listening on") => {
                panic!("the server started on a damaged data directory: {line}")
            }
            Ok(_) => {}
            // Stdout closed: the process is exiting.
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                panic!("transdb serve neither started nor exited within {PATIENCE:?}")
            }
        }
    }
    let status = child.0.wait().unwrap();
    let stderr = stderr.join().unwrap();
    println!("[refused start] {status:?}: {stderr}");
    (status, stderr)
}

/// Asserts that a refused start exited with the CLI's error status and that its message
/// names each of `parts`.
fn assert_refused(data_dir: &Path, parts: &[&str]) -> String {
    let before = tree(data_dir);
    let (status, stderr) = serve_refuses(data_dir);
    assert_eq!(status.code(), Some(2), "{stderr}");
    for part in parts {
        assert!(
            stderr.contains(part),
            "the message should mention {part:?}: {stderr}"
        );
    }
    assert_eq!(
        tree(data_dir),
        before,
        "a refused start must leave the data directory as it was (it is the evidence, and a restore may still need it)"
    );
    stderr
}

// ---------------------------------------------------------------------------------------
// Files.

/// Every file under `dir` (recursively, relative paths) with its contents.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, files);
            } else {
                let contents = std::fs::read(&path).unwrap();
                files.insert(path.strip_prefix(root).unwrap().to_owned(), contents);
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

/// Names of the files in `dir`, sorted (empty if it does not exist).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The log segments of a data directory: file name and first position, in log order.
fn segments(data_dir: &Path) -> Vec<(String, u64)> {
    names(&data_dir.join("log"))
        .into_iter()
        .map(|name| {
            let first = name
                .strip_suffix(".log")
                .and_then(|stem| stem.parse().ok())
                .unwrap_or_else(|| panic!("unexpected file {name:?} in the log directory"));
            (name, first)
        })
        .collect()
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(offset < bytes.len(), "{} is too short", path.display());
    bytes[offset] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// The only checkpoint file of a data directory.
fn only_checkpoint(data_dir: &Path) -> PathBuf {
    let names = names(&data_dir.join("checkpoints"));
    assert_eq!(names.len(), 1, "one checkpoint: {names:?}");
    data_dir.join("checkpoints").join(&names[0])
}

/// Polls `condition` until it holds; fails after PATIENCE.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Workloads and what they leave.

/// The state as a client sees it: the hash of every key and value, and the modules.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    state_hash: String,
    modules: Vec<(String, String)>,
}

async fn observe(client: &Client) -> Observed {
    let state_hash = client.stats().await.unwrap().state_hash;
    let mut modules: Vec<_> = client
        .modules()
        .await
        .unwrap()
        .into_iter()
        .map(|module| (module.name, module.version))
        .collect();
    modules.sort();
    Observed {
        state_hash,
        modules,
    }
}

/// Every kind of state change: puts (binary, overwritten, deleted), a batch, interactive
/// transactions (committed, rolled back, refused with CONFLICT), modules deployed and
/// replaced, procedure calls (applied and aborted).
async fn rich_workload(client: &Client) {
    client.put("plain:a", b"1").await.unwrap();
    client.put("plain:a", b"2").await.unwrap();
    client
        .put("plain:binary", (0..=255u8).collect::<Vec<_>>())
        .await
        .unwrap();
    client.put("plain:empty", b"").await.unwrap();
    client.put("ключ 🔑", "значение").await.unwrap();
    client.put("gone", b"x").await.unwrap();
    assert!(client.delete("gone").await.unwrap());

    let applied = client
        .batch(&[
            BatchOp::Put {
                key: "batch:x".into(),
                value: b"1".as_slice().into(),
            },
            BatchOp::Put {
                key: "batch:y".into(),
                value: b"2".as_slice().into(),
            },
            BatchOp::Delete {
                key: "plain:empty".into(),
            },
        ])
        .await
        .unwrap();
    assert_eq!(applied, 3);

    let mut tx = client.begin().await.unwrap();
    assert_eq!(tx.get("plain:a").await.unwrap().as_deref(), Some(&b"2"[..]));
    tx.put("tx:k", b"v").await.unwrap();
    assert!(tx.delete("batch:y").await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = client.begin().await.unwrap();
    tx.put("rolled-back", b"no").await.unwrap();
    tx.rollback().await.unwrap();

    // A commit refused because what it read changed: replayed, it must be refused again.
    let mut tx = client.begin().await.unwrap();
    assert_eq!(tx.get("contended").await.unwrap(), None);
    client.put("contended", b"theirs").await.unwrap();
    tx.put("lost-update", b"mine").await.unwrap();
    let conflict = tx.commit().await.unwrap_err();
    assert_eq!(conflict.code(), Some(ErrorCode::CONFLICT), "{conflict}");

    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    for (account, balance) in [("alice", 100), ("bob", 5)] {
        client
            .call_json(
                "bank",
                "open",
                &format!(r#"{{"account":"{account}","balance":{balance}}}"#),
            )
            .await
            .unwrap();
    }
    client
        .call_json(
            "bank",
            "transfer",
            r#"{"from":"alice","to":"bob","amount":30}"#,
        )
        .await
        .unwrap();
    let aborted = client
        .call_json("bank", "withdraw", r#"{"account":"bob","amount":1000}"#)
        .await
        .unwrap_err();
    assert_eq!(aborted.code(), Some(ErrorCode::ABORTED), "{aborted}");

    client
        .deploy("counter", &procedure_module("kv"))
        .await
        .unwrap();
    for expected in 1..=3 {
        let count = client
            .call_json("counter", "increment", r#"{"key":"hits","by":1}"#)
            .await
            .unwrap();
        assert_eq!(count, expected.to_string());
    }

    // A name redeployed with another module: calls before run the old one, after the new.
    client
        .deploy("swap", &procedure_module("kv"))
        .await
        .unwrap();
    client
        .call_json("swap", "increment", r#"{"key":"swapped","by":7}"#)
        .await
        .unwrap();
    client
        .deploy("swap", &procedure_module("bank"))
        .await
        .unwrap();
    client
        .call_json("swap", "open", r#"{"account":"carol","balance":1}"#)
        .await
        .unwrap();
}

/// After a restart: the state and the modules are what they were, and the modules work
/// without a redeploy. Changes the state (calls and a put) afterwards.
async fn check_restored(client: &Client, before: &Observed) {
    assert_eq!(&observe(client).await, before, "state after the restart");
    let get = |key: &'static str| async move { client.get(key).await.unwrap() };
    assert_eq!(get("plain:a").await.as_deref(), Some(&b"2"[..]));
    assert_eq!(get("plain:binary").await, Some((0..=255u8).collect()));
    assert_eq!(get("gone").await, None);
    assert_eq!(get("plain:empty").await, None);
    assert_eq!(get("tx:k").await.as_deref(), Some(&b"v"[..]));
    assert_eq!(get("batch:y").await, None);
    assert_eq!(get("rolled-back").await, None);
    assert_eq!(get("lost-update").await, None);
    assert_eq!(get("contended").await.as_deref(), Some(&b"theirs"[..]));
    assert_eq!(get("swapped").await.as_deref(), Some(&b"7"[..]));

    let balance = |account: &'static str| async move {
        client
            .call_json("bank", "balance", &format!(r#"{{"account":"{account}"}}"#))
            .await
            .expect("a restored module answers without a redeploy")
    };
    assert_eq!(balance("alice").await, "70");
    assert_eq!(balance("bob").await, "35");
    client
        .call_json(
            "bank",
            "transfer",
            r#"{"from":"bob","to":"alice","amount":5}"#,
        )
        .await
        .unwrap();
    assert_eq!(balance("alice").await, "75");
    let count = client
        .call_json("counter", "increment", r#"{"key":"hits","by":1}"#)
        .await
        .unwrap();
    assert_eq!(count, "4");
    let carol = client
        .call_json("swap", "balance", r#"{"account":"carol"}"#)
        .await
        .expect("the replacement module is the one restored");
    assert_eq!(carol, "1");
    client.put("after-restart", b"yes").await.unwrap();
}

/// `count` puts of ~100-byte values under `prefix`: enough log to fill small segments.
async fn fill(client: &Client, prefix: &str, count: usize) {
    for i in 0..count {
        client
            .put(
                &format!("{prefix}:{i:04}"),
                vec![b'a' + (i % 26) as u8; 100],
            )
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// 1. Restarts.

/// A graceful stop and a start on the same data directory restore exactly the state that
/// was acknowledged: puts, deletes, a batch, interactive commits (and not the rolled-back or
/// conflicting ones), deployed and replaced modules and the effects of their calls. The
/// modules answer after the restart without a redeploy, and what is written after the
/// restart survives the next one (the log goes on where recovery left it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_restores_the_exact_state_and_the_modules() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");

    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    rich_workload(&client).await;
    let before = observe(&client).await;
    stop(server, client).await;

    let server = start_in(&data_dir, |_| {}).await;
    let recovery = server
        .recovery()
        .expect("a durable server recovers")
        .clone();
    assert_eq!(recovery.checkpoint, None, "no checkpoint was taken");
    assert!(recovery.replayed > 0, "{recovery:?}");
    assert_eq!(
        recovery.torn_bytes, 0,
        "a graceful stop leaves no torn tail"
    );
    let client = client_of(&server).await;
    check_restored(&client, &before).await;
    let after = observe(&client).await;
    stop(server, client).await;

    // The shard count is not part of the data: another one gives the same state.
    let server = start_in(&data_dir, |config| config.shards = 4).await;
    let client = client_of(&server).await;
    assert_eq!(
        observe(&client).await,
        after,
        "state after a second restart"
    );
    stop(server, client).await;
}

/// An undeploy is ordered and logged like a deploy: calls after it find no module, and
/// neither a restart replaying the log nor one from a checkpoint taken after it brings
/// the module back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeployed_module_stays_gone_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    client.deploy("kv", &procedure_module("kv")).await.unwrap();
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    assert!(client.undeploy("kv").await.unwrap());
    assert!(
        !client.undeploy("kv").await.unwrap(),
        "undeploy is idempotent"
    );
    let error = client
        .call_json("kv", "get", r#"{"key":"k"}"#)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::MODULE_NOT_FOUND), "{error}");
    let names = |modules: Vec<transdb_client::ModuleInfo>| {
        modules
            .into_iter()
            .map(|module| module.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(client.modules().await.unwrap()), ["bank"]);
    stop(server, client).await;

    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    assert_eq!(
        names(client.modules().await.unwrap()),
        ["bank"],
        "after replay"
    );
    assert!(client.undeploy("bank").await.unwrap());
    client.checkpoint().await.unwrap();
    stop(server, client).await;

    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    assert!(
        client.modules().await.unwrap().is_empty(),
        "after a checkpoint"
    );
    stop(server, client).await;
}

/// `SIGKILL` of `transdb serve` (default `--durability sync`) loses nothing acknowledged:
/// restarted on the same data directory, the state and modules are exactly as before, and
/// again after a second kill following writes made after the first restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");

    let (server, client) = served(&data_dir, &[]).await;
    rich_workload(&client).await;
    let before = observe(&client).await;
    kill(server);

    let (server, client) = served(&data_dir, &[]).await;
    check_restored(&client, &before).await;
    let after = observe(&client).await;
    kill(server);

    let (server, client) = served(&data_dir, &[]).await;
    assert_eq!(observe(&client).await, after, "state after a second kill");
    terminate(server);
}

// ---------------------------------------------------------------------------------------
// 2. and 3. Checkpoints.

/// `transdb checkpoint` prints where it wrote the checkpoint (position, keys, size, file),
/// writes `checkpoints/<position>.checkpoint`, and removes every log segment it covers: only
/// the segment being written remains. A later checkpoint replaces the earlier one. After
/// `SIGKILL`, the checkpoint plus the rest of the log restore the exact state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transdb_checkpoint_writes_a_checkpoint_and_drops_the_log_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (server, client) = served(&data_dir, &["--log-segment-bytes", "400"]).await;
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    client
        .call_json("bank", "open", r#"{"account":"alice","balance":10}"#)
        .await
        .unwrap();
    fill(&client, "before", 24).await;
    let stats = client.stats().await.unwrap();
    let keys: u64 = stats.shards.iter().map(|shard| shard.keys).sum();
    let before = segments(&data_dir);
    assert!(before.len() >= 4, "several segments: {before:?}");
    assert!(names(&data_dir.join("checkpoints")).is_empty());

    // An interactive transaction open across the checkpoint commits after it.
    let mut open = client.begin().await.unwrap();
    assert!(open.get("before:0001").await.unwrap().is_some());

    let written = parse_written(
        "checkpoint",
        &client_cli(&server, &data_dir, &["checkpoint"]),
    );
    assert_eq!(written.keys, keys, "{written:?}");
    assert!(written.position > before.last().unwrap().1, "{written:?}");
    assert!(written.position > stats.position, "{written:?}");
    let expected_path = data_dir
        .join("checkpoints")
        .join(format!("{:020}.checkpoint", written.position));
    assert_eq!(written.path, expected_path);
    assert_eq!(
        std::fs::metadata(&written.path).unwrap().len(),
        written.bytes
    );
    assert_eq!(
        only_checkpoint(&data_dir),
        expected_path,
        "no temp files left"
    );
    assert_eq!(
        segments(&data_dir),
        [before.last().unwrap().clone()],
        "every segment the checkpoint covers is removed, the one being written stays"
    );

    // More after the checkpoint: a restart needs the checkpoint and the log after it.
    open.put("across", b"the checkpoint").await.unwrap();
    open.commit().await.unwrap();
    fill(&client, "after", 10).await;
    client
        .call_json("bank", "deposit", r#"{"account":"alice","amount":5}"#)
        .await
        .unwrap();
    client.delete("before:0003").await.unwrap();
    let expected = observe(&client).await;
    kill(server);

    let (server, client) = served(&data_dir, &["--log-segment-bytes", "400"]).await;
    assert_eq!(observe(&client).await, expected);
    assert_eq!(
        client.get("across").await.unwrap().as_deref(),
        Some(&b"the checkpoint"[..])
    );
    let balance = client
        .call_json("bank", "balance", r#"{"account":"alice"}"#)
        .await
        .expect("the checkpointed module answers without a redeploy");
    assert_eq!(balance, "15");

    // A second checkpoint replaces the first.
    fill(&client, "more", 6).await;
    let second = parse_written(
        "checkpoint",
        &client_cli(&server, &data_dir, &["checkpoint"]),
    );
    assert!(second.position > written.position, "{second:?}");
    assert_eq!(only_checkpoint(&data_dir), second.path);
    let expected = observe(&client).await;
    terminate(server);
    let (server, client) = served(&data_dir, &[]).await;
    assert_eq!(observe(&client).await, expected);
    terminate(server);
}

/// With `--log-archive DIR`, the segments a checkpoint covers are moved into DIR, whole
/// and unchanged, instead of being deleted; the data directory keeps the one being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_moves_covered_segments_into_the_log_archive() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let archive = dir.path().join("archive");
    let server = serve(
        &data_dir,
        &[
            "--log-segment-bytes",
            "400",
            "--log-archive",
            archive.to_str().unwrap(),
        ],
    );
    let client = client_of_child(&server, &data_dir).await;
    fill(&client, "k", 20).await;
    let before = segments(&data_dir);
    assert!(before.len() >= 4, "several segments: {before:?}");
    let log_files = tree(&data_dir.join("log"));

    let written = parse_written(
        "checkpoint",
        &client_cli(&server, &data_dir, &["checkpoint"]),
    );
    assert!(written.position > before.last().unwrap().1, "{written:?}");
    let (covered, kept) = before.split_at(before.len() - 1);
    assert_eq!(segments(&data_dir), kept);
    let archived = tree(&archive);
    let expected: BTreeMap<_, _> = covered
        .iter()
        .map(|(name, _)| {
            let name = PathBuf::from(name);
            let contents = log_files[&name].clone();
            (name, contents)
        })
        .collect();
    assert_eq!(
        archived.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the covered segments are in the archive"
    );
    assert!(archived == expected, "archived segments are unchanged");
    terminate(server);
}

/// With a small `--checkpoint-log-bytes`, a checkpoint is written by itself once the log
/// has grown that much (nobody asks for it), it drops the log it covers, and a restart
/// starts from it and restores the exact state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_written_by_itself_once_the_log_is_big_enough() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let configure = |config: &mut ServerConfig| {
        config.log_segment_bytes = 1024;
        config.checkpoint_log_bytes = 4096;
        config.checkpoint_interval = Duration::ZERO;
    };
    let server = start_in(&data_dir, configure).await;
    let client = client_of(&server).await;
    // About 6 KB of log: more than one threshold, less than two.
    fill(&client, "k", 45).await;
    let expected = observe(&client).await;

    // Done once the checkpoint exists and the segments it covers are gone.
    let checkpoint_dir = data_dir.join("checkpoints");
    let mut position = 0;
    eventually("a checkpoint by log size", || {
        let Some(newest) = names(&checkpoint_dir)
            .iter()
            .filter_map(|name| name.strip_suffix(".checkpoint")?.parse::<u64>().ok())
            .max()
        else {
            return false;
        };
        position = newest;
        let segments = segments(&data_dir);
        segments.windows(2).all(|pair| pair[1].1 > newest)
    })
    .await;
    assert!(position > 0);
    assert!(
        segments(&data_dir)[0].1 > 0,
        "the first segment was covered and removed"
    );
    stop(server, client).await;

    let server = start_in(&data_dir, configure).await;
    assert_eq!(server.recovery().unwrap().checkpoint, Some(position));
    let client = client_of(&server).await;
    assert_eq!(observe(&client).await, expected);
    stop(server, client).await;
}

/// Checkpoints and a backup taken while transactions keep running are consistent: after
/// `SIGKILL`, checkpoint plus log give exactly the final state (nothing applied twice or
/// skipped at the checkpoint's position: a counter counts every acknowledged increment), and
/// the restored backup is one consistent moment (the bank's total is unchanged, the two keys
/// every batch writes together are equal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_backups_under_traffic_are_consistent() {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 30;
    const ACCOUNTS: [&str; 4] = ["a", "b", "c", "d"];
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let backup = dir.path().join("backup");
    let restored = dir.path().join("restored");
    let args = ["--log-segment-bytes", "2000"];
    let (server, client) = served(&data_dir, &args).await;
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    client
        .deploy("counter", &procedure_module("kv"))
        .await
        .unwrap();
    for account in ACCOUNTS {
        client
            .call_json(
                "bank",
                "open",
                &format!(r#"{{"account":"{account}","balance":100}}"#),
            )
            .await
            .unwrap();
    }
    let started = client.stats().await.unwrap().position;

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let client = client.clone();
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    client
                        .call_json("counter", "increment", r#"{"key":"count","by":1}"#)
                        .await
                        .unwrap();
                    let from = ACCOUNTS[(writer + round) % 4];
                    let to = ACCOUNTS[(writer + round + 1) % 4];
                    let transfer = format!(
                        r#"{{"from":"{from}","to":"{to}","amount":{}}}"#,
                        1 + round % 7
                    );
                    if let Err(error) = client.call_json("bank", "transfer", &transfer).await {
                        // Insufficient funds is part of the workload.
                        assert_eq!(error.code(), Some(ErrorCode::ABORTED), "{error}");
                    }
                    let value = format!("{writer}:{round}");
                    client
                        .batch(&[
                            BatchOp::Put {
                                key: "pair:left".into(),
                                value: value.as_bytes().into(),
                            },
                            BatchOp::Put {
                                key: "pair:right".into(),
                                value: value.as_bytes().into(),
                            },
                        ])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let first = client.checkpoint().await.unwrap();
    let copy = client.backup(backup.to_str().unwrap()).await.unwrap();
    let second = client.checkpoint().await.unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let expected = observe(&client).await;
    let end = client.stats().await.unwrap().position;
    assert!(
        started < first.position && second.position < end,
        "taken while the writers ran: {started} < {} .. {} < {end}",
        first.position,
        second.position
    );
    assert!(copy.position > started && copy.position < end, "{copy:?}");
    kill(server);

    let (server, client) = served(&data_dir, &args).await;
    assert_eq!(observe(&client).await, expected);
    assert_eq!(
        client.get("count").await.unwrap(),
        Some((WRITERS * ROUNDS).to_string().into_bytes()),
        "every acknowledged increment, once"
    );
    terminate(server);

    let output = cli(
        dir.path(),
        &[
            "restore",
            "--from",
            backup.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
        ],
        b"",
    );
    assert!(output.status.success(), "{}", output.stderr);
    let (server, client) = served(&restored, &[]).await;
    let accounts = r#"{"accounts":["a","b","c","d"]}"#;
    let total = client.call_json("bank", "total", accounts).await.unwrap();
    assert_eq!(total, "400", "the backup is one consistent moment");
    assert_eq!(
        client.get("pair:left").await.unwrap(),
        client.get("pair:right").await.unwrap(),
        "a batch is in the backup whole or not at all"
    );
    terminate(server);
}

// ---------------------------------------------------------------------------------------
// 4. Backup and restore.

/// `transdb backup DIR` writes a point-in-time copy; `transdb restore --from DIR
/// --data-dir NEW` makes a data directory of it on which a server has exactly that state and
/// those modules. A backup into a non-empty directory is refused with INVALID_PATH, and a
/// restore into a data directory that holds a database is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_restore_gives_a_server_with_the_same_state_and_modules() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let backup = dir.path().join("backup");
    let restored = dir.path().join("restored");

    let (server, client) = served(&data_dir, &[]).await;
    rich_workload(&client).await;
    let at_backup = observe(&client).await;
    let keys: u64 = client
        .stats()
        .await
        .unwrap()
        .shards
        .iter()
        .map(|shard| shard.keys)
        .sum();

    let written = parse_written(
        "backup",
        &client_cli(&server, &data_dir, &["backup", backup.to_str().unwrap()]),
    );
    assert_eq!(written.keys, keys);
    assert!(written.path.starts_with(&backup), "{written:?}");
    assert_eq!(
        std::fs::metadata(&written.path).unwrap().len(),
        written.bytes
    );
    // The original goes on; the backup keeps the state it had.
    client
        .put("after-backup", b"not in the backup")
        .await
        .unwrap();

    // A backup never goes into a directory that holds something.
    let backup_files = tree(&backup);
    let refused = client_cli(&server, &data_dir, &["backup", backup.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    for part in ["INVALID_PATH", "not empty", backup.to_str().unwrap()] {
        assert!(
            refused.stderr.contains(part),
            "{part:?}: {}",
            refused.stderr
        );
    }
    assert_eq!(
        tree(&backup),
        backup_files,
        "the refused backup changed nothing"
    );
    let other = dir.path().join("occupied");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let refused = client
        .backup(other.to_str().unwrap())
        .await
        .expect_err("a non-empty directory");
    assert_eq!(refused.code(), Some(ErrorCode::INVALID_PATH), "{refused}");
    assert_eq!(names(&other), ["notes.txt"]);

    // A restore refuses a directory that is not a backup.
    let not_a_backup = cli(
        dir.path(),
        &[
            "restore",
            "--from",
            other.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(not_a_backup.status.code(), Some(2));
    assert!(
        not_a_backup.stderr.contains("no checkpoint"),
        "{}",
        not_a_backup.stderr
    );

    let restore = |target: &Path| {
        cli(
            dir.path(),
            &[
                "restore",
                "--from",
                backup.to_str().unwrap(),
                "--data-dir",
                target.to_str().unwrap(),
            ],
            b"",
        )
    };
    let output = restore(&restored);
    assert!(output.status.success(), "{}", output.stderr);
    let line = stdout(&output);
    assert!(
        line.starts_with(&format!(
            "restored {} keys at position {} into {}",
            written.keys,
            written.position,
            restored.display()
        )),
        "{line}"
    );
    assert!(line.contains("transdb serve --data-dir"), "{line}");

    let (copy, copy_client) = served(&restored, &[]).await;
    assert_eq!(observe(&copy_client).await, at_backup);
    assert_eq!(copy_client.get("after-backup").await.unwrap(), None);
    check_restored(&copy_client, &at_backup).await;
    let copy_state = observe(&copy_client).await;
    terminate(copy);
    terminate(server);

    // Restoring again over the database now in `restored` is refused and changes nothing.
    let files = tree(&restored);
    let refused = restore(&restored);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("already holds a database"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(restored.to_str().unwrap()),
        "{}",
        refused.stderr
    );
    assert_eq!(
        tree(&restored),
        files,
        "the refused restore changed nothing"
    );
    let (copy, copy_client) = served(&restored, &[]).await;
    assert_eq!(observe(&copy_client).await, copy_state);
    terminate(copy);
}

// ---------------------------------------------------------------------------------------
// 5. and 6. Durability modes.

/// `--durability none` keeps nothing: no log on disk, a restart starts empty, and
/// `transdb checkpoint` (and `backup`) fail with NOT_DURABLE saying which flag to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_none_keeps_nothing_and_refuses_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (server, client) = served(&data_dir, &["--durability", "none"]).await;
    let empty = observe(&client).await;
    client.put("k", b"v").await.unwrap();
    client.deploy("kv", &procedure_module("kv")).await.unwrap();
    assert_ne!(observe(&client).await, empty);

    let refused = client_cli(&server, &data_dir, &["checkpoint"]);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    for part in ["NOT_DURABLE", "--durability sync"] {
        assert!(
            refused.stderr.contains(part),
            "{part:?}: {}",
            refused.stderr
        );
    }
    let backup = dir.path().join("backup");
    let refused = client
        .backup(backup.to_str().unwrap())
        .await
        .expect_err("no backup without durability");
    assert_eq!(refused.code(), Some(ErrorCode::NOT_DURABLE), "{refused}");
    assert!(!backup.exists(), "a refused backup writes nothing");
    terminate(server);
    for kept in ["log", "checkpoints"] {
        assert!(
            !data_dir.join(kept).exists(),
            "{kept}/ with --durability none"
        );
    }

    let (server, client) = served(&data_dir, &["--durability", "none"]).await;
    assert_eq!(observe(&client).await, empty, "a restart starts empty");
    assert_eq!(client.get("k").await.unwrap(), None);
    terminate(server);
}

/// With `--durability async` (replies before the fsync), every acknowledged write survives
/// a graceful restart: stopping writes out and fsyncs what the log holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_async_keeps_acknowledged_writes_across_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let args = ["--durability", "async", "--fsync-interval-ms", "60000"];
    let (server, client) = served(&data_dir, &args).await;
    client.deploy("kv", &procedure_module("kv")).await.unwrap();
    // Concurrent writers, so that acknowledged writes wait in the log at the stop.
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    client
                        .put(&format!("w{writer}:{i}"), format!("{i}"))
                        .await
                        .unwrap();
                    if i % 10 == 0 {
                        client
                            .call_json("kv", "increment", r#"{"key":"count","by":1}"#)
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let expected = observe(&client).await;
    terminate(server);

    let (server, client) = served(&data_dir, &[]).await;
    assert_eq!(observe(&client).await, expected);
    assert_eq!(
        client.get("w3:49").await.unwrap().as_deref(),
        Some(&b"49"[..])
    );
    let count = client
        .call_json("kv", "increment", r#"{"key":"count","by":1}"#)
        .await
        .unwrap();
    assert_eq!(count, "21");
    terminate(server);
}

// ---------------------------------------------------------------------------------------
// 7. Damage.

/// A checkpoint with one flipped byte stops `transdb serve` (exit 2) with a message that
/// names the checkpoint, says it is damaged and says to restore from a backup; the data
/// directory is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_checkpoint_stops_the_start_saying_to_restore_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    fill(&client, "k", 10).await;
    client.checkpoint().await.unwrap();
    client.put("after", b"checkpoint").await.unwrap();
    stop(server, client).await;

    let checkpoint = only_checkpoint(&data_dir);
    let size = std::fs::metadata(&checkpoint).unwrap().len() as usize;
    flip_byte(&checkpoint, size / 2);
    let name = checkpoint.file_name().unwrap().to_str().unwrap();
    assert_refused(&data_dir, &[name, "damaged", "restore", "backup"]);
}

/// A log damaged in the middle — a flipped byte in its first record, valid records after it
/// — stops `transdb serve` (exit 2) with a message naming the segment and the offset and
/// saying to restore from a backup; so does damage at the end of a segment that later
/// segments follow. Nothing is cut or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_damaged_in_the_middle_stops_the_start_saying_to_restore_a_backup() {
    let dir = tempfile::tempdir().unwrap();

    // One segment: the first record's payload.
    let data_dir = dir.path().join("one-segment");
    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    fill(&client, "k", 10).await;
    stop(server, client).await;
    let [(segment, _)] = &segments(&data_dir)[..] else {
        panic!("one segment: {:?}", segments(&data_dir));
    };
    // The segment header, the first record's header, then its payload.
    let header = transdb_host::log::SEGMENT_HEADER_BYTES;
    flip_byte(
        &data_dir.join("log").join(segment),
        header + transdb_host::log::RECORD_HEADER_BYTES + 3,
    );
    assert_refused(
        &data_dir,
        &[
            segment,
            "damaged in the middle",
            &format!("byte {header}"),
            "backup",
        ],
    );

    // Several segments: the last byte of the first one.
    let data_dir = dir.path().join("segments");
    let server = start_in(&data_dir, |config| config.log_segment_bytes = 400).await;
    let client = client_of(&server).await;
    fill(&client, "k", 12).await;
    stop(server, client).await;
    let all = segments(&data_dir);
    assert!(all.len() >= 3, "{all:?}");
    let first = data_dir.join("log").join(&all[0].0);
    let size = std::fs::metadata(&first).unwrap().len() as usize;
    flip_byte(&first, size - 1);
    assert_refused(&data_dir, &[&all[0].0, "damaged", "backup"]);
}

/// A torn tail — the last record cut short by a crash during a write — is not damage:
/// the server starts, cuts it, says so in its log, and has the state from before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_the_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    fill(&client, "k", 10).await;
    let expected = observe(&client).await;
    stop(server, client).await;
    let [(segment, _)] = &segments(&data_dir)[..] else {
        panic!("one segment: {:?}", segments(&data_dir));
    };
    let path = data_dir.join("log").join(segment);
    let mut bytes = std::fs::read(&path).unwrap();
    let valid = bytes.len();
    // The first half of a record header and a few bytes of a payload that never finished.
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
    std::fs::write(&path, &bytes).unwrap();

    let mut server = serve(&data_dir, &[]);
    server.wait_for_log(&["torn tail"]);
    let client = client_of_child(&server, &data_dir).await;
    assert_eq!(observe(&client).await, expected);
    terminate(server);
    assert_eq!(
        std::fs::read(&path).unwrap()[..valid],
        bytes[..valid],
        "what was valid is kept"
    );
}

/// Deploys `kv` as `counter`, calls it, optionally checkpoints, stops, and deletes the
/// module's file from the module store.
async fn data_dir_missing_its_module(data_dir: &Path, checkpoint: bool) {
    let server = start_in(data_dir, |_| {}).await;
    let client = client_of(&server).await;
    client
        .deploy("counter", &procedure_module("kv"))
        .await
        .unwrap();
    client
        .call_json("counter", "increment", r#"{"key":"hits","by":1}"#)
        .await
        .unwrap();
    if checkpoint {
        client.checkpoint().await.unwrap();
    }
    stop(server, client).await;
    let modules = data_dir.join("modules");
    let files = names(&modules);
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::remove_file(modules.join(&files[0])).unwrap();
}

/// A module file that a deploy in the log names, missing from the module store, stops
/// `transdb serve` (exit 2) with a message naming the module, saying it is missing and
/// saying to restore from a backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_file_missing_for_the_log_stops_the_start_saying_to_restore_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    data_dir_missing_its_module(&data_dir, false).await;
    assert_refused(&data_dir, &["\"counter\"", "missing", "backup"]);
}

/// A module file that the checkpoint names, missing from the module store, stops
/// `transdb serve` (exit 2) with a message naming the module, saying it is missing and
/// saying to restore from a backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_file_missing_for_the_checkpoint_stops_the_start_saying_to_restore_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    data_dir_missing_its_module(&data_dir, true).await;
    assert_refused(&data_dir, &["\"counter\"", "missing", "backup"]);
}

/// A crash (process or machine) just after the log started a new segment — its header on
/// disk, its first record not — leaves a segment without records. The server starts, and
/// what it acknowledges afterwards survives the next crash. (Positions have gaps where reads
/// and `Stats` were ordered without being logged, so the segment's name may be above the
/// next position recovery gives out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_after_a_crash_that_left_an_empty_segment_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = start_in(&data_dir, |_| {}).await;
    let client = client_of(&server).await;
    fill(&client, "k", 5).await;
    // Ordered, not logged: the next logged transaction would have had `position + 1`.
    let stats = client.stats().await.unwrap();
    stop(server, client).await;
    // What the crash left: the segment the next transaction was about to be written into.
    let first = stats.position + 1;
    let mut header = b"TDBLOG\x00\x01".to_vec();
    header.extend_from_slice(&first.to_le_bytes());
    std::fs::write(
        data_dir.join("log").join(format!("{first:020}.log")),
        header,
    )
    .unwrap();

    let (server, client) = served(&data_dir, &[]).await;
    // Before anything else: a read or `Stats` would take a position too.
    client
        .put("acknowledged", b"after the crash")
        .await
        .unwrap();
    let expected = observe(&client).await;
    kill(server);

    let (server, client) = served(&data_dir, &[]).await;
    assert_eq!(
        client.get("acknowledged").await.unwrap().as_deref(),
        Some(&b"after the crash"[..]),
        "a write acknowledged in sync mode was lost"
    );
    assert_eq!(observe(&client).await, expected);
    terminate(server);
}
