//! Procedures without a key function: the server discovers their keys with a
//! reconnaissance run, locks those, and re-runs the discovery if the state moved.

use std::sync::Arc;

use transdb_host::executor::Executor;
use transdb_host::procedures::Procedures;
use transdb_host::runtime::{Runtime, RuntimeLimits};
use transdb_host::store::Store;
use transdb_proto::message::Encoding;
use transdb_proto::{ErrorCode, Request, Response, frame};
use transdb_tests::procedure_module;

const FOLLOW: &[u8] = br#"{"pointer":"pointer"}"#;

fn engine() -> Executor {
    let procedures = Arc::new(Procedures::new(
        Runtime::new(RuntimeLimits::default()).unwrap(),
        10,
    ));
    procedures
        .deploy("testkit", &procedure_module("testkit"))
        .unwrap();
    Executor::new(Arc::new(Store::new(2)), procedures, 1000)
}

#[tokio::test]
async fn a_key_set_that_moved_since_reconnaissance_aborts_without_effect() {
    let executor = engine();
    executor.store.put("pointer", "x".into(), 0);
    let prepared = executor
        .procedures
        .prepare("testkit", "follow", Encoding::Json, FOLLOW, &executor.store)
        .unwrap();
    assert!(prepared.reconnoitred());
    // Another transaction moves the pointer after the reconnaissance.
    executor.store.put("pointer", "y".into(), 0);
    let _locks = executor
        .scheduler
        .acquire(prepared.lock_set())
        .await
        .unwrap();
    let error = prepared.execute(&executor.store, FOLLOW, 1).unwrap_err();
    assert_eq!(error.code, ErrorCode::KEY_NOT_DECLARED, "{error}");
    assert_eq!(executor.store.get("x"), None);
    assert_eq!(executor.store.get("y"), None);
}

#[tokio::test]
async fn the_server_retries_with_a_fresh_reconnaissance_and_succeeds() {
    let executor = engine();
    executor.store.put("pointer", "y".into(), 0);
    let mut out = Vec::new();
    let call = Request::Call {
        module: "testkit".into(),
        procedure: "follow".into(),
        encoding: Encoding::Json,
        args: FOLLOW.into(),
    };
    executor.execute(call, &mut out).await;
    let (payload, _) = frame::split(&out).unwrap().unwrap();
    assert_eq!(
        frame::decode::<Response<'_>>(payload).unwrap(),
        Response::Output(b"1".as_slice().into())
    );
    assert_eq!(executor.store.get("y").as_deref(), Some(&b"1"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pointer_moves_never_lose_an_increment() {
    let executor = Arc::new(engine());
    executor.store.put("pointer", "c0".into(), 0);
    let mut tasks = Vec::new();
    for worker in 0..4u32 {
        let executor = executor.clone();
        tasks.push(tokio::spawn(async move {
            let mut increments = 0u32;
            for i in 0..60u32 {
                let follow = i % 3 != 0;
                let request = if follow {
                    Request::Call {
                        module: "testkit".into(),
                        procedure: "follow".into(),
                        encoding: Encoding::Json,
                        args: FOLLOW.into(),
                    }
                } else {
                    Request::Put {
                        key: "pointer".into(),
                        value: format!("c{}", (worker + i) % 3).into_bytes().into(),
                    }
                };
                let mut out = Vec::new();
                executor.execute(request, &mut out).await;
                let (payload, _) = frame::split(&out).unwrap().unwrap();
                match frame::decode::<Response<'_>>(payload).unwrap() {
                    Response::Output(_) => increments += 1,
                    Response::Stored => {}
                    // Legitimate under constant pointer moves, and then nothing was written.
                    Response::Error(error) if error.code == ErrorCode::KEY_SET_UNSTABLE => {}
                    other => panic!("{other:?}"),
                }
            }
            increments
        }));
    }
    let mut increments = 0;
    for task in tasks {
        increments += task.await.unwrap();
    }
    let counted: u32 = (0..3)
        .filter_map(|counter| executor.store.get(&format!("c{counter}")))
        .map(|value| std::str::from_utf8(&value).unwrap().parse::<u32>().unwrap())
        .sum();
    assert_eq!(
        counted, increments,
        "every acknowledged increment landed on some counter exactly once"
    );
}
