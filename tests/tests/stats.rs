//! Extended statistics end to end: `Stats` (`Client::stats`, `transdb stats`,
//! `transdb stats --json`) counts requests by kind with their errors and latency, error
//! answers by code, calls, errors and fuel per procedure; and reports keys and bytes per
//! shard, memory, the command log's progress and uptime.
//!
//! Every count here is exact: each test runs its own fresh server and accounts for every
//! request it sends (a `Stats` request is counted once answered, so a `Stats` never sees
//! itself, and the next one sees it).

use std::path::Path;
use std::time::{Duration, Instant};

use transdb_client::{BatchOp, Client, Latency, ProcedureStats, RequestStats, ServerStats};
use transdb_host::log::Durability;
use transdb_procedures_bank::{Open, Transfer};
use transdb_proto::ErrorCode;
use transdb_tests::{ChildServer, PATIENCE, TestServer, cli, procedure_module};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The row of request kind `kind`.
#[track_caller]
fn kind<'a>(stats: &'a ServerStats, kind: &str) -> &'a RequestStats {
    stats
        .requests
        .iter()
        .find(|row| row.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} row in {:#?}", stats.requests))
}

/// `(kind, count, errors)` of every row, in the server's order.
fn request_counts(stats: &ServerStats) -> Vec<(&str, u64, u64)> {
    stats
        .requests
        .iter()
        .map(|row| (row.kind.as_str(), row.count, row.errors))
        .collect()
}

/// `(code, name, count)` of every error row, in the server's order.
fn error_counts(stats: &ServerStats) -> Vec<(u16, &str, u64)> {
    stats
        .errors
        .iter()
        .map(|row| (row.code, row.name.as_str(), row.count))
        .collect()
}

/// The row of `module.procedure`.
#[track_caller]
fn procedure<'a>(stats: &'a ServerStats, module: &str, name: &str) -> &'a ProcedureStats {
    stats
        .procedures
        .iter()
        .find(|row| row.module == module && row.procedure == name)
        .unwrap_or_else(|| panic!("no {module}.{name} row in {:#?}", stats.procedures))
}

/// Percentiles in order, and something was measured.
#[track_caller]
fn assert_latency_sane(what: &str, latency: &Latency) {
    assert!(
        latency.p50_us <= latency.p95_us
            && latency.p95_us <= latency.p99_us
            && latency.p99_us <= latency.max_us,
        "{what}: percentiles out of order: {latency:?}"
    );
    assert!(latency.max_us > 0, "{what}: nothing measured: {latency:?}");
}

/// The error code of a failed request.
#[track_caller]
fn code_of<T: std::fmt::Debug>(result: Result<T, transdb_client::Error>) -> ErrorCode {
    match result {
        Err(error) => error
            .code()
            .unwrap_or_else(|| panic!("no error code: {error}")),
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

/// Deploys the bank and opens `alice` with `alice_balance` and `bob` with 100 (3 requests:
/// a `Deploy` and two `Call`s of `bank.open`).
async fn bank(client: &Client, alice_balance: i64) {
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    for (account, balance) in [("alice", alice_balance), ("bob", 100)] {
        let open = Open {
            account: account.into(),
            balance,
        };
        let () = client.call("bank", "open", &open).await.unwrap();
    }
}

/// `amount` from alice to bob through `bank.transfer`.
async fn transfer(client: &Client, amount: i64) -> Result<(), transdb_client::Error> {
    let transfer = Transfer {
        from: "alice".into(),
        to: "bob".into(),
        amount,
    };
    client.call("bank", "transfer", &transfer).await
}

/// The sum of keys and bytes over the shards.
fn shard_totals(stats: &ServerStats) -> (u64, u64) {
    stats.shards.iter().fold((0, 0), |(keys, bytes), shard| {
        (keys + shard.keys, bytes + shard.bytes)
    })
}

/// The store's per-key overhead (`transdb_host::store::ENTRY_OVERHEAD_BYTES`).
const ENTRY_OVERHEAD: u64 = transdb_host::store::ENTRY_OVERHEAD_BYTES as u64;

// ---------------------------------------------------------------------------------------
// Requests and errors
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_kind_and_errors_by_code() {
    let server = TestServer::start().await;
    let client = server.client().await;

    // 6 Puts, 4 Gets, 2 Deletes, 1 Batch.
    for i in 0..5 {
        client.put(&format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    client.put("hot", b"0").await.unwrap();
    for key in ["k0", "k1", "k2", "missing"] {
        client.get(key).await.unwrap();
    }
    assert!(client.delete("k3").await.unwrap());
    assert!(!client.delete("never").await.unwrap());
    let ops = [
        BatchOp::Put {
            key: "b1".into(),
            value: b"x".as_slice().into(),
        },
        BatchOp::Delete { key: "k4".into() },
    ];
    assert_eq!(client.batch(&ops).await.unwrap(), 2);

    // 1 Deploy and 2 Calls (opens), then 3 transfers, the last for more than alice has.
    bank(&client, 50).await;
    transfer(&client, 10).await.unwrap();
    transfer(&client, 20).await.unwrap();
    assert_eq!(code_of(transfer(&client, 1_000).await), ErrorCode::ABORTED);
    // A procedure the module does not have.
    assert_eq!(
        code_of(client.call_json("bank", "nosuch", "null").await),
        ErrorCode::PROCEDURE_NOT_FOUND
    );

    // Two interactive transactions read and write `hot`: the second to commit conflicts.
    // 2 Begins, 2 Gets, 2 Puts, 2 Commits (1 error).
    let mut first = client.begin().await.unwrap();
    let mut second = client.begin().await.unwrap();
    assert_eq!(first.get("hot").await.unwrap().as_deref(), Some(&b"0"[..]));
    assert_eq!(second.get("hot").await.unwrap().as_deref(), Some(&b"0"[..]));
    first.put("hot", b"1").await.unwrap();
    second.put("hot", b"2").await.unwrap();
    first.commit().await.unwrap();
    assert_eq!(code_of(second.commit().await), ErrorCode::CONFLICT);

    let before = client.stats().await.unwrap();
    assert_eq!(
        request_counts(&before),
        vec![
            ("Get", 6, 0),
            ("Put", 8, 0),
            ("Delete", 2, 0),
            ("Deploy", 1, 0),
            ("Call", 6, 2),
            ("Batch", 1, 0),
            ("Begin", 2, 0),
            ("Commit", 2, 1),
            ("Authenticate", 1, 0),
        ],
        "every request sent, by kind in request-number order: the connection's \
         Authenticate too, and not yet this Stats"
    );
    assert_eq!(
        error_counts(&before),
        vec![
            (ErrorCode::PROCEDURE_NOT_FOUND.0, "PROCEDURE_NOT_FOUND", 1),
            (ErrorCode::ABORTED.0, "ABORTED", 1),
            (ErrorCode::CONFLICT.0, "CONFLICT", 1),
        ]
    );
    assert_eq!(ErrorCode::ABORTED.0, 64);
    for row in &before.requests {
        assert_latency_sane(&row.kind, &row.latency);
    }

    // The first Stats is counted once answered: the second sees it, and nothing else moved.
    let after = client.stats().await.unwrap();
    let mut expected = request_counts(&before);
    expected.insert(5, ("Stats", 1, 0));
    assert_eq!(request_counts(&after), expected);
    assert_eq!(error_counts(&after), error_counts(&before));
    assert_latency_sane("Stats", &kind(&after, "Stats").latency);
    assert!(after.position > before.position);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_with_their_code() {
    // A role refusal happens before anything runs, a wrong token before the connection
    // may send anything: both are still answered requests with an error, under their kind
    // and their code.
    let server = TestServer::start().await;
    let admin = server.client().await;
    let (token, _) = admin
        .create_token("reader", transdb_proto::Role::Read)
        .await
        .unwrap();
    let anonymous = || transdb_client::ClientConfig::trusting(vec![server.certificate()]);
    let reader = Client::connect(&server.addr(), anonymous().with_token(token))
        .await
        .unwrap();
    assert_eq!(
        code_of(reader.put("k", b"v").await),
        ErrorCode::PERMISSION_DENIED
    );
    assert_eq!(reader.get("k").await.unwrap(), None);
    let wrong = Client::connect(&server.addr(), anonymous().with_token("tdb_nosuchid_wrong")).await;
    assert_eq!(code_of(wrong.map(|_| ())), ErrorCode::UNAUTHENTICATED);

    let stats = admin.stats().await.unwrap();
    assert_eq!(
        request_counts(&stats),
        vec![
            ("Get", 1, 0),
            ("Put", 1, 1),
            ("Authenticate", 3, 1),
            ("CreateToken", 1, 0),
        ],
        "the admin's, the reader's and the refused connection's Authenticate"
    );
    assert_eq!(
        error_counts(&stats),
        vec![
            (ErrorCode::UNAUTHENTICATED.0, "UNAUTHENTICATED", 1),
            (ErrorCode::PERMISSION_DENIED.0, "PERMISSION_DENIED", 1),
        ]
    );
    assert_eq!(stats.auth_failures, 1);
}

// ---------------------------------------------------------------------------------------
// Procedures
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedures_count_calls_errors_and_fuel() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // Balances stay at three digits throughout, so every successful transfer does the
    // same work.
    bank(&client, 500).await;
    transfer(&client, 1).await.unwrap();
    transfer(&client, 1).await.unwrap();
    assert_eq!(code_of(transfer(&client, 10_000).await), ErrorCode::ABORTED);
    assert_eq!(
        code_of(client.call_json("bank", "nosuch", "null").await),
        ErrorCode::PROCEDURE_NOT_FOUND
    );

    let stats = client.stats().await.unwrap();
    let rows: Vec<_> = stats
        .procedures
        .iter()
        .map(|row| {
            (
                row.module.as_str(),
                row.procedure.as_str(),
                row.calls,
                row.errors,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![("bank", "open", 2, 0), ("bank", "transfer", 3, 1)],
        "by module, then procedure; a procedure that does not exist gets no row (its name is \
         the caller's), only its kind and error code are counted"
    );
    assert!(procedure(&stats, "bank", "open").fuel_used > 0);
    let transfers = procedure(&stats, "bank", "transfer");
    assert!(transfers.fuel_used > 0);
    for row in &stats.procedures {
        assert_latency_sane(&format!("{}.{}", row.module, row.procedure), &row.latency);
    }
    assert_eq!(
        kind(&stats, "Call").count,
        6,
        "2 opens, 3 transfers, 1 nosuch"
    );

    // Fuel adds up call by call: one more transfer, then ten identical ones.
    transfer(&client, 1).await.unwrap();
    let one = client.stats().await.unwrap();
    let fuel_one = procedure(&one, "bank", "transfer").fuel_used - transfers.fuel_used;
    assert!(fuel_one > 0, "a transfer uses fuel");
    for _ in 0..10 {
        transfer(&client, 1).await.unwrap();
    }
    let ten = client.stats().await.unwrap();
    let row = procedure(&ten, "bank", "transfer");
    assert_eq!((row.calls, row.errors), (14, 1));
    let fuel_ten = row.fuel_used - procedure(&one, "bank", "transfer").fuel_used;
    assert!(
        fuel_ten >= 5 * fuel_one && fuel_ten <= 20 * fuel_one,
        "ten identical transfers used {fuel_ten} fuel, one used {fuel_one}"
    );
    assert_eq!(
        procedure(&ten, "bank", "open"),
        procedure(&one, "bank", "open")
    );
    assert!(
        ten.procedures.iter().all(|row| row.procedure != "nosuch"),
        "still no row for a procedure that does not exist"
    );
}

// ---------------------------------------------------------------------------------------
// Shards and memory
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_and_memory_follow_the_keys_written() {
    const LIMIT: usize = 8 << 20;
    let server = TestServer::start_with(|config| config.max_memory = Some(LIMIT)).await;
    let client = server.client().await;
    let empty = client.stats().await.unwrap();
    assert_eq!(shard_totals(&empty), (0, 0), "a fresh server holds no keys");
    assert_eq!(empty.memory.store_bytes, 0);
    assert_eq!(empty.memory.store_limit, Some(LIMIT as u64));
    assert_eq!(empty.shards.len(), 2);

    // 40 keys, `key-00`.. (6 bytes), with values of 0, 7, 14, ... bytes.
    const N: usize = 40;
    let key = |i: usize| format!("key-{i:02}");
    let value = |i: usize| vec![b'v'; 7 * i];
    let mut bytes: u64 = 0;
    for i in 0..N {
        client.put(&key(i), value(i)).await.unwrap();
        bytes += (key(i).len() + value(i).len()) as u64;
    }
    let full = client.stats().await.unwrap();
    assert_eq!(shard_totals(&full), (N as u64, bytes));
    assert!(
        full.shards.iter().all(|shard| shard.keys > 0),
        "40 keys over 2 shards land in both: {:?}",
        full.shards
    );
    assert_eq!(
        full.memory.store_bytes,
        bytes + ENTRY_OVERHEAD * N as u64,
        "keys and values plus the overhead per key"
    );
    assert_eq!(full.memory.store_limit, Some(LIMIT as u64));
    if cfg!(target_os = "linux") {
        let resident = full.memory.process_resident.expect("VmRSS on Linux");
        assert!(resident > 0);
    }

    // Deletes and overwrites move both.
    for i in 0..10 {
        assert!(client.delete(&key(i)).await.unwrap());
        bytes -= (key(i).len() + value(i).len()) as u64;
    }
    client.put(&key(20), vec![b'w'; 1000]).await.unwrap();
    bytes = bytes - value(20).len() as u64 + 1000;
    let after = client.stats().await.unwrap();
    let keys = (N - 10) as u64;
    assert_eq!(shard_totals(&after), (keys, bytes));
    assert_eq!(after.memory.store_bytes, bytes + ENTRY_OVERHEAD * keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_memory_limit_there_is_no_store_limit() {
    let server = TestServer::start_with(|config| config.max_memory = None).await;
    let client = server.client().await;
    client.put("k", b"value").await.unwrap();
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.memory.store_limit, None);
    assert_eq!(stats.memory.store_bytes, 1 + 5 + ENTRY_OVERHEAD);
}

// ---------------------------------------------------------------------------------------
// The log and uptime
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_reports_how_far_the_order_is_durable() {
    let server = TestServer::start().await; // --durability sync, with a data directory
    let client = server.client().await;
    for i in 0..5 {
        client.put(&format!("k{i}"), b"v").await.unwrap();
    }
    let mut tx = client.begin().await.unwrap();
    tx.put("last", b"write").await.unwrap();
    let committed = tx.commit().await.unwrap();

    let stats = client.stats().await.unwrap();
    let log = &stats.log;
    let durable = log.durable_position.expect("a log with --durability sync");
    assert!(
        durable > committed,
        "the acknowledged commit at {committed} is durable: {log:?}"
    );
    assert!(durable <= log.next_position, "{log:?}");
    assert_eq!(log.durability_lag, log.next_position - durable, "{log:?}");
    assert!(
        log.next_position > stats.position,
        "the Stats itself took a position: {log:?}, position {}",
        stats.position
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_log_there_is_no_durable_position() {
    let server = TestServer::start_with(|config| config.durability = Durability::None).await;
    let client = server.client().await;
    for i in 0..5 {
        client.put(&format!("k{i}"), b"v").await.unwrap();
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.log.durable_position, None);
    assert_eq!(stats.log.durability_lag, 0);
    assert!(
        stats.log.next_position > stats.position && stats.position >= 5,
        "{:?} at position {}",
        stats.log,
        stats.position
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uptime_grows() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let first = client.stats().await.unwrap().uptime_ms;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = client.stats().await.unwrap().uptime_ms;
        assert!(now >= first, "uptime went back from {first} to {now}");
        if now > first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "uptime stuck at {first} ms for {PATIENCE:?}"
        );
        // Polling interval, not synchronisation: the deadline bounds the wait.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------------------

/// `transdb --server ADDR <args>` in `dir`; must succeed; returns stdout.
#[track_caller]
fn run(dir: &Path, server: &ChildServer, args: &[&str]) -> String {
    let addr = server.addr.to_string();
    let mut full = vec!["--server", addr.as_str()];
    full.extend_from_slice(args);
    let output = cli(dir, &full, b"");
    assert!(
        output.status.success(),
        "transdb {args:?}: {}",
        output.stderr
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The whitespace-separated words of the line of `text` that starts with `prefix`.
#[track_caller]
fn words_of<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
        .split_whitespace()
        .collect()
}

#[test]
fn the_cli_prints_the_statistics_as_text_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    run(dir.path(), &server, &["put", "a", "1"]);
    run(dir.path(), &server, &["put", "b", "22"]);
    run(dir.path(), &server, &["put", "c", "333"]);
    assert_eq!(run(dir.path(), &server, &["get", "b"]), "22");
    let wasm = dir.path().join("bank.wasm");
    std::fs::write(&wasm, procedure_module("bank")).unwrap();
    run(
        dir.path(),
        &server,
        &["deploy", "bank", wasm.to_str().unwrap()],
    );
    let open = r#"{"account":"alice","balance":5}"#;
    run(
        dir.path(),
        &server,
        &["call", "bank", "open", "--json", open],
    );
    // Opening it again aborts.
    let addr = server.addr.to_string();
    let again = cli(
        dir.path(),
        &["--server", &addr, "call", "bank", "open", "--json", open],
        b"",
    );
    assert!(!again.status.success(), "a second open must abort");
    assert!(again.stderr.contains("ABORTED"), "{}", again.stderr);

    let text = run(dir.path(), &server, &["stats"]);
    let uptime = words_of(&text, "uptime ");
    assert_eq!(uptime.len(), 2, "{text}");
    assert!(uptime[1].ends_with('s'), "{text}");
    let position: u64 = words_of(&text, "position ")[1].parse().unwrap();
    let log = words_of(&text, "log ");
    assert_eq!(log[..3], ["log", "durable", "through"], "{text}");
    assert!(text.contains(" positions)\n"), "{text}");
    let memory = words_of(&text, "memory: store ");
    assert!(
        memory.contains(&"(--max-memory),") && memory.contains(&"resident"),
        "a default limit and the resident size: {text}"
    );
    let mut keys = 0;
    for shard in 0..2 {
        let words = words_of(&text, &format!("shard {shard}: "));
        assert_eq!(words[3], "keys,", "{text}");
        keys += words[2].parse::<u64>().unwrap();
    }
    assert_eq!(keys, 4, "a, b, c and alice's account: {text}");

    // `requests:`, then one line per kind seen: name, answered, errors, latency.
    let requests: Vec<&str> = text
        .lines()
        .skip_while(|line| *line != "requests:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .collect();
    let rows: Vec<(&str, &str, &str)> = requests
        .iter()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words[2], "answered,", "{line}");
            assert_eq!(words[5], "p50", "{line}");
            (words[0], words[1], words[3])
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("Get", "1", "0"),
            ("Put", "3", "0"),
            ("Deploy", "1", "0"),
            ("Call", "2", "1"),
            ("Authenticate", "8", "0"),
        ],
        "one Authenticate per CLI run, this one's included: {text}"
    );
    let aborted = words_of(&text, "  ABORTED ");
    assert_eq!(aborted, ["ABORTED", "64", "1"], "{text}");
    assert!(text.contains("\nerrors by code:\n"), "{text}");
    assert!(text.contains("\nprocedures:\n"), "{text}");
    let open_row = words_of(&text, "  bank.open: ");
    assert_eq!(open_row[1..5], ["2", "calls,", "1", "errors,"], "{text}");
    assert_eq!(open_row[6], "fuel,", "{text}");
    let fuel: u64 = open_row[5].parse().unwrap();
    assert!(fuel > 0, "{text}");

    let json = run(dir.path(), &server, &["stats", "--json"]);
    let stats: ServerStats = serde_json::from_str(&json).unwrap_or_else(|error| {
        panic!("`transdb stats --json` is not a ServerStats ({error}):\n{json}")
    });
    assert!(stats.position > position, "a later transaction");
    assert_eq!(
        request_counts(&stats),
        vec![
            ("Get", 1, 0),
            ("Put", 3, 0),
            ("Deploy", 1, 0),
            ("Call", 2, 1),
            ("Stats", 1, 0),
            ("Authenticate", 9, 0),
        ],
        "the text Stats is counted now"
    );
    assert_eq!(
        error_counts(&stats),
        vec![(ErrorCode::ABORTED.0, "ABORTED", 1)]
    );
    let open_stats = procedure(&stats, "bank", "open");
    assert_eq!(
        (open_stats.calls, open_stats.errors, open_stats.fuel_used),
        (2, 1, fuel),
        "the same calls as the text showed"
    );
    assert_eq!(shard_totals(&stats).0, 4);
    assert_eq!(stats.modules, 1);
    let durable = stats.log.durable_position.expect("a log by default");
    assert_eq!(stats.log.durability_lag, stats.log.next_position - durable);
    assert!(stats.memory.store_limit.is_some(), "a default limit");
    assert!(stats.connections >= 1, "the CLI's own connection");
}
