//! Serializability end to end, checked with `adya` (an Elle-style checker) on list-append
//! histories: concurrent clients append unique integers to lists and read whole lists back,
//! through interactive transactions and through the `kv.list_txn` procedure, on keys spread
//! over every shard. Each transaction is recorded when invoked and when answered, in real-time
//! order, and the history must be strict serializable.
//!
//! The checker's own wiring is tested too: it must reject hand-made anomalies and a real
//! history with one read corrupted, so that a passing check means something.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use adya::history::{Id, Interner, Mop, Op, OpType, ReadValue, Scalar};
use adya::{History, Opts, Report, Valid, Workload, check};
use transdb_client::{Client, Error, Transaction};
use transdb_procedures_kv::{ListOp, ListTxn, decode_list, encode_list};
use transdb_proto::ErrorCode;
use transdb_proto::shard::shard_for_key;
use transdb_tests::{TestServer, procedure_module};

/// What a list-append transaction answered: for each op, the list read, or `None` for an
/// append (the shape `kv.list_txn` returns).
type Results = Vec<Option<Vec<i64>>>;

/// The process of the final read (workers are `0..processes`, and after an uncertain
/// outcome continue as a new process, `+ processes`).
const FINAL_PROCESS: i64 = 1_000_000;

/// The history as it is recorded: adya's operations, in real-time order.
struct Recorder {
    start: Instant,
    inner: Mutex<(Vec<Op>, Interner)>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            inner: Mutex::new((Vec::new(), Interner::default())),
        }
    }

    /// Records an invocation: the ops, reads not known yet.
    fn invoke(&self, process: i64, ops: &[ListOp]) {
        self.record(OpType::Invoke, process, ops, None);
    }

    /// Records a completion (`Ok` with `results`; `Fail` and `Info` without).
    fn record(&self, kind: OpType, process: i64, ops: &[ListOp], results: Option<&Results>) {
        if let Some(results) = results {
            assert_eq!(results.len(), ops.len(), "one result per op");
        }
        let mut inner = self.inner.lock().unwrap();
        let (history, interner) = &mut *inner;
        let value = ops
            .iter()
            .enumerate()
            .map(|(i, op)| mop(interner, op, results.map(|results| &results[i])))
            .collect();
        let op = Op {
            index: history.len() as u64,
            kind,
            process: Some(process),
            value,
            time: Some(self.start.elapsed().as_nanos() as i64),
        };
        history.push(op);
    }

    fn into_history(self) -> History {
        let (ops, interner) = self.inner.into_inner().unwrap();
        History::from_ops(ops, interner)
    }
}

fn key_id(interner: &mut Interner, key: &str) -> Id {
    interner.intern(Scalar::Str(key.into()))
}

fn element_id(interner: &mut Interner, element: i64) -> Id {
    interner.intern(Scalar::Int(element))
}

/// `op` as the checker sees it, with its `result` if known.
fn mop(interner: &mut Interner, op: &ListOp, result: Option<&Option<Vec<i64>>>) -> Mop {
    match op {
        ListOp::Append { key, value } => {
            assert!(
                result.is_none_or(Option::is_none),
                "an append reads nothing"
            );
            Mop::Append {
                key: key_id(interner, key),
                value: element_id(interner, *value),
            }
        }
        ListOp::Read { key } => Mop::Read {
            key: key_id(interner, key),
            value: match result {
                None => ReadValue::Nil,
                Some(list) => ReadValue::List(
                    list.as_ref()
                        .expect("a read's result is a list")
                        .iter()
                        .map(|&element| element_id(interner, element))
                        .collect(),
                ),
            },
        },
    }
}

/// The check every history must pass: strict serializability, with the well-formedness
/// problems that would otherwise make the verdict unknown (and so, silently, no verdict)
/// counted as failures.
fn check_strict_serializable(history: &History) -> Report {
    assert!(
        adya::model::canonical("strict-serializable").is_some(),
        "adya ignores unknown model names"
    );
    check(
        history,
        Workload::ListAppend,
        &Opts {
            models: vec!["strict-serializable".into()],
            anomalies: vec![
                "duplicate-appends".into(),
                "unexpected-txn-micro-op-types".into(),
            ],
            ..Opts::default()
        },
    )
}

/// The report's anomalies with adya's explanations.
fn describe(report: &Report) -> String {
    let mut text = format!(
        "valid: {:?}; anomalies: {:?}; not: {:?}\n",
        report.valid, report.anomaly_types, report.not
    );
    for (kind, anomalies) in &report.anomalies {
        for anomaly in anomalies.iter().take(3) {
            text.push_str(&format!(
                "--- {kind} (ops {:?})\n{}\n",
                anomaly.ops, anomaly.explanation
            ));
        }
    }
    text
}

/// A small deterministic generator (splitmix64), so a run's transactions are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// `per_shard` keys owned by each of `shards` shards.
fn keys_on_every_shard(shards: usize, per_shard: usize) -> Vec<String> {
    let mut owned = vec![0; shards];
    let mut keys = Vec::new();
    for n in 0.. {
        if keys.len() == shards * per_shard {
            break;
        }
        let key = format!("l{n}");
        let shard = shard_for_key(&key, shards);
        if owned[shard] < per_shard {
            owned[shard] += 1;
            keys.push(key);
        }
    }
    keys
}

/// How a transaction ended.
enum Outcome {
    /// Committed, with what it read.
    Ok(Results),
    /// Definitely not applied.
    Fail(Error),
    /// May or may not have been applied.
    Info(Error),
}

fn list_of(key: &str, value: Option<Vec<u8>>) -> Vec<i64> {
    match value {
        None => Vec::new(),
        Some(bytes) => decode_list(&bytes).unwrap_or_else(|| {
            panic!(
                "{key} holds {:?}, not a list",
                String::from_utf8_lossy(&bytes)
            )
        }),
    }
}

async fn interactive_ops(tx: &mut Transaction, ops: &[ListOp]) -> Result<Results, Error> {
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            ListOp::Append { key, value } => {
                let mut list = list_of(key, tx.get(key).await?);
                list.push(*value);
                tx.put(key, encode_list(&list)).await?;
                results.push(None);
            }
            ListOp::Read { key } => results.push(Some(list_of(key, tx.get(key).await?))),
        }
    }
    Ok(results)
}

/// Runs `ops` as an interactive transaction: an append reads the list and writes it back
/// longer.
async fn interactive(client: &Client, ops: &[ListOp]) -> Outcome {
    let mut tx = match client.begin().await {
        Ok(tx) => tx,
        Err(error) => return Outcome::Fail(error),
    };
    let results = match interactive_ops(&mut tx, ops).await {
        Ok(results) => results,
        // No commit was sent: dropping the transaction rolls it back.
        Err(error) => return Outcome::Fail(error),
    };
    match tx.commit().await {
        Ok(_) => Outcome::Ok(results),
        Err(error @ Error::Rejected(_)) => Outcome::Fail(error),
        Err(error) => Outcome::Info(error),
    }
}

/// Runs `ops` as one call of `kv.list_txn`.
async fn procedure(client: &Client, ops: &[ListOp]) -> Outcome {
    let args = ListTxn { ops: ops.to_vec() };
    match client.call::<_, Results>("kv", "list_txn", &args).await {
        Ok(results) => Outcome::Ok(results),
        Err(error @ Error::Rejected(_)) => Outcome::Fail(error),
        Err(error) => Outcome::Info(error),
    }
}

/// The shape of a run.
struct Plan {
    shards: usize,
    keys_per_shard: usize,
    processes: usize,
    transactions_per_process: usize,
}

/// What happened in a run, besides the history.
#[derive(Debug, Default)]
struct Tally {
    committed_interactive: usize,
    committed_procedure: usize,
    conflicts: usize,
    other_failures: Vec<String>,
    uncertain: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.committed_interactive += other.committed_interactive;
        self.committed_procedure += other.committed_procedure;
        self.conflicts += other.conflicts;
        self.other_failures.extend(other.other_failures);
        self.uncertain.extend(other.uncertain);
    }
}

/// One process: a transaction in flight at a time, alternately interactive and a procedure
/// call, 1 to 4 random appends and reads each.
async fn run_process(
    client: Client,
    recorder: Arc<Recorder>,
    counter: Arc<AtomicI64>,
    keys: Arc<Vec<String>>,
    plan_processes: usize,
    worker: usize,
    transactions: usize,
) -> Tally {
    let mut rng = Rng(0x1157_a99e_0d00_0000 + worker as u64);
    let mut process = worker as i64;
    let mut tally = Tally::default();
    for t in 0..transactions {
        let ops: Vec<ListOp> = (0..1 + rng.below(4))
            .map(|_| {
                let key = keys[rng.below(keys.len())].clone();
                if rng.below(2) == 0 {
                    let value = counter.fetch_add(1, Ordering::Relaxed);
                    ListOp::Append { key, value }
                } else {
                    ListOp::Read { key }
                }
            })
            .collect();
        let is_interactive = (worker + t).is_multiple_of(2);
        recorder.invoke(process, &ops);
        let outcome = if is_interactive {
            interactive(&client, &ops).await
        } else {
            procedure(&client, &ops).await
        };
        match outcome {
            Outcome::Ok(results) => {
                recorder.record(OpType::Ok, process, &ops, Some(&results));
                if is_interactive {
                    tally.committed_interactive += 1;
                } else {
                    tally.committed_procedure += 1;
                }
            }
            Outcome::Fail(error) => {
                recorder.record(OpType::Fail, process, &ops, None);
                if error.code() == Some(ErrorCode::CONFLICT) {
                    tally.conflicts += 1;
                } else {
                    tally.other_failures.push(error.to_string());
                }
            }
            Outcome::Info(error) => {
                recorder.record(OpType::Info, process, &ops, None);
                tally.uncertain.push(error.to_string());
                // As in Jepsen, a process with an operation in doubt is never reused.
                process += plan_processes as i64;
            }
        }
    }
    tally
}

/// Runs `plan` against a fresh server, then reads every key in one transaction (recorded
/// too). Returns the history, what happened, the final lists, and the appends that committed.
async fn run(plan: &Plan) -> (History, Tally, HashMap<String, Vec<i64>>) {
    let server = TestServer::start_with(|config| config.shards = plan.shards).await;
    let client = server.client().await;
    client.deploy("kv", &procedure_module("kv")).await.unwrap();
    let keys = Arc::new(keys_on_every_shard(plan.shards, plan.keys_per_shard));
    let recorder = Arc::new(Recorder::new());
    let counter = Arc::new(AtomicI64::new(1));
    let mut tasks = Vec::new();
    for worker in 0..plan.processes {
        let client = server.client().await;
        tasks.push(tokio::spawn(run_process(
            client,
            recorder.clone(),
            counter.clone(),
            keys.clone(),
            plan.processes,
            worker,
            plan.transactions_per_process,
        )));
    }
    let mut tally = Tally::default();
    for task in tasks {
        tally.add(task.await.unwrap());
    }

    let reads: Vec<ListOp> = keys
        .iter()
        .map(|key| ListOp::Read { key: key.clone() })
        .collect();
    recorder.invoke(FINAL_PROCESS, &reads);
    let results = match interactive(&client, &reads).await {
        Outcome::Ok(results) => results,
        Outcome::Fail(error) | Outcome::Info(error) => panic!("the final read failed: {error}"),
    };
    recorder.record(OpType::Ok, FINAL_PROCESS, &reads, Some(&results));
    let finals = keys
        .iter()
        .cloned()
        .zip(results.into_iter().map(Option::unwrap))
        .collect();
    let recorder = Arc::into_inner(recorder).expect("every process has finished");
    (recorder.into_history(), tally, finals)
}

/// The `(key, element)` of every append in a completion of `kind`, as the checker sees them.
fn appends(history: &History, kind: OpType) -> HashSet<(Id, Id)> {
    history
        .ops
        .iter()
        .filter(|op| op.kind == kind)
        .flat_map(|op| &op.value)
        .filter_map(|mop| match mop {
            Mop::Append { key, value } => Some((*key, *value)),
            Mop::Read { .. } | Mop::Write { .. } => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_interactive_and_procedure_transactions_are_strict_serializable() {
    let plan = Plan {
        shards: 4,
        keys_per_shard: 2,
        processes: 8,
        transactions_per_process: 40,
    };
    let (history, tally, finals) = run(&plan).await;
    let report = check_strict_serializable(&history);
    let lengths: Vec<usize> = finals.values().map(Vec::len).collect();
    println!(
        "list-append: {} ops recorded; {tally:?}; final list lengths {lengths:?}",
        history.ops.len()
    );
    assert!(
        report.valid == Valid::True,
        "the history is not strict serializable:\n{}",
        describe(&report)
    );

    // Every committed append is in the final lists (a lost write is no cycle, so the checker
    // alone would not notice); nothing that failed is.
    let mut interner = history.interner.clone();
    let in_final: HashSet<(Id, Id)> = finals
        .iter()
        .flat_map(|(key, list)| {
            let key = key_id(&mut interner, key);
            list.iter()
                .map(|&element| (key, element_id(&mut interner, element)))
                .collect::<Vec<_>>()
        })
        .collect();
    let committed = appends(&history, OpType::Ok);
    let lost: Vec<_> = committed.difference(&in_final).collect();
    assert!(lost.is_empty(), "committed appends missing: {lost:?}");
    let failed = appends(&history, OpType::Fail);
    let resurrected: Vec<_> = failed.intersection(&in_final).collect();
    assert!(
        resurrected.is_empty(),
        "failed appends present: {resurrected:?}"
    );

    // The history has substance: both kinds committed plenty, and interactive transactions
    // raced each other into conflicts (8 processes over 8 keys, several round trips per
    // transaction: typically about 90 of the 160 conflict, and no procedure call fails).
    let attempts = plan.processes * plan.transactions_per_process / 2;
    assert!(
        tally.committed_procedure >= attempts / 2,
        "too few procedure transactions committed: {tally:?}"
    );
    assert!(
        tally.committed_interactive >= attempts / 8,
        "too few interactive transactions committed: {tally:?}"
    );
    assert!(tally.conflicts > 0, "no transaction conflicted: {tally:?}");
    assert!(
        committed.len() >= 100,
        "only {} appends committed",
        committed.len()
    );
}

/// Two concurrent processes; `a` and `b` are `(ops, results)`.
fn concurrent_pair(a: (&[ListOp], Results), b: (&[ListOp], Results)) -> History {
    let recorder = Recorder::new();
    recorder.invoke(0, a.0);
    recorder.invoke(1, b.0);
    recorder.record(OpType::Ok, 0, a.0, Some(&a.1));
    recorder.record(OpType::Ok, 1, b.0, Some(&b.1));
    recorder.into_history()
}

fn append(key: &str, value: i64) -> ListOp {
    ListOp::Append {
        key: key.into(),
        value,
    }
}

fn read(key: &str) -> ListOp {
    ListOp::Read { key: key.into() }
}

#[test]
fn the_check_rejects_write_skew_and_a_g1c_cycle() {
    // Write skew: both read both lists empty, then each appends to a different one.
    let write_skew = concurrent_pair(
        (
            &[read("l1"), read("l2"), append("l1", 1)],
            vec![Some(vec![]), Some(vec![]), None],
        ),
        (
            &[read("l1"), read("l2"), append("l2", 2)],
            vec![Some(vec![]), Some(vec![]), None],
        ),
    );
    let report = check_strict_serializable(&write_skew);
    assert_eq!(report.valid, Valid::False, "{}", describe(&report));
    assert!(
        report.anomaly_types.iter().any(|kind| kind == "G2-item"),
        "{}",
        describe(&report)
    );

    // G1c: each read the other's append (a cycle of write-read dependencies).
    let g1c = concurrent_pair(
        (&[append("l1", 1), read("l2")], vec![None, Some(vec![2])]),
        (&[append("l2", 2), read("l1")], vec![None, Some(vec![1])]),
    );
    let report = check_strict_serializable(&g1c);
    assert_eq!(report.valid, Valid::False, "{}", describe(&report));
    assert!(
        report.anomaly_types.iter().any(|kind| kind == "G1c"),
        "{}",
        describe(&report)
    );

    // And the same pair made serial is accepted.
    let serial = concurrent_pair(
        (&[append("l1", 1), read("l2")], vec![None, Some(vec![])]),
        (&[append("l2", 2), read("l1")], vec![None, Some(vec![1])]),
    );
    let report = check_strict_serializable(&serial);
    assert_eq!(report.valid, Valid::True, "{}", describe(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_check_rejects_a_real_history_with_one_read_corrupted() {
    let plan = Plan {
        shards: 4,
        keys_per_shard: 1,
        processes: 4,
        transactions_per_process: 15,
    };
    let (mut history, _, _) = run(&plan).await;
    let report = check_strict_serializable(&history);
    assert_eq!(report.valid, Valid::True, "{}", describe(&report));

    // Drop the middle element of a committed read of 3 or more (not the final read, which
    // still holds the element, so the two reads can no longer both be prefixes of one order).
    let (op, mop) = history
        .ops
        .iter()
        .enumerate()
        .filter(|(_, op)| op.kind == OpType::Ok && op.process != Some(FINAL_PROCESS))
        .find_map(|(i, op)| {
            op.value.iter().position(
                |mop| matches!(mop, Mop::Read { value: ReadValue::List(list), .. } if list.len() >= 3),
            ).map(|mop| (i, mop))
        })
        .expect("some committed read saw 3 elements or more");
    let Mop::Read {
        value: ReadValue::List(list),
        ..
    } = &mut history.ops[op].value[mop]
    else {
        unreachable!()
    };
    list.remove(list.len() / 2);
    let report = check_strict_serializable(&history);
    assert_eq!(report.valid, Valid::False, "{}", describe(&report));
    assert!(
        report
            .anomaly_types
            .iter()
            .any(|kind| kind == "incompatible-order"),
        "{}",
        describe(&report)
    );
}
