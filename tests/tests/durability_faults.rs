//! Failure injection at the fsync / write / rename points: errors are reported, the server
//! does not acknowledge what it could not make durable.
//!
//! The faults are `fail` crate fail points compiled into the host (always compiled in, inert unless configured):
//! `log-write`, `log-fsync`, `log-create-segment` in the command log, `checkpoint-fsync` and
//! `checkpoint-rename` in the durable file writer that checkpoints and the module store share.
//! Fail points are process-global: every test holds a [`FailScenario`] for its whole run
//! (the scenario is also a process-wide lock, so the tests of this file run one at a time),
//! and dropping it clears every fail point, even when the test panics.
//!
//! Each scenario keeps its data directory in a [`TempDir`] of its own, so that it can stop
//! the server and start a new one on the same directory to see what was really made durable.

use std::fmt::Debug;
use std::future::Future;
use std::path::{Path, PathBuf};

use fail::FailScenario;
use tempfile::TempDir;
use transdb_client::{BatchOp, Client, Error};
use transdb_host::durability::CHECKPOINT_DIR;
use transdb_host::log::{LOG_DIR, segments};
use transdb_host::{Server, ServerConfig};
use transdb_proto::ErrorCode;
use transdb_tests::{PATIENCE, procedure_module};

/// A server on a data directory the test owns, and a client of it.
struct Node {
    server: Server,
    client: Client,
}

impl Node {
    /// Starts a server on `dir` (created if missing): sync durability, no periodic
    /// checkpoints (a timer must not hit a checkpoint fail point behind the test's back),
    /// after `adjust` has changed the configuration.
    async fn start_with(dir: &Path, adjust: impl FnOnce(&mut ServerConfig)) -> Node {
        let mut config = ServerConfig::new(dir);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.shards = 2;
        config.checkpoint_interval = std::time::Duration::ZERO;
        config.checkpoint_log_bytes = 0;
        adjust(&mut config);
        let server = within("server start", Server::start(config))
            .await
            .expect("server starts");
        let client_config = server.admin_client_config().unwrap();
        let client = within(
            "client connects",
            Client::connect(&server.local_addr().to_string(), client_config),
        )
        .await
        .expect("client connects");
        Node { server, client }
    }

    async fn start(dir: &Path) -> Node {
        Self::start_with(dir, |_| {}).await
    }

    /// Graceful shutdown: the client goes first, then the server closes its log.
    async fn stop(self) {
        within("client close", self.client.close()).await;
        let report = within("server shutdown", self.server.shutdown()).await;
        assert_eq!(report.abandoned, 0, "no request was left running");
    }

    async fn put(&self, key: &str, value: &str) -> Result<(), Error> {
        within("put", self.client.put(key, value)).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        within("get", self.client.get(key)).await
    }

    /// Asserts that every `(key, value)` of `expected` reads back.
    async fn assert_holds(&self, expected: &[(String, String)], context: &str) {
        for (key, value) in expected {
            assert_eq!(
                self.get(key).await.unwrap().as_deref(),
                Some(value.as_bytes()),
                "{context}: the acknowledged write of {key:?} is not there"
            );
        }
    }
}

/// The restarted `node` on `dir` is usable for good: `count` new writes are acknowledged
/// and, after another restart, read back with every write of `earlier`.
async fn assert_new_writes_last(
    dir: &Path,
    node: Node,
    earlier: &[(String, String)],
    count: usize,
    context: &str,
) {
    let mut expected = earlier.to_vec();
    expected.extend(put_acknowledged(&node, "after-restart-", count).await);
    node.stop().await;
    let node = Node::start(dir).await;
    node.assert_holds(&expected, &format!("{context}: after a second restart"))
        .await;
    node.stop().await;
}

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {PATIENCE:?}"))
}

/// The message of the error `result` must be, with `code`.
#[track_caller]
fn refused<T: Debug>(result: Result<T, Error>, code: ErrorCode, what: &str) -> String {
    match result {
        Err(Error::Rejected(error)) if error.code == code => error.message,
        other => panic!("{what}: expected a {code:?} error, got {other:?}"),
    }
}

/// Asserts that `message` tells the client the outcome is unknown and to restart.
#[track_caller]
fn says_unknown_and_restart(message: &str) {
    assert!(
        message.contains("may or may not"),
        "the message says the outcome is unknown: {message}"
    );
    assert!(
        message.contains("restart"),
        "the message says to restart: {message}"
    );
}

/// Puts `count` keys `{prefix}{i}` (each acknowledged) and returns them with their values.
async fn put_acknowledged(node: &Node, prefix: &str, count: usize) -> Vec<(String, String)> {
    let mut written = Vec::new();
    for i in 0..count {
        let (key, value) = (format!("{prefix}{i}"), format!("value of {prefix}{i}"));
        node.put(&key, &value).await.unwrap();
        written.push((key, value));
    }
    written
}

/// The names of the log's segment files.
fn segment_names(data_dir: &Path) -> Vec<PathBuf> {
    segments(&data_dir.join(LOG_DIR))
        .unwrap()
        .into_iter()
        .map(|segment| segment.path)
        .collect()
}

/// The files in the checkpoint directory whose names end with `suffix`.
fn checkpoint_files(data_dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(CHECKPOINT_DIR)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

/// Scenario 1, `log-fsync` fails. The Put whose fsync failed is answered
/// `DURABILITY_FAILED` with a message that says its outcome is unknown and to restart.
/// From then on every ordered request (Put, Get, Delete, Batch, Call, Stats, Deploy, Begin,
/// the Commit of a transaction begun before the fault, and Checkpoint) is refused with
/// `DURABILITY_FAILED` and changes nothing, while Ping and ListModules still answer. After a
/// restart on the same data directory (fail point removed), every write acknowledged before
/// the fault is there, and the Puts refused after it are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_fsync_is_reported_and_later_transactions_are_refused() {
    let scenario = FailScenario::setup();
    let dir = TempDir::new().unwrap();
    let node = Node::start(dir.path()).await;
    within("deploy", node.client.deploy("kv", &procedure_module("kv")))
        .await
        .unwrap();
    let mut acknowledged = put_acknowledged(&node, "before-", 10).await;
    within(
        "call",
        node.client
            .call_json("kv", "put", r#"{"key":"by-call","value":"called"}"#),
    )
    .await
    .unwrap();
    acknowledged.push(("by-call".into(), "called".into()));
    // A transaction begun before the fault, to commit after it.
    let mut open = within("begin", node.client.begin()).await.unwrap();
    open.put("from-transaction", b"never").await.unwrap();

    fail::cfg("log-fsync", "return").unwrap();
    let message = refused(
        node.put("in-flight", "unknown").await,
        ErrorCode::DURABILITY_FAILED,
        "the Put whose fsync failed",
    );
    says_unknown_and_restart(&message);
    assert!(
        message.contains("injected fault at log-fsync"),
        "the message names the cause: {message}"
    );

    // Every later ordered request is refused the same way.
    let refusals = [
        ("Put", node.put("after-fault", "refused").await.map(drop)),
        ("Get", node.get("before-0").await.map(drop)),
        (
            "Delete",
            within("delete", node.client.delete("before-1"))
                .await
                .map(drop),
        ),
        (
            "Batch",
            within(
                "batch",
                node.client.batch(&[BatchOp::Put {
                    key: "batched".into(),
                    value: b"refused".as_slice().into(),
                }]),
            )
            .await
            .map(drop),
        ),
        (
            "Call",
            within(
                "call",
                node.client
                    .call_json("kv", "put", r#"{"key":"called-after","value":"refused"}"#),
            )
            .await
            .map(drop),
        ),
        (
            "Stats",
            within("stats", node.client.stats()).await.map(drop),
        ),
        (
            "Deploy",
            within("deploy", node.client.deploy("kv2", &procedure_module("kv")))
                .await
                .map(drop),
        ),
        (
            "Begin",
            within("begin", node.client.begin()).await.map(drop),
        ),
        ("Commit", within("commit", open.commit()).await.map(drop)),
        // A checkpoint would make the refused effects durable behind the clients' backs.
        (
            "Checkpoint",
            within("checkpoint", node.client.checkpoint())
                .await
                .map(drop),
        ),
    ];
    for (what, result) in refusals {
        let message = refused(result, ErrorCode::DURABILITY_FAILED, what);
        assert!(message.contains("restart"), "{what}: {message}");
    }
    // Requests that are not ordered still answer.
    within("ping", node.client.ping()).await.unwrap();
    let modules = within("modules", node.client.modules()).await.unwrap();
    assert_eq!(
        modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["kv"],
        "the refused deploy installed nothing"
    );
    // Nothing refused was applied, not even in memory.
    let store = node.server.store();
    for key in ["after-fault", "batched", "called-after", "from-transaction"] {
        assert_eq!(
            store.get(key),
            None,
            "the refused write of {key:?} was applied"
        );
    }
    assert!(
        store.get("before-1").is_some(),
        "the refused Delete was applied"
    );
    node.stop().await;

    fail::remove("log-fsync");
    let node = Node::start(dir.path()).await;
    node.assert_holds(&acknowledged, "after the restart").await;
    for key in ["after-fault", "batched", "called-after", "from-transaction"] {
        assert_eq!(
            node.get(key).await.unwrap(),
            None,
            "the refused write of {key:?} came back after the restart"
        );
    }
    // The restarted server is fully usable: writes, calls, and they last.
    assert_eq!(
        within(
            "call",
            node.client.call_json("kv", "get", r#"{"key":"by-call"}"#)
        )
        .await
        .unwrap(),
        r#""called""#
    );
    assert_new_writes_last(dir.path(), node, &acknowledged, 1, "log-fsync").await;
    scenario.teardown();
}

/// Scenario 2, `log-write` fails: the Put whose record could not be written is answered
/// `DURABILITY_FAILED` (outcome unknown, restart); after a restart it is absent, since
/// nothing of it reached the log, and every write acknowledged before it is present
/// (including a delete: the deleted key stays deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_write_is_reported_and_the_write_is_absent_after_restart() {
    let scenario = FailScenario::setup();
    let dir = TempDir::new().unwrap();
    let node = Node::start(dir.path()).await;
    let mut acknowledged = put_acknowledged(&node, "before-", 10).await;
    assert!(
        within("delete", node.client.delete("before-9"))
            .await
            .unwrap()
    );
    acknowledged.pop();
    let segments_before = segment_names(dir.path());
    assert_eq!(segments_before.len(), 1);
    let bytes_before = std::fs::metadata(&segments_before[0]).unwrap().len();

    fail::cfg("log-write", "return").unwrap();
    let message = refused(
        node.put("lost", "never written").await,
        ErrorCode::DURABILITY_FAILED,
        "the Put whose write failed",
    );
    says_unknown_and_restart(&message);
    refused(
        node.put("after-fault", "refused").await,
        ErrorCode::DURABILITY_FAILED,
        "a Put after the failure",
    );
    within("ping", node.client.ping()).await.unwrap();
    assert_eq!(
        std::fs::metadata(&segments_before[0]).unwrap().len(),
        bytes_before,
        "nothing was written to the log"
    );
    node.stop().await;

    fail::remove("log-write");
    let node = Node::start(dir.path()).await;
    node.assert_holds(&acknowledged, "after the restart").await;
    assert_eq!(node.get("before-9").await.unwrap(), None, "still deleted");
    assert_eq!(
        node.get("lost").await.unwrap(),
        None,
        "the Put whose write failed is absent"
    );
    assert_eq!(node.get("after-fault").await.unwrap(), None);
    assert_new_writes_last(dir.path(), node, &acknowledged, 1, "log-write").await;
    scenario.teardown();
}

/// Scenario 3, `log-create-segment` fails on a fresh data directory (the first write
/// creates the first segment): the Put is answered `DURABILITY_FAILED`, later ones are
/// refused, Ping still answers, no segment is left behind; a restart works, the failed Put
/// is absent, and new writes are acknowledged and survive the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_segment_is_reported_and_a_restart_works() {
    let scenario = FailScenario::setup();
    let dir = TempDir::new().unwrap();
    let node = Node::start(dir.path()).await;
    fail::cfg("log-create-segment", "return").unwrap();
    let message = refused(
        node.put("first", "never logged").await,
        ErrorCode::DURABILITY_FAILED,
        "the first Put",
    );
    says_unknown_and_restart(&message);
    refused(
        node.put("second", "refused").await,
        ErrorCode::DURABILITY_FAILED,
        "a Put after the failure",
    );
    within("ping", node.client.ping()).await.unwrap();
    within("ping", node.client.ping()).await.unwrap();
    assert_eq!(segment_names(dir.path()), Vec::<PathBuf>::new());
    node.stop().await;

    fail::remove("log-create-segment");
    let node = Node::start(dir.path()).await;
    assert_eq!(node.get("first").await.unwrap(), None);
    assert_eq!(node.get("second").await.unwrap(), None);
    assert_new_writes_last(dir.path(), node, &[], 5, "log-create-segment").await;
    scenario.teardown();
}

/// Scenario 4, `checkpoint-fsync` and then `checkpoint-rename` fail: `Checkpoint` is
/// answered `INTERNAL` with a message saying nothing was removed; the previous checkpoint
/// and every log segment are still there (the log has several segments, so a checkpoint
/// would remove some), and traffic goes on. A restart recovers the full state from the
/// previous checkpoint and the log, undisturbed by the temp file the failure left behind;
/// with the fail point gone a checkpoint succeeds, drops the segments it covers, and the
/// next restart starts from it with the full state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checkpoints_remove_nothing_and_a_later_one_works() {
    let scenario = FailScenario::setup();
    let dir = TempDir::new().unwrap();
    let small_segments = |config: &mut ServerConfig| config.log_segment_bytes = 256;
    let node = Node::start_with(dir.path(), small_segments).await;
    let mut acknowledged = put_acknowledged(&node, "first-", 20).await;
    let first = within("checkpoint", node.client.checkpoint())
        .await
        .unwrap();
    assert_eq!(first.keys, 20);
    let first_file = checkpoint_files(dir.path(), ".checkpoint");
    assert_eq!(first_file.len(), 1);
    acknowledged.extend(put_acknowledged(&node, "second-", 30).await);
    let segments_before = segment_names(dir.path());
    assert!(
        segments_before.len() >= 3,
        "the log spans several segments: {segments_before:?}"
    );

    for point in ["checkpoint-fsync", "checkpoint-rename"] {
        // (The write after each failed checkpoint may have started a segment.)
        let segments_before = segment_names(dir.path());
        fail::cfg(point, "return").unwrap();
        let message = refused(
            within("checkpoint", node.client.checkpoint()).await,
            ErrorCode::INTERNAL,
            point,
        );
        assert!(
            message.contains("nothing was removed"),
            "{point}: the message says nothing was removed: {message}"
        );
        assert!(
            message.contains(&format!("injected fault at {point}")),
            "{point}: the message names the cause: {message}"
        );
        assert_eq!(
            segment_names(dir.path()),
            segments_before,
            "{point}: no log segment was removed"
        );
        assert_eq!(
            checkpoint_files(dir.path(), ".checkpoint"),
            first_file,
            "{point}: the previous checkpoint is kept and no new one appeared"
        );
        fail::remove(point);
        // Traffic goes on.
        node.put(&format!("after-{point}"), "served").await.unwrap();
        acknowledged.push((format!("after-{point}"), "served".into()));
    }
    assert!(
        !checkpoint_files(dir.path(), ".tmp").is_empty(),
        "the failed checkpoints left a temp file (what recovery must ignore)"
    );
    node.stop().await;

    let node = Node::start_with(dir.path(), small_segments).await;
    let recovery = node.server.recovery().unwrap().clone();
    assert_eq!(
        recovery.checkpoint,
        Some(first.position),
        "recovery starts from the last good checkpoint"
    );
    assert_eq!(recovery.checkpoint_keys, 20);
    assert!(
        checkpoint_files(dir.path(), ".tmp").is_empty(),
        "recovery removed the half-written temp file"
    );
    node.assert_holds(&acknowledged, "after the restart").await;
    let second = within("checkpoint", node.client.checkpoint())
        .await
        .unwrap();
    assert_eq!(second.keys, acknowledged.len() as u64);
    assert!(second.position > first.position);
    assert_eq!(
        checkpoint_files(dir.path(), ".checkpoint"),
        [PathBuf::from(&second.path)],
        "the new checkpoint replaced the old one"
    );
    let segments_after = segment_names(dir.path());
    assert!(
        segments_after.len() < segments_before.len(),
        "the successful checkpoint dropped the segments it covers: {segments_after:?}"
    );
    acknowledged.extend(put_acknowledged(&node, "third-", 5).await);
    node.stop().await;

    let node = Node::start_with(dir.path(), small_segments).await;
    let recovery = node.server.recovery().unwrap().clone();
    assert_eq!(recovery.checkpoint, Some(second.position));
    assert_eq!(
        recovery.replayed, 5,
        "only the writes after it are replayed"
    );
    node.assert_holds(&acknowledged, "after the second restart")
        .await;
    node.stop().await;
    scenario.teardown();
}

/// Scenario 5, a deploy whose module bytes cannot be stored (the module store writes them
/// through the same temp-file/fsync/rename path as checkpoints): with `checkpoint-fsync` and
/// then `checkpoint-rename` failing, the deploy is refused with `INTERNAL` saying nothing was
/// deployed; the new module is not deployed (calls get `MODULE_NOT_FOUND`), a module already
/// deployed under the name a failed deploy would replace keeps running, and the server keeps
/// serving. With the fail point gone the deploy works, and survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_whose_module_cannot_be_stored_is_refused() {
    let scenario = FailScenario::setup();
    let dir = TempDir::new().unwrap();
    let node = Node::start(dir.path()).await;
    within(
        "deploy",
        node.client.deploy("bank", &procedure_module("bank")),
    )
    .await
    .unwrap();
    within(
        "call",
        node.client
            .call_json("bank", "open", r#"{"account":"alice","balance":100}"#),
    )
    .await
    .unwrap();

    let kv = procedure_module("kv");
    for point in ["checkpoint-fsync", "checkpoint-rename"] {
        fail::cfg(point, "return").unwrap();
        let message = refused(
            within("deploy", node.client.deploy("kv", &kv)).await,
            ErrorCode::INTERNAL,
            point,
        );
        assert!(
            message.contains("nothing was deployed"),
            "{point}: the message says nothing was deployed: {message}"
        );
        refused(
            within(
                "call",
                node.client.call_json("kv", "get", r#"{"key":"alice"}"#),
            )
            .await,
            ErrorCode::MODULE_NOT_FOUND,
            "a call of the module whose deploy failed",
        );
        // A failed replacement leaves the deployed version in place.
        refused(
            within("deploy", node.client.deploy("bank", &kv)).await,
            ErrorCode::INTERNAL,
            "replacing bank",
        );
        assert_eq!(
            within(
                "call",
                node.client
                    .call_json("bank", "balance", r#"{"account":"alice"}"#),
            )
            .await
            .unwrap(),
            "100",
            "{point}: bank still runs its own version"
        );
        let names: Vec<String> = within("modules", node.client.modules())
            .await
            .unwrap()
            .into_iter()
            .map(|module| module.name)
            .collect();
        assert_eq!(names, ["bank"], "{point}");
        // The server keeps serving ordinary requests.
        node.put(&format!("during-{point}"), "served")
            .await
            .unwrap();
        fail::remove(point);
    }

    within("deploy", node.client.deploy("kv", &kv))
        .await
        .unwrap();
    assert_eq!(
        within(
            "call",
            node.client
                .call_json("kv", "get", r#"{"key":"during-checkpoint-fsync"}"#),
        )
        .await
        .unwrap(),
        r#""served""#
    );
    node.stop().await;

    let node = Node::start(dir.path()).await;
    assert_eq!(
        within(
            "call",
            node.client
                .call_json("kv", "get", r#"{"key":"during-checkpoint-rename"}"#),
        )
        .await
        .unwrap(),
        r#""served""#,
        "the deploy made after the failures survives a restart"
    );
    assert_eq!(
        within(
            "call",
            node.client
                .call_json("bank", "balance", r#"{"account":"alice"}"#),
        )
        .await
        .unwrap(),
        "100"
    );
    node.stop().await;
    scenario.teardown();
}

/// An empty segment left by a failed write (see the two tests below): `point` fails while
/// the first write of a fresh log, at position 5 (reads took 0..5 without logging
/// anything), goes to disk. The segment it started, named after position 5, holds only its
/// header. The next server resumes at position 0 and appends into that segment; what it
/// acknowledges must survive the restart after that.
async fn empty_segment_then_two_restarts(point: &str) {
    let dir = TempDir::new().unwrap();
    let node = Node::start(dir.path()).await;
    for _ in 0..5 {
        assert_eq!(node.get("nothing").await.unwrap(), None);
    }
    fail::cfg(point, "return").unwrap();
    refused(
        node.put("lost", "never acknowledged").await,
        ErrorCode::DURABILITY_FAILED,
        point,
    );
    node.stop().await;
    fail::remove(point);
    assert_eq!(
        segment_names(dir.path()).len(),
        1,
        "{point}: the segment the failed write started is there"
    );

    let node = Node::start(dir.path()).await;
    assert_eq!(node.get("lost").await.unwrap(), None);
    assert_new_writes_last(dir.path(), node, &[], 10, point).await;
}

/// A `log-write` failure right after the log started a new segment leaves a segment that
/// holds only its header, named after a position that recovery may resume below: writes
/// acknowledged after the restart must survive the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_after_a_failed_write_left_an_empty_segment_survive() {
    let scenario = FailScenario::setup();
    empty_segment_then_two_restarts("log-write").await;
    scenario.teardown();
}

/// The same with `sync-dir` failing while the log starts its segment (the file and its
/// header are on disk, the directory entry not known to be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_after_a_failed_directory_sync_left_an_empty_segment_survive() {
    let scenario = FailScenario::setup();
    empty_segment_then_two_restarts("sync-dir").await;
    scenario.teardown();
}
