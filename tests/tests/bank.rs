//! Jepsen's bank test, end to end over real QUIC against a four-shard server.
//!
//! Eight accounts start with 100 units each. Concurrent clients move random amounts between
//! them — half through the `bank.transfer` procedure, half through interactive transactions
//! that read both balances, check the funds and write both — while other clients read every
//! balance in one transaction (an interactive read-only transaction, or `bank.total`).
//!
//! The invariant: every read sums to the initial total and shows no negative balance (a
//! snapshot never sees half a transfer), and at the end each balance is its initial value
//! plus exactly the acknowledged transfers into it minus those out of it (an acknowledged
//! transfer is never lost, a refused or conflicting one never applied).
//!
//! The last tests show the read check has teeth: reads outside one transaction do see half a
//! transfer, a transaction's snapshot does not, and a transfer computed from a stale snapshot
//! is refused at commit with `CONFLICT`.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::Barrier;
use transdb_client::{Client, Error, Transaction};
use transdb_procedures_bank::{Account, Accounts, Open, Transfer, account_key};
use transdb_proto::ErrorCode;
use transdb_proto::shard::shard_for_key;
use transdb_tests::{TestServer, Xorshift, procedure_module};

const SHARDS: usize = 4;
/// Two on each of the four shards (checked below), so most transfers span two shards.
const ACCOUNTS: [&str; 8] = ["ada", "bob", "cy", "dee", "eve", "ivy", "kim", "max"];
const INITIAL: i64 = 100;
const TOTAL: i64 = INITIAL * ACCOUNTS.len() as i64;
const TRANSFER_TASKS: usize = 6;
/// Per task, alternating procedure and interactive.
const TRANSFERS_PER_TASK: usize = 100;
const READER_TASKS: usize = 3;
/// Per task, alternating an interactive snapshot and `bank.total`.
const READS_PER_TASK: usize = 60;
const MAX_AMOUNT: u64 = 30;
/// Attempts of one transfer before a retryable error fails the test.
const MAX_ATTEMPTS: usize = 50;
/// The two accounts of the small tests, on different shards (checked below).
const A: &str = "ada";
const B: &str = "bob";

/// How an attempted transfer ended (any other ending fails the test).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Applied,
    InsufficientFunds,
}

/// What one transfer task saw.
#[derive(Default)]
struct TransferStats {
    /// Expected change of each balance: acknowledged in minus acknowledged out.
    net: [i64; ACCOUNTS.len()],
    procedure_applied: usize,
    interactive_applied: usize,
    insufficient_funds: usize,
    conflicts: usize,
    /// Retryable errors other than `CONFLICT` (`OVERLOADED`, ...).
    other_retries: usize,
}

/// What one reader task saw.
#[derive(Default)]
struct ReadStats {
    snapshot_reads: usize,
    total_reads: usize,
    /// The distinct balance vectors seen, to show reads interleaved with transfers.
    states: BTreeSet<[i64; ACCOUNTS.len()]>,
}

async fn bank_server(accounts: &[&str]) -> (TestServer, Client) {
    let server = TestServer::start_with(|config| config.shards = SHARDS).await;
    let client = server.client().await;
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    for account in accounts {
        let open = Open {
            account: (*account).into(),
            balance: INITIAL,
        };
        let () = client.call("bank", "open", &open).await.unwrap();
    }
    (server, client)
}

async fn balance(client: &Client, account: &str) -> i64 {
    let account = Account {
        account: account.into(),
    };
    client.call("bank", "balance", &account).await.unwrap()
}

fn assert_on_different_shards(a: &str, b: &str) {
    assert_ne!(
        shard_for_key(&account_key(a), SHARDS),
        shard_for_key(&account_key(b), SHARDS),
        "{a} and {b} share a shard"
    );
}

fn all_accounts() -> Accounts {
    Accounts {
        accounts: ACCOUNTS.iter().map(|account| (*account).into()).collect(),
    }
}

/// An account's balance as `tx` sees it; a missing or malformed balance fails the test.
async fn balance_in(tx: &mut Transaction, account: &str) -> Result<i64, Error> {
    let key = account_key(account);
    let value = tx
        .get(&key)
        .await?
        .unwrap_or_else(|| panic!("{key} vanished (snapshot {})", tx.snapshot()));
    let text = String::from_utf8(value).expect("a balance is UTF-8");
    Ok(text
        .parse()
        .unwrap_or_else(|_| panic!("{key} holds {text:?}, not a decimal balance")))
}

/// Every balance, read in one interactive transaction that then commits (read-only).
async fn read_all(client: &Client) -> Result<(u64, [i64; ACCOUNTS.len()]), Error> {
    let mut tx = client.begin().await?;
    let snapshot = tx.snapshot();
    let mut balances = [0; ACCOUNTS.len()];
    for (balance, account) in balances.iter_mut().zip(ACCOUNTS) {
        *balance = balance_in(&mut tx, account).await?;
    }
    tx.commit().await?;
    Ok((snapshot, balances))
}

async fn procedure_transfer(client: &Client, transfer: &Transfer) -> Result<Outcome, Error> {
    match client.call::<_, ()>("bank", "transfer", transfer).await {
        Ok(()) => Ok(Outcome::Applied),
        Err(Error::Rejected(error))
            if error.code == ErrorCode::ABORTED && error.message.contains("insufficient funds") =>
        {
            Ok(Outcome::InsufficientFunds)
        }
        Err(error) => Err(error),
    }
}

/// The same transfer as an interactive transaction: read both, check, write both, commit.
async fn interactive_transfer(client: &Client, transfer: &Transfer) -> Result<Outcome, Error> {
    let mut tx = client.begin().await?;
    let from = balance_in(&mut tx, &transfer.from).await?;
    let to = balance_in(&mut tx, &transfer.to).await?;
    if from < transfer.amount {
        tx.rollback().await?;
        return Ok(Outcome::InsufficientFunds);
    }
    tx.put(
        &account_key(&transfer.from),
        (from - transfer.amount).to_string(),
    )
    .await?;
    tx.put(
        &account_key(&transfer.to),
        (to + transfer.amount).to_string(),
    )
    .await?;
    tx.commit().await?;
    Ok(Outcome::Applied)
}

async fn transfer_task(client: Client, task: usize, start: Arc<Barrier>) -> TransferStats {
    let mut random = Xorshift::new(task as u64 + 1);
    let mut stats = TransferStats::default();
    start.wait().await;
    for i in 0..TRANSFERS_PER_TASK {
        let from = random.below(ACCOUNTS.len() as u64) as usize;
        let to = (from + 1 + random.below(ACCOUNTS.len() as u64 - 1) as usize) % ACCOUNTS.len();
        let amount = 1 + random.below(MAX_AMOUNT) as i64;
        let transfer = Transfer {
            from: ACCOUNTS[from].into(),
            to: ACCOUNTS[to].into(),
            amount,
        };
        let interactive = i % 2 == 1;
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            let result = if interactive {
                interactive_transfer(&client, &transfer).await
            } else {
                procedure_transfer(&client, &transfer).await
            };
            match result {
                Ok(outcome) => break outcome,
                Err(error) if error.is_retryable() && attempts < MAX_ATTEMPTS => {
                    if error.code() == Some(ErrorCode::CONFLICT) {
                        stats.conflicts += 1;
                    } else {
                        stats.other_retries += 1;
                    }
                }
                Err(error) => panic!(
                    "transfer {transfer:?} (interactive: {interactive}, attempt {attempts}) \
                     failed: {error}"
                ),
            }
        };
        match outcome {
            Outcome::Applied => {
                stats.net[from] -= amount;
                stats.net[to] += amount;
                if interactive {
                    stats.interactive_applied += 1;
                } else {
                    stats.procedure_applied += 1;
                }
            }
            Outcome::InsufficientFunds => stats.insufficient_funds += 1,
        }
    }
    stats
}

async fn reader_task(client: Client, start: Arc<Barrier>) -> ReadStats {
    let accounts = all_accounts();
    let mut stats = ReadStats::default();
    start.wait().await;
    for i in 0..READS_PER_TASK {
        if i % 2 == 0 {
            let (snapshot, balances) = read_all(&client)
                .await
                .unwrap_or_else(|error| panic!("a read-only transaction failed: {error}"));
            assert_eq!(
                balances.iter().sum::<i64>(),
                TOTAL,
                "snapshot {snapshot} saw part of a transfer: {balances:?}"
            );
            assert!(
                balances.iter().all(|balance| *balance >= 0),
                "snapshot {snapshot} saw a negative balance: {balances:?}"
            );
            stats.states.insert(balances);
            stats.snapshot_reads += 1;
        } else {
            let total: i64 = client.call("bank", "total", &accounts).await.unwrap();
            assert_eq!(total, TOTAL, "bank.total saw part of a transfer");
            stats.total_reads += 1;
        }
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_keep_every_snapshot_balanced_and_every_acknowledged_transfer() {
    let shards: BTreeSet<usize> = ACCOUNTS
        .iter()
        .map(|account| shard_for_key(&account_key(account), SHARDS))
        .collect();
    assert_eq!(shards.len(), SHARDS, "the accounts span every shard");

    let (server, client) = bank_server(&ACCOUNTS).await;
    let start = Arc::new(Barrier::new(TRANSFER_TASKS + READER_TASKS));
    let mut transfers = Vec::new();
    for task in 0..TRANSFER_TASKS {
        let client = server.client().await;
        transfers.push(tokio::spawn(transfer_task(client, task, start.clone())));
    }
    let mut readers = Vec::new();
    for _ in 0..READER_TASKS {
        let client = server.client().await;
        readers.push(tokio::spawn(reader_task(client, start.clone())));
    }

    let mut expected = [INITIAL; ACCOUNTS.len()];
    let (mut procedure_applied, mut interactive_applied) = (0, 0);
    let (mut insufficient_funds, mut conflicts, mut other_retries) = (0, 0, 0);
    for task in transfers {
        let stats = task.await.expect("a transfer task failed");
        for (balance, net) in expected.iter_mut().zip(stats.net) {
            *balance += net;
        }
        procedure_applied += stats.procedure_applied;
        interactive_applied += stats.interactive_applied;
        insufficient_funds += stats.insufficient_funds;
        conflicts += stats.conflicts;
        other_retries += stats.other_retries;
    }
    let (mut snapshot_reads, mut total_reads) = (0, 0);
    let mut states = BTreeSet::new();
    for task in readers {
        let stats = task.await.expect("a reader task failed");
        snapshot_reads += stats.snapshot_reads;
        total_reads += stats.total_reads;
        states.extend(stats.states);
    }
    println!(
        "bank: {procedure_applied} procedure and {interactive_applied} interactive transfers \
         acknowledged, {insufficient_funds} refused for insufficient funds, {conflicts} \
         conflicts retried ({other_retries} other retryable errors); {snapshot_reads} \
         snapshot reads ({} distinct states) and {total_reads} bank.total reads",
        states.len()
    );

    let (snapshot, balances) = read_all(&client).await.unwrap();
    assert_eq!(
        balances, expected,
        "final balances (snapshot {snapshot}) differ from the acknowledged transfers"
    );
    assert_eq!(expected.iter().sum::<i64>(), TOTAL);
    for (account, expected) in ACCOUNTS.iter().zip(expected) {
        assert_eq!(
            balance(&client, account).await,
            expected,
            "bank.balance of {account}"
        );
    }
    let total: i64 = client.call("bank", "total", &all_accounts()).await.unwrap();
    assert_eq!(total, TOTAL);

    assert!(procedure_applied >= 100, "only {procedure_applied}");
    assert!(interactive_applied >= 100, "only {interactive_applied}");
    assert!(snapshot_reads >= 50, "only {snapshot_reads}");
    assert!(total_reads >= 50, "only {total_reads}");
    assert!(
        states.len() > 1,
        "the readers never saw a transfer: they did not overlap the writers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_hides_a_transfer_committed_after_it_began() {
    let (server, client) = bank_server(&[A, B]).await;
    let other = server.client().await;
    let transfer = Transfer {
        from: A.into(),
        to: B.into(),
        amount: 30,
    };

    assert_on_different_shards(A, B);

    // Two reads outside a transaction, with a transfer between them, see it half done: the
    // sum check catches a read that is not one snapshot.
    let decimal = |value: Option<Vec<u8>>| -> i64 {
        String::from_utf8(value.unwrap()).unwrap().parse().unwrap()
    };
    let a_before = decimal(client.get(&account_key(A)).await.unwrap());
    let () = other.call("bank", "transfer", &transfer).await.unwrap();
    let b_after = decimal(client.get(&account_key(B)).await.unwrap());
    assert_eq!((a_before, b_after), (100, 130));
    assert_ne!(a_before + b_after, 2 * INITIAL);

    // In one transaction, the transfer committed between the two reads stays invisible.
    let mut tx = client.begin().await.unwrap();
    let a = balance_in(&mut tx, A).await.unwrap();
    let () = other.call("bank", "transfer", &transfer).await.unwrap();
    let b = balance_in(&mut tx, B).await.unwrap();
    assert_eq!(
        (a, b),
        (70, 130),
        "the snapshot shows the state at Begin, not B's committed 160"
    );
    assert_eq!(a + b, 2 * INITIAL);
    tx.commit().await.expect("a read-only transaction commits");

    let (a, b) = (balance(&other, A).await, balance(&other, B).await);
    assert_eq!((a, b), (40, 160), "both transfers committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_from_a_stale_snapshot_conflicts_at_commit_and_changes_nothing() {
    assert_on_different_shards(A, B);
    let (server, client) = bank_server(&[A, B]).await;
    let other = server.client().await;

    // Read a and b, then another client moves 30 from a to b and commits.
    let mut tx = client.begin().await.unwrap();
    let a = balance_in(&mut tx, A).await.unwrap();
    let b = balance_in(&mut tx, B).await.unwrap();
    let concurrent = Transfer {
        from: A.into(),
        to: B.into(),
        amount: 30,
    };
    let () = other.call("bank", "transfer", &concurrent).await.unwrap();

    // Moving 10 based on the stale balances would overwrite that transfer (lost update).
    tx.put(&account_key(A), (a - 10).to_string()).await.unwrap();
    tx.put(&account_key(B), (b + 10).to_string()).await.unwrap();
    let error = tx.commit().await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::CONFLICT), "{error}");
    assert!(error.is_retryable());
    assert_eq!(
        (balance(&other, A).await, balance(&other, B).await),
        (70, 130),
        "the conflicting commit wrote nothing; the concurrent transfer stands"
    );

    // Run again from Begin, it reads the new balances and commits.
    let mut tx = client.begin().await.unwrap();
    let a = balance_in(&mut tx, A).await.unwrap();
    let b = balance_in(&mut tx, B).await.unwrap();
    tx.put(&account_key(A), (a - 10).to_string()).await.unwrap();
    tx.put(&account_key(B), (b + 10).to_string()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (balance(&other, A).await, balance(&other, B).await),
        (60, 140)
    );
}
