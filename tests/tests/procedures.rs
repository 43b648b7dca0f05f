//! Stored procedures over real QUIC: deploy, list, call with JSON and typed arguments, the
//! bank's documented shapes, replacement, and the bank invariant under concurrency.

use transdb_client::Error;
use transdb_procedures_bank::{Account, Accounts, Open, Transfer};
use transdb_proto::ErrorCode;
use transdb_tests::{TestServer, procedure_module};

async fn bank_server() -> (TestServer, transdb_client::Client) {
    let server = TestServer::start().await;
    let client = server.client().await;
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_answers_its_documented_json_shapes() {
    let (_server, client) = bank_server().await;
    let call = |procedure: &'static str, json: &'static str| {
        let client = client.clone();
        async move { client.call_json("bank", procedure, json).await }
    };
    assert_eq!(
        call("open", r#"{"account":"alice","balance":100}"#)
            .await
            .unwrap(),
        "null"
    );
    assert_eq!(
        call("open", r#"{"account":"bob","balance":0}"#)
            .await
            .unwrap(),
        "null"
    );
    assert_eq!(
        call("deposit", r#"{"account":"alice","amount":5}"#)
            .await
            .unwrap(),
        "105"
    );
    assert_eq!(
        call("withdraw", r#"{"account":"alice","amount":5}"#)
            .await
            .unwrap(),
        "100"
    );
    assert_eq!(
        call("transfer", r#"{"from":"alice","to":"bob","amount":30}"#)
            .await
            .unwrap(),
        "null"
    );
    assert_eq!(
        call("balance", r#"{"account":"alice"}"#).await.unwrap(),
        "70"
    );
    assert_eq!(call("balance", r#"{"account":"bob"}"#).await.unwrap(), "30");
    assert_eq!(
        call("total", r#"{"accounts":["alice","bob"]}"#)
            .await
            .unwrap(),
        "100"
    );
    // Balances are plain keys, readable without a procedure.
    assert_eq!(
        client.get("account:alice").await.unwrap().as_deref(),
        Some(&b"70"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_carry_the_procedures_message_and_write_nothing() {
    let (_server, client) = bank_server().await;
    client
        .call_json("bank", "open", r#"{"account":"alice","balance":10}"#)
        .await
        .unwrap();
    client
        .call_json("bank", "open", r#"{"account":"bob","balance":0}"#)
        .await
        .unwrap();
    for (json, expected) in [
        (
            r#"{"from":"alice","to":"bob","amount":11}"#,
            "insufficient funds",
        ),
        (
            r#"{"from":"alice","to":"nobody","amount":1}"#,
            "unknown account",
        ),
        (r#"{"from":"alice","to":"bob","amount":0}"#, "positive"),
        (r#"{"from":"alice","to":"bob","amount":-3}"#, "positive"),
    ] {
        let error = client
            .call_json("bank", "transfer", json)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::ABORTED), "{error}");
        assert!(error.to_string().contains(expected), "{error}");
    }
    let again = client
        .call_json("bank", "open", r#"{"account":"alice","balance":99}"#)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");
    assert_eq!(
        client
            .call_json("bank", "total", r#"{"accounts":["alice","bob"]}"#)
            .await
            .unwrap(),
        "10"
    );
    // A self-transfer changes nothing.
    client
        .call_json(
            "bank",
            "transfer",
            r#"{"from":"alice","to":"alice","amount":5}"#,
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .call_json("bank", "balance", r#"{"account":"alice"}"#)
            .await
            .unwrap(),
        "10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_share_the_procedures_own_types() {
    let (_server, client) = bank_server().await;
    for (account, balance) in [("alice", 100), ("bob", 50)] {
        let () = client
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
    let transfer = Transfer {
        from: "alice".into(),
        to: "bob".into(),
        amount: 25,
    };
    let () = client.call("bank", "transfer", &transfer).await.unwrap();
    let alice: i64 = client
        .call(
            "bank",
            "balance",
            &Account {
                account: "alice".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(alice, 75);
    let total: i64 = client
        .call(
            "bank",
            "total",
            &Accounts {
                accounts: vec!["alice".into(), "bob".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(total, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_clear_errors() {
    let (_server, client) = bank_server().await;
    let missing_module = client
        .call_json("nope", "transfer", "{}")
        .await
        .unwrap_err();
    assert_eq!(
        missing_module.code(),
        Some(ErrorCode::MODULE_NOT_FOUND),
        "{missing_module}"
    );
    let missing_procedure = client.call_json("bank", "steal", "{}").await.unwrap_err();
    assert_eq!(
        missing_procedure.code(),
        Some(ErrorCode::PROCEDURE_NOT_FOUND)
    );
    assert!(
        missing_procedure.to_string().contains("transfer"),
        "lists what exists: {missing_procedure}"
    );
    let bad_json = client
        .call_json("bank", "transfer", "{not json")
        .await
        .unwrap_err();
    assert_eq!(
        bad_json.code(),
        Some(ErrorCode::INVALID_ARGUMENTS),
        "{bad_json}"
    );
    let wrong_shape = client
        .call_json("bank", "transfer", r#"{"from":"a","to":"b"}"#)
        .await
        .unwrap_err();
    assert!(
        wrong_shape.to_string().contains("missing field `amount`"),
        "{wrong_shape}"
    );
    let bad_name = client.call_json("bank", "../etc", "{}").await.unwrap_err();
    assert_eq!(bad_name.code(), Some(ErrorCode::INVALID_NAME));
    let bad_module = client.call_json("../etc", "p", "{}").await.unwrap_err();
    assert_eq!(
        bad_module.code(),
        Some(ErrorCode::INVALID_NAME),
        "{bad_module}"
    );
    client.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploying_lists_procedures_and_replacing_changes_the_version() {
    let server = TestServer::start().await;
    let client = server.client().await;
    assert!(client.modules().await.unwrap().is_empty());
    let bank = client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    let names: Vec<&str> = bank
        .procedures
        .iter()
        .map(|procedure| procedure.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "balance", "deposit", "open", "total", "transfer", "withdraw"
        ]
    );
    assert!(
        bank.procedures
            .iter()
            .all(|procedure| procedure.declares_keys)
    );
    assert_eq!(bank.version.len(), 64, "SHA-256 in hex");

    client
        .call_json("bank", "open", r#"{"account":"alice","balance":1}"#)
        .await
        .unwrap();
    // Replace "bank" with the kv module: the name now runs the new code; data stays.
    let replaced = client
        .deploy("bank", &procedure_module("kv"))
        .await
        .unwrap();
    assert_ne!(replaced.version, bank.version);
    assert_eq!(
        client
            .call_json("bank", "get", r#"{"key":"account:alice"}"#)
            .await
            .unwrap(),
        r#""1""#
    );
    let gone = client
        .call_json("bank", "balance", r#"{"account":"alice"}"#)
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::PROCEDURE_NOT_FOUND));
    let listed = client.modules().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, replaced.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_conserve_the_total_and_reads_see_consistent_totals() {
    const ACCOUNTS: usize = 20;
    const CLIENTS: usize = 8;
    const TRANSFERS_PER_CLIENT: usize = 150;
    let (server, client) = bank_server().await;
    for account in 0..ACCOUNTS {
        client
            .call_json(
                "bank",
                "open",
                &format!(r#"{{"account":"a{account}","balance":100}}"#),
            )
            .await
            .unwrap();
    }
    let all_accounts: Vec<String> = (0..ACCOUNTS).map(|account| format!("a{account}")).collect();
    let mut tasks = Vec::new();
    for worker in 0..CLIENTS {
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut committed = 0;
            for i in 0..TRANSFERS_PER_CLIENT {
                let from = (worker * 7 + i * 3) % ACCOUNTS;
                let to = (worker + i * 11 + 1) % ACCOUNTS;
                let transfer = Transfer {
                    from: format!("a{from}"),
                    to: format!("a{to}"),
                    amount: 1 + (i % 40) as i64,
                };
                match client.call::<_, ()>("bank", "transfer", &transfer).await {
                    Ok(()) => committed += 1,
                    Err(Error::Rejected(error)) if error.code == ErrorCode::ABORTED => {}
                    Err(other) => panic!("transfer failed: {other}"),
                }
            }
            committed
        }));
    }
    let reader = {
        let client = server.client().await;
        let accounts = Accounts {
            accounts: all_accounts.clone(),
        };
        tokio::spawn(async move {
            for _ in 0..100 {
                let total: i64 = client.call("bank", "total", &accounts).await.unwrap();
                assert_eq!(
                    total,
                    100 * ACCOUNTS as i64,
                    "a read saw a partial transfer"
                );
            }
        })
    };
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap();
    }
    reader.await.unwrap();
    assert!(committed > 0);
    let accounts = Accounts {
        accounts: all_accounts,
    };
    let total: i64 = client.call("bank", "total", &accounts).await.unwrap();
    assert_eq!(total, 100 * ACCOUNTS as i64);
    for account in 0..ACCOUNTS {
        let balance: i64 = client
            .call(
                "bank",
                "balance",
                &Account {
                    account: format!("a{account}"),
                },
            )
            .await
            .unwrap();
        assert!(balance >= 0, "a{account} went negative: {balance}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cycle_ring_survives_concurrent_steps_without_a_declared_key_set() {
    const NODES: u32 = 30;
    let server = TestServer::start().await;
    let client = server.client().await;
    let cycle = client
        .deploy("cycle", &procedure_module("cycle"))
        .await
        .unwrap();
    assert!(
        !cycle
            .procedures
            .iter()
            .find(|procedure| procedure.name == "step")
            .unwrap()
            .declares_keys
    );
    client
        .call_json("cycle", "setup", &format!(r#"{{"nodes":{NODES}}}"#))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for worker in 0..6u32 {
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..60u32 {
                let start = (worker * 13 + i * 7) % NODES;
                client
                    .call_json("cycle", "step", &format!(r#"{{"start":{start}}}"#))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        client
            .call_json("cycle", "check", &format!(r#"{{"nodes":{NODES}}}"#))
            .await
            .unwrap(),
        "true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_procedures_compare_and_swap_and_count() {
    let server = TestServer::start().await;
    let client = server.client().await;
    client.deploy("kv", &procedure_module("kv")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                client
                    .call_json("kv", "increment", r#"{"key":"counter","by":1}"#)
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        client.get("counter").await.unwrap().as_deref(),
        Some(&b"200"[..]),
        "no lost increments"
    );
    assert_eq!(
        client
            .call_json("kv", "cas", r#"{"key":"c","expected":null,"new":"x"}"#)
            .await
            .unwrap(),
        "true"
    );
    assert_eq!(
        client
            .call_json("kv", "cas", r#"{"key":"c","expected":null,"new":"y"}"#)
            .await
            .unwrap(),
        "false"
    );
    assert_eq!(
        client
            .call_json("kv", "get", r#"{"key":"c"}"#)
            .await
            .unwrap(),
        r#""x""#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_apply_in_order_and_atomically() {
    use transdb_client::BatchOp;
    let (server, client) = bank_server().await;
    let put = |key: &'static str, value: &'static str| BatchOp::Put {
        key: key.into(),
        value: value.as_bytes().into(),
    };
    let applied = client
        .batch(&[
            put("k", "1"),
            put("k", "2"),
            BatchOp::Delete { key: "gone".into() },
            put("other", "x"),
        ])
        .await
        .unwrap();
    assert_eq!(applied, 4);
    assert_eq!(
        client.get("k").await.unwrap().as_deref(),
        Some(&b"2"[..]),
        "the later write wins"
    );

    // A batch with one bad write applies nothing.
    let too_long = "k".repeat(1025);
    let bad = [
        put("k", "3"),
        BatchOp::Put {
            key: too_long.into(),
            value: b"v".as_slice().into(),
        },
    ];
    let error = client.batch(&bad).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::KEY_TOO_LARGE), "{error}");
    assert_eq!(client.get("k").await.unwrap().as_deref(), Some(&b"2"[..]));

    // Atomicity: batches move 100 units between two accounts; a concurrent reader's total,
    // one transaction reading both, never sees half a batch.
    client
        .batch(&[put("account:a", "100"), put("account:b", "0")])
        .await
        .unwrap();
    let writer = {
        let client = server.client().await;
        tokio::spawn(async move {
            for i in 0..150u32 {
                let (a, b) = if i.is_multiple_of(2) {
                    ("0", "100")
                } else {
                    ("100", "0")
                };
                client
                    .batch(&[put("account:a", a), put("account:b", b)])
                    .await
                    .unwrap();
            }
        })
    };
    let accounts = Accounts {
        accounts: vec!["a".into(), "b".into()],
    };
    while !writer.is_finished() {
        let total: i64 = client.call("bank", "total", &accounts).await.unwrap();
        assert_eq!(total, 100, "a read saw half a batch");
    }
    writer.await.unwrap();
}
