//! Crash loop: a real server process under concurrent load (bank transfers + puts) is
//! killed with SIGKILL at random moments, many times; after each restart every
//! acknowledged write is present, the bank total is unchanged, and the state hash equals a
//! fresh replay.
//!
//! The server is the real `transdb serve` binary with `--durability sync` (a reply waits
//! until its transaction is fsynced), no timed checkpoints, small log segments, and
//! `--log-archive`, so the segments a checkpoint covers are kept in the archive rather than
//! deleted. The bank module is deployed once and [`ACCOUNTS`] accounts are opened with
//! [`INITIAL`] units each.
//!
//! Each iteration:
//!
//! 1. Load: [`TRANSFER_TASKS`] clients call `bank.transfer` between random accounts (a
//!    refusal for insufficient funds is fine), and [`WRITER_TASKS`] clients each put their
//!    own key `writer-{i}` with an increasing counter, recording the highest counter
//!    attempted (before the request is sent) and the highest acknowledged.
//! 2. Some iterations write a checkpoint under load: every third one runs `transdb
//!    checkpoint` halfway to the kill and waits for it, so that later restarts recover
//!    from a checkpoint plus the log tail; every third one fires a checkpoint request just
//!    before the kill, which usually cuts it short.
//! 3. Kill: once the number of acknowledged operations reaches a random target (from a
//!    seeded PRNG; the seed is printed and `CRASH_LOOP_SEED` reruns it), the server gets
//!    SIGKILL while the load is still running, so requests are in flight. No sleeps: the
//!    kill point is a count of acknowledgements.
//! 4. Restart on the same data directory, and check before any new traffic:
//!    - the state hash equals that of a *fresh replay*: a second server started on a copy
//!      of the whole command log (the archived segments plus `log/`) and the module
//!      store, without the checkpoints;
//!    - every writer key holds at least its last acknowledged counter and at most its
//!      highest attempted one (an in-flight put may or may not have been applied, but
//!      nothing acknowledged is lost and nothing never sent appears);
//!    - `bank.total` and the sum of the balances read one by one equal the initial
//!      total, and no balance is negative;
//!    - once a waited checkpoint exists, recovery started from a checkpoint at least as
//!      new as it.
//!
//! A value recovered once is as good as acknowledged (it was read back), so it becomes the
//! key's lower bound for the next iterations.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use transdb_client::{Client, ClientConfig, Error, ServerStats};
use transdb_procedures_bank::{Accounts, Open, Transfer, account_key};
use transdb_proto::ErrorCode;
use transdb_tests::{ChildServer, PATIENCE, Xorshift, cli, procedure_module};

/// Kill/restart iterations.
const ITERATIONS: usize = 12;
/// Bank accounts (`acct-00`, ...).
const ACCOUNTS: usize = 12;
/// Each account's opening balance.
const INITIAL: i64 = 1_000;
/// What the balances always sum to.
const TOTAL: i64 = INITIAL * ACCOUNTS as i64;
/// Largest transfer: big enough that some are refused for insufficient funds.
const MAX_AMOUNT: u64 = 400;
/// Clients calling `bank.transfer`.
const TRANSFER_TASKS: usize = 4;
/// Clients putting `writer-{i}`.
const WRITER_TASKS: usize = 4;
/// The kill comes once this many operations were acknowledged in the iteration, at least...
const MIN_KILL_AT: u64 = 20;
/// ...and at most.
const MAX_KILL_AT: u64 = 400;
/// With a checkpoint racing the kill, the kill comes fewer than this many
/// acknowledgements after the checkpoint request.
const RACING_KILL_AFTER: u64 = 16;
/// Small log segments, so that checkpoints have whole segments to archive.
const SEGMENT_BYTES: &str = "16384";
/// Where the servers keep their data, relative to their working directory (the default).
const DATA_DIR: &str = "transdb-data";

fn account_name(index: usize) -> String {
    format!("acct-{index:02}")
}

fn all_accounts() -> Accounts {
    Accounts {
        accounts: (0..ACCOUNTS).map(account_name).collect(),
    }
}

fn writer_key(writer: usize) -> String {
    format!("writer-{writer}")
}

/// What the load has done in the current iteration; the main task waits on it.
#[derive(Default)]
struct Progress {
    /// Operations acknowledged (puts stored, transfers applied or refused).
    acked: u64,
    puts: u64,
    transfers: u64,
    refused: u64,
    /// An error before the kill: the test fails with it.
    failure: Option<String>,
}

/// One writer's counters, kept across iterations.
#[derive(Clone, Copy, Debug, Default)]
struct WriterState {
    /// The highest counter acknowledged (or read back after a restart); 0: none yet.
    acked: u64,
    /// The highest counter ever sent.
    attempted: u64,
}

/// What the load tasks share with the main task.
struct Shared {
    progress: watch::Sender<Progress>,
    /// Set just before the SIGKILL: from then on, errors are expected.
    killed: AtomicBool,
    writers: Vec<Mutex<WriterState>>,
}

impl Shared {
    /// Reports an unexpected error (unless the server is being killed), then waits to be
    /// aborted.
    async fn fail(&self, what: String) {
        if !self.killed.load(Ordering::SeqCst) {
            self.progress.send_modify(|progress| {
                progress.failure.get_or_insert(what);
            });
        }
        std::future::pending::<()>().await;
    }
}

async fn writer_task(shared: Arc<Shared>, client: Client, writer: usize) {
    let key = writer_key(writer);
    loop {
        let counter = {
            let mut state = shared.writers[writer].lock().unwrap();
            state.attempted += 1;
            state.attempted
        };
        match client.put(&key, counter.to_string()).await {
            Ok(()) => {
                {
                    let mut state = shared.writers[writer].lock().unwrap();
                    state.acked = state.acked.max(counter);
                }
                shared.progress.send_modify(|progress| {
                    progress.acked += 1;
                    progress.puts += 1;
                });
            }
            Err(error) if error.is_retryable() => {}
            Err(error) => {
                shared
                    .fail(format!("put {key}={counter} failed: {error}"))
                    .await;
            }
        }
    }
}

async fn transfer_task(shared: Arc<Shared>, client: Client, seed: u64) {
    let mut random = Xorshift::new(seed);
    loop {
        let from = random.below(ACCOUNTS as u64) as usize;
        let to = (from + 1 + random.below(ACCOUNTS as u64 - 1) as usize) % ACCOUNTS;
        let transfer = Transfer {
            from: account_name(from),
            to: account_name(to),
            amount: 1 + random.below(MAX_AMOUNT) as i64,
        };
        match client.call::<_, ()>("bank", "transfer", &transfer).await {
            Ok(()) => shared.progress.send_modify(|progress| {
                progress.acked += 1;
                progress.transfers += 1;
            }),
            Err(Error::Rejected(error))
                if error.code == ErrorCode::ABORTED
                    && error.message.contains("insufficient funds") =>
            {
                shared.progress.send_modify(|progress| {
                    progress.acked += 1;
                    progress.refused += 1;
                });
            }
            Err(error) if error.is_retryable() => {}
            Err(error) => {
                shared
                    .fail(format!("transfer {transfer:?} failed: {error}"))
                    .await;
            }
        }
    }
}

/// `future`, or a failure naming `what` after [`PATIENCE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {PATIENCE:?}"))
}

/// The data directory of a server run in `cwd`.
fn data_dir(cwd: &Path) -> PathBuf {
    cwd.join(DATA_DIR)
}

fn client_config(cwd: &Path) -> ClientConfig {
    ClientConfig::for_data_dir(&data_dir(cwd)).expect("certificate and token load")
}

async fn connect(server: &ChildServer, cwd: &Path) -> Client {
    within(
        "connecting",
        Client::connect(&server.addr.to_string(), client_config(cwd)),
    )
    .await
    .expect("client connects")
}

/// Starts `transdb serve` in `cwd` (blocking until it listens).
fn start(cwd: &Path, extra: &[&str]) -> ChildServer {
    let mut args = vec![
        "--durability",
        "sync",
        "--checkpoint-interval-secs",
        "0",
        "--log-segment-bytes",
        SEGMENT_BYTES,
    ];
    args.extend_from_slice(extra);
    tokio::task::block_in_place(|| ChildServer::start(cwd, "127.0.0.1:0", &args))
}

/// SIGKILLs the server (`Child::kill` on Unix) and reaps it.
fn kill(server: ChildServer) {
    tokio::task::block_in_place(|| drop(server));
}

/// What the server's `recovered` log line says.
#[derive(Debug)]
struct Recovered {
    checkpoint: Option<u64>,
    replayed: u64,
    torn_bytes: u64,
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in the recovery line {line:?}"))
        + name.len()
        + 2;
    line[start..].split_whitespace().next().unwrap()
}

fn recovered(server: &mut ChildServer) -> Recovered {
    let line = tokio::task::block_in_place(|| server.wait_for_log(&["recovered"]));
    let number = |name: &str| -> u64 {
        field(&line, name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} in {line:?}"))
    };
    let checkpoint = match field(&line, "checkpoint") {
        "None" => None,
        some => Some(
            some.strip_prefix("Some(")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|position| position.parse().ok())
                .unwrap_or_else(|| panic!("checkpoint in {line:?}")),
        ),
    };
    Recovered {
        checkpoint,
        replayed: number("replayed"),
        torn_bytes: number("torn_bytes"),
    }
}

/// The regular files in `dir` (none if it does not exist), by name.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.is_file())
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("cannot read {}: {error}", dir.display()),
    };
    found.sort();
    found
}

/// Makes `replay` a data directory holding the whole command log of the server in `cwd`
/// (the archived segments and those still in `log/`) and its module store, but no
/// checkpoint. Returns how many segments came from the archive and from `log/`.
fn copy_for_replay(cwd: &Path, archive: &Path, replay: &Path) -> (usize, usize) {
    let source = data_dir(cwd);
    let target = data_dir(replay);
    let log = target.join("log");
    let modules = target.join("modules");
    fs::create_dir_all(&log).unwrap();
    fs::create_dir_all(&modules).unwrap();
    let archived = files(archive);
    let current = files(&source.join("log"));
    for segment in archived.iter().chain(&current) {
        let copy = log.join(segment.file_name().unwrap());
        assert!(
            !copy.exists(),
            "{} is both archived and still in the log",
            segment.display()
        );
        fs::copy(segment, &copy).unwrap();
    }
    for module in files(&source.join("modules")) {
        fs::copy(&module, modules.join(module.file_name().unwrap())).unwrap();
    }
    (archived.len(), current.len())
}

async fn stats(client: &Client, what: &str) -> ServerStats {
    within(what, client.stats())
        .await
        .unwrap_or_else(|error| panic!("{what}: {error}"))
}

/// Deploys the bank and opens the accounts.
async fn set_up_bank(client: &Client) {
    within("deploy", client.deploy("bank", &procedure_module("bank")))
        .await
        .expect("bank deploys");
    for index in 0..ACCOUNTS {
        let open = Open {
            account: account_name(index),
            balance: INITIAL,
        };
        let () = within("open", client.call("bank", "open", &open))
            .await
            .expect("account opens");
    }
}

/// Checks the restarted server's state (see the module doc); updates the writers' lower
/// bounds to what was recovered.
async fn check_state(client: &Client, shared: &Shared, iteration: usize) {
    for (writer, state) in shared.writers.iter().enumerate() {
        let key = writer_key(writer);
        let value = within("get", client.get(&key))
            .await
            .unwrap_or_else(|error| panic!("get {key}: {error}"));
        let mut state = state.lock().unwrap();
        match value {
            None => assert_eq!(
                state.acked, 0,
                "iteration {iteration}: {key} is missing after the restart, though counter \
                 {} was acknowledged ({state:?})",
                state.acked
            ),
            Some(value) => {
                let text = String::from_utf8(value).expect("a counter is UTF-8");
                let counter: u64 = text
                    .parse()
                    .unwrap_or_else(|_| panic!("{key} holds {text:?}, not a counter"));
                assert!(
                    counter >= state.acked,
                    "iteration {iteration}: {key} recovered as {counter}, but {} was \
                     acknowledged: an acknowledged write was lost ({state:?})",
                    state.acked
                );
                assert!(
                    counter <= state.attempted,
                    "iteration {iteration}: {key} recovered as {counter}, which was never \
                     sent ({state:?})"
                );
                state.acked = counter;
            }
        }
    }
    let total: i64 = within("bank.total", client.call("bank", "total", &all_accounts()))
        .await
        .unwrap_or_else(|error| panic!("bank.total: {error}"));
    assert_eq!(
        total, TOTAL,
        "iteration {iteration}: bank.total after the restart"
    );
    let mut balances = Vec::with_capacity(ACCOUNTS);
    for index in 0..ACCOUNTS {
        let key = account_key(&account_name(index));
        let value = within("get", client.get(&key))
            .await
            .unwrap_or_else(|error| panic!("get {key}: {error}"))
            .unwrap_or_else(|| panic!("iteration {iteration}: {key} is missing"));
        let text = String::from_utf8(value).expect("a balance is UTF-8");
        balances.push(
            text.parse::<i64>()
                .unwrap_or_else(|_| panic!("{key} holds {text:?}")),
        );
    }
    assert!(
        balances.iter().all(|balance| *balance >= 0),
        "iteration {iteration}: a negative balance: {balances:?}"
    );
    assert_eq!(
        balances.iter().sum::<i64>(),
        TOTAL,
        "iteration {iteration}: the balances {balances:?}"
    );
}

/// How an iteration's checkpoint is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CheckpointMode {
    None,
    /// Mid-load, awaited (it must succeed) before the load goes on to the kill.
    Waited,
    /// Mid-load, racing the kill.
    Racing,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_write_and_recovers_the_replayed_state() {
    let seed = std::env::var("CRASH_LOOP_SEED")
        .ok()
        .map(|seed| seed.parse::<u64>().expect("CRASH_LOOP_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash loop seed {seed} (rerun with CRASH_LOOP_SEED={seed})");
    let mut random = Xorshift::new(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("server");
    let archive = dir.path().join("archive");
    fs::create_dir_all(&work).unwrap();
    let archive_arg = archive.to_str().unwrap().to_owned();
    let server_flags = ["--log-archive", archive_arg.as_str()];

    let mut server = start(&work, &server_flags);
    {
        let client = connect(&server, &work).await;
        set_up_bank(&client).await;
        client.close().await;
    }
    let mut writers: Vec<Mutex<WriterState>> =
        (0..WRITER_TASKS).map(|_| Mutex::default()).collect();
    let mut newest_waited_checkpoint: Option<u64> = None;
    let mut checkpoints_recovered = 0;

    for iteration in 0..ITERATIONS {
        let iteration_started = Instant::now();
        let mut kill_at = MIN_KILL_AT + random.below(MAX_KILL_AT - MIN_KILL_AT + 1);
        let mode = match iteration % 3 {
            1 => CheckpointMode::Waited,
            2 => CheckpointMode::Racing,
            _ => CheckpointMode::None,
        };
        let (progress, watcher) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            progress,
            killed: AtomicBool::new(false),
            writers,
        });

        // The load.
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for writer in 0..WRITER_TASKS {
            let client = connect(&server, &work).await;
            tasks.push(tokio::spawn(writer_task(shared.clone(), client, writer)));
        }
        for _ in 0..TRANSFER_TASKS {
            let client = connect(&server, &work).await;
            tasks.push(tokio::spawn(transfer_task(
                shared.clone(),
                client,
                random.next(),
            )));
        }

        let wait_for_acks = |watcher: &watch::Receiver<Progress>, target: u64| {
            let mut watcher = watcher.clone();
            async move {
                let progress = within(
                    &format!("{target} acknowledged operations"),
                    watcher.wait_for(|progress| {
                        progress.acked >= target || progress.failure.is_some()
                    }),
                )
                .await
                .expect("the sender lives");
                if let Some(failure) = &progress.failure {
                    panic!("iteration {iteration}: the load failed before the kill: {failure}");
                }
            }
        };

        // A checkpoint under load: halfway to the kill, or racing it.
        let mut racing_checkpoint = None;
        let mut checkpoint_note = String::from("no checkpoint");
        match mode {
            CheckpointMode::None => {}
            CheckpointMode::Waited => {
                wait_for_acks(&watcher, kill_at / 2).await;
                let addr = server.addr.to_string();
                let cwd = work.clone();
                let output = within(
                    "transdb checkpoint",
                    tokio::task::spawn_blocking(move || {
                        cli(&cwd, &["--server", &addr, "checkpoint"], b"")
                    }),
                )
                .await
                .expect("the CLI runs");
                let stdout = String::from_utf8_lossy(&output.stdout);
                assert!(
                    output.status.success(),
                    "iteration {iteration}: transdb checkpoint failed: {}{stdout}",
                    output.stderr
                );
                let position: u64 = stdout
                    .strip_prefix("checkpoint at position ")
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|position| position.parse().ok())
                    .unwrap_or_else(|| panic!("transdb checkpoint printed {stdout:?}"));
                checkpoint_note = format!("waited checkpoint at {position}");
                newest_waited_checkpoint = Some(position);
            }
            CheckpointMode::Racing => {
                // Fired at the target, the kill follows a few acknowledgements later: the
                // checkpoint is usually still being written.
                wait_for_acks(&watcher, kill_at).await;
                let client = connect(&server, &work).await;
                racing_checkpoint = Some(tokio::spawn(async move { client.checkpoint().await }));
                kill_at = watcher.borrow().acked + random.below(RACING_KILL_AFTER);
            }
        }

        // The kill, while the load runs.
        wait_for_acks(&watcher, kill_at).await;
        shared.killed.store(true, Ordering::SeqCst);
        kill(server);
        if let Some(failure) = &watcher.borrow().failure {
            panic!("iteration {iteration}: the load failed before the kill: {failure}");
        }
        let (acked, puts, transfers, refused) = {
            let progress = watcher.borrow();
            (
                progress.acked,
                progress.puts,
                progress.transfers,
                progress.refused,
            )
        };
        for task in tasks {
            task.abort();
            match task.await {
                Ok(()) => unreachable!("the load runs until aborted"),
                Err(error) if error.is_cancelled() => {}
                Err(error) => panic!("iteration {iteration}: a load task panicked: {error}"),
            }
        }
        if let Some(task) = racing_checkpoint {
            if task.is_finished() {
                match task.await.expect("the checkpoint task does not panic") {
                    Ok(info) => {
                        checkpoint_note = format!("racing checkpoint at {} (done)", info.position)
                    }
                    Err(error) => {
                        // It may have been answered in the instant before the kill, or lost
                        // its connection to it; nothing else.
                        assert!(
                            matches!(error, Error::ConnectionLost { .. }),
                            "iteration {iteration}: the checkpoint failed: {error}"
                        );
                        checkpoint_note = "racing checkpoint (cut by the kill)".into();
                    }
                }
            } else {
                task.abort();
                checkpoint_note = "racing checkpoint (in flight at the kill)".into();
            }
        }
        let shared = Arc::into_inner(shared).expect("the load tasks are gone");
        let writer_states: Vec<WriterState> = shared
            .writers
            .iter()
            .map(|state| *state.lock().unwrap())
            .collect();

        // A copy of the whole log, for a fresh replay.
        let replay = tempfile::tempdir().unwrap();
        let (archived, current) = copy_for_replay(&work, &archive, replay.path());

        // Restart on the same data directory.
        server = start(&work, &server_flags);
        let recovery = recovered(&mut server);
        let client = connect(&server, &work).await;
        let recovered_stats = stats(&client, "stats after the restart").await;

        let mut replayed = start(replay.path(), &[]);
        let replay_recovery = recovered(&mut replayed);
        assert_eq!(
            replay_recovery.checkpoint, None,
            "the fresh replay has no checkpoint"
        );
        let replay_client = connect(&replayed, replay.path()).await;
        let replay_stats = stats(&replay_client, "stats of the fresh replay").await;
        replay_client.close().await;
        kill(replayed);

        assert_eq!(
            recovered_stats.state_hash,
            replay_stats.state_hash,
            "iteration {iteration}: the recovered state ({recovery:?}, {} keys) differs from a \
             fresh replay of the whole log ({replay_recovery:?}, {} keys; {archived} archived \
             and {current} current segments); writers before the kill: {writer_states:?}",
            recovered_stats.shards.iter().map(|s| s.keys).sum::<u64>(),
            replay_stats.shards.iter().map(|s| s.keys).sum::<u64>(),
        );
        assert_eq!(recovered_stats.modules, 1, "the bank module is recovered");
        assert_eq!(replay_stats.modules, 1, "the bank module is replayed");
        if let Some(waited) = newest_waited_checkpoint {
            assert!(
                recovery
                    .checkpoint
                    .is_some_and(|position| position >= waited),
                "iteration {iteration}: recovery used {:?}, not the checkpoint at {waited}",
                recovery.checkpoint
            );
        }
        if recovery.checkpoint.is_some() {
            checkpoints_recovered += 1;
        }

        check_state(&client, &shared, iteration).await;
        client.close().await;
        writers = shared.writers;

        println!(
            "iteration {iteration}: killed at {acked} acknowledged operations (target \
             {kill_at}; {puts} puts, {transfers} transfers, {refused} refused), {checkpoint_note}; \
             recovered from checkpoint {:?} + {} log records ({} torn bytes cut); fresh replay \
             of {archived} archived + {current} current segments ({} records) has the same hash \
             {}; {:.1?}",
            recovery.checkpoint,
            recovery.replayed,
            recovery.torn_bytes,
            replay_recovery.replayed,
            &recovered_stats.state_hash[..12],
            iteration_started.elapsed(),
        );
    }
    drop(server);

    assert!(
        checkpoints_recovered > 0,
        "no restart recovered from a checkpoint"
    );
    assert!(
        !files(&archive).is_empty(),
        "no checkpoint archived a log segment: the fresh replays never needed the archive"
    );
    println!(
        "crash loop: {ITERATIONS} kills and restarts in {:.1?} (seed {seed})",
        started.elapsed()
    );
}
