//! Determinism and serializability of the whole execution path: run a concurrent mixed
//! workload, record every transaction with its position in the total order and its
//! response, then replay the recording one transaction at a time, in position order, into a
//! fresh engine. Every response and the final state hash must be identical. The workload
//! includes interactive transactions, whose commits are recorded as their input (the
//! versions read and the writes) and replayed at their recorded positions.

use std::sync::Arc;

use transdb_host::executor::{Command, Executor, Session};
use transdb_host::procedures::Procedures;
use transdb_host::runtime::{Runtime, RuntimeLimits};
use transdb_host::store::Store;
use transdb_proto::message::{BatchOp, Encoding};
use transdb_proto::{ErrorCode, Request, Response, frame};
use transdb_tests::procedure_module;

fn engine(shards: usize) -> Executor {
    let procedures = Arc::new(Procedures::new(
        Runtime::new(RuntimeLimits::default()).unwrap(),
        10,
    ));
    for name in ["bank", "cycle", "kv"] {
        procedures.deploy(name, &procedure_module(name)).unwrap();
    }
    Executor::new(Arc::new(Store::new(shards)), procedures, 100_000)
}

fn call(module: &'static str, procedure: &'static str, json: String) -> Request<'static> {
    Request::Call {
        module: module.into(),
        procedure: procedure.into(),
        encoding: Encoding::Json,
        args: json.into_bytes().into(),
    }
}

/// The `index`-th request of worker `worker`: transfers, counters, cycle steps (no key
/// set: they lock everything), plain puts and reads, and the odd stats call.
fn request(worker: u64, index: u64) -> Request<'static> {
    let pick = |salt: u64| (worker * 7919 + index * 104_729 + salt) % 10;
    match index % 7 {
        0 | 1 => call(
            "bank",
            "transfer",
            format!(
                r#"{{"from":"a{}","to":"a{}","amount":{}}}"#,
                pick(1),
                pick(2),
                1 + pick(3) * 7
            ),
        ),
        2 => call(
            "kv",
            "increment",
            format!(r#"{{"key":"counter{}","by":{}}}"#, pick(4) % 3, pick(5)),
        ),
        3 => call("cycle", "step", format!(r#"{{"start":{}}}"#, pick(6))),
        4 => Request::Put {
            key: format!("plain{}", pick(7)).into(),
            value: format!("{worker}/{index}").into_bytes().into(),
        },
        5 if index.is_multiple_of(2) => Request::Get {
            key: format!("plain{}", pick(8)).into(),
        },
        5 => Request::Batch {
            ops: vec![
                BatchOp::Put {
                    key: format!("plain{}", pick(9)).into(),
                    value: format!("batch {worker}/{index}").into_bytes().into(),
                },
                BatchOp::Delete {
                    key: format!("plain{}", pick(10)).into(),
                },
            ],
        },
        _ => call(
            "bank",
            "total",
            (r#"{"accounts":["a0","a1","a2","a3","a4","a5","a6","a7","a8","a9"]}"#).to_string(),
        ),
    }
}

async fn run(executor: &Executor, request: Request<'static>) -> Vec<u8> {
    let mut out = Vec::new();
    executor.execute(request, &mut out).await;
    out
}

fn decode(frame_bytes: &[u8]) -> Response<'static> {
    let (payload, _) = frame::split(frame_bytes).unwrap().unwrap();
    frame::decode::<Response<'_>>(payload).unwrap().into_owned()
}

/// An interactive transfer of 1 between two accounts (stored as decimal text by `bank`):
/// Begin, two reads, two writes, Commit. Returns whether it committed (else: a conflict).
async fn interactive_transfer(executor: &Executor, from: u64, to: u64) -> bool {
    let mut session = Session::default();
    let mut step = async |request: Request<'static>| {
        let mut out = Vec::new();
        executor.execute_in(&mut session, request, &mut out).await;
        decode(&out)
    };
    assert!(matches!(step(Request::Begin).await, Response::Begun { .. }));
    let mut balances = Vec::new();
    for account in [from, to] {
        let Response::Value(Some(value)) = step(Request::Get {
            key: format!("account:a{account}").into(),
        })
        .await
        else {
            panic!("account a{account} exists")
        };
        balances.push(
            String::from_utf8(value.into_owned())
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
    }
    if balances[0] < 1 {
        return matches!(step(Request::Rollback).await, Response::RolledBack);
    }
    for (account, balance) in [(from, balances[0] - 1), (to, balances[1] + 1)] {
        let stored = step(Request::Put {
            key: format!("account:a{account}").into(),
            value: balance.to_string().into_bytes().into(),
        })
        .await;
        assert_eq!(stored, Response::Stored);
    }
    match step(Request::Commit).await {
        Response::Committed { .. } => true,
        Response::Error(error) if error.code == ErrorCode::CONFLICT => false,
        other => panic!("unexpected commit answer {other:?}"),
    }
}

async fn set_up(executor: &Executor) {
    for account in 0..10 {
        run(
            executor,
            call(
                "bank",
                "open",
                format!(r#"{{"account":"a{account}","balance":100}}"#),
            ),
        )
        .await;
    }
    run(
        executor,
        call("cycle", "setup", r#"{"nodes":10}"#.to_string()),
    )
    .await;
}

fn state_hash(executor: &Executor) -> [u8; 32] {
    executor.store.state_hash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_ordered_input_reproduces_every_response_and_the_state() {
    const WORKERS: u64 = 8;
    const REQUESTS_PER_WORKER: u64 = 120;
    const INTERACTIVE_WORKERS: u64 = 4;
    const TRANSACTIONS_PER_INTERACTIVE_WORKER: u64 = 60;
    let original = Arc::new(engine(2).with_history());
    set_up(&original).await;
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let executor = original.clone();
        workers.push(tokio::spawn(async move {
            let mut unordered = 0u64;
            for index in 0..REQUESTS_PER_WORKER {
                let response = run(&executor, request(worker, index)).await;
                let (payload, _) = frame::split(&response).unwrap().unwrap();
                // A call whose keys kept moving is refused without being ordered.
                if let Response::Error(error) = frame::decode::<Response<'_>>(payload).unwrap()
                    && error.code == ErrorCode::KEY_SET_UNSTABLE
                {
                    unordered += 1;
                }
            }
            unordered
        }));
    }
    let mut interactive = Vec::new();
    for worker in 0..INTERACTIVE_WORKERS {
        let executor = original.clone();
        interactive.push(tokio::spawn(async move {
            let mut outcomes = (0u64, 0u64);
            for index in 0..TRANSACTIONS_PER_INTERACTIVE_WORKER {
                let (from, to) = ((worker + index) % 10, (worker * 3 + index * 7 + 1) % 10);
                if from == to {
                    continue;
                }
                if interactive_transfer(&executor, from, to).await {
                    outcomes.0 += 1;
                } else {
                    outcomes.1 += 1;
                }
            }
            outcomes
        }));
    }
    let mut unordered = 0;
    for worker in workers {
        unordered += worker.await.unwrap();
    }
    let (mut committed, mut conflicts) = (0, 0);
    for worker in interactive {
        let (ok, conflict) = worker.await.unwrap();
        committed += ok;
        conflicts += conflict;
    }
    let history = original.take_history();
    let commits = history
        .iter()
        .filter(|recorded| matches!(recorded.command, Command::Commit(_)))
        .count() as u64;
    assert_eq!(
        history.len() as u64 - commits,
        11 + WORKERS * REQUESTS_PER_WORKER - unordered,
        "every other request was ordered"
    );
    assert!(
        commits <= committed + conflicts && commits >= committed,
        "every interactive commit with writes was ordered ({commits} ordered, {committed} committed, {conflicts} conflicts)"
    );
    assert!(committed > 0, "some interactive transfers committed");
    let aborted = history
        .iter()
        .filter(|recorded| {
            let (payload, _) = frame::split(&recorded.response).unwrap().unwrap();
            matches!(
                frame::decode::<Response<'_>>(payload).unwrap(),
                Response::Error(_)
            )
        })
        .count();

    // A fresh engine, with another shard count, one transaction at a time.
    let replay = engine(3);
    for recorded in &history {
        let mut response = Vec::new();
        replay.replay(recorded, &mut response).await;
        assert_eq!(
            response, recorded.response,
            "position {}: {:?} answered differently on replay",
            recorded.position, recorded.command
        );
    }
    assert_eq!(
        state_hash(&replay),
        state_hash(&original),
        "replayed state differs"
    );
    assert!(
        aborted > 0,
        "the workload includes aborted transfers (insufficient funds)"
    );

    // The invariants still hold.
    let total = run(
        &replay,
        call(
            "bank",
            "total",
            r#"{"accounts":["a0","a1","a2","a3","a4","a5","a6","a7","a8","a9"]}"#.into(),
        ),
    )
    .await;
    let (payload, _) = frame::split(&total).unwrap().unwrap();
    assert_eq!(
        frame::decode::<Response<'_>>(payload).unwrap(),
        Response::Output(b"1000".as_slice().into())
    );
    let ring = run(&replay, call("cycle", "check", r#"{"nodes":10}"#.into())).await;
    let (payload, _) = frame::split(&ring).unwrap().unwrap();
    assert_eq!(
        frame::decode::<Response<'_>>(payload).unwrap(),
        Response::Output(b"true".as_slice().into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_decides_outcomes_so_the_replay_check_has_teeth() {
    // Two conflicting withdrawals: only the first succeeds, so a replay in another order
    // than the recorded one would answer differently and fail the check above.
    let executor = engine(2);
    set_up(&executor).await;
    let first = run(
        &executor,
        call("bank", "withdraw", r#"{"account":"a0","amount":60}"#.into()),
    )
    .await;
    let second = run(
        &executor,
        call("bank", "withdraw", r#"{"account":"a0","amount":60}"#.into()),
    )
    .await;
    let swapped = engine(2);
    set_up(&swapped).await;
    let first_swapped = run(
        &swapped,
        call("bank", "withdraw", r#"{"account":"a0","amount":60}"#.into()),
    )
    .await;
    assert_eq!(first, first_swapped);
    assert_ne!(
        first, second,
        "the second withdrawal is refused: the order decides the outcome"
    );
}
