//! Fuzzing of deploy with whole random modules: `wasm-smith` turns the fuzz input into a
//! valid WebAssembly module whose imports are (a subset of) the `transdb_v1` host functions,
//! and the module goes through the server's own path: a `Deploy` request to an
//! `Executor`, then a `Call` of every procedure it exports, with empty arguments.
//!
//! Half the modules are generated with a fixed, sensible configuration and the export shape
//! of a TransDB module (`memory`, `transdb_alloc`, procedures, key functions, sometimes a
//! wrong one), so that most deploy and their procedures run; the other half with an
//! arbitrary ("swarm") configuration and arbitrary exports, which reaches the refusals and
//! the WebAssembly features wasmtime does not enable. Properties:
//! - nothing panics;
//! - a deploy answers `Deployed` or refuses with `INVALID_MODULE` or `MODULE_TOO_LARGE`;
//! - a deployed module lists the procedures it exports;
//! - every call answers `Output` or a clean guest error (never `INTERNAL`), and a failed call
//!   changes nothing.
//!
//! A second target deploys arbitrary bytes behind a WebAssembly header.
//!
//! Run: `cargo test -p transdb-host --test fuzz_modules` (a few seconds); longer:
//! `TRANSDB_FUZZ_ITERATIONS=5000 TRANSDB_FUZZ_SECONDS=120 cargo test -p transdb-host --test
//! fuzz_modules -- --nocapture`. See `fuzz_support/mod.rs` for the corpus.

mod fuzz_support;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Unstructured;
use bytes::Bytes;
use transdb_host::executor::Executor;
use transdb_host::procedures::Procedures;
use transdb_host::runtime::{Runtime, RuntimeLimits};
use transdb_host::store::Store;
use transdb_proto::message::{Encoding, ModuleInfo, Request, Response};
use transdb_proto::{ErrorCode, ErrorResponse};

/// Random modules per run when `TRANSDB_FUZZ_ITERATIONS` is not set.
const DEFAULT_ITERATIONS: usize = 400;
/// The module size limit of these tests: small, so that some generated modules meet it.
const MODULE_BYTES: usize = 32 * 1024;

/// Every host function, with its type: the only imports generated modules may have.
const HOST_IMPORTS: &str = r#"(module
  (import "transdb_v1" "get" (func (param i32 i32 i32 i32) (result i64)))
  (import "transdb_v1" "put" (func (param i32 i32 i32 i32)))
  (import "transdb_v1" "delete" (func (param i32 i32) (result i32)))
  (import "transdb_v1" "output" (func (param i32 i32)))
  (import "transdb_v1" "fail" (func (param i32 i32 i32)))
  (import "transdb_v1" "log" (func (param i32 i32 i32)))
  (import "transdb_v1" "declare_key" (func (param i32 i32 i32))))"#;

/// Export shapes: the exports a generated module has (with bodies of its own).
const SHAPES: &[&str] = &[
    // One procedure.
    r#"(module
      (memory (export "memory") 1 16)
      (func (export "transdb_alloc") (param i32) (result i32) unreachable)
      (func (export "transdb_proc_run") (param i32 i32 i32) unreachable))"#,
    // Two procedures, one with a key function.
    r#"(module
      (memory (export "memory") 1)
      (func (export "transdb_alloc") (param i32) (result i32) unreachable)
      (func (export "transdb_proc_a") (param i32 i32 i32) unreachable)
      (func (export "transdb_keys_a") (param i32 i32 i32) unreachable)
      (func (export "transdb_proc_b") (param i32 i32 i32) unreachable))"#,
    // A key function without its procedure: refused.
    r#"(module
      (memory (export "memory") 1)
      (func (export "transdb_alloc") (param i32) (result i32) unreachable)
      (func (export "transdb_proc_a") (param i32 i32 i32) unreachable)
      (func (export "transdb_keys_b") (param i32 i32 i32) unreachable))"#,
    // A procedure of the wrong type: refused.
    r#"(module
      (memory (export "memory") 1)
      (func (export "transdb_alloc") (param i32) (result i32) unreachable)
      (func (export "transdb_proc_a") (param i32 i32) (result i32) unreachable))"#,
    // No allocator: refused.
    r#"(module
      (memory (export "memory") 1)
      (func (export "transdb_proc_a") (param i32 i32 i32) unreachable))"#,
    // An invalid procedure name: refused.
    r#"(module
      (memory (export "memory") 1)
      (func (export "transdb_alloc") (param i32) (result i32) unreachable)
      (func (export "transdb_proc_9lives") (param i32 i32 i32) unreachable))"#,
    // A procedure and its key function, and a table and a global exported too.
    r#"(module
      (memory (export "memory") 2 4)
      (table (export "table") 4 funcref)
      (global (export "global") (mut i32) (i32.const 0))
      (func (export "transdb_alloc") (param i32) (result i32) unreachable)
      (func (export "transdb_proc_p") (param i32 i32 i32) unreachable)
      (func (export "transdb_keys_p") (param i32 i32 i32) unreachable))"#,
];

/// What a generated module may look like: a configuration, restricted to our imports.
fn config(
    u: &mut Unstructured<'_>,
    imports: &[u8],
    shapes: &[Vec<u8>],
) -> arbitrary::Result<wasm_smith::Config> {
    let mut config = if u.arbitrary()? {
        // The features wasmtime enables for procedures, small modules, a TransDB shape.
        wasm_smith::Config {
            exports: Some(u.choose(shapes)?.clone()),
            max_funcs: 8,
            max_instructions: 200,
            max_types: 16,
            max_globals: 8,
            max_data_segments: 4,
            max_element_segments: 4,
            max_elements: 64,
            // Beyond the exported one: none (wasmtime allows one memory per instance).
            max_memories: 0,
            max_memory32_bytes: 1 << 20,
            max_tables: u.int_in_range(0..=1)?,
            max_table_elements: 64,
            max_nesting_depth: 6,
            // Half of them without traps of their own, so that more calls reach the host
            // functions and return.
            disallow_traps: u.arbitrary()?,
            // Proposals wasmtime 48 does not enable for procedures (ABI.md).
            threads_enabled: false,
            memory64_enabled: false,
            gc_enabled: false,
            // wasm-smith's reference types include typed function references, which need
            // wasmtime's GC support (not compiled in); funcref tables remain.
            reference_types_enabled: false,
            exceptions_enabled: false,
            custom_page_sizes_enabled: false,
            wide_arithmetic_enabled: false,
            simd_enabled: true,
            relaxed_simd_enabled: true,
            tail_call_enabled: true,
            ..wasm_smith::Config::default()
        }
    } else {
        // Swarm: whatever the fuzz input says, within sizes that compile quickly.
        let mut config: wasm_smith::Config = u.arbitrary()?;
        config.max_funcs = config.max_funcs.min(20);
        config.max_instructions = config.max_instructions.min(400);
        config.max_types = config.max_types.min(30);
        config.max_globals = config.max_globals.min(30);
        config.max_exports = config.max_exports.min(30);
        config.max_data_segments = config.max_data_segments.min(10);
        config.max_element_segments = config.max_element_segments.min(10);
        config.max_elements = config.max_elements.min(1000);
        config.max_tables = config.max_tables.min(4);
        config.max_memories = config.max_memories.min(4);
        config.max_table_elements = config.max_table_elements.min(20_000);
        config.max_type_size = config.max_type_size.min(100);
        if u.arbitrary()? {
            config.exports = Some(u.choose(shapes)?.clone());
        }
        // A proposal newer than wasmtime 48's parser: every module using it is refused at
        // its first byte, which tells nothing after the first time.
        config.compact_imports_enabled = false;
        config
    };
    config.available_imports = Some(imports.to_vec());
    config.compact_imports_enabled = false;
    Ok(config)
}

/// A refusal's message without its numbers, to count refusals by kind: its first clause
/// and, for the validator's messages, the innermost cause (after the last `: `).
fn reason(message: &str) -> String {
    let head: String = message
        .split(':')
        .next()
        .unwrap_or(message)
        .chars()
        .take(50)
        .collect();
    let cause = message.rsplit(": ").next().unwrap_or(message);
    let cause = cause.split(" (at offset").next().unwrap_or(cause);
    // Numbers (a run of digits after a space, or of three or more) become `N`; `i32` stays.
    let general = |text: &str| -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
            let run = rest[start..]
                .find(|c: char| !c.is_ascii_hexdigit() && c != 'x')
                .map_or(rest.len(), |end| start + end);
            let after_space = rest[..start].ends_with([' ', '(']) || start == 0;
            out.push_str(&rest[..start]);
            out.push_str(match after_space || run - start >= 3 {
                true => "N",
                false => &rest[start..run],
            });
            rest = &rest[run..];
        }
        out.push_str(rest);
        out.chars().take(90).collect()
    };
    match message.contains(": ") {
        true => format!("{}: {}", general(&head), general(cause)),
        false => general(message),
    }
}

/// Tallies of what happened, printed at the end.
#[derive(Default, Debug)]
struct Tally {
    modules: usize,
    deployed: usize,
    refused: BTreeMap<String, usize>,
    calls: usize,
    committed: usize,
    call_errors: BTreeMap<String, usize>,
}

struct Harness {
    executor: Executor,
    tokio: tokio::runtime::Runtime,
}

impl Harness {
    fn new() -> Harness {
        let limits = RuntimeLimits {
            fuel_per_call: 1_000_000,
            module_bytes: MODULE_BYTES,
            concurrent_calls: 4,
            // Fuel ends every call within milliseconds; no wall-clock backstop by chance.
            deadline: Duration::from_secs(60),
            ..RuntimeLimits::default()
        };
        let procedures = Arc::new(Procedures::new(Runtime::new(limits).unwrap(), 4));
        let store = Arc::new(Store::new(2));
        store.put("a", Bytes::from_static(b"value-of-a"), 0);
        let executor = Executor::new(store, procedures, 100);
        let tokio = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Harness { executor, tokio }
    }

    fn request(&self, request: Request<'_>) -> Response<'static> {
        fuzz_support::execute(&self.tokio, &self.executor, request)
    }

    fn contents(&self) -> BTreeMap<String, Bytes> {
        fuzz_support::contents(&self.executor.store)
    }

    /// Deploys `module` and calls each of its procedures once; checks every answer.
    fn check_module(&self, module: &[u8], tally: &mut Tally) {
        tally.modules += 1;
        let deployed = self.request(Request::Deploy {
            name: Cow::Borrowed("fuzzed"),
            module: Cow::Borrowed(module),
        });
        let info: ModuleInfo = match deployed {
            Response::Deployed(info) => info,
            Response::Error(ErrorResponse { code, message }) => {
                assert!(
                    [ErrorCode::INVALID_MODULE, ErrorCode::MODULE_TOO_LARGE].contains(&code),
                    "deploy refused with {code:?}: {message}"
                );
                assert!(!message.is_empty());
                *tally
                    .refused
                    .entry(format!("{code:?} {}", reason(&message)))
                    .or_default() += 1;
                return;
            }
            other => panic!("deploy answered with {other:?}"),
        };
        tally.deployed += 1;
        assert_eq!(info.name, "fuzzed");
        assert_eq!(info.size_bytes, module.len() as u64);
        assert!(
            !info.procedures.is_empty(),
            "a module without procedures deployed"
        );
        for procedure in &info.procedures {
            let before = self.contents();
            let answer = self.request(Request::Call {
                module: Cow::Borrowed("fuzzed"),
                procedure: Cow::Borrowed(&procedure.name),
                encoding: Encoding::Postcard,
                args: Cow::Borrowed(&[]),
            });
            tally.calls += 1;
            match answer {
                Response::Output(_) => tally.committed += 1,
                Response::Error(ErrorResponse { code, message }) => {
                    assert!(
                        fuzz_support::GUEST_ERRORS.contains(&code),
                        "calling {} answered {code:?}, which a guest may not cause: {message}",
                        procedure.name
                    );
                    assert_eq!(self.contents(), before, "a failed call changed the store");
                    *tally.call_errors.entry(format!("{code:?}")).or_default() += 1;
                }
                other => panic!("a call answered with {other:?}"),
            }
        }
    }
}

#[test]
fn fuzz_deploy_generated_modules() {
    let imports = wat::parse_str(HOST_IMPORTS).unwrap();
    let shapes: Vec<Vec<u8>> = SHAPES
        .iter()
        .map(|shape| wat::parse_str(shape).unwrap())
        .collect();
    let harness = Harness::new();
    let mut tally = Tally::default();
    // The harness and the tally hold locks and counters, no invariant a panic could break.
    let (shared, mut counts) = (AssertUnwindSafe(&harness), AssertUnwindSafe(&mut tally));
    fuzz_support::run_target("deploy_generated_modules", || {
        bolero::check!(name = "deploy_generated_modules")
            .with_iterations(fuzz_support::iterations(DEFAULT_ITERATIONS))
            .with_test_time(fuzz_support::time_cap())
            .for_each(|input: &[u8]| {
                let data = fuzz_support::expand(input, 8192);
                let mut u = Unstructured::new(&data);
                let Ok(config) = config(&mut u, &imports, &shapes) else {
                    return;
                };
                let Ok(module) = wasm_smith::Module::new(config, &mut u) else {
                    return;
                };
                let module = module.to_bytes();
                fuzz_support::remembering(input, || shared.check_module(&module, &mut counts));
            });
    });
    eprintln!("fuzz target deploy_generated_modules: {tally:#?}");
    assert!(tally.modules > 0);
}

#[test]
fn fuzz_deploy_arbitrary_bytes() {
    let harness = Harness::new();
    let mut tally = Tally::default();
    let (shared, mut counts) = (AssertUnwindSafe(&harness), AssertUnwindSafe(&mut tally));
    fuzz_support::run_target("deploy_arbitrary_bytes", || {
        bolero::check!(name = "deploy_arbitrary_bytes")
            .with_iterations(fuzz_support::iterations(DEFAULT_ITERATIONS * 4))
            .with_test_time(fuzz_support::time_cap())
            .for_each(|input: &[u8]| {
                // Usually behind a valid header, so that the parser gets past it.
                let module = match input.split_first() {
                    Some((0, rest)) => rest.to_vec(),
                    _ => [b"\0asm\x01\0\0\0".as_slice(), input].concat(),
                };
                fuzz_support::remembering(input, || shared.check_module(&module, &mut counts));
            });
    });
    eprintln!("fuzz target deploy_arbitrary_bytes: {tally:#?}");
}
