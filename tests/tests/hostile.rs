//! Hostile and broken guests, written in WAT: each gets a clean, specific error, and a
//! bystander client's bank transfers keep succeeding throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use transdb_client::Client;
use transdb_proto::ErrorCode;
use transdb_tests::{TestServer, procedure_module};

/// A module with the required exports, the imports in `imports`, and procedure `run` whose
/// body is `body`. Memory is `pages` pages; the argument buffer is at 1024.
fn guest(imports: &str, pages: u32, body: &str, extra: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
            {imports}
            (memory (export "memory") {pages})
            (func (export "transdb_alloc") (param i32) (result i32) (i32.const 1024))
            (func (export "transdb_proc_run") (param i32 i32 i32) {body})
            {extra})"#
    );
    wat::parse_str(&text).unwrap_or_else(|error| panic!("bad test WAT: {error}\n{text}"))
}

const OUTPUT: &str = r#"(import "transdb_v1" "output" (func $output (param i32 i32)))"#;

async fn call_error(client: &Client, module: &str) -> transdb_client::Error {
    client
        .call_json(module, "run", "null")
        .await
        .expect_err("the hostile call must fail")
}

/// A client moving money back and forth until told to stop; counts its successes and
/// panics on any failure.
fn bystander(
    client: Client,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let (from, to) = if i.is_multiple_of(2) {
                ("alice", "bob")
            } else {
                ("bob", "alice")
            };
            let json = format!(r#"{{"from":"{from}","to":"{to}","amount":1}}"#);
            client
                .call_json("bank", "transfer", &json)
                .await
                .expect("bystander transfer");
            done.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_fail_cleanly_while_others_keep_working() {
    let server = TestServer::start_with(|config| {
        config.runtime.fuel_per_call = 5_000_000;
        config.runtime.memory_bytes = 4 * 1024 * 1024;
        config.runtime.output_bytes = 64 * 1024;
    })
    .await;
    let client = server.client().await;
    client
        .deploy("bank", &procedure_module("bank"))
        .await
        .unwrap();
    client
        .call_json("bank", "open", r#"{"account":"alice","balance":1000}"#)
        .await
        .unwrap();
    client
        .call_json("bank", "open", r#"{"account":"bob","balance":1000}"#)
        .await
        .unwrap();
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let background = bystander(server.client().await, stop.clone(), done.clone());

    // An infinite loop runs out of fuel.
    client
        .deploy("spin", &guest("", 1, "(loop $forever (br $forever))", ""))
        .await
        .unwrap();
    let error = call_error(&client, "spin").await;
    assert_eq!(error.code(), Some(ErrorCode::OUT_OF_FUEL), "{error}");

    // Unbounded recursion overflows the wasm stack.
    let recursion = guest("", 1, "(call $deeper)", "(func $deeper (call $deeper))");
    client.deploy("recurse", &recursion).await.unwrap();
    let error = call_error(&client, "recurse").await;
    assert_eq!(error.code(), Some(ErrorCode::GUEST_TRAP), "{error}");
    assert!(error.to_string().contains("stack"), "{error}");

    // A memory.grow bomb is stopped at the memory limit: grow fails and the guest, which
    // then reports its size, holds at most the limit.
    let bomb = guest(
        OUTPUT,
        1,
        "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
         (i32.store (i32.const 0) (memory.size))
         (call $output (i32.const 0) (i32.const 4))",
        "",
    );
    client.deploy("bomb", &bomb).await.unwrap();
    // The result is the raw 4 output bytes; with the JSON encoding they come back as is.
    let pages = client.call_json("bomb", "run", "null").await.unwrap();
    let pages = u32::from_le_bytes(pages.as_bytes().try_into().expect("4 bytes"));
    assert_eq!(pages, 64, "4 MiB limit = 64 pages of 64 KiB");

    // A result over the output limit.
    let big = guest(
        OUTPUT,
        2,
        "(call $output (i32.const 0) (i32.const 65537))",
        "",
    );
    client.deploy("big", &big).await.unwrap();
    let error = call_error(&client, "big").await;
    assert_eq!(error.code(), Some(ErrorCode::OUTPUT_TOO_LARGE), "{error}");

    // `unreachable`.
    client
        .deploy("trap", &guest("", 1, "unreachable", ""))
        .await
        .unwrap();
    let error = call_error(&client, "trap").await;
    assert_eq!(error.code(), Some(ErrorCode::GUEST_TRAP), "{error}");
    assert!(error.to_string().contains("unreachable"), "{error}");

    // A procedure that returns without a result.
    client
        .deploy("silent", &guest("", 1, "", ""))
        .await
        .unwrap();
    let error = call_error(&client, "silent").await;
    assert_eq!(error.code(), Some(ErrorCode::ABI_VIOLATION), "{error}");

    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    assert!(
        done.load(Ordering::Relaxed) > 0,
        "the bystander made progress"
    );
    assert_eq!(
        client
            .call_json("bank", "total", r#"{"accounts":["alice","bob"]}"#)
            .await
            .unwrap(),
        "2000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_that_cannot_run_here_are_refused_at_deploy_with_the_reason() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let refused = |bytes: Vec<u8>, expected: &'static str| {
        let client = client.clone();
        async move {
            let error = client
                .deploy("bad", &bytes)
                .await
                .expect_err("must be refused");
            assert_eq!(error.code(), Some(ErrorCode::INVALID_MODULE), "{error}");
            assert!(
                error.to_string().contains(expected),
                "expected {expected:?} in: {error}"
            );
        }
    };
    refused(b"this is not wasm".to_vec(), "not a WebAssembly module").await;
    refused(b"\0asm\x01\0\0\0\xff".to_vec(), "not valid WebAssembly").await;
    let wasi = r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#;
    refused(guest(wasi, 1, "", ""), "WASI").await;
    let other_abi = r#"(import "transdb_v2" "get" (func (param i32 i32 i32 i32) (result i64)))"#;
    refused(guest(other_abi, 1, "", ""), "ABI transdb_v2").await;
    let unknown = r#"(import "transdb_v1" "launch_missiles" (func))"#;
    refused(guest(unknown, 1, "", ""), "launch_missiles").await;
    let wrong_type = r#"(import "transdb_v1" "get" (func (param i32)))"#;
    refused(guest(wrong_type, 1, "", ""), "imports do not match").await;
    refused(
        wat::parse_str(r#"(module (func (export "transdb_proc_run") (param i32 i32 i32)))"#)
            .unwrap(),
        "memory",
    )
    .await;
    let no_alloc = r#"(module (memory (export "memory") 1) (func (export "transdb_proc_run") (param i32 i32 i32)))"#;
    refused(wat::parse_str(no_alloc).unwrap(), "transdb_alloc").await;
    let no_procedures = r#"(module (memory (export "memory") 1) (func (export "transdb_alloc") (param i32) (result i32) (i32.const 0)))"#;
    refused(wat::parse_str(no_procedures).unwrap(), "no procedures").await;
    refused(
        guest(
            "",
            1,
            "",
            r#"(func (export "transdb_keys_other") (param i32 i32 i32))"#,
        ),
        "no procedure of the same name",
    )
    .await;
    refused(guest("", 1000, "", ""), "exceeds the limit").await;
    let start_trap = r#"(func $start unreachable) (start $start)"#;
    refused(guest("", 1, "", start_trap), "cannot be instantiated").await;

    let error = client
        .deploy("has space", &guest("", 1, "", ""))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::INVALID_NAME), "{error}");
    assert!(
        client.modules().await.unwrap().is_empty(),
        "nothing was installed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_functions_check_every_argument() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let get = r#"(import "transdb_v1" "get" (func $get (param i32 i32 i32 i32) (result i64)))"#;
    let put = r#"(import "transdb_v1" "put" (func $put (param i32 i32 i32 i32)))"#;
    let declare = r#"(import "transdb_v1" "declare_key" (func $declare (param i32 i32 i32)))"#;
    let fail = r#"(import "transdb_v1" "fail" (func $fail (param i32 i32 i32)))"#;
    let cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        (
            "a key pointer past the end of memory",
            guest(
                get,
                1,
                "(drop (call $get (i32.const 65530) (i32.const 100) (i32.const 0) (i32.const 0)))",
                "",
            ),
            ErrorCode::ABI_VIOLATION,
            "outside the guest's memory",
        ),
        (
            "a negative length",
            guest(
                put,
                1,
                "(call $put (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 0))",
                "",
            ),
            ErrorCode::ABI_VIOLATION,
            "outside the guest's memory",
        ),
        (
            "a key that is not UTF-8",
            guest(
                get,
                1,
                "(i32.store8 (i32.const 0) (i32.const 255)) (drop (call $get (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0)))",
                "",
            ),
            ErrorCode::ABI_VIOLATION,
            "not UTF-8",
        ),
        (
            "an output buffer outside memory",
            guest(
                &format!("{get} {put}"),
                1,
                "(call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1))
                 (drop (call $get (i32.const 0) (i32.const 1) (i32.const 65536) (i32.const 100)))",
                "",
            ),
            ErrorCode::ABI_VIOLATION,
            "output buffer",
        ),
        (
            "a key over the key limit",
            guest(
                put,
                1,
                "(call $put (i32.const 0) (i32.const 1025) (i32.const 0) (i32.const 0))",
                "",
            ),
            ErrorCode::KEY_TOO_LARGE,
            "MAX_KEY_BYTES",
        ),
        (
            "declare_key outside a key function",
            guest(
                declare,
                1,
                "(call $declare (i32.const 0) (i32.const 1) (i32.const 1))",
                "",
            ),
            ErrorCode::ABI_VIOLATION,
            "only be called from a key function",
        ),
        (
            "fail with an unknown kind",
            guest(
                fail,
                1,
                "(call $fail (i32.const 99) (i32.const 0) (i32.const 0))",
                "",
            ),
            ErrorCode::ABI_VIOLATION,
            "unknown kind",
        ),
        (
            "a write in a key function",
            guest(
                &format!("{put} {declare}"),
                1,
                "",
                r#"(func (export "transdb_keys_run") (param i32 i32 i32) (call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0)))"#,
            ),
            ErrorCode::ABI_VIOLATION,
            "not available in a key function",
        ),
        (
            "a key outside the declared set",
            guest(
                &format!("{put} {declare}"),
                1,
                "(i32.store8 (i32.const 0) (i32.const 98)) (call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0))",
                r#"(func (export "transdb_keys_run") (param i32 i32 i32)
                     (i32.store8 (i32.const 0) (i32.const 97)) (call $declare (i32.const 0) (i32.const 1) (i32.const 1)))"#,
            ),
            ErrorCode::KEY_NOT_DECLARED,
            "\"b\"",
        ),
    ];
    for (what, module, code, expected) in cases {
        client
            .deploy("abi", &module)
            .await
            .unwrap_or_else(|error| panic!("{what}: deploy failed: {error}"));
        let error = call_error(&client, "abi").await;
        assert_eq!(error.code(), Some(code), "{what}: {error}");
        assert!(
            error.to_string().contains(expected),
            "{what}: expected {expected:?} in: {error}"
        );
    }
    // Nothing any of them tried to write was applied.
    for key in ["a", "b", "\u{0}"] {
        assert_eq!(client.get(key).await.unwrap(), None, "{key:?}");
    }
}
